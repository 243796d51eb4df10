"""Export to compressed-tensors ``pack-quantized``: a folder that transformers and vLLM load.

Why this format. For grouped asymmetric 2–4-bit integer weights the two candidates are
GPTQ-format checkpoints and compressed-tensors. transformers 5 loads GPTQ checkpoints only
through ``optimum`` + ``gptqmodel`` (a source distribution with native kernels), while it loads
compressed-tensors through the small pure-Python ``compressed-tensors`` package, on the CPU
(the packed weights are decompressed with plain torch ops), and vLLM serves the same folders with
its WNA16 kernels. compressed-tensors' ``pack-quantized`` format holds, per linear layer:

* ``weight_packed``: int32 ``(d_out, ceil(d_in * b / 32))``, each row a dense little-endian bit
  stream of the codes (code ``u`` in ``0..2**b - 1`` is stored as ``u``; compressed-tensors reads
  it as the signed value ``u - 2**(b-1)``);
* ``weight_scale``: ``(d_out, d_in / G)`` (strategy ``group``) or ``(d_out, 1)`` (``channel``),
  in a float dtype; the decompressed weight is computed in that dtype, then cast to the model's;
* ``weight_zero_point``: the zero points, packed like the codes but along the rows (int32
  ``(ceil(d_out * b / 32), n_groups)``, stored as ``z``, read as ``z - 2**(b-1)``);
* ``weight_shape``: int64 ``[d_out, d_in]``;

with ``num_bits`` and the group size set per config group, each config group naming its modules
in ``targets``, so layers of different widths live in one folder. Decompression is
``(q - zp) * scale = (u - z) * scale``: hiquant's grid exactly.

What the format cannot hold, and what this writer does. Groups are ``G`` *consecutive* columns,
``d_in`` divisible by ``G``, one group size per module (compressed-tensors >= 0.15 removed the
``g_idx`` column-to-group map, "actorder: group"; 0.20 rejects it in the config). hiquant's
layers are mapped exactly, each with the cheapest exact layout:

* a layer without high-impact columns (rtn, gptq, awq, lwc, adaround, hiq layers at ratio 0):
  ``G = g`` when ``g`` divides ``d_in`` (``channel`` when ``g = 0``), else the largest divisor of
  ``d_in`` that keeps every hiquant group whole (``gcd(g, d_in)``), its scale and zero point
  repeated;
* a hybrid layer (``k`` high-impact columns at ``b_H``, the rest at ``b_L``): a ``b_L``-bit
  asymmetric grid is a subset of the ``b_H``-bit grid with the same scale and zero point, so the
  whole layer is written at ``max(b_L, b_H)`` bits without loss, with ``G`` the largest divisor of
  ``d_in`` such that every block of ``G`` consecutive columns lies in a single hiquant group of a
  single part. The high-impact columns are scattered, so ``G`` is usually 1 or 2 and the scales
  cost more than the weights; when that layout is larger than the dense weight in the source
  dtype, the layer is written dense instead (its dequantized weights in the source dtype, exactly
  what the fake-quant export holds) and listed in ``ignore``. hiquant's own packed export keeps
  hybrid layers at their counted bits; this export states its size per layer in
  ``hiquant_export.json``;
* high-impact columns kept in float16 (``fp16-retention``): dense, as above.

Scales: hiquant's float16 scales are stored as float16 (exact). Double-quantized scales (6- or
8-bit codes times a float16 super-scale, exact in float32 but not always in float16) are stored as
float32, so nothing is rounded: transformers computes ``(u - z) * scale`` in the scale's dtype and
rounds once to the model's dtype, giving bit for bit the fake-quant export's weights.
Activation quantization (``abits``) is not written: use the fake or packed export.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from .errors import InvalidArgumentError
from .storage import QuantizedLayer

__all__ = ["CT_FORMAT", "COMPRESSED_DIR", "column_groups", "exact_group_size", "layer_layout",
           "pack_int32", "unpack_int32", "compressed_layer_tensors", "write_compressed"]

CT_FORMAT = "pack-quantized"
COMPRESSED_DIR = "compressed"
_BITS_OF = {"F16": 16, "BF16": 16, "F32": 32, "F64": 64}


def pack_int32(codes: np.ndarray, bits: int, rows_per_chunk: int = 1024) -> np.ndarray:
    """compressed-tensors' dense packing: each row of uint8 ``codes`` (R, C), all < 2**bits, as
    a little-endian bit stream in ``ceil(C * bits / 32)`` int32 words (element i at bit i*bits)."""
    codes = np.ascontiguousarray(codes, np.uint8)
    if codes.ndim != 2:
        raise InvalidArgumentError(f"codes must be 2-D, got shape {codes.shape}")
    if not 1 <= int(bits) <= 8:
        raise InvalidArgumentError(f"compressed-tensors packs 1..8-bit codes, got {bits}")
    if codes.size and int(codes.max()) >= 1 << bits:
        raise InvalidArgumentError(f"a code does not fit in {bits} bits")
    R, C = codes.shape
    words = -(-C * bits // 32)
    out = np.empty((R, words), "<i4")
    shifts = np.arange(bits, dtype=np.uint8)
    for r0 in range(0, R, rows_per_chunk):  # bounded memory: bits bytes per code of a chunk
        chunk = codes[r0:r0 + rows_per_chunk]
        bitarr = ((chunk[:, :, None] >> shifts) & 1).reshape(chunk.shape[0], C * bits)
        pad = np.zeros((chunk.shape[0], words * 32 - C * bits), np.uint8)
        by = np.packbits(np.concatenate([bitarr, pad], axis=1), axis=1, bitorder="little")
        out[r0:r0 + chunk.shape[0]] = by.view("<i4")
    return out


def unpack_int32(packed: np.ndarray, bits: int, n_cols: int) -> np.ndarray:
    """Inverse of :func:`pack_int32`: uint8 codes (R, n_cols)."""
    packed = np.ascontiguousarray(packed, "<i4")
    by = packed.view(np.uint8)
    bitarr = np.unpackbits(by, axis=1, bitorder="little")[:, : n_cols * bits]
    bitarr = bitarr.reshape(packed.shape[0], n_cols, bits)
    return (bitarr << np.arange(bits, dtype=np.uint8)).sum(axis=2, dtype=np.uint32).astype(np.uint8)


def _part_groups(n: int, group_size: int) -> np.ndarray:
    """Group index of each of a part's ``n`` columns (hiquant's groups: consecutive columns of the
    part, the last one shorter; ``g <= 0``: one group)."""
    if group_size <= 0 or group_size >= n:
        return np.zeros(n, np.int64)
    return np.arange(n, dtype=np.int64) // group_size


def column_groups(ql: QuantizedLayer) -> tuple[np.ndarray, np.ndarray]:
    """Per input column: (part, 0 low / 1 high; group index within its part)."""
    part = np.zeros(ql.d_in, np.int64)
    group = np.zeros(ql.d_in, np.int64)
    low = ql.low_idx()
    if low.size:
        group[low] = _part_groups(low.size, ql.low.group_size)
    if ql.k:
        part[ql.high_idx] = 1
        group[ql.high_idx] = _part_groups(ql.k, ql.high.group_size if ql.high is not None
                                          else ql.group_size)
    return part, group


def exact_group_size(labels: np.ndarray) -> int:
    """The largest divisor G of ``len(labels)`` such that ``labels`` is constant on every block of
    G consecutive entries (1 always qualifies)."""
    d = int(labels.size)
    for G in sorted((x for x in range(1, d + 1) if d % x == 0), reverse=True):
        blocks = labels.reshape(d // G, G)
        if np.all(blocks == blocks[:, :1]):
            return G
    return 1


def layer_layout(ql: QuantizedLayer, source_bits: int = 16, *, allow_dense: bool = True) -> dict:
    """How :func:`write_compressed` stores ``ql``: ``{"kind": "quantized", "bits", "group_size",
    "strategy", "scale_dtype", "bytes"}`` or ``{"kind": "dense", "bytes", "reason"}``, with the
    bytes of the other choice as ``alternative_bytes`` where there is one. ``allow_dense=False``
    gives the exact grouped layout even where it is larger than the dense weight."""
    dense = ql.d_out * ql.d_in * source_bits // 8
    if getattr(ql, "binary", None) is not None:  # billm's binarized layers: no integer grid
        return {"kind": "dense", "bytes": dense, "reason": "binarized (billm) layer"}
    if ql.high_fp16 is not None:
        return {"kind": "dense", "bytes": dense, "reason": "high-impact columns kept in float16"}
    if ql.d_in == 0 or ql.d_out == 0:
        raise InvalidArgumentError(f"{ql.name}: an empty layer ({ql.d_out} x {ql.d_in}) cannot be "
                                   "exported")
    part, group = column_groups(ql)
    labels = part * (ql.d_in + 1) + group
    G = exact_group_size(labels)
    bits = max(ql.b_low if ql.low is not None and ql.low.codes.size else 0,
               ql.b_high if ql.k else 0)
    parts = [p for p in (ql.low, ql.high) if p is not None and p.codes.size]
    scale_dtype = "float16" if all(p.scale_super is None for p in parts) else "float32"
    ng = ql.d_in // G
    nbytes = (4 * ql.d_out * -(-ql.d_in * bits // 32)  # weight_packed
              + ql.d_out * ng * (2 if scale_dtype == "float16" else 4)  # weight_scale
              + 4 * -(-ql.d_out * bits // 32) * ng  # weight_zero_point
              + 16)  # weight_shape
    quant = {"kind": "quantized", "bits": int(bits), "group_size": int(G),
             "strategy": "channel" if G == ql.d_in else "group", "scale_dtype": scale_dtype,
             "bytes": int(nbytes), "alternative_bytes": int(dense)}
    if nbytes <= dense or not allow_dense:
        return quant
    return {"kind": "dense", "bytes": int(dense), "alternative_bytes": int(nbytes),
            "reason": f"the exact grouped layout needs groups of {G} columns ({nbytes} bytes at "
                      f"{bits} bits), more than the dense weight"}


def compressed_layer_tensors(ql: QuantizedLayer, layout: dict) -> dict:
    """The compressed-tensors tensors of one layer laid out as ``layout`` (quantized kind),
    keyed by their names without the module prefix."""
    bits, G = layout["bits"], layout["group_size"]
    ng = ql.d_in // G
    codes = np.empty((ql.d_out, ql.d_in), np.uint8)
    scale = np.empty((ql.d_out, ng), np.float32)
    zero = np.empty((ql.d_out, ng), np.uint8)
    part, group = column_groups(ql)
    first = np.arange(ng) * G  # the first column of each compressed-tensors group
    for p_id, p, cols in ((0, ql.low, ql.low_idx()), (1, ql.high, ql.high_idx)):
        if p is None or cols.size == 0:
            continue
        codes[:, cols] = p.codes
        sel = part[first] == p_id
        sf = p.scale_f32()
        scale[:, sel] = sf[:, group[first[sel]]]
        zero[:, sel] = p.zero[:, group[first[sel]]]
    sdt = np.float16 if layout["scale_dtype"] == "float16" else np.float32
    scale_out = scale.astype(sdt)
    if not np.array_equal(scale_out.astype(np.float32), scale):
        raise InvalidArgumentError(f"{ql.name}: a scale is not representable in "
                                   f"{layout['scale_dtype']}")
    return {
        "weight_packed": pack_int32(codes, bits),
        "weight_scale": scale_out,
        "weight_zero_point": np.ascontiguousarray(pack_int32(np.ascontiguousarray(zero.T), bits).T),
        "weight_shape": np.array([ql.d_out, ql.d_in], np.int64),
    }


def _config_groups(layouts: dict) -> tuple[dict, list]:
    """compressed-tensors' config_groups (one per distinct bits/group size/strategy, targets the
    modules' exact names) and the ignore list (the dense layers)."""
    by_scheme: dict = {}
    ignore = []
    for name, lay in layouts.items():
        if lay["kind"] == "dense":
            ignore.append(name)
            continue
        key = (lay["bits"], lay["strategy"], lay["group_size"] if lay["strategy"] == "group" else None)
        by_scheme.setdefault(key, []).append(name)
    groups = {}
    for i, ((bits, strategy, gsize), names) in enumerate(sorted(by_scheme.items(),
                                                                 key=lambda kv: str(kv[0]))):
        weights = {"num_bits": int(bits), "type": "int", "symmetric": False, "strategy": strategy,
                   "group_size": gsize, "dynamic": False, "observer": "minmax",
                   "zp_dtype": "torch.int8"}
        groups[f"group_{i}"] = {"targets": sorted(names), "weights": weights,
                                "input_activations": None, "output_activations": None,
                                "format": CT_FORMAT}
    return groups, sorted(ignore)


