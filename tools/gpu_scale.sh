#!/usr/bin/env bash
# The GPU measurement of issue 23 in one command (bench/scale.py on LLaMA-2-7B shapes, torch
# backend on CUDA), sized to run in under 8 minutes on one H100/H200-class GPU.
#
#   tools/gpu_scale.sh [LAYERS] [N_CALIB] [SEQLEN]       (defaults 4 8 512)
#
# The GPU image has torch, transformers, pybind11 and CMake but no Eigen: the Eigen headers come
# with the working tree, in .deps/eigen3 (copy them there first: cp -r /usr/include/eigen3
# .deps/eigen3, and carry .deps), or from EIGEN3_INCLUDE_DIR. Results land in $OUT (or
# bench/results/) as scale-gpu.json plus the printed table.
set -euo pipefail
cd "$(dirname "$0")/.."
LAYERS=${1:-4}; NCAL=${2:-8}; SEQ=${3:-512}
export EIGEN3_INCLUDE_DIR=${EIGEN3_INCLUDE_DIR:-$PWD/.deps/eigen3}
test -f "$EIGEN3_INCLUDE_DIR/Eigen/Core" || { echo "no Eigen at $EIGEN3_INCLUDE_DIR" >&2; exit 2; }
python -c "import hiquant._core" 2>/dev/null || \
  pip install --no-build-isolation --no-deps -q -e . 2>&1 | tail -5
pip install -q safetensors tokenizers tqdm 2>/dev/null || true
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
DEST=${OUT:-bench/results}; mkdir -p "$DEST"
python bench/scale.py --layers "$LAYERS" --n-calib "$NCAL" --seqlen "$SEQ" \
    --backends torch-cuda | tee "$DEST/scale-gpu.txt" | tail -1 > "$DEST/scale-gpu.json"
cat "$DEST/scale-gpu.txt"
