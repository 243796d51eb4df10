"""Uniform asymmetric quantization primitives (native kernels).

Conventions, shared by every stage of hiquant:

* ``W`` is a float32, C-contiguous matrix of shape ``(d_out, d_in)`` (a linear layer's weight).
* Grouping: ``group_size`` ``g > 0`` groups ``g`` consecutive input columns per output row;
  ``g <= 0`` (or ``g >= d_in``) gives one group per row. When ``g`` does not divide ``d_in`` the
  last group of each row is shorter and has its own parameters.
* Parameters: ``scale`` float32 and ``zero`` uint8 (an integer code), shape ``(d_out, n_groups)``.
* Min-max ranges always include 0 (as GPTQ's quantizer); an all-zero group gets the range [-1, 1].
* ``code = clamp(rint(w / scale) + zero, 0, 2**bits - 1)`` with round-half-to-even (``numpy.rint``),
  the division in float64; ``w_hat = scale * (code - zero)``.

Inputs are never converted silently: a wrong dtype raises ``TypeError``, a non-contiguous or
empty array ``ValueError``, a NaN/Inf weight :class:`hiquant.NumericalError`.
"""

from __future__ import annotations

import numpy as np

from . import _core
from ._threads import resolve_n_threads
from .config import WEIGHT_BITS, check_group_size
from .errors import InvalidArgumentError, InvalidTypeError

__all__ = [
    "n_groups",
    "minmax_params",
    "quantize",
    "dequantize",
    "fake_quantize",
    "pack_codes",
    "unpack_codes",
    "packed_size",
    "PACK_BITS",
]

PACK_BITS = WEIGHT_BITS  # the widths pack_codes stores (hiquant.config: the one definition)


def _group(group_size: int | None) -> int:
    return check_group_size(group_size)


def _bits(bits: int) -> int:
    if not isinstance(bits, (int, np.integer)) or isinstance(bits, bool):
        raise InvalidTypeError(f"bits must be an int, got {type(bits).__name__}")
    bits = int(bits)
    if not -(2**31) <= bits < 2**31:  # fits the native int; the native check names the range
        raise InvalidArgumentError(f"bits must be an integer in 2..8, got {bits}")
    return bits


def n_groups(d_in: int, group_size: int | None) -> int:
    """Number of parameter groups per row for ``d_in`` columns."""
    return int(_core.n_groups(int(d_in), _group(group_size)))


def minmax_params(W: np.ndarray, bits: int, group_size: int | None = None, *, n_threads=None):
    """Min-max ``(scale, zero)`` of ``W``; each has shape ``(d_out, n_groups)``."""
    return _core.minmax_params(W, _bits(bits), _group(group_size), resolve_n_threads(n_threads))


def quantize(W, scale, zero, bits: int, group_size: int | None = None, *, n_threads=None):
    """Integer codes (uint8, shape of ``W``) of ``W`` under the given parameters."""
    return _core.quantize(W, scale, zero, _bits(bits), _group(group_size),
                          resolve_n_threads(n_threads))


def dequantize(codes, scale, zero, bits: int, group_size: int | None = None, *, n_threads=None):
    """float32 weights ``scale * (codes - zero)``."""
    return _core.dequantize(codes, scale, zero, _bits(bits), _group(group_size),
                            resolve_n_threads(n_threads))


def fake_quantize(W, bits: int, group_size: int | None = None, *, n_threads=None,
                  return_params: bool = False, out: np.ndarray | None = None):
    """Round-to-nearest min-max quantize-dequantize of ``W`` in one pass.

    Returns the float32 matrix, or ``(W_hat, scale, zero)`` with ``return_params=True``.
    ``out``: an optional float32 C-contiguous array of ``W``'s shape to write into (it may be
    ``W`` itself), which saves a fresh allocation when called in a loop.
    """
    out, scale, zero = _core.fake_quantize(W, _bits(bits), _group(group_size),
                                           resolve_n_threads(n_threads), out)
    return (out, scale, zero) if return_params else out


def packed_size(n_codes: int, bits: int) -> int:
    """Bytes needed for ``n_codes`` codes of ``bits`` bits (``ceil(n_codes * bits / 8)``)."""
    return int(_core.packed_size(int(n_codes), _bits(bits)))


def pack_codes(codes: np.ndarray, bits: int, *, n_threads=None) -> np.ndarray:
    """Pack uint8 codes (< 2**bits, any shape, C order) into a dense little-endian bit stream.

    ``bits`` is 2, 3, 4, 6 or 8; 3-bit codes pack 8 to 3 bytes (6-bit: 4 to 3). Returns a 1-D
    uint8 array of ``packed_size(codes.size, bits)`` bytes. A code that does not fit raises ``ValueError``.
    """
    return _core.pack_codes(codes, _bits(bits), resolve_n_threads(n_threads))


def unpack_codes(packed: np.ndarray, bits: int, n_codes: int, *, n_threads=None,
                 shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Inverse of :func:`pack_codes`: ``n_codes`` uint8 codes, reshaped to ``shape`` if given."""
    out = _core.unpack_codes(packed, _bits(bits), int(n_codes), resolve_n_threads(n_threads))
    return out.reshape(shape) if shape is not None else out
