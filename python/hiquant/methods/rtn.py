"""Round-to-nearest min-max quantization (the plan's high columns, if any, in their own part)."""

from __future__ import annotations

from ..storage import QuantizedLayer


def quantize(name, W, stats, plan, settings) -> QuantizedLayer:
    """RTN of ``W`` under ``plan``; ``stats`` is not used."""
    return QuantizedLayer.rtn(name, W, plan.b_low, plan.group_size, plan.high_idx, plan.b_high,
                              scale_bits=settings.scale_bits)
