"""AWQ (Lin et al., 2024, *Activation-aware Weight Quantization*): per-input-channel scales found
on the calibration activations, folded into the model as an equivalent transform, then a clipping
search and round-to-nearest.

For each input group of a block (q/k/v, o, gate/up, down) AWQ scales input channel j of the
group's weights by ``s_j = x̄_j^α`` (x̄_j = mean |x_j| over the calibration tokens, normalized by
``sqrt(max s · min s)``) and the channel's activation by ``1/s_j``. ``α`` is chosen on a grid of
20 points ``α = i/20``, ``i = 0..19`` (the paper's and llm-awq's grid; α = 0 is plain RTN), by the
output error of the group's layers ``Σ_W tr(Δ G Δᵀ)``, ``Δ = Q(W·diag(s))·diag(s)⁻¹ − W``, exact
from the block's Gram matrix G = Σ x xᵀ. (llm-awq measures the error at the output of the module
the layers feed — the whole attention or MLP — on a sample of the tokens; hiquant uses each
layer's output on all calibration tokens, the objective its other layer quantizers use.) x̄ is
collected with G in the same capture pass (:attr:`hiquant.stats.LayerStats.abs_mean`), not
approximated by ``sqrt(diag(G)/n)``: AWQ's saliency is the mean magnitude, and the RMS weights
rare outliers more.

**Where the inverse scale goes.** hiquant's stored format (:mod:`hiquant.storage`) holds one
scale and zero point per (row, group of columns); a per-*column* factor ``1/s_j`` on the
dequantized weight cannot be stored, so ``Q(W·s)/s`` is not representable. The scales are
therefore applied as the paper does, as an equivalent transform of the full-precision model
before the block is quantized: the group's weights get ``W·diag(s)`` and the op producing its
input gets ``diag(s)⁻¹`` (:meth:`~hiquant.runtime.ModelRuntime.input_scalers`): q/k/v's and
gate/up's RMSNorm weights (``set_norm_weight``, rounded to the stored dtype; the linears use the
scales the rounded norm actually realizes, so the function is unchanged up to float32 rounding),
v_proj's rows for o_proj (skipped under grouped-query attention or with a v bias, as llm-awq
does) and up_proj's rows for down_proj. The exported checkpoints carry the changed norm weights
(``model.modified_tensors()``); the quantized weights are plain per-group RTN codes of
``W·diag(s)``, so the bits are RTN's. As in llm-awq, every group's scales are searched on the
block's full-precision statistics first and applied together.

Then, per layer on the transformed block's statistics, the clipping search: for every output row
and quantization group the range ``[-r·m, r·m]`` (m = max |w| of the group) with
``r = 1 − i/20``, ``i = 0..9``, minimizing the group's output error ``δ G_gg δᵀ``; q_proj and
k_proj are not clipped (llm-awq: their errors act through the attention scores). The clipped
weights are quantized round-to-nearest min-max at the plan's width and group size.

The float64 twin of both searches is :mod:`hiquant._reference.awq`.
"""

from __future__ import annotations

import numpy as np

from .. import quantizer as qz
from ..errors import InvalidArgumentError
from ..storage import QuantizedLayer

__all__ = ["N_GRID", "MAX_SHRINK", "awq_scales", "scale_search", "clip_search", "prepare_block",
           "fold_scales", "quantize"]

N_GRID = 20  # scale search: α = i / N_GRID, i = 0..N_GRID-1; clip search: r = 1 - i / N_GRID
MAX_SHRINK = 0.5  # clip search: i < MAX_SHRINK * N_GRID
NO_CLIP = ("q_proj", "k_proj")  # llm-awq does not clip the attention scores' inputs


def awq_scales(abs_mean: np.ndarray, alpha: float) -> np.ndarray:
    """``s = max(x̄, 1e-4)^α / sqrt(max · min)`` as float64 ``(d_in,)``."""
    s = np.maximum(np.asarray(abs_mean, np.float64), 1e-4) ** float(alpha)
    return s / np.sqrt(s.max() * s.min())


def _output_error(D: np.ndarray, G: np.ndarray) -> float:
    return float(np.einsum("ij,ij->", D @ G, D))


def scale_search(Ws, G: np.ndarray, abs_mean: np.ndarray, bits: int, group_size: int,
                 n_grid: int = N_GRID):
    """AWQ's grid search: ``(best index, alphas, errors, best scales)`` for the layers ``Ws``
    (float32 ``(d_out, d_in)`` each) sharing the input of Gram ``G`` and mean |x| ``abs_mean``."""
    alphas = np.arange(n_grid) / n_grid
    errs = np.empty(n_grid)
    Ws64 = [np.asarray(W, np.float64) for W in Ws]
    for i, a in enumerate(alphas):
        s = awq_scales(abs_mean, a)
        e = 0.0
        for W, W64 in zip(Ws, Ws64):
            Wq = qz.fake_quantize(np.ascontiguousarray(W * s.astype(np.float32)), bits, group_size)
            e += _output_error(Wq / s - W64, G)
        errs[i] = e
    best = int(np.argmin(errs))
    return best, alphas, errs, awq_scales(abs_mean, alphas[best])


