import os
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
