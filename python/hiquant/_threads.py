from __future__ import annotations

from . import _core


def set_num_threads(n: int | None) -> None:
    """Set hiquant's default number of threads for native kernels.

    ``None`` or ``0`` restores the automatic choice (``OMP_NUM_THREADS`` if set, else the cores
    available). Only hiquant's own kernels are affected: the global OpenMP setting, NumPy's BLAS
    and other libraries keep theirs. Every kernel also takes ``n_threads`` per call.
    """
    if n is None:
        n = 0
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be a non-negative int or None, got {n!r}")
    _core.set_num_threads(n)


def get_num_threads() -> int:
    """hiquant's current default number of threads for native kernels."""
    return int(_core.get_num_threads())


def resolve_n_threads(n_threads: int | None) -> int:
    """Per-call thread argument → the value passed to _core (0 = hiquant's default)."""
    if n_threads is None:
        return 0
    if not isinstance(n_threads, int) or isinstance(n_threads, bool) or n_threads < 0:
        raise ValueError(f"n_threads must be a non-negative int or None, got {n_threads!r}")
    return n_threads
