"""Fuzzing the CLI's argument parsing on the embedded model: any combination of flags and values,
valid or not, ends in rc 0 or a one-line error (rc 2) — never a traceback."""

from __future__ import annotations

import io
import itertools
import sys
from contextlib import redirect_stderr, redirect_stdout

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from hiquant import cli  # noqa: E402
from hiquant.datasets import embedded_calib_path, embedded_model_path, embedded_test_path  # noqa: E402

VALUES = st.sampled_from(["0", "1", "2", "3", "4", "5", "6", "8", "16", "-1", "-5", "64", "100000",
                          "2.3", "1e9", "nan", "inf", "-0.5", "abc", "", "auto", "0.05,0.1",
                          "0.5,abc", "layer", "block", "refine", "gptq", "nearest", "diagonal",
                          "fisher", "measured", "fake", "packed", "cosine", "lwc-first"])
FLAGS = ["--method", "--wbits", "--hbits", "--group", "--avg-bits", "--scale-bits", "--ratio",
         "--candidates", "--estimator", "--n-calib", "--seqlen", "--seed", "--lwc-iters",
         "--adaround-iters", "--objective", "--block-epochs", "--block-batch", "--block-lr",
         "--block-lr-schedule", "--refine-order", "--low-rounding", "--eval-windows",
         "--eval-seqlen", "--export", "--threads"]
METHODS = st.sampled_from(["rtn", "gptq", "lwc", "fixed-ratio", "fp16-retention", "hiq", "x"])
COUNT = itertools.count()


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(method=METHODS, pairs=st.lists(st.tuples(st.sampled_from(FLAGS), VALUES), max_size=4),
       with_eval=st.booleans(), with_calib=st.booleans())
def test_cli_arguments_never_end_in_a_traceback(tmp_path_factory, method, pairs, with_eval,
                                                with_calib):
    n = next(COUNT)
    out = tmp_path_factory.mktemp("fuzz") / "out"
    # small and fast first, so that valid combinations finish quickly; drawn flags override them
    argv = ["quantize", str(embedded_model_path()), "--method", method, "--out", str(out),
            "--n-calib", "2", "--seqlen", "32", "--lwc-iters", "2", "--adaround-iters", "2",
            "--block-epochs", "1", "--eval-windows", "1", "--eval-seqlen", "32", "--quiet"]
    if with_calib:
        argv += ["--calib", str(embedded_calib_path())]
    if with_eval:
        argv += ["--eval-text", str(embedded_test_path())]
    for flag, value in pairs:
        argv += [flag, value]
    err = io.StringIO()
    try:
        with redirect_stderr(err), redirect_stdout(io.StringIO()):
            rc = cli.main(argv)
    except SystemExit as e:  # argparse: a usage error
        rc = e.code
    assert rc in (0, 2), (argv, err.getvalue())
    assert "Traceback" not in err.getvalue(), (argv, err.getvalue())
    if n == 0:
        print("cli fuzz: drawing inputs (max_examples=120)", file=sys.stderr)


def test_cli_fuzz_tried_inputs():
    """Reports how many inputs the fuzzing test above tried (runs after it)."""
    tried = next(COUNT)
    print(f"cli fuzz: {tried} inputs tried, 0 tracebacks", file=sys.stderr)
    assert tried >= 50
