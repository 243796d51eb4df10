#!/usr/bin/env bash
# The base install quantizes: a fresh virtual environment, `pip install .` with no extras (no
# torch, no transformers: what `make run` and a user's plain `pip install hiquant` get), then one
# hiq run of the embedded model with an evaluation. The test suite cannot see this: `make test`
# installs torch as an oracle (a base-install-only failure of the settings' backend check went
# unnoticed for that reason). Usage: tools/base_install_check.sh [PYTHON]   (.ci/run)
set -euo pipefail
PY="${1:-python3}"
cd "$(dirname "$0")/.."
venv=$(mktemp -d)
trap 'rm -rf "$venv"' EXIT
"$PY" -m venv "$venv"
"$venv/bin/python" -m pip install -q .
cd "$venv"  # import the installed package, not the source tree
"$venv/bin/python" - <<'PYEOF'
import importlib.util
import tempfile

for m in ("torch", "transformers"):
    assert importlib.util.find_spec(m) is None, f"the base install pulled in {m}"
from hiquant import quantize
from hiquant.datasets import embedded_calib_path, embedded_model_path, embedded_test_path

with tempfile.TemporaryDirectory() as d:
    rep = quantize(embedded_model_path(), embedded_calib_path(), method="hiq", avg_bits=2.6,
                   wbits=2, group_size=64, eval_text=embedded_test_path(), out=f"{d}/run",
                   n_calib=8, seqlen=128, eval_seqlen=128, eval_windows=8, lwc_iters=20,
                   adaround_iters=20, e2e_epochs=0, progress=False)
assert rep.settings["backend"] == "numpy" and rep.ppl > 1, rep.settings
print(f"base install: hiq on the embedded model, {rep.avg_bits:.3f} bits, ppl {rep.ppl:.2f} "
      "(numpy backend, no torch)")
PYEOF
