"""LWC and AdaRound parts, their Adam updates and the layer-wise Gram objective in PyTorch, on the
weights' device: the torch twins of :class:`hiquant.learners.LWC`, :class:`~hiquant.learners.AdaRound`
and :func:`~hiquant.learners.gram_loss` (cpp/include/hiquant/lwc.hpp, adaround.hpp, optim.hpp
document the arithmetic), with closed-form gradients (straight-through rounding) instead of
autograd, so that every step is the C++ part's step. Checked against the float64 twins in
:mod:`hiquant._reference` (tests/test_torch_learners.py).

Same API as the NumPy parts, with tensors: ``forward()``, ``backward(dwq)``, ``step(dwq)``,
``export()`` (a :class:`hiquant.storage.QuantPart` of NumPy arrays: codes, float16 scales,
zeros). Parameters and Adam moments are float32 tensors, as the C++ parts store them; range,
scale and zero arithmetic is in float64 where the C++ parts use double.

The pipeline's lwc and adaround methods use them on the torch backend
(:func:`hiquant.torch_pipeline.learned_layer`, float16 scales); the hybrid quantizer (hiq,
fixed-ratio, fp16-retention: two parts with frozen columns, GPTQ on the learned grid) still runs
its C++ parts on the host copy of the device statistics.
"""

from __future__ import annotations

import math

from .config import check_group_size
from .errors import InvalidArgumentError, InvalidTypeError
from .learners import ADAROUND_DEFAULTS, LWC_DEFAULTS, adaround_schedule
from .torch_kernels import _bits, _check_weight, _pad_groups, _tensor, _torch, _width, fp16_round_scale

__all__ = ["TorchAdam", "TorchLWC", "TorchAdaRound", "gram_loss", "fit"]

LWC_MIN_SCALE, LWC_MAX_SCALE = 1e-5, 1e4  # OmniQuant's CLIPMIN and upper clamp
ZETA, GAMMA = 1.1, -0.1


