"""Perplexity with the reference protocol, and the ``hiquant eval`` command."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import checkpoints as ck
from hiquant.cli import main
from hiquant.errors import InvalidArgumentError
from hiquant.evaluate import perplexity, perplexity_of_text
from hiquant.model import load_model


def test_perplexity_is_exp_of_mean_window_loss_over_leading_windows(tiny_llama):
    folder, cfg, w = tiny_llama
    m = load_model(folder, compute_dtype="float64")
    ids = np.random.default_rng(0).integers(0, cfg["vocab_size"], 130)
    res = perplexity(m, ids, seqlen=16, windows=8, progress=False)
    win = ids[:128].reshape(8, 16)  # first windows x seqlen ids, non-overlapping, no BOS
    want = ck.reference_losses(ck.reference_logits(cfg, w, win), win)
    np.testing.assert_allclose(res["window_losses"], want, rtol=1e-6)
    assert res["ppl"] == pytest.approx(math.exp(want.mean()), rel=1e-6)
    assert (res["windows"], res["seqlen"], res["n_tokens"]) == (8, 16, 128)


def test_perplexity_matches_transformers(tiny_checkpoint):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    folder, cfg, _ = tiny_checkpoint("Qwen3ForCausalLM", head_dim=16)
    ids = np.random.default_rng(1).integers(0, cfg["vocab_size"], 200)
    res = perplexity(load_model(folder), ids, seqlen=20, windows=10, progress=False)
    tm = ck.torch_model(folder)
    win = torch.from_numpy(ids[:200].reshape(10, 20))
    with torch.no_grad():
        losses = [tm(win[i:i + 1], labels=win[i:i + 1]).loss.item() for i in range(10)]
    assert res["ppl"] == pytest.approx(math.exp(np.mean(losses)), rel=1e-5)


def test_perplexity_identical_for_any_thread_count(tiny_llama):
    m = load_model(tiny_llama[0])
    ids = np.random.default_rng(2).integers(0, 100, 400)
    a = perplexity(m, ids, seqlen=20, windows=None, batch_size=3, n_threads=1, progress=False)
    b = perplexity(m, ids, seqlen=20, windows=None, batch_size=3, n_threads=2, progress=False)
    assert a["windows"] == 20 and a["ppl"] == b["ppl"]


def test_perplexity_rejects_bad_ids_and_too_few_tokens(tiny_llama):
    m = load_model(tiny_llama[0])
    with pytest.raises(InvalidArgumentError, match="1-D integer"):
        perplexity(m, np.zeros((2, 5), np.int64), seqlen=4, windows=1, progress=False)
    with pytest.raises(InvalidArgumentError, match="fewer than the 3 requested"):
        perplexity(m, np.arange(50) % 100, seqlen=20, windows=3, progress=False)


def test_cli_eval_prints_one_json_line_with_ppl(tiny_llama, tmp_path, capsys):
    folder = tiny_llama[0]
    text = tmp_path / "test.txt"
    text.write_text("for i in range(10):\n    print(i * i)\n" * 40)
    rc = main(["eval", str(folder), "--text", str(text), "--seqlen", "32", "--windows", "5",
               "--threads", "2", "--quiet"])
    assert rc == 0
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    assert len(lines) == 1
    res = json.loads(lines[0])
    want = perplexity_of_text(load_model(folder), text, seqlen=32, windows=5, progress=False)
    assert res["ppl"] == pytest.approx(want["ppl"], rel=1e-12)
    assert (res["seqlen"], res["windows"], res["threads"]) == (32, 5, 2)
    assert "perplexity" in out.err


def test_cli_eval_reports_errors_without_traceback(tmp_path, capsys):
    rc = main(["eval", str(tmp_path / "missing"), "--text", str(tmp_path / "t.txt")])
    assert rc == 2
    assert "error:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", str(tmp_path), "--text", "x", "--seqlen", "0"])


def test_cli_quantize_takes_6bit_scales_and_reports_their_exact_bits(tmp_path, capsys):
    from hiquant.datasets import embedded_calib_path, embedded_model_path
    from hiquant.storage import storage_bits
    model = embedded_model_path()
    args = ["quantize", str(model), "--calib", str(embedded_calib_path()), "--method", "rtn",
            "--wbits", "2", "--group", "64", "--n-calib", "4", "--seqlen", "64", "--quiet"]
    assert main(args + ["--scale-bits", "6", "--out", str(tmp_path / "q")]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    m = load_model(model)
    shapes = [m.linear_shape(n) for n in m.linear_names()]
    want = sum(storage_bits(do, di, 0, 2, 2, 64, 6) for do, di in shapes)
    assert res["avg_bits"] == want / sum(do * di for do, di in shapes)
    with pytest.raises(SystemExit):  # a width the format does not have
        main(args + ["--scale-bits", "4"])


@pytest.mark.slow
@pytest.mark.bench_assets
def test_llama_bench_perplexity_is_6_997(bench_assets):
    m = load_model(f"{bench_assets}/llama-bench")
    res = perplexity_of_text(m, f"{bench_assets}/corpus/test.txt", seqlen=512, windows=200,
                             progress=False)
    assert res["ppl"] == pytest.approx(6.997, abs=0.01)
