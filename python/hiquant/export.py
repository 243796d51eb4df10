"""Checkpoint export (the writers): fake-quant Hugging Face folders and hiquant's packed format.

* :func:`write_fake_quant`: the source folder with every quantized linear's weight replaced by
  its dequantized values in the source dtype (a normal Hugging Face checkpoint);
* :func:`write_packed`: hiquant's packed format (``model.safetensors`` +
  ``quantization_config.json``), defined in :mod:`hiquant.packed` with its reader
  (:func:`hiquant.packed.load_packed` loads exactly the dequantized weights hiquant evaluated);
* :func:`write_outputs`: both, the report and its Markdown, atomically.

Both writers stream the source tensors (``model.source_tensors()``, the runtime's tensor source)
one at a time, copying every unquantized tensor unchanged in its stored dtype.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from . import quantizer as qz
from ._atomic import atomic_dir
from .packed import PACKED_FORMAT, PACKED_VERSION, packs_scale_codes
from .storage import QuantizedLayer, QuantPart

__all__ = ["PACKED_FORMAT", "layer_tensors", "layer_entry", "write_fake_quant", "write_packed",
           "write_outputs"]

def _pack_part(prefix: str, part: QuantPart) -> dict:
    scales = part.scale
    if packs_scale_codes(part.scale_bits):
        scales = qz.pack_codes(part.scale, part.scale_bits)
    out = {
        f"{prefix}.qweight": qz.pack_codes(part.codes, part.bits),
        f"{prefix}.scales": scales,
        f"{prefix}.qzeros": qz.pack_codes(part.zero, part.bits),
    }
    if part.scale_super is not None:
        out[f"{prefix}.scales_super"] = part.scale_super
    return out


def layer_tensors(ql: QuantizedLayer) -> dict:
    """The packed tensors of one layer, keyed by their safetensors names."""
    if getattr(ql, "binary", None) is not None:  # billm (hiquant.packed_binary)
        from .packed_binary import binary_tensors
        return binary_tensors(ql)
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
    entry = {
        "d_out": ql.d_out, "d_in": ql.d_in, "k": ql.k,
        "b_low": ql.b_low, "b_high": ql.b_high if ql.k else None,
        "group_size": ql.group_size, "storage_bits": ql.storage_bits(),
        "scale_bits": ql.scale_bits,
    }
    rows = {nm: p.super_rows for nm, p in (("low", ql.low), ("high", ql.high))
            if p is not None and p.scale_super is not None}
    if rows:
        entry["scale_super_rows"] = rows
    if getattr(ql, "binary", None) is not None:
        from .packed_binary import binary_entry
        entry.update(binary_entry(ql))
    return entry


def copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer and generation files travel with every exported checkpoint."""
    for fname in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                  "generation_config.json", "tokenizer.model"):
        if (src / fname).is_file():
            shutil.copy2(src / fname, dst / fname)


__all__ += ["atomic_dir", "copy_side_files"]


# ------------------------------------------------------------------------------------------------
# Whole checkpoints

_ST_OF_NUMPY = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32", np.dtype(np.uint8): "U8",
                np.dtype(np.int64): "I64", np.dtype(np.int32): "I32"}


def _source_tensors(model):
    """(name, stored dtype, shape, raw-bytes producer) of every tensor of the source checkpoint,
    sorted by name (``model.source_tensors()``, the runtime's tensor source); norm weights that an
    equivalent transform changed (``model.modified_tensors()``: AWQ, SmoothQuant) are written in
    their stored dtype instead of the source's copy."""
    mods = model.modified_tensors()
    out = []
    for name, dtype, shape, raw in model.source_tensors():
        if name in mods:
            raw = (lambda v=mods[name], dtype=dtype: _to_stored_dtype(v, dtype))  # noqa: E731
        out.append((name, dtype, shape, raw))
    return out


def _to_stored_dtype(W: np.ndarray, dtype: str) -> np.ndarray:
    from ._safetensors_io import f32_to_bf16
    if dtype == "BF16":
        return f32_to_bf16(W)
    return W.astype({"F16": np.float16, "F32": np.float32, "F64": np.float64}[dtype])


