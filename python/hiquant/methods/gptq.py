"""GPTQ (Frantar et al., 2023): error-compensating column sweep on the layer's Gram matrix."""

from __future__ import annotations

import numpy as np

from .. import learners
from ..storage import QuantizedLayer, QuantPart


def quantize(name, W, stats, plan, settings) -> QuantizedLayer:
    """GPTQ codes at ``plan.b_low`` bits, float16 group scales formed during the sweep
    (``gptq_percdamp``, ``gptq_blocksize``, ``gptq_act_order``); the plan has no high columns."""
    s = settings
    if getattr(stats, "gram_device", None) is not None:  # the torch backend's block loop
        from ..torch_pipeline import gptq_layer
        return gptq_layer(name, W, stats, plan, s)
    res = learners.gptq(W, stats.gram, bits=plan.b_low, group_size=plan.group_size,
                        percdamp=s.gptq_percdamp, blocksize=s.gptq_blocksize,
                        act_order=s.gptq_act_order, n_threads=s.n_threads)
    low = QuantPart(plan.b_low, plan.group_size, res.codes, res.scale.astype(np.float16), res.zero)
    return QuantizedLayer(name, W.shape[0], W.shape[1], np.zeros(0, np.int64), low)
