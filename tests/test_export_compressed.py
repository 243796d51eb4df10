"""The compressed-tensors export (hiquant.export_compressed): compressed-tensors' own packing and
decompression reproduce hiquant's weights, and transformers' loader (AutoModelForCausalLM on the
CPU) loads the exported folder with the fake-quant export's perplexity."""

from __future__ import annotations

import json
import math
import os
import warnings

import numpy as np
import pytest

import hiquant
from hiquant.calib import leading_windows, load_text, tokenize_text
from hiquant.datasets import embedded_calib_path, embedded_model_path, embedded_test_path
from hiquant.errors import InvalidArgumentError
from hiquant.evaluate import perplexity_of_text
from hiquant.export_compressed import (
    _config_groups,
    column_groups,
    compressed_layer_tensors,
    exact_group_size,
    layer_layout,
    pack_int32,
    unpack_int32,
)
from hiquant.model import load_model
from hiquant.storage import QuantizedLayer

SEQLEN, WINDOWS = 128, 8
SMALL = dict(n_calib=4, seqlen=64, backend="numpy", progress=False)
METHODS = {
    "rtn": dict(method="rtn", wbits=4, group_size=64),
    "gptq": dict(method="gptq", wbits=3, group_size=64),
    # hybrid layers: a b_H = 3 high part beside the W2 low part, 6-bit scale codes
    "hiq": dict(method="hiq", wbits=2, group_size=64, avg_bits=2.3, m_windows=4, lwc_iters=5,
                adaround_iters=5, block_epochs=1),
}


def _w(seed=0, shape=(48, 192)):
    return (np.random.default_rng(seed).standard_normal(shape) * 0.02).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Layout and packing, checked without the oracle

@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("shape", [(3, 32), (5, 37), (16, 200), (1, 1)])
def test_pack_int32_roundtrip_is_exact(bits, shape):
    codes = np.random.default_rng(bits).integers(0, 1 << bits, shape).astype(np.uint8)
    packed = pack_int32(codes, bits)
    assert packed.dtype == np.dtype("<i4")
    assert packed.shape == (shape[0], math.ceil(shape[1] * bits / 32))
    np.testing.assert_array_equal(unpack_int32(packed, bits, shape[1]), codes)


def test_pack_int32_refuses_codes_that_do_not_fit():
    with pytest.raises(InvalidArgumentError, match="does not fit in 3 bits"):
        pack_int32(np.full((2, 4), 8, np.uint8), 3)
    with pytest.raises(InvalidArgumentError, match="1..8-bit"):
        pack_int32(np.zeros((2, 4), np.uint8), 9)


def test_exact_group_size_is_the_largest_divisor_keeping_every_group_whole():
    rng = np.random.default_rng(0)
    for _ in range(200):
        d = int(rng.integers(1, 61))
        labels = np.repeat(rng.integers(0, 3, d), 1)
        labels = np.cumsum(rng.random(d) < 0.2)  # runs of equal labels
        G = exact_group_size(labels)
        brute = max(g for g in range(1, d + 1) if d % g == 0
                    and all(len(set(labels[i:i + g])) == 1 for i in range(0, d, g)))
        assert G == brute


@pytest.mark.parametrize("group,d_in,expect", [(64, 192, (64, "group")), (0, 192, (192, "channel")),
                                                (7, 192, (1, "group")), (48, 200, (8, "group")),
                                                (256, 192, (192, "channel"))])
def test_layers_without_high_columns_keep_hiquant_groups(group, d_in, expect):
    ql = QuantizedLayer.rtn("x", _w(shape=(16, d_in)), 3, group)
    lay = layer_layout(ql, allow_dense=False)
    assert lay["kind"] == "quantized" and lay["bits"] == 3
    assert (lay["group_size"], lay["strategy"]) == expect
    # the cheaper of the exact grouped layout and the dense weight is chosen
    chosen = layer_layout(ql)
    assert chosen["bytes"] == min(lay["bytes"], 16 * d_in * 2)
    assert chosen["kind"] == ("quantized" if lay["bytes"] <= 16 * d_in * 2 else "dense")


