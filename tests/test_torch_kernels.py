"""The torch kernels (hiquant.torch_kernels) against the float64 references in hiquant._reference
and the C++ kernels: Gram accumulation, the min-max quantizer and GPTQ (every option the pipeline
uses), plus their input errors. On the CPU here; the same code runs on CUDA."""

from __future__ import annotations

import numpy as np
import pytest

import hiquant
from hiquant import learners as K
from hiquant import quantizer as qz
from hiquant._reference import gptq as ref
from hiquant._reference import quantizer as ref_q
from hiquant._reference import stats as ref_stats
from test_gptq import CONFIGS, _grid, _layer
from tolerances import REDUCE_RTOL

torch = pytest.importorskip("torch")

from hiquant import torch_kernels as tk  # noqa: E402


def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


def _activations(n, d, seed=0):
    """Layer inputs with a few outlier channels and a non-zero mean, as LLM activations."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)) + 0.5
    X[:, rng.choice(d, 3, replace=False)] *= 30
    return X.astype(np.float32)


# ---------------------------------------------------------------------------------- Gram


@pytest.mark.parametrize("chunk", [tk.GRAM_CHUNK, 7, None])
def test_gram_accumulate_equals_the_float64_reference(chunk):
    X1, X2 = _activations(1000, 96, 1), _activations(300, 96, 2)
    G = torch.zeros((96, 96), dtype=torch.float64)
    tk.gram_accumulate(G, _t(X1), chunk=chunk)
    tk.gram_accumulate(G, _t(X2), chunk=chunk)
    want = ref_stats.gram_accumulate(ref_stats.gram_accumulate(np.zeros((96, 96)), X1), X2)
    got = G.numpy()
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < (1e-12 if chunk is None else 1e-6)
    np.testing.assert_array_equal(got, got.T)  # symmetric as accumulated


def test_gram_accumulate_agrees_with_the_cpp_kernel_within_reduction_tolerance():
    X = _activations(2000, 64, 3)
    G = torch.zeros((64, 64), dtype=torch.float64)
    tk.gram_accumulate(G, _t(X))
    Gc = np.zeros((64, 64))
    hiquant.stats.gram_accumulate(Gc, X)
    np.testing.assert_allclose(G.numpy(), Gc, rtol=REDUCE_RTOL, atol=REDUCE_RTOL * np.abs(Gc).max())


def test_abs_stats_accumulate_equals_numpy():
    X = _activations(500, 40, 4)
    s, m = torch.zeros(40, dtype=torch.float64), torch.zeros(40, dtype=torch.float64)
    tk.abs_stats_accumulate(s, m, _t(X[:200]))
    tk.abs_stats_accumulate(s, m, _t(X[200:]))
    np.testing.assert_allclose(s.numpy(), np.abs(X.astype(np.float64)).sum(0), rtol=1e-12)
    np.testing.assert_array_equal(m.numpy(), np.abs(X).max(0).astype(np.float64))


def test_gram_accumulate_raises_on_bad_input_and_leaves_g_untouched():
    G = torch.zeros((8, 8), dtype=torch.float64)
    X = _activations(20, 8)
    with pytest.raises(hiquant.InvalidTypeError, match="torch.Tensor"):
        tk.gram_accumulate(G, X)
    with pytest.raises(hiquant.InvalidTypeError, match="float32"):
        tk.gram_accumulate(G, _t(X).double())
    with pytest.raises(hiquant.InvalidTypeError, match="float64"):
        tk.gram_accumulate(G.float(), _t(X))
    with pytest.raises(hiquant.InvalidArgumentError, match=r"\(d, d\)"):
        tk.gram_accumulate(G, _t(X[:, :5]))
    with pytest.raises(hiquant.InvalidArgumentError, match="chunk"):
        tk.gram_accumulate(G, _t(X), chunk=0)
    X[3, 5] = np.nan
    with pytest.raises(hiquant.NumericalError, match="row 3, column 5"):
        tk.gram_accumulate(G, _t(X))
    assert not G.any()


# ---------------------------------------------------------------------------------- quantizer


@pytest.mark.parametrize("bits,group", [(2, 16), (3, None), (4, 24), (8, 64)])
def test_minmax_quantize_dequantize_identical_to_float64_reference(bits, group):
    rng = np.random.default_rng(bits)
    W = (rng.standard_normal((33, 100)) * 0.05).astype(np.float32)  # ragged last group for 24
    W[4, :] = 0.0  # an all-zero row: range [-1, 1]
    W[5, :] = np.abs(W[5, :])  # positive only: the range still includes 0
    s, z = tk.minmax_params(_t(W), bits, group)
    rs, rz = ref_q.minmax_params(W, bits, group)
    np.testing.assert_array_equal(s.numpy(), rs)
    np.testing.assert_array_equal(z.numpy(), rz)
    c = tk.quantize(_t(W), s, z, bits, group)
    np.testing.assert_array_equal(c.numpy(), ref_q.quantize(W, rs, rz, bits, group))
    dq = tk.dequantize(c, s, z, bits, group)
    np.testing.assert_array_equal(dq.numpy(), ref_q.dequantize(c.numpy(), rs, rz, bits, group)
                                  .astype(np.float32))
    np.testing.assert_array_equal(tk.fake_quantize(_t(W), bits, group).numpy(),
                                  qz.fake_quantize(W, bits, group))


def test_quantize_on_fp16_rounded_scales_equals_the_cpp_quantizer():
    W = (np.random.default_rng(1).standard_normal((16, 64)) * 0.03).astype(np.float32)
    s, z = qz.minmax_params(W, 3, 16)
    s16 = hiquant.storage.fp16_scales(s)
    np.testing.assert_array_equal(tk.fp16_round_scale(_t(s)).numpy(), s16)
    np.testing.assert_array_equal(tk.quantize(_t(W), _t(s16), _t(z), 3, 16).numpy(),
                                  qz.quantize(W, s16, z, 3, 16))


def test_quantizer_raises_on_bad_input():
    W = np.ones((4, 8), np.float32)
    s, z = tk.minmax_params(_t(W), 3, 4)
    with pytest.raises(hiquant.InvalidArgumentError, match="bits"):
        tk.minmax_params(_t(W), 9, 4)
    with pytest.raises(hiquant.InvalidTypeError, match="bits"):
        tk.minmax_params(_t(W), 3.0, 4)
    with pytest.raises(hiquant.InvalidArgumentError, match=r"needs \(4, 2\)"):
        tk.quantize(_t(W), s[:, :1], z[:, :1], 3, 4)
    with pytest.raises(hiquant.InvalidTypeError, match="uint8"):
        tk.quantize(_t(W), s, z.to(torch.int64), 3, 4)
    bad = s.clone()
    bad[1, 1] = 0.0
    with pytest.raises(hiquant.InvalidArgumentError, match="row 1, group 1"):
        tk.quantize(_t(W), bad, z, 3, 4)
    W[2, 3] = np.inf
    with pytest.raises(hiquant.NumericalError, match="row 2, column 3"):
        tk.minmax_params(_t(W), 3, 4)
    with pytest.raises(hiquant.InvalidArgumentError, match="non-empty"):
        tk.minmax_params(torch.zeros((0, 4)), 3, 4)


# ---------------------------------------------------------------------------------- GPTQ


def _same_as_reference(got, want, W):
    """Codes, parameters and order equal the float64 reference; returns the count of differing
    codes (0 on every configuration tested: the float32 column loop does the C++ kernel's
    arithmetic, and only the lazy update's summation order differs)."""
    np.testing.assert_array_equal(got.perm.numpy(), want["perm"])
    np.testing.assert_array_equal(got.scale.numpy(), want["scale"])
    np.testing.assert_array_equal(got.zero.numpy(), want["zero"])
    np.testing.assert_allclose(got.wq.numpy(), want["wq"], rtol=1e-6, atol=1e-7)
    assert got.loss == pytest.approx(want["loss"], rel=1e-4)
    return int((got.codes.numpy() != want["codes"]).sum())


@pytest.mark.parametrize("bits,group,act_order,bs", CONFIGS)
def test_gptq_codes_identical_to_float64_reference(bits, group, act_order, bs):
    W, H = _layer(96, 280, 1200, seed=bits)
    got = tk.gptq(_t(W), _t(H), bits=bits, group_size=group, act_order=act_order, blocksize=bs)
    want = ref.gptq(W, H, bits, group, act_order=act_order, blocksize=bs)
    assert _same_as_reference(got, want, W) == 0
    c = K.gptq(W, H, bits=bits, group_size=group, act_order=act_order, blocksize=bs)
    np.testing.assert_array_equal(got.codes.numpy(), c.codes)
    np.testing.assert_array_equal(got.wq.numpy(), c.wq)  # the C++ kernel's float32 values
    # every column on its own group's stored grid (act_order interleaves the groups' columns)
    np.testing.assert_array_equal(got.wq.numpy(), qz.dequantize(
        got.codes.numpy(), got.scale.numpy(), got.zero.numpy(), bits, group or 0))


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits,group,n_quant,bs", [(2, 64, 230, 128), (3, 48, 280, 32),
                                                   (2, None, 200, 64), (4, 64, 256, 128)])
