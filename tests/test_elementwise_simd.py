"""The elementwise kernels' AVX2 variants (hiquant/simd.hpp) give the portable code's bits.

The min-max quantizer, the AdaRound forward / backward and Adam run eight lanes at a time where
the CPU has AVX2, through the same IEEE operations per element (no FMA); these tests compare the
two variants element for element, on ragged groups, exact ties, all-zero rows and odd widths that
exercise the four-lane and scalar tails."""

from __future__ import annotations

import numpy as np
import pytest

from hiquant import _core
from hiquant import quantizer as q
from hiquant.errors import NumericalError

avx2 = pytest.mark.skipif(not _core.elementwise_avx2_available(),
                          reason="this CPU has no AVX2: only the portable kernels run")

SHAPES = [((37, 301), 64), ((16, 1024), 128), ((5, 77), 0), ((9, 4099), 0), ((33, 200), 7),
          ((3, 13), 128)]


@pytest.fixture
def restore_kernel():
    yield
    _core.set_elementwise_kernel("auto")


def _both(fn):
    out = {}
    for k in ("auto", "portable"):
        _core.set_elementwise_kernel(k)
        out[k] = [np.asarray(a).tobytes() for a in fn()]
    _core.set_elementwise_kernel("auto")
    return out["auto"], out["portable"]


def _weights(shape, seed):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal(shape).astype(np.float32)
    W[0, : min(10, shape[1])] = np.arange(min(10, shape[1])) * 0.5  # exact ties of the grid
    if shape[0] > 1:
        W[1, :] = 0.0  # an all-zero row: range [-1, 1]
    return W


def test_kernel_choice_is_reported_and_switchable(restore_kernel):
    _core.set_elementwise_kernel("portable")
    assert _core.elementwise_kernel_name() == "portable"
    _core.set_elementwise_kernel("auto")
    want = "avx2" if _core.elementwise_avx2_available() else "portable"
    assert _core.elementwise_kernel_name() == want
    with pytest.raises(ValueError, match="'auto' or 'portable'"):
        _core.set_elementwise_kernel("avx512")


@avx2
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape,group", SHAPES)
def test_quantizer_avx2_equals_portable_bit_for_bit(restore_kernel, shape, group, bits):
    W = _weights(shape, sum(shape) + bits)

    def run():
        out, s, z = q.fake_quantize(W, bits, group, return_params=True)
        s2, z2 = q.minmax_params(W, bits, group)
        codes = q.quantize(W, s2, z2, bits, group)
        return out, s, z, s2, z2, codes

    a, p = _both(run)
    assert a == p


@avx2
def test_quantizer_avx2_raises_on_nan_weights(restore_kernel):
    W = _weights((4, 300), 0)
    W[2, 257] = np.nan
    for k in ("auto", "portable"):
        _core.set_elementwise_kernel(k)
        with pytest.raises(NumericalError, match="row 2, column 257"):
            q.fake_quantize(W, 4, 128)


@avx2
@pytest.mark.parametrize("shape,group", [((13, 301), 64), ((32, 1024), 128), ((7, 45), 0),
                                         ((6, 515), 128)])
def test_adaround_and_adam_avx2_equal_portable_bit_for_bit(restore_kernel, shape, group):
    rows, cols = shape
    rng = np.random.default_rng(rows * 1000 + cols)
    W = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    V0 = rng.standard_normal(shape).astype(np.float32) * 3
    V0[0, :5] = [0.0, -0.0, 1e-30, 50.0, -50.0]  # h at the clip bounds and at exactly 1/2
    d = rng.standard_normal(shape).astype(np.float32)

    def run():
        part = _core.AdaRoundPart(W, 3, group, 2)
        part.set_params(part.get_params() + V0)
        outs = [part.forward(False, None, 2), part.forward(True, None, 2)]
        for lam, b in [(0.0, 20.0), (0.01, 20.0), (0.01, 2.0), (0.5, 7.3)]:
            g, reg = part.backward(d, lam, b, 0, 2)
            outs += [g, np.array([reg])]
        for wd, decoupled in [(0.0, True), (0.1, True), (0.1, False)]:
            adam = _core.Adam(part.n_params, 1e-2, weight_decay=wd, decoupled=decoupled)
            for _ in range(3):
                g, _ = part.backward(d, 0.01, 10.0, 0, 2)
                _core.adam_step(adam, part, g, 2)
            outs.append(part.get_params())
        return outs

    a, p = _both(run)
    assert a == p
