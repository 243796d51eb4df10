"""The NumPy runtime (hiquant.model): loading, forward against an independent float64 reference
and transformers, hand-written backward against finite differences and torch autograd, and
every malformed-checkpoint error."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import checkpoints as ck
from hiquant.checkpoint import parse_config
from hiquant.errors import CheckpointError, InvalidArgumentError, NumericalError
from hiquant.model import load_model
from tolerances import FD_ATOL, FD_RTOL

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}

# (arch, options): every architecture, both config styles, GQA, tied embeddings, biases,
# qk-norm with head_dim * heads != hidden, and the llama3/linear RoPE scalings
VARIANTS = [
    ("LlamaForCausalLM", {}),
    ("LlamaForCausalLM", {"style": "4.x", "tie": True, "attention_bias": True}),
    ("LlamaForCausalLM", {"rope_scaling": LLAMA3, "head_dim": 16, "kv_heads": 1}),
    ("LlamaForCausalLM", {"style": "4.x", "rope_scaling": {"type": "linear", "factor": 2.0}}),
    ("MistralForCausalLM", {"sliding_window": 64}),
    ("Qwen2ForCausalLM", {"style": "4.x", "tie": True}),
    ("Qwen3ForCausalLM", {"head_dim": 16, "kv_heads": 4}),
    ("Qwen3ForCausalLM", {"style": "4.x", "attention_bias": True, "rope_scaling": LLAMA3}),
]
VARIANT_IDS = [f"{a[:-11]}-{'-'.join(f'{k}' for k in o) or 'plain'}" for a, o in VARIANTS]


def _ids(cfg, B=2, T=12, seed=1):
    return np.random.default_rng(seed).integers(0, cfg["vocab_size"], (B, T))


# --------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("st_dtype", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("shards", [1, 3])
def test_weights_load_exactly_in_every_dtype_single_and_sharded(tiny_checkpoint, st_dtype, shards):
    folder, cfg, w = tiny_checkpoint("LlamaForCausalLM", st_dtype=st_dtype, shards=shards)
    m = load_model(folder)
    assert m.config.source_dtype == {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[st_dtype]
    for name in m.linear_names():
        got = m.get_weight(name)
        assert got.dtype == np.float32 and got.flags.c_contiguous
        np.testing.assert_array_equal(got, w[name + ".weight"])
    assert len(m.linear_names()) == 7 * cfg["num_hidden_layers"]


def test_bf16_decoding_matches_torch(tiny_checkpoint):
    torch = pytest.importorskip("torch")
    folder, cfg, w = tiny_checkpoint("LlamaForCausalLM", st_dtype="BF16", seed=3)
    m = load_model(folder)
    name = "model.layers.1.mlp.down_proj"
    # the stored bits are w rounded to bfloat16; torch's own bfloat16 → float32 must agree
    want = torch.from_numpy(w[name + ".weight"]).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(m.get_weight(name), want)


def test_linear_names_follow_block_order_q_k_v_o_gate_up_down(tiny_llama):
    m = load_model(tiny_llama[0])
    assert m.block_linear_names(1) == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj",
        "model.layers.1.self_attn.v_proj", "model.layers.1.self_attn.o_proj",
        "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj",
        "model.layers.1.mlp.down_proj"]
    assert m.linear_names()[:7] == m.block_linear_names(0)
    assert m.num_blocks == 2
    assert m.tokenizer is not None


@pytest.mark.parametrize("style", ["4.x", "5.x"])
def test_config_styles_4x_and_5x_parse_to_the_same_config(style):
    cfg = parse_config(ck.make_config("LlamaForCausalLM", style=style, rope_scaling=LLAMA3,
                                      rope_theta=5e5))
    assert cfg.rope_theta == 5e5
    assert cfg.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4, 2, 8)


def test_qwen_defaults_follow_transformers():
    raw = ck.make_config("Qwen2ForCausalLM")
    cfg = parse_config(raw)
    assert cfg.attention_bias and not cfg.o_bias and cfg.sliding_window is None
    raw = ck.make_config("Qwen3ForCausalLM")
    del raw["head_dim"]
    assert parse_config(raw).head_dim == 128  # Qwen3Config's default, not hidden / heads
    assert parse_config(raw).qk_norm


# --------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("arch,opts", VARIANTS, ids=VARIANT_IDS)
def test_float64_logits_match_independent_reference(tiny_checkpoint, arch, opts):
    folder, cfg, w = tiny_checkpoint(arch, **opts)
    ids = _ids(cfg)
    want = ck.reference_logits(cfg, w, ids)
    got = load_model(folder, compute_dtype="float64").logits(ids)
    # the runtime builds RoPE tables in float32 as transformers does; the reference in float64
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("arch,opts", VARIANTS, ids=VARIANT_IDS)
def test_float32_logits_and_losses_match_transformers(tiny_checkpoint, arch, opts):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    folder, cfg, w = tiny_checkpoint(arch, **opts)
    ids = _ids(cfg)
    tm = ck.torch_model(folder)
    with torch.no_grad():
        want = tm(torch.from_numpy(ids)).logits.numpy()
    m = load_model(folder)
    got = m.logits(ids)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    np.testing.assert_allclose(m.sequence_losses(ids), ck.reference_losses(want, ids), rtol=1e-5)


def test_sequence_losses_equal_cross_entropy_of_logits(tiny_llama):
    folder, cfg, w = tiny_llama
    m = load_model(folder, compute_dtype="float64")
    ids = _ids(cfg, B=3, T=10)
    np.testing.assert_allclose(m.sequence_losses(ids), ck.reference_losses(m.logits(ids), ids),
                               rtol=1e-12)


def test_sequence_losses_identical_for_any_thread_count(tiny_llama):
    m = load_model(tiny_llama[0])
    ids = _ids(tiny_llama[1], B=7, T=16)
    one = m.sequence_losses(ids, batch_size=2, n_threads=1)
    two = m.sequence_losses(ids, batch_size=2, n_threads=2)
    three = m.sequence_losses(ids, batch_size=2, n_threads=3)
    np.testing.assert_array_equal(one, two)
    np.testing.assert_array_equal(one, three)


def test_block_by_block_forward_equals_logits(tiny_llama):
    m = load_model(tiny_llama[0])
    ids = _ids(tiny_llama[1])
    h = m.embed(ids)
    for i in range(m.num_blocks):
        h = m.block_forward(i, h)
    np.testing.assert_array_equal(m.head_loss(h, ids), m.sequence_losses(ids))


def test_capture_receives_each_linear_input_in_order(tiny_checkpoint):
    folder, cfg, w = tiny_checkpoint("Qwen2ForCausalLM")
    m = load_model(folder, compute_dtype="float64")
    ids = _ids(cfg, B=2, T=9)
    h0 = m.embed(ids)
    seen = {}
    out = m.block_forward(0, h0, capture=lambda n, X: seen.__setitem__(n, X.copy()))
    assert list(seen) == m.block_linear_names(0)
    for n, X in seen.items():
        assert X.shape == (2 * 9, m.linear_shape(n)[1])
    # the captured down_proj input reproduces the MLP output from the captured gate/up input
    W = {n: w[n + ".weight"].astype(np.float64) for n in seen}
    g = seen["model.layers.0.mlp.gate_proj"] @ W["model.layers.0.mlp.gate_proj"].T
    u = seen["model.layers.0.mlp.up_proj"] @ W["model.layers.0.mlp.up_proj"].T
    np.testing.assert_allclose(seen["model.layers.0.mlp.down_proj"], g / (1 + np.exp(-g)) * u,
                               rtol=1e-12, atol=1e-12)
    # and the output is the residual stream plus both sub-layers' outputs
    o = seen["model.layers.0.self_attn.o_proj"] @ W["model.layers.0.self_attn.o_proj"].T
    mlp = seen["model.layers.0.mlp.down_proj"] @ W["model.layers.0.mlp.down_proj"].T
    np.testing.assert_allclose(out.reshape(-1, cfg["hidden_size"]),
                               h0.reshape(-1, cfg["hidden_size"]) + o + mlp, rtol=1e-12, atol=1e-12)


def test_set_weight_changes_forward_and_reset_restores_it(tiny_llama):
    folder, cfg, w = tiny_llama
    m = load_model(folder)
    ids = _ids(cfg)
    base = m.sequence_losses(ids)
    name = "model.layers.1.self_attn.v_proj"
    W = m.get_weight(name)
    m.set_weight(name, np.zeros_like(W))
    assert m.modified_weights() == [name]
    np.testing.assert_array_equal(m.get_weight(name), 0)
    np.testing.assert_array_equal(m.get_weight(name, original=True), W)
    changed = m.sequence_losses(ids)
    assert not np.allclose(changed, base)
    w2 = {k: v.copy() for k, v in w.items()}
    w2[name + ".weight"][:] = 0
    np.testing.assert_allclose(changed, ck.reference_losses(ck.reference_logits(cfg, w2, ids), ids),
                               rtol=1e-5)
    m.reset_weight(name)
    np.testing.assert_array_equal(m.sequence_losses(ids), base)


def test_a_quantized_layer_as_weight_is_dequantized_on_use_and_equals_its_array(tiny_llama):
    """set_weight(name, QuantizedLayer) keeps the codes (bounded memory) and behaves exactly like
    set_weight(name, layer.dequantize())."""
    from hiquant.storage import QuantizedLayer
    folder, cfg, _ = tiny_llama
    a, b = load_model(folder), load_model(folder)
    ids = _ids(cfg)
    name = "model.layers.0.mlp.up_proj"
    ql = QuantizedLayer.rtn(name, a.get_weight(name), 2, 8, high_idx=[1, 3], b_high=3)
    a.set_weight(name, ql)
    b.set_weight(name, ql.dequantize())
    assert a._overrides[name] is ql and a.modified_weights() == [name]
    np.testing.assert_array_equal(a.get_weight(name), ql.dequantize())
    np.testing.assert_array_equal(a.sequence_losses(ids), b.sequence_losses(ids))
    other = QuantizedLayer.rtn("x", np.zeros((3, 5), np.float32), 2, 8)
    with pytest.raises(InvalidArgumentError, match="shape"):
        a.set_weight(name, other)


def test_set_weight_rejects_wrong_dtype_shape_name_and_nan(tiny_llama):
    m = load_model(tiny_llama[0])
    name = "model.layers.0.mlp.up_proj"
    W = m.get_weight(name)
    with pytest.raises(TypeError, match="float32"):
        m.set_weight(name, W.astype(np.float64))
    with pytest.raises(InvalidArgumentError, match="shape"):
        m.set_weight(name, W[:, :-1].copy())
    with pytest.raises(KeyError, match="linear_names"):
        m.set_weight("model.layers.0.mlp.nope", W)
    bad = W.copy()
    bad[0, 0] = np.nan
    with pytest.raises(NumericalError):
        m.set_weight(name, bad)


def test_zero_weight_cache_gives_identical_results(tiny_llama):
    ids = _ids(tiny_llama[1])
    a = load_model(tiny_llama[0]).sequence_losses(ids)
    b = load_model(tiny_llama[0], weight_cache_bytes=0).sequence_losses(ids)
    np.testing.assert_array_equal(a, b)


def test_bad_ids_and_hidden_states_raise_clear_errors(tiny_llama):
    m = load_model(tiny_llama[0])
    with pytest.raises(TypeError, match="integer"):
        m.embed(np.zeros((1, 4), dtype=np.float32))
    with pytest.raises(InvalidArgumentError, match="vocabulary"):
        m.embed(np.array([[0, 1, 100]]))
    with pytest.raises(InvalidArgumentError, match="shape"):
        m.embed(np.array([0, 1, 2]))
    with pytest.raises(TypeError, match="dtype float32"):
        m.block_forward(0, np.zeros((1, 3, 32)))
    with pytest.raises(InvalidArgumentError, match="seqlen >= 2"):
        m.sequence_losses(np.array([[1]]))
    with pytest.raises(IndexError):
        m.block_forward(2, np.zeros((1, 3, 32), np.float32))


def test_sliding_window_longer_sequences_raise(tiny_checkpoint):
    folder, cfg, _ = tiny_checkpoint("MistralForCausalLM", sliding_window=8)
    m = load_model(folder)
    m.sequence_losses(_ids(cfg, T=8))  # within the window: plain causal attention is exact
    with pytest.raises(InvalidArgumentError, match="sliding"):
        m.sequence_losses(_ids(cfg, T=9))


# --------------------------------------------------------------------------------- backward


def _fd_check(m, ids, names, rng, per_layer=4, eps=1e-5):
    grads = m.weight_grads(ids)
    for name in names:
        W = m.get_weight(name).astype(np.float64)
        for _ in range(per_layer):
            i, j = rng.integers(0, W.shape[0]), rng.integers(0, W.shape[1])
            vals = []
            for d in (eps, -eps):
                W2 = W.copy()
                W2[i, j] += d
                m.set_weight(name, W2)
                vals.append(m.sequence_losses(ids).mean())
            m.reset_weight(name)
            fd = (vals[0] - vals[1]) / (2 * eps)
            assert abs(grads[name][i, j] - fd) <= FD_ATOL + FD_RTOL * abs(fd), (name, i, j)
    return grads


@pytest.mark.parametrize("arch,opts", VARIANTS, ids=VARIANT_IDS)
def test_weight_gradients_match_finite_differences_in_float64(tiny_checkpoint, arch, opts):
    folder, cfg, _ = tiny_checkpoint(arch, **opts)
    m = load_model(folder, compute_dtype="float64")
    ids = _ids(cfg, B=2, T=10)
    grads = _fd_check(m, ids, m.linear_names(), np.random.default_rng(0))
    for name in m.linear_names():
        assert grads[name].shape == m.linear_shape(name) and grads[name].dtype == np.float64


def test_block_backward_input_gradient_matches_finite_differences(tiny_checkpoint):
    folder, cfg, _ = tiny_checkpoint("Qwen3ForCausalLM", head_dim=16)
    m = load_model(folder, compute_dtype="float64")
    rng = np.random.default_rng(5)
    h = rng.standard_normal((2, 7, cfg["hidden_size"]))
    R = rng.standard_normal(h.shape)  # loss = <R, block(h)>

    out, cache = m.block_forward(1, h, cache=True)
    dh, _ = m.block_backward(1, cache, R, weight_grads=False)
    eps = 1e-6
    for _ in range(10):
        idx = tuple(rng.integers(0, s) for s in h.shape)
        hp, hm = h.copy(), h.copy()
        hp[idx] += eps
        hm[idx] -= eps
        fd = ((m.block_forward(1, hp) * R).sum() - (m.block_forward(1, hm) * R).sum()) / (2 * eps)
        assert abs(dh[idx] - fd) <= FD_ATOL + FD_RTOL * abs(fd)


def test_norm_weight_gradients_match_finite_differences(tiny_checkpoint):
    # every RMSNorm weight of a Qwen3 block (input, post-attention, q_norm, k_norm) and the final
    # norm, through the whole model's loss, against central differences (float64 compute)
    folder, cfg, _ = tiny_checkpoint("Qwen3ForCausalLM", head_dim=16)
    m = load_model(folder, compute_dtype="float64")
    ids = _ids(cfg, B=2, T=7)

    def loss():
        h = m.embed(ids)
        for b in range(m.num_blocks):
            h = m.block_forward(b, h)
        return m.head_loss(h, ids).sum()

    h, caches = m.embed(ids), []
    for b in range(m.num_blocks):
        h, c = m.block_forward(b, h, cache=True)
        caches.append(c)
    _, dh, grads = m.head_loss(h, ids, grad=True, norm_grad=True)
    for b in reversed(range(m.num_blocks)):
        dh, g = m.block_backward(b, caches[b], dh, weight_grads=False, norm_grads=True)
        assert not set(g) & set(m.block_linear_names(b))  # weight_grads=False: norms only
        grads.update(g)
    expected = {"model.norm.weight"} | {
        f"model.layers.{b}.{n}.weight" for b in range(m.num_blocks)
        for n in ("input_layernorm", "post_attention_layernorm", "self_attn.q_norm",
                  "self_attn.k_norm")}
    assert set(grads) == expected
    rng = np.random.default_rng(3)
    for name in sorted(expected):
        w = m.get_norm_weight(name)  # float32 storage: the perturbed values are exact
        assert grads[name].shape == w.shape and grads[name].dtype == np.float64
        j = int(rng.integers(0, w.size))
        step = np.float32(2.0 ** -12)
        wp, wm = w.copy(), w.copy()
        wp[j] += step
        wm[j] -= step
        m.set_norm_weight(name, wp)
        lp = loss()
        m.set_norm_weight(name, wm)
        lm = loss()
        m.set_norm_weight(name, w)
        fd = (lp - lm) / (float(wp[j]) - float(wm[j]))
        assert abs(grads[name][j] - fd) <= FD_ATOL + 1e-4 * abs(fd), name


def test_head_loss_norm_grad_needs_grad(tiny_llama):
    m = load_model(tiny_llama[0])
    ids = _ids(tiny_llama[1], B=1, T=4)
    with pytest.raises(InvalidArgumentError, match="norm_grad=True needs grad=True"):
        m.head_loss(m.embed(ids), ids, norm_grad=True)


def test_head_loss_gradient_matches_finite_differences(tiny_llama):
    folder, cfg, _ = tiny_llama
    m = load_model(folder, compute_dtype="float64")
    ids = _ids(cfg, B=2, T=6)
    rng = np.random.default_rng(2)
    h = rng.standard_normal((2, 6, cfg["hidden_size"]))
    losses, dh = m.head_loss(h, ids, grad=True)
    assert np.all(dh[:, -1] == 0)  # the last position predicts nothing
    eps = 1e-6
    for _ in range(10):
        idx = tuple(rng.integers(0, s) for s in h.shape)
        hp, hm = h.copy(), h.copy()
        hp[idx] += eps
        hm[idx] -= eps
        fd = (m.head_loss(hp, ids).sum() - m.head_loss(hm, ids).sum()) / (2 * eps)
        assert abs(dh[idx] - fd) <= FD_ATOL + FD_RTOL * abs(fd)


def test_weight_grads_average_over_batch_and_recomputation_is_exact(tiny_llama):
    folder, cfg, _ = tiny_llama
    m = load_model(folder, compute_dtype="float64")
    ids = _ids(cfg, B=3, T=8)
    full = m.weight_grads(ids)
    rec = m.weight_grads(ids, recompute=True)
    singles = [m.weight_grads(ids[b:b + 1]) for b in range(3)]
    for n in m.linear_names():
        np.testing.assert_array_equal(full[n], rec[n])
        np.testing.assert_allclose(full[n], sum(s[n] for s in singles) / 3, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("arch,opts", VARIANTS[::2], ids=VARIANT_IDS[::2])
def test_float32_weight_gradients_match_torch_autograd(tiny_checkpoint, arch, opts):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    folder, cfg, _ = tiny_checkpoint(arch, **opts)
    ids = _ids(cfg, B=2, T=10)
    tm = ck.torch_model(folder)
    logits = tm(torch.from_numpy(ids)).logits
    lp = torch.log_softmax(logits[:, :-1], -1)
    loss = -lp.gather(-1, torch.from_numpy(ids[:, 1:, None])).squeeze(-1).mean(1).mean()
    loss.backward()
    params = dict(tm.named_parameters())
    m = load_model(folder)
    grads = m.weight_grads(ids)
    for n in m.linear_names():
        want = params[n + ".weight"].grad.numpy()
        assert grads[n].dtype == np.float32
        np.testing.assert_allclose(grads[n], want, rtol=1e-3, atol=1e-4 * np.abs(want).max())


# --------------------------------------------------------------------------------- bad input


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _rewrite_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is ...:
            cfg.pop(k)
        else:
            cfg[k] = v
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("change,match", [
    ({"architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel.*not supported"),
    ({"hidden_size": ...}, "missing required key 'hidden_size'"),
    ({"num_attention_heads": "four"}, "must be an integer"),
    ({"num_key_value_heads": 3}, "not a multiple"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "yarn"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}}, "llama3 RoPE scaling needs"),
])
def test_malformed_config_raises_checkpoint_error(tiny_llama, tmp_path, change, match):
    folder = _copy(tiny_llama[0], tmp_path / "m")
    _rewrite_config(folder, **change)
    with pytest.raises(CheckpointError, match=match) as e:
        load_model(folder)
    assert "config.json" in str(e.value)


def test_invalid_config_json_raises_checkpoint_error(tiny_llama, tmp_path):
    folder = _copy(tiny_llama[0], tmp_path / "m")
    (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], ')
    with pytest.raises(CheckpointError, match="config.json.*not valid JSON"):
        load_model(folder)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json not found"):
        load_model(folder)


def _tensors(w, dtype="F32"):
    return {n: (dtype, a.shape, a.astype(np.float32).tobytes()) for n, a in w.items()}


@pytest.mark.parametrize("case,match", [
    ("missing", "tensor 'model.layers.1.mlp.up_proj.weight' is missing"),
    ("extra", "unexpected tensor 'model.layers.2.mlp.up_proj.weight'"),
    ("shape", "has shape \\(48, 31\\) but config.json implies \\(48, 32\\)"),
    ("dtype", "dtype F64.*F32, F16 and BF16"),
    ("tied_extra", "unexpected tensor 'lm_head.weight'.*tie_word_embeddings"),
])
def test_inconsistent_tensors_raise_checkpoint_error_naming_the_tensor(tiny_llama, tmp_path, case,
                                                                       match):
    folder = _copy(tiny_llama[0], tmp_path / "m")
    w = dict(tiny_llama[2])
    t = _tensors(w)
    name = "model.layers.1.mlp.up_proj.weight"
    if case == "missing":
        del t[name]
    elif case == "extra":
        t["model.layers.2.mlp.up_proj.weight"] = t[name]
    elif case == "shape":
        a = w[name][:, :31]
        t[name] = ("F32", a.shape, np.ascontiguousarray(a).tobytes())
    elif case == "dtype":
        t[name] = ("F64", w[name].shape, w[name].astype(np.float64).tobytes())
    elif case == "tied_extra":
        _rewrite_config(folder, tie_word_embeddings=True)
    ck.write_raw_safetensors(folder / "model.safetensors", t)
    with pytest.raises(CheckpointError, match=match):
        load_model(folder)


@pytest.mark.parametrize("corruption,match", [
    ("truncated", "outside the .*data section|do not match|truncated"),
    ("tiny_file", "truncated"),
    ("header_length", "header length"),
    ("offsets_outside", "data_offsets"),
    ("overlap", "overlap"),
    ("bad_json", "not valid JSON"),
    ("bad_entry", "malformed"),
])
def test_corrupt_safetensors_raise_checkpoint_error_naming_the_file(tiny_llama, tmp_path,
                                                                    corruption, match):
    folder = _copy(tiny_llama[0], tmp_path / "m")
    path = folder / "model.safetensors"
    t = _tensors(tiny_llama[2])
    n0 = "model.layers.0.self_attn.q_proj.weight"
    if corruption == "truncated":
        ck.write_raw_safetensors(path, t, truncate=100)
    elif corruption == "tiny_file":
        path.write_bytes(b"\x01\x02")
    elif corruption == "header_length":
        ck.write_raw_safetensors(path, t, header_len_override=1 << 40)
    elif corruption == "offsets_outside":
        def patch(h):
            h[n0]["data_offsets"] = [10**9, 10**9 + h[n0]["data_offsets"][1] - h[n0]["data_offsets"][0]]
        ck.write_raw_safetensors(path, t, header_patch=patch)
    elif corruption == "overlap":
        def patch(h):
            n1 = "model.layers.0.self_attn.k_proj.weight"
            size = h[n1]["data_offsets"][1] - h[n1]["data_offsets"][0]
            h[n1]["data_offsets"] = [h[n0]["data_offsets"][0], h[n0]["data_offsets"][0] + size]
        ck.write_raw_safetensors(path, t, header_patch=patch)
    elif corruption == "bad_json":
        blob = bytearray(path.read_bytes())
        blob[9] = ord("!")
        path.write_bytes(bytes(blob))
    elif corruption == "bad_entry":
        def patch(h):
            h[n0]["shape"] = "big"
        ck.write_raw_safetensors(path, t, header_patch=patch)
    with pytest.raises(CheckpointError, match=match) as e:
        load_model(folder)
    assert "model.safetensors" in str(e.value)


def test_shard_problems_raise_checkpoint_error(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("LlamaForCausalLM", shards=2)[0]
    folder = _copy(src, tmp_path / "a")
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors.*download"):
        load_model(folder)

    folder = _copy(src, tmp_path / "b")
    (folder / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json"):
        load_model(folder)

    folder = _copy(src, tmp_path / "c")
    idx = json.loads((folder / "model.safetensors.index.json").read_text())
    name = "model.norm.weight"
    other = {"model-00001-of-00002.safetensors": "model-00002-of-00002.safetensors",
             "model-00002-of-00002.safetensors": "model-00001-of-00002.safetensors"}
    idx["weight_map"][name] = other[idx["weight_map"][name]]
    (folder / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match="model.norm.weight.*do not match"):
        load_model(folder)


def test_folder_without_weights_raises_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="not a folder"):
        load_model(tmp_path / "absent")
    (tmp_path / "config.json").write_text(json.dumps(ck.make_config()))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(tmp_path)


def test_corrupt_tokenizer_raises_checkpoint_error(tiny_llama, tmp_path):
    folder = _copy(tiny_llama[0], tmp_path / "m")
    (folder / "tokenizer.json").write_text("{}")
    with pytest.raises(CheckpointError, match="tokenizer"):
        load_model(folder)
    assert load_model(folder, load_tokenizer=False).tokenizer is None


# --------------------------------------------------------------------------------- bench model


@pytest.mark.bench_assets
def test_llama_bench_loads_with_transformers_5_config(bench_assets):
    m = load_model(f"{bench_assets}/llama-bench")
    c = m.config
    assert (c.arch, c.hidden_size, c.num_layers, c.num_heads, c.head_dim, c.vocab_size) == (
        "LlamaForCausalLM", 384, 8, 6, 64, 4096)
    assert c.rope_theta == 10000.0 and c.source_dtype == "float16" and not c.tie_word_embeddings


@pytest.mark.parametrize("arch,opts", [VARIANTS[2], VARIANTS[6]], ids=[VARIANT_IDS[2], VARIANT_IDS[6]])
def test_long_sequences_use_blocked_causal_attention_exactly(tiny_checkpoint, arch, opts):
    # 300 positions: three query blocks (128, 128, 44), each seeing only the keys before its end
    folder, cfg, w = tiny_checkpoint(arch, **opts)
    ids = _ids(cfg, B=1, T=300, seed=4)
    m = load_model(folder, compute_dtype="float64")
    want = ck.reference_logits(cfg, w, ids)
    np.testing.assert_allclose(m.logits(ids), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    _fd_check(m, ids, m.block_linear_names(0)[:4], np.random.default_rng(1), per_layer=2)


def test_weights_stay_memory_mapped_and_the_weight_cache_respects_its_budget(tiny_llama):
    import mmap
    folder, cfg, _ = tiny_llama
    m = load_model(folder, weight_cache_bytes=0)
    name = "model.layers.0.self_attn.q_proj.weight"
    stored = {t.name: t for t in m.source_tensors()}[name].read()
    assert isinstance(stored, memoryview) and stored.readonly
    assert isinstance(stored.obj, mmap.mmap)
    m.sequence_losses(_ids(cfg))
    assert m._cache_nbytes == 0 and not m._cache  # nothing expanded is kept
    one_block = m._build_block(0).nbytes
    m = load_model(folder, weight_cache_bytes=one_block)
    m.sequence_losses(_ids(cfg))
    assert 0 < m._cache_nbytes <= one_block
