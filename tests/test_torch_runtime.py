"""The torch runtime (hiquant.torch_runtime) on transformers' own decoder layers: it satisfies the
runtime protocol, equals the NumPy runtime (forward, captured inputs, backward, losses, weight
gradients) within float32 tolerances on every architecture variant, equals transformers' own
full model where the NumPy runtime has no implementation (Gemma), loads one layer at a time, and
drives the pipeline to the same perplexities as the NumPy backend."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import checkpoints as ck
from hiquant.model import load_model
from hiquant.runtime import ModelRuntime
from test_model import VARIANT_IDS, VARIANTS
from tolerances import REDUCE_RTOL

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hiquant.torch_runtime import TorchModel, load_torch_model  # noqa: E402


def _ids(cfg, B=3, T=16, seed=1):
    return np.random.default_rng(seed).integers(0, cfg["vocab_size"], (B, T))


def _close(got, want, rtol=REDUCE_RTOL):
    """float32 results of two runtimes: relative to the array's scale."""
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * float(np.abs(want).max()))


def test_torch_model_satisfies_the_runtime_protocol_with_compatible_signatures(tiny_llama):
    from test_runtime import _compatible, _protocol_members
    m = load_torch_model(tiny_llama[0])
    assert isinstance(m, ModelRuntime)
    for name, spec in _protocol_members(ModelRuntime).items():
        assert hasattr(m, name), f"TorchModel lacks {name}"
        if callable(spec) and not isinstance(spec, property):
            assert not _compatible(getattr(TorchModel, name), spec), name


def test_import_hiquant_does_not_import_torch():
    code = "import sys, hiquant, hiquant.pipeline, hiquant.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("arch,opts", VARIANTS, ids=VARIANT_IDS)
def test_block_forward_capture_and_backward_equal_the_numpy_runtime(tiny_checkpoint, arch, opts):
    folder, cfg, _ = tiny_checkpoint(arch, **opts)
    a, t = load_model(folder), load_torch_model(folder)
    ids = _ids(cfg)
    h = a.embed(ids)
    np.testing.assert_array_equal(t.embed(ids), h)
    for b in range(a.num_blocks):
        ca, ct = {}, {}
        oa, cha = a.block_forward(b, h, cache=True, capture=lambda n, X: ca.setdefault(n, X.copy()))
        ot, cht = t.block_forward(b, h, cache=True, capture=lambda n, X: ct.setdefault(n, X.copy()))
        assert list(ct) == a.block_linear_names(b)
        _close(ot, oa)
        for n in ca:
            assert ct[n].dtype == np.float32 and ct[n].shape == ca[n].shape
            _close(ct[n], ca[n])
        dh = np.random.default_rng(b).standard_normal(oa.shape).astype(np.float32)
        da, ga = a.block_backward(b, cha, dh)
        dt, gt = t.block_backward(b, cht, dh)
        _close(dt, da)
        assert list(gt) == list(ga)
        for n in ga:
            assert gt[n].shape == ga[n].shape and gt[n].flags.c_contiguous
            _close(gt[n], ga[n])
        h = oa


@pytest.mark.parametrize("arch,opts", VARIANTS, ids=VARIANT_IDS)
def test_losses_head_gradient_logits_and_weight_grads_equal_the_numpy_runtime(
        tiny_checkpoint, arch, opts):
    folder, cfg, _ = tiny_checkpoint(arch, **opts)
    a, t = load_model(folder), load_torch_model(folder)
    ids = _ids(cfg)
    np.testing.assert_allclose(t.sequence_losses(ids, batch_size=2), a.sequence_losses(ids),
                               rtol=1e-5)
    _close(t.logits(ids), a.logits(ids))
    h = a.forward(ids)
    la, da = a.head_loss(h, ids, grad=True)
    lt, dt = t.head_loss(h, ids, grad=True)
    np.testing.assert_allclose(lt, la, rtol=1e-5)
    _close(dt, da)
    ga, gt = a.weight_grads(ids), t.weight_grads(ids, recompute=False)
    assert list(gt) == list(ga)
    for n in ga:
        _close(gt[n], ga[n])
    blocks = [b for b, _ in t.iter_block_weight_grads(ids[:1], recompute=True)]
    assert blocks == list(reversed(range(a.num_blocks)))


