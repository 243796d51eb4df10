"""The hiquant.testing pytest plugin: fixtures and the session-end summary."""

from __future__ import annotations

import json

pytest_plugins = ["pytester"]


def test_plugin_runs_a_parametrized_grid_and_writes_the_summary(pytester):
    pytester.makepyfile(test_grid="""
        import pytest
        from hiquant.datasets import embedded_model_path, embedded_calib_path, embedded_test_path

        @pytest.mark.parametrize("wbits", [3, 4])
        def test_rtn(quantize_and_eval, wbits):
            rep = quantize_and_eval(embedded_model_path(), embedded_calib_path(), embedded_test_path(),
                                    method="rtn", wbits=wbits, group_size=64, n_calib=4, seqlen=64,
                                    eval_seqlen=64, eval_windows=4)
            assert rep.ppl > 1
    """)
    result = pytester.runpytest_inprocess("-p", "hiquant.testing", "--hiquant-summary", "out/summary", "-q")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*hiquant results*", "*| 3 | tiny-llama | rtn | 3 |*",
                                 "*| 4 | tiny-llama | rtn | 4 |*"])
    rows = json.loads((pytester.path / "out" / "summary.json").read_text())
    assert [r["wbits"] for r in rows] == [3, 4]
    assert rows[0]["avg_bits"] > rows[0]["wbits"]  # exact storage includes the scales
    assert [r["settings"]["wbits"] for r in rows] == [3, 4]  # every knob is recorded
    assert rows[0]["settings"]["seed"] == rows[0]["seed"] and "block_aug_loss" in rows[0]["settings"]
    assert (pytester.path / "out" / "summary.md").read_text().startswith("| case | model |")
