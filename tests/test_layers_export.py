"""The hybrid layer format: exact storage accounting, packed round trips, atomic outputs."""

from __future__ import annotations

import os

import numpy as np
import pytest

import hiquant
from hiquant._atomic import atomic_dir, atomic_write_text
from hiquant.export import layer_entry, layer_from_tensors, layer_tensors
from hiquant.layers import QuantizedLayer, QuantPart, fp16_scales, scale8, storage_bits
from hiquant import quantizer as qz

CASES = [  # (high columns, b_high)
    ([], 0),
    ([0, 5, 63, 64, 199], 3),
    (list(range(0, 200, 3)), 4),
    ([7, 8], 16),
    (list(range(200)), 3),
]


def _w(seed=0, shape=(48, 200)):
    return (np.random.default_rng(seed).standard_normal(shape) * 0.02).astype(np.float32)


@pytest.mark.parametrize("scale_bits", [16, 8])
@pytest.mark.parametrize("high,b_high", CASES)
@pytest.mark.parametrize("b_low,group", [(2, 64), (3, 128), (4, 0), (2, 7)])
def test_packed_roundtrip_gives_identical_weights(high, b_high, b_low, group, scale_bits):
    W = _w()
    ql = QuantizedLayer.rtn("blk.q", W, b_low, group, high_idx=high, b_high=b_high,
                            scale_bits=scale_bits)
    tensors = layer_tensors(ql)
    back = layer_from_tensors("blk.q", layer_entry(ql), tensors)
    np.testing.assert_array_equal(back.dequantize(), ql.dequantize())
    np.testing.assert_array_equal(back.high_idx, np.sort(high))


@pytest.mark.parametrize("scale_bits", [16, 8])
@pytest.mark.parametrize("high,b_high", CASES)
@pytest.mark.parametrize("b_low,group", [(2, 64), (3, 128), (8, 32)])
def test_packed_bytes_equal_the_counted_storage_bits(high, b_high, b_low, group, scale_bits):
    W = _w(shape=(64, 256))  # sizes where every packed tensor ends on a byte boundary
    high = [h for h in high if h < 256]
    ql = QuantizedLayer.rtn("x", W, b_low, group, high_idx=high, b_high=b_high,
                            scale_bits=scale_bits)
    payload_bits = 8 * sum(t.nbytes for t in layer_tensors(ql).values())
    assert payload_bits == ql.storage_bits()


def test_storage_bits_formula_by_hand():
    # 4096 x 4096, 10% high at 3 bits, low at 2 bits, g = 64, fp16 scales.
    d_out = d_in = 4096
    k = 410
    low = d_out * (d_in - k) * 2 + d_out * 58 * (16 + 2)  # ceil(3686 / 64) = 58 groups
    high = d_out * k * 3 + d_out * 7 * (16 + 3)  # ceil(410 / 64) = 7 groups
    assert storage_bits(d_out, d_in, k, 2, 3, 64) == low + high + d_in
    assert storage_bits(d_out, d_in, 0, 2, 3, 64) == d_out * d_in * 2 + d_out * 64 * 18
    assert storage_bits(d_out, d_in, k, 2, 16, 64) == low + d_out * k * 16 + d_in


def test_scale8_is_an_exact_product_on_a_grid_that_covers_every_group():
    rng = np.random.default_rng(5)
    s = (np.abs(rng.standard_normal((200, 9))) * rng.lognormal(0, 3, (200, 1))).astype(np.float32)
    s[3, :] = 1e-9  # a row of (almost) empty groups: raised to float16's smallest normal
    s[4, 2] = s[4].max() * 1e-4  # a group far below its row's largest
    s32, code, sup = scale8(s)
    assert code.dtype == np.uint8 and code.min() >= 1 and sup.dtype == np.float16
    # the stored scale is S * c exactly (float32 product == float64 product)
    np.testing.assert_array_equal(s32.astype(np.float64),
                                  sup.astype(np.float64)[:, None] * code.astype(np.float64))
    sf = np.maximum(s, np.float32(np.finfo(np.float16).tiny)).astype(np.float64)
    S = sup.astype(np.float64)[:, None]
    assert np.all(S * 255 >= sf.max(1, keepdims=True))  # every group's code fits
    ok = sf >= S / 2  # rounded to nearest: moves by at most S / 2
    assert np.all(np.abs(s32 - sf)[ok] <= S.repeat(9, 1)[ok] / 2 * (1 + 1e-6))
    assert np.all(s32[~ok] == S.repeat(9, 1)[~ok])  # tiny groups: raised to S
    assert not ok[4, 2]


