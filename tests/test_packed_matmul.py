"""The packed-format matrix product (hiquant.packed_matmul, cpp/src/packed_matmul.cpp) equals
dequantize-then-multiply within float32 rounding, for every width, grouping, scale storage and
high-part kind, on both kernels, identically for any thread count."""

from __future__ import annotations

import numpy as np
import pytest

from hiquant import _core
from hiquant._reference import packed_matmul as ref
from hiquant.errors import InvalidArgumentError, InvalidTypeError
from hiquant.packed_matmul import PackedLinear, kernel_name
from hiquant.storage import QuantizedLayer
from tolerances import PACKED_RTOL

AVX2 = kernel_name("auto") == "avx2-fma"
KERNELS = ["portable"] + (["avx2", "lut"] if AVX2 else [])
needs_avx2 = pytest.mark.skipif(not AVX2, reason="the table kernel needs AVX2")


def _layer(rng, d_out, d_in, b_low, group, k=0, b_high=0, scale_bits=16):
    W = rng.standard_normal((d_out, d_in)).astype(np.float32)
    hi = np.sort(rng.choice(d_in, k, replace=False)) if k else ()
    return QuantizedLayer.rtn("l", W, b_low, group, hi, b_high, scale_bits)


def _check(pl: PackedLinear, x: np.ndarray, kernel: str):
    y = pl.matmul(x, kernel=kernel)
    y64 = ref.packed_matmul(pl.d_out, pl.d_in, pl._parts, x)
    bound = ref.error_bound(pl.d_out, pl.d_in, pl._parts, x)
    assert y.shape == y64.shape and y.dtype == np.float32
    assert np.all(np.abs(y - y64) <= PACKED_RTOL * bound + 1e-30)
    # and the float32 dequantize-then-multiply of the same layer, within the same bound
    W = pl.dequantize()
    assert np.all(np.abs(y - (x @ W.T)) <= 2 * PACKED_RTOL * bound + 1e-30)
    return y


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("b_low", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("scale_bits", [16, 8, 6])
def test_product_matches_dequantize_then_multiply_for_every_width(kernel, b_low, scale_bits):
    rng = np.random.default_rng(b_low * 100 + scale_bits)
    b_high = {2: 3, 3: 4, 4: 8, 6: 8, 8: 2}[b_low]
    pl = PackedLinear.from_layer(_layer(rng, 37, 203, b_low, 32, 19, b_high, scale_bits))
    for n in (1, 2, 5, 8, 13):
        _check(pl, rng.standard_normal((n, 203)).astype(np.float32), kernel)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("group", [0, 5, 8, 64, 100, 1000])
def test_ragged_and_single_groups(kernel, group):
    """Groups of the part's own columns, the last one shorter; rows start at any bit offset
    (odd column counts at 3 and 6 bits)."""
    rng = np.random.default_rng(group + 7)
    for b_low, b_high in ((3, 6), (2, 4)):
        pl = PackedLinear.from_layer(_layer(rng, 29, 301, b_low, group, 23, b_high, 16))
        _check(pl, rng.standard_normal((3, 301)).astype(np.float32), kernel)


@pytest.mark.parametrize("kernel", KERNELS)
def test_no_high_columns_all_high_and_fp16_high_part(kernel):
    rng = np.random.default_rng(3)
    for k, b_high in ((0, 0), (64, 4), (64, 16), (10, 16)):
        pl = PackedLinear.from_layer(_layer(rng, 33, 64, 2, 16, k, b_high, 8))
        _check(pl, rng.standard_normal((1, 64)).astype(np.float32), kernel)
        _check(pl, rng.standard_normal((8, 64)).astype(np.float32), kernel)


def test_one_dimensional_input_gives_one_dimensional_output():
    rng = np.random.default_rng(4)
    pl = PackedLinear.from_layer(_layer(rng, 16, 40, 4, 8))
    x = rng.standard_normal(40).astype(np.float32)
    y = pl.matmul(x)
    assert y.shape == (16,)
    np.testing.assert_array_equal(y, pl.matmul(x[None])[0])
    assert pl.matmul(np.zeros((0, 40), np.float32)).shape == (0, 16)


def test_results_identical_across_thread_counts():
    rng = np.random.default_rng(5)
    pl = PackedLinear.from_layer(_layer(rng, 203, 300, 2, 64, 30, 3, 6))
    x = rng.standard_normal((8, 300)).astype(np.float32)
    for kernel in KERNELS:
        a = pl.matmul(x, n_threads=1, kernel=kernel)
        b = pl.matmul(x, n_threads=2, kernel=kernel)
        c = pl.matmul(x, n_threads=3, kernel=kernel)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def test_a_token_tile_does_not_change_a_token_result():
    """Token t's output is the same whether it is multiplied alone or in a batch (the decode step
    and the prompt pass agree) up to float32 rounding; rows of a batch never mix."""
    rng = np.random.default_rng(6)
    pl = PackedLinear.from_layer(_layer(rng, 50, 128, 3, 64, 12, 4, 16))
    x = rng.standard_normal((11, 128)).astype(np.float32)
    y = pl.matmul(x)
    bound = ref.error_bound(50, 128, pl._parts, x)
    for t in range(11):
        assert np.all(np.abs(pl.matmul(x[t]) - y[t]) <= 2 * PACKED_RTOL * bound[t])


def test_from_tensors_reads_the_packed_export_without_unpacking():
    from hiquant.export import layer_entry, layer_tensors
    rng = np.random.default_rng(7)
    ql = _layer(rng, 24, 96, 2, 32, 9, 3, 6)
    pl = PackedLinear.from_tensors("l", layer_entry(ql), layer_tensors(ql))
    np.testing.assert_array_equal(pl.dequantize(), ql.dequantize())
    assert pl.nbytes >= ql.storage_bits() // 8


def test_bad_inputs_raise_hiquant_errors():
    rng = np.random.default_rng(8)
    pl = PackedLinear.from_layer(_layer(rng, 8, 16, 4, 8))
    with pytest.raises(InvalidTypeError):
        pl.matmul(np.zeros(16, np.float64))
    with pytest.raises(InvalidArgumentError, match="d_in = 16"):
        pl.matmul(np.zeros((2, 15), np.float32))
    with pytest.raises(InvalidArgumentError):
        pl.matmul(np.zeros((2, 16), np.float32), kernel="fast")
    part = dict(pl._parts[0])
    part["qweight"] = part["qweight"][:-1]
    with pytest.raises(InvalidArgumentError, match="qweight"):
        _core.PackedMatrix(8, 16, [part])
    part = dict(pl._parts[0], cols=np.array([0] * 15 + [16], np.int64))
    with pytest.raises(InvalidArgumentError, match="outside"):
        _core.PackedMatrix(8, 16, [part])
    with pytest.raises(InvalidArgumentError, match="bits"):
        _core.PackedMatrix(8, 16, [dict(pl._parts[0], bits=5)])


def test_reference_unpacker_inverts_pack_codes():
    from hiquant import quantizer as qz
    rng = np.random.default_rng(9)
    for bits in qz.PACK_BITS:
        c = rng.integers(0, 2**bits, 77).astype(np.uint8)
        np.testing.assert_array_equal(ref.unpack_bits(qz.pack_codes(c, bits), bits, 77), c)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("b_low,b_high", [(2, 3), (3, 4), (4, 8), (6, 2), (8, 4)])
def test_row_block_and_token_tile_tails_match_reference(kernel, b_low, b_high):
    """The AVX2 kernel runs 4 rows x 1-2 tokens or 2 rows x 3-4 tokens per pass (5-8 tokens as
    4 + the rest) over blocks of 32 rows: every row count left over by a pass or a block, every
    token count of a tile, rows starting at every bit offset (odd column counts), groups of whole
    8-column chunks with a shorter last group (the masked tail chunk), and the last rows of the
    stream (bounded loads) give dequantize-then-multiply within float32 rounding."""
    rng = np.random.default_rng(100 * b_low + b_high)
    for d_out, d_in, group, k, sb in ((1, 77, 8, 5, 16), (3, 64, 64, 0, 6), (5, 131, 16, 13, 8),
                                      (33, 203, 32, 0, 16), (35, 203, 64, 21, 6),
                                      (67, 96, 8, 9, 16)):
        pl = PackedLinear.from_layer(_layer(rng, d_out, d_in, b_low, group, k, b_high, sb))
        for n in (1, 2, 3, 4, 6, 7, 9):
            _check(pl, rng.standard_normal((n, d_in)).astype(np.float32), kernel)


def test_single_token_results_identical_across_thread_counts():
    rng = np.random.default_rng(11)
    pl = PackedLinear.from_layer(_layer(rng, 301, 256, 3, 64, 26, 4, 6))
    x = rng.standard_normal(256).astype(np.float32)
    for kernel in KERNELS:
        a = pl.matmul(x, n_threads=1, kernel=kernel)
        for nt in (2, 3, 5):
            np.testing.assert_array_equal(a, pl.matmul(x, n_threads=nt, kernel=kernel))


def test_extreme_scales_and_codes_stay_within_the_bound():
    """Codes at 0 and 2^b - 1 everywhere, zero points at both ends and large/small float16 scales:
    the per-group tables s * (k - zero) and the FMA form s * code - s * zero round like the
    float64 dequantization up to float32 rounding."""
    rng = np.random.default_rng(12)
    for bits in (2, 3, 4, 8):
        W = np.where(rng.random((21, 80)) < 0.5, -1.0, 1.0).astype(np.float32)
        W *= np.float32(rng.choice([1e-3, 30.0], size=(21, 1)))
        pl = PackedLinear.from_layer(QuantizedLayer.rtn("l", W, bits, 16, (), 0, 16))
        for kernel in KERNELS:
            _check(pl, rng.standard_normal((2, 80)).astype(np.float32), kernel)


@pytest.mark.parametrize("kernel", KERNELS)
def test_many_tokens_dequantize_and_gemm_path_matches_reference(kernel):
    """From 24 tokens on the AVX2 kernel dequantizes blocks of 48 rows (columns in the parts'
    order, x gathered to match) and runs the float32 GEMM micro-kernel: every width, float16 or
    no high part, ragged groups, row counts not a multiple of 48 or 6, and token counts not a
    multiple of 16 give dequantize-then-multiply within float32 rounding."""
    rng = np.random.default_rng(13)
    for d_out, d_in, b_low, group, k, b_high, sb in ((50, 203, 2, 64, 21, 3, 6),
                                                     (97, 130, 3, 5, 13, 16, 8),
                                                     (7, 64, 4, 16, 0, 0, 16),
                                                     (49, 96, 6, 32, 96, 8, 16),
                                                     (13, 77, 8, 0, 9, 4, 6)):
        pl = PackedLinear.from_layer(_layer(rng, d_out, d_in, b_low, group, k, b_high, sb))
        for n in (23, 24, 37, 70):
            _check(pl, rng.standard_normal((n, d_in)).astype(np.float32), kernel)


def test_many_tokens_results_identical_across_thread_counts():
    rng = np.random.default_rng(14)
    pl = PackedLinear.from_layer(_layer(rng, 203, 300, 2, 64, 30, 3, 6))
    x = rng.standard_normal((40, 300)).astype(np.float32)
    for kernel in KERNELS:
        a = pl.matmul(x, n_threads=1, kernel=kernel)
        for nt in (2, 3):
            np.testing.assert_array_equal(a, pl.matmul(x, n_threads=nt, kernel=kernel))


@needs_avx2
def test_auto_takes_the_table_kernel_for_one_token_and_the_register_kernel_for_more():
    rng = np.random.default_rng(15)
    pl = PackedLinear.from_layer(_layer(rng, 70, 300, 2, 64, 30, 3, 6))
    x = rng.standard_normal((2, 300)).astype(np.float32)
    one = pl.matmul(x[:1])
    np.testing.assert_array_equal(one, pl.matmul(x[:1], kernel="lut"))
    np.testing.assert_array_equal(pl.matmul(x), pl.matmul(x, kernel="avx2"))
    # the two kernels round differently: equal results would mean one of them did not run
    assert not np.array_equal(one, pl.matmul(x[:1], kernel="avx2"))


@needs_avx2
def test_table_kernel_copy_takes_the_codes_bits_and_a_byte_per_scale_and_zero():
    """A 2-bit part with rows a multiple of 8 and groups a multiple of 32 columns: the plane words
    take exactly the codes' bytes, plus one byte per (row, group) for the scale code and one for
    the zero point; one-token products read that instead of the packed part. A full-width 3-bit
    part keeps no copy, a 3-bit high part (at most half the columns) does."""
    rng = np.random.default_rng(16)
    pl = PackedLinear.from_layer(_layer(rng, 64, 256, 2, 64, 0, 0, 6))
    codes, params = 64 * 256 * 2 // 8, 2 * 64 * (256 // 64)
    assert pl.planes_nbytes == codes + params
    super_rows = pl._parts[0]["super_rows"]
    assert pl.decode_nbytes == codes + params + 2 * -(-64 // super_rows)
    pl3 = PackedLinear.from_layer(_layer(rng, 64, 256, 3, 64, 0, 0, 6))
    assert pl3.planes_nbytes == 0 and pl3.decode_nbytes == pl3.nbytes
    # a 3-bit high part (a minority of gathered columns) gets a copy, the 3-bit low part none
    hyb = PackedLinear.from_layer(_layer(rng, 64, 256, 3, 64, 64, 3, 6))
    assert hyb.planes_nbytes == 64 * 64 * 3 // 8 + 2 * 64


@needs_avx2
@pytest.mark.parametrize("b_low,group,k,b_high,scale_bits", [
    (2, 64, 0, 0, 16), (2, 64, 41, 3, 6), (2, 32, 20, 3, 8), (2, 20, 7, 3, 16),
    (2, 0, 0, 0, 16), (2, 1000, 30, 4, 6), (3, 128, 30, 3, 16), (2, 5, 3, 3, 6),
    (3, 64, 0, 0, 8), (4, 128, 30, 8, 16), (4, 33, 0, 0, 6)])
def test_int8_tables_match_their_float64_twin(b_low, group, k, b_high, scale_bits):
    """The int8 tables' product equals the twin that forms the same tables (int8_table_matmul)
    within float32 rounding, for 2-, 3- and 4-bit parts (an 8-bit high part on the register
    kernel beside them), rows and groups off the 16-row / 8-column blocks, short chunks; `auto`
    takes them for up to 8 tokens, not for more."""
    rng = np.random.default_rng(group * 7 + k)
    d_in = 301
    pl = PackedLinear.from_layer(_layer(rng, 37, d_in, b_low, group, k, b_high, scale_bits),
                                 tables="int8")
    assert pl.tables == "int8" and pl.planes_nbytes > 0
    x = rng.standard_normal((3, d_in)).astype(np.float32)
    y = pl.matmul(x, kernel="lut")
    twin = ref.int8_table_matmul(pl.d_out, pl.d_in, pl._parts, x)
    bound = ref.error_bound(pl.d_out, pl.d_in, pl._parts, x)
    assert np.all(np.abs(y - twin) <= PACKED_RTOL * bound + 1e-30)
    np.testing.assert_array_equal(pl.matmul(x[1]), y[1])
    np.testing.assert_array_equal(pl.matmul(x), y)  # `auto` takes them for up to 8 tokens
    x9 = rng.standard_normal((9, d_in)).astype(np.float32)
    _check(pl, x9, "auto")  # nine tokens: the register kernel, exact


@needs_avx2
def test_int8_tables_differ_from_the_exact_product_by_at_most_the_8bit_activation_bound():
    """Against the exact product the int8 tables err by at most |s| * xs / 2 * (2^b - 1) per
    column quad and group (int8_table_error_bound), and they do err: the exact tables and the
    other kernels are unchanged by them."""
    rng = np.random.default_rng(21)
    ql = _layer(rng, 64, 512, 2, 64, 51, 3, 6)
    p8, p32 = PackedLinear.from_layer(ql, tables="int8"), PackedLinear.from_layer(ql)
    x = (rng.standard_normal((4, 512)) * rng.uniform(0.1, 10, 512)).astype(np.float32)
    exact = ref.packed_matmul(64, 512, p8._parts, x)
    bound = ref.int8_table_error_bound(64, 512, p8._parts, x)
    fbound = ref.error_bound(64, 512, p8._parts, x)
    y = p8.matmul(x, kernel="lut")
    err = np.abs(y - exact)
    assert np.all(err <= bound + PACKED_RTOL * fbound)
    assert err.max() > 100 * PACKED_RTOL * fbound.max()  # the 8-bit tables ran
    for kernel in ("lut", "avx2", "portable"):
        np.testing.assert_array_equal(p32.matmul(x, kernel=kernel),
                                      PackedLinear.from_layer(ql).matmul(x, kernel=kernel))
        if kernel != "lut":
            np.testing.assert_array_equal(p8.matmul(x, kernel=kernel),
                                          p32.matmul(x, kernel=kernel))


@needs_avx2
def test_int8_tables_results_identical_across_thread_counts_and_nan_propagates():
    rng = np.random.default_rng(22)
    pl = PackedLinear.from_layer(_layer(rng, 100, 300, 2, 64, 30, 3, 8), tables="int8")
    x = rng.standard_normal(300).astype(np.float32)
    a = pl.matmul(x, n_threads=1)
    for nt in (2, 3):
        np.testing.assert_array_equal(a, pl.matmul(x, n_threads=nt))
    x[7] = np.nan
    assert np.all(np.isnan(pl.matmul(x)))
    x[7] = np.inf
    assert not np.any(np.isfinite(pl.matmul(x)))


@needs_avx2
def test_int8_tables_copy_takes_the_codes_bits_in_plane_pairs():
    """Rows a multiple of 16, groups a multiple of 8 columns: a 2-bit part's plane bytes are the
    codes' bytes; a 3-bit part's are two pairs (its plane 3 zero), 4/3 of its codes; a 4-bit
    part's its codes' bytes."""
    rng = np.random.default_rng(23)
    pl = PackedLinear.from_layer(_layer(rng, 64, 256, 2, 64, 0, 0, 6), tables="int8")
    assert pl.planes_nbytes == 64 * 256 * 2 // 8 + 2 * 64 * (256 // 64)
    hyb = PackedLinear.from_layer(_layer(rng, 64, 256, 2, 64, 64, 3, 16), tables="int8")
    low, high = 64 * 192 * 2 // 8 + 3 * 64 * 3, 64 * 64 * 4 // 8 + 3 * 64 * 1
    assert hyb.planes_nbytes == low + high
    # full-width 3- and 4-bit parts too (two plane pairs: 4 bits per code), an 8-bit one not
    for bits in (3, 4):
        pl = PackedLinear.from_layer(_layer(rng, 64, 256, bits, 64, 0, 0, 6), tables="int8")
        assert pl.planes_nbytes == 64 * 256 * 4 // 8 + 2 * 64 * (256 // 64)
    pl8 = PackedLinear.from_layer(_layer(rng, 64, 256, 8, 64, 0, 0, 6), tables="int8")
    assert pl8.planes_nbytes == 0


def test_tables_must_be_float32_or_int8():
    rng = np.random.default_rng(24)
    ql = _layer(rng, 8, 64, 2, 32)
    assert PackedLinear.from_layer(ql).tables == "float32"
    with pytest.raises(InvalidArgumentError, match="tables must be one of"):
        PackedLinear.from_layer(ql, tables="int4")
