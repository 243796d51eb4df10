"""Float64 NumPy reference of SmoothQuant's smoothing factors and of per-token activation
quantization (hiquant.methods.smoothquant, hiquant.model.Model.set_activation_bits)."""

from __future__ import annotations

import numpy as np


def smoothing_scales(act_max, Ws, alpha: float) -> np.ndarray:
    """``s_j = max|X_j|^α / max|W_j|^(1−α)``, the weight maximum over the rows of every layer in
    ``Ws``, both clamped below at 1e-5 (SmoothQuant's smooth_ln_fcs)."""
    w_max = np.max([np.abs(np.asarray(W, np.float64)).max(axis=0) for W in Ws], axis=0)
    a = np.maximum(np.asarray(act_max, np.float64), 1e-5)
    return np.maximum(a ** alpha / np.maximum(w_max, 1e-5) ** (1.0 - alpha), 1e-5)


def act_quant(X, bits: int) -> np.ndarray:
    """Per-row symmetric round-to-nearest: ``rint(x / Δ)·Δ``, ``Δ = max|x| / (2^(bits−1) − 1)``."""
    X = np.asarray(X, np.float64)
    d = np.abs(X).max(axis=1, keepdims=True) / (2 ** (bits - 1) - 1)
    d[d == 0] = 1.0
    return np.rint(X / d) * d