def write_fake_quant(folder: Path, model, qlayers: dict) -> dict:
    """A Hugging Face folder: same config and tokenizer, dequantized weights in the source dtype."""
    from ._safetensors_io import write_streaming
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for name, dtype, shape, raw in _source_tensors(model):
        stem = name[: -len(".weight")] if name.endswith(".weight") else None
        if stem in qlayers:
            ql = qlayers[stem]
            entries.append((name, dtype, shape,
                            lambda ql=ql, dtype=dtype: _to_stored_dtype(ql.dequantize(), dtype)))
        else:
            entries.append((name, dtype, shape, raw))
    size = write_streaming(folder / "model.safetensors", entries, {"format": "pt"})
    shutil.copy2(Path(model.path) / "config.json", folder / "config.json")
    copy_side_files(Path(model.path), folder)
    return {"path": str(folder), "bytes": size}


def write_packed(folder: Path, model, qlayers: dict, report_settings: dict) -> dict:
    """hiquant's packed format (see the module docstring)."""
    from ._safetensors_io import write_streaming
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    quant_bytes = 0
    # The packed tensors are built twice per layer (once here for the header's shapes, once when
    # written) rather than all held at once: memory stays bounded by one layer's.
    current: dict = {}

    def packed(stem: str, tname: str):
        if current.get("stem") != stem:
            current.clear()
            current.update(stem=stem, tensors=layer_tensors(qlayers[stem]))
        return current["tensors"][tname]

    for name, dtype, shape, raw in _source_tensors(model):
        stem = name[: -len(".weight")] if name.endswith(".weight") else None
        if stem in qlayers:
            for tname, t in layer_tensors(qlayers[stem]).items():
                entries.append((tname, _ST_OF_NUMPY[t.dtype], t.shape,
                                (lambda stem=stem, tname=tname: packed(stem, tname))))
                quant_bytes += t.nbytes
        else:
            entries.append((name, dtype, shape, raw))
    size = write_streaming(folder / "model.safetensors", entries, {"format": "hiquant-packed"})
    total_bits = sum(ql.storage_bits() for ql in qlayers.values())
    n_weights = sum(ql.d_out * ql.d_in for ql in qlayers.values())
    cfg = {
        "format": PACKED_FORMAT, "version": PACKED_VERSION,
        "method": report_settings.get("method"), "settings": report_settings,
        "layers": {n: layer_entry(ql) for n, ql in qlayers.items()},
        "accounting": {"storage_bits": int(total_bits), "avg_bits": total_bits / n_weights,
                       "n_weights": int(n_weights), "quantized_payload_bytes": int(quant_bytes),
                       "file_bytes": int(size)},
    }
    (folder / "quantization_config.json").write_text(json.dumps(cfg, indent=1, default=str))
    # config.json names the format, so that no Hugging Face loader can mistake the folder for a
    # float checkpoint: transformers refuses an unknown quant_method with an error naming it
    # (transformers 5 loads an unknown quant_method with random weights and a warning, so the
    # model_type itself is hiquant's; the source's is kept for hiquant's loader)
    from .checkpoint import PACKED_MODEL_TYPE
    hf = json.loads((Path(model.path) / "config.json").read_text("utf-8"))
    hf["hiquant_source_model_type"] = hf.get("model_type")
    hf["model_type"] = PACKED_MODEL_TYPE
    hf["quantization_config"] = {"quant_method": "hiquant", "format": PACKED_FORMAT,
                                 "version": PACKED_VERSION,
                                 "load_with": "hiquant.load_packed(folder)"}
    (folder / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    copy_side_files(Path(model.path), folder)
    return {"path": str(folder), "bytes": size, "quantized_payload_bytes": int(quant_bytes),
            "payload_bits_per_weight": 8 * quant_bytes / n_weights}


def write_outputs(out, model, qlayers: dict, report, *, export: str = "both",
                  overwrite: bool = False) -> dict:
    """Everything a run writes, atomically: fake/ and/or packed/, report.json, report.md."""
    result = {"path": str(Path(out).absolute())}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        if export in ("fake", "both", "all"):
            result["fake"] = write_fake_quant(tmp / "fake", model, qlayers)
        if export in ("packed", "both", "all"):
            result["packed"] = write_packed(tmp / "packed", model, qlayers, report.settings)
        if export in ("compressed", "all"):
            from .export_compressed import write_compressed
            result["compressed"] = write_compressed(tmp / "compressed", model, qlayers,
                                                    report.settings)
        for k in ("fake", "packed", "compressed"):
            if k in result:
                result[k]["path"] = str(Path(out).absolute() / k)
        report.output = result
        (tmp / "report.json").write_text(report.to_json())
        (tmp / "report.md").write_text(report.markdown())
    return result
