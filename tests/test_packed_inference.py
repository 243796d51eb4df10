"""Packed inference (issue 21): ``load_packed`` runs every quantized linear of the forward pass
on the packed kernels (hiquant.packed_matmul) and holds the packed bytes, not float weights; its
perplexity is the fake-quant export's; backward passes, get_weight, set_weight, activation
quantization and changed norm weights (AWQ) behave as with dense weights."""

from __future__ import annotations

import numpy as np
import pytest

import hiquant
from hiquant.datasets import embedded_calib_path, embedded_model_path, embedded_test_path
from hiquant.evaluate import perplexity_of_text
from hiquant.model import load_model
from hiquant.packed import load_packed, open_checkpoint
from hiquant.packed_matmul import PackedLinear, RowStack
from tolerances import REDUCE_ATOL, REDUCE_RTOL

SMALL = dict(n_calib=4, seqlen=64, backend="numpy", progress=False)
METHODS = {
    "rtn": dict(method="rtn", wbits=3, group_size=64),
    "gptq": dict(method="gptq", wbits=3, group_size=64),
    # hybrid layers: a b_H = 3 high part beside the W2 low part, 6-bit scale codes
    "hiq": dict(method="hiq", wbits=2, group_size=64, avg_bits=2.3, m_windows=4, lwc_iters=5,
                adaround_iters=5, block_epochs=1),
    # changed RMSNorm weights stored in the packed folder
    "awq": dict(method="awq", wbits=3, group_size=64),
}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed_inference")
    out = {}
    for name, kw in METHODS.items():
        hiquant.quantize(embedded_model_path(), embedded_calib_path(), out=root / name,
                         **SMALL, **kw)
        out[name] = root / name
    return out


def _ppl(model, **kw):
    return perplexity_of_text(model, embedded_test_path(), 128, 8, progress=False, **kw)["ppl"]


def _linear_shapes(model) -> set:
    c = model.config
    shapes = {model.linear_shape(n) for n in model.linear_names()}
    nq, nkv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    shapes |= {(nq + 2 * nkv, c.hidden_size), (2 * c.intermediate_size, c.hidden_size)}
    return shapes


def _cached_block_weights(model) -> list:
    """Every weight object the model's cache holds for its decoder blocks."""
    slots = ("Wqkv", "Wo", "Wgu", "Wd")
    return [getattr(p, s) for k, p in model._cache.items() if isinstance(k, int) for s in slots]


@pytest.mark.parametrize("method", list(METHODS))
def test_packed_kernel_perplexity_equals_the_fake_export(exports, method):
    out = exports[method]
    packed = load_packed(out / "packed")
    assert packed.packed_kernels
    p_packed = _ppl(packed)
    p_fake = _ppl(load_model(out / "fake"))
    # the fake export stores the dequantized weights in float16, the packed one exactly
    assert p_packed == pytest.approx(p_fake, rel=1e-4)
    # against the same exact weights multiplied densely: float32 rounding only
    p_dense = _ppl(load_packed(out / "packed", packed_kernels=False))
    assert p_packed == pytest.approx(p_dense, rel=1e-6)


def test_packed_model_holds_the_packed_bytes_and_no_float_linear_weights(exports):
    out = exports["hiq"]
    pm = load_packed(out / "packed")
    _ppl(pm)
    held = _cached_block_weights(pm)
    assert len(held) == 4 * pm.num_blocks  # every block was run and kept
    shapes = _linear_shapes(pm)
    assert not any(isinstance(w, np.ndarray) for w in held)
    assert all(isinstance(w, (PackedLinear, RowStack)) for w in held)
    # the operators' bytes are the packed file's quantized tensors (+ the high-column indices)
    from hiquant.checkpoint import open_weights
    _, where = open_weights(out / "packed")
    stems = set(pm.linear_names())
    stored = sum(f.tensors[n].nbytes for n, f in where.items() if n.rsplit(".", 2)[0] in stems
                 or n.rsplit(".", 1)[0] in stems)
    ops_bytes = sum(w.nbytes for w in held)
    index_bytes = 8 * sum(pm.linear_shape(n)[1] for n in pm.linear_names())
    assert stored <= ops_bytes <= stored + index_bytes
    n_weights = sum(a * b for a, b in map(pm.linear_shape, pm.linear_names()))
    assert ops_bytes < n_weights  # about 2.3 bits per weight, far below float32's 4 bytes
    # the dense option (and an ordinary checkpoint) holds float32 arrays of those shapes
    dm = load_packed(out / "packed", packed_kernels=False)
    _ppl(dm)
    dense = _cached_block_weights(dm)
    assert all(isinstance(w, np.ndarray) and w.shape in shapes for w in dense)


