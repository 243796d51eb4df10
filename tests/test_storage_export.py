"""The hybrid layer format: exact storage accounting, packed round trips (layer and whole
folder, through the public loader), atomic outputs."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import hiquant
from hiquant import quantizer as qz
from hiquant._atomic import atomic_dir, atomic_write_text
from hiquant.errors import CheckpointError, InvalidArgumentError
from hiquant.export import layer_entry, layer_tensors, write_fake_quant, write_packed
from hiquant.packed import layer_from_tensors, load_packed, open_checkpoint, read_quant_config
from hiquant.storage import (
    SCALE_SUPER_BLOCK,
    QuantizedLayer,
    QuantPart,
    fp16_scales,
    scale8,
    scale_codes,
    storage_bits,
    super_rows,
)

CASES = [  # (high columns, b_high)
    ([], 0),
    ([0, 5, 63, 64, 199], 3),
    (list(range(0, 200, 3)), 4),
    ([7, 8], 16),
    (list(range(200)), 3),
]


def _w(seed=0, shape=(48, 200)):
    return (np.random.default_rng(seed).standard_normal(shape) * 0.02).astype(np.float32)


@pytest.mark.parametrize("scale_bits", [16, 8, 6])
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


@pytest.mark.parametrize("scale_bits", [16, 8, 6])
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


@pytest.mark.parametrize("code_bits", [8, 6])
@pytest.mark.parametrize("rows", [None, 1, 7])
def test_scale_codes_are_an_exact_product_on_a_grid_that_covers_every_group(rows, code_bits):
    rng = np.random.default_rng(5)
    s = (np.abs(rng.standard_normal((200, 9))) * rng.lognormal(0, 3, (200, 1))).astype(np.float32)
    s[3, :] = 1e-9  # a row of (almost) empty groups: raised to float16's smallest normal
    s[4, 2] = s[4].max() * 1e-4  # a group far below its row's largest
    s32, code, sup = scale_codes(s, code_bits, rows)
    cmax = 2 ** code_bits - 1
    r = 256 // 9 if rows is None else rows  # 28 whole rows of 9 codes fit in 256
    assert sup.shape == (-(-200 // r),)  # the last block is short
    assert code.dtype == np.uint8 and code.min() >= 1 and code.max() <= cmax
    assert sup.dtype == np.float16
    S = np.repeat(sup.astype(np.float64), r)[:200, None]  # each row's block super-scale
    # the stored scale is S * c exactly (float32 product == float64 product)
    np.testing.assert_array_equal(s32.astype(np.float64), S * code.astype(np.float64))
    sf = np.maximum(s, np.float32(np.finfo(np.float16).tiny)).astype(np.float64)
    for b in range(sup.size):  # S is the smallest float16 that covers its block's largest scale
        blk = sf[b * r:(b + 1) * r]
        assert sup[b].astype(np.float64) * cmax >= blk.max()
        below = np.nextafter(sup[b], np.float16(0)).astype(np.float64)
        assert below * cmax < blk.max() or sup[b] == np.float16(np.finfo(np.float16).tiny)
    ok = sf >= S / 2  # rounded to nearest: moves by at most S / 2
    assert np.all(np.abs(s32 - sf)[ok] <= np.broadcast_to(S, sf.shape)[ok] / 2 * (1 + 1e-6))
    assert np.all(s32[~ok] == np.broadcast_to(S, sf.shape)[~ok])  # tiny groups: raised to S
    assert not ok[4, 2]


def test_scale_codes_refuse_widths_other_than_8_and_6_and_scale8_is_the_8_bit_case():
    s = np.abs(np.random.default_rng(2).standard_normal((10, 3))).astype(np.float32) + 0.1
    for got, want in zip(scale8(s), scale_codes(s, 8)):
        np.testing.assert_array_equal(got, want)
    for bad in (4, 7, 16, True):
        with pytest.raises(InvalidArgumentError, match="8 or 6"):
            scale_codes(s, bad)


def test_super_scale_blocks_hold_whole_rows_of_at_most_256_codes():
    assert [super_rows(ng) for ng in (1, 6, 9, 16, 256, 257, 1000)] == [256, 42, 28, 16, 1, 1, 1]
    assert SCALE_SUPER_BLOCK == 256


def test_8bit_scales_cost_what_the_formula_says_and_barely_change_rtn():
    W = _w(shape=(64, 256))
    q16 = QuantizedLayer.rtn("x", W, 2, 64)
    q8 = QuantizedLayer.rtn("x", W, 2, 64, scale_bits=8)
    assert q8.scale_bits == 8 and q16.scale_bits == 16
    # 4 groups per row: all 64 rows share one super-scale
    assert q16.storage_bits() - q8.storage_bits() == 64 * 4 * 8 - 16
    e16 = np.square(q16.dequantize() - W).mean()
    e8 = np.square(q8.dequantize() - W).mean()
    assert e8 == pytest.approx(e16, rel=0.05)


def test_8bit_storage_formula_by_hand_at_llama_bench_width():
    # 384 x 384, 8 high columns at 3 bits, low at 2 bits, g = 64, 8-bit scales:
    # low: 376 columns = 6 groups -> 42 rows per super-scale -> ceil(384 / 42) = 10 super-scales;
    # high: 1 group -> 256 rows per super-scale -> 2 super-scales.
    low = 384 * 376 * 2 + 384 * 6 * (8 + 2) + 10 * 16
    high = 384 * 8 * 3 + 384 * 1 * (8 + 3) + 2 * 16
    assert storage_bits(384, 384, 8, 2, 3, 64, 8) == low + high + 384
    # version 1 (a super-scale per row of each part)
    assert storage_bits(384, 384, 8, 2, 3, 64, 8, (1, 1)) == low + high + 384 + 2 * 384 * 16 - 12 * 16
    # an FP16 high part has no super-scale
    assert storage_bits(384, 384, 8, 2, 16, 64, 8) == low + 384 * 8 * 16 + 384


def test_6bit_storage_formula_by_hand_at_llama_bench_width():
    # as the 8-bit case above with 6-bit codes: same super-scale blocks, 2 bits less per group
    low = 384 * 376 * 2 + 384 * 6 * (6 + 2) + 10 * 16
    high = 384 * 8 * 3 + 384 * 1 * (6 + 3) + 2 * 16
    assert storage_bits(384, 384, 8, 2, 3, 64, 6) == low + high + 384
    # plain W2 g64 at 4096 x 4096: 2 + 8 / 64 bits per weight plus 16 bits per 256 scales
    assert storage_bits(4096, 4096, 0, 2, 3, 64, 6) == 4096 * 4096 * 2 + 4096 * 64 * 8 + 1024 * 16


def test_6bit_scales_are_stored_packed_and_cost_what_the_formula_says():
    W = _w(shape=(64, 256))
    q8 = QuantizedLayer.rtn("x", W, 2, 64, scale_bits=8)
    q6 = QuantizedLayer.rtn("x", W, 2, 64, scale_bits=6)
    assert q6.scale_bits == 6 and q6.low.scale_code_bits == 6 and q6.low.scale.max() <= 63
    assert q8.storage_bits() - q6.storage_bits() == 64 * 4 * 2
    t = layer_tensors(q6)
    assert t["x.low.scales"].shape == (64 * 4 * 6 // 8,) and t["x.low.scales"].dtype == np.uint8
    np.testing.assert_array_equal(qz.unpack_codes(t["x.low.scales"], 6, 256, shape=(64, 4)),
                                  q6.low.scale)
    e8 = np.square(q8.dequantize() - W).mean()
    e6 = np.square(q6.dequantize() - W).mean()
    assert e6 == pytest.approx(e8, rel=0.1)
    # an unpacked (d_out, n_groups) tensor in a 6-bit entry is refused, naming the packed shape
    t["x.low.scales"] = q6.low.scale
    with pytest.raises(CheckpointError, match=r"scales is uint8\(64, 4\), expected uint8\(192,\)"):
        layer_from_tensors("x", layer_entry(q6), t)


def test_6bit_scale_codes_are_refused_in_format_version_1_and_zero_codes_anywhere():
    W = _w(shape=(16, 128))
    q6 = QuantizedLayer.rtn("x", W, 2, 64, scale_bits=6)
    entry, t = layer_entry(q6), layer_tensors(q6)
    with pytest.raises(CheckpointError, match="scale_bits 6"):
        layer_from_tensors("x", entry, t, version=1)
    t["x.low.scales"] = qz.pack_codes(np.zeros((16, 2), np.uint8), 6)
    with pytest.raises(CheckpointError, match="non-positive 6-bit scales"):
        layer_from_tensors("x", entry, t)
    with pytest.raises(InvalidArgumentError, match="codes in 1..63"):
        QuantPart(2, 64, q6.low.codes, np.full((16, 2), 64, np.uint8), q6.low.zero,
                  q6.low.scale_super, scale_code_bits=6)


@pytest.mark.parametrize("high,b_high", CASES)
def test_version1_layer_with_a_super_scale_per_row_loads_to_the_same_weights(high, b_high):
    W = _w(3)
    d_out = W.shape[0]
    high = np.sort(np.asarray(high, np.int64))
    mask = np.ones(W.shape[1], bool)
    mask[high] = False

    def part(cols, bits):  # a version-1 part, built by hand: one super-scale per row
        scale, zero = qz.minmax_params(np.ascontiguousarray(cols), bits, 64)
        s32, code, sup = scale8(scale, rows=1)
        codes = qz.quantize(np.ascontiguousarray(cols), np.ascontiguousarray(s32), zero, bits, 64)
        return QuantPart(bits, 64, codes, code, zero, sup, super_rows=1), s32, codes, zero

    if mask.any():
        low, s_low, c_low, z_low = part(W[:, mask], 2)
        expect_low = qz.dequantize(c_low, np.ascontiguousarray(s_low), z_low, 2, 64)
    else:  # every column is high-impact: an empty low part
        low = QuantPart(2, 64, np.zeros((d_out, 0), np.uint8), np.zeros((d_out, 0), np.float16),
                        np.zeros((d_out, 0), np.uint8))
        expect_low = np.zeros((d_out, 0), np.float32)
    hp = h16 = None
    if b_high == 16:
        h16 = W[:, high].astype(np.float16)
    elif high.size:
        hp, *_ = part(W[:, high], b_high)
    ql = QuantizedLayer("blk.q", d_out, W.shape[1], high, low, hp, h16)
    np.testing.assert_array_equal(ql.dequantize()[:, mask], expect_low)
    entry = layer_entry(ql)
    entry.pop("scale_super_rows")  # version-1 entries have no such key
    back = layer_from_tensors("blk.q", entry, layer_tensors(ql), version=1)
    np.testing.assert_array_equal(back.dequantize(), ql.dequantize())
    n_parts = int(mask.any()) + (hp is not None)
    default = QuantizedLayer.rtn("blk.q", W, 2, 64, high_idx=high, b_high=b_high, scale_bits=8)
    sb = default.storage_bits()  # same widths and groups; default blocks of rows
    sup_default = sum(16 * -(-d_out // super_rows(qz.n_groups(n, 64)))
                      for n, on in ((int(mask.sum()), mask.any()), (high.size, hp is not None)) if on)
    assert back.storage_bits() == sb - sup_default + 16 * d_out * n_parts
    with pytest.raises(CheckpointError, match="scales_super"):  # read as version 2: wrong shape
        layer_from_tensors("blk.q", entry, layer_tensors(ql), version=2)


def test_packed_config_versions_1_and_2_are_read_and_others_refused(tmp_path):
    for v, ok in ((1, True), (2, True), (3, False), (None, False)):
        (tmp_path / "quantization_config.json").write_text(json.dumps(
            {"format": "hiquant-packed", "version": v, "layers": {}}))
        if ok:
            assert read_quant_config(tmp_path)["version"] == v
        else:
            with pytest.raises(CheckpointError, match="version"):
                read_quant_config(tmp_path)


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


# ------------------------------------------------------------------------------ whole folders


def _quantize_some(model, every=2, scale_bits=16):
    """RTN layers for every ``every``-th linear of the model (a mix of quantized and stored)."""
    out = {}
    for i, name in enumerate(model.linear_names()):
        if i % every == 0:
            W = model.get_weight(name)
            out[name] = QuantizedLayer.rtn(name, W, 3, 16, high_idx=[0, 3], b_high=4,
                                           scale_bits=scale_bits)
    return out


@pytest.mark.parametrize("arch,opts", [("LlamaForCausalLM", {}),
                                       ("Qwen2ForCausalLM", {"style": "4.x", "tie": True})])
@pytest.mark.parametrize("scale_bits", [16, 6])
def test_packed_folder_loads_exactly_the_dequantized_weights_and_the_stored_rest(
        tiny_checkpoint, tmp_path, arch, opts, scale_bits):
    """Linear weights from the packed codes, bit for bit; every other tensor (Qwen2's q/k/v
    biases included) read as stored; forward passes equal the model with the layers set."""
    from hiquant.model import load_model
    folder, cfg, _ = tiny_checkpoint(arch, **opts)
    m = load_model(folder)
    q = _quantize_some(m, scale_bits=scale_bits)
    write_packed(tmp_path / "packed", m, q, {"method": "rtn"})
    pm = load_packed(tmp_path / "packed")
    assert isinstance(open_checkpoint(tmp_path / "packed"), type(pm))
    for name in m.linear_names():
        want = q[name].dequantize() if name in q else m.get_weight(name)
        np.testing.assert_array_equal(pm.get_weight(name), want)
        assert pm.linear_shape(name) == m.linear_shape(name)
    assert pm.modified_weights() == []
    for name, ql in q.items():
        m.set_weight(name, ql)
    ids = np.random.default_rng(0).integers(0, cfg["vocab_size"], (2, 9))
    dense = load_packed(tmp_path / "packed", packed_kernels=False)
    np.testing.assert_array_equal(dense.sequence_losses(ids), m.sequence_losses(ids))
    # the default runs the packed kernels: the same products within float32 rounding
    np.testing.assert_allclose(pm.sequence_losses(ids), m.sequence_losses(ids), rtol=1e-6)
    # the source tensors of a packed model: stored ones unchanged, packed linears as float32
    src = {t.name: t for t in pm.source_tensors()}
    assert set(src) == set(t.name for t in m.source_tensors())
    for name, ql in q.items():
        t = src[name + ".weight"]
        assert t.dtype == "F32" and t.shape == (ql.d_out, ql.d_in)
        np.testing.assert_array_equal(t.read(), ql.dequantize())


def test_fake_quant_and_packed_folders_load_to_the_same_weights(tiny_llama, tmp_path):
    from hiquant.model import load_model
    m = load_model(tiny_llama[0])
    q = _quantize_some(m, every=3, scale_bits=8)
    write_fake_quant(tmp_path / "fake", m, q)
    write_packed(tmp_path / "packed", m, q, {"method": "rtn"})
    fm, pm = open_checkpoint(tmp_path / "fake"), open_checkpoint(tmp_path / "packed")
    for name in m.linear_names():
        np.testing.assert_array_equal(fm.get_weight(name), pm.get_weight(name))


def test_load_model_takes_linear_weights_from_another_source(tiny_llama):
    from hiquant.model import load_model
    folder, cfg, _ = tiny_llama
    m = load_model(folder)
    name = m.linear_names()[4]
    W = (m.get_weight(name) * 0.5).astype(np.float32)
    ql = QuantizedLayer.rtn(m.linear_names()[0], m.get_weight(m.linear_names()[0]), 4, 16)
    sm = load_model(folder, linear_source={name: W, m.linear_names()[0]: ql})
    np.testing.assert_array_equal(sm.get_weight(name), W)
    np.testing.assert_array_equal(sm.get_weight(m.linear_names()[0], original=True),
                                  ql.dequantize())
    sm.set_weight(name, m.get_weight(name))
    sm.reset_weight(name)
    np.testing.assert_array_equal(sm.get_weight(name), W)  # the source is the model's own
    with pytest.raises(hiquant.CheckpointError, match="has shape"):
        load_model(folder, linear_source={name: W.T.copy()})
    with pytest.raises(hiquant.CheckpointError, match="not a linear layer"):
        load_model(folder, linear_source={"model.layers.9.mlp.up_proj": W})
    with pytest.raises(hiquant.InvalidTypeError, match="linear_source"):
        load_model(folder, linear_source={name: W.tolist()})


def test_packed_folder_with_a_layer_of_the_wrong_shape_raises_checkpoint_error(tiny_llama,
                                                                              tmp_path):
    from hiquant.model import load_model
    m = load_model(tiny_llama[0])
    q = _quantize_some(m)
    write_packed(tmp_path / "packed", m, q, {"method": "rtn"})
    p = tmp_path / "packed" / "quantization_config.json"
    cfg = json.loads(p.read_text())
    first = next(iter(cfg["layers"]))
    cfg["layers"][first]["d_in"] += 1
    p.write_text(json.dumps(cfg))
    with pytest.raises(hiquant.CheckpointError, match=first):
        load_packed(tmp_path / "packed")
    with pytest.raises(hiquant.CheckpointError, match="no quantization_config.json"):
        load_packed(tiny_llama[0])