def _number(x, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise InvalidTypeError(f"{name} must be a number, got {type(x).__name__}")
    x = float(x)
    if not math.isfinite(x):
        raise InvalidArgumentError(f"{name} must be finite, got {x}")
    return x


class TorchAdam:
    """Adam(W) on one float32 parameter tensor, the C++ ``Adam::step`` (torch.optim.Adam's
    formula, float32 moments): ``m = lerp(m, g, 1 - β1)``, ``v = β2 v + (1 - β2) g²``,
    ``p -= lr / bc1 · m / (sqrt(v) / sqrt(bc2) + eps)``; decoupled weight decay first."""

    def __init__(self, p, lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                 weight_decay: float = 0.0):
        torch = _torch()
        self.p = p
        self.lr = _number(lr, "lr")
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.weight_decay = _number(weight_decay, "weight_decay")
        if self.lr < 0 or self.weight_decay < 0:
            raise InvalidArgumentError("lr and weight_decay must be >= 0")
        self.m = torch.zeros_like(p)
        self.v = torch.zeros_like(p)
        self.steps = 0

    def step(self, g) -> None:
        self.steps += 1
        bc1 = 1.0 - self.beta1 ** self.steps
        bc2 = 1.0 - self.beta2 ** self.steps
        if self.weight_decay:
            self.p.mul_(1.0 - self.lr * self.weight_decay)
        self.m.lerp_(g, 1.0 - self.beta1)
        self.v.mul_(self.beta2).add_(g * g * (1.0 - self.beta2))
        denom = self.v.sqrt().div_(math.sqrt(bc2)).add_(self.eps)
        self.p.sub_((self.m / denom).mul_(self.lr / bc1))


def _ranges(W, g: int):
    """Per (row, group): float64 ``lo = min(0, min w)``, ``hi = max(0, max w)`` (all-zero
    groups: [-1, 1]) and the padded grouped weights ``(rows, n_groups, g)`` in float64."""
    torch = _torch()
    Wg = _pad_groups(W, g, 0.0)
    lo = Wg.amin(dim=2).clamp(max=0.0).to(torch.float64)
    hi = Wg.amax(dim=2).clamp(min=0.0).to(torch.float64)
    both0 = (lo == 0) & (hi == 0)
    lo[both0], hi[both0] = -1.0, 1.0
    return lo, hi, Wg.to(torch.float64)


def _ungroup(A, cols: int):
    return A.reshape(A.shape[0], -1)[:, :cols]


class TorchLWC:
    """:class:`hiquant.learners.LWC` in torch (learnable clipping ``gamma``, ``beta`` per row and
    group; the range includes 0; straight-through rounding; no gradient through the zero)."""

    def __init__(self, W, bits: int, group_size=None, *, lr: float = LWC_DEFAULTS["lr"],
                 weight_decay: float = LWC_DEFAULTS["weight_decay"],
                 init: float = LWC_DEFAULTS["init"]):
        torch = _torch()
        self.W = _check_weight(W)
        self.bits = _bits(bits)
        self.group_size = check_group_size(group_size)
        self.maxq = 2 ** self.bits - 1
        self.cols = W.shape[1]
        self.g = _width(self.cols, self.group_size)
        self.lo, self.hi, self.Wg = _ranges(W, self.g)
        init = _number(init, "init")
        self.params = torch.full((2,) + tuple(self.lo.shape), init, dtype=torch.float32,
                                 device=W.device)
        self.adam = TorchAdam(self.params, lr, weight_decay=weight_decay)

    @property
    def n_groups(self) -> int:
        return self.lo.shape[1]

    def _scale_zero(self):
        torch = _torch()
        sg = torch.sigmoid(self.params[0].to(torch.float64))
        sb = torch.sigmoid(self.params[1].to(torch.float64))
        lo_c, hi_c = self.lo * sb, self.hi * sg
        s = (hi_c - lo_c) / self.maxq
        clamped = ~((s >= LWC_MIN_SCALE) & (s <= LWC_MAX_SCALE))
        s = torch.nan_to_num(s, nan=LWC_MIN_SCALE).clamp(LWC_MIN_SCALE, LWC_MAX_SCALE)
        s = s.to(torch.float32)
        zero = torch.round(-lo_c / s.to(torch.float64)).clamp(0, self.maxq)
        return s, zero, clamped, sg, sb, lo_c

    def _codes(self, s, zero):
        torch = _torch()
        qs = self.Wg / s.to(torch.float64)[:, :, None]
        v = torch.round(qs) + zero[:, :, None]
        inr = (v >= 0) & (v <= self.maxq)
        return v.clamp(0, self.maxq), qs, inr

    def scales(self):
        """Training-time ``(scale float32, zero uint8)``, each ``(d_out, n_groups)``."""
        torch = _torch()
        s, zero, *_ = self._scale_zero()
        return s, zero.to(torch.uint8)

    def forward(self):
        """Current fake-quantized weights (float32, ``W``'s shape)."""
        torch = _torch()
        s, zero, *_ = self._scale_zero()
        code, _, _ = self._codes(s, zero)
        z32 = zero.to(torch.float32)[:, :, None]
        return _ungroup(s[:, :, None] * (code.to(torch.float32) - z32), self.cols).contiguous()

    def backward(self, dwq):
        """``(dL/dgamma, dL/dbeta)`` float32 ``(2, d_out, n_groups)`` from ``dL/dW_q``."""
        torch = _torch()
        _tensor(dwq, "dwq", torch.float32, 2)
        if tuple(dwq.shape) != tuple(self.W.shape):
            raise InvalidArgumentError(f"dwq has shape {tuple(dwq.shape)} but the part has "
                                       f"{tuple(self.W.shape)}")
        s, zero, clamped, sg, sb, _ = self._scale_zero()
        code, qs, inr = self._codes(s, zero)
        D = _pad_groups(dwq, self.g, 0.0).to(torch.float64)
        dwds = (code - zero[:, :, None]) - torch.where(inr, qs, torch.zeros_like(qs))
        ds = (D * dwds).sum(dim=2)
        ds = torch.where(clamped, torch.zeros_like(ds), ds)
        dg = ds * self.hi * sg * (1 - sg) / self.maxq
        db = -ds * self.lo * sb * (1 - sb) / self.maxq
        return torch.stack([dg, db]).to(torch.float32)

    def step(self, dwq) -> None:
        """Backward plus one AdamW update."""
        self.adam.step(self.backward(dwq))

    def export(self):
        """The stored part: the learned scales rounded through float16, the zero recomputed from
        them, the codes on that grid (:meth:`hiquant.learners.LWC.export` with ``scale_bits`` 16)."""
        torch = _torch()
        from .storage import QuantPart
        s, _, _, _, _, lo_c = self._scale_zero()
        s16 = fp16_round_scale(s)
        zero = torch.round(-lo_c / s16.to(torch.float64)).clamp(0, self.maxq)
        code, _, _ = self._codes(s16, zero)
        codes = _ungroup(code, self.cols).to(torch.uint8)
        return QuantPart(self.bits, self.group_size, codes.cpu().numpy(),
                         s16.cpu().numpy().astype("float16"),
                         zero.to(torch.uint8).cpu().numpy())


class TorchAdaRound:
    """:class:`hiquant.learners.AdaRound` in torch (fixed min-max scales rounded through float16,
    one learnable ``V`` per weight, the rectified sigmoid, BRECQ's regularizer and schedule)."""

    def __init__(self, W, bits: int, group_size=None, *, lr: float = ADAROUND_DEFAULTS["lr"],
                 lam: float = ADAROUND_DEFAULTS["lam"], iters: int = ADAROUND_DEFAULTS["iters"],
                 warmup: float = ADAROUND_DEFAULTS["warmup"],
                 b_start: float = ADAROUND_DEFAULTS["b_start"],
                 b_end: float = ADAROUND_DEFAULTS["b_end"], scale=None):
        torch = _torch()
        self.W = _check_weight(W)
        self.bits = _bits(bits)
        self.group_size = check_group_size(group_size)
        self.maxq = 2 ** self.bits - 1
        self.cols = W.shape[1]
        self.g = _width(self.cols, self.group_size)
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
            raise InvalidArgumentError(f"iters must be an int >= 0, got {iters!r}")
        self.iters = iters
        self.lam, self.warmup = _number(lam, "lam"), _number(warmup, "warmup")
        self.b_start, self.b_end = _number(b_start, "b_start"), _number(b_end, "b_end")
        if not 0.0 <= self.warmup < 1.0:
            raise InvalidArgumentError(f"warmup must be a fraction in [0, 1), got {warmup}")
        if self.lam < 0 or self.b_start < 1 or self.b_end < 1:
            raise InvalidArgumentError("lam must be >= 0 and b_start, b_end >= 1")
        lo, hi, Wg = _ranges(W, self.g)
        if scale is None:
            s = fp16_round_scale(((hi - lo) / self.maxq).to(torch.float32))
        else:
            _tensor(scale, "scale", torch.float32, 2)
            if tuple(scale.shape) != tuple(lo.shape):
                raise InvalidArgumentError(f"scale has shape {tuple(scale.shape)}, the part needs "
                                           f"{tuple(lo.shape)}")
            s = scale.clone()
        self.scale = s
        self.zero = torch.round(-lo / s.to(torch.float64)).clamp(0, self.maxq)
        q = Wg / s.to(torch.float64)[:, :, None]
        fl = torch.floor(q)
        rest = q - fl
        self.base = (fl + self.zero[:, :, None]).to(torch.float32)  # grouped, padded
        self.V = torch.log((rest - GAMMA) / (ZETA - rest)).to(torch.float32)
        self.adam = TorchAdam(self.V, lr)
        self.t = 0

    def schedule(self, t: int):
        return adaround_schedule(t, self.iters, self.warmup, self.b_start, self.b_end)

    def _h(self):
        torch = _torch()
        sig = torch.sigmoid(self.V)
        u = sig * (ZETA - GAMMA) + GAMMA
        return u.clamp(0.0, 1.0), u, sig

    def forward(self, hard: bool = False):
        """Soft (or hard: ``V >= 0``) fake-quantized weights, float32."""
        torch = _torch()
        h = (self.V >= 0).to(torch.float32) if hard else self._h()[0]
        c = (self.base + h).clamp(0, self.maxq)
        out = self.scale[:, :, None] * (c - self.zero.to(torch.float32)[:, :, None])
        return _ungroup(out, self.cols).contiguous()

    def reg_loss(self, lam: float, b: float) -> float:
        torch = _torch()
        ax = (2.0 * self._h()[0] - 1.0).abs().to(torch.float64)
        return float(lam * _ungroup(1.0 - ax ** b, self.cols).sum())

    def backward(self, dwq, lam: float = 0.0, b: float = 20.0):
        """``(dL/dV float32 (d_out, n_cols), regularizer value)``."""
        torch = _torch()
        _tensor(dwq, "dwq", torch.float32, 2)
        if tuple(dwq.shape) != tuple(self.W.shape):
            raise InvalidArgumentError(f"dwq has shape {tuple(dwq.shape)} but the part has "
                                       f"{tuple(self.W.shape)}")
        h, u, sig = self._h()
        v = self.base + h
        D = _pad_groups(dwq, self.g, 0.0)
        zero = torch.zeros_like(D)
        dh = torch.where((v >= 0) & (v <= self.maxq), D * self.scale[:, :, None], zero)
        reg = 0.0
        if lam > 0:
            x = 2 * h - 1
            ax = x.abs()
            reg = float(lam * _ungroup(1 - ax.to(torch.float64) ** b, self.cols).sum())
            dr = torch.where(ax > 0, -lam * b * ax ** (b - 1) * torch.sign(x) * 2, zero)
            dh = dh + dr
        dV = torch.where((u >= 0) & (u <= 1), dh * (ZETA - GAMMA) * sig * (1 - sig), zero)
        # padded entries carry no weight: no gradient
        return _ungroup(dV, self.cols).contiguous(), reg

    def step(self, dwq) -> float:
        """One scheduled step (the regularizer while the schedule has it on) and one Adam update
        of ``V``; returns the regularizer's value."""
        self.t += 1
        on, b = self.schedule(self.t)
        g, reg = self.backward(dwq, self.lam if on else 0.0, b)
        self.adam.step(_pad_groups(g, self.g, 0.0))  # padded entries: zero gradient
        return reg

    def export(self):
        """The stored part: hard-rounded codes, the float16 scales, the zeros."""
        torch = _torch()
        from .storage import QuantPart
        codes = (self.base + (self.V >= 0).to(torch.float32)).clamp(0, self.maxq)
        return QuantPart(self.bits, self.group_size,
                         _ungroup(codes, self.cols).to(torch.uint8).cpu().numpy(),
                         self.scale.cpu().numpy().astype("float16"),
                         self.zero.to(torch.uint8).cpu().numpy())


def gram_loss(W, Wq, H, n_tokens: float):
    """``L = tr((W_q - W) H (W_q - W)ᵀ) / N`` (float) and ``dL/dW_q = 2 (W_q - W) H / N``
    (float32): the product in float32 against ``H`` as float32 (as the C++ objective packs it),
    the loss summed in float64."""
    torch = _torch()
    E = Wq - W
    G = E @ (H if H.dtype == torch.float32 else H.to(torch.float32))
    loss = float((E.to(torch.float64) * G.to(torch.float64)).sum()) / n_tokens
    return loss, G.mul_(2.0 / n_tokens)


def fit(W, H, n_tokens: float, iters: int, *, lwc: TorchLWC | None = None,
        adaround: TorchAdaRound | None = None) -> list:
    """``iters`` steps of the layer-wise objective with one part covering every column of ``W``
    (LWC or AdaRound): forward, loss and gradient, the part's step. Returns the loss before each
    step."""
    if (lwc is None) == (adaround is None):
        raise InvalidArgumentError("pass exactly one of lwc, adaround")
    part = lwc if lwc is not None else adaround
    H32 = H.to(_torch().float32)
    losses = []
    for _ in range(iters):
        loss, dwq = gram_loss(W, part.forward(), H32, n_tokens)
        losses.append(loss)
        part.step(dwq)
    return losses