def clip_search(W: np.ndarray, G: np.ndarray, bits: int, group_size: int, n_grid: int = N_GRID,
                max_shrink: float = MAX_SHRINK):
    """AWQ's clipping search: ``(clipped W float32, ratio per (row, group) float64)``."""
    d_out, d_in = W.shape
    g = d_in if (group_size <= 0 or group_size >= d_in) else group_size
    bounds = [(a, min(a + g, d_in)) for a in range(0, d_in, g)]
    ratios = 1.0 - np.arange(int(max_shrink * n_grid)) / n_grid
    W64 = W.astype(np.float64)
    m = np.stack([np.abs(W[:, a:b]).max(axis=1) for a, b in bounds], axis=1)  # (d_out, ng)
    mcol = np.repeat(m, [b - a for a, b in bounds], axis=1)
    errs = np.empty((len(ratios), d_out, len(bounds)))
    for k, r in enumerate(ratios):
        lim = (np.float32(r) * mcol).astype(np.float32)
        Wc = np.ascontiguousarray(np.clip(W, -lim, lim))
        D = qz.fake_quantize(Wc, bits, group_size).astype(np.float64) - W64
        for j, (a, b) in enumerate(bounds):
            errs[k, :, j] = np.einsum("ij,ij->i", D[:, a:b] @ G[a:b, a:b], D[:, a:b])
    best = ratios[np.argmin(errs, axis=0)]  # ties: the first, i.e. the least clipping
    lim = np.repeat(best.astype(np.float32), [b - a for a, b in bounds], axis=1) * mcol
    return np.ascontiguousarray(np.clip(W, -lim, lim), dtype=np.float32), best


def prepare_block(model, b: int, stats: dict, plans: dict, settings) -> dict:
    """Search every input group's scales of block ``b`` on ``stats`` (the block's
    :class:`~hiquant.stats.LayerStats`, full-precision weights) and fold them into the model
    (see the module docstring). Returns ``{layer name: notes}`` (the chosen α) for the report;
    the caller collects the transformed block's statistics again before :func:`quantize`."""
    found = []
    for group, scaler in zip(model.input_groups(b), model.input_scalers(b)):
        if scaler is None:
            continue
        st = stats[group[0]]
        if st.abs_sum is None:
            raise InvalidArgumentError("awq needs each channel's mean |x|; pass the statistics of "
                                       "hiquant.stats.block_grams")
        p = plans[group[0]]
        idx, alphas, _, s = scale_search([model.get_weight(n) for n in group], st.gram,
                                         st.abs_mean, p.b_low, p.group_size)
        found.append((group, scaler, float(alphas[idx]), s))
    notes = {}
    for group, scaler, alpha, s in found:
        fold_scales(model, group, scaler, s)
        notes.update({n: {"awq_alpha": alpha} for n in group})
    return notes


def fold_scales(model, group, scaler: str, s: np.ndarray) -> np.ndarray:
    """The equivalent transform: the input channels of the layers ``group`` multiplied by ``s``
    (their weights' columns), the output channels of ``scaler`` (a norm weight's tensor name or a
    linear's name, :meth:`~hiquant.runtime.ModelRuntime.input_scalers`) divided by ``s``. A norm
    weight is stored rounded to its dtype, so the columns get the scales the rounded norm
    realizes (``w_old / w_new``; ``s`` where a weight is 0); those scales are returned."""
    s = np.asarray(s, np.float64)
    if scaler in set(model.linear_names()):
        Wp = model.get_weight(scaler)
        model.set_weight(scaler, np.ascontiguousarray(Wp / s[:, None], dtype=np.float32))
    else:
        w = model.get_norm_weight(scaler)
        model.set_norm_weight(scaler, (w / s).astype(np.float32))
        w_new = model.get_norm_weight(scaler).astype(np.float64)
        ok = (w_new != 0) & (w != 0)
        s = np.where(ok, w.astype(np.float64) / np.where(ok, w_new, 1.0), s)
    for n in group:
        W = model.get_weight(n)
        model.set_weight(n, np.ascontiguousarray(W * s[None, :], dtype=np.float32))
    return s


def quantize(name, W, stats, plan, settings) -> QuantizedLayer:
    """AWQ's clipping search on ``stats.gram`` (q_proj and k_proj are not clipped), then RTN at
    ``plan.b_low`` bits; ``W`` is the already-scaled weight (:func:`prepare_block`)."""
    if plan.k:
        raise InvalidArgumentError("awq stores every column at one width; its plan has no "
                                   "high-impact columns")
    info = {}
    if name.rsplit(".", 1)[-1] not in NO_CLIP:
        W, ratios = clip_search(W, stats.gram, plan.b_low, plan.group_size)
        info["awq_clip_mean"] = float(ratios.mean())
    ql = QuantizedLayer.rtn(name, W, plan.b_low, plan.group_size, scale_bits=settings.scale_bits)
    ql.info.update(info)
    return ql
