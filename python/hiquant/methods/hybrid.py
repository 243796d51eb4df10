"""The hybrid layer quantizer (hiq, fixed-ratio, fp16-retention): the high-impact input columns
with AdaRound at ``b_high`` bits (or kept in FP16), the rest with learnable weight clipping (LWC)
at ``b_low`` bits, on the layer-wise Gram objective ``tr((W_q - W) H (W_q - W)^T) / N`` trained in
C++ (:mod:`hiquant.learners`). The block-wise objectives reuse it (:mod:`hiquant.blockwise`).

Decision: the two parts are learned in sequence, not jointly (``order="sequential"``). LWC is
learned first with the high columns at full precision (AdaRound's soft start reproduces them),
then frozen at its stored values; AdaRound then learns the high columns on the loss of the whole
layer, compensating for the low part's residual error. Sequential reached a lower layer loss on
every layer measured (``python bench/kernels.py --order``; numbers in bench/RESULTS.md) and is
cheaper: an AdaRound step on ``k`` high columns against a frozen low part costs ``O(d_out k^2)``
instead of ``O(d_out d_in^2)``. ``order="joint"`` stays available for re-measurement.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from .. import learners as K
from .._threads import resolve_n_threads
from ..config import LOW_ROUNDINGS, check_bits, check_group_size, check_scale_bits
from ..errors import InvalidArgumentError, InvalidTypeError, NumericalError
from ..storage import QuantizedLayer, QuantPart

__all__ = ["HybridResult", "quantize_layer", "quantize", "layer_options", "ORDERS", "check_weight",
           "check_gram", "check_high_idx", "check_iters", "low_columns"]

ORDERS = ("sequential", "joint")

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
    low: QuantPart | None  # None when every column is high-impact
    high: QuantPart | None  # None when k == 0 or b_high == 16
    high_fp16: np.ndarray | None  # float16 (d_out, k) when b_high == 16
    history: dict = field(default_factory=dict)  # per phase: loss (and reg, b) per step
    loss_rtn: float | None = None  # the objective at round-to-nearest of the same plan
    loss_final: float | None = None  # the objective at the returned wq
    order: str = "sequential"
    seconds: float = 0.0
    lwc_params: np.ndarray | None = None  # LWC's learned (gamma, beta), (2, d_out, n_groups)

    def to_layer(self, name: str, *, info: dict | None = None) -> QuantizedLayer:
        """The :class:`hiquant.storage.QuantizedLayer` (exact round trip)."""
        d_out = self.wq.shape[0]
        low = self.low
        if low is None:
            low = QuantPart(self.b_low, self.group_size, np.zeros((d_out, 0), np.uint8),
                            np.zeros((d_out, 0), np.float16), np.zeros((d_out, 0), np.uint8))
        notes = {"order": self.order, "seconds": self.seconds}
        if self.loss_final is not None:
            notes["loss_final"] = self.loss_final
        if self.loss_rtn is not None:
            notes["loss_rtn"] = self.loss_rtn
        notes.update(info or {})
        return QuantizedLayer(name, d_out, self.wq.shape[1], self.high_idx, low, self.high,
                              self.high_fp16, notes)


# ------------------------------------------------------------------------------------------------
# validation


def check_weight(W) -> np.ndarray:
    if not isinstance(W, np.ndarray):
        raise InvalidTypeError(f"W must be a numpy.ndarray of float32, got {type(W).__name__}")
    if W.dtype != np.float32:
        raise InvalidTypeError(f"W must have dtype float32, got {W.dtype}; convert it with "
                               "W.astype(np.float32)")
    if W.ndim != 2 or W.size == 0:
        raise InvalidArgumentError(f"W must be a non-empty (d_out, d_in) matrix, got shape {W.shape}")
    if not np.all(np.isfinite(W)):
        r, c = np.argwhere(~np.isfinite(W))[0]
        raise NumericalError(f"W is not finite at row {r}, column {c}; check the checkpoint")
    return np.ascontiguousarray(W)


def check_gram(H, d_in: int) -> np.ndarray:
    if not isinstance(H, np.ndarray):
        raise InvalidTypeError(f"H must be a numpy.ndarray of float64, got {type(H).__name__}")
    if H.dtype != np.float64:
        raise InvalidTypeError(f"H must have dtype float64 (the Gram accumulator), got {H.dtype}; "
                        "convert it with H.astype(np.float64)")
    if H.shape != (d_in, d_in):
        raise InvalidArgumentError(f"H has shape {H.shape} but W has {d_in} columns; pass the "
                                   f"Gram matrix of this layer's inputs ({d_in}, {d_in})")
    return H


def check_high_idx(high_idx, d_in: int) -> np.ndarray:
    idx = np.asarray(high_idx if high_idx is not None else [], dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= d_in):
        raise InvalidArgumentError(f"high_idx has entries outside [0, {d_in})")
    if np.unique(idx).size != idx.size:
        raise InvalidArgumentError("high_idx has repeated columns")
    return np.sort(idx)


def check_iters(n, name: str) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise InvalidArgumentError(f"{name} must be a non-negative int, got {n!r}")
    return int(n)


def low_columns(d_in: int, high_idx: np.ndarray):
    mask = np.ones(d_in, bool)
    mask[high_idx] = False
    return np.flatnonzero(mask).astype(np.int64)


def _rtn_wq(Wp: np.ndarray, d_low: int, b_low: int, b_high: int, group_size: int,
            scale_bits: int = 16) -> np.ndarray:
    """Round-to-nearest of the same plan in the permuted layout (as storage.QuantizedLayer.rtn)."""
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
                   low_fixed: QuantPart | None = None, low_rounding: str = "nearest",
                   percdamp: float = 0.01, act_order: bool = False,
                   high_compensation: bool = False) -> HybridResult:
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
    are unchanged; ``act_order`` sweeps the low columns by decreasing Gram diagonal (the grid is
    fixed, so the order is free). The high columns come last in the sweep's order and stay free, so the
    compensation is the one AdaRound then realizes when it learns them on the whole layer's loss;
    FP16 high columns are fixed (at W), so the sweep then sees only the low columns' Gram block.
    With few calibration tokens per input channel it can fit the calibration set too closely
    (measurements in bench/RESULTS.md).

    ``progress(phase, done, total)`` reports each phase; Ctrl-C interrupts (KeyboardInterrupt).
    Returns a :class:`HybridResult` (codes/scales/zeros of both parts, dequantized ``wq``, loss
    history, the RTN loss of the same plan and the final loss).
    """
    t0 = time.perf_counter()
    W = check_weight(W)
    d_out, d_in = W.shape
    H = check_gram(H, d_in)
    b_low = check_bits(b_low, "b_low")
    b_high = check_bits(b_high, "b_high", allow_fp16=True)
    gs = check_group_size(group_size)
    if order not in ORDERS:
        raise InvalidArgumentError(f"order must be one of {ORDERS}, got {order!r}")
    if low_rounding not in LOW_ROUNDINGS:
        raise InvalidArgumentError(f"low_rounding must be one of {LOW_ROUNDINGS}, got "
                                   f"{low_rounding!r}")
    if low_rounding == "gptq" and order != "sequential":
        raise InvalidArgumentError("low_rounding='gptq' needs order='sequential' (the low part's "
                                   "grid must be final before its codes are chosen)")
    lwc_iters = check_iters(lwc_iters, "lwc_iters")
    adaround_iters = check_iters(adaround_iters, "adaround_iters")
    scale_bits = check_scale_bits(scale_bits)
    hi = check_high_idx(high_idx, d_in)
    lo = low_columns(d_in, hi)
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
        if not isinstance(low_fixed, QuantPart) or low_fixed.codes.shape != (d_out, d_low):
            raise InvalidArgumentError(f"low_fixed must be the QuantPart of the {d_low} low "
                                       f"columns of this layer, shape ({d_out}, {d_low})")
        if low_fixed.bits != b_low or low_fixed.group_size != gs:
            raise InvalidArgumentError("low_fixed has different bits or group size than b_low, "
                                       "group_size")
    def adaround(Wh: np.ndarray) -> K.AdaRound:  # the high part's learner around the columns Wh
        return K.AdaRound(Wh, b_high, gs, lr=adaround_lr, lam=lam, iters=adaround_iters,
                          warmup=warmup, b_start=b_start, b_end=b_end, n_threads=nt,
                          scale_bits=scale_bits)

    ada = None
    high16 = None
    if k and b_high != 16:
        ada = adaround(np.ascontiguousarray(Wp[:, d_low:]))
    elif k:
        high16 = np.ascontiguousarray(Wp[:, d_low:]).astype(np.float16)
        obj.set_columns(d_low, high16.astype(np.float32))

    def rounded(exp: QuantPart) -> QuantPart:
        if low_rounding == "nearest":
            return exp
        n = d_in if b_high != 16 else d_low  # FP16 high columns are fixed, not free
        g = K.gptq(np.ascontiguousarray(Wp[:, :n]), np.ascontiguousarray(Hp[:n, :n]),
                   bits=b_low, group_size=gs or None, percdamp=percdamp, n_threads=nt,
                   scale=np.ascontiguousarray(exp.scale_f32()), zero=exp.zero,
                   n_quant=d_low, act_order=act_order)
        history["low_rounding"] = {"method": "gptq", "act_order": bool(act_order),
                                   "loss": g.loss, "damp": g.damp,
                                   "seconds": sum(g.seconds.values())}
        return dataclasses.replace(exp, codes=g.codes)

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
            low_exp = rounded(lwc.export(Wp[:, :d_low], scale_bits))
            obj.set_columns(0, low_exp.wq)
        if ada is not None:
            if high_compensation and d_low:
                ada = adaround(compensated_high(Wp, Hp, low_exp.wq, d_low, percdamp))
            obj.set_active(d_low, d_in)
            r = K.fit(obj, adaround_iters, adaround=ada, adaround_col0=d_low,
                      progress=cb("adaround"))
            history["adaround"] = {"loss": r.loss, "reg": r.reg, "b": r.b, "seconds": r.seconds}
            high_exp = ada.export()
        order_used = "sequential"
    else:
        obj.set_active(0, d_in)
        r = K.fit(obj, adaround_iters, lwc=lwc, adaround=ada, adaround_col0=d_low,
                  progress=cb("joint"))
        history["joint"] = {"loss": r.loss, "reg": r.reg, "b": r.b, "seconds": r.seconds}
        low_exp, high_exp = lwc.export(Wp[:, :d_low], scale_bits), ada.export()
        order_used = "joint"

    if low_exp is None and lwc is not None:
        low_exp = lwc.export(Wp[:, :d_low], scale_bits)
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


