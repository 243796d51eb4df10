"""AWQ (hiquant.methods.awq): its two searches against the float64 twin (hiquant._reference.awq),
the equivalent transform leaving the full-precision function unchanged, and the method end to
end (bits, exports carrying the changed norms, resume)."""

from __future__ import annotations

import numpy as np
import pytest

from hiquant._reference import awq as ref
from hiquant.datasets import embedded_calib_path, embedded_model_path, embedded_test_path
from hiquant.methods import awq
from hiquant.model import load_model
from hiquant.pipeline import quantize
from hiquant.stats import block_grams

FAST = dict(n_calib=8, seqlen=128, eval_seqlen=128, eval_windows=8)


def _activations(rng, n=512, d=64, outliers=(3, 17, 40)):
    X = rng.standard_normal((n, d)).astype(np.float32)
    X[:, list(outliers)] *= 20.0  # a few salient channels, as in LLM activations
    G = X.astype(np.float64).T @ X.astype(np.float64)
    return X, G, np.abs(X.astype(np.float64)).mean(axis=0)


@pytest.mark.parametrize("bits,group", [(3, 16), (4, 0), (2, 32)])
def test_scale_search_matches_the_float64_reference(bits, group):
    rng = np.random.default_rng(bits)
    _, G, xbar = _activations(rng)
    Ws = [rng.standard_normal((48, 64)).astype(np.float32) for _ in range(2)]
    i, alphas, errs, s = awq.scale_search(Ws, G, xbar, bits, group)
    i_ref, alphas_ref, errs_ref, s_ref = ref.scale_search(Ws, G, xbar, bits, group)
    np.testing.assert_array_equal(alphas, alphas_ref)
    np.testing.assert_allclose(errs, errs_ref, rtol=1e-3)
    assert i == i_ref
    np.testing.assert_allclose(s, s_ref, rtol=1e-12)


def test_scale_search_protects_salient_channels_and_beats_plain_rtn():
    rng = np.random.default_rng(0)
    _, G, xbar = _activations(rng)
    W = rng.standard_normal((48, 64)).astype(np.float32)
    i, alphas, errs, s = awq.scale_search([W], G, xbar, 3, 16)
    assert alphas[0] == 0 and i > 0 and errs[i] < 0.9 * errs[0]  # α = 0 is plain RTN
    assert s[[3, 17, 40]].min() > np.delete(s, [3, 17, 40]).max()  # the outlier channels grow


@pytest.mark.parametrize("bits,group", [(3, 16), (4, 0)])
def test_clip_search_matches_the_float64_reference(bits, group):
    rng = np.random.default_rng(10 + bits)
    _, G, _ = _activations(rng)
    W = rng.standard_normal((48, 64)).astype(np.float32)
    W[5, 7] = 9.0  # an outlier weight worth clipping around
    Wc, r = awq.clip_search(W, G, bits, group)
    Wc_ref, r_ref = ref.clip_search(W, G, bits, group)
    np.testing.assert_array_equal(r, r_ref)
    np.testing.assert_array_equal(Wc, Wc_ref)  # the same float32 clip bounds
    assert r.min() < 1.0 and r.max() == 1.0  # some groups clip, some not


def test_clip_search_never_increases_the_per_group_output_error():
    rng = np.random.default_rng(3)
    _, G, _ = _activations(rng)
    W = rng.standard_normal((32, 64)).astype(np.float32)
    Wc, _ = awq.clip_search(W, G, 3, 16)
    for a in range(0, 64, 16):
        Gg = G[a:a + 16, a:a + 16]
        d0 = ref.fake_quantize(W[:, a:a + 16], 3, 0) - W[:, a:a + 16]
        d1 = ref.fake_quantize(Wc[:, a:a + 16], 3, 0) - W[:, a:a + 16]
        e0 = np.einsum("ij,ij->i", d0 @ Gg, d0)
        e1 = np.einsum("ij,ij->i", d1 @ Gg, d1)
        assert np.all(e1 <= e0 * (1 + 1e-6) + 1e-9)


