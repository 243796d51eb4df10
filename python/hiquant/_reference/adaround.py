"""Float64 NumPy reference of the AdaRound part (independent of the C++ core); arithmetic as
documented in cpp/include/hiquant/adaround.hpp."""

from __future__ import annotations

import numpy as np

from .lwc import fp16_round, group_ranges, sigmoid

ZETA, GAMMA = 1.1, -0.1


def init(W, bits, group_size):
    """(scale (rows, n_groups) float32-valued, zero, base = floor(w/s) + zero, V, bounds)."""
    maxq = 2**bits - 1
    W64 = np.asarray(W, np.float32).astype(np.float64)
    lo, hi, b = group_ranges(W, group_size)
    s = fp16_round((hi - lo) / maxq).astype(np.float64)
    zero = np.clip(np.rint(-lo / s), 0, maxq)
    base = np.empty_like(W64)
    V = np.empty_like(W64)
    for j, (a, e) in enumerate(b):
        q = W64[:, a:e] / s[:, j:j + 1]
        fl = np.floor(q)
        rest = q - fl
        base[:, a:e] = fl + zero[:, j:j + 1]
        V[:, a:e] = np.log((rest - GAMMA) / (ZETA - rest))
    return dict(scale=s, zero=zero, base=base, V=V, bounds=b, maxq=maxq)


def _expand(x, bounds):
    return np.concatenate([np.repeat(x[:, j:j + 1], e - a, axis=1)
                           for j, (a, e) in enumerate(bounds)], axis=1)


def h_of(V):
    return np.clip(sigmoid(V) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def forward(st, V, hard=False):
    s, z = _expand(st["scale"], st["bounds"]), _expand(st["zero"], st["bounds"])
    h = (np.asarray(V) >= 0).astype(np.float64) if hard else h_of(V)
    return s * (np.clip(st["base"] + h, 0, st["maxq"]) - z)


def reg_loss(V, lam, b):
    return float(lam * (1.0 - np.abs(2.0 * h_of(V) - 1.0) ** b).sum())


def backward(st, V, dwq, lam=0.0, b=20.0):
    """(dL/dV, regularizer value) for the soft forward, torch.clamp's inclusive-bound masks."""
    V = np.asarray(V, np.float64)
    s = _expand(st["scale"], st["bounds"])
    sig = sigmoid(V)
    u = sig * (ZETA - GAMMA) + GAMMA
    h = np.clip(u, 0.0, 1.0)
    v = st["base"] + h
    dh = np.where((v >= 0) & (v <= st["maxq"]), np.asarray(dwq, np.float64) * s, 0.0)
    reg = 0.0
    if lam > 0:
        x = 2 * h - 1
        ax = np.abs(x)
        reg = float(lam * (1 - ax**b).sum())
        with np.errstate(divide="ignore", invalid="ignore"):
            dr = np.where(ax > 0, -lam * b * ax ** (b - 1) * np.sign(x) * 2, 0.0)
        dh = dh + dr
    dV = np.where((u >= 0) & (u <= 1), dh * (ZETA - GAMMA) * sig * (1 - sig), 0.0)
    return dV, reg


def export(st, V):
    """(codes uint8, scale float32, zero uint8, dequantized float64) with hard rounding V >= 0."""
    codes = np.clip(st["base"] + (np.asarray(V) >= 0), 0, st["maxq"])
    z = _expand(st["zero"], st["bounds"])
    wq = _expand(st["scale"], st["bounds"]) * (codes - z)
    return codes.astype(np.uint8), st["scale"].astype(np.float32), st["zero"].astype(np.uint8), wq


def schedule_b(t, iters, warmup=0.2, b_start=20.0, b_end=2.0):
    """BRECQ's (regularizer on?, exponent b) at step t = 1..iters."""
    start = warmup * iters
    if t < start:
        return False, b_start
    rel = (t - start) / (iters - start)
    return True, b_end + (b_start - b_end) * max(0.0, 1.0 - rel)
