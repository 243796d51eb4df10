"""hiquant: post-training quantization of LLMs with layer-wise optimized high-impact ratios.

The pipeline's stages are modules, in the order data flows through them: :mod:`hiquant.config`
(settings), :mod:`hiquant.model` (the NumPy runtime; :mod:`hiquant.checkpoint` reads the model
folder, :mod:`hiquant.runtime` is the protocol every runtime implements), :mod:`hiquant.calib`
(calibration windows), :mod:`hiquant.stats` (Gram, empirical Fisher), :mod:`hiquant.allocate`
(M, the IQP, per-layer plans), :mod:`hiquant.methods` (the layer quantizers) and
:mod:`hiquant.blockwise` (block-wise objectives), :mod:`hiquant.export` / :mod:`hiquant.packed`,
:mod:`hiquant.evaluate`. :func:`hiquant.quantize` (:mod:`hiquant.pipeline`) runs them all.
"""

from __future__ import annotations

from . import _core  # noqa: F401  (the native core: an import error surfaces here, at once)
from ._threads import get_num_threads, set_num_threads
from .config import QuantizeSettings
from .errors import (
    CheckpointError,
    HiquantError,
    HiquantWarning,
    InfeasibleBudgetError,
    InvalidArgumentError,
    InvalidTypeError,
    NumericalError,
    OutputError,
)
from .evaluate import perplexity
from .model import load_model
from .packed import load_packed, open_checkpoint
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
    "OutputError",
    "HiquantWarning",
]