@pytest.mark.parametrize("kv_heads,st_dtype", [(4, "F32"), (2, "F16")])
def test_awq_transform_leaves_the_full_precision_function_unchanged(tiny_checkpoint, kv_heads,
                                                                    st_dtype):
    """Scales folded into the norms (rounded to the stored dtype, compensated in the linears),
    v_proj (without GQA) and up_proj: the logits stay equal up to float32 rounding."""
    folder, _, _ = tiny_checkpoint(kv_heads=kv_heads, st_dtype=st_dtype)
    m = load_model(folder)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, m.config.vocab_size, size=(4, 24))
    before = m.logits(ids)
    from hiquant.allocate import LayerPlan
    h = m.embed(ids)
    changed = []
    for b in range(m.num_blocks):
        st = block_grams(m, b, h, batch_size=2)
        plans = {n: LayerPlan(0, np.zeros(0, np.int64), 3, 0, 16, 0.0)
                 for n in m.block_linear_names(b)}
        notes = awq.prepare_block(m, b, st, plans, None)
        assert set(notes) == {n for g, sc in zip(m.input_groups(b), m.input_scalers(b))
                              if sc is not None for n in g}
        changed += m.modified_weights()
        h = m.block_forward(b, h)
    assert (m.input_scalers(0)[1] is None) == (kv_heads != 4)
    assert sorted(m.modified_tensors()) == sorted(
        f"model.layers.{b}.{n}.weight" for b in range(m.num_blocks)
        for n in ("input_layernorm", "post_attention_layernorm"))
    after = m.logits(ids)
    np.testing.assert_allclose(after, before, rtol=2e-4, atol=2e-4 * np.abs(before).max())
    m.reset_weights()
    assert not m.modified_tensors() and not m.modified_weights()
    np.testing.assert_array_equal(m.logits(ids), before)


def test_set_norm_weight_rejects_what_is_not_a_norm_and_rounds_to_the_stored_dtype(
        tiny_checkpoint):
    import hiquant
    folder, _, _ = tiny_checkpoint(st_dtype="F16")
    m = load_model(folder)
    name = "model.layers.0.input_layernorm.weight"
    with pytest.raises(KeyError):
        m.set_norm_weight("model.layers.0.self_attn.q_proj.weight", np.ones(32, np.float32))
    with pytest.raises(hiquant.InvalidArgumentError):
        m.set_norm_weight(name, np.ones(31, np.float32))
    with pytest.raises(hiquant.InvalidTypeError):
        m.set_norm_weight(name, np.ones(32, np.float64))
    with pytest.raises(hiquant.NumericalError):
        m.set_norm_weight(name, np.full(32, np.inf, np.float32))
    w = np.full(32, 1 / 3, np.float32)
    m.set_norm_weight(name, w)
    assert m.get_norm_weight(name)[0] == np.float32(np.float16(1 / 3))


@pytest.fixture(scope="module")
def model():
    return load_model(embedded_model_path())


def test_awq_beats_rtn_at_w3_and_its_exports_reload_with_the_changed_norms(model, tmp_path):
    kw = dict(wbits=3, group_size=64, eval_text=embedded_test_path(), model=model,
              progress=False, **FAST)
    rtn = quantize(embedded_model_path(), embedded_calib_path(), method="rtn", **kw)
    out = tmp_path / "awq"
    rep = quantize(embedded_model_path(), embedded_calib_path(), method="awq", out=out, **kw)
    assert rep.avg_bits == rtn.avg_bits  # the same stored format: RTN codes of the scaled weights
    assert rep.ppl < rtn.ppl
    assert all("awq_alpha" in L for L in rep.layers if not L["name"].endswith("o_proj"))
    mods = model.modified_tensors()
    assert len(mods) == 2 * model.num_blocks
    from hiquant.evaluate import perplexity_of_text
    from hiquant.packed import load_packed
    pm = load_packed(out / "packed")
    for name, w in mods.items():
        np.testing.assert_array_equal(pm.get_norm_weight(name), w)
    for name in model.linear_names()[:7]:
        np.testing.assert_array_equal(pm.get_weight(name), model.get_weight(name))
    ppl = perplexity_of_text(pm, embedded_test_path(), 128, 8, progress=False)["ppl"]
    assert ppl == pytest.approx(rep.ppl, rel=1e-5)
    fake = load_model(out / "fake")
    ppl = perplexity_of_text(fake, embedded_test_path(), 128, 8, progress=False)["ppl"]
    assert ppl == pytest.approx(rep.ppl, rel=2e-3)  # fp16 storage of the dequantized weights


def test_awq_resumed_after_two_blocks_ends_identical_to_an_uninterrupted_run(model, tmp_path):
    from hiquant import pipeline
    kw = dict(method="awq", wbits=3, group_size=64, model=model, progress=False, **FAST)
    full = quantize(embedded_model_path(), embedded_calib_path(), out=tmp_path / "a", **kw)
    real = pipeline._quantize_block
    calls = []

    def dying(m, b, *a, **k):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(b)
        return real(m, b, *a, **k)

    pipeline._quantize_block = dying
    try:
        with pytest.raises(KeyboardInterrupt):
            quantize(embedded_model_path(), embedded_calib_path(), out=tmp_path / "b",
                     progress_dir=tmp_path / "prog", **kw)
    finally:
        pipeline._quantize_block = real
    model.reset_weights()  # the resumed run must get the first blocks' norms from the progress
    quantize(embedded_model_path(), embedded_calib_path(), out=tmp_path / "b",
             progress_dir=tmp_path / "prog", resume=True, **kw)
    for sub in ("packed/model.safetensors", "fake/model.safetensors"):
        assert (tmp_path / "a" / sub).read_bytes() == (tmp_path / "b" / sub).read_bytes()
    assert full.avg_bits > 0
