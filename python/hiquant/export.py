"""Checkpoint export: fake-quant Hugging Face folders and hiquant's packed format.

Packed format (``format: "hiquant-packed", version 2``), one safetensors file ``model.safetensors``
plus ``quantization_config.json``:

* every quantized linear ``NAME`` (a Hugging Face tensor stem such as
  ``model.layers.0.self_attn.q_proj``) stores
  ``NAME.low.qweight`` (uint8, the low part's codes packed densely at b_low bits, row-major),
  ``NAME.low.scales`` (float16 ``(d_out, n_groups)``; with 8-bit scales uint8 codes
  ``(d_out, n_groups)``, with 6-bit scales the codes packed densely at 6 bits (1-D, row-major),
  either plus ``NAME.low.scales_super``, float16 ``(ceil(d_out / R),)`` for blocks of R rows, see
  :mod:`hiquant.storage`), ``NAME.low.qzeros``
  (uint8, zero points packed at b_low bits); the same under ``NAME.high.`` for a quantized high part, or
  ``NAME.high.weight`` (float16 ``(d_out, k)``) for an FP16 high part; and ``NAME.high_mask``
  (uint8, a d_in-bit little-endian mask of the high-impact columns) when ``k > 0``;
* every other tensor (embeddings, norms, ``lm_head``) is copied unchanged in its stored dtype;
* ``quantization_config.json`` lists each layer's shape, widths, group size, ``scale_bits``, ``k``
  and, with coded scales, ``scale_super_rows`` (R of each quantized part,
  ``{"low": R, "high": R}``), the method and its settings, and the bit accounting. The quantized
  tensors' payload is exactly ``sum(layer.storage_bits()) / 8`` bytes up to one padding byte per
  packed tensor; the only other bytes are the safetensors JSON header and the unquantized tensors.

Loading a packed folder gives back exactly the dequantized weights that hiquant evaluated.
Version 1 (a super-scale per row, R = 1 with no ``scale_super_rows``; 8-bit codes only) is still
read. 6-bit scale codes were added within version 2: a reader that knows only 16 and 8 refuses
them by their ``scale_bits`` rather than misreading them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from . import quantizer as qz
from ._atomic import atomic_dir
from .errors import CheckpointError
from .storage import SCALE_BITS, QuantizedLayer, QuantPart, n_super, super_rows

__all__ = ["PACKED_FORMAT", "layer_tensors", "layer_from_tensors", "layer_entry"]

PACKED_FORMAT = "hiquant-packed"
PACKED_VERSION = 2
READ_VERSIONS = (1, 2)  # version 1: 8-bit scales had a super-scale per row (super_rows == 1)


def _packs_scale_codes(scale_bits: int) -> bool:
    """Scale codes narrower than a byte (6-bit) are stored packed densely (1-D) like the weight
    codes, so the file holds the bits that storage_bits counts; 8-bit codes are a
    ``(d_out, n_groups)`` uint8 array, float16 scales as they are."""
    return scale_bits < 8


def _pack_part(prefix: str, part: QuantPart) -> dict:
    scales = part.scale
    if _packs_scale_codes(part.scale_bits):
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
    return entry


def _unpack_part(prefix: str, tensors: dict, d_out: int, n_cols: int, bits: int, group: int,
                 where: str, scale_bits: int = 16, rows: int | None = None) -> QuantPart:
    """``rows``: rows per super-scale of a part with coded (8- or 6-bit) scales; None: the
    default :func:`super_rows`. 6-bit scale codes are stored packed (1-D)."""
    try:
        qweight, scales, qzeros = (tensors[f"{prefix}.{s}"] for s in ("qweight", "scales", "qzeros"))
    except KeyError as e:
        raise CheckpointError(f"{where}: tensor {e.args[0]} is missing from the packed checkpoint") from None
    ng = qz.n_groups(n_cols, group) if n_cols else 0
    sdt = np.float16 if (scale_bits == 16 or not n_cols) else np.uint8  # empty part: float16 (d_out, 0)
    shape = (d_out, ng)
    if _packs_scale_codes(scale_bits) and n_cols:
        shape = (qz.packed_size(d_out * ng, scale_bits),)
    if scales.dtype != sdt or scales.shape != shape:
        raise CheckpointError(f"{where}: {prefix}.scales is {scales.dtype}{scales.shape}, expected "
                              f"{np.dtype(sdt).name}{shape}")
    if shape != (d_out, ng):
        scales = qz.unpack_codes(np.ascontiguousarray(scales), scale_bits, d_out * ng,
                                 shape=(d_out, ng))
    sup = None
    if scale_bits != 16 and n_cols:
        sup = tensors.get(f"{prefix}.scales_super")
        rows = super_rows(ng) if rows is None else rows
        nb = n_super(d_out, rows)
        if sup is None or sup.dtype != np.float16 or sup.shape != (nb,):
            raise CheckpointError(f"{where}: {prefix}.scales_super is missing or not "
                                  f"float16{(nb,)} ({d_out} rows in blocks of {rows})")
        if not np.all(np.isfinite(sup)) or np.any(sup <= 0) or np.any(scales == 0):
            raise CheckpointError(f"{where}: {prefix} has non-positive {scale_bits}-bit scales")
    try:
        codes = qz.unpack_codes(np.ascontiguousarray(qweight, np.uint8), bits, d_out * n_cols,
                                shape=(d_out, n_cols))
        zero = qz.unpack_codes(np.ascontiguousarray(qzeros, np.uint8), bits, d_out * ng,
                               shape=(d_out, ng))
    except ValueError as e:
        raise CheckpointError(f"{where}: {prefix}: {e}") from None
    if sup is None and scales.dtype == np.float16 and n_cols and (
            not np.all(np.isfinite(scales)) or np.any(scales <= 0)):
        raise CheckpointError(f"{where}: {prefix}.scales has non-positive or non-finite values")
    return QuantPart(bits, group, codes, scales, zero, sup, rows if sup is not None else None,
                     scale_code_bits=scale_bits if sup is not None else 8)


def layer_from_tensors(name: str, entry: dict, tensors: dict, where: str = "packed checkpoint",
                       version: int = PACKED_VERSION) -> QuantizedLayer:
    """Rebuild a QuantizedLayer from its config entry and packed tensors (validating both).
    ``version``: the packed format's version (1: a super-scale per row)."""
    try:
        d_out, d_in, k = int(entry["d_out"]), int(entry["d_in"]), int(entry["k"])
        b_low, group = int(entry["b_low"]), int(entry["group_size"])
        b_high = int(entry["b_high"]) if k else 0
        scale_bits = int(entry.get("scale_bits", 16))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: layer {name} has a malformed entry ({e})") from None
    if not (0 <= k <= d_in) or d_out <= 0 or d_in <= 0:
        raise CheckpointError(f"{where}: layer {name} has impossible sizes d_out={d_out} d_in={d_in} k={k}")
    if scale_bits not in SCALE_BITS or (version == 1 and scale_bits == 6):
        raise CheckpointError(f"{where}: layer {name} has scale_bits {scale_bits}; expected 16, 8 "
                              f"or 6 (6 from format version 2 on)")
    rows = _super_rows_of(name, entry, scale_bits, version, where)
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
    low = _unpack_part(f"{name}.low", tensors, d_out, d_in - k, b_low, group, where, scale_bits,
                       rows["low"])
    high = high16 = None
    if k:
        if b_high == 16:
            high16 = tensors.get(f"{name}.high.weight")
            if high16 is None or high16.dtype != np.float16 or high16.shape != (d_out, k):
                raise CheckpointError(f"{where}: {name}.high.weight is missing or not float16{(d_out, k)}")
        else:
            high = _unpack_part(f"{name}.high", tensors, d_out, k, b_high, group, where, scale_bits,
                                rows["high"])
    return QuantizedLayer(name, d_out, d_in, high_idx, low, high, high16)


