#!/usr/bin/env bash
# Best-effort install of the optional test oracles. torch must come from a local CPU wheel
# (pip --no-index): a plain `pip install torch` on Linux pulls several GB of CUDA packages.
PY="${1:-python3}"
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q --no-index torch==2.13.0 2>/dev/null \
    && echo "oracles: installed torch 2.13.0 (local CPU wheel)" \
    || { echo "oracles: no local CPU wheel of torch; torch-based checks will be skipped"; exit 0; }
fi
if ! "$PY" -c "import transformers" 2>/dev/null; then
  # transformers does not require torch from pip's point of view; the installed torch satisfies it.
  "$PY" -m pip install -q "transformers>=4.45" 2>/dev/null \
    && echo "oracles: installed transformers" \
    || echo "oracles: transformers unavailable; transformers-based checks will be skipped"
fi
exit 0
