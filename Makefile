# Two entry points do all set-up on a fresh machine (Debian/Ubuntu with Python >= 3.9):
#   make run    the main job: quantize the embedded model with hiq and the baselines, print the table
#   make test   the test suite
PY ?= python3
PIP = $(PY) -m pip

.PHONY: run test setup system-deps oracles bench-quick

system-deps:
	@# Eigen3 headers for the C++ core (the only non-PyPI build dependency).
	@if [ ! -f /usr/include/eigen3/Eigen/Core ] && [ -z "$$EIGEN3_INCLUDE_DIR" ]; then \
	  if command -v apt-get >/dev/null; then \
	    echo "installing libeigen3-dev"; \
	    (apt-get update -qq && apt-get install -y -qq libeigen3-dev) >/dev/null || \
	    (sudo apt-get update -qq && sudo apt-get install -y -qq libeigen3-dev) >/dev/null; \
	  else echo "Eigen3 not found: install it (see README) or set EIGEN3_INCLUDE_DIR"; exit 1; fi; \
	fi

setup: system-deps
	$(PIP) install -q -e ".[test,plot]"

oracles:
	@# Optional test oracles (PyTorch CPU + transformers), installed only where a local CPU wheel of
	@# torch 2.13.0 is available, so that no multi-GB CUDA build is ever pulled. Tests skip without them.
	@bash tools/install_oracles.sh "$(PY)"

run: setup
	$(PY) -m hiquant demo

test: setup oracles
	$(PY) -m pytest -q tests

bench-quick: setup
	@failed=""; for b in bench/*.py; do case $$b in */_*) continue;; esac; echo "== $$b"; \
	  $(PY) $$b --quick || failed="$$failed $$b"; done; \
	echo "== bench/ablations (pytest --quick)"; $(PY) -m pytest -q bench/ablations --quick -p no:cacheprovider || failed="$$failed ablations"; \
	if [ -n "$$failed" ]; then echo "failed:$$failed"; exit 1; fi
