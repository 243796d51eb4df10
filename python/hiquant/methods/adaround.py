"""AdaRound (Nagel et al., 2020) on every column, min-max scales, layer-wise Gram objective."""

from __future__ import annotations

import numpy as np

from ..storage import QuantizedLayer
from .hybrid import layer_options, quantize_layer


def quantize(name, W, stats, plan, settings) -> QuantizedLayer:
    """AdaRound at ``plan.b_low`` bits on all columns (``adaround_iters``, ``adaround_lr``),
    stored as the layer's only part (no high-column mask); on the torch backend's device
    statistics with torch parts (hiquant.torch_pipeline)."""
    from ..torch_pipeline import learned_layer, learned_on_device
    if learned_on_device(stats, settings, "adaround"):
        return learned_layer(name, W, stats, plan, settings, "adaround")
    d_in = W.shape[1]
    res = quantize_layer(W, stats.gram, stats.n_tokens, np.arange(d_in), plan.b_low, plan.b_low,
                         plan.group_size, **layer_options(settings))
    return QuantizedLayer(name, W.shape[0], d_in, np.zeros(0, np.int64), res.high, None, None,
                          {"order": "adaround", "loss_final": res.loss_final,
                           "loss_rtn": res.loss_rtn, "seconds": res.seconds})
