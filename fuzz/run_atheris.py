"""Coverage-guided fuzzing of hiquant's parsers and bindings with atheris.

    pip install atheris
    python fuzz/run_atheris.py TARGET [-runs=N] [-max_total_time=S]   # TARGET from fuzz/targets.py

Exits non-zero on a finding (an unexpected exception or a crash), printing the input.
"""

from __future__ import annotations

import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(__file__))
with atheris.instrument_imports():
    from targets import TARGETS

    import hiquant._safetensors_io  # noqa: F401
    import hiquant.export  # noqa: F401


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer flags]")
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0]] + sys.argv[2:], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
