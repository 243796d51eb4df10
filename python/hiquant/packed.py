"""hiquant's packed format, and its reader: :func:`load_packed`, :func:`open_checkpoint`.

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

Loading a packed folder gives back exactly the dequantized weights that hiquant evaluated: the
model is loaded by :func:`hiquant.model.load_model` with the packed layers as its
``linear_source`` (each decoded from its packed tensors when its block is expanded); the other
tensors are read from the file as in any checkpoint. The writers are in :mod:`hiquant.export`.
Binarized layers (method ``billm``, ``"binary": true`` in their entry) were added within version 2;
their tensors are described in :mod:`hiquant.packed_binary`.
Version 1 (a super-scale per row, R = 1 with no ``scale_super_rows``; 8-bit codes only) is still
read. 6-bit scale codes were added within version 2: a reader that knows only 16 and 8 refuses
them by their ``scale_bits`` rather than misreading them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import quantizer as qz
from .checkpoint import open_weights
from .errors import CheckpointError, InvalidArgumentError
from .storage import SCALE_BITS, QuantizedLayer, QuantPart, n_super, super_rows

__all__ = [
    "PACKED_FORMAT",
    "PACKED_VERSION",
    "READ_VERSIONS",
    "layer_from_tensors",
    "read_quant_config",
    "load_packed",
    "open_checkpoint",
]

PACKED_FORMAT = "hiquant-packed"
PACKED_VERSION = 2
READ_VERSIONS = (1, 2)  # version 1: 8-bit scales had a super-scale per row (super_rows == 1)


def packs_scale_codes(scale_bits: int) -> bool:
    """Scale codes narrower than a byte (6-bit) are stored packed densely (1-D) like the weight
    codes, so the file holds the bits that storage_bits counts; 8-bit codes are a
    ``(d_out, n_groups)`` uint8 array, float16 scales as they are."""
    return scale_bits < 8


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
    if packs_scale_codes(scale_bits) and n_cols:
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
    from .packed_binary import binary_from_tensors, is_binary_entry
    if is_binary_entry(entry) and version >= 2:  # billm (hiquant.packed_binary)
        return binary_from_tensors(name, entry, tensors, where)
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


class _PackedLayer:
    """One packed layer as ``load_model``'s ``linear_source`` takes it: its shape, and its exact
    dequantized weight decoded from the packed tensors each time it is asked for (the model's
    weight cache keeps the expanded block)."""

    __slots__ = ("name", "d_out", "d_in", "entry", "tensors", "where", "version", "tables")

    def __init__(self, name: str, entry: dict, tensors: dict, where: str, version: int,
                 tables: str = "float32"):
        try:
            self.d_out, self.d_in = int(entry["d_out"]), int(entry["d_in"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{where}: layer {name} has a malformed entry") from None
        self.name, self.entry, self.where, self.version = name, entry, where, version
        self.tensors = tensors  # tensor name → SafetensorsFile holding it
        self.tables = tables    # the table kernel's tables (PackedLinear's ``tables``)

    def layer(self) -> QuantizedLayer:
        tensors = {n: f.array(n) for n, f in self.tensors.items()}
        return layer_from_tensors(self.name, self.entry, tensors, where=self.where,
                                  version=self.version)

    def dequantize(self) -> np.ndarray:
        return self.layer().dequantize()

    def operator(self):
        """The layer as a :class:`hiquant.packed_matmul.PackedLinear` on the packed tensors
        themselves (memory-mapped, validated, never unpacked into a kept copy). None for a
        binary (billm) layer: the packed kernels do not multiply binary layers, which are used
        dense (decoded into the weight cache)."""
        from .packed_binary import is_binary_entry
        if is_binary_entry(self.entry):
            return None
        from .packed_matmul import PackedLinear
        tensors = {n: f.array(n) for n, f in self.tensors.items()}
        return PackedLinear.from_tensors(self.name, self.entry, tensors, version=self.version,
                                         where=self.where, tables=self.tables)


def load_packed(folder, *, compute_dtype="float32", weight_cache_bytes: int = 1 << 30,
                load_tokenizer: bool = True, packed_kernels: bool = True,
                decode_tables: str = "float32"):
    """Load a packed checkpoint as a hiquant :class:`~hiquant.model.Model`. Its linear weights
    are the exact dequantized weights that were evaluated when it was exported; everything else
    is read as :func:`hiquant.model.load_model` reads any checkpoint, with the same checks and
    CheckpointErrors. A model quantized with activation quantization (settings ``abits``) comes
    back with it on (:meth:`~hiquant.model.Model.set_activation_bits`).

    ``packed_kernels=True`` (the default): the forward pass multiplies straight from the packed
    bytes (:class:`hiquant.packed_matmul.PackedLinear`, the native kernels), so the model holds
    no float copy of a linear weight; the products equal dequantize-then-multiply within
    float32 rounding. Backward passes, :meth:`~hiquant.model.Model.get_weight` and layers
    replaced by ``set_weight`` use dequantized float weights (decoded one block at a time into
    the weight cache), as every layer does with ``packed_kernels=False``.

    ``decode_tables``: the tables of the decode table kernel. ``"float32"`` (the default) keeps
    decode exact as above; ``"int8"`` (T-MAC's route, opt-in) runs decode products (up to 8
    tokens: a step of up to 8 sequences) about 2-3x faster on 2-, 3- and 4-bit layers, at the
    error of 8-bit activations (see :mod:`hiquant.packed_matmul`); prefill and evaluation of
    longer sequences stay exact."""
    from .model import load_model
    from .packed_matmul import TABLES
    if decode_tables not in TABLES:
        raise InvalidArgumentError(f"decode_tables must be one of {TABLES}, got "
                                   f"{decode_tables!r}")
    folder = Path(folder)
    qcfg = read_quant_config(folder)
    if qcfg is None:
        raise CheckpointError(f"{folder}: no quantization_config.json; not a packed checkpoint "
                              "(use hiquant.load_model for ordinary checkpoints)")
    _, where = open_weights(folder)
    source = {}
    for stem, entry in qcfg["layers"].items():
        tensors = {n: f for n, f in where.items() if n.startswith(stem + ".")}
        source[stem] = _PackedLayer(stem, entry, tensors, str(folder / "model.safetensors"),
                                    qcfg["version"], decode_tables)
    model = load_model(folder, compute_dtype=compute_dtype, weight_cache_bytes=weight_cache_bytes,
                       load_tokenizer=load_tokenizer, linear_source=source,
                       packed_kernels=packed_kernels)
    abits = (qcfg.get("settings") or {}).get("abits")
    if abits is not None:
        model.set_activation_bits(abits)
    return model


def is_packed_folder(path) -> bool:
    """Whether ``path`` is a packed export (holds quantization_config.json)."""
    return (Path(path) / "quantization_config.json").is_file()


def open_checkpoint(path, **kw):
    """Load any checkpoint hiquant reads: a packed folder (quantization_config.json) through
    :func:`load_packed`, anything else through :func:`hiquant.model.load_model`."""
    if is_packed_folder(path):
        return load_packed(path, **kw)
    from .model import load_model
    return load_model(path, **kw)
