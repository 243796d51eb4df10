"""The packed form of a binarized layer (:class:`hiquant.storage.BinaryPart`, method ``billm``),
written by :mod:`hiquant.export` and read by :mod:`hiquant.packed` (format ``hiquant-packed``
version 2: binary layers were added within it; a reader without them refuses the layer by its
width ``b_low = 1``, never misreads it).

A binary layer ``NAME`` ``(d_out, d_in)`` with ``n_s`` salient columns in blocks of ``B`` columns
stores (bit arrays packed little-endian with :func:`numpy.packbits`, row-major):

* ``NAME.bin.sign``: ``d_out·d_in`` bits, the first sign of every weight (1 = +);
* ``NAME.bin.sign2``: ``d_out·n_s`` bits, the residual sign of the salient weights (salient
  columns in ascending order);
* ``NAME.bin.sparse``: ``d_out·(d_in − n_s)`` bits, the sparse-group membership of the other
  weights (1 = sparse, columns in ascending order);
* ``NAME.bin.salient_mask``: ``d_in`` bits;
* ``NAME.bin.alpha``: float16 ``(d_out, n_blocks, 2)``, α_c and α_s per row and block;
* ``NAME.bin.alpha_salient``: float16 ``(d_out, n_salient_blocks, 2)``, α₁ and α₂ per row for the
  blocks holding salient columns (ascending), absent when there are none.

The config entry has ``"binary": true``, ``"n_salient"``, ``b_low = 1``, ``k = 0`` and
``group_size = B``. The payload is exactly :func:`hiquant.storage.binary_storage_bits` up to one
padding byte per bit array.
"""

from __future__ import annotations

import numpy as np

from .errors import CheckpointError
from .storage import BinaryPart, QuantizedLayer

__all__ = ["binary_tensors", "binary_entry", "binary_from_tensors", "is_binary_entry"]


def _bits(a: np.ndarray) -> np.ndarray:
    return np.packbits(np.ascontiguousarray(a, bool).reshape(-1), bitorder="little")


def binary_tensors(ql: QuantizedLayer) -> dict:
    """The packed tensors of a binary layer, keyed by their safetensors names."""
    b = ql.binary
    out = {
        f"{ql.name}.bin.sign": _bits(b.sign),
        f"{ql.name}.bin.sign2": _bits(b.sign2),
        f"{ql.name}.bin.sparse": _bits(b.sparse),
        f"{ql.name}.bin.salient_mask": _bits(b.salient),
        f"{ql.name}.bin.alpha": np.ascontiguousarray(b.alpha[:, :, 2:]),
    }
    sb = b.salient_blocks()
    if sb.size:
        out[f"{ql.name}.bin.alpha_salient"] = np.ascontiguousarray(b.alpha[:, sb, :2])
    return out


def binary_entry(ql: QuantizedLayer) -> dict:
    return {"binary": True, "n_salient": ql.binary.n_salient}


def is_binary_entry(entry: dict) -> bool:
    return isinstance(entry, dict) and entry.get("binary") is True


def _unbits(t, n: int, shape, name: str, where: str) -> np.ndarray:
    if t is None:
        raise CheckpointError(f"{where}: tensor {name} is missing from the packed checkpoint")
    if t.dtype != np.uint8 or t.ndim != 1 or t.size != (n + 7) // 8:
        raise CheckpointError(f"{where}: {name} is {t.dtype}{t.shape}, expected "
                              f"uint8({(n + 7) // 8},) holding {n} bits")
    return np.unpackbits(t, count=n, bitorder="little").astype(bool).reshape(shape)


def binary_from_tensors(name: str, entry: dict, tensors: dict,
                        where: str = "packed checkpoint") -> QuantizedLayer:
    """Rebuild a binary layer from its config entry and packed tensors (validating both)."""
    try:
        d_out, d_in = int(entry["d_out"]), int(entry["d_in"])
        bs, ns = int(entry["group_size"]), int(entry["n_salient"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: binary layer {name} has a malformed entry ({e})") from None
    if d_out <= 0 or d_in <= 0 or bs <= 0 or not 0 <= ns <= d_in or int(entry.get("k", 0)):
        raise CheckpointError(f"{where}: binary layer {name} has impossible sizes d_out={d_out} "
                              f"d_in={d_in} block={bs} n_salient={ns}")
    g = tensors.get
    salient = _unbits(g(f"{name}.bin.salient_mask"), d_in, (d_in,), f"{name}.bin.salient_mask",
                      where)
    if int(salient.sum()) != ns:
        raise CheckpointError(f"{where}: {name}.bin.salient_mask marks {int(salient.sum())} "
                              f"columns, config says {ns}")
    sign = _unbits(g(f"{name}.bin.sign"), d_out * d_in, (d_out, d_in), f"{name}.bin.sign", where)
    sign2 = _unbits(g(f"{name}.bin.sign2"), d_out * ns, (d_out, ns), f"{name}.bin.sign2", where)
    sparse = _unbits(g(f"{name}.bin.sparse"), d_out * (d_in - ns), (d_out, d_in - ns),
                     f"{name}.bin.sparse", where)
    nb = -(-d_in // bs)
    sb = np.unique((np.arange(d_in) // bs)[salient])
    alpha = np.zeros((d_out, nb, 4), np.float16)
    a = g(f"{name}.bin.alpha")
    if a is None or a.dtype != np.float16 or a.shape != (d_out, nb, 2):
        raise CheckpointError(f"{where}: {name}.bin.alpha is missing or not "
                              f"float16{(d_out, nb, 2)}")
    alpha[:, :, 2:] = a
    if sb.size:
        a = g(f"{name}.bin.alpha_salient")
        if a is None or a.dtype != np.float16 or a.shape != (d_out, sb.size, 2):
            raise CheckpointError(f"{where}: {name}.bin.alpha_salient is missing or not "
                                  f"float16{(d_out, int(sb.size), 2)}")
        alpha[:, sb, :2] = a
    if not np.all(np.isfinite(alpha)) or np.any(alpha < 0):
        raise CheckpointError(f"{where}: {name} has negative or non-finite α's")
    part = BinaryPart(bs, salient, sign, sign2, sparse, alpha)
    return QuantizedLayer(name, d_out, d_in, np.zeros(0, np.int64), None, binary=part)
