"""Float64 NumPy reference of hiquant.stats' native kernels (independent of the C++ core)."""

from __future__ import annotations

import numpy as np


def gram_accumulate(G: np.ndarray, X: np.ndarray) -> np.ndarray:
    """G + Xᵀ X with every product and sum in float64 (returns a new float64 array)."""
    X64 = np.asarray(X, dtype=np.float64)
    return np.asarray(G, dtype=np.float64) + X64.T @ X64


def fisher_accumulate(F: np.ndarray, grad: np.ndarray) -> np.ndarray:
    """F + grad² in float64 (returns a new float64 array)."""
    g = np.asarray(grad, dtype=np.float64)
    return np.asarray(F, dtype=np.float64) + g * g


def fisher_col(F: np.ndarray) -> np.ndarray:
    """Per-input-channel Fisher score: the column sums of F in float64."""
    return np.asarray(F, dtype=np.float64).sum(axis=0)


def fisher_row(F: np.ndarray) -> np.ndarray:
    """Per-output-row Fisher sum: the row sums of F in float64."""
    return np.asarray(F, dtype=np.float64).sum(axis=1)


def empirical_fisher(per_sequence_grads) -> dict:
    """Σ_s (∂L_s/∂W)² over an iterable of {name: dW} dicts, in float64."""
    out = {}
    for grads in per_sequence_grads:
        for name, g in grads.items():
            g = np.asarray(g, dtype=np.float64)
            out[name] = out.get(name, 0.0) + g * g
    return out