def compensated_high(Wp: np.ndarray, Hp: np.ndarray, wq_low: np.ndarray, d_low: int,
                     percdamp: float) -> np.ndarray:
    """The high columns' least-squares targets given the frozen low part: with the columns in
    (low, high) order, ``Wp`` float32 ``(d_out, d_in)``, ``Hp`` its float64 Gram and ``wq_low``
    the low part's quantized values, ``W_H - E_L H_LH (H_HH + λI)^-1`` where ``E_L = wq_low - W_L``
    and ``λ = percdamp · mean(diag H_HH)`` (GPTQ's damping). Minimizes the layer loss over
    continuous high columns; float32 ``(d_out, d_in - d_low)``."""
    E = np.asarray(wq_low, np.float64) - Wp[:, :d_low]
    Hhh = np.array(Hp[d_low:, d_low:], np.float64)
    Hhh[np.diag_indices_from(Hhh)] += percdamp * float(np.mean(np.diag(Hhh)))
    try:
        L = np.linalg.cholesky(Hhh)
    except np.linalg.LinAlgError as e:
        raise NumericalError("the damped Gram block of the high columns is not positive definite;"
                             " raise gptq_percdamp or turn high_compensation off") from e
    rhs = (E @ Hp[:d_low, d_low:]).T  # (k, d_out)
    delta = -np.linalg.solve(L.T, np.linalg.solve(L, rhs)).T
    return np.ascontiguousarray(Wp[:, d_low:] + delta, np.float32)


