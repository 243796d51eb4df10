"""Quantizer primitives: native kernels against the float64 NumPy reference, and their error handling."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import hiquant
from hiquant import quantizer as q
from hiquant._reference import quantizer as ref
from tolerances import F32_ATOL, F32_RTOL

BITS = [2, 3, 4, 5, 6, 7, 8]
GROUPS = [0, -1, 32, 64, 128, 7, 100, 1000]


def _weights(rows=48, cols=256, seed=0, scale=0.05):
    rng = np.random.default_rng(seed)
    W = (rng.standard_normal((rows, cols)) * scale).astype(np.float32)
    W[0, :] = 0.0  # an all-zero row: range becomes [-1, 1]
    W[1, :] = np.abs(W[1, :])  # all non-negative: range still includes 0
    W[2, 3] = 10.0  # an outlier
    return W


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", GROUPS)
def test_params_and_codes_identical_to_float64_reference(bits, group):
    W = _weights()
    scale, zero = q.minmax_params(W, bits, group)
    rscale, rzero = ref.minmax_params(W, bits, group)
    np.testing.assert_array_equal(scale, rscale)
    np.testing.assert_array_equal(zero, rzero)
    codes = q.quantize(W, scale, zero, bits, group)
    np.testing.assert_array_equal(codes, ref.quantize(W, scale, zero, bits, group))
    assert codes.max() <= 2**bits - 1


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", [0, 64, 100])
def test_dequantized_values_match_reference_to_float_tolerance(bits, group):
    W = _weights(seed=1)
    scale, zero = q.minmax_params(W, bits, group)
    codes = q.quantize(W, scale, zero, bits, group)
    out = q.dequantize(codes, scale, zero, bits, group)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref.dequantize(codes, scale, zero, bits, group),
                               rtol=F32_RTOL, atol=F32_ATOL)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [0, 64, 100])
def test_fake_quantize_equals_quantize_then_dequantize(bits, group):
    W = _weights(seed=2)
    out, scale, zero = q.fake_quantize(W, bits, group, return_params=True)
    codes = q.quantize(W, scale, zero, bits, group)
    np.testing.assert_array_equal(out, q.dequantize(codes, scale, zero, bits, group))


def test_rounding_is_half_to_even_like_numpy_rint():
    # Values exactly on .5 boundaries in units of the scale: scale = 1 for range [0, 15] at 4 bits.
    W = np.array([[0.0, 0.5, 1.5, 2.5, 3.5, 14.5, 15.0]], np.float32)
    scale, zero = q.minmax_params(W, 4, 0)
    assert scale[0, 0] == 1.0 and zero[0, 0] == 0
    codes = q.quantize(W, scale, zero, 4, 0)
    np.testing.assert_array_equal(codes[0], np.rint(W[0]).astype(np.uint8))
    np.testing.assert_array_equal(codes[0], [0, 0, 2, 2, 4, 14, 15])


def test_ragged_last_group_gets_its_own_parameters():
    rng = np.random.default_rng(3)
    W = rng.standard_normal((4, 10)).astype(np.float32)
    W[:, 8:] *= 100.0  # the 2-column tail group has a much larger range
    scale, zero = q.minmax_params(W, 3, 4)
    assert scale.shape == (4, 3) and q.n_groups(10, 4) == 3
    # The tail group's parameters are those of the 2-column slice alone.
    tail_scale, tail_zero = q.minmax_params(np.ascontiguousarray(W[:, 8:]), 3, 0)
    np.testing.assert_array_equal(scale[:, 2:], tail_scale)
    np.testing.assert_array_equal(zero[:, 2:], tail_zero)
    # And the first groups are unaffected by the tail's outliers.
    head_scale, _ = q.minmax_params(np.ascontiguousarray(W[:, :8]), 3, 4)
    np.testing.assert_array_equal(scale[:, :2], head_scale)


def test_group_size_at_least_d_in_means_per_row():
    W = _weights(rows=5, cols=64)
    for g in (64, 65, 10_000, 0, -1):
        s, z = q.minmax_params(W, 4, g)
        assert s.shape == (5, 1)
        np.testing.assert_array_equal(s, q.minmax_params(W, 4, None)[0])


def test_quantization_error_is_at_most_half_a_step():
    W = _weights(seed=4)
    out, scale, _ = q.fake_quantize(W, 4, 64, return_params=True)
    step = np.repeat(scale, 64, axis=1)[:, : W.shape[1]]
    assert np.all(np.abs(out - W) <= 0.5 * step * (1 + 1e-5))


def test_results_identical_across_thread_counts():
    W = _weights(rows=512, cols=640, seed=5)
    a = q.fake_quantize(W, 3, 128, n_threads=1, return_params=True)
    b = q.fake_quantize(W, 3, 128, n_threads=2, return_params=True)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    codes = q.quantize(W, a[1], a[2], 3, 128)
    np.testing.assert_array_equal(q.pack_codes(codes, 3, n_threads=1), q.pack_codes(codes, 3, n_threads=2))


def test_set_num_threads_changes_hiquants_default_only():
    before = hiquant.get_num_threads()
    try:
        hiquant.set_num_threads(1)
        assert hiquant.get_num_threads() == 1
        hiquant.set_num_threads(None)
        assert hiquant.get_num_threads() >= 1
    finally:
        hiquant.set_num_threads(before)
    with pytest.raises(ValueError):
        hiquant.set_num_threads(-2)


# ------------------------------------------------------------------------------------------------
# Packing

@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_pack_unpack_roundtrip_is_exact(bits, data):
    n = data.draw(st.integers(0, 3000))
    codes = data.draw(hnp.arrays(np.uint8, n, elements=st.integers(0, 2**bits - 1)))
    packed = q.pack_codes(codes, bits)
    assert packed.dtype == np.uint8 and packed.size == (n * bits + 7) // 8
    np.testing.assert_array_equal(packed, ref.pack_codes(codes, bits))
    np.testing.assert_array_equal(q.unpack_codes(packed, bits, n), codes)


def test_three_bit_codes_pack_densely():
    codes = np.arange(8, dtype=np.uint8)  # 0..7
    packed = q.pack_codes(codes, 3)
    assert packed.size == 3  # 8 codes × 3 bits = 3 bytes, not 4
    # bit stream LSB-first: 000 100 010 110 001 101 011 111
    assert packed.tolist() == [0b10001000, 0b11000110, 0b11111010]


def test_large_pack_roundtrip_uses_parallel_chunks():
    rng = np.random.default_rng(6)
    codes = rng.integers(0, 8, size=(1000, 777), dtype=np.uint8)  # not a multiple of 8
    packed = q.pack_codes(codes, 3)
    np.testing.assert_array_equal(q.unpack_codes(packed, 3, codes.size, shape=codes.shape), codes)


def test_pack_rejects_codes_that_do_not_fit():
    with pytest.raises(ValueError, match="2\\^bits = 4"):
        q.pack_codes(np.array([0, 1, 4], np.uint8), 2)


@pytest.mark.parametrize("bits", [1, 5, 7, 9, 0])
def test_pack_rejects_unsupported_widths(bits):
    with pytest.raises(ValueError, match="bits in"):
        q.pack_codes(np.zeros(8, np.uint8), bits)


def test_unpack_rejects_a_wrong_byte_count():
    with pytest.raises(ValueError, match="need exactly 3"):
        q.unpack_codes(np.zeros(4, np.uint8), 3, 8)
    with pytest.raises(ValueError, match="n_codes"):
        q.unpack_codes(np.zeros(3, np.uint8), 3, -1)


# ------------------------------------------------------------------------------------------------
# Bad input: a clear exception, never a crash

def test_wrong_dtype_raises_type_error_naming_the_argument():
    W = _weights()
    with pytest.raises(hiquant.InvalidTypeError, match="W must have dtype float32, got float64"):
        q.fake_quantize(W.astype(np.float64), 2, 64)
    with pytest.raises(hiquant.InvalidTypeError, match="W must be a numpy.ndarray"):
        q.fake_quantize(W.tolist(), 2, 64)
    s, z = q.minmax_params(W, 2, 64)
    with pytest.raises(hiquant.InvalidTypeError, match="zero must have dtype uint8"):
        q.quantize(W, s, z.astype(np.int64), 2, 64)
    with pytest.raises(TypeError, match="codes must have dtype uint8"):  # still a TypeError
        q.pack_codes(np.zeros(8, np.int32), 2)


def test_non_contiguous_input_raises_value_error():
    W = _weights()
    with pytest.raises(hiquant.InvalidArgumentError, match="C-contiguous"):
        q.fake_quantize(W[:, ::2], 2, 64)
    with pytest.raises(ValueError, match="C-contiguous"):  # still a ValueError
        q.fake_quantize(np.asfortranarray(W), 2, 64)


@pytest.mark.parametrize("shape", [(0, 16), (16, 0), (0, 0)])
def test_zero_size_weights_raise_value_error(shape):
    with pytest.raises(hiquant.InvalidArgumentError, match="empty"):
        q.fake_quantize(np.zeros(shape, np.float32), 4, 8)


def test_wrong_rank_raises_value_error():
    with pytest.raises(hiquant.InvalidArgumentError, match="2-dimensional"):
        q.fake_quantize(np.zeros(16, np.float32), 4, 8)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_weights_raise_numerical_error(bad):
    W = _weights()
    W[7, 100] = bad
    with pytest.raises(hiquant.NumericalError, match="row 7, column 100"):
        q.fake_quantize(W, 2, 64)
    with pytest.raises(ArithmeticError):
        q.minmax_params(W, 2, 64)
    s, z = q.minmax_params(_weights(), 2, 64)
    with pytest.raises(hiquant.NumericalError):
        q.quantize(W, s, z, 2, 64)


@pytest.mark.parametrize("bits", [-1, 0, 1, 9, 16, 2**40])
def test_bits_out_of_range_raise_value_error(bits):
    with pytest.raises(hiquant.InvalidArgumentError, match="bits must be an integer in 2..8"):
        q.fake_quantize(_weights(), bits, 64)


def test_non_integer_bits_or_group_raise_type_error():
    with pytest.raises(hiquant.InvalidTypeError, match="bits must be an int"):
        q.fake_quantize(_weights(), 2.5, 64)
    with pytest.raises(hiquant.InvalidTypeError, match="group_size must be an int"):
        q.fake_quantize(_weights(), 2, 64.0)


@pytest.mark.parametrize("group", [-2, -100, 2**70])
def test_bad_group_sizes_raise_value_error(group):
    with pytest.raises(hiquant.InvalidArgumentError, match="group_size"):
        q.fake_quantize(_weights(), 2, group)


def test_parameters_of_the_wrong_shape_raise_value_error():
    W = _weights()
    s, z = q.minmax_params(W, 2, 64)
    with pytest.raises(hiquant.InvalidArgumentError, match="scale has shape"):
        q.quantize(W, s[:, :2].copy(), z, 2, 64)
    with pytest.raises(hiquant.InvalidArgumentError, match="zero has shape"):
        q.quantize(W, s, z[:10].copy(), 2, 64)


def test_invalid_parameter_values_raise_value_error():
    W = _weights()
    s, z = q.minmax_params(W, 2, 64)
    s_bad = s.copy()
    s_bad[0, 0] = 0.0
    with pytest.raises(ValueError, match="scale must be finite and positive"):
        q.quantize(W, s_bad, z, 2, 64)
    z_bad = z.copy()
    z_bad[0, 0] = 4
    with pytest.raises(ValueError, match="zero must be an integer in \\[0, 3\\]"):
        q.quantize(W, s, z_bad, 2, 64)
    codes = q.quantize(W, s, z, 2, 64)
    codes[0, 0] = 200
    with pytest.raises(ValueError, match="codes must be < 2\\^bits"):
        q.dequantize(codes, s, z, 2, 64)


def test_tiny_external_scale_saturates_instead_of_overflowing():
    W = _weights()
    s, z = q.minmax_params(W, 4, 64)
    s_tiny = np.full_like(s, 1e-30)
    codes = q.quantize(W, s_tiny, z, 4, 64)
    np.testing.assert_array_equal(codes, ref.quantize(W, s_tiny, z, 4, 64))


def test_kernels_release_the_gil():
    # A worker thread runs the kernel 5 times while this thread keeps stamping the clock. A
    # binding that held the GIL would stall this thread for every call's whole duration; one
    # that releases it lets this thread stamp on through. The check asks for one call (of 5)
    # during which this thread never stalled for half the call: a loaded machine's scheduling
    # stall (~10-30 ms, as long as one call on a fast CPU) can spoil a call or two, a held GIL
    # spoils all of them.
    W = np.random.default_rng(7).standard_normal((8192, 4096)).astype(np.float32)
    q.fake_quantize(W, 2, 64, n_threads=1)  # warm: pages, code
    calls = []

    def work():
        for _ in range(5):
            t0 = time.perf_counter()
            q.fake_quantize(W, 2, 64, n_threads=1)
            calls.append((t0, time.perf_counter()))

    worker = threading.Thread(target=work)
    stamps = [time.perf_counter()]
    worker.start()
    while worker.is_alive():
        stamps.append(time.perf_counter())
    worker.join()
    stamps.append(time.perf_counter())
    stamps = np.array(stamps)
    worst = []  # per call: this thread's longest stall while it ran, as a fraction of the call
    for t0, t1 in calls:
        inside = stamps[(stamps > t0) & (stamps < t1)]
        edges = np.concatenate(([stamps[stamps <= t0].max()], inside,
                                [stamps[stamps >= t1].min()]))
        worst.append(float(np.diff(edges).max()) / (t1 - t0))
    assert len(calls) == 5 and min(worst) < 0.5, worst