def _super_rows_of(name, entry, scale_bits, version, where) -> dict:
    """Rows per super-scale of each part: 1 in version 1; the entry's ``scale_super_rows`` in
    version 2 (None, hiquant's default rule, when a part is not listed)."""
    rows = {"low": None, "high": None}
    if scale_bits == 16:
        return rows
    if version == 1:
        return {"low": 1, "high": 1}
    given = entry.get("scale_super_rows", {})
    if not isinstance(given, dict):
        raise CheckpointError(f"{where}: layer {name} has a malformed scale_super_rows {given!r}")
    for part, r in given.items():
        if part not in rows or isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise CheckpointError(f"{where}: layer {name} has a malformed scale_super_rows "
                                  f"{given!r}; expected positive integers under 'low' / 'high'")
        rows[part] = r
    return rows


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
    if cfg.get("version") not in READ_VERSIONS:
        raise CheckpointError(f"{p}: format version {cfg.get('version')} is not supported "
                              f"(this hiquant reads versions {', '.join(map(str, READ_VERSIONS))})")
    if not isinstance(cfg.get("layers"), dict):
        raise CheckpointError(f"{p}: missing the 'layers' table")
    return cfg


__all__ += ["atomic_dir", "copy_side_files", "read_quant_config"]


# ------------------------------------------------------------------------------------------------
# Whole checkpoints

_ST_OF_NUMPY = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32", np.dtype(np.uint8): "U8",
                np.dtype(np.int64): "I64", np.dtype(np.int32): "I32"}


