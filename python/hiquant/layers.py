"""The quantized form of one linear layer, shared by every method, the exporter and the loader.

A layer of shape (d_out, d_in) is split by input column into a *low* part (``d_in - k`` columns at
``b_low`` bits) and a *high-impact* part (the ``k`` columns in ``high_idx``, ascending, at ``b_high``
bits, or kept in FP16 when ``b_high == 16``). Each quantized part is uniform asymmetric with its
own groups of ``group_size`` consecutive columns *of that part* (the ragged last group has its own
parameters). Storage, counted exactly here and written exactly so by the packed exporter:

* codes: ``bits`` per weight, packed densely;
* per group: a float16 scale and a zero point of the part's own width (packed like the codes);
* a ``d_in``-bit mask of the high-impact columns when ``k > 0``;
* FP16 high part: 16 bits per weight, no parameters.

Scales are float16 so that a packed checkpoint reproduces exactly the weights hiquant evaluated:
every method rounds its final scales through float16 *before* computing the final codes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import quantizer as qz
from .errors import InvalidArgumentError

__all__ = ["QuantPart", "QuantizedLayer", "storage_bits", "fp16_scales"]

FP16_TINY = float(np.finfo(np.float16).tiny)  # smallest normal float16 scale (6.1e-5)


def fp16_scales(scale: np.ndarray) -> np.ndarray:
    """Round float32 scales through float16 (the stored precision), as float32.

    Scales below float16's smallest normal (6.1e-5) are raised to it, and huge ones capped, so a
    stored scale is always finite and positive."""
    s = np.clip(np.asarray(scale, np.float32), FP16_TINY, float(np.finfo(np.float16).max))
    return s.astype(np.float16).astype(np.float32)


def _ng(n_cols: int, group_size: int) -> int:
    if n_cols == 0:
        return 0
    return 1 if (group_size <= 0 or group_size >= n_cols) else -(-n_cols // group_size)


def storage_bits(d_out: int, d_in: int, k: int, b_low: int, b_high: int, group_size: int,
                 scale_bits: int = 16) -> int:
    """Exact storage of a layer in bits (see the module docstring)."""
    low = d_out * (d_in - k) * b_low + d_out * _ng(d_in - k, group_size) * (scale_bits + b_low)
    if b_high == 16:
        high = d_out * k * 16
    else:
        high = d_out * k * b_high + d_out * _ng(k, group_size) * (scale_bits + b_high)
    mask = d_in if k > 0 else 0
    return int(low + high + mask)


@dataclass
class QuantPart:
    """One uniformly quantized column subset: codes (d_out, n_cols) and per-group parameters."""

    bits: int
    group_size: int
    codes: np.ndarray  # uint8 (d_out, n_cols)
    scale: np.ndarray  # float16 (d_out, n_groups)
    zero: np.ndarray  # uint8 (d_out, n_groups)

    def __post_init__(self):
        self.codes = np.ascontiguousarray(self.codes, dtype=np.uint8)
        self.scale = np.ascontiguousarray(self.scale, dtype=np.float16)
        self.zero = np.ascontiguousarray(self.zero, dtype=np.uint8)
        d_out, n = self.codes.shape
        ng = _ng(n, self.group_size)
        if self.scale.shape != (d_out, ng) or self.zero.shape != (d_out, ng):
            raise InvalidArgumentError(
                f"part parameters have shapes {self.scale.shape} / {self.zero.shape}, expected "
                f"({d_out}, {ng}) for {n} columns in groups of {self.group_size}")
        if not np.all(np.isfinite(self.scale)) or np.any(self.scale <= 0):
            raise InvalidArgumentError("part scales must be finite and positive float16 values")

    @classmethod
    def from_weights(cls, W: np.ndarray, bits: int, group_size: int, scale=None, zero=None):
        """Round-to-nearest codes of W; min-max parameters unless given. Scales pass through
        float16 before the codes are computed, so the stored part reproduces what is used."""
        W = np.ascontiguousarray(W, dtype=np.float32)
        if scale is None:
            scale, zero = qz.minmax_params(W, bits, group_size)
        s32 = fp16_scales(scale)
        codes = qz.quantize(W, s32, np.ascontiguousarray(zero, np.uint8), bits, group_size)
        return cls(bits, group_size, codes, s32.astype(np.float16), zero)

    def dequantize(self) -> np.ndarray:
        return qz.dequantize(self.codes, self.scale.astype(np.float32), self.zero, self.bits,
                             self.group_size)


@dataclass
class QuantizedLayer:
    """A linear layer's weight in hiquant's hybrid format. ``dequantize()`` is exact."""

    name: str
    d_out: int
    d_in: int
    high_idx: np.ndarray  # int64 (k,), ascending
    low: QuantPart | None
    high: QuantPart | None = None  # quantized high part (b_high < 16)
    high_fp16: np.ndarray | None = None  # float16 (d_out, k) when b_high == 16
    info: dict = field(default_factory=dict)  # method-specific notes (losses, iterations, ...)

    def __post_init__(self):
        self.high_idx = np.asarray(self.high_idx, dtype=np.int64)
        k = self.k
        if k and (np.any(np.diff(self.high_idx) <= 0) or self.high_idx[0] < 0
                  or self.high_idx[-1] >= self.d_in):
            raise InvalidArgumentError(f"{self.name}: high_idx must be ascending, unique, in [0, {self.d_in})")
        if k and self.high is None and self.high_fp16 is None:
            raise InvalidArgumentError(f"{self.name}: {k} high-impact columns but no high part")
        if self.low is not None and self.low.codes.shape != (self.d_out, self.d_in - k):
            raise InvalidArgumentError(f"{self.name}: low codes have shape {self.low.codes.shape}, "
                                       f"expected {(self.d_out, self.d_in - k)}")
        if self.high is not None and self.high.codes.shape != (self.d_out, k):
            raise InvalidArgumentError(f"{self.name}: high codes have shape {self.high.codes.shape}, "
                                       f"expected {(self.d_out, k)}")

    @property
    def k(self) -> int:
        return int(self.high_idx.size)

    @property
    def b_low(self) -> int:
        return self.low.bits if self.low is not None else 0

    @property
    def b_high(self) -> int:
        if self.high_fp16 is not None:
            return 16
        return self.high.bits if self.high is not None else 0

    @property
    def group_size(self) -> int:
        return self.low.group_size if self.low is not None else self.high.group_size

    def low_idx(self) -> np.ndarray:
        mask = np.ones(self.d_in, bool)
        mask[self.high_idx] = False
        return np.flatnonzero(mask)

    def dequantize(self) -> np.ndarray:
        W = np.empty((self.d_out, self.d_in), np.float32)
        if self.low is not None and self.d_in - self.k > 0:
            W[:, self.low_idx()] = self.low.dequantize()
        if self.k:
            W[:, self.high_idx] = (self.high_fp16.astype(np.float32) if self.high_fp16 is not None
                                   else self.high.dequantize())
        return W

    def storage_bits(self) -> int:
        return storage_bits(self.d_out, self.d_in, self.k, self.b_low,
                            self.b_high if self.k else self.b_low, self.group_size)

    @classmethod
    def rtn(cls, name: str, W: np.ndarray, b_low: int, group_size: int,
            high_idx=(), b_high: int = 0) -> "QuantizedLayer":
        """Round-to-nearest min-max quantization of both parts (the building block of baselines
        and of the Δ used to build the sensitivity matrix M)."""
        W = np.ascontiguousarray(W, np.float32)
        d_out, d_in = W.shape
        high_idx = np.sort(np.asarray(high_idx, np.int64))
        mask = np.ones(d_in, bool)
        mask[high_idx] = False
        if mask.any():
            low = QuantPart.from_weights(np.ascontiguousarray(W[:, mask]), b_low, group_size)
        else:  # every column is high-impact: an empty low part still records b_low
            low = QuantPart(b_low, group_size, np.zeros((d_out, 0), np.uint8),
                            np.zeros((d_out, 0), np.float16), np.zeros((d_out, 0), np.uint8))
        high = high16 = None
        if high_idx.size:
            Wh = np.ascontiguousarray(W[:, high_idx])
            if b_high == 16:
                high16 = Wh.astype(np.float16)
            else:
                high = QuantPart.from_weights(Wh, b_high, group_size)
        return cls(name, d_out, d_in, high_idx, low, high, high16)
