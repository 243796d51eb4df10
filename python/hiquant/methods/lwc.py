"""Learnable weight clipping (OmniQuant's LWC) on every column, layer-wise Gram objective."""

from __future__ import annotations

from .hybrid import layer_options, quantize_layer


def quantize(name, W, stats, plan, settings):
    """LWC at ``plan.b_low`` bits on all columns (``lwc_iters``, ``lwc_lr``, ``low_rounding``);
    on the torch backend's device statistics with torch parts (hiquant.torch_pipeline)."""
    from ..torch_pipeline import learned_layer, learned_on_device
    if learned_on_device(stats, settings, "lwc"):
        return learned_layer(name, W, stats, plan, settings, "lwc")
    res = quantize_layer(W, stats.gram, stats.n_tokens, [], plan.b_low, plan.b_low,
                         plan.group_size, **layer_options(settings))
    return res.to_layer(name)
