"""The quantized form of one linear layer, shared by every method, the exporter and the loader.

A layer of shape (d_out, d_in) is split by input column into a *low* part (``d_in - k`` columns at
``b_low`` bits) and a *high-impact* part (the ``k`` columns in ``high_idx``, ascending, at ``b_high``
bits, or kept in FP16 when ``b_high == 16``). Each quantized part is uniform asymmetric with its
own groups of ``group_size`` consecutive columns *of that part* (the ragged last group has its own
parameters). Storage, counted exactly here and written exactly so by the packed exporter:

* codes: ``bits`` per weight, packed densely;
* per group: a scale and a zero point of the part's own width (packed like the codes);
* a ``d_in``-bit mask of the high-impact columns when ``k > 0``;
* FP16 high part: 16 bits per weight, no parameters.

Scales are stored in one of three precisions (``scale_bits``):

* 16 (default): a float16 scale per group;
* 8 (double-quantized, as in QLoRA and llama.cpp's k-quants): per group an unsigned 8-bit code
  ``c`` in 1..255, and one float16 super-scale ``S`` per *block of rows* of the part; the scale
  is ``S * c`` computed in float32, which is exact (an 11-bit by 8-bit product). A block holds
  ``super_rows(n_groups) = max(1, 256 // n_groups)`` consecutive rows — as many whole rows as fit
  in 256 scale codes, QLoRA's second-level block — and the last block may be short. ``S`` is the
  block's largest scale / 255 rounded *up* to float16, so every group's code fits; a scale moves by
  at most ``S / 2`` (relative ``0.5 / c``), except scales below ``S / 2`` (groups with almost no
  range), which are raised to ``S``. This brings W2 g64 from 2.281 to 2.157 bits per weight before
  any high-impact column, which is what lets a hybrid layer fit budgets near the plain format's.
* 6 (the same double quantization with 6-bit codes ``c`` in 1..63, packed densely like the
  weight codes, ``S`` = the block's largest scale / 63 rounded up): llama.cpp's k-quants store
  their sub-block scales at 6 bits for the same reason. W2 g64 drops to 2.126 bits per weight
  before any high-impact column; a scale moves by at most ``S / 2`` (a relative 0.8% for scales
  near the block's largest, more for small ones), which the learned clipping absorbs.

  Why blocks of rows, not one super-scale per row (hiquant's packed format version 1, still read):
  a per-row float16 costs ``16 / d_in`` bits per weight and part — 0.083 bits of a 0.30-bit budget
  at ``d_in = 384`` with both parts — while blocks of 256 codes cost 0.001, and the freed bits
  buy high-impact columns (the comparison on llama-bench is in bench/RESULTS.md).

A binarized layer (``billm``) is a :class:`BinaryPart` instead of the low/high parts: sign bits,
a salient-column mask, a membership bitmap and float16 per-row α's per block, counted exactly by
:func:`binary_storage_bits` (see :class:`BinaryPart`).

Either way the stored values are what hiquant evaluated: every method rounds its final scales to
the stored precision *before* computing the final codes (AdaRound learns on the rounded scales).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from . import quantizer as qz
from .config import SCALE_BITS, SCALE_CODE_BITS, check_scale_bits
from .errors import InvalidArgumentError

__all__ = ["QuantPart", "BinaryPart", "QuantizedLayer", "storage_bits", "binary_storage_bits",
           "fp16_scales", "scale_codes", "scale8",
           "stored_scales", "super_rows", "check_scale_bits", "SCALE_BITS", "SCALE_CODE_BITS",
           "SCALE_SUPER_BLOCK"]

SCALE_SUPER_BLOCK = 256  # scale codes per float16 super-scale (at most; whole rows)

FP16_TINY = float(np.finfo(np.float16).tiny)  # smallest normal float16 scale (6.1e-5)


def fp16_scales(scale: np.ndarray) -> np.ndarray:
    """Round float32 scales through float16 (the stored precision), as float32.

    Scales below float16's smallest normal (6.1e-5) are raised to it, and huge ones capped, so a
    stored scale is always finite and positive."""
    s = np.clip(np.asarray(scale, np.float32), FP16_TINY, float(np.finfo(np.float16).max))
    return s.astype(np.float16).astype(np.float32)


def super_rows(n_groups: int) -> int:
    """Rows sharing one super-scale in a part with ``n_groups`` groups per row: as many whole rows
    as fit in :data:`SCALE_SUPER_BLOCK` scale codes, at least one."""
    return max(1, SCALE_SUPER_BLOCK // max(1, int(n_groups)))


def n_super(d_out: int, rows: int) -> int:
    """Number of super-scales of a part with ``d_out`` rows in blocks of ``rows`` rows."""
    return -(-int(d_out) // int(rows))


def scale_codes(scale: np.ndarray, code_bits: int = 8,
                rows: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Double-quantize per-group scales ``(d_out, n_groups)`` to ``code_bits``-bit codes (8 or 6)
    with a float16 super-scale per block of ``rows`` rows (default :func:`super_rows`; 1 is the
    version-1 layout). Returns ``(stored float32 scales == S * c exactly, codes uint8
    (d_out, n_groups) in 1..2**code_bits - 1, S float16 (ceil(d_out / rows),))``."""
    if isinstance(code_bits, bool) or code_bits not in SCALE_CODE_BITS:
        raise InvalidArgumentError(f"scale code width must be 8 or 6 bits, got {code_bits!r}")
    cmax = np.float32(2 ** int(code_bits) - 1)
    s = np.clip(np.asarray(scale, np.float32), FP16_TINY, float(np.finfo(np.float16).max))
    d_out, ng = s.shape
    rows = super_rows(ng) if rows is None else int(rows)
    if rows < 1:
        raise InvalidArgumentError(f"rows per super-scale must be >= 1, got {rows}")
    rows = min(rows, max(d_out, 1))  # one block either way; keeps the padding below bounded
    nb = n_super(d_out, rows)
    if ng:
        pad = np.full((nb * rows - d_out, ng), FP16_TINY, np.float32)  # the short last block
        smax = np.concatenate([s, pad]).reshape(nb, rows * ng).max(axis=1)
    else:
        smax = np.full(nb, FP16_TINY, np.float32)
    sup = np.maximum(smax / cmax, np.float32(FP16_TINY)).astype(np.float16)
    low = sup.astype(np.float32) * cmax < smax  # rounded down: step up one ulp
    sup[low] = np.nextafter(sup[low], np.float16(np.inf))
    sup_rows = sup.astype(np.float32)[np.arange(d_out) // rows]
    codes = np.clip(np.rint(s / sup_rows[:, None]), 1, cmax).astype(np.uint8)
    return sup_rows[:, None] * codes.astype(np.float32), codes, sup


def scale8(scale: np.ndarray, rows: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`scale_codes` with 8-bit codes (1..255)."""
    return scale_codes(scale, 8, rows)


def stored_scales(scale: np.ndarray, scale_bits: int) -> np.ndarray:
    """The float32 values of ``scale`` after rounding to the stored precision."""
    if check_scale_bits(scale_bits) == 16:
        return fp16_scales(scale)
    return scale_codes(scale, scale_bits)[0]


def _ng(n_cols: int, group_size: int) -> int:
    if n_cols == 0:
        return 0
    return 1 if (group_size <= 0 or group_size >= n_cols) else -(-n_cols // group_size)


def storage_bits(d_out: int, d_in: int, k: int, b_low: int, b_high: int, group_size: int,
                 scale_bits: int = 16, super_rows_lh: tuple | None = None) -> int:
    """Exact storage of a layer in bits (see the module docstring). With 8- or 6-bit scales each
    non-empty quantized part also stores a float16 super-scale per block of rows:
    ``super_rows_lh`` = (rows of the low part's blocks, of the high part's), ``None`` entries
    (or no tuple) meaning the default :func:`super_rows`."""
    scale_bits = check_scale_bits(scale_bits)
    r_low, r_high = super_rows_lh if super_rows_lh is not None else (None, None)

    def sup(n_cols: int, rows) -> int:
        if scale_bits == 16 or n_cols == 0:
            return 0
        ng = _ng(n_cols, group_size)
        return 16 * n_super(d_out, super_rows(ng) if rows is None else rows)

    low = d_out * (d_in - k) * b_low + d_out * _ng(d_in - k, group_size) * (scale_bits + b_low)
    low += sup(d_in - k, r_low)
    if b_high == 16:
        high = d_out * k * 16
    else:
        high = d_out * k * b_high + d_out * _ng(k, group_size) * (scale_bits + b_high)
        high += sup(k, r_high)
    mask = d_in if k > 0 else 0
    return int(low + high + mask)


@dataclass
class QuantPart:
    """One uniformly quantized column subset: codes (d_out, n_cols) and per-group parameters."""

    bits: int
    group_size: int
    codes: np.ndarray  # uint8 (d_out, n_cols)
    scale: np.ndarray  # float16 (d_out, n_groups); uint8 scale codes when scale_super is set
    zero: np.ndarray  # uint8 (d_out, n_groups)
    scale_super: np.ndarray | None = None  # float16 (ceil(d_out / super_rows),): coded scales
    super_rows: int | None = None  # rows per super-scale; None: the default super_rows(n_groups)
    scale_code_bits: int = 8  # width of the scale codes (8 or 6) when scale_super is set

    def __post_init__(self):
        self.codes = np.ascontiguousarray(self.codes, dtype=np.uint8)
        self.zero = np.ascontiguousarray(self.zero, dtype=np.uint8)
        d_out, n = self.codes.shape
        ng = _ng(n, self.group_size)
        if self.scale_super is None:
            self.scale = np.ascontiguousarray(self.scale, dtype=np.float16)
        else:
            if np.asarray(self.scale).dtype != np.uint8:
                raise InvalidArgumentError("double-quantized part scales must be uint8 codes")
            if (isinstance(self.scale_code_bits, bool)
                    or self.scale_code_bits not in SCALE_CODE_BITS):
                raise InvalidArgumentError(f"scale_code_bits must be 8 or 6, got "
                                           f"{self.scale_code_bits!r}")
            self.scale_code_bits = int(self.scale_code_bits)
            self.scale = np.ascontiguousarray(self.scale)
            self.scale_super = np.ascontiguousarray(self.scale_super, dtype=np.float16)
            if self.super_rows is None:
                self.super_rows = super_rows(ng)
            if isinstance(self.super_rows, bool) or int(self.super_rows) < 1:
                raise InvalidArgumentError(f"super_rows must be a positive integer, got "
                                           f"{self.super_rows!r}")
            self.super_rows = int(self.super_rows)
            nb = n_super(d_out, self.super_rows)
            if self.scale_super.shape != (nb,):
                raise InvalidArgumentError(
                    f"scale_super has shape {self.scale_super.shape}, expected ({nb},) for "
                    f"{d_out} rows in blocks of {self.super_rows}")
            cmax = 2 ** self.scale_code_bits - 1
            if (not np.all(np.isfinite(self.scale_super)) or np.any(self.scale_super <= 0)
                    or np.any(self.scale == 0) or np.any(self.scale > cmax)):
                raise InvalidArgumentError(
                    f"{self.scale_code_bits}-bit scales need positive finite super-scales and "
                    f"codes in 1..{cmax}")
        if self.scale.shape != (d_out, ng) or self.zero.shape != (d_out, ng):
            raise InvalidArgumentError(
                f"part parameters have shapes {self.scale.shape} / {self.zero.shape}, expected "
                f"({d_out}, {ng}) for {n} columns in groups of {self.group_size}")
        if self.scale_super is None and (not np.all(np.isfinite(self.scale)) or np.any(self.scale <= 0)):
            raise InvalidArgumentError("part scales must be finite and positive float16 values")

    @property
    def scale_bits(self) -> int:
        return 16 if self.scale_super is None else self.scale_code_bits

    def scale_f32(self) -> np.ndarray:
        """The scales as used: float16 values, or ``S * c`` (exact in float32)."""
        if self.scale_super is None:
            return self.scale.astype(np.float32)
        sup = self.scale_super.astype(np.float32)[np.arange(self.codes.shape[0]) // self.super_rows]
        return sup[:, None] * self.scale.astype(np.float32)

    @classmethod
    def from_weights(cls, W: np.ndarray, bits: int, group_size: int, scale=None, zero=None,
                     scale_bits: int = 16):
        """Round-to-nearest codes of W; min-max parameters unless given. Scales are rounded to
        the stored precision before the codes are computed, so the part reproduces what is used.
        With given float scales and coded (8- or 6-bit) storage the zero points are kept."""
        W = np.ascontiguousarray(W, dtype=np.float32)
        if scale is None:
            scale, zero = qz.minmax_params(W, bits, group_size)
        zero = np.ascontiguousarray(zero, np.uint8)
        if scale_bits in SCALE_CODE_BITS:
            s32, sc, sup = scale_codes(scale, scale_bits)
            codes = qz.quantize(W, np.ascontiguousarray(s32), zero, bits, group_size)
            return cls(bits, group_size, codes, sc, zero, sup, scale_code_bits=scale_bits)
        s32 = stored_scales(scale, scale_bits)
        codes = qz.quantize(W, s32, zero, bits, group_size)
        return cls(bits, group_size, codes, s32.astype(np.float16), zero)

    def dequantize(self) -> np.ndarray:
        """The part's float32 weights ``scale * (codes - zero)`` per group (a new array)."""
        return qz.dequantize(self.codes, np.ascontiguousarray(self.scale_f32()), self.zero,
                             self.bits, self.group_size)

    @cached_property
    def wq(self) -> np.ndarray:
        """:meth:`dequantize`, computed once (do not modify it in place)."""
        return self.dequantize()


def binary_storage_bits(d_out: int, d_in: int, n_salient: int, n_blocks: int,
                        n_salient_blocks: int) -> int:
    """Exact storage of a :class:`BinaryPart` in bits: a sign bit per weight, a second (residual)
    sign bit per weight of the ``n_salient`` salient columns, a concentrated/sparse membership bit
    per weight of the other columns, the ``d_in``-bit salient-column mask, and float16 α's per row:
    two (concentrated, sparse) in each of the ``n_blocks`` blocks, two more (α₁, α₂ of the residual
    approximation) in each of the ``n_salient_blocks`` blocks that hold salient columns."""
    signs = d_out * d_in + d_out * n_salient + d_out * (d_in - n_salient)
    return int(signs + d_in + 16 * d_out * (2 * n_blocks + 2 * n_salient_blocks))


@dataclass
class BinaryPart:
    """A binarized layer (BiLLM, :mod:`hiquant.methods.billm`): every weight is ``±α`` with a
    per-row α of its block of ``block_size`` consecutive columns.

    * salient columns (``salient``, a ``d_in`` mask): ``α₁·s₁ + α₂·s₂`` (the residual
      approximation; ``s₁`` in ``sign``, ``s₂`` in ``sign2``, ``(d_out, n_salient)``);
    * the other columns: ``α_c·s₁`` for the concentrated weights and ``α_s·s₁`` for the sparse ones
      (``sparse``, ``(d_out, d_in - n_salient)``, True = sparse);
    * ``alpha`` float16 ``(d_out, n_blocks, 4)``: ``α₁, α₂, α_c, α_s`` per row and block (α₁ and α₂
      are stored only for blocks with salient columns; they are 0 elsewhere).

    Sign bits are True for +1. Storage is counted by :func:`binary_storage_bits`."""

    block_size: int
    salient: np.ndarray  # bool (d_in,)
    sign: np.ndarray  # bool (d_out, d_in)
    sign2: np.ndarray  # bool (d_out, n_salient), salient columns in ascending order
    sparse: np.ndarray  # bool (d_out, d_in - n_salient), the other columns in ascending order
    alpha: np.ndarray  # float16 (d_out, n_blocks, 4)

    def __post_init__(self):
        self.salient = np.ascontiguousarray(self.salient, dtype=bool)
        self.sign = np.ascontiguousarray(self.sign, dtype=bool)
        self.sign2 = np.ascontiguousarray(self.sign2, dtype=bool)
        self.sparse = np.ascontiguousarray(self.sparse, dtype=bool)
        self.alpha = np.ascontiguousarray(self.alpha, dtype=np.float16)
        if isinstance(self.block_size, bool) or int(self.block_size) < 1:
            raise InvalidArgumentError(f"block_size must be a positive integer, got "
                                       f"{self.block_size!r}")
        self.block_size = int(self.block_size)
        if self.sign.ndim != 2 or self.salient.shape != (self.sign.shape[1],):
            raise InvalidArgumentError(f"sign has shape {self.sign.shape} and salient "
                                       f"{self.salient.shape}; expected (d_out, d_in) and (d_in,)")
        d_out, d_in = self.sign.shape
        ns = int(self.salient.sum())
        nb = -(-d_in // self.block_size)
        for nm, arr, shape in (("sign2", self.sign2, (d_out, ns)),
                               ("sparse", self.sparse, (d_out, d_in - ns)),
                               ("alpha", self.alpha, (d_out, nb, 4))):
            if arr.shape != shape:
                raise InvalidArgumentError(f"{nm} has shape {arr.shape}, expected {shape} for a "
                                           f"({d_out}, {d_in}) layer with {ns} salient columns in "
                                           f"blocks of {self.block_size}")
        if not np.all(np.isfinite(self.alpha)) or np.any(self.alpha < 0):
            raise InvalidArgumentError("binary α's must be finite and non-negative float16 values")

    @property
    def shape(self) -> tuple[int, int]:
        return self.sign.shape

    @property
    def n_salient(self) -> int:
        return int(self.salient.sum())

    @property
    def n_blocks(self) -> int:
        return self.alpha.shape[1]

    def salient_blocks(self) -> np.ndarray:
        """Indices of the blocks holding at least one salient column (ascending)."""
        d_in = self.sign.shape[1]
        blk = np.arange(d_in) // self.block_size
        return np.unique(blk[self.salient])

    def storage_bits(self) -> int:
        d_out, d_in = self.shape
        return binary_storage_bits(d_out, d_in, self.n_salient, self.n_blocks,
                                   int(self.salient_blocks().size))

    def dequantize(self) -> np.ndarray:
        """The float32 weights (a new array), computed from float16 α's as the sweep used them."""
        d_out, d_in = self.shape
        a = self.alpha.astype(np.float32)
        blk = np.arange(d_in) // self.block_size
        s1 = np.where(self.sign, np.float32(1), np.float32(-1))
        W = np.empty((d_out, d_in), np.float32)
        sal = np.flatnonzero(self.salient)
        oth = np.flatnonzero(~self.salient)
        if sal.size:
            s2 = np.where(self.sign2, np.float32(1), np.float32(-1))
            W[:, sal] = a[:, blk[sal], 0] * s1[:, sal] + a[:, blk[sal], 1] * s2
        if oth.size:
            mag = np.where(self.sparse, a[:, blk[oth], 3], a[:, blk[oth], 2])
            W[:, oth] = mag * s1[:, oth]
        return W

    @cached_property
    def wq(self) -> np.ndarray:
        """:meth:`dequantize`, computed once (do not modify it in place)."""
        return self.dequantize()


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
    binary: BinaryPart | None = None  # a binarized layer (billm): no low / high parts, k = 0

    def __post_init__(self):
        self.high_idx = np.asarray(self.high_idx, dtype=np.int64)
        k = self.k
        if self.binary is not None:
            if self.low is not None or self.high is not None or self.high_fp16 is not None or k:
                raise InvalidArgumentError(f"{self.name}: a binary layer has no low or high parts")
            if self.binary.shape != (self.d_out, self.d_in):
                raise InvalidArgumentError(f"{self.name}: binary part has shape "
                                           f"{self.binary.shape}, expected {(self.d_out, self.d_in)}")
        if k and (np.any(np.diff(self.high_idx) <= 0) or self.high_idx[0] < 0
                  or self.high_idx[-1] >= self.d_in):
            raise InvalidArgumentError(f"{self.name}: high_idx must be ascending, unique, in "
                                       f"[0, {self.d_in})")
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
        if self.binary is not None:
            return 1
        return self.low.bits if self.low is not None else 0

    @property
    def b_high(self) -> int:
        if self.high_fp16 is not None:
            return 16
        return self.high.bits if self.high is not None else 0

    @property
    def group_size(self) -> int:
        if self.binary is not None:
            return self.binary.block_size
        return self.low.group_size if self.low is not None else self.high.group_size

    def low_idx(self) -> np.ndarray:
        mask = np.ones(self.d_in, bool)
        mask[self.high_idx] = False
        return np.flatnonzero(mask)

    def dequantize(self) -> np.ndarray:
        if self.binary is not None:
            return self.binary.dequantize()
        W = np.empty((self.d_out, self.d_in), np.float32)
        if self.low is not None and self.d_in - self.k > 0:
            W[:, self.low_idx()] = self.low.dequantize()
        if self.k:
            W[:, self.high_idx] = (self.high_fp16.astype(np.float32) if self.high_fp16 is not None
                                   else self.high.dequantize())
        return W

    @property
    def scale_bits(self) -> int:
        parts = [p for p in (self.low, self.high) if p is not None and p.codes.size]
        bits = {p.scale_bits for p in parts}
        if len(bits) > 1:
            raise InvalidArgumentError(f"{self.name}: parts store scales at different precisions")
        return bits.pop() if bits else 16

    def storage_bits(self) -> int:
        if self.binary is not None:
            return self.binary.storage_bits()

        def rows(p):
            return p.super_rows if p is not None and p.scale_super is not None else None
        return storage_bits(self.d_out, self.d_in, self.k, self.b_low,
                            self.b_high if self.k else self.b_low, self.group_size,
                            self.scale_bits, (rows(self.low), rows(self.high)))

    @classmethod
    def rtn(cls, name: str, W: np.ndarray, b_low: int, group_size: int,
            high_idx=(), b_high: int = 0, scale_bits: int = 16) -> "QuantizedLayer":
        """Round-to-nearest min-max quantization of both parts (the building block of baselines
        and of the Δ used to build the sensitivity matrix M)."""
        W = np.ascontiguousarray(W, np.float32)
        d_out, d_in = W.shape
        high_idx = np.sort(np.asarray(high_idx, np.int64))
        mask = np.ones(d_in, bool)
        mask[high_idx] = False
        if mask.any():
            low = QuantPart.from_weights(np.ascontiguousarray(W[:, mask]), b_low, group_size,
                                         scale_bits=scale_bits)
        else:  # every column is high-impact: an empty low part still records b_low
            low = QuantPart(b_low, group_size, np.zeros((d_out, 0), np.uint8),
                            np.zeros((d_out, 0), np.float16), np.zeros((d_out, 0), np.uint8))
        high = high16 = None
        if high_idx.size:
            Wh = np.ascontiguousarray(W[:, high_idx])
            if b_high == 16:
                high16 = Wh.astype(np.float16)
            else:
                high = QuantPart.from_weights(Wh, b_high, group_size, scale_bits=scale_bits)
        return cls(name, d_out, d_in, high_idx, low, high, high16)
