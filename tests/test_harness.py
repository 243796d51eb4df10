"""hiquant's lm-eval model (hiquant.harness): its loglikelihoods are the runtime's, and on a small
local multiple-choice task (tests/data/lm_eval) lm-eval gives the same accuracy through it as
through lm-eval's own ``hf`` model on the same fake-quant export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")

from hiquant.datasets import embedded_model_path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT / "tests" / "data" / "lm_eval"


class _Req:
    def __init__(self, *args):
        self.args = args


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    from hiquant.pipeline import quantize
    out = tmp_path_factory.mktemp("harness") / "w4"
    quantize(embedded_model_path(), None, method="rtn", wbits=4, group_size=64, out=out,
             progress=False)
    # the embedded model ships tokenizer.json only; lm-eval's hf model takes its prefix token from
    # the tokenizer's eos, which transformers reads from tokenizer_config.json (id 0, as config.json)
    (out / "fake" / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", '
        '"bos_token": "<|endoftext|>"}')
    return out


def test_loglikelihood_is_the_sum_of_the_runtimes_continuation_log_probabilities(export):
    from hiquant.harness import HiquantLM
    from hiquant.packed import load_packed
    lm = HiquantLM(path=str(export / "packed"))
    ctx, cont = "def main(args):", " return 0"
    (ll, greedy), = lm.loglikelihood([_Req(ctx, cont)])
    m = load_packed(export / "packed")
    tok = m.tokenizer
    whole = tok.encode(ctx + cont, add_special_tokens=False).ids
    n_ctx = len(tok.encode(ctx, add_special_tokens=False).ids)
    z = m.logits(np.array([whole[:-1]], np.int64))[0].astype(np.float64)
    lp = z - z.max(-1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    expect = sum(lp[t - 1, whole[t]] for t in range(n_ctx, len(whole)))
    assert ll == pytest.approx(expect, rel=1e-9)
    assert greedy == all(lp[t - 1].argmax() == whole[t] for t in range(n_ctx, len(whole)))
    r, = lm.loglikelihood_rolling([_Req("x = 1\ny = 2\n")])
    assert np.isfinite(r) and r < 0
    g, = lm.generate_until([_Req("import ", {"until": ["\n"], "max_gen_toks": 5})])
    assert isinstance(g, str) and "\n" not in g


def test_lm_eval_accuracy_through_hiquant_equals_lm_evals_hf_model_on_the_fake_export(
        export, monkeypatch):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import hiquant.harness  # noqa: F401  (registers "hiquant")
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tm = TaskManager(include_path=str(TASKS))
    res, lls = {}, {}
    for name, args in (("hiquant", f"path={export / 'fake'}"),
                       ("hf", f"pretrained={export / 'fake'},dtype=float32,device=cpu")):
        out = simple_evaluate(model=name, model_args=args, tasks=["hiquant_tiny_mc"],
                              task_manager=tm, batch_size=1, log_samples=True)
        res[name] = out["results"]["hiquant_tiny_mc"]
        samples = sorted(out["samples"]["hiquant_tiny_mc"], key=lambda d: d["doc_id"])
        lls[name] = np.array([[float(r[0][0]) for r in d["resps"]] for d in samples])
    assert lls["hiquant"].shape == (24, 4)
    # every choice's loglikelihood agrees (float32 NumPy vs float32 torch), so do the metrics
    np.testing.assert_allclose(lls["hiquant"], lls["hf"], rtol=1e-4, atol=1e-3)
    for metric in ("acc,none", "acc_norm,none"):
        assert res["hiquant"][metric] == res["hf"][metric], (metric, res)
