"""hiquant: post-training quantization of LLMs with layer-wise optimized high-impact ratios.

The pipeline's stages are modules: :mod:`hiquant.model` (checkpoints, forward/backward),
:mod:`hiquant.calib` (calibration text), :mod:`hiquant.stats` (Gram, empirical Fisher),
:mod:`hiquant.allocate` (M and the IQP), :mod:`hiquant.quantizer` (primitives),
:mod:`hiquant.pipeline` (the pipeline, as :func:`hiquant.quantize`), :mod:`hiquant.export`, :mod:`hiquant.evaluate`.
"""

from __future__ import annotations

from . import _core
from ._threads import get_num_threads, set_num_threads
from .errors import (
    CheckpointError,
    HiquantError,
    InfeasibleBudgetError,
    InvalidArgumentError,
    InvalidTypeError,
    NumericalError,
)
from .evaluate import perplexity
from .packed import load_packed, open_checkpoint
from .model import load_model
from .config import QuantizeSettings
from .pipeline import Report, quantize
from .stats import collect_stats

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "quantize",
    "QuantizeSettings",
    "Report",
    "load_model",
    "open_checkpoint",
    "load_packed",
    "collect_stats",
    "perplexity",
    "set_num_threads",
    "get_num_threads",
    "HiquantError",
    "InvalidArgumentError",
    "InvalidTypeError",
    "NumericalError",
    "InfeasibleBudgetError",
    "CheckpointError",
]
