"""Float64 NumPy reference of AWQ's two searches (hiquant.methods.awq), independent of the C++ core.

* :func:`scale_search`: per-input-channel scales ``s = x̄^α`` (x̄ the mean absolute input of each
  channel), normalized by ``sqrt(max(s) min(s))``, for ``α = i / n_grid``, ``i = 0..n_grid-1``;
  the error of α is the output error of the group's layers ``Σ_W tr(Δ G Δᵀ)`` with
  ``Δ = Q(W diag(s)) diag(s)⁻¹ − W`` and ``G = Σ x xᵀ``.
* :func:`clip_search`: per output row and quantization group, the clipping range
  ``[-r m, r m]`` (m the group's max |w|) with ``r = 1 − i / n_grid``, ``i = 0..max_shrink·n_grid − 1``,
  that minimizes the group's output error ``δ G_gg δᵀ``.

``Q`` is min-max round-to-nearest (hiquant._reference.quantizer.fake_quantize).
"""

from __future__ import annotations

import numpy as np

from .quantizer import fake_quantize, group_bounds


def awq_scales(abs_mean: np.ndarray, alpha: float) -> np.ndarray:
    s = np.maximum(np.asarray(abs_mean, np.float64), 1e-4) ** alpha
    return s / np.sqrt(s.max() * s.min())


def output_error(W: np.ndarray, W_hat: np.ndarray, G: np.ndarray) -> float:
    """``tr(Δ G Δᵀ)`` = ``Σ_tokens ||(W_hat − W) x||²``."""
    D = np.asarray(W_hat, np.float64) - np.asarray(W, np.float64)
    return float(np.sum((D @ G) * D))


def scale_search(Ws, G, abs_mean, bits: int, group_size: int, n_grid: int = 20):
    """``(best index, alphas (n_grid,), errors (n_grid,), best scales (d_in,))``."""
    alphas = np.arange(n_grid) / n_grid
    errs = np.empty(n_grid)
    for i, a in enumerate(alphas):
        s = awq_scales(abs_mean, a)
        errs[i] = sum(output_error(W, fake_quantize(np.asarray(W, np.float64) * s, bits,
                                                    group_size) / s, G) for W in Ws)
    best = int(np.argmin(errs))
    return best, alphas, errs, awq_scales(abs_mean, alphas[best])


def clip_search(W, G, bits: int, group_size: int, n_grid: int = 20, max_shrink: float = 0.5):
    """``(clipped W float64, ratio per (row, group))``."""
    W = np.asarray(W, np.float64)
    d_out, d_in = W.shape
    bounds = group_bounds(d_in, group_size)
    ratios = 1.0 - np.arange(int(max_shrink * n_grid)) / n_grid
    best = np.empty((d_out, len(bounds)))
    out = np.empty_like(W)
    for j, (a, b) in enumerate(bounds):
        Wg, Gg = W[:, a:b], G[a:b, a:b]
        m = np.abs(Wg).max(axis=1, keepdims=True)
        errs = []
        for r in ratios:
            # the clip bound is a float32 value (the weights' precision): a group clipped at both
            # ends quantizes with a zero point at an exact .5 tie, so its rounding must be stated
            lim = (np.float32(r) * m.astype(np.float32)).astype(np.float64)
            Wc = np.clip(Wg, -lim, lim)
            D = fake_quantize(Wc, bits, 0) - Wg
            errs.append(np.sum((D @ Gg) * D, axis=1))
        k = np.argmin(np.stack(errs), axis=0)
        best[:, j] = ratios[k]
        lim = (best[:, j:j + 1].astype(np.float32) * m.astype(np.float32)).astype(np.float64)
        out[:, a:b] = np.clip(Wg, -lim, lim)
    return out, best