def test_gptq_on_a_fixed_grid_identical_to_float64_reference(bits, group, n_quant, bs, act_order):
    W, H = _layer(72, 280, 1200, seed=10 + bits)
    s, z = _grid(W, bits, group, n_quant, seed=bits)
    got = tk.gptq(_t(W), _t(H), bits=bits, group_size=group, blocksize=bs, scale=_t(s),
                  zero=_t(z), n_quant=n_quant, act_order=act_order)
    want = ref.gptq(W, H, bits, group, blocksize=bs, scale=s, zero=z, n_quant=n_quant,
                    act_order=act_order)
    assert tuple(got.codes.shape) == (72, n_quant)
    if act_order:
        np.testing.assert_array_equal(got.perm.numpy(), want["perm"])
    np.testing.assert_array_equal(got.codes.numpy(), want["codes"])
    np.testing.assert_array_equal(got.scale.numpy(), s)
    np.testing.assert_array_equal(got.wq.numpy(),
                                  qz.dequantize(got.codes.numpy(), s, z, bits, group or 0))
    assert got.loss == pytest.approx(want["loss"], rel=1e-4)


def test_gptq_handles_dead_columns_and_float32_scales_as_the_reference():
    W, H = _layer(40, 130, 500, seed=3, dead=(0, 17, 129))
    got = tk.gptq(_t(W), _t(H), bits=3, group_size=32)
    want = ref.gptq(W, H, 3, 32)
    assert got.n_dead == 3
    assert _same_as_reference(got, want, W) == 0
    np.testing.assert_array_equal(got.wq.numpy()[:, [0, 17, 129]], 0.0)
    got32 = tk.gptq(_t(W), _t(H), bits=3, group_size=32, fp16_scales=False)
    np.testing.assert_array_equal(got32.codes.numpy(), ref.gptq(W, H, 3, 32, fp16_scales=False)
                                  ["codes"])