def layer_options(settings) -> dict:
    """:func:`quantize_layer`'s keyword options from resolved settings: iterations and learning
    rates of LWC and AdaRound, threads, scale storage, the low part's rounding and its damping."""
    return dict(lwc_iters=int(settings.lwc_iters), lwc_lr=float(settings.lwc_lr),
                adaround_iters=int(settings.adaround_iters),
                adaround_lr=float(settings.adaround_lr), n_threads=settings.n_threads,
                scale_bits=int(settings.scale_bits), low_rounding=settings.low_rounding,
                percdamp=float(settings.gptq_percdamp),
                act_order=bool(settings.gptq_act_order),
                high_compensation=bool(settings.high_compensation))


def quantize(name, W, stats, plan, settings) -> QuantizedLayer:
    """The hybrid method's layer quantizer (hiq, fixed-ratio, fp16-retention): the plan's high
    columns at ``plan.b_high`` bits with AdaRound (or FP16), the rest at ``plan.b_low`` bits with
    LWC, on the layer-wise Gram objective of ``stats``."""
    res = quantize_layer(W, stats.gram, stats.n_tokens, plan.high_idx, plan.b_low,
                         plan.b_high if plan.k else plan.b_low, plan.group_size,
                         **layer_options(settings))
    return res.to_layer(name)