def test_8bit_scales_cost_what_the_formula_says_and_barely_change_rtn():
    W = _w(shape=(64, 256))
    q16 = QuantizedLayer.rtn("x", W, 2, 64)
    q8 = QuantizedLayer.rtn("x", W, 2, 64, scale_bits=8)
    assert q8.scale_bits == 8 and q16.scale_bits == 16
    assert q16.storage_bits() - q8.storage_bits() == 64 * 4 * 8 - 64 * 16
    e16 = np.square(q16.dequantize() - W).mean()
    e8 = np.square(q8.dequantize() - W).mean()
    assert e8 == pytest.approx(e16, rel=0.05)


def test_rtn_layer_equals_the_primitives_with_fp16_scales():
    W = _w(1)
    ql = QuantizedLayer.rtn("x", W, 3, 64)
    scale, zero = qz.minmax_params(W, 3, 64)
    expect = qz.dequantize(qz.quantize(W, fp16_scales(scale), zero, 3, 64), fp16_scales(scale), zero, 3, 64)
    np.testing.assert_array_equal(ql.dequantize(), expect)
    # and stays within a hair of the float32-scale round-to-nearest result
    assert np.abs(ql.dequantize() - qz.fake_quantize(W, 3, 64)).max() < 2e-3 * np.abs(W).max()


def test_fp16_scales_are_always_finite_and_positive():
    s = fp16_scales(np.array([[1e-12, 0.0, 1.0, 1e9]], np.float32))
    assert np.all(np.isfinite(s)) and np.all(s > 0)


def test_malformed_packed_layer_raises_checkpoint_error():
    ql = QuantizedLayer.rtn("x", _w(), 2, 64, high_idx=[1, 2, 3], b_high=3)
    t = layer_tensors(ql)
    e = layer_entry(ql)
    bad = dict(t)
    del bad["x.low.scales"]
    with pytest.raises(hiquant.CheckpointError, match="x.low.scales"):
        layer_from_tensors("x", e, bad)
    bad = dict(t)
    bad["x.low.qweight"] = bad["x.low.qweight"][:-1]
    with pytest.raises(hiquant.CheckpointError, match="bytes"):
        layer_from_tensors("x", e, bad)
    with pytest.raises(hiquant.CheckpointError, match="marks 3 columns"):
        layer_from_tensors("x", dict(e, k=4), t)
    with pytest.raises(hiquant.CheckpointError, match="malformed"):
        layer_from_tensors("x", {"d_out": 1}, t)
    with pytest.raises(hiquant.CheckpointError, match="unsupported widths"):
        layer_from_tensors("x", dict(e, b_low=5), t)


def test_layer_rejects_inconsistent_parts():
    W = _w()
    part = QuantPart.from_weights(W, 2, 64)
    with pytest.raises(hiquant.InvalidArgumentError, match="ascending"):
        QuantizedLayer("x", 48, 200, [5, 3], part)
    with pytest.raises(hiquant.InvalidArgumentError, match="low codes"):
        QuantizedLayer("x", 48, 200, [3], part, high=QuantPart.from_weights(W[:, :1].copy(), 3, 64))


def test_atomic_dir_never_overwrites_unless_asked(tmp_path):
    out = tmp_path / "ckpt"
    with atomic_dir(out) as d:
        (d / "a.txt").write_text("one")
    assert (out / "a.txt").read_text() == "one"
    with pytest.raises(ValueError, match="already exists"):
        with atomic_dir(out) as d:
            pass
    with atomic_dir(out, overwrite=True) as d:
        (d / "b.txt").write_text("two")
    assert sorted(os.listdir(out)) == ["b.txt"]


def test_interrupted_atomic_dir_leaves_no_partial_folder(tmp_path):
    out = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(out) as d:
            (d / "half.bin").write_bytes(b"x" * 10)
            raise KeyboardInterrupt
    assert not out.exists()
    assert os.listdir(tmp_path) == []


def test_atomic_write_replaces_the_file_whole(tmp_path):
    p = tmp_path / "r.json"
    atomic_write_text(p, "{}")
    atomic_write_text(p, '{"a": 1}')
    assert p.read_text() == '{"a": 1}'
    assert os.listdir(tmp_path) == ["r.json"]
