"""The embedded model's hiq, gptq and lwc exports at small, fixed settings, reduced to the sha256
of every file they write (``fake/`` and ``packed/``; the reports carry timings and are left out).

``tests/data/export_digests.json`` holds the digests recorded before the package redesign;
``test_refactor_parity.py`` keeps them. Regenerate only for a deliberate change of the exported
bytes, and say why in the commit message: ``python tests/export_digests.py --write``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

DIGESTS = Path(__file__).with_name("data") / "export_digests.json"

# small enough for the default test run, large enough to pass through every stage: the Fisher
# pass, the IQP allocation, the block-wise refinement, GPTQ low codes and AdaRound
SETTINGS = {
    "hiq": dict(method="hiq", wbits=2, group_size=64, avg_bits=2.3, n_calib=8, seqlen=64,
                m_windows=4, lwc_iters=40, adaround_iters=60, block_epochs=1, n_threads=2),
    "gptq": dict(method="gptq", wbits=3, group_size=64, n_calib=8, seqlen=64, n_threads=2),
    "lwc": dict(method="lwc", wbits=2, group_size=64, n_calib=8, seqlen=64, lwc_iters=40,
                block_epochs=1, n_threads=2),
}
# the NumPy runtime everywhere (backend="auto" would take torch on a GPU machine)
for _kw in SETTINGS.values():
    _kw["backend"] = "numpy"


def export_digests(method: str) -> dict:
    import hiquant
    from hiquant.datasets import embedded_calib_path, embedded_model_path
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        hiquant.quantize(embedded_model_path(), embedded_calib_path(), out=out, progress=False,
                         **SETTINGS[method])
        # the recorded settings hold the calibration file's absolute path: digests must not
        # depend on where the checkout lives (CI clones elsewhere)
        where = os.path.abspath(embedded_calib_path()).encode()
        return {str(p.relative_to(out)):
                hashlib.sha256(p.read_bytes().replace(where, b"<calib>")).hexdigest()
                for p in sorted(out.rglob("*")) if p.is_file() and p.parent != out}


if __name__ == "__main__":
    got = {m: export_digests(m) for m in SETTINGS}
    if "--write" in sys.argv:
        DIGESTS.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    print(json.dumps(got, indent=1, sort_keys=True))
