#!/usr/bin/env bash
# Installs the test oracles, PyTorch, transformers, compressed-tensors and lm-eval (with
# accelerate): the tests that compare hiquant's NumPy model runtime with transformers' own decoder
# layers (and the learned quantizers with torch autograd, and the compressed-tensors export with
# transformers' loader) need them.
# Usage: tools/install_oracles.sh [PYTHON]   (make oracles; make test runs it)
#
# torch is pinned to exactly 2.13.0: on these machines pip resolves that pin (with the index, which
# torch's own dependencies such as setuptools>=77 need) to the local CPU wheel; any other torch
# requirement can pull several GB of CUDA packages. transformers does not depend on torch from
# pip's point of view, so installing it never replaces the pinned torch.
#
# The script reports what it did and exits 0 even when an install fails: the tests that need a
# missing oracle then skip, and under CI=true tests/conftest.py turns those skips into failures
# naming the oracle, so a CI run can never pass with its comparisons silently skipped.
set -u
PY="${1:-python3}"
TORCH_PIN="torch==2.13.0"
TRANSFORMERS_REQ="transformers>=4.45"
# compressed-tensors: transformers loads hiquant's compressed-tensors export with it. It requires
# torch, so every install runs with a constraint file pinning torch: pip then keeps the pinned
# torch instead of replacing it.
CT_REQ="compressed-tensors>=0.15"
# lm-eval: tests/test_harness.py runs lm-eval-harness through hiquant's registered model and
# compares with lm-eval's own hf model (the [eval] extra); installed under the same constraint.
LM_EVAL_REQ="lm-eval>=0.4.13"
# accelerate: lm-eval's hf model imports it (lm-eval's [hf] extra), and neither lm-eval nor the
# other oracles depend on it (compressed-tensors once pulled it in); requires torch, so it too
# installs under the constraint.
ACCELERATE_REQ="accelerate>=0.26"
log=$(mktemp)
cons=$(mktemp)
trap 'rm -f "$log" "$cons"' EXIT
echo "$TORCH_PIN" >"$cons"

version() { "$PY" -c "import $1; print($1.__version__)" 2>/dev/null; }

install() {  # install NAME REQUIREMENT
  local name=$1 req=$2 v
  if v=$(version "$name"); then
    echo "oracles: $name $v already installed"
    return 0
  fi
  echo "oracles: installing $req ..."
  if "$PY" -m pip install -q -c "$cons" "$req" >"$log" 2>&1 && v=$(version "$name"); then
    echo "oracles: installed $name $v"
  else
    echo "oracles: FAILED to install $req; the tests that need $name will skip (and fail under CI=true)."
    echo "oracles: pip's last lines:"
    tail -n 15 "$log" | sed 's/^/    /'
  fi
}

install torch "$TORCH_PIN"
v=$(version torch) && case "$v" in 2.13.0*) ;; *)
  echo "oracles: note: torch $v is installed, not 2.13.0; tests run against it as it is" ;;
esac
install transformers "$TRANSFORMERS_REQ"
install compressed_tensors "$CT_REQ"
install lm_eval "$LM_EVAL_REQ"
install accelerate "$ACCELERATE_REQ"
exit 0
