"""Checkpoint export: fake-quant Hugging Face folders and hiquant's packed format.

Packed format (``format: "hiquant-packed", version 1``), one safetensors file ``model.safetensors``
plus ``quantization_config.json``:

* every quantized linear ``NAME`` (a Hugging Face tensor stem such as
  ``model.layers.0.self_attn.q_proj``) stores
  ``NAME.low.qweight`` (uint8, the low part's codes packed densely at b_low bits, row-major),
  ``NAME.low.scales`` (float16 ``(d_out, n_groups)``), ``NAME.low.qzeros`` (uint8, zero points
  packed at b_low bits); the same three under ``NAME.high.`` for a quantized high part, or
  ``NAME.high.weight`` (float16 ``(d_out, k)``) for an FP16 high part; and ``NAME.high_mask``
  (uint8, a d_in-bit little-endian mask of the high-impact columns) when ``k > 0``;
* every other tensor (embeddings, norms, ``lm_head``) is copied unchanged in its stored dtype;
* ``quantization_config.json`` lists each layer's shape, widths, group size and ``k``, the method
  and its settings, and the bit accounting. The quantized tensors' payload is exactly
  ``sum(layer.storage_bits()) / 8`` bytes up to one padding byte per packed tensor; the only other
  bytes are the safetensors JSON header and the unquantized tensors.

Loading a packed folder gives back exactly the dequantized weights that hiquant evaluated.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from . import quantizer as qz
from ._atomic import atomic_dir
from .errors import CheckpointError
from .layers import QuantizedLayer, QuantPart

__all__ = ["PACKED_FORMAT", "layer_tensors", "layer_from_tensors", "layer_entry"]

PACKED_FORMAT = "hiquant-packed"
PACKED_VERSION = 1


def _pack_part(prefix: str, part: QuantPart) -> dict:
    return {
        f"{prefix}.qweight": qz.pack_codes(part.codes, part.bits),
        f"{prefix}.scales": part.scale,
        f"{prefix}.qzeros": qz.pack_codes(part.zero, part.bits),
    }


def layer_tensors(ql: QuantizedLayer) -> dict:
    """The packed tensors of one layer, keyed by their safetensors names."""
    out = {}
    if ql.low is not None:
        out.update(_pack_part(f"{ql.name}.low", ql.low))
    if ql.k:
        mask = np.zeros(ql.d_in, np.uint8)
        mask[ql.high_idx] = 1
        out[f"{ql.name}.high_mask"] = np.packbits(mask, bitorder="little")
        if ql.high_fp16 is not None:
            out[f"{ql.name}.high.weight"] = np.ascontiguousarray(ql.high_fp16, np.float16)
        else:
            out.update(_pack_part(f"{ql.name}.high", ql.high))
    return out


def layer_entry(ql: QuantizedLayer) -> dict:
    return {
        "d_out": ql.d_out, "d_in": ql.d_in, "k": ql.k,
        "b_low": ql.b_low, "b_high": ql.b_high if ql.k else None,
        "group_size": ql.group_size, "storage_bits": ql.storage_bits(),
    }


def _unpack_part(prefix: str, tensors: dict, d_out: int, n_cols: int, bits: int, group: int,
                 where: str) -> QuantPart:
    try:
        qweight, scales, qzeros = (tensors[f"{prefix}.{s}"] for s in ("qweight", "scales", "qzeros"))
    except KeyError as e:
        raise CheckpointError(f"{where}: tensor {e.args[0]} is missing from the packed checkpoint") from None
    ng = qz.n_groups(n_cols, group) if n_cols else 0
    if scales.dtype != np.float16 or scales.shape != (d_out, ng):
        raise CheckpointError(f"{where}: {prefix}.scales is {scales.dtype}{scales.shape}, expected "
                              f"float16{(d_out, ng)}")
    try:
        codes = qz.unpack_codes(np.ascontiguousarray(qweight, np.uint8), bits, d_out * n_cols,
                                shape=(d_out, n_cols))
        zero = qz.unpack_codes(np.ascontiguousarray(qzeros, np.uint8), bits, d_out * ng,
                               shape=(d_out, ng))
    except ValueError as e:
        raise CheckpointError(f"{where}: {prefix}: {e}") from None
    return QuantPart(bits, group, codes, scales, zero)


def layer_from_tensors(name: str, entry: dict, tensors: dict, where: str = "packed checkpoint") -> QuantizedLayer:
    """Rebuild a QuantizedLayer from its config entry and packed tensors (validating both)."""
    try:
        d_out, d_in, k = int(entry["d_out"]), int(entry["d_in"]), int(entry["k"])
        b_low, group = int(entry["b_low"]), int(entry["group_size"])
        b_high = int(entry["b_high"]) if k else 0
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: layer {name} has a malformed entry ({e})") from None
    if not (0 <= k <= d_in) or d_out <= 0 or d_in <= 0:
        raise CheckpointError(f"{where}: layer {name} has impossible sizes d_out={d_out} d_in={d_in} k={k}")
    if b_low not in qz.PACK_BITS or (k and b_high not in (*qz.PACK_BITS, 16)):
        raise CheckpointError(f"{where}: layer {name} has unsupported widths {b_low}/{b_high}")
    high_idx = np.zeros(0, np.int64)
    if k:
        mask_t = tensors.get(f"{name}.high_mask")
        if mask_t is None or mask_t.dtype != np.uint8 or mask_t.size != (d_in + 7) // 8:
            raise CheckpointError(f"{where}: {name}.high_mask is missing or has the wrong size")
        mask = np.unpackbits(mask_t, bitorder="little")[:d_in]
        high_idx = np.flatnonzero(mask).astype(np.int64)
        if high_idx.size != k:
            raise CheckpointError(f"{where}: {name}.high_mask marks {high_idx.size} columns, config says {k}")
    low = _unpack_part(f"{name}.low", tensors, d_out, d_in - k, b_low, group, where)
    high = high16 = None
    if k:
        if b_high == 16:
            high16 = tensors.get(f"{name}.high.weight")
            if high16 is None or high16.dtype != np.float16 or high16.shape != (d_out, k):
                raise CheckpointError(f"{where}: {name}.high.weight is missing or not float16{(d_out, k)}")
        else:
            high = _unpack_part(f"{name}.high", tensors, d_out, k, b_high, group, where)
    return QuantizedLayer(name, d_out, d_in, high_idx, low, high, high16)


def copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer and generation files travel with every exported checkpoint."""
    for fname in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                  "generation_config.json", "tokenizer.model"):
        if (src / fname).is_file():
            shutil.copy2(src / fname, dst / fname)


def read_quant_config(folder: Path) -> dict | None:
    p = Path(folder) / "quantization_config.json"
    if not p.is_file():
        return None
    try:
        cfg = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p}: not valid JSON ({e}); re-export the checkpoint") from None
    if not isinstance(cfg, dict) or cfg.get("format") != PACKED_FORMAT:
        raise CheckpointError(f"{p}: not a {PACKED_FORMAT} config")
    if cfg.get("version") != PACKED_VERSION:
        raise CheckpointError(f"{p}: format version {cfg.get('version')} is not supported "
                              f"(this hiquant reads version {PACKED_VERSION})")
    if not isinstance(cfg.get("layers"), dict):
        raise CheckpointError(f"{p}: missing the 'layers' table")
    return cfg


__all__ += ["atomic_dir", "copy_side_files", "read_quant_config"]
