"""Float64 NumPy reference of hiquant.quantizer (independent of the C++ core)."""

from __future__ import annotations

import numpy as np


def group_bounds(d_in: int, group_size: int | None) -> list[tuple[int, int]]:
    g = d_in if (not group_size or group_size <= 0 or group_size >= d_in) else group_size
    return [(c, min(c + g, d_in)) for c in range(0, d_in, g)]


def minmax_params(W: np.ndarray, bits: int, group_size: int | None):
    maxq = 2**bits - 1
    W64 = np.asarray(W, dtype=np.float64)
    bounds = group_bounds(W64.shape[1], group_size)
    scale = np.empty((W64.shape[0], len(bounds)), np.float32)
    zero = np.empty((W64.shape[0], len(bounds)), np.uint8)
    for j, (a, b) in enumerate(bounds):
        lo = np.minimum(W64[:, a:b].min(axis=1), 0.0)
        hi = np.maximum(W64[:, a:b].max(axis=1), 0.0)
        both0 = (lo == 0) & (hi == 0)
        lo[both0], hi[both0] = -1.0, 1.0
        s = ((hi - lo) / maxq).astype(np.float32)  # the stored scale is float32
        scale[:, j] = s
        zero[:, j] = np.clip(np.rint(-lo / s.astype(np.float64)), 0, maxq)
    return scale, zero


def quantize(W, scale, zero, bits: int, group_size: int | None):
    maxq = 2**bits - 1
    W64 = np.asarray(W, dtype=np.float64)
    codes = np.empty(W64.shape, np.uint8)
    for j, (a, b) in enumerate(group_bounds(W64.shape[1], group_size)):
        s = scale[:, j:j + 1].astype(np.float64)
        z = zero[:, j:j + 1].astype(np.float64)
        codes[:, a:b] = np.clip(np.rint(W64[:, a:b] / s) + z, 0, maxq)
    return codes


def dequantize(codes, scale, zero, bits: int, group_size: int | None):
    out = np.empty(codes.shape, np.float64)
    for j, (a, b) in enumerate(group_bounds(codes.shape[1], group_size)):
        out[:, a:b] = scale[:, j:j + 1].astype(np.float64) * (
            codes[:, a:b].astype(np.float64) - zero[:, j:j + 1].astype(np.float64))
    return out


def fake_quantize(W, bits: int, group_size: int | None):
    scale, zero = minmax_params(W, bits, group_size)
    return dequantize(quantize(W, scale, zero, bits, group_size), scale, zero, bits, group_size)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Little-endian bit stream: code i occupies bits [i*b, (i+1)*b)."""
    flat = np.asarray(codes, np.uint8).ravel()
    bitplanes = ((flat[:, None] >> np.arange(bits, dtype=np.uint8)) & 1).astype(np.uint8)
    return np.packbits(bitplanes.ravel(), bitorder="little")


def unpack_codes(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    bitstream = np.unpackbits(np.asarray(packed, np.uint8), bitorder="little")[: n * bits]
    planes = bitstream.reshape(n, bits).astype(np.uint8)
    return (planes << np.arange(bits, dtype=np.uint8)).sum(axis=1).astype(np.uint8)
