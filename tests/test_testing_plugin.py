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


def test_results_that_differ_only_in_the_seed_are_summarized_as_mean_and_range(pytester):
    pytester.makepyfile(test_seeds="""
        import pytest
        from hiquant.datasets import embedded_model_path, embedded_calib_path, embedded_test_path

        @pytest.mark.parametrize("seed", [0, 1], ids=["seed0", "seed1"])
        @pytest.mark.parametrize("wbits", [3])
        def test_gptq(quantize_and_eval, wbits, seed):
            quantize_and_eval(embedded_model_path(), embedded_calib_path(), embedded_test_path(),
                              method="gptq", wbits=wbits, group_size=64, n_calib=4, seqlen=64,
                              eval_seqlen=64, eval_windows=4, val_windows=2, seed=seed)
    """)
    result = pytester.runpytest_inprocess("-p", "hiquant.testing", "--hiquant-summary", "out/s", "-q")
    result.assert_outcomes(passed=2)
    rows = json.loads((pytester.path / "out" / "s.json").read_text())
    assert [r["seed"] for r in rows] == [0, 1] and all(r["val_ppl"] > 1 for r in rows)
    ppl = sorted(r["ppl"] for r in rows)
    assert ppl[0] != ppl[1]  # the calibration windows differ with the seed
    mean = (ppl[0] + ppl[1]) / 2
    # one row for the two seeds, the case label without its seed part
    result.stdout.fnmatch_lines(["*Over seeds*",
                                 f"*| 3 | tiny-llama | 0,1 | * | {mean:.4f} ({ppl[0]:.4f}–{ppl[1]:.4f}) |*"])


def test_seed_groups_keep_apart_results_whose_other_settings_differ():
    from hiquant.testing import seed_groups, spread_markdown
    rows = [dict(case=f"hiq-seed{s}", model="m", seed=s, settings={"wbits": w, "seed": s},
                 avg_bits=2.3, ppl=p, val_ppl=None, seconds=1.0)
            for s, w, p in ((0, 2, 9.0), (1, 2, 9.2), (0, 3, 7.0))]
    groups = seed_groups(rows)
    assert [(label, [r["ppl"] for r in rs]) for label, rs in groups] == [("hiq", [9.0, 9.2]),
                                                                         ("hiq", [7.0])]
    md = spread_markdown(rows)
    assert "| hiq | m | 0,1 | 2.3000 | 9.1000 (9.0000–9.2000) | – | 1 |" in md
    assert "| hiq | m | 0 | 2.3000 | 7.0000 | – | 1 |" in md