def write_compressed(folder: Path, model, qlayers: dict, report_settings: dict) -> dict:
    """A compressed-tensors ``pack-quantized`` folder (see the module docstring):
    ``model.safetensors``, ``config.json`` with its ``quantization_config``, the tokenizer files,
    and ``hiquant_export.json`` (the layout and bytes of every layer)."""
    from ._safetensors_io import write_streaming
    from .export import _source_tensors, _to_stored_dtype, copy_side_files
    if report_settings.get("abits"):
        raise InvalidArgumentError(
            f"the compressed-tensors export holds the weights only, not the activation "
            f"quantization (abits={report_settings['abits']}); use export='packed' (which keeps it) "
            "or quantize without abits")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sources = _source_tensors(model)
    layouts = {}
    for name, dtype, _shape, _raw in sources:
        stem = name[: -len(".weight")] if name.endswith(".weight") else None
        if stem in qlayers:
            layouts[stem] = layer_layout(qlayers[stem], _BITS_OF.get(dtype, 16))
    missing = sorted(set(qlayers) - set(layouts))
    if missing:
        raise InvalidArgumentError(f"quantized layers {missing[:3]} have no weight in the source "
                                   "checkpoint; export the model they were quantized from")
    current: dict = {}

    def tensor(stem: str, key: str):
        if current.get("stem") != stem:  # one layer's tensors held at a time
            current.clear()
            current.update(stem=stem, t=compressed_layer_tensors(qlayers[stem], layouts[stem]))
        return current["t"][key]

    entries = []
    for name, dtype, shape, raw in sources:
        stem = name[: -len(".weight")] if name.endswith(".weight") else None
        if stem in layouts and layouts[stem]["kind"] == "quantized":
            lay, ql = layouts[stem], qlayers[stem]
            b, ng = lay["bits"], ql.d_in // lay["group_size"]
            shapes = {"weight_packed": ("I32", (ql.d_out, -(-ql.d_in * b // 32))),
                      "weight_scale": ("F16" if lay["scale_dtype"] == "float16" else "F32",
                                       (ql.d_out, ng)),
                      "weight_zero_point": ("I32", (-(-ql.d_out * b // 32), ng)),
                      "weight_shape": ("I64", (2,))}
            for key, (dt, shp) in shapes.items():
                entries.append((f"{stem}.{key}", dt, shp, lambda s=stem, k=key: tensor(s, k)))
        elif stem in layouts:
            entries.append((name, dtype, shape,
                            lambda ql=qlayers[stem], dt=dtype: _to_stored_dtype(ql.dequantize(), dt)))
        else:
            entries.append((name, dtype, shape, raw))
    entries.sort(key=lambda e: e[0])
    size = write_streaming(folder / "model.safetensors", entries, {"format": "pt"})

    groups, ignore = _config_groups(layouts)
    if ignore:
        warnings.warn(
            f"compressed-tensors export: {len(ignore)} of {len(layouts)} quantized layers are "
            "stored dense in the source dtype (exact, but 16 bits per weight): their high-impact "
            "columns are scattered and the format has no column-to-group map; use the packed "
            "export for hiquant's counted bits, or a method without high-impact columns (gptq, "
            "rtn, awq) for a compact compressed-tensors export", stacklevel=2)
    hf = json.loads((Path(model.path) / "config.json").read_text("utf-8"))
    hf["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": CT_FORMAT,
        "quantization_status": "compressed", "config_groups": groups,
        "ignore": ignore + ["lm_head"], "kv_cache_scheme": None,
        "global_compression_ratio": None,
        # transformers' default (compressed) route builds the modules on the meta device, where
        # compressed-tensors leaves an asymmetric layer's zero points unpacked, so a real
        # checkpoint's packed zero points are refused as a size mismatch (llm-compressor issue
        # #1618); its `dequantize` route decompresses the stored tensors while loading. vLLM
        # reads neither key.
        "dequantize": True,
    }
    (folder / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    copy_side_files(Path(model.path), folder)
    n_weights = sum(ql.d_out * ql.d_in for ql in qlayers.values())
    layer_bytes = sum(lay["bytes"] for lay in layouts.values())
    summary = {
        "format": f"compressed-tensors {CT_FORMAT}", "method": report_settings.get("method"),
        "layers": layouts,
        "accounting": {
            "file_bytes": int(size), "quantized_layer_bytes": int(layer_bytes),
            "bits_per_weight": 8 * layer_bytes / n_weights, "n_weights": int(n_weights),
            "hiquant_storage_bits_per_weight":
                sum(ql.storage_bits() for ql in qlayers.values()) / n_weights,
            "layers_quantized": sum(lay["kind"] == "quantized" for lay in layouts.values()),
            "layers_dense": len(ignore)},
    }
    (folder / "hiquant_export.json").write_text(json.dumps(summary, indent=1))
    return {"path": str(folder), "bytes": int(size), **{k: summary["accounting"][k] for k in
            ("bits_per_weight", "layers_quantized", "layers_dense")}}

