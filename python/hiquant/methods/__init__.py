"""The method registry: every method runs through the same pipeline and code paths.

A method decides two things for each linear layer: its *plan* (how many high-impact columns and
at which widths — `LayerPlan`) and how a layer is quantized given that plan and its calibration
Gram matrix (`quantize_layer`). Methods are comparable at matched average bits because the bits
of every plan are counted by the one storage formula in :mod:`hiquant.storage`.

=================  ===============================================  ==========================
name               high-impact columns                              layer quantizer
=================  ===============================================  ==========================
``rtn``            none                                             round-to-nearest min-max
``gptq``           none                                             GPTQ
``lwc``            none                                             learnable weight clipping
``adaround``       none                                             AdaRound on all columns
``fixed-ratio``    the same ratio in every layer, at b_H            hybrid (LWC + AdaRound)
``fp16-retention`` the ratio that meets the budget, kept in FP16    hybrid with b_H = 16
``hiq``            per-layer ratios from the IQP allocation         hybrid (LWC + AdaRound)
=================  ===============================================  ==========================
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["LayerPlan", "METHODS", "method_info"]


@dataclass(frozen=True)
class LayerPlan:
    """What a method will store for one layer."""

    k: int  # number of high-impact columns
    high_idx: np.ndarray  # ascending int64 (k,)
    b_low: int
    b_high: int  # 16 = FP16 retention; ignored when k == 0
    group_size: int
    ratio: float = 0.0  # the candidate ratio this plan came from (k = ceil(ratio * d_in))


# name -> (uses Fisher column scores, allocation kind, layer quantizer)
METHODS = {
    "rtn": dict(fisher=False, allocation="none", quantizer="rtn"),
    "gptq": dict(fisher=False, allocation="none", quantizer="gptq"),
    "lwc": dict(fisher=False, allocation="none", quantizer="lwc"),
    "adaround": dict(fisher=False, allocation="none", quantizer="adaround"),
    "fixed-ratio": dict(fisher=True, allocation="fixed", quantizer="hybrid"),
    "fp16-retention": dict(fisher=True, allocation="fixed-budget", quantizer="hybrid"),
    "hiq": dict(fisher=True, allocation="iqp", quantizer="hybrid"),
}


def method_info(name: str) -> dict:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None
