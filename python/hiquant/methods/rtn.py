"""Round-to-nearest min-max quantization (the plan's high columns, if any, in their own part)."""

from __future__ import annotations

from ..storage import QuantizedLayer


def quantize(name, W, stats, plan, settings) -> QuantizedLayer:
    """RTN of ``W`` under ``plan``; ``stats`` is not used. On the torch backend the codes of a
    plan without high columns are computed on the device (the same codes)."""
    if settings.backend == "torch" and len(plan.high_idx) == 0:
        from ..torch_pipeline import rtn_layer
        return rtn_layer(name, W, plan, settings)
    return QuantizedLayer.rtn(name, W, plan.b_low, plan.group_size, plan.high_idx, plan.b_high,
                              scale_bits=settings.scale_bits)
