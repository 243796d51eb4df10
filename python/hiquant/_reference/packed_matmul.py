"""Float64 NumPy twin of the packed-format matrix product (cpp/src/packed_matmul.cpp).

Takes the same parts as ``hiquant._core.PackedMatrix`` (dicts of packed buffers, see
:mod:`hiquant.packed_matmul`), unpacks the bit streams with its own NumPy code, forms the weight in
float64 and multiplies. :func:`error_bound` gives the scale of the float32 rounding error a kernel
may make: per row and token, ``sum_j s_g (code_j + zero_g) |x_j|`` (the code sums and the
zero-point correction are each of that size), plus ``sum_j |w_j x_j|`` for float16 values.
"""

from __future__ import annotations

import numpy as np


def unpack_bits(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """``n`` codes of ``bits`` bits from a dense little-endian stream, as int64."""
    stream = np.unpackbits(np.asarray(packed, np.uint8), bitorder="little")
    b = stream[: n * bits].reshape(n, bits).astype(np.int64)
    return (b << np.arange(bits, dtype=np.int64)).sum(axis=1)


def _n_groups(n_cols: int, group_size: int) -> int:
    if n_cols == 0:
        return 0
    return 1 if (group_size <= 0 or group_size >= n_cols) else -(-n_cols // group_size)


def _part_arrays(d_out: int, p: dict):
    """(codes (d_out, n), scale per column (d_out, n), zero per column (d_out, n)) in float64,
    or (float16 values as float64, None, None)."""
    n, bits = int(p["n_cols"]), int(p["bits"])
    if bits == 16:
        return np.asarray(p["weight"], np.float16).reshape(d_out, n).astype(np.float64), None, None
    g = int(p["group_size"])
    ng = _n_groups(n, g)
    gsz = n if (g <= 0 or g >= n) else g
    codes = unpack_bits(p["qweight"], bits, d_out * n).reshape(d_out, n).astype(np.float64)
    zero = unpack_bits(p["qzeros"], bits, d_out * ng).reshape(d_out, ng).astype(np.float64)
    sb = int(p["scale_bits"])
    if sb == 16:
        scale = np.asarray(p["scales"], np.float16).reshape(d_out, ng).astype(np.float64)
    else:
        c = (np.asarray(p["scales"], np.uint8).reshape(d_out, ng) if sb == 8
             else unpack_bits(p["scales"], 6, d_out * ng).reshape(d_out, ng))
        sup = np.asarray(p["scales_super"], np.float16).astype(np.float64)
        rows = int(p["super_rows"])
        # S * c in float32 is exact (an 11-bit by 8-bit product), so float64 gives the same value
        scale = sup[np.arange(d_out) // rows][:, None] * c.astype(np.float64)
    col_group = np.arange(n) // gsz
    return codes, scale[:, col_group], zero[:, col_group]


def _cols(p: dict, d_in: int) -> np.ndarray:
    n = int(p["n_cols"])
    return np.arange(n) if p.get("cols") is None else np.asarray(p["cols"], np.int64)


def dequantize_parts(d_out: int, d_in: int, parts: list[dict]) -> np.ndarray:
    """The float64 weight (d_out, d_in) the parts describe (columns no part covers are 0)."""
    W = np.zeros((d_out, d_in), np.float64)
    for p in parts:
        if int(p["n_cols"]) == 0:
            continue
        codes, scale, zero = _part_arrays(d_out, p)
        W[:, _cols(p, d_in)] = codes if scale is None else scale * (codes - zero)
    return W


def packed_matmul(d_out: int, d_in: int, parts: list[dict], x: np.ndarray) -> np.ndarray:
    """``x @ W.T`` in float64 (x of shape (d_in,) or (n, d_in))."""
    return np.asarray(x, np.float64) @ dequantize_parts(d_out, d_in, parts).T


def error_bound(d_out: int, d_in: int, parts: list[dict], x: np.ndarray) -> np.ndarray:
    """Per output, the magnitude that float32 rounding errors scale with (see the module
    docstring); same shape as :func:`packed_matmul`'s result."""
    A = np.zeros((d_out, d_in), np.float64)
    for p in parts:
        if int(p["n_cols"]) == 0:
            continue
        codes, scale, zero = _part_arrays(d_out, p)
        A[:, _cols(p, d_in)] = np.abs(codes) if scale is None else scale * (codes + zero)
    return np.abs(np.asarray(x, np.float64)) @ A.T
