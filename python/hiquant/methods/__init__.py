"""The method registry: every method runs through the same pipeline and code paths.

A method is two choices: its **allocation** — which input columns of each layer are high-impact
and at which width (:func:`hiquant.allocate.plan_layers` turns it into one
:class:`~hiquant.allocate.LayerPlan` per layer) — and its **layer quantizer**, a module of this
package with one signature::

    quantize(name, W, stats, plan, settings) -> hiquant.storage.QuantizedLayer

``W`` float32 ``(d_out, d_in)``; ``stats`` the layer's :class:`hiquant.stats.LayerStats` (the
Gram matrix of its calibration inputs and their token count; ``None`` for quantizers that need
none); ``plan`` its :class:`~hiquant.allocate.LayerPlan`; ``settings`` the resolved
:class:`hiquant.QuantizeSettings`. Methods are comparable at matched average bits because every
plan's bits are counted by the one storage formula, :func:`hiquant.storage.storage_bits`.

=================  ==================================================  =====================
method             high-impact columns (allocation)                    layer quantizer
=================  ==================================================  =====================
``rtn``            none                                                ``rtn``: round to nearest
``gptq``           none                                                ``gptq``
``lwc``            none                                                ``lwc``: learnable clipping
``adaround``       none                                                ``adaround`` on all columns
``awq``            none                                                ``awq``: scales + clip + RTN
``smoothquant``    none                                                ``smoothquant``: smoothing + RTN
``billm``          none (wbits 1; group_size = its block of columns)   ``billm``: BiLLM binarization
``fixed-ratio``    one ratio in every layer, at b_H (``fixed``)        ``hybrid`` (LWC + AdaRound)
``fp16-retention`` the ratio that meets the budget, in FP16 (``fixed``)  ``hybrid``, b_H = 16
``hiq``            per-layer ratios from the IQP (``iqp``)             ``hybrid`` (LWC + AdaRound)
=================  ==================================================  =====================

Adding a method: a module here with ``quantize`` (and, for a new quantizer, its name in
:data:`hiquant.config.QUANTIZERS`), and one entry in :data:`METHODS`. A module may also define
``prepare_block(model, b, stats, plans, settings) -> {name: notes}``: an equivalent transform of
block ``b``'s full-precision weights (``awq`` folds its scales into the norms and linears that
feed each layer) run before the block's statistics are collected again and its layers quantized.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from ..errors import InvalidArgumentError

__all__ = ["MethodSpec", "METHODS", "method_spec", "quantizer"]


@dataclass(frozen=True)
class MethodSpec:
    """How a method chooses its plans and which layer quantizer realizes them."""

    allocation: str  # "none" | "fixed" (one ratio everywhere) | "iqp" (hiq's allocation)
    quantizer: str  # a module of hiquant.methods (hiquant.config.QUANTIZERS)
    default_ratio: float = 0.0  # allocation "fixed" without ratio or budget
    fp16_high: bool = False  # the high-impact columns are kept in FP16 (b_H = 16)

    @property
    def fisher(self) -> bool:
        """Whether the method needs the Fisher column scores (it keeps high-impact columns)."""
        return self.allocation != "none"


METHODS = {
    "rtn": MethodSpec("none", "rtn"),
    "gptq": MethodSpec("none", "gptq"),
    "lwc": MethodSpec("none", "lwc"),
    "adaround": MethodSpec("none", "adaround"),
    "awq": MethodSpec("none", "awq"),
    "smoothquant": MethodSpec("none", "smoothquant"),
    "billm": MethodSpec("none", "billm"),
    "fixed-ratio": MethodSpec("fixed", "hybrid", default_ratio=0.05),
    "fp16-retention": MethodSpec("fixed", "hybrid", default_ratio=0.01, fp16_high=True),
    "hiq": MethodSpec("iqp", "hybrid"),
}


def method_spec(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise InvalidArgumentError(f"unknown method {name!r}; choose one of "
                                   f"{', '.join(METHODS)}") from None


def quantizer(kind: str):
    """The layer quantizer module ``kind`` (its ``quantize`` has the signature above)."""
    from ..config import QUANTIZERS
    if kind not in QUANTIZERS:
        raise InvalidArgumentError(f"quantizer must be one of {', '.join(QUANTIZERS)}, got "
                                   f"{kind!r}")
    return importlib.import_module(f"{__name__}.{kind}")
