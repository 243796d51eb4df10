# Two entry points do all set-up on a fresh machine (Debian/Ubuntu with Python >= 3.9):
#   make run    the main job: quantize the embedded model with hiq and the baselines, print the table
#   make test   the test suite, with its oracles (torch 2.13.0 CPU, transformers)
# CI (.ci/run) runs `make lint`, then `make test`, then the sanitizers, fuzzing and `make bench-quick`.
PY ?= python3
PIP = $(PY) -m pip
RUFF = ruff==0.17.5

.PHONY: run test lint setup system-deps oracles bench-quick

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
	@# The test oracles: torch==2.13.0 (pinned exactly: the local CPU wheel, never a CUDA build) and
	@# transformers. Tests that need a missing one skip; under CI=true they fail (tests/conftest.py).
	@bash tools/install_oracles.sh "$(PY)"

lint:
	@# ruff, pinned, with pyproject.toml's [tool.ruff] configuration.
	@$(PIP) install -q "$(RUFF)"
	$(PY) -m ruff check .

run: setup
	$(PY) -m hiquant demo

test: setup oracles
	$(PY) -m pytest -q tests

bench-quick: setup
	@failed=""; for b in bench/*.py; do case $$b in */_*) continue;; esac; echo "== $$b"; \
	  $(PY) $$b --quick || failed="$$failed $$b"; done; \
	echo "== bench/ablations (pytest --quick)"; $(PY) -m pytest -q bench/ablations --quick -p no:cacheprovider || failed="$$failed ablations"; \
	if [ -n "$$failed" ]; then echo "failed:$$failed"; exit 1; fi
