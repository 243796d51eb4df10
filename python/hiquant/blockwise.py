"""Block-wise objectives of the learned quantizers: the reconstruction error of a whole
transformer block's output, ``mean over tokens of ||block(h; W_q) - target||^2``, with
``dL/dW_q`` of every linear from the model runtime's block backward.

* :func:`quantize_block` — LWC (then AdaRound for the high columns) of a block's linears learned
  on the block objective from mini-batches of windows (OmniQuant's objective,
  ``objective="block"``).
* :func:`refine_block` — ``objective="refine"``: the layer-wise LWC solution, block-wise
  refinement of its clipping, GPTQ codes on the refined grid (``low_rounding="gptq"``), then
  layer-wise AdaRound of the high columns against the frozen low part.

Both leave the block's weights in the model runtime quantized and return ``{name:
QuantizedLayer}`` (``block_pass`` / ``refine_block``) or ``{name: HybridResult}``
(``quantize_block``).
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional

import numpy as np

from . import learners as K
from ._threads import map_ordered, resolve_n_threads
from .allocate import LayerPlan
from .config import LWC_SCHEDULES, check_bits, check_scale_bits
from .errors import InvalidArgumentError, NumericalError
from .methods.hybrid import (
    HybridResult,
    check_high_idx,
    check_iters,
    check_weight,
    layer_options,
    low_columns,
    quantize_layer,
)
from .storage import QuantPart

__all__ = ["quantize_block", "refine_block", "block_pass", "block_outputs", "block_loss",
           "block_steps", "cosine_lr"]

Progress = Optional[Callable[[str, int, int], None]]


def batches(n: int, size: int):
    """Consecutive slices of ``size`` (the last one shorter) covering ``range(n)``."""
    for a in range(0, n, size):
        yield slice(a, min(n, a + size))


def block_outputs(model, b: int, h: np.ndarray, batch_size: int, n_threads) -> np.ndarray:
    """Block ``b``'s outputs for the hidden states ``h`` (batches on the worker pool, in order)."""
    outs = map_ordered(lambda sl: model.block_forward(b, h[sl]),
                       list(batches(len(h), batch_size)), n_threads)
    return np.concatenate(outs)


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
        self.hi = check_high_idx(plan.high_idx if plan.k else [], d_in)
        self.lo = low_columns(d_in, self.hi)
        self.b_low = check_bits(plan.b_low, "b_low")
        self.b_high = check_bits(plan.b_high, "b_high", allow_fp16=True) if self.hi.size else self.b_low
        self.gs = int(plan.group_size or 0)
        self.lwc = (K.LWC(np.ascontiguousarray(W[:, self.lo]), self.b_low, self.gs, n_threads=nt,
                          **lwc_kw) if self.lo.size else None)
        self.ada = self.high16 = None
        self.wq = W.copy()
        if self.hi.size and self.b_high != 16:
            self.ada = K.AdaRound(np.ascontiguousarray(W[:, self.hi]), self.b_high, self.gs,
                                  n_threads=nt, scale_bits=scale_bits, **ada_kw)
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
    ``b_high``, ``group_size`` (:class:`hiquant.allocate.LayerPlan`); ``targets``: the block's
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
    QuantPart}`` of high columns already quantized elsewhere (e.g. by layer-wise AdaRound): they
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
    lwc_iters = check_iters(lwc_iters, "lwc_iters")
    adaround_iters = check_iters(adaround_iters, "adaround_iters")
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
    lin = {n: _BlockLinear(n, check_weight(np.asarray(model.get_weight(n), np.float32)), plans[n],
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
        if (not isinstance(exp, QuantPart) or exp.codes.shape != (L.W.shape[0], L.hi.size)
                or exp.bits != L.b_high or exp.group_size != L.gs):
            raise InvalidArgumentError(f"high_fixed[{n!r}] must be the QuantPart of the "
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
            L.low_exp = L.lwc.export(L.W[:, L.lo], scale_bits)
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
            L.high_exp = L.ada.export()
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


def block_steps(n_windows: int, s) -> int:
    """Optimizer steps of a block-wise pass over ``n_windows`` windows."""
    return s.block_epochs * -(-n_windows // s.block_batch)


def block_pass(model, b: int, h: np.ndarray, targets: np.ndarray, plans: dict, s, *,
               adaround: bool, lwc_init: dict | None = None,
               aug_targets: np.ndarray | None = None, high_fixed: dict | None = None) -> dict:
    """:func:`quantize_block` of block ``b`` with the resolved settings' block-wise options (the
    one place they are read)."""
    steps = block_steps(len(h), s)
    return quantize_block(
        model, b, h, plans, targets=targets, lwc_iters=steps,
        lwc_lr=s.block_lr if s.block_lr is not None else s.lwc_lr,
        adaround_iters=steps if adaround else 0, adaround_lr=s.adaround_lr,
        batch_size=s.block_batch, seed=s.seed + b, n_threads=s.n_threads,
        scale_bits=s.scale_bits, lwc_init=lwc_init, aug_targets=aug_targets,
        high_fixed=high_fixed, lwc_schedule=s.block_lr_schedule)


def refine_block(model, b: int, h: np.ndarray, targets: np.ndarray, plans: dict, kind: str, s,
                 grams, aug_targets: np.ndarray | None = None) -> dict:
    """objective="refine" for block ``b``: (1) LWC of every linear on its layer-wise Gram
    objective (cheap, full batch); (2) block-wise refinement of those clipping parameters on the
    block's output error against the full-precision targets — the one thing a layer-wise
    objective cannot see: the error the block receives from the quantized blocks before it, and
    how its seven layers' errors combine through attention and the MLP; (3) with
    ``low_rounding="gptq"``, the low parts' codes re-chosen on their refined grids by GPTQ's
    error-compensating sweep (the grid, so the size, unchanged); (4) with the low parts frozen,
    AdaRound of the high columns on the layer-wise objective (5000 cheap Gram steps instead of a
    few hundred block steps). Leaves the block's weights in ``model`` quantized and returns
    ``{name: QuantizedLayer}``. With ``refine_order="adaround-first"`` (1) also runs the
    layer-wise AdaRound, (2) keeps its high columns fixed, and there is no (3) or (4)."""
    names = model.block_linear_names(b)
    W = {n: model.get_weight(n) for n in names}
    kw = layer_options(s)
    # the lwc quantizer (also as an ablation of a hybrid method's plans) has no high columns
    block_plans = {n: plans[n] if kind == "hybrid" else
                   LayerPlan(0, np.zeros(0, np.int64), plans[n].b_low, plans[n].b_low,
                             plans[n].group_size) for n in names}
    adaround_first = s.refine_order == "adaround-first"
    lwc_init, high_fixed = {}, {}
    for n in names:
        H, ntok = grams[n].gram, grams[n].n_tokens
        p = block_plans[n]
        ada = adaround_first and p.k and p.b_high != 16
        # only LWC's clipping is kept from here when the block pass follows: no rounding pass
        r = quantize_layer(W[n], H, ntok, p.high_idx, p.b_low, p.b_high if p.k else p.b_low,
                                  p.group_size, **(kw if ada else {**kw, "adaround_iters": 0,
                                                                   "low_rounding": "nearest"}))
        if r.lwc_params is not None:
            lwc_init[n] = r.lwc_params
        if ada:
            high_fixed[n] = r.high
    res = block_pass(model, b, h, targets, block_plans, s, adaround=False, lwc_init=lwc_init,
                      aug_targets=aug_targets, high_fixed=high_fixed)
    steps = block_steps(len(h), s)
    out = {}
    for n in names:
        p = block_plans[n]
        info = {"objective": "refine", "steps": steps}
        adaround_part = p.k and p.b_high != 16 and not adaround_first
        if adaround_part or (s.low_rounding == "gptq" and res[n].low is not None):
            H, ntok = grams[n].gram, grams[n].n_tokens
            r = quantize_layer(W[n], H, ntok, p.high_idx, p.b_low,
                                      p.b_high if p.k else p.b_low, p.group_size,
                                      low_fixed=res[n].low, **kw)
            ql = r.to_layer(n, info=info)
        else:  # neither AdaRound nor a rounding pass: the block pass's result is final
            ql = res[n].to_layer(n, info=info)
        model.set_weight(n, ql)
        out[n] = ql
    return out
