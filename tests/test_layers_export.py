"""The hybrid layer format: exact storage accounting, packed round trips, atomic outputs."""

from __future__ import annotations

import os

import numpy as np
import pytest

import hiquant
from hiquant._atomic import atomic_dir, atomic_write_text
from hiquant.export import layer_entry, layer_from_tensors, layer_tensors
from hiquant.layers import QuantizedLayer, QuantPart, fp16_scales, storage_bits
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


@pytest.mark.parametrize("high,b_high", CASES)
@pytest.mark.parametrize("b_low,group", [(2, 64), (3, 128), (4, 0), (2, 7)])
def test_packed_roundtrip_gives_identical_weights(high, b_high, b_low, group):
    W = _w()
    ql = QuantizedLayer.rtn("blk.q", W, b_low, group, high_idx=high, b_high=b_high)
    tensors = layer_tensors(ql)
    back = layer_from_tensors("blk.q", layer_entry(ql), tensors)
    np.testing.assert_array_equal(back.dequantize(), ql.dequantize())
    np.testing.assert_array_equal(back.high_idx, np.sort(high))


@pytest.mark.parametrize("high,b_high", CASES)
@pytest.mark.parametrize("b_low,group", [(2, 64), (3, 128), (8, 32)])
def test_packed_bytes_equal_the_counted_storage_bits(high, b_high, b_low, group):
    W = _w(shape=(64, 256))  # sizes where every packed tensor ends on a byte boundary
    high = [h for h in high if h < 256]
    ql = QuantizedLayer.rtn("x", W, b_low, group, high_idx=high, b_high=b_high)
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
