"""Hybrid quantization of a linear layer: the high-impact input columns with AdaRound at ``b_high``
bits (or kept in FP16), the rest with learnable weight clipping (LWC) at ``b_low`` bits.

Two objectives, the same quantizer parts (:mod:`hiquant.learners`):

* :func:`quantize_layer` — layer-wise: ``tr((W_q - W) H (W_q - W)^T) / N`` from the layer's
  calibration Gram matrix, trained in C++.
* :func:`quantize_block` — block-wise (the paper's choice): the reconstruction error of a whole
  transformer block's output, ``mean over tokens of ||block(h; W_q) - target||^2``, with
  ``dL/dW_q`` of every linear from the model runtime's block backward.

Sequence, not joint — decided by measurement (``python bench/kernels.py --order``). On four
layers of block 3 of ``../shared/bench/llama-bench`` (q/o/gate/down; 64 x 512 calibration tokens;
W2 g64, b_H 3, the top 10% columns by ``H_ii * ||W[:, i]||^2``), final layer-wise loss with equal
iterations for both parts (500 LWC + 500 AdaRound steps; joint = both learned in the same 500
steps on the whole layer):

=========  =======  ============  =====
layer      RTN      sequential    joint
=========  =======  ============  =====
q_proj     42.06    **27.95**     28.46
o_proj     14.22    **9.36**      9.48
gate_proj  112.13   **72.74**     73.73
down_proj  23.10    **14.48**     14.57
=========  =======  ============  =====

Sequential is lower on all four, and cheaper: an AdaRound step on the ``k`` high columns of a
layer whose low part is frozen costs ``O(d_out k^2)`` (the frozen part enters through one
precomputed product) against ``O(d_out d_in^2)`` for a joint step — about 100x less at 10% high
columns. LWC is first learned with the high columns at full precision (AdaRound's soft start
reproduces them), then frozen at its exported (float16-scale) values; AdaRound then learns the
high columns on the loss of the *whole* layer (block), compensating for the low part's residual
error. Joint learning stays available (``order="joint"``) for re-measurement.

LWC's layer-wise loss levelled off within 200-500 full-batch steps on those layers (lr 1e-2), so
``lwc_iters`` defaults to 500.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from . import learners as K
from ._threads import resolve_n_threads
from .errors import InvalidArgumentError, NumericalError
from .storage import check_scale_bits

__all__ = ["HybridResult", "quantize_layer", "quantize_layer_as", "quantize_block",
           "block_loss", "ORDERS"]

ORDERS = ("sequential", "joint")
LOW_ROUNDINGS = ("nearest", "gptq")  # quantize_layer's rounding of the low part on LWC's grid
LWC_SCHEDULES = ("constant", "cosine")  # quantize_block's LWC learning-rate schedules

Progress = Optional[Callable[[str, int, int], None]]


@dataclass
class HybridResult:
    """A hybrid-quantized layer. ``wq`` equals what the exported parts dequantize to, exactly."""

    wq: np.ndarray  # float32 (d_out, d_in)
    high_idx: np.ndarray  # int64 (k,), ascending
    low_idx: np.ndarray  # int64 (d_in - k,), ascending
    b_low: int
    b_high: int
    group_size: int
    low: K.PartExport | None  # None when every column is high-impact
    high: K.PartExport | None  # None when k == 0 or b_high == 16
    high_fp16: np.ndarray | None  # float16 (d_out, k) when b_high == 16
    history: dict = field(default_factory=dict)  # per phase: loss (and reg, b) per step
    loss_rtn: float | None = None  # the objective at round-to-nearest of the same plan
    loss_final: float | None = None  # the objective at the returned wq
    order: str = "sequential"
    seconds: float = 0.0
    lwc_params: np.ndarray | None = None  # LWC's learned (gamma, beta), (2, d_out, n_groups)

    def to_layer(self, name: str, *, info: dict | None = None):
        """The :class:`hiquant.storage.QuantizedLayer` (exact round trip, the parts' scale
        precision)."""
        from .storage import QuantizedLayer, QuantPart
        d_out = self.wq.shape[0]
        if self.low is not None:
            low = _part(self.b_low, self.group_size, self.low)
        else:
            low = QuantPart(self.b_low, self.group_size, np.zeros((d_out, 0), np.uint8),
                            np.zeros((d_out, 0), np.float16), np.zeros((d_out, 0), np.uint8))
        high = None
        if self.high is not None:
            high = _part(self.b_high, self.group_size, self.high)
        notes = {"order": self.order, "seconds": self.seconds}
        if self.loss_final is not None:
            notes["loss_final"] = self.loss_final
        if self.loss_rtn is not None:
            notes["loss_rtn"] = self.loss_rtn
        notes.update(info or {})
        return QuantizedLayer(name, d_out, self.wq.shape[1], self.high_idx, low, high,
                              self.high_fp16, notes)


def _part(bits: int, group_size: int, exp: K.PartExport):
    from .storage import QuantPart
    if exp.scale_super is not None:
        return QuantPart(bits, group_size, exp.codes, exp.scale_code, exp.zero, exp.scale_super,
                         scale_code_bits=exp.scale_code_bits)
    return QuantPart(bits, group_size, exp.codes, exp.scale.astype(np.float16), exp.zero)


def _lwc_export(lwc: K.LWC, W: np.ndarray, scale_bits: int) -> K.PartExport:
    """LWC's final integer form at the stored scale precision. 8- or 6-bit: the learned (float16)
    scales are double-quantized and the codes recomputed with them and LWC's zero points, i.e.
    round-to-nearest within the learned clipping range on the stored grid."""
    exp = lwc.export()
    if scale_bits == 16:
        return exp
    from . import quantizer as qz
    from .storage import scale_codes
    s32, code, sup = scale_codes(exp.scale, scale_bits)
    s32 = np.ascontiguousarray(s32)
    codes = qz.quantize(np.ascontiguousarray(W, np.float32), s32, exp.zero, exp.bits,
                        exp.group_size)
    wq = qz.dequantize(codes, s32, exp.zero, exp.bits, exp.group_size)
    return K.PartExport(codes, s32, exp.zero, wq, exp.bits, exp.group_size, code, sup, scale_bits)


def _adaround(Wh: np.ndarray, bits: int, gs: int, scale_bits: int, **kw) -> K.AdaRound:
    """AdaRound on the stored scale grid: with 8- or 6-bit scales the min-max scales are
    double-quantized first, so the rounding is learned for the scales that are stored."""
    if scale_bits == 16:
        return K.AdaRound(Wh, bits, gs, **kw)
    from . import quantizer as qz
    from .storage import scale_codes
    s, _ = qz.minmax_params(Wh, bits, gs)
    s32, code, sup = scale_codes(s, scale_bits)
    ada = K.AdaRound(Wh, bits, gs, scale=np.ascontiguousarray(s32), **kw)
    ada._scale_codes = (code, sup, scale_bits)
    return ada


def _ada_export(ada: K.AdaRound) -> K.PartExport:
    exp = ada.export()
    coded = getattr(ada, "_scale_codes", None)
    if coded is not None:
        exp.scale_code, exp.scale_super, exp.scale_code_bits = coded
    return exp


# ------------------------------------------------------------------------------------------------
# validation


def _weights(W) -> np.ndarray:
    if not isinstance(W, np.ndarray):
        raise TypeError(f"W must be a numpy.ndarray of float32, got {type(W).__name__}")
    if W.dtype != np.float32:
        raise TypeError(f"W must have dtype float32, got {W.dtype}; convert it with W.astype(np.float32)")
    if W.ndim != 2 or W.size == 0:
        raise InvalidArgumentError(f"W must be a non-empty (d_out, d_in) matrix, got shape {W.shape}")
    if not np.all(np.isfinite(W)):
        r, c = np.argwhere(~np.isfinite(W))[0]
        raise NumericalError(f"W is not finite at row {r}, column {c}; check the checkpoint")
    return np.ascontiguousarray(W)


def _gram(H, d_in: int) -> np.ndarray:
    if not isinstance(H, np.ndarray):
        raise TypeError(f"H must be a numpy.ndarray of float64, got {type(H).__name__}")
    if H.dtype != np.float64:
        raise TypeError(f"H must have dtype float64 (the Gram accumulator), got {H.dtype}; "
                        "convert it with H.astype(np.float64)")
    if H.shape != (d_in, d_in):
        raise InvalidArgumentError(f"H has shape {H.shape} but W has {d_in} columns; pass the "
                                   f"Gram matrix of this layer's inputs ({d_in}, {d_in})")
    return H


def _high_idx(high_idx, d_in: int) -> np.ndarray:
    idx = np.asarray(high_idx if high_idx is not None else [], dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= d_in):
        raise InvalidArgumentError(f"high_idx has entries outside [0, {d_in})")
    if np.unique(idx).size != idx.size:
        raise InvalidArgumentError("high_idx has repeated columns")
    return np.sort(idx)


def _bits(b, name: str, allow16: bool = False) -> int:
    if isinstance(b, bool) or not isinstance(b, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(b).__name__}")
    b = int(b)
    if not (2 <= b <= 8 or (allow16 and b == 16)):
        raise InvalidArgumentError(f"{name} must be in 2..8{' or 16 (FP16)' if allow16 else ''}, got {b}")
    return b


def _iters(n, name: str) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise InvalidArgumentError(f"{name} must be a non-negative int, got {n!r}")
    return int(n)


def _split(d_in: int, high_idx: np.ndarray):
    mask = np.ones(d_in, bool)
    mask[high_idx] = False
    return np.flatnonzero(mask).astype(np.int64)


def _rtn_wq(Wp: np.ndarray, d_low: int, b_low: int, b_high: int, group_size: int,
            scale_bits: int = 16) -> np.ndarray:
    """Round-to-nearest of the same plan in the permuted layout (as storage.QuantizedLayer.rtn)."""
    from .storage import QuantPart
    out = np.empty_like(Wp)
    if d_low:
        out[:, :d_low] = QuantPart.from_weights(np.ascontiguousarray(Wp[:, :d_low]), b_low,
                                                group_size, scale_bits=scale_bits).dequantize()
    if d_low < Wp.shape[1]:
        Wh = np.ascontiguousarray(Wp[:, d_low:])
        out[:, d_low:] = (Wh.astype(np.float16).astype(np.float32) if b_high == 16 else
                          QuantPart.from_weights(Wh, b_high, group_size,
                                                 scale_bits=scale_bits).dequantize())
    return out


# ------------------------------------------------------------------------------------------------
# layer-wise


def quantize_layer(W: np.ndarray, H: np.ndarray, n_tokens: float, high_idx, b_low: int,
                   b_high: int, group_size: int | None, *, lwc_iters: int = 500,
                   lwc_lr: float = 1e-2, lwc_weight_decay: float = 0.0,
                   adaround_iters: int = 5000, adaround_lr: float = 1e-3, lam: float = 0.01,
                   warmup: float = 0.2, b_start: float = 20.0, b_end: float = 2.0,
                   order: str = "sequential", n_threads: int | None = None,
                   progress: Progress = None, scale_bits: int = 16,
                   low_fixed: K.PartExport | None = None, low_rounding: str = "nearest",
                   percdamp: float = 0.01) -> HybridResult:
    """Hybrid quantization of one layer on the layer-wise Gram objective.

    ``W`` float32 ``(d_out, d_in)``; ``H`` float64 ``(d_in, d_in)`` the Gram matrix of the layer's
    calibration inputs and ``n_tokens`` their count; ``high_idx`` the high-impact columns (any
    order; from Fisher column scores); ``b_low`` 2..8; ``b_high`` 2..8 or 16 (high columns kept in
    FP16, the fp16-retention baseline); ``group_size`` columns per group *within each part*, in
    ascending column order (``None``/0: per row). ``high_idx`` may be empty (LWC only) or every
    column (AdaRound only).

    ``order="sequential"`` (default, see the module docstring): LWC for ``lwc_iters`` steps on the
    low columns with the high ones at full precision (FP16 when ``b_high == 16``), then AdaRound for
    ``adaround_iters`` steps on the high columns with the low part frozen at its exported values
    (the loss covers the whole layer). ``order="joint"``: both parts learned together for
    ``adaround_iters`` steps on the whole layer (LWC at ``lwc_lr`` throughout), each step then costs
    a full ``d_in x d_in`` product — kept for the measurement that chose ``sequential``.

    ``scale_bits``: the stored scale precision (:mod:`hiquant.storage`): 16 (float16), 8 or 6
    (double-quantized codes; LWC's learned scales are rounded to it before the low part is frozen, and
    AdaRound learns its rounding on the rounded scales, so the high part compensates for exactly
    what is stored).

    ``low_fixed``: the low part already learned elsewhere (e.g. by the block-wise refinement of
    :func:`quantize_block`, in the ``low_idx`` column order): LWC is skipped and AdaRound learns
    the high columns against it.

    ``low_rounding``: how the low part's codes are chosen on its (LWC-learned or ``low_fixed``)
    grid. ``"nearest"``: round-to-nearest, as LWC trains and OmniQuant exports. ``"gptq"``: GPTQ's
    error-compensating column sweep on that fixed grid (:func:`hiquant.learners.gptq` with
    ``scale``/``zero``, damping ``percdamp``); the scales and zero points, hence the stored size,
    are unchanged. The high columns come last in the sweep's order and stay free, so the
    compensation is the one AdaRound then realizes when it learns them on the whole layer's loss;
    FP16 high columns are fixed (at W), so the sweep then sees only the low columns' Gram block.
    Measured on llama-bench (W2 g64 at 2.30 bits, 6-bit scales, refine; perplexity nearest ->
    gptq): hiq 9.349 -> 8.916, fixed-ratio 9.518 -> 8.995. With little calibration data it can
    fit the calibration set too closely (the embedded model's demo: 41.2 -> 42.7).

    ``progress(phase, done, total)`` reports each phase; Ctrl-C interrupts (KeyboardInterrupt).
    Returns a :class:`HybridResult` (codes/scales/zeros of both parts, dequantized ``wq``, loss
    history, the RTN loss of the same plan and the final loss).
    """
    t0 = time.perf_counter()
    W = _weights(W)
    d_out, d_in = W.shape
    H = _gram(H, d_in)
    b_low = _bits(b_low, "b_low")
    b_high = _bits(b_high, "b_high", allow16=True)
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer))):
        raise TypeError(f"group_size must be an int or None, got {type(group_size).__name__}")
    gs = int(group_size or 0)
    if gs < 0:
        gs = 0
    if order not in ORDERS:
        raise InvalidArgumentError(f"order must be one of {ORDERS}, got {order!r}")
    if low_rounding not in LOW_ROUNDINGS:
        raise InvalidArgumentError(f"low_rounding must be one of {LOW_ROUNDINGS}, got "
                                   f"{low_rounding!r}")
    if low_rounding == "gptq" and order != "sequential":
        raise InvalidArgumentError("low_rounding='gptq' needs order='sequential' (the low part's "
                                   "grid must be final before its codes are chosen)")
    lwc_iters, adaround_iters = _iters(lwc_iters, "lwc_iters"), _iters(adaround_iters, "adaround_iters")
    scale_bits = check_scale_bits(scale_bits)
    hi = _high_idx(high_idx, d_in)
    lo = _split(d_in, hi)
    k, d_low = hi.size, lo.size
    nt = resolve_n_threads(n_threads)
    perm = np.concatenate([lo, hi])
    Wp = np.ascontiguousarray(W[:, perm])
    Hp = np.ascontiguousarray(H[np.ix_(perm, perm)])
    obj = K.LayerwiseObjective(Wp, Hp, float(n_tokens), n_threads=nt)

    obj.set_columns(0, _rtn_wq(Wp, d_low, b_low, b_high, gs, scale_bits))
    loss_rtn = obj.full_loss()
    obj.set_columns(0, Wp)

    def cb(phase):
        if progress is None:
            return None
        return lambda done, total: progress(phase, done, total)

    history: dict = {}
    lwc = K.LWC(np.ascontiguousarray(Wp[:, :d_low]), b_low, gs, lr=lwc_lr,
                weight_decay=lwc_weight_decay, n_threads=nt) if d_low and low_fixed is None else None
    if low_fixed is not None:
        if order != "sequential":
            raise InvalidArgumentError("low_fixed needs order='sequential'")
        if not isinstance(low_fixed, K.PartExport) or low_fixed.wq.shape != (d_out, d_low):
            raise InvalidArgumentError(f"low_fixed must be the PartExport of the {d_low} low "
                                       f"columns of this layer, shape ({d_out}, {d_low})")
        if low_fixed.bits != b_low or low_fixed.group_size != gs:
            raise InvalidArgumentError("low_fixed has different bits or group size than b_low, "
                                       "group_size")
    ada = None
    high16 = None
    if k and b_high != 16:
        ada = _adaround(np.ascontiguousarray(Wp[:, d_low:]), b_high, gs, scale_bits,
                        lr=adaround_lr, lam=lam, iters=adaround_iters, warmup=warmup,
                        b_start=b_start, b_end=b_end, n_threads=nt)
    elif k:
        high16 = np.ascontiguousarray(Wp[:, d_low:]).astype(np.float16)
        obj.set_columns(d_low, high16.astype(np.float32))

    def rounded(exp: K.PartExport) -> K.PartExport:
        if low_rounding == "nearest":
            return exp
        n = d_in if b_high != 16 else d_low  # FP16 high columns are fixed, not free
        g = K.gptq(np.ascontiguousarray(Wp[:, :n]), np.ascontiguousarray(Hp[:n, :n]),
                   bits=b_low, group_size=gs or None, percdamp=percdamp, n_threads=nt,
                   scale=np.ascontiguousarray(exp.scale, np.float32), zero=exp.zero,
                   n_quant=d_low)
        history["low_rounding"] = {"method": "gptq", "loss": g.loss, "damp": g.damp,
                                   "seconds": sum(g.seconds.values())}
        return dataclasses.replace(exp, codes=g.codes, wq=g.wq)

    low_exp = high_exp = None
    if low_fixed is not None:
        low_exp = rounded(low_fixed)
        obj.set_columns(0, np.ascontiguousarray(low_exp.wq, np.float32))
    if order == "sequential" or lwc is None or ada is None:
        if lwc is not None:
            if ada is not None:  # high columns at AdaRound's soft start, i.e. (almost) W
                obj.set_columns(d_low, ada.forward())
            obj.set_active(0, d_low)
            r = K.fit(obj, lwc_iters, lwc=lwc, progress=cb("lwc"))
            history["lwc"] = {"loss": r.loss, "seconds": r.seconds}
            low_exp = rounded(_lwc_export(lwc, Wp[:, :d_low], scale_bits))
            obj.set_columns(0, low_exp.wq)
        if ada is not None:
            obj.set_active(d_low, d_in)
            r = K.fit(obj, adaround_iters, adaround=ada, adaround_col0=d_low,
                      progress=cb("adaround"))
            history["adaround"] = {"loss": r.loss, "reg": r.reg, "b": r.b, "seconds": r.seconds}
            high_exp = _ada_export(ada)
        order_used = "sequential"
    else:
        obj.set_active(0, d_in)
        r = K.fit(obj, adaround_iters, lwc=lwc, adaround=ada, adaround_col0=d_low,
                  progress=cb("joint"))
        history["joint"] = {"loss": r.loss, "reg": r.reg, "b": r.b, "seconds": r.seconds}
        low_exp, high_exp = _lwc_export(lwc, Wp[:, :d_low], scale_bits), _ada_export(ada)
        order_used = "joint"

    if low_exp is None and lwc is not None:
        low_exp = _lwc_export(lwc, Wp[:, :d_low], scale_bits)
    wq_p = np.empty_like(Wp)
    if d_low:
        wq_p[:, :d_low] = low_exp.wq
    if k:
        wq_p[:, d_low:] = high_exp.wq if high_exp is not None else high16.astype(np.float32)
    obj.set_columns(0, wq_p)
    loss_final = obj.full_loss()
    wq = np.empty_like(W)
    wq[:, perm] = wq_p
    return HybridResult(wq=wq, high_idx=hi, low_idx=lo, b_low=b_low, b_high=b_high if k else b_low,
                        group_size=gs, low=low_exp, high=high_exp, high_fp16=high16,
                        history=history, loss_rtn=loss_rtn, loss_final=loss_final,
                        order=order_used, seconds=time.perf_counter() - t0,
                        lwc_params=lwc.params if lwc is not None else None)


def layer_kwargs(settings) -> dict:
    """:func:`quantize_layer`'s iterations, learning rates, threads, scale precision and low-part
    rounding from the pipeline's settings (``lwc_iters``, ``lwc_lr``, ``adaround_iters``,
    ``adaround_lr``, ``n_threads``, ``scale_bits``, ``low_rounding``, ``gptq_percdamp``)."""
    return dict(lwc_iters=int(settings.lwc_iters), lwc_lr=float(settings.lwc_lr),
                adaround_iters=int(settings.adaround_iters),
                adaround_lr=float(settings.adaround_lr), n_threads=settings.n_threads,
                scale_bits=int(getattr(settings, "scale_bits", 16)),
                low_rounding=getattr(settings, "low_rounding", "nearest"),
                percdamp=float(getattr(settings, "gptq_percdamp", 0.01)))


def quantize_layer_as(name: str, W: np.ndarray, H: np.ndarray, n_tokens: int, plan, *, mode: str,
                      settings):
    """The pipeline's entry (hiquant.pipeline): quantize one layer for a method's ``plan`` and
    return a :class:`hiquant.storage.QuantizedLayer`.

    ``mode``: ``"lwc"`` (LWC on every column), ``"adaround"`` (AdaRound on every column at
    ``b_low``, stored as the low part) or ``"hybrid"`` (the plan's high columns at ``b_high``).
    Iterations and learning rates come from ``settings`` (``lwc_iters``, ``lwc_lr``,
    ``adaround_iters``, ``adaround_lr``, ``n_threads``).
    """
    kw = layer_kwargs(settings)
    if mode == "lwc":
        res = quantize_layer(W, H, n_tokens, [], plan.b_low, plan.b_low, plan.group_size, **kw)
        return res.to_layer(name)
    if mode == "adaround":
        d_in = W.shape[1]
        res = quantize_layer(W, H, n_tokens, np.arange(d_in), plan.b_low, plan.b_low,
                             plan.group_size, **kw)
        # every column was learned by AdaRound: store it as the (only) low part, no mask
        from .storage import QuantizedLayer
        low = _part(plan.b_low, res.group_size, res.high)
        return QuantizedLayer(name, W.shape[0], d_in, np.zeros(0, np.int64), low, None, None,
                              {"order": "adaround", "loss_final": res.loss_final,
                               "loss_rtn": res.loss_rtn, "seconds": res.seconds})
    if mode == "hybrid":
        res = quantize_layer(W, H, n_tokens, plan.high_idx, plan.b_low,
                             plan.b_high if plan.k else plan.b_low, plan.group_size, **kw)
        return res.to_layer(name)
    raise InvalidArgumentError(f"mode must be 'lwc', 'adaround' or 'hybrid', got {mode!r}")


# ------------------------------------------------------------------------------------------------
# block-wise


def cosine_lr(lr: float, step: int, total: int) -> float:
    """The learning rate of step ``step`` (0-based) of ``total`` under a half-cosine decay from
    ``lr`` (step 0) towards 0 (reached after the last step)."""
    return lr * 0.5 * (1.0 + math.cos(math.pi * step / total))


def block_loss(out: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray]:
    """Reconstruction loss of a block's output and its gradient: the mean over tokens of the
    squared error summed over the hidden dimension (BRECQ's ``lp_loss``: per-token sum, mean over
    tokens — the same scale as the layer-wise objective, so ``lam`` means the same in both)."""
    diff = out.astype(np.float64) - target.astype(np.float64)
    n_tok = out.shape[0] * out.shape[1]
    return float((diff * diff).sum() / n_tok), (2.0 / n_tok * diff).astype(out.dtype)


class _BlockLinear:
    """One linear of the block: its parts, column split and current W_q."""

    def __init__(self, name, W, plan, lwc_kw, ada_kw, nt, scale_bits=16):
        self.name, self.W = name, W
        d_in = W.shape[1]
        self.hi = _high_idx(plan.high_idx if plan.k else [], d_in)
        self.lo = _split(d_in, self.hi)
        self.b_low = _bits(plan.b_low, "b_low")
        self.b_high = _bits(plan.b_high, "b_high", allow16=True) if self.hi.size else self.b_low
        self.gs = int(plan.group_size or 0)
        self.lwc = (K.LWC(np.ascontiguousarray(W[:, self.lo]), self.b_low, self.gs, n_threads=nt,
                          **lwc_kw) if self.lo.size else None)
        self.ada = self.high16 = None
        self.wq = W.copy()
        if self.hi.size and self.b_high != 16:
            self.ada = _adaround(np.ascontiguousarray(W[:, self.hi]), self.b_high, self.gs,
                                 scale_bits, n_threads=nt, **ada_kw)
            self.wq[:, self.hi] = self.ada.forward()
        elif self.hi.size:
            self.high16 = np.ascontiguousarray(W[:, self.hi]).astype(np.float16)
            self.wq[:, self.hi] = self.high16.astype(np.float32)
        self.low_exp = self.high_exp = None


def quantize_block(model, i: int, inputs: np.ndarray, plans: dict, *,
                   targets: np.ndarray | None = None, lwc_iters: int = 500, lwc_lr: float = 1e-2,
                   lwc_weight_decay: float = 0.0, adaround_iters: int = 5000,
                   adaround_lr: float = 1e-3, lam: float = 0.01, warmup: float = 0.2,
                   b_start: float = 20.0, b_end: float = 2.0, batch_size: int = 1, seed: int = 0,
                   n_threads: int | None = None, progress: Progress = None,
                   scale_bits: int = 16, lwc_init: dict | None = None,
                   aug_targets: np.ndarray | None = None, high_fixed: dict | None = None,
                   lwc_schedule: str = "constant") -> dict:
    """Hybrid quantization of the seven linears of block ``i`` on the block-wise objective.

    ``model``: a :class:`hiquant.model.Model`; ``inputs``: the calibration hidden states entering
    block ``i`` (``(n, seqlen, hidden)`` in the model's compute dtype, from the already-quantized
    blocks before it); ``plans``: ``{linear name: plan}`` with ``k``, ``high_idx``, ``b_low``,
    ``b_high``, ``group_size`` (:class:`hiquant.methods.LayerPlan`); ``targets``: the block's
    full-precision outputs (default: computed here with the current weights before any change).
    Each step takes ``batch_size`` sequences (a seeded permutation per epoch), runs the block
    forward and backward with the parts' current ``W_q`` and updates the parts from
    ``dL/dW_q``: LWC for ``lwc_iters`` steps (high columns at full precision / FP16), then AdaRound
    for ``adaround_iters`` steps with the low parts frozen at their exported values. The block's
    weights in ``model`` are left at the final quantized values. ``lwc_init``: ``{name: (gamma,
    beta)}`` to start LWC from (e.g. the layer-wise result's ``lwc_params``: block-wise
    refinement of a layer-wise solution) instead of OmniQuant's initialization.
    ``aug_targets``: OmniQuant's ``aug_loss`` — a second target, the full-precision block's output
    on the quantized path's ``inputs``; each step's loss is the sum of the errors against both
    (``loss_final`` reports the error against ``targets`` alone). ``high_fixed``: ``{name:
    PartExport}`` of high columns already quantized elsewhere (e.g. by layer-wise AdaRound): they
    keep those values throughout — the clipping is learned with the block seeing the high
    columns' real quantization error — and are returned unchanged. ``lwc_schedule``:
    ``"constant"`` (OmniQuant's) or ``"cosine"`` (LWC's learning rate decays from ``lwc_lr`` to
    0 over ``lwc_iters`` steps along a half cosine). Returns ``{name:
    HybridResult}`` (``history`` holds the block's loss per step).
    """
    names = model.block_linear_names(i)
    missing = [n for n in names if n not in plans]
    if missing:
        raise InvalidArgumentError(f"plans has no entry for {missing}; pass one plan per linear")
    if not isinstance(inputs, np.ndarray) or inputs.ndim != 3:
        raise InvalidArgumentError("inputs must be a (n, seqlen, hidden) numpy array")
    lwc_iters, adaround_iters = _iters(lwc_iters, "lwc_iters"), _iters(adaround_iters, "adaround_iters")
    if lwc_schedule not in LWC_SCHEDULES:
        raise InvalidArgumentError(f"lwc_schedule must be one of {', '.join(LWC_SCHEDULES)}, got "
                                   f"{lwc_schedule!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be a positive int, got {batch_size!r}")
    nt = resolve_n_threads(n_threads)
    t0 = time.perf_counter()
    if targets is None:
        targets = np.concatenate([model.block_forward(i, inputs[a:a + batch_size])
                                  for a in range(0, len(inputs), batch_size)])
    if targets.shape != inputs.shape:
        raise InvalidArgumentError(f"targets have shape {targets.shape}, inputs {inputs.shape}")
    if aug_targets is not None and aug_targets.shape != inputs.shape:
        raise InvalidArgumentError(f"aug_targets have shape {aug_targets.shape}, inputs {inputs.shape}")
    lin = {n: _BlockLinear(n, _weights(np.asarray(model.get_weight(n), np.float32)), plans[n],
                           dict(lr=lwc_lr, weight_decay=lwc_weight_decay),
                           dict(lr=adaround_lr, lam=lam, iters=adaround_iters, warmup=warmup,
                                b_start=b_start, b_end=b_end), nt, check_scale_bits(scale_bits))
           for n in names}
    for n, p in (lwc_init or {}).items():
        if n not in lin:
            raise InvalidArgumentError(f"lwc_init has an entry for {n!r}, which is not a linear of "
                                       f"block {i} ({names})")
        L = lin[n]
        if L.lwc is None:
            continue
        p = np.ascontiguousarray(p, dtype=np.float32)
        if p.shape != L.lwc.params.shape:
            raise InvalidArgumentError(f"lwc_init[{n!r}] has shape {p.shape}, expected "
                                       f"{L.lwc.params.shape} (gamma, beta per row and group)")
        L.lwc.params = p
        L.wq[:, L.lo] = L.lwc.forward()
    for n, exp in (high_fixed or {}).items():
        if n not in lin:
            raise InvalidArgumentError(f"high_fixed has an entry for {n!r}, which is not a linear "
                                       f"of block {i} ({names})")
        L = lin[n]
        if L.ada is None:
            raise InvalidArgumentError(f"high_fixed[{n!r}]: its plan has no quantized high columns "
                                       f"(k = {L.hi.size}, b_high = {L.b_high})")
        if (not isinstance(exp, K.PartExport) or exp.wq.shape != (L.W.shape[0], L.hi.size)
                or exp.bits != L.b_high or exp.group_size != L.gs):
            raise InvalidArgumentError(f"high_fixed[{n!r}] must be the PartExport of the "
                                       f"{L.hi.size} high columns at {L.b_high} bits, group size "
                                       f"{L.gs}")
        L.ada, L.high_exp = None, exp
        L.wq[:, L.hi] = exp.wq
    rng = np.random.default_rng(seed)
    order: list = []

    def batch():
        nonlocal order
        if not order:
            order = list(rng.permutation(len(inputs)))
        take, order = order[:batch_size], order[batch_size:]
        return np.sort(np.asarray(take))

    def run(phase: str, iters: int, update) -> dict:
        losses = np.empty(iters)
        regs = np.zeros(iters)
        for t in range(iters):
            for L in lin.values():
                model.set_weight(L.name, L.wq)
            sel = batch()
            out, cache = model.block_forward(i, inputs[sel], cache=True)
            loss, dout = block_loss(out, targets[sel])
            if aug_targets is not None:
                loss_aug, dout_aug = block_loss(out, aug_targets[sel])
                loss += loss_aug
                dout += dout_aug
            if not np.isfinite(loss):
                raise NumericalError(f"block {i} reconstruction loss became non-finite in {phase}")
            _, grads = model.block_backward(i, cache, dout)
            losses[t] = loss
            for L in lin.values():
                regs[t] += update(L, np.ascontiguousarray(grads[L.name], dtype=np.float32))
            if progress is not None:
                progress(phase, t + 1, iters)
        return {"loss": losses, "reg": regs}

    history: dict = {}

    def lwc_update(L, dW):
        if L.lwc is None:
            return 0.0
        if lwc_schedule == "cosine":
            L.lwc.lr = cosine_lr(lwc_lr, L.lwc.steps, lwc_iters)
        L.lwc.step(np.ascontiguousarray(dW[:, L.lo]))
        L.wq[:, L.lo] = L.lwc.forward()
        return 0.0

    if lwc_iters:
        history["lwc"] = run("lwc", lwc_iters, lwc_update)
    for L in lin.values():
        if L.lwc is not None:
            L.low_exp = _lwc_export(L.lwc, L.W[:, L.lo], scale_bits)
            L.wq[:, L.lo] = L.low_exp.wq

    def ada_update(L, dW):
        if L.ada is None:
            return 0.0
        reg = L.ada.step(np.ascontiguousarray(dW[:, L.hi]))
        L.wq[:, L.hi] = L.ada.forward()
        return reg

    if adaround_iters and any(L.ada is not None for L in lin.values()):
        history["adaround"] = run("adaround", adaround_iters, ada_update)
    results = {}
    seconds = time.perf_counter() - t0
    for L in lin.values():
        if L.ada is not None:
            L.high_exp = _ada_export(L.ada)
            L.wq[:, L.hi] = L.high_exp.wq
        model.set_weight(L.name, L.wq)
        results[L.name] = HybridResult(
            wq=L.wq.copy(), high_idx=L.hi, low_idx=L.lo, b_low=L.b_low, b_high=L.b_high,
            group_size=L.gs, low=L.low_exp, high=L.high_exp, high_fp16=L.high16, history=history,
            order="sequential", seconds=seconds,
            lwc_params=L.lwc.params.copy() if L.lwc is not None else None)
    final = []
    for a in range(0, len(inputs), batch_size):
        out = model.block_forward(i, inputs[a:a + batch_size])
        final.append(block_loss(out, targets[a:a + batch_size])[0] * out.shape[0] * out.shape[1])
    loss_final = float(sum(final) / (inputs.shape[0] * inputs.shape[1]))
    for r in results.values():
        r.loss_final = loss_final
    return results
