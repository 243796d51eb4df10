from pathlib import Path

import pytest

# The hiquant.testing plugin's fixtures and hooks (pytest_plugins is only allowed in a root conftest).
from hiquant import testing as _hq
from hiquant.testing import (  # noqa: F401
    hiquant_cache_dir,
    hiquant_results,
    pytest_terminal_summary,
    quantize_and_eval,
)

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "bench"


def pytest_addoption(parser):
    _hq.pytest_addoption(parser)
    parser.addoption("--model", default=None,
                     help="checkpoint folder (default: the embedded model); e.g. ../shared/bench/llama-bench")
    parser.addoption("--calib", default=None, help="calibration text (default: the model's own)")
    parser.addoption("--eval-text", default=None, help="evaluation text")
    parser.addoption("--quick", action="store_true", help="a small grid with few iterations")
    parser.addoption("--m-windows", type=int, default=None,
                     help="calibration windows for M (the measured estimator's cost grows with them)")
    parser.addoption("--no-measured", action="store_true", help="skip the measured-M entry")
    parser.addoption("--lwc-iters", type=int, default=None, help="override the LWC iterations")
    parser.addoption("--adaround-iters", type=int, default=None,
                     help="override the AdaRound iterations")
    parser.addoption("--seeds", default="0",
                     help="comma-separated calibration seeds; every case runs once per seed and "
                          "the summary gives the mean and range over them (e.g. 0,1,2)")
    parser.addoption("--val-windows", type=int, default=None,
                     help="validation windows held out of the calibration text (default: 64 for "
                          "--model, none for the embedded model)")
    parser.addoption("--grid", default="all", choices=("all", "allocation"),
                     help="all cases, or the allocation grid only (fixed ratio against the M "
                          "estimators x candidate sets x W2/W3)")


def pytest_generate_tests(metafunc):
    if "seed" in metafunc.fixturenames:
        seeds = [int(x) for x in metafunc.config.getoption("--seeds").split(",") if x.strip()]
        metafunc.parametrize("seed", seeds, ids=[f"seed{x}" for x in seeds])


@pytest.fixture(scope="session")
def setup(request):
    from hiquant.datasets import embedded_calib_path, embedded_model_path, embedded_test_path
    model = request.config.getoption("--model")
    quick = request.config.getoption("--quick")
    if model is None:
        model, calib, test = embedded_model_path(), embedded_calib_path(), embedded_test_path()
        seqlen = 256
        budgets = dict(w2=2.45, w3=3.40, scale_bits=16)
    else:
        calib = request.config.getoption("--calib") or SHARED / "corpus" / "calib.txt"
        test = request.config.getoption("--eval-text") or SHARED / "corpus" / "test.txt"
        seqlen = 512
        budgets = dict(w2=2.30, w3=3.30, scale_bits="auto")  # auto: the default, 6-bit codes
    common = dict(seqlen=seqlen, eval_seqlen=seqlen)
    for opt, key in (("--lwc-iters", "lwc_iters"), ("--adaround-iters", "adaround_iters")):
        if request.config.getoption(opt) is not None:
            common[key] = request.config.getoption(opt)
    if request.config.getoption("--m-windows"):
        common["m_windows"] = request.config.getoption("--m-windows")
    val = request.config.getoption("--val-windows")
    if val is None:  # the embedded model's calibration text is short
        val = 0 if request.config.getoption("--model") is None else 64
    if val:
        common["val_windows"] = val
    if quick:
        common.update(n_calib=8, eval_windows=16, lwc_iters=20, adaround_iters=40, m_windows=4)
    return dict(model=model, calib=calib, test=test, common=common, quick=quick, budgets=budgets,
                skip_measured=request.config.getoption("--no-measured"),
                grid=request.config.getoption("--grid"))
