"""Learned quantizer parts (LWC, AdaRound), their Adam state, the layer-wise Gram objective, and
GPTQ — native kernels behind a small Python API.

One design for every learned quantizer: a *part* covers some columns of a weight matrix and has

* ``forward()`` — its current fake-quantized weights ``W_q`` (float32),
* ``backward(dwq)`` — the gradient of the loss w.r.t. its parameters from ``dL/dW_q``
  (straight-through where rounding is involved),
* ``step(dwq)`` — backward plus one Adam(W) update of its parameters (state kept in C++),
* ``export()`` — the final integer form as the stored part, a :class:`hiquant.storage.QuantPart`
  (uint8 codes, scales at the stored precision — float16 or double-quantized codes — and uint8
  zeros); its ``wq`` is exactly the fake-quantized weights the part stores.

The same parts serve two objectives: the *layer-wise* Gram objective (:class:`LayerwiseObjective`,
trained by :func:`fit` entirely in C++), and any objective whose ``dL/dW_q`` the caller computes,
e.g. the block-wise reconstruction of :func:`hiquant.blockwise.quantize_block`.

Defaults (stated, and where they come from):

* LWC (OmniQuant ``UniformAffineQuantizer`` with ``lwc=True``): ``gamma = beta = 4`` at start
  (``sigmoid(4) = 0.982``), AdamW with ``lr = 1e-2`` and ``weight_decay = 0`` (OmniQuant's
  ``--lwc_lr`` and ``--wd`` defaults). The clipping range is forced to include 0 (see
  :class:`LWC`).
* AdaRound (BRECQ ``AdaRoundQuantizer`` / ``LossFunction``): ``zeta = 1.1``, ``gamma = -0.1``,
  Adam ``lr = 1e-3`` (``torch.optim.Adam``'s default, which BRECQ uses), rounding regularizer
  weight ``lam = 0.01`` (BRECQ's ``--weight``), exponent ``b`` annealed linearly from 20 to 2 after
  a 20% warm-up without regularization, 5,000 iterations (the paper's).

Shapes and dtypes: weights, gradients float32 C-contiguous ``(d_out, n_cols)``; Gram matrices
float64 ``(d_in, d_in)``; codes and zeros uint8; scales float32. Wrong dtypes raise ``TypeError``,
wrong shapes ``ValueError``, NaN/Inf :class:`hiquant.NumericalError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from . import _core
from ._threads import resolve_n_threads
from .config import check_group_size
from .errors import InvalidArgumentError, InvalidTypeError

__all__ = [
    "LWC",
    "AdaRound",
    "LayerwiseObjective",
    "FitResult",
    "fit",
    "gram_loss",
    "adaround_schedule",
    "GPTQResult",
    "gptq",
    "LWC_DEFAULTS",
    "ADAROUND_DEFAULTS",
]

LWC_DEFAULTS = dict(init=4.0, lr=1e-2, weight_decay=0.0)
ADAROUND_DEFAULTS = dict(lr=1e-3, lam=0.01, iters=5000, warmup=0.2, b_start=20.0, b_end=2.0)

Progress = Optional[Callable[[int, int], None]]


def _int(x, name: str) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise InvalidTypeError(f"{name} must be an int, got {type(x).__name__}")
    return int(x)


def _group(group_size) -> int:
    return check_group_size(group_size)


def _float(x, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)):
        raise InvalidTypeError(f"{name} must be a number, got {type(x).__name__}")
    x = float(x)
    if not np.isfinite(x):
        raise InvalidArgumentError(f"{name} must be finite, got {x}")
    return x


class _NativePart:
    """What LWC and AdaRound share: a native part ``_part`` (its shape, width and groups) and its
    optimizer state ``_adam`` (the learning rate)."""

    shape = property(lambda self: (self._part.rows, self._part.cols))
    bits = property(lambda self: self._part.bits)
    group_size = property(lambda self: self._part.group_size)
    n_groups = property(lambda self: self._part.n_groups)

    @property
    def lr(self) -> float:
        return self._adam.lr

    @lr.setter
    def lr(self, value: float) -> None:
        self._adam.lr = _float(value, "lr")


class LWC(_NativePart):
    """OmniQuant-style learnable weight clipping on the columns ``W`` (float32 ``(d_out, n)``).

    Per (row, group of ``group_size`` columns): learnable ``gamma``, ``beta``; clipped range
    ``[lo * sigmoid(beta), hi * sigmoid(gamma)]`` with ``lo = min(0, min w)``,
    ``hi = max(0, max w)``; ``scale = (hi_c - lo_c) / (2**bits - 1)`` (clamped to
    ``[1e-5, 1e4]`` as OmniQuant), ``zero = round(-lo_c / scale)``, straight-through rounding of
    ``w / scale``, no gradient through ``zero`` (OmniQuant rounds it without a straight-through
    estimator).

    Decision: the range is forced to include 0, unlike OmniQuant, as hiquant's RTN baseline and
    storage format do — ``zero`` then always fits ``bits`` bits, and with
    ``gamma, beta -> +inf`` the forward equals :func:`hiquant.quantizer.fake_quantize` exactly.
    It changes OmniQuant's behaviour only for groups whose weights all have one sign.
    """

    def __init__(self, W: np.ndarray, bits: int, group_size: int | None = None, *,
                 lr: float = 1e-2, weight_decay: float = 0.0, init: float = 4.0,
                 n_threads: int | None = None):
        self.n_threads = resolve_n_threads(n_threads)
        self._part = _core.LwcPart(W, _int(bits, "bits"), _group(group_size), _float(init, "init"),
                                   self.n_threads)
        self._adam = _core.Adam(self._part.n_params, _float(lr, "lr"), 0.9, 0.999, 1e-8,
                                _float(weight_decay, "weight_decay"), True)

    steps = property(lambda self: self._adam.steps, doc="Adam steps taken so far.")

    @property
    def params(self) -> np.ndarray:
        """A copy of ``(gamma, beta)``: float32 ``(2, d_out, n_groups)``."""
        return self._part.get_params()

    @params.setter
    def params(self, values: np.ndarray) -> None:
        self._part.set_params(values)

    def forward(self, out: np.ndarray | None = None) -> np.ndarray:
        """Current fake-quantized weights (float32, the part's shape); ``out`` to reuse a buffer."""
        return self._part.forward(out, self.n_threads)

    def backward(self, dwq: np.ndarray, col0: int = 0) -> np.ndarray:
        """``(dL/dgamma, dL/dbeta)`` as float32 ``(2, d_out, n_groups)`` from ``dL/dW_q``.

        ``dwq`` is float32 ``(d_out, n_cols)``, or a wider matrix whose columns
        ``[col0, col0 + n_cols)`` belong to this part."""
        return self._part.backward(dwq, _int(col0, "col0"), self.n_threads)

    def step(self, dwq: np.ndarray, col0: int = 0) -> None:
        """Backward plus one AdamW update."""
        _core.adam_step(self._adam, self._part, self.backward(dwq, col0), self.n_threads)

    def scales(self) -> tuple[np.ndarray, np.ndarray]:
        """Training-time ``(scale float32, zero uint8)``, each ``(d_out, n_groups)``."""
        return self._part.scales(self.n_threads)

    def export(self, W: np.ndarray | None = None, scale_bits: int = 16):
        """The stored part (:class:`hiquant.storage.QuantPart`): final codes with the learned
        scales rounded through float16 first (zero recomputed). ``scale_bits`` 8 or 6: those
        float16 scales are double-quantized and the codes of ``W`` (this part's weights, required
        then) recomputed on that grid with the same zero points — round-to-nearest within the
        learned clipping range on the stored grid."""
        from . import quantizer as qz
        from .config import check_scale_bits
        from .storage import QuantPart, scale_codes
        codes, s, z, _ = self._part.export(self.n_threads)
        if check_scale_bits(scale_bits) == 16:
            return QuantPart(self.bits, self.group_size, codes, s.astype(np.float16), z)
        if W is None:
            raise InvalidArgumentError("export(scale_bits=8 or 6) needs W, the part's weights, to "
                                       "recompute the codes on the stored scale grid")
        s32, code, sup = scale_codes(s, scale_bits)
        codes = qz.quantize(np.ascontiguousarray(W, np.float32), np.ascontiguousarray(s32), z,
                            self.bits, self.group_size)
        return QuantPart(self.bits, self.group_size, codes, code, z, sup,
                         scale_code_bits=scale_bits)


def adaround_schedule(t: int, iters: int, warmup: float = 0.2, b_start: float = 20.0,
                      b_end: float = 2.0) -> tuple[bool, float]:
    """BRECQ's schedule at step ``t = 1..iters``: (regularizer on?, exponent ``b``). The
    regularizer is off while ``t < warmup * iters``; ``b`` decays linearly from ``b_start`` to
    ``b_end`` over the remaining steps."""
    start = warmup * iters
    if t < start:
        return False, float(b_start)
    rel = (t - start) / (iters - start)
    return True, float(b_end + (b_start - b_end) * max(0.0, 1.0 - rel))


class AdaRound(_NativePart):
    """AdaRound on the columns ``W`` (float32 ``(d_out, n)``) at ``bits`` bits.

    Fixed min-max scales per (row, group of ``group_size`` columns), range including 0, rounded
    through float16 at construction; one learnable ``V`` per weight with
    ``h(V) = clip(sigmoid(V) * 1.2 - 0.1, 0, 1)`` initialized to the fractional part of
    ``w / scale``; soft forward ``scale * (clamp(floor(w/scale) + h(V) + zero, 0, maxq) - zero)``;
    regularizer ``lam * sum(1 - |2 h(V) - 1|**b)``; hard rounding (``V >= 0``, i.e.
    ``h >= 1/2``) in :meth:`export`. ``scale`` (float32 ``(d_out, n_groups)``, optional): use
    these scales (rounded through float16 when ``scale_bits`` is 16, the stored precision) instead
    of min-max ones; the zero points still come from each group's range. ``scale_bits`` (16, 8
    or 6): the stored scale precision; with 8 or 6 the scales are double-quantized before the
    rounding is learned, so it is learned for what is stored. ``step()`` follows
    :func:`adaround_schedule` over ``iters``
    steps (the regularizer is added to the caller's loss).
    """

    def __init__(self, W: np.ndarray, bits: int, group_size: int | None = None, *,
                 lr: float = 1e-3, lam: float = 0.01, iters: int = 5000, warmup: float = 0.2,
                 b_start: float = 20.0, b_end: float = 2.0, n_threads: int | None = None,
                 scale: np.ndarray | None = None, scale_bits: int = 16):
        from .config import check_scale_bits
        self.n_threads = resolve_n_threads(n_threads)
        self.scale_bits = check_scale_bits(scale_bits)
        self._scale_codes = None  # (codes, super-scales) of double-quantized stored scales
        if self.scale_bits != 16:
            # learn the rounding on the scales that are stored: min-max scales (unless given),
            # double-quantized to scale_bits-bit codes first
            from . import quantizer as qz
            from .storage import scale_codes
            if scale is None:
                scale, _ = qz.minmax_params(W, _int(bits, "bits"), _group(group_size))
            s32, code, sup = scale_codes(scale, self.scale_bits)
            scale = np.ascontiguousarray(s32)
            self._scale_codes = (code, sup)
        elif scale is not None and isinstance(scale, np.ndarray) and scale.dtype == np.float32:
            # float16 storage: learn the rounding on the scales as they will be stored
            scale = np.ascontiguousarray(scale.astype(np.float16).astype(np.float32))
        self.iters = _int(iters, "iters")
        self.lam = _float(lam, "lam")
        self.warmup = _float(warmup, "warmup")
        self.b_start, self.b_end = _float(b_start, "b_start"), _float(b_end, "b_end")
        if self.iters < 0:
            raise InvalidArgumentError(f"iters must be >= 0, got {iters}")
        if not 0.0 <= self.warmup < 1.0:
            raise InvalidArgumentError(f"warmup must be a fraction in [0, 1), got {warmup}")
        if self.lam < 0 or self.b_start < 1 or self.b_end < 1:
            raise InvalidArgumentError("lam must be >= 0 and b_start, b_end >= 1")
        self._part = _core.AdaRoundPart(W, _int(bits, "bits"), _group(group_size), self.n_threads,
                                        scale)
        self._adam = _core.Adam(self._part.n_params, _float(lr, "lr"))
        self.t = 0  # schedule position (steps taken)

    @property
    def params(self) -> np.ndarray:
        """A copy of ``V``: float32 ``(d_out, n_cols)``."""
        return self._part.get_params()

    @params.setter
    def params(self, values: np.ndarray) -> None:
        self._part.set_params(values)

    def schedule(self, t: int) -> tuple[bool, float]:
        return adaround_schedule(t, self.iters, self.warmup, self.b_start, self.b_end)

    def forward(self, hard: bool = False, out: np.ndarray | None = None) -> np.ndarray:
        return self._part.forward(bool(hard), out, self.n_threads)

    def backward(self, dwq: np.ndarray, lam: float = 0.0, b: float = 20.0,
                 col0: int = 0) -> tuple[np.ndarray, float]:
        """``(dL/dV, regularizer value)``: the gradient of the caller's loss through the soft
        forward plus, when ``lam > 0``, of ``lam * sum(1 - |2h - 1|**b)``."""
        return self._part.backward(dwq, _float(lam, "lam"), _float(b, "b"), _int(col0, "col0"),
                                   self.n_threads)

    def step(self, dwq: np.ndarray, col0: int = 0) -> float:
        """One scheduled step: backward (with the regularizer when the schedule has it on) plus
        one Adam update. Returns the regularizer's value (0 during warm-up)."""
        self.t += 1
        on, b = self.schedule(self.t)
        grad, reg = self.backward(dwq, self.lam if on else 0.0, b, col0)
        _core.adam_step(self._adam, self._part, grad, self.n_threads)
        return reg

    def reg_loss(self, lam: float, b: float) -> float:
        return self._part.reg_loss(_float(lam, "lam"), _float(b, "b"), self.n_threads)

    def soft_fraction(self) -> float:
        """Fraction of weights whose ``h(V)`` is strictly between 0 and 1."""
        return self._part.soft_fraction(self.n_threads)

    def export(self):
        """The stored part (:class:`hiquant.storage.QuantPart`): hard-rounded codes, the scales at
        the stored precision chosen at construction (``scale_bits``)."""
        from .storage import QuantPart
        codes, s, z, _ = self._part.export(self.n_threads)
        if self._scale_codes is None:
            return QuantPart(self.bits, self.group_size, codes, s.astype(np.float16), z)
        code, sup = self._scale_codes
        return QuantPart(self.bits, self.group_size, codes, code, z, sup,
                         scale_code_bits=self.scale_bits)


class LayerwiseObjective:
    """``L(W_q) = tr((W_q - W) H (W_q - W)^T) / N`` for one layer, with its own ``W_q`` buffer.

    ``W`` float32 ``(d_out, d_in)``, ``H`` float64 ``(d_in, d_in)`` (symmetric: the Gram matrix of
    the layer's inputs), ``n_tokens`` its token count. Only the columns of the *active window*
    ``[a0, a1)`` are learned; the others are frozen at their current ``W_q`` and enter through a
    product computed once (see cpp/include/hiquant/layerwise.hpp), so a step costs
    ``2 * d_out * n_active**2`` flops.
    """

    def __init__(self, W: np.ndarray, H: np.ndarray, n_tokens: float, *,
                 n_threads: int | None = None):
        self.n_threads = resolve_n_threads(n_threads)
        self.n_tokens = _float(n_tokens, "n_tokens")
        if self.n_tokens <= 0:
            raise InvalidArgumentError(f"n_tokens must be positive, got {n_tokens}")
        self._obj = _core.LayerwiseObjective(W, H, self.n_tokens, self.n_threads)

    d_out = property(lambda self: self._obj.d_out)
    d_in = property(lambda self: self._obj.d_in)
    active = property(lambda self: self._obj.active)
    step_flops = property(lambda self: self._obj.step_flops,
                          doc="Floating-point operations of one evaluation of the active window.")

    @property
    def wq(self) -> np.ndarray:
        """A copy of the current ``W_q``."""
        return self._obj.get_wq()

    def set_columns(self, col0: int, values: np.ndarray) -> None:
        """Write ``W_q[:, col0:col0 + m]`` (float32 ``(d_out, m)``)."""
        self._obj.set_columns(_int(col0, "col0"), values)

    def set_active(self, a0: int, a1: int) -> None:
        self._obj.set_active(_int(a0, "a0"), _int(a1, "a1"), self.n_threads)

    def evaluate(self) -> tuple[float, np.ndarray]:
        """``(loss, dL/dW_q[:, a0:a1])`` at the current ``W_q``."""
        return self._obj.evaluate(self.n_threads)

    def full_loss(self) -> float:
        return self._obj.full_loss(self.n_threads)


def gram_loss(W: np.ndarray, Wq: np.ndarray, H: np.ndarray, n_tokens: float, *,
              n_threads: int | None = None) -> tuple[float, np.ndarray]:
    """``(tr((Wq - W) H (Wq - W)^T) / N, 2 (Wq - W) H / N)`` with the native kernel."""
    obj = LayerwiseObjective(W, H, n_tokens, n_threads=n_threads)
    obj.set_columns(0, Wq)
    return obj.evaluate()


@dataclass
class FitResult:
    loss: np.ndarray  # objective before each step (float64)
    reg: np.ndarray  # AdaRound regularizer per step (empty without AdaRound)
    b: np.ndarray  # AdaRound exponent per step (0 while the regularizer is off)
    seconds: float
    incremental: bool = False  # LWC evaluated incrementally (see fit)
    changes: np.ndarray | None = None  # incremental: weights whose code or mask changed per step


LWC_EVAL = {"auto": 0, "gemm": 1, "incremental": 2}


def fit(objective: LayerwiseObjective, iters: int, *, lwc: LWC | None = None, lwc_col0: int = 0,
        adaround: AdaRound | None = None, adaround_col0: int = 0,
        progress: Progress = None, lwc_eval: str = "auto") -> FitResult:
    """``iters`` steps of the layer-wise objective, looped in C++: forward of the parts into
    ``W_q``, one product, backward, Adam. The parts must lie in the objective's active window
    (``col0`` is a part's first column in the objective's layer). AdaRound follows its schedule
    (``iters`` must equal ``adaround.iters``). Ctrl-C interrupts between steps (KeyboardInterrupt);
    ``progress(done, total)`` is called about 200 times.

    ``lwc_eval`` (an LWC part alone covering the active window): ``"gemm"`` evaluates each step
    with one ``d_out x n x n`` product; ``"incremental"`` computes the same loss and gradients
    from per-row quadratic forms in the group scales, updated only for the weights whose code or
    straight-through mask changed since the previous step (0.01-0.2% of them per step at lr
    1e-2), with a full recomputation every 256 steps or when many codes change — the same
    trajectory up to float rounding, at a fraction of the cost; ``"auto"`` (default) picks
    incremental whenever it applies and its state (16 bytes x d_out x n_groups^2) fits 1 GiB."""
    if lwc_eval not in LWC_EVAL:
        raise InvalidArgumentError(f"lwc_eval must be one of {tuple(LWC_EVAL)}, got {lwc_eval!r}")
    iters = _int(iters, "iters")
    if adaround is not None and iters != adaround.iters:
        raise InvalidArgumentError(f"iters ({iters}) must equal adaround.iters ({adaround.iters}): the "
                         "rounding schedule is laid out over the AdaRound part's iterations")
    ada_kw = dict(warmup=0.2, b_start=20.0, b_end=2.0, lam=0.0)
    if adaround is not None and adaround.t != 0:
        raise InvalidArgumentError(f"this AdaRound part has already taken {adaround.t} steps; its rounding "
                         "schedule runs once, so fit it with a fresh part")
    if adaround is not None:
        ada_kw = dict(warmup=adaround.warmup, b_start=adaround.b_start, b_end=adaround.b_end,
                      lam=adaround.lam)
    log = _core.fit_layerwise(
        objective._obj, lwc._part if lwc else None, lwc._adam if lwc else None,
        _int(lwc_col0, "lwc_col0"), adaround._part if adaround else None,
        adaround._adam if adaround else None, _int(adaround_col0, "adaround_col0"), iters,
        n_threads=objective.n_threads, progress=progress, lwc_eval=LWC_EVAL[lwc_eval], **ada_kw)
    if adaround is not None:
        adaround.t += iters
    return FitResult(log["loss"], log["reg"], log["b"], log["seconds"], log["incremental"],
                     log["changes"] if log["incremental"] else None)


@dataclass
class GPTQResult:
    codes: np.ndarray  # uint8 (d_out, d_in)
    scale: np.ndarray  # float32 (d_out, n_groups); float16-exact unless fp16_scales=False
    zero: np.ndarray  # uint8 (d_out, n_groups)
    wq: np.ndarray  # float32 (d_out, d_in) == scale * (codes - zero)
    loss: float  # gptq.py's error: sum (w - q)^2 / [H^-1]_ii / 2 (in its Cholesky form)
    damp: float
    n_dead: int
    perm: np.ndarray  # loop order of the columns
    seconds: dict = field(default_factory=dict)


def gptq(W: np.ndarray, H: np.ndarray, *, bits: int, group_size: int | None = None,
         percdamp: float = 0.01, blocksize: int = 128, act_order: bool = False,
         fp16_scales: bool = True, n_threads: int | None = None,
         progress: Progress = None, scale: np.ndarray | None = None,
         zero: np.ndarray | None = None, n_quant: int | None = None) -> GPTQResult:
    """GPTQ of one layer (IST-DASLab/gptq's algorithm; see cpp/include/hiquant/gptq.hpp).

    ``W`` float32 ``(d_out, d_in)``; ``H`` float64 ``(d_in, d_in)``, the Gram matrix of the
    layer's inputs (any positive scale: GPTQ is invariant to it); ``percdamp`` of the mean
    diagonal is added before the factorization; ``blocksize`` columns per lazy batch update;
    ``act_order`` quantizes columns by decreasing ``H_ii`` (groups stay consecutive columns in the
    original order). Raises :class:`hiquant.NumericalError` if the damped ``H`` is not positive
    definite.

    Error-compensating rounding on a given grid: ``scale`` (float32) and ``zero`` (uint8), both
    ``(d_out, n_groups)``, fix every group's parameters (e.g. LWC's learned clipping), so GPTQ only
    chooses the codes. ``n_quant``: quantize only the first ``n_quant`` columns (codes and ``wq``
    then have ``n_quant`` columns); the later ones stay in ``H``, so the compensation is the one
    in which they are free as well (the hybrid quantizer learns them next, with AdaRound).
    """
    r = _core.gptq(W, H, _int(bits, "bits"), _group(group_size), _float(percdamp, "percdamp"),
                   _int(blocksize, "blocksize"), bool(act_order), bool(fp16_scales),
                   resolve_n_threads(n_threads), progress, scale, zero,
                   0 if n_quant is None else _int(n_quant, "n_quant"))
    return GPTQResult(r["codes"], r["scale"], r["zero"], r["wq"], r["loss"], r["damp"],
                      r["n_dead"], r["perm"],
                      {"factor": r["seconds_factor"], "loop": r["seconds_loop"]})