def test_hybrid_layer_with_scattered_high_columns_is_stored_dense_unless_forced():
    ql = QuantizedLayer.rtn("x", _w(), 2, 64, high_idx=[3, 50, 51, 130], b_high=4)
    lay = layer_layout(ql)
    assert lay["kind"] == "dense" and lay["bytes"] == 48 * 192 * 2
    forced = layer_layout(ql, allow_dense=False)
    assert forced["kind"] == "quantized" and forced["bits"] == 4 and forced["group_size"] == 1
    assert forced["bytes"] == lay["alternative_bytes"] > lay["bytes"]
    # high columns that fill whole aligned blocks keep a coarser exact group
    ql2 = QuantizedLayer.rtn("x", _w(), 2, 64, high_idx=list(range(64, 128)), b_high=4)
    assert layer_layout(ql2)["group_size"] == 64


def test_fp16_high_columns_are_stored_dense():
    ql = QuantizedLayer.rtn("x", _w(), 2, 64, high_idx=[1, 2], b_high=16)
    assert layer_layout(ql)["kind"] == "dense"


def test_column_groups_label_each_part_by_its_own_groups():
    ql = QuantizedLayer.rtn("x", _w(), 2, 64, high_idx=[0, 100, 191], b_high=3)
    part, group = column_groups(ql)
    assert part.tolist().count(1) == 3 and part[[0, 100, 191]].tolist() == [1, 1, 1]
    low = ql.low_idx()
    np.testing.assert_array_equal(group[low], np.arange(low.size) // 64)
    assert group[[0, 100, 191]].tolist() == [0, 0, 0]


# ------------------------------------------------------------------------------------------------
# compressed-tensors' own packing and decompression (the oracle)

def _scheme(layout: dict):
    from compressed_tensors.quantization import QuantizationScheme
    groups, _ = _config_groups({"m": layout})
    return QuantizationScheme.model_validate(groups["group_0"])


LAYERS = [  # (b_low, group, high columns, b_high, scale_bits)
    (2, 64, [], 0, 16), (3, 64, [], 0, 8), (4, 0, [], 0, 16), (3, 48, [], 0, 6), (2, 7, [], 0, 16),
    (2, 64, [3, 50, 51, 130], 3, 16), (2, 64, list(range(64, 128)), 4, 6), (3, 32, [0, 191], 4, 8),
]


@pytest.mark.parametrize("b_low,group,high,b_high,scale_bits", LAYERS)
def test_compressed_tensors_decompression_reproduces_hiquant_weights(b_low, group, high, b_high,
                                                                     scale_bits):
    torch = pytest.importorskip("torch")
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    W = _w(shape=(40, 192))
    ql = QuantizedLayer.rtn("m", W, b_low, group, high_idx=high, b_high=b_high,
                            scale_bits=scale_bits)
    layout = layer_layout(ql, allow_dense=False)
    t = compressed_layer_tensors(ql, layout)
    scheme = _scheme(layout)
    sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in t.items()}
    back = PackedQuantizationCompressor.decompress(sd, scheme)["weight"]
    exact = ql.dequantize()
    # float16 scales: (u - z) * s rounded once to float16; coded scales stored as float32: exact
    if layout["scale_dtype"] == "float16":
        np.testing.assert_array_equal(back.float().numpy(), exact.astype(np.float16).astype(np.float32))
    else:
        np.testing.assert_array_equal(back.numpy(), exact)
    # our packing is compressed-tensors' own, codes and zero points alike
    bits = layout["bits"]
    u = unpack_int32(t["weight_packed"], bits, 192)
    ref = pack_to_int32(torch.from_numpy(u.astype(np.int16) - (1 << (bits - 1))).to(torch.int8), bits)
    np.testing.assert_array_equal(ref.numpy(), t["weight_packed"])
    z = unpack_int32(np.ascontiguousarray(t["weight_zero_point"].T), bits, 40).T
    zref = pack_to_int32(torch.from_numpy(z.astype(np.int16) - (1 << (bits - 1))).to(torch.int8),
                         bits, packed_dim=0)
    np.testing.assert_array_equal(zref.numpy(), t["weight_zero_point"])


# ------------------------------------------------------------------------------------------------
# Whole models: transformers' loader