def test_packed_perplexity_is_identical_for_any_thread_count(exports):
    pm = load_packed(exports["gptq"] / "packed")
    assert _ppl(pm, n_threads=1) == _ppl(pm, n_threads=2)


def test_get_weight_and_backward_use_the_exact_dense_weights(exports):
    out = exports["hiq"]
    pm, dm = load_packed(out / "packed"), load_packed(out / "packed", packed_kernels=False)
    for name in pm.linear_names()[:7]:
        np.testing.assert_array_equal(pm.get_weight(name), dm.get_weight(name))
    ids = pm.check_ids(np.arange(40, 72, dtype=np.int64)[None])
    gp, gd = pm.weight_grads(ids), dm.weight_grads(ids)
    for name in pm.linear_names():
        scale = np.abs(gd[name]).max()
        np.testing.assert_allclose(gp[name], gd[name], rtol=REDUCE_RTOL,
                                   atol=REDUCE_ATOL * max(scale, 1e-30))


def test_set_weight_replaces_the_packed_operator_and_reset_restores_it(exports):
    pm = load_packed(exports["rtn"] / "packed")
    ref = load_model(embedded_model_path())
    ids = pm.check_ids(np.arange(10, 74, dtype=np.int64)[None])
    before = pm.logits(ids)
    q = pm.linear_names()[0]
    W = ref.get_weight(q)  # the unquantized weight of q_proj in block 0
    pm.set_weight(q, W)
    P = pm._block_params(0)
    assert isinstance(P.Wqkv, np.ndarray)  # the q/k/v group runs dense with the new weight
    assert isinstance(P.Wgu, RowStack)
    dm = load_packed(exports["rtn"] / "packed", packed_kernels=False)
    dm.set_weight(q, W)
    np.testing.assert_allclose(pm.logits(ids), dm.logits(ids), rtol=1e-4, atol=1e-4)
    pm.reset_weight(q)
    assert isinstance(pm._block_params(0).Wqkv, RowStack)
    np.testing.assert_array_equal(pm.logits(ids), before)


def test_activation_bits_quantize_the_input_before_the_packed_product(exports):
    pm = load_packed(exports["gptq"] / "packed")
    dm = load_packed(exports["gptq"] / "packed", packed_kernels=False)
    plain = _ppl(pm)
    for m in (pm, dm):
        m.set_activation_bits(4)
    a4_packed, a4_dense = _ppl(pm), _ppl(dm)
    # 4-bit rounding turns float32-rounding differences of the inputs into a few flipped steps
    # (measured 1.4e-4 relative), still far below what A4 itself changes (about 3%)
    assert a4_packed == pytest.approx(a4_dense, rel=1e-3)
    assert abs(a4_packed - plain) > 20 * abs(a4_packed - a4_dense)


def test_open_checkpoint_passes_the_option_and_float64_models_stay_dense(exports):
    out = exports["rtn"]
    assert open_checkpoint(out / "packed").packed_kernels
    assert not open_checkpoint(out / "packed", packed_kernels=False).packed_kernels
    m64 = load_packed(out / "packed", compute_dtype="float64")
    assert not m64.packed_kernels
    with pytest.raises(hiquant.InvalidTypeError, match="packed_kernels"):
        load_packed(out / "packed", packed_kernels="yes")


def test_a_float16_folder_on_the_kernels_multiplies_its_stored_values_in_place():
    """``packed_kernels=True`` on an ordinary float16 checkpoint: every linear is an FP16-kernel
    operator on the mapped float16 values (no float32 copy in the weight cache), and the
    perplexity and decode logits equal the dense float32 path within float32 rounding."""
    km = load_model(embedded_model_path(), packed_kernels=True)
    dm = load_model(embedded_model_path())
    a, b = _ppl(km), _ppl(dm)
    assert abs(a - b) <= 1e-5 * b
    held = _cached_block_weights(km)
    assert held and all(isinstance(w, (PackedLinear, RowStack)) for w in held)
    kv_k, kv_d = km.new_kv_cache(1, 16), dm.new_kv_cache(1, 16)
    x = np.arange(1, 9)[None]
    np.testing.assert_allclose(km.forward_cached(x, kv_k), dm.forward_cached(x, kv_d),
                               rtol=1e-4, atol=1e-4)