def test_float64_torch_runtime_matches_the_independent_reference(tiny_checkpoint):
    folder, cfg, w = tiny_checkpoint("Qwen3ForCausalLM", head_dim=16, kv_heads=4)
    ids = _ids(cfg)
    got = load_torch_model(folder, compute_dtype="float64").logits(ids)
    want = ck.reference_logits(cfg, w, ids)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_quantized_layer_weight_and_reset_behave_as_in_the_numpy_runtime(tiny_llama):
    from hiquant.storage import QuantizedLayer
    folder, cfg, _ = tiny_llama
    a, t = load_model(folder), load_torch_model(folder)
    ids = _ids(cfg)
    base = t.sequence_losses(ids)
    name = "model.layers.1.mlp.down_proj"
    ql = QuantizedLayer.rtn(name, a.get_weight(name), 2, 8, high_idx=[1, 3], b_high=3)
    a.set_weight(name, ql)
    t.set_weight(name, ql)
    assert t.modified_weights() == [name]
    np.testing.assert_array_equal(t.get_weight(name), ql.dequantize())
    np.testing.assert_array_equal(t.get_weight(name, original=True), a.get_weight(name, original=True))
    quantized = t.sequence_losses(ids)
    assert np.abs(quantized - base).max() > 1e-4  # the quantized weight is used
    np.testing.assert_allclose(quantized, a.sequence_losses(ids), rtol=1e-5)
    t.reset_weights()
    np.testing.assert_array_equal(t.sequence_losses(ids), base)


def test_block_forward_with_weight_overrides_equals_set_weight_and_leaves_the_model(tiny_llama):
    from test_measured_m import check_weight_overrides
    folder, cfg, _ = tiny_llama
    t = load_torch_model(folder)
    q, k, v, o, gate, up, down = t.block_linear_names(1)
    check_weight_overrides(t, 1, t.embed(_ids(cfg)), (o, q, gate, down), other_block=0, seed=2)


def test_measured_m_on_the_torch_runtime_equals_the_numpy_runtimes(tiny_llama):
    """The measured estimator takes the per-call weight path on the torch runtime (no layer
    rebuild per evaluation) and gives the NumPy runtime's M within float32 rounding."""
    import hiquant.allocate as A
    from tolerances import MEASURED_M_RTOL
    folder, cfg, _ = tiny_llama
    a, t = load_model(folder), load_torch_model(folder)
    assert A._overridable(t)
    ids = _ids(cfg, B=4, T=12)
    rng = np.random.default_rng(0)
    fc = {n: rng.random(a.linear_shape(n)[1]) for n in a.linear_names()}
    kw = dict(estimator="measured", fisher_col=fc, candidates=(0.0, 0.1, 0.5), group_size=8,
              pairs=True, n_threads=2)
    want = A.sensitivity_matrix(a, ids, **kw).M
    got = A.sensitivity_matrix(t, ids, **kw).M
    assert np.count_nonzero(want - np.diag(np.diag(want))) > 0
    L0 = float(np.mean(a.sequence_losses(ids)))
    np.testing.assert_allclose(got, want, rtol=0, atol=MEASURED_M_RTOL * L0)  # 1e-7 · L0 seen
    assert t.modified_weights() == []


def test_zero_weight_cache_builds_each_layer_on_use_with_identical_results(tiny_llama):
    folder, cfg, _ = tiny_llama
    ids = _ids(cfg)
    full = load_torch_model(folder)
    none = load_torch_model(folder, weight_cache_bytes=0)
    np.testing.assert_array_equal(none.sequence_losses(ids), full.sequence_losses(ids))
    assert none._cache_nbytes == 0 and len(none._cache) == 0


def test_identity_and_source_tensors_equal_the_numpy_runtime(tiny_llama):
    folder, _, _ = tiny_llama
    a, t = load_model(folder), load_torch_model(folder)
    assert t.fingerprint() == a.fingerprint()
    assert [(s.name, s.dtype, s.shape) for s in t.source_tensors()] == \
        [(s.name, s.dtype, s.shape) for s in a.source_tensors()]
    assert t.config == a.config
    assert [t.linear_shape(n) for n in t.linear_names()] == [a.linear_shape(n) for n in a.linear_names()]
    assert t.input_groups(1) == a.input_groups(1)


