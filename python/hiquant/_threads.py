"""Threads: hiquant's thread count, NumPy's BLAS threads, and the one worker pool.

* :func:`set_num_threads` / :func:`get_num_threads`: hiquant's default for native kernels;
  :func:`resolve_n_threads` turns a per-call ``n_threads`` into the value passed to ``_core``.
* :func:`single_threaded_blas`, :func:`set_blas_threads`, :func:`blas_threads`: NumPy's OpenBLAS.
* :func:`map_ordered`: the worker pool every stage runs NumPy work on (windows, chunks):
  ``[fn(x) for x in items]`` on :func:`resolve_workers` threads with single-threaded BLAS.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from . import _core
from .errors import InvalidArgumentError

__all__ = [
    "set_num_threads",
    "get_num_threads",
    "resolve_n_threads",
    "resolve_workers",
    "set_blas_threads",
    "blas_threads",
    "single_threaded_blas",
    "map_ordered",
]


def set_num_threads(n: int | None) -> None:
    """Set hiquant's default number of threads for native kernels.

    ``None`` or ``0`` restores the automatic choice (``OMP_NUM_THREADS`` if set, else the cores
    available). Only hiquant's own kernels are affected: the global OpenMP setting, NumPy's BLAS
    and other libraries keep theirs. Every kernel also takes ``n_threads`` per call.
    """
    if n is None:
        n = 0
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise InvalidArgumentError(f"n must be a non-negative int or None, got {n!r}")
    _core.set_num_threads(n)


def get_num_threads() -> int:
    """hiquant's current default number of threads for native kernels."""
    return int(_core.get_num_threads())


def resolve_n_threads(n_threads: int | None) -> int:
    """Per-call thread argument → the value passed to _core (0 = hiquant's default)."""
    if n_threads is None:
        return 0
    if not isinstance(n_threads, int) or isinstance(n_threads, bool) or n_threads < 0:
        raise InvalidArgumentError(f"n_threads must be a non-negative int or None, got {n_threads!r}")
    return n_threads


# --------------------------------------------------------------------------------------------
# BLAS threads


def _openblas_setter():
    """(set, get) thread functions of the OpenBLAS NumPy is linked with, found among the loaded
    shared libraries (NumPy wheels bundle it under a suffixed name); (None, None) if absent."""
    try:
        with open("/proc/self/maps") as f:
            libs = sorted({ln.split()[-1] for ln in f
                           if "blas" in ln.lower() and ln.split()[-1].startswith("/")})
    except OSError:
        return None, None
    for lib in libs:
        try:
            h = ctypes.CDLL(lib)
        except OSError:
            continue
        for prefix, suffix in (("scipy_openblas", "64_"), ("openblas", "64_"),
                               ("scipy_openblas", ""), ("openblas", "")):
            setter = getattr(h, f"{prefix}_set_num_threads{suffix}", None)
            getter = getattr(h, f"{prefix}_get_num_threads{suffix}", None)
            if setter is not None and getter is not None:
                getter.restype = ctypes.c_int
                return setter, getter
    return None, None


_BLAS = None  # (setter, getter) once looked up
_blas_lock = threading.Lock()
_blas_depth = 0
_blas_saved = None


def _blas_fns():
    global _BLAS
    if _BLAS is None:
        _BLAS = _openblas_setter()
    return _BLAS


def set_blas_threads(n: int) -> bool:
    """Set the thread count of NumPy's OpenBLAS (the runtime's matrix products). Returns False
    when NumPy's BLAS is not an OpenBLAS whose setter can be found (then set OPENBLAS_NUM_THREADS
    or OMP_NUM_THREADS before starting Python)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise InvalidArgumentError(f"n must be a positive int, got {n!r}")
    fn, _ = _blas_fns()
    if fn is None:
        return False
    with _blas_lock:
        if _blas_depth:  # inside single_threaded_blas(): applies when it exits
            globals()["_blas_saved"] = n
        else:
            fn(ctypes.c_int(n))
    return True


def blas_threads() -> int | None:
    """NumPy's OpenBLAS thread count, or None when it cannot be read."""
    _, get = _blas_fns()
    return int(get()) if get is not None else None


@contextlib.contextmanager
def single_threaded_blas():
    """Run NumPy's OpenBLAS on one thread inside the block (re-entrant; restored on exit).

    The runtime parallelizes over sequences with its own worker threads instead of inside each
    matrix product: results are then identical for any thread count (OpenBLAS's threaded
    products are not bitwise reproducible), and a busy machine does not stall BLAS threads at
    their barriers (measured here with other jobs running: one 4×512-token block took 1.56 s with
    two BLAS threads, 0.38 s with one). Yields False when the BLAS cannot be controlled.
    """
    global _blas_depth, _blas_saved
    fn, get = _blas_fns()
    if fn is None:
        yield False
        return
    with _blas_lock:
        if _blas_depth == 0:
            _blas_saved = int(get())
            fn(ctypes.c_int(1))
        _blas_depth += 1
    try:
        yield True
    finally:
        with _blas_lock:
            _blas_depth -= 1
            if _blas_depth == 0:
                fn(ctypes.c_int(_blas_saved))



def resolve_workers(n_threads: int | None) -> int:
    """Worker threads for NumPy work: ``n_threads``, or hiquant's default thread count."""
    n = resolve_n_threads(n_threads)
    return n if n > 0 else max(1, get_num_threads())


def map_ordered(fn, items, n_threads: int | None = None, *,
                on_error: Callable[[], None] | None = None) -> list:
    """``[fn(x) for x in items]`` on worker threads with single-threaded BLAS; results in order.

    NumPy releases the GIL in matrix products and large element-wise operations, so the workers
    run in parallel. ``n_threads``: see :func:`resolve_workers` (never more workers than items;
    one runs in the calling thread). The first exception (in item order) is re-raised after
    the items not yet started are cancelled; ``on_error()``, if given, is called first, in the
    calling thread (also on Ctrl-C there), so that workers waiting on each other can be told to
    stop (the statistics' turnstiles)."""
    global _map_depth
    items = list(items)
    nw = min(resolve_workers(n_threads), len(items))
    if nw <= 1:
        return _map_ordered(fn, items, nw, on_error)
    with _blas_lock:
        _map_depth += 1
    try:
        return _map_ordered(fn, items, nw, on_error)
    finally:
        with _blas_lock:
            _map_depth -= 1


_map_depth = 0  # map_ordered calls running on two or more workers now (in any thread)


def kernel_threads() -> int:
    """Threads for a native kernel called from NumPy work that may run on map_ordered's workers:
    1 while a map_ordered call runs on two or more workers (they already use the cores, as its
    single-threaded BLAS does), else 0 (hiquant's default)."""
    return 1 if _map_depth > 0 else 0


def _map_ordered(fn, items, nw, on_error):
    with single_threaded_blas():
        if nw <= 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(max_workers=nw, thread_name_prefix="hiquant") as ex:
            futs = [ex.submit(fn, x) for x in items]
            try:
                return [f.result() for f in futs]
            except BaseException:
                if on_error is not None:
                    on_error()
                for f in futs:
                    f.cancel()
                raise