@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("compressed_export")
    out = {}
    for name, kw in METHODS.items():
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            hiquant.quantize(embedded_model_path(), embedded_calib_path(), out=root / name,
                             export="all", **SMALL, **kw)
        out[name] = (root / name, [str(x.message) for x in w])
    return out


def _transformers_ppl(folder) -> tuple[float, object]:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model.eval()
    tok = load_model(embedded_model_path()).tokenizer
    ids = tokenize_text(tok, load_text(embedded_test_path()), max_tokens=SEQLEN * WINDOWS)
    win = torch.from_numpy(np.asarray(leading_windows(ids, SEQLEN, WINDOWS), np.int64))
    losses = []
    with torch.no_grad():
        for row in win:
            logits = model(row[None]).logits[0, :-1].double()
            losses.append(float(torch.nn.functional.cross_entropy(logits, row[1:])))
    return math.exp(float(np.mean(losses))), model


@pytest.mark.parametrize("method", list(METHODS))
def test_transformers_loads_the_export_with_the_fake_exports_perplexity(exports, method):
    out, _ = exports[method]
    ppl_ct, model = _transformers_ppl(out / "compressed")
    ppl_fake = perplexity_of_text(load_model(out / "fake"), embedded_test_path(), SEQLEN, WINDOWS,
                                  progress=False)["ppl"]
    assert ppl_ct == pytest.approx(ppl_fake, rel=1e-3)
    # the decompressed weights are the fake export's float16 weights, bit for bit
    from safetensors.numpy import load_file
    fake = load_file(str(out / "fake" / "model.safetensors"))
    params = dict(model.named_parameters())
    for name, w in fake.items():
        if name.endswith("proj.weight"):
            np.testing.assert_array_equal(params[name].detach().numpy(), w.astype(np.float32))


@pytest.mark.parametrize("method", list(METHODS))
def test_decompressed_weights_equal_the_exact_dequantized_weights_within_float16_rounding(
        exports, method):
    pytest.importorskip("transformers")
    from hiquant.packed import load_packed
    out, _ = exports[method]
    _, model = _transformers_ppl(out / "compressed")
    exact = load_packed(out / "packed", packed_kernels=False)
    params = dict(model.named_parameters())
    for name in exact.linear_names():
        w = exact.get_weight(name)
        got = params[name + ".weight"].detach().numpy()
        # float16 rounding of the weight: half an ulp, relative 2**-11 (plus subnormal spacing)
        np.testing.assert_allclose(got, w, rtol=2.0 ** -11, atol=2.0 ** -25)


def test_export_reports_its_size_and_the_layout_of_every_layer(exports):
    for method, (out, _) in exports.items():
        summary = json.loads((out / "compressed" / "hiquant_export.json").read_text())
        acc = summary["accounting"]
        assert acc["file_bytes"] == os.path.getsize(out / "compressed" / "model.safetensors")
        assert acc["layers_quantized"] + acc["layers_dense"] == len(summary["layers"]) == 28
        if method in ("rtn", "gptq"):  # every layer quantized at hiquant's groups: the same bits
            assert acc["layers_dense"] == 0
            assert acc["bits_per_weight"] == pytest.approx(acc["hiquant_storage_bits_per_weight"],
                                                           rel=0.01)
        cfg = json.loads((out / "compressed" / "config.json").read_text())["quantization_config"]
        assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
        targeted = sum(len(g["targets"]) for g in cfg["config_groups"].values())
        assert targeted == acc["layers_quantized"]


def test_hybrid_layers_stored_dense_are_named_in_a_warning(exports):
    out, messages = exports["hiq"]
    summary = json.loads((out / "compressed" / "hiquant_export.json").read_text())
    dense = [n for n, lay in summary["layers"].items() if lay["kind"] == "dense"]
    if dense:
        assert any("stored dense" in m and "packed export" in m for m in messages)
    assert not any("stored dense" in m for m in exports["gptq"][1])


def test_compressed_export_with_activation_quantization_raises_before_any_work(tmp_path):
    with pytest.raises(InvalidArgumentError, match="abits"):
        hiquant.quantize(embedded_model_path(), embedded_calib_path(), out=tmp_path / "o",
                         export="compressed", method="rtn", wbits=4, abits=8, **SMALL)
    assert not (tmp_path / "o").exists()
