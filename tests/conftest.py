import os
import re
import sys

# tests/ holds helper modules (tolerances.py, checkpoints.py) imported by the test files.
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402

import checkpoints  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory of cached tiny random checkpoints: tiny_checkpoint(arch, **options) →
    (folder, config dict, float32 weights as stored). Same arguments → same folder."""
    made = {}

    def make(arch="LlamaForCausalLM", **kw):
        key = (arch, tuple(sorted((k, repr(v)) for k, v in kw.items())))
        if key not in made:
            folder = tmp_path_factory.mktemp(arch.replace("ForCausalLM", "").lower())
            made[key] = checkpoints.write_checkpoint(folder, arch, **kw)
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_llama(tiny_checkpoint):
    """A 2-block LLaMA with GQA (4 query heads, 2 key/value heads), float32 weights."""
    return tiny_checkpoint("LlamaForCausalLM")


# Test oracles: torch, transformers, compressed-tensors (which transformers loads the
# compressed-tensors export with) and lm-eval (tests/test_harness.py), installed by `make oracles`
# (tools/install_oracles.sh).
# Tests that compare with them skip where they are missing; under CI=true (or
# HIQUANT_REQUIRE_ORACLES=1) such a skip fails the run instead, naming the missing oracle, so that
# CI never passes with its comparisons silently skipped. Other skips (../shared/bench absent) stay
# skips. HIQUANT_REQUIRE_ORACLES=0 turns the check off.
ORACLES = ("torch", "transformers", "compressed_tensors", "lm_eval")
_ORACLE_SKIP = re.compile(r"could not import '(%s)'" % "|".join(ORACLES))


def _oracles_required():
    flag = os.environ.get("HIQUANT_REQUIRE_ORACLES")
    if flag is None:
        flag = os.environ.get("CI", "")
    return flag.strip().lower() in ("1", "true", "yes")


def _missing_oracle(report):
    """The oracle whose import made this skipped report skip, or None."""
    if not report.skipped or not isinstance(report.longrepr, tuple):
        return None
    match = _ORACLE_SKIP.search(str(report.longrepr[-1]))
    return match and match.group(1)


def _fail_oracle_skip(report, where):
    oracle = _missing_oracle(report)
    if oracle is not None and _oracles_required():
        reason = report.longrepr[-1]
        report.outcome = "failed"
        report.longrepr = (
            f"{where} skipped because the test oracle '{oracle}' is missing ({reason}). Under CI=true "
            f"every oracle must be installed: run `make oracles` (tools/install_oracles.sh installs "
            f"torch==2.13.0, transformers, compressed-tensors and lm-eval) and read its output; "
            f"HIQUANT_REQUIRE_ORACLES=0 allows the skip.")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_oracle_skip(outcome.get_result(), item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_oracle_skip(outcome.get_result(), collector.nodeid)


BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "bench")


@pytest.fixture(scope="session")
def bench_assets():
    """/work/shared/bench (../shared/bench from the project root), or skip."""
    root = os.environ.get("HIQUANT_BENCH_ASSETS", BENCH)
    if not os.path.isfile(os.path.join(root, "llama-bench", "model.safetensors")):
        pytest.skip("benchmark assets (../shared/bench) are not available")
    return os.path.abspath(root)


@pytest.fixture
def sigint_raises():
    """Ctrl-C tests need SIGINT to raise KeyboardInterrupt. A process started in the background
    by a non-interactive shell (as CI jobs can be) inherits SIGINT ignored, and Python then keeps it
    ignored: install the default handler for the test and restore whatever was there."""
    import signal
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