def test_bad_input_raises_hiquant_errors(tiny_llama, tmp_path):
    from hiquant.errors import CheckpointError, InvalidArgumentError, InvalidTypeError, NumericalError
    folder, cfg, _ = tiny_llama
    t = load_torch_model(folder)
    with pytest.raises(InvalidArgumentError, match="vocabulary"):
        t.embed(np.full((1, 4), cfg["vocab_size"]))
    with pytest.raises(InvalidTypeError, match="dtype"):
        t.block_forward(0, np.zeros((1, 4, cfg["hidden_size"]), np.float64))
    name = t.linear_names()[0]
    with pytest.raises(NumericalError):
        t.set_weight(name, np.full(t.linear_shape(name), np.nan, np.float32))
    with pytest.raises(InvalidArgumentError, match="device"):
        load_torch_model(folder, device="tpu")
    with pytest.raises(CheckpointError):
        load_torch_model(tmp_path)


# ------------------------------------------------------------------ architectures beyond NumPy's


def _write_hf(folder, model_type: str, **kw):
    """A tiny random checkpoint written by transformers itself (save_pretrained), with hiquant's
    character tokenizer."""
    import transformers
    cls = transformers.CONFIG_MAPPING[model_type]
    cfg = cls(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=100, max_position_embeddings=128, **kw)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    cfg.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # spread every weight so that the nonlinearities are exercised
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.save_pretrained(folder)
    ck.write_tokenizer(folder, 100)
    return folder


HF_ARCHS = {
    "mistral": {},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "gemma": {"head_dim": 8},
}


@pytest.fixture(scope="module")
def hf_checkpoints(tmp_path_factory):
    return {mt: _write_hf(tmp_path_factory.mktemp(mt), mt, **kw) for mt, kw in HF_ARCHS.items()}


@pytest.mark.parametrize("model_type", list(HF_ARCHS))
def test_fp_perplexity_equals_transformers_full_model(hf_checkpoints, model_type):
    import transformers

    from hiquant.evaluate import perplexity
    folder = hf_checkpoints[model_type]
    ids = np.random.default_rng(3).integers(0, 100, (1, 4 * 32 + 1))
    full = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    windows = ids[0, :4 * 32].reshape(4, 32)
    with torch.no_grad():
        logits = full(torch.from_numpy(windows)).logits.numpy()
    want = float(np.exp(ck.reference_losses(logits, windows).mean()))
    t = load_torch_model(folder)
    np.testing.assert_allclose(np.exp(t.sequence_losses(windows).mean()), want, rtol=1e-5)
    got = perplexity(t, ids[0], 32, 4, progress=False)["ppl"]
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("model_type", list(HF_ARCHS))
def test_w3_rtn_and_hiq_complete_on_the_torch_backend(hf_checkpoints, model_type, tmp_path):
    import hiquant
    folder = hf_checkpoints[model_type]
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    for method, extra in (("rtn", {}), ("hiq", {"avg_bits": 4.0, "lwc_iters": 5,
                                                "adaround_iters": 5, "m_windows": 2})):
        r = hiquant.quantize(folder, text, method=method, wbits=3, group_size=16, n_calib=4,
                             seqlen=32, backend="torch", device="cpu", eval_text=text,
                             eval_seqlen=32, eval_windows=4, progress=False, **extra)
        assert r.settings["backend"] == "torch" and r.settings["device"] == "cpu"
        assert np.isfinite(r.ppl) and 0 < r.avg_bits < 16


# ------------------------------------------------------------------------------ the pipeline


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_rtn_and_gptq_give_the_numpy_backends_perplexity(tiny_llama, method, tmp_path):
    import hiquant
    folder, _, _ = tiny_llama
    text = tmp_path / "calib.txt"
    text.write_text("Pack my box with five dozen liquor jugs. " * 200)
    kw = dict(method=method, wbits=3, group_size=16, n_calib=8, seqlen=32, eval_text=text,
              eval_seqlen=32, eval_windows=6, progress=False)
    rn = hiquant.quantize(folder, text, backend="numpy", **kw)
    rt = hiquant.quantize(folder, text, backend="torch", device="cpu", **kw)
    assert rn.settings["backend"] == "numpy" and rt.settings["backend"] == "torch"
    assert rt.avg_bits == rn.avg_bits
    np.testing.assert_allclose(rt.ppl, rn.ppl, rtol=1e-4)
