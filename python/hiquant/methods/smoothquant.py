"""SmoothQuant (Xiao et al., 2023): migrate the activations' outliers into the weights, then
round-to-nearest weights; evaluate with per-token activation quantization (``abits``).

For the layers fed by an RMSNorm — q/k/v (``input_layernorm``) and gate/up
(``post_attention_layernorm``) — input channel j gets the smoothing factor
``s_j = max|X_j|^α / max|W_j|^(1−α)`` (``α = settings.smooth_alpha``, default 0.5; ``max|X_j|``
over the calibration tokens, :attr:`hiquant.stats.LayerStats.abs_max`, collected in the Gram
pass; ``max|W_j|`` over the rows of every layer of the group; both clamped below at 1e-5 as the
paper's code does). The norm weight is divided by s (rounded to its stored dtype; the linears get
the scales the rounded norm realizes, :func:`hiquant.methods.awq.fold_scales`) and the layers'
input columns multiplied by s: the full-precision function is unchanged, the activations' channel
ranges are flattened, and per-token activation quantization loses less. o_proj and down_proj are
not smoothed, as in the paper's code for LLaMA-family models. The statistics are those of the
block's inputs in the pipeline (the outputs of the already-quantized blocks before it).

The weights are then quantized round-to-nearest (min-max, the plan's width and group size); the
stored format and its bits are RTN's. Activation quantization is a setting of any method
(``abits``), applied when the quantized model is evaluated. The float64 twin of the smoothing
factors is :mod:`hiquant._reference.smoothquant`.
"""

from __future__ import annotations

import numpy as np

from ..errors import InvalidArgumentError
from ..storage import QuantizedLayer
from .awq import fold_scales

__all__ = ["smoothing_scales", "prepare_block", "quantize"]


def smoothing_scales(act_max: np.ndarray, Ws, alpha: float) -> np.ndarray:
    """SmoothQuant's factors, float64 ``(d_in,)`` (see the module docstring)."""
    w_max = np.abs(Ws[0]).max(axis=0).astype(np.float64)
    for W in Ws[1:]:
        np.maximum(w_max, np.abs(W).max(axis=0), out=w_max)
    a = np.maximum(np.asarray(act_max, np.float64), 1e-5)
    return np.maximum(a ** alpha / np.maximum(w_max, 1e-5) ** (1.0 - alpha), 1e-5)


def prepare_block(model, b: int, stats: dict, plans: dict, settings) -> dict:
    """Smooth the norm-fed groups of block ``b`` (see the module docstring); returns
    ``{layer name: notes}``."""
    alpha = 0.5 if settings is None else float(settings.smooth_alpha)
    linears = set(model.linear_names())
    notes = {}
    for group, scaler in zip(model.input_groups(b), model.input_scalers(b)):
        if scaler is None or scaler in linears:
            continue
        st = stats[group[0]]
        if st.abs_max is None:
            raise InvalidArgumentError("smoothquant needs each channel's max |x|; pass the "
                                       "statistics of hiquant.stats.block_grams")
        s = smoothing_scales(st.abs_max, [model.get_weight(n) for n in group], alpha)
        fold_scales(model, group, scaler, s)
        notes.update({n: {"smooth_max_scale": float(s.max())} for n in group})
    return notes


def quantize(name, W, stats, plan, settings) -> QuantizedLayer:
    """RTN of the smoothed weight ``W`` at ``plan.b_low`` bits."""
    return QuantizedLayer.rtn(name, W, plan.b_low, plan.group_size, plan.high_idx, plan.b_high,
                              scale_bits=settings.scale_bits)