def test_gptq_result_converts_to_the_numpy_result_type():
    W, H = _layer(16, 64, 200, seed=4)
    r = tk.gptq(_t(W), _t(H), bits=4, group_size=32).numpy()
    assert isinstance(r, K.GPTQResult)
    assert r.codes.dtype == np.uint8 and r.scale.dtype == np.float32 and r.wq.dtype == np.float32
    np.testing.assert_array_equal(r.codes, K.gptq(W, H, bits=4, group_size=32).codes)


def test_gptq_raises_on_bad_input():
    W, H = _layer(8, 40, 100)
    Wt, Ht = _t(W), _t(H)
    with pytest.raises(hiquant.InvalidTypeError, match="float64"):
        tk.gptq(Wt, Ht.float(), bits=3)
    with pytest.raises(hiquant.InvalidTypeError, match="torch.Tensor"):
        tk.gptq(W, Ht, bits=3)
    with pytest.raises(hiquant.InvalidArgumentError, match="H has shape"):
        tk.gptq(Wt, Ht[:30, :30], bits=3)
    with pytest.raises(hiquant.InvalidArgumentError, match="bits"):
        tk.gptq(Wt, Ht, bits=9)
    with pytest.raises(hiquant.InvalidArgumentError, match="blocksize"):
        tk.gptq(Wt, Ht, bits=3, blocksize=0)
    with pytest.raises(hiquant.InvalidArgumentError, match="percdamp"):
        tk.gptq(Wt, Ht, bits=3, percdamp=-0.1)
    with pytest.raises(hiquant.InvalidArgumentError, match="n_quant"):
        tk.gptq(Wt, Ht, bits=3, n_quant=41)
    s, z = _grid(W, 3, 16, 32, seed=0)
    with pytest.raises(hiquant.InvalidArgumentError, match="both"):
        tk.gptq(Wt, Ht, bits=3, group_size=16, scale=_t(s), n_quant=32)
    badz = z.copy()
    badz[1, 0] = 8
    with pytest.raises(hiquant.InvalidArgumentError, match="zero point at row 1"):
        tk.gptq(Wt, Ht, bits=3, group_size=16, scale=_t(s), zero=_t(badz), n_quant=32)
    bad = H.copy()
    bad[3, 4] = np.nan
    with pytest.raises(hiquant.NumericalError, match="H is not finite"):
        tk.gptq(Wt, _t(bad), bits=3)
    asym = H.copy()
    asym[3, 4] += 1.0
    with pytest.raises(hiquant.InvalidArgumentError, match="symmetric"):
        tk.gptq(Wt, _t(asym), bits=3)
    x = np.random.default_rng(0).standard_normal(40)
    with pytest.raises(hiquant.NumericalError, match="positive definite"):
        tk.gptq(Wt, _t(np.outer(x, x)), bits=3, percdamp=0.0)
    Wn = W.copy()
    Wn[2, 7] = np.nan
    with pytest.raises(hiquant.NumericalError, match="row 2, column 7"):
        tk.gptq(_t(Wn), Ht, bits=3)