def _source_tensors(model):
    """(name, stored dtype, shape, raw-bytes producer) of every tensor of the source checkpoint."""
    out = []
    for name, f in sorted(model._where.items()):
        t = f.tensors[name]
        out.append((name, t.dtype, tuple(t.shape), (lambda f=f, n=name: f.raw(n))))
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
    shutil.copy2(Path(model.path) / "config.json", folder / "config.json")
    copy_side_files(Path(model.path), folder)
    return {"path": str(folder), "bytes": size, "quantized_payload_bytes": int(quant_bytes),
            "payload_bits_per_weight": 8 * quant_bytes / n_weights}


def write_outputs(out, model, qlayers: dict, report, *, export: str = "both",
                  overwrite: bool = False) -> dict:
    """Everything a run writes, atomically: fake/ and/or packed/, report.json, report.md."""
    result = {"path": str(Path(out).absolute())}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        if export in ("fake", "both"):
            result["fake"] = write_fake_quant(tmp / "fake", model, qlayers)
        if export in ("packed", "both"):
            result["packed"] = write_packed(tmp / "packed", model, qlayers, report.settings)
        for k in ("fake", "packed"):
            if k in result:
                result[k]["path"] = str(Path(out).absolute() / k)
        report.output = result
        (tmp / "report.json").write_text(report.to_json())
        (tmp / "report.md").write_text(report.markdown())
    return result


class _PackedLinears:
    """Looks like a safetensors file to the model runtime: the quantized linears' weights,
    dequantized on demand (exactly) from the packed tensors, as float32."""

    def __init__(self, path: Path, qcfg: dict, st):
        from ._safetensors_io import TensorInfo
        self.path = path
        self._st = st
        self._entries = qcfg["layers"]
        self._version = qcfg["version"]
        self.tensors = {}
        for stem, e in self._entries.items():
            try:
                shape = (int(e["d_out"]), int(e["d_in"]))
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: layer {stem} has a malformed entry") from None
            self.tensors[stem + ".weight"] = TensorInfo(stem + ".weight", "F32", shape, 0, 4 * shape[0] * shape[1])

    def layer(self, stem: str) -> QuantizedLayer:
        prefix = stem + "."
        tensors = {n: self._st.array(n) for n in self._st.tensors if n.startswith(prefix)}
        return layer_from_tensors(stem, self._entries[stem], tensors, where=str(self._st.path),
                                  version=self._version)

    def array(self, name: str) -> np.ndarray:
        return self.layer(name[: -len(".weight")]).dequantize()

    raw = array


def load_packed(folder, *, compute_dtype="float32", weight_cache_bytes: int = 1 << 30):
    """Load a packed checkpoint as a hiquant Model. Its linear weights are the exact dequantized
    weights that were evaluated when it was exported (decoded lazily, one layer at a time)."""
    from . import model as M
    folder = Path(folder)
    qcfg = read_quant_config(folder)
    if qcfg is None:
        raise CheckpointError(f"{folder}: no quantization_config.json; not a packed checkpoint "
                              "(use hiquant.model.load_model for ordinary checkpoints)")
    cfg = M.parse_config(M._load_json(folder / "config.json", "config.json"), folder / "config.json")
    files, where = M._open_weights(folder)
    st = files["model.safetensors"] if "model.safetensors" in files else next(iter(files.values()))
    virtual = _PackedLinears(folder / "model.safetensors", qcfg, st)
    prefixes = tuple(stem + "." for stem in qcfg["layers"])
    where = {n: f for n, f in where.items() if not n.startswith(prefixes)}
    where.update({n: virtual for n in virtual.tensors})
    expected = M._expected_tensors(cfg)
    for name, shape in expected.items():
        if name not in where:
            raise CheckpointError(f"{folder}: tensor {name!r} is missing from the packed checkpoint")
        if tuple(where[name].tensors[name].shape) != tuple(shape):
            raise CheckpointError(f"{folder}: tensor {name!r} has shape {where[name].tensors[name].shape}, "
                                  f"config.json implies {shape}")
    extra = sorted(n for n in where if n not in expected)
    if extra:
        raise CheckpointError(f"{folder}: unexpected tensor {extra[0]!r}; the packed checkpoint "
                              "does not match config.json")
    raw_dtype = cfg.raw.get("dtype") or cfg.raw.get("torch_dtype") or "float16"
    import dataclasses
    cfg = dataclasses.replace(cfg, source_dtype=str(raw_dtype))
    tok = None
    if (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return M.Model(folder, cfg, files, where, tok, np.dtype(compute_dtype), weight_cache_bytes)


def open_checkpoint(path, **kw):
    """Load any checkpoint hiquant reads: a packed folder (quantization_config.json) through
    :func:`load_packed`, anything else through ``hiquant.model.load_model``."""
    if (Path(path) / "quantization_config.json").is_file():
        return load_packed(path, **kw)
    from .model import load_model
    return load_model(path, **kw)
