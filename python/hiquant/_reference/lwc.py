"""Float64 NumPy reference of the LWC part and of the layer-wise Gram objective (independent of
the C++ core). Arithmetic as documented in cpp/include/hiquant/lwc.hpp: the only float32 steps
are the ones the native part stores in float32 (the weights, the scale)."""

from __future__ import annotations

import numpy as np

from .quantizer import group_bounds

MIN_SCALE, MAX_SCALE = 1e-5, 1e4  # OmniQuant's CLIPMIN and upper clamp
FP16_TINY = float(np.finfo(np.float16).tiny)
FP16_MAX = float(np.finfo(np.float16).max)


def sigmoid(x):
    x = np.asarray(x, np.float64)
    return np.where(x >= 0, 1.0 / (1.0 + np.exp(-np.abs(x))),
                    np.exp(-np.abs(x)) / (1.0 + np.exp(-np.abs(x))))


def fp16_round(s):
    """hiquant's stored-scale rounding: clip to float16's normal range, round to float16."""
    s = np.clip(np.asarray(s, np.float32), FP16_TINY, FP16_MAX)
    return s.astype(np.float16).astype(np.float32)


def group_ranges(W, group_size):
    """lo = min(0, min), hi = max(0, max) per (row, group), all-zero groups → [-1, 1]."""
    W = np.asarray(W, np.float32)
    b = group_bounds(W.shape[1], group_size)
    lo = np.stack([np.minimum(W[:, a:e].min(axis=1), 0) for a, e in b], axis=1).astype(np.float64)
    hi = np.stack([np.maximum(W[:, a:e].max(axis=1), 0) for a, e in b], axis=1).astype(np.float64)
    both0 = (lo == 0) & (hi == 0)
    lo[both0], hi[both0] = -1.0, 1.0
    return lo, hi, b


def params(W, gamma, beta, bits, group_size):
    """Training-time (scale float32-valued, zero, lo_c, clamped, sg, sb, lo, hi, bounds)."""
    maxq = 2**bits - 1
    lo, hi, b = group_ranges(W, group_size)
    sg, sb = sigmoid(gamma), sigmoid(beta)
    lo_c, hi_c = lo * sb, hi * sg
    s = (hi_c - lo_c) / maxq
    clamped = ~((s >= MIN_SCALE) & (s <= MAX_SCALE))
    s = np.clip(np.nan_to_num(s, nan=MIN_SCALE), MIN_SCALE, MAX_SCALE).astype(np.float32).astype(np.float64)
    zero = np.clip(np.rint(-lo_c / s), 0, maxq)
    return dict(scale=s, zero=zero, lo_c=lo_c, clamped=clamped, sg=sg, sb=sb, lo=lo, hi=hi, bounds=b)


def _codes(Wg, s, z, maxq):
    qs = Wg / s
    v = np.rint(np.clip(qs, -512, 512)) + z
    inr = (v >= 0) & (v <= maxq)
    return np.clip(v, 0, maxq), qs, inr


def forward(W, gamma, beta, bits, group_size):
    """Fake-quantized weights (float64) for parameters gamma, beta of shape (rows, n_groups)."""
    maxq = 2**bits - 1
    W64 = np.asarray(W, np.float32).astype(np.float64)
    p = params(W, gamma, beta, bits, group_size)
    out = np.empty_like(W64)
    for j, (a, e) in enumerate(p["bounds"]):
        s, z = p["scale"][:, j:j + 1], p["zero"][:, j:j + 1]
        code, _, _ = _codes(W64[:, a:e], s, z, maxq)
        out[:, a:e] = s * (code - z)
    return out


def backward(W, gamma, beta, bits, group_size, dwq):
    """(dL/dgamma, dL/dbeta) from dL/dW_q, straight-through round, no gradient through zero."""
    maxq = 2**bits - 1
    W64 = np.asarray(W, np.float32).astype(np.float64)
    dwq = np.asarray(dwq, np.float64)
    p = params(W, gamma, beta, bits, group_size)
    ds = np.empty_like(p["scale"])
    for j, (a, e) in enumerate(p["bounds"]):
        s, z = p["scale"][:, j:j + 1], p["zero"][:, j:j + 1]
        code, qs, inr = _codes(W64[:, a:e], s, z, maxq)
        ds[:, j] = (dwq[:, a:e] * ((code - z) - np.where(inr, qs, 0.0))).sum(axis=1)
    ds = np.where(p["clamped"], 0.0, ds)
    dg = ds * p["hi"] * p["sg"] * (1 - p["sg"]) / maxq
    db = -ds * p["lo"] * p["sb"] * (1 - p["sb"]) / maxq
    return dg, db


def export(W, gamma, beta, bits, group_size):
    """(codes, fp16-rounded scale, zero, dequantized) with zero and codes from the rounded scale."""
    maxq = 2**bits - 1
    W64 = np.asarray(W, np.float32).astype(np.float64)
    p = params(W, gamma, beta, bits, group_size)
    s16 = fp16_round(p["scale"]).astype(np.float64)
    zero = np.clip(np.rint(-p["lo_c"] / s16), 0, maxq)
    codes = np.empty(W64.shape, np.uint8)
    wq = np.empty_like(W64)
    for j, (a, e) in enumerate(p["bounds"]):
        c, _, _ = _codes(W64[:, a:e], s16[:, j:j + 1], zero[:, j:j + 1], maxq)
        codes[:, a:e] = c
        wq[:, a:e] = s16[:, j:j + 1] * (c - zero[:, j:j + 1])
    return codes, s16.astype(np.float32), zero.astype(np.uint8), wq


def gram_loss(W, Wq, H, n_tokens):
    """L = tr((Wq - W) H (Wq - W)^T) / N and dL/dWq = 2 (Wq - W) H / N, in float64."""
    E = np.asarray(Wq, np.float64) - np.asarray(W, np.float64)
    G = E @ np.asarray(H, np.float64)
    return float((E * G).sum() / n_tokens), 2.0 * G / n_tokens


def adam_step(p, g, m, v, t, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
              decoupled=True):
    """One Adam(W) update in float64, torch's formula; returns (p, m, v)."""
    if weight_decay:
        if decoupled:
            p = p * (1 - lr * weight_decay)
        else:
            g = g + weight_decay * p
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    bc1, bc2 = 1 - beta1**t, 1 - beta2**t
    p = p - lr / bc1 * m / (np.sqrt(v) / np.sqrt(bc2) + eps)
    return p, m, v
