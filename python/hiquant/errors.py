"""Exceptions raised by hiquant. Native errors are translated to these classes, so callers catch
classes from this one module whatever layer raised them."""

from __future__ import annotations

__all__ = [
    "HiquantError",
    "InvalidArgumentError",
    "InvalidTypeError",
    "NumericalError",
    "InfeasibleBudgetError",
    "CheckpointError",
    "OutputError",
    "HiquantWarning",
]


class HiquantError(Exception):
    """Base class of every error hiquant raises on purpose."""


class InvalidArgumentError(HiquantError, ValueError):
    """An argument is malformed: a shape, range or option that cannot work."""


class InvalidTypeError(HiquantError, TypeError):
    """An argument has the wrong type or dtype (a float64 array where float32 is required, a str
    where an int is): convert it visibly and call again."""


class NumericalError(HiquantError, ArithmeticError):
    """Non-finite input (NaN/Inf) or a computation that cannot proceed numerically."""


class InfeasibleBudgetError(HiquantError, ValueError):
    """No allocation meets the bit budget. ``min_feasible`` is the smallest budget that does."""

    def __init__(self, message: str, min_feasible: float | None = None):
        super().__init__(message)
        self.min_feasible = min_feasible


class CheckpointError(HiquantError, ValueError):
    """A model folder, config or safetensors file is missing, malformed or inconsistent."""


class OutputError(HiquantError, OSError):
    """An output cannot be written: permission denied, a read-only file system, a full disk.
    Nothing partial is left under the output's name."""


class HiquantWarning(UserWarning):
    """A setting that has no effect, or a result that is not what the settings suggest."""
