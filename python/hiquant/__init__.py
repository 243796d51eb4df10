"""hiquant: post-training quantization of LLMs with layer-wise optimized high-impact ratios."""

from __future__ import annotations

from . import _core
from ._threads import get_num_threads, set_num_threads
from .errors import (
    CheckpointError,
    HiquantError,
    InfeasibleBudgetError,
    InvalidArgumentError,
    NumericalError,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "set_num_threads",
    "get_num_threads",
    "HiquantError",
    "InvalidArgumentError",
    "NumericalError",
    "InfeasibleBudgetError",
    "CheckpointError",
]
