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


def table_laid_out(p: dict, d_in: int, tables: str = "float32") -> bool:
    """Whether the table kernel lays out part ``p`` (make_packed_planes' rule): with float32
    tables 2-bit parts and 3-bit parts with column indices over at most half of ``d_in``; with
    int8 tables every 2-, 3- and 4-bit part."""
    n, bits = int(p["n_cols"]), int(p["bits"])
    if tables == "int8":
        return n > 0 and 2 <= bits <= 4
    return n > 0 and (bits == 2 or (bits == 3 and p.get("cols") is not None and 2 * n <= d_in))


def int8_tables(xg: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """One group's int8 tables for its activations ``xg`` (float32, the group's columns): per
    column quad (from the group's start, the last one padded with zeros) the 16 subset sums in
    float32, in the kernel's order of additions, divided by the group's scale and rounded to the
    nearest integer (ties to even). Returns (tables (n_quads, 16) int64, scale float32)."""
    xg = np.asarray(xg, np.float32)
    nq = -(-len(xg) // 4)
    v = np.zeros((nq, 4), np.float32)
    v.reshape(-1)[: len(xg)] = xg
    t = np.zeros((nq, 16), np.float32)
    t[:, 1], t[:, 2], t[:, 3] = v[:, 0], v[:, 1], v[:, 0] + v[:, 1]
    t[:, 4], t[:, 5], t[:, 6] = v[:, 2], v[:, 0] + v[:, 2], v[:, 1] + v[:, 2]
    t[:, 7] = (v[:, 0] + v[:, 1]) + v[:, 2]
    t[:, 8:] = t[:, :8] + v[:, 3:4]
    if not np.all(np.isfinite(t)):
        return np.zeros((nq, 16), np.int64), np.float32(np.nan)
    m = np.float32(np.abs(t).max()) if t.size else np.float32(0)
    inv = np.float32(127) / m if m > 0 else np.float32(0)
    q = np.clip(np.rint(t * inv), -127, 127).astype(np.int64)
    return q, np.float32(m / np.float32(127))


def int8_table_matmul(d_out: int, d_in: int, parts: list[dict], x: np.ndarray) -> np.ndarray:
    """``x @ W.T`` as the table kernel with int8 tables computes it, in float64 from the same
    int8 tables: each laid-out part's group contributes ``s * (xs * D - zero * sum_j x_j)`` with
    ``D = sum over quads and planes p of 2^p table[plane-p bits of the quad's codes]`` (an
    integer); the other parts as :func:`packed_matmul`. x of shape (d_in,) or (n, d_in)."""
    X = np.atleast_2d(np.asarray(x, np.float32))
    Y = np.zeros((X.shape[0], d_out), np.float64)
    for p in parts:
        n = int(p["n_cols"])
        if n == 0:
            continue
        cols = _cols(p, d_in)
        if not table_laid_out(p, d_in, "int8"):
            Y += X[:, cols].astype(np.float64) @ dequantize_parts(d_out, n, [
                {**p, "cols": None}]).T
            continue
        bits = int(p["bits"])
        codes, scale, zero = _part_arrays(d_out, p)
        codes = codes.astype(np.int64)
        g = int(p["group_size"])
        gsz = n if (g <= 0 or g >= n) else g
        for t in range(X.shape[0]):
            xp = X[t, cols]
            for g0 in range(0, n, gsz):
                g1 = min(n, g0 + gsz)
                tab, xs = int8_tables(xp[g0:g1])
                nq = tab.shape[0]
                cg = np.zeros((d_out, nq * 4), np.int64)
                cg[:, : g1 - g0] = codes[:, g0:g1]
                cg = cg.reshape(d_out, nq, 4)
                D = np.zeros(d_out, np.float64)
                for b in range(bits):
                    idx = (((cg >> b) & 1) << np.arange(4)).sum(axis=2)  # (d_out, nq)
                    D += (1 << b) * tab[np.arange(nq), idx].sum(axis=1)
                gs = xp[g0:g1].astype(np.float64).sum()
                Y[t] += scale[:, g0] * (np.float64(xs) * D - zero[:, g0] * gs)
    return Y if np.ndim(x) == 2 else Y[0]


def int8_table_error_bound(d_out: int, d_in: int, parts: list[dict], x: np.ndarray) -> np.ndarray:
    """Per output, the largest difference the int8 tables may make against the exact product
    (PlaneTables::Int8): ``sum over laid-out groups of |s| * xs / 2 * (2^bits - 1) * n_quads``."""
    X = np.atleast_2d(np.asarray(x, np.float32))
    B = np.zeros((X.shape[0], d_out), np.float64)
    for p in parts:
        n = int(p["n_cols"])
        if not table_laid_out(p, d_in, "int8"):
            continue
        bits = int(p["bits"])
        _, scale, _ = _part_arrays(d_out, p)
        g = int(p["group_size"])
        gsz = n if (g <= 0 or g >= n) else g
        cols = _cols(p, d_in)
        for t in range(X.shape[0]):
            for g0 in range(0, n, gsz):
                g1 = min(n, g0 + gsz)
                _, xs = int8_tables(X[t, cols][g0:g1])
                nq = -(-(g1 - g0) // 4)
                B[t] += np.abs(scale[:, g0]) * float(xs) / 2 * ((1 << bits) - 1) * nq
    return B if np.ndim(x) == 2 else B[0]
