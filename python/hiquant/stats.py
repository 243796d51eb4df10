"""Calibration statistics of every linear layer: Gram matrices and the empirical Fisher diagonal.

* Gram: ``G = Σ x xᵀ`` over every calibration token's input ``x`` of the layer (``d_in × d_in``,
  float64), plus the token count; ``H = 2 G / n_tokens`` is GPTQ's Hessian. q/k/v share one
  input and one matrix, as do gate/up.
* Fisher: ``F = Σ_s (∂L_s/∂W)²`` over calibration sequences ``s`` (per-sequence gradients of the
  sequence's mean next-token loss, SqueezeLLM-style), float32 ``(d_out × d_in)``, and its
  margins in float64: per input channel ``fisher_col = F.sum(axis=0)``, per output row
  ``fisher_row = F.sum(axis=1)``. The margins are accumulated without F when F is not kept (the
  rank-1 M estimator needs only them: ``F ≈ fisher_row ⊗ fisher_col / ΣF``).

Accumulation (``gram_accumulate``): float32 products over chunks of 256 rows, chunk sums added in
float64 — SIMD at float32 width, with an error that does not grow with the number of tokens
(measured about 400 times below one float32 sum on llama-bench inputs, ``python bench/runtime.py
--gram-accuracy``; the table is in bench/RESULTS.md).

Collection runs each calibration window (one sequence: per-sequence gradients) on a worker
thread with single-threaded BLAS; contributions are added to the shared accumulators in window
order (a turnstile per block), so results are identical for any thread count.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import _core
from ._atomic import atomic_file
from ._threads import map_ordered, resolve_n_threads
from .errors import HiquantError, InvalidArgumentError, InvalidTypeError, NumericalError

__all__ = [
    "gram_accumulate",
    "fisher_accumulate",
    "CalibStats",
    "collect_stats",
    "load_or_collect",
    "stats_key",
    "FORMAT_VERSION",
]

FORMAT_VERSION = 2  # 2: fisher_row


# ---------------------------------------------------------------------------------- kernels


def gram_accumulate(G: np.ndarray, X: np.ndarray, *, n_threads: int | None = None) -> None:
    """``G += Xᵀ X`` in place. ``G``: float64 ``(d, d)``, symmetric (zeros or earlier results);
    ``X``: float32 ``(n, d)``. Raises NumericalError (G untouched) on NaN/Inf in X."""
    _core.gram_accumulate(G, X, resolve_n_threads(n_threads))


def fisher_accumulate(F: np.ndarray, grad: np.ndarray, *, n_threads: int | None = None) -> None:
    """``F += grad²`` in place (float32, same shape). Raises NumericalError (F untouched) on
    NaN/Inf in grad."""
    _core.fisher_accumulate(F, grad, resolve_n_threads(n_threads))


# ---------------------------------------------------------------------------------- container


@dataclass
class CalibStats:
    """Statistics of a model's linear layers on a calibration set.

    ``gram[name]``: float64 ``(d_in, d_in)`` (the same array object for layers sharing an input);
    ``n_tokens``: tokens summed into every Gram; ``fisher[name]``: float32 ``(d_out, d_in)``;
    ``fisher_col[name]`` / ``fisher_row[name]``: float64 ``(d_in,)`` / ``(d_out,)``, F's column /
    row sums; ``n_sequences``: sequences in the Fisher sum;
    ``meta``: model fingerprint, calibration settings and how the statistics were collected.
    """

    gram: dict = field(default_factory=dict)
    n_tokens: int = 0
    fisher: dict = field(default_factory=dict)
    fisher_col: dict = field(default_factory=dict)
    fisher_row: dict = field(default_factory=dict)
    n_sequences: int = 0
    meta: dict = field(default_factory=dict)

    def hessian(self, name: str) -> np.ndarray:
        """GPTQ's ``H = 2 G / n_tokens`` (a new float64 array)."""
        return self.gram[name] * (2.0 / self.n_tokens)

    def save(self, path) -> Path:
        """Write to a safetensors file atomically (hiquant._atomic.atomic_file). Shared Gram
        matrices are stored once; metadata goes in the header."""
        from safetensors.numpy import save_file

        path = Path(path)
        tensors, alias, stored = {}, {}, {}
        for name, G in self.gram.items():
            key = stored.get(id(G))
            if key is None:
                key = stored[id(G)] = f"gram/{name}"
                tensors[key] = np.ascontiguousarray(G, dtype=np.float64)
            alias[name] = key
        for name, F in self.fisher.items():
            tensors[f"fisher/{name}"] = np.ascontiguousarray(F, dtype=np.float32)
        for name, c in self.fisher_col.items():
            tensors[f"fisher_col/{name}"] = np.ascontiguousarray(c, dtype=np.float64)
        for name, r in self.fisher_row.items():
            tensors[f"fisher_row/{name}"] = np.ascontiguousarray(r, dtype=np.float64)
        header = {"format": "hiquant-calib-stats", "format_version": FORMAT_VERSION,
                  "n_tokens": int(self.n_tokens), "n_sequences": int(self.n_sequences),
                  "gram_alias": alias, "meta": self.meta}
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp), metadata={"hiquant": json.dumps(header, sort_keys=True)})
        return path

    @classmethod
    def load(cls, path) -> "CalibStats":
        """Read a file written by :meth:`save`. Raises HiquantError if it is not one."""
        from safetensors import safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="numpy") as f:
                md = f.metadata() or {}
                if "hiquant" not in md:
                    raise HiquantError(f"{path}: not a hiquant calibration-statistics file")
                header = json.loads(md["hiquant"])
                if header.get("format") != "hiquant-calib-stats":
                    raise HiquantError(f"{path}: not a hiquant calibration-statistics file")
                if header.get("format_version") != FORMAT_VERSION:
                    raise HiquantError(f"{path}: statistics format version "
                                       f"{header.get('format_version')} is not {FORMAT_VERSION}; "
                                       "collect them again")
                keys = set(f.keys())
                out = cls(n_tokens=header["n_tokens"], n_sequences=header["n_sequences"],
                          meta=header["meta"])
                loaded = {}
                for name, key in header["gram_alias"].items():
                    if key not in loaded:
                        loaded[key] = f.get_tensor(key)
                    out.gram[name] = loaded[key]
                for key in sorted(keys):
                    if key.startswith("fisher/"):
                        out.fisher[key[len("fisher/"):]] = f.get_tensor(key)
                    elif key.startswith("fisher_col/"):
                        out.fisher_col[key[len("fisher_col/"):]] = f.get_tensor(key)
                    elif key.startswith("fisher_row/"):
                        out.fisher_row[key[len("fisher_row/"):]] = f.get_tensor(key)
        except HiquantError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise HiquantError(f"{path}: cannot read calibration statistics ({e}); delete the "
                               "file and collect them again") from e
        return out


# ---------------------------------------------------------------------------------- collection


class _Aborted(Exception):
    pass


class _Turnstile:
    """Lets unit u pass only after units 0..u-1 passed: contributions are summed in unit order."""

    def __init__(self, abort: threading.Event):
        self._cond = threading.Condition()
        self._next = 0
        self._abort = abort

    def wait(self, u: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._next == u or self._abort.is_set())
            if self._abort.is_set():
                raise _Aborted

    def advance(self) -> None:
        with self._cond:
            self._next += 1
            self._cond.notify_all()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()


def _check_windows(model, windows) -> np.ndarray:
    if not isinstance(windows, np.ndarray) or not np.issubdtype(windows.dtype, np.integer):
        raise InvalidTypeError("windows must be an integer numpy.ndarray of token ids (n, seqlen), got "
                        f"{type(windows).__name__}")
    if windows.ndim != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        raise InvalidArgumentError(f"windows must have shape (n, seqlen) with n >= 1 and "
                                   f"seqlen >= 2, got {windows.shape}")
    if model.compute_dtype != np.float32:
        raise InvalidArgumentError("collect_stats needs a model computing in float32 (the "
                                   "default of load_model)")
    return np.ascontiguousarray(windows)


def collect_stats(model, windows: np.ndarray, *, gram: bool = True, fisher: bool = True,
                  progress: bool = True, n_threads: int | None = None,
                  batch_size: int | None = None, recompute: bool | None = None,
                  meta: dict | None = None, fisher_full: bool = True) -> CalibStats:
    """Gram matrices and/or the empirical Fisher diagonal of every linear layer on ``windows``
    (int token ids, ``(n, seqlen)``), with the model's current weights.

    Fisher needs one forward and backward pass per window (per-sequence gradients); Gram alone
    runs windows in chunks of ``batch_size``. ``n_threads`` workers (default: hiquant's thread
    count) run windows concurrently; the result does not depend on it. ``recompute``: keep only
    block inputs and recompute activations in the backward pass (None: when one window's
    activations of all blocks would exceed 1 GiB). ``meta`` is merged into ``.meta``.
    ``fisher_full=False`` keeps only F's margins, the column scores ``fisher_col`` and the row
    sums ``fisher_row`` (``d_in + d_out`` per layer, accumulated per window as ``Σ_rows g²`` and
    ``Σ_cols g²`` in float64), instead of the ``(d_out, d_in)`` float32 diagonal — what the
    pipeline does unless the ``diagonal`` or ``kfac`` M estimator needs the diagonal: for a 7B
    model the full diagonal alone is 26 GB.
    """
    windows = _check_windows(model, windows)
    if not (gram or fisher):
        raise InvalidArgumentError("nothing to collect: pass gram=True and/or fisher=True")
    n, T = windows.shape
    model.check_ids(windows, "windows", min_len=2)
    model.check_seqlen(T)
    nb = model.num_blocks
    if fisher:
        bs = 1
    else:
        bs = batch_size or model.auto_batch(T)
    units = [windows[u:u + bs] for u in range(0, n, bs)]
    if recompute is None:
        recompute = model.activation_bytes(T) * nb > (1 << 30)

    out = CalibStats()
    if gram:
        for b in range(nb):
            for group in model.input_groups(b):
                d_in = model.linear_shape(group[0])[1]
                G = np.zeros((d_in, d_in), dtype=np.float64)
                for name in group:
                    out.gram[name] = G
    if fisher:
        for name in model.linear_names():
            if fisher_full:
                out.fisher[name] = np.zeros(model.linear_shape(name), dtype=np.float32)
            else:
                d_out, d_in = model.linear_shape(name)
                out.fisher_col[name] = np.zeros(d_in, dtype=np.float64)
                out.fisher_row[name] = np.zeros(d_out, dtype=np.float64)

    abort = threading.Event()
    turn_g = [_Turnstile(abort) for _ in range(nb)]
    turn_f = [_Turnstile(abort) for _ in range(nb)]
    bar_lock = threading.Lock()
    bar = None
    if progress:
        from tqdm.auto import tqdm
        what = "+".join(k for k, on in (("gram", gram), ("fisher", fisher)) if on)
        bar = tqdm(total=n, desc=f"calibration stats ({what})", unit="window", leave=False)

    def run(u: int) -> None:
        ids = units[u]
        h = model.embed(ids)
        saved = []
        for b in range(nb):
            captured = {}
            groups = model.input_groups(b)
            firsts = {g[0] for g in groups}

            def capture(name, X, captured=captured, firsts=firsts):
                if name in firsts:
                    captured[name] = X

            if fisher and not recompute:
                h_next, cache = model.block_forward(b, h, cache=True,
                                                    capture=capture if gram else None)
                saved.append(cache)
            else:
                if fisher:
                    saved.append(h)
                h_next = model.block_forward(b, h, capture=capture if gram else None)
            if gram:
                turn_g[b].wait(u)
                try:
                    for g in groups:
                        _core.gram_accumulate(out.gram[g[0]], captured[g[0]], 1)
                finally:
                    turn_g[b].advance()
            h = h_next
        if fisher:
            _, dh = model.head_loss(h, ids, grad=True)
            for b in reversed(range(nb)):
                cache = saved[b]
                if recompute:
                    _, cache = model.block_forward(b, cache, cache=True)
                saved[b] = None
                dh, grads = model.block_backward(b, cache, dh)
                turn_f[b].wait(u)
                try:
                    for name, g in grads.items():
                        if fisher_full:
                            _core.fisher_accumulate(out.fisher[name], g, 1)
                        else:
                            if not np.all(np.isfinite(g)):
                                raise NumericalError(f"the gradient of {name} is not finite")
                            g2 = g * g
                            out.fisher_col[name] += np.add.reduce(g2, axis=0, dtype=np.float64)
                            out.fisher_row[name] += np.add.reduce(g2, axis=1, dtype=np.float64)
                finally:
                    turn_f[b].advance()
        if bar is not None:
            with bar_lock:
                bar.update(len(ids))

    def guarded(u: int) -> None:
        try:
            run(u)
        except _Aborted:
            pass
        except BaseException:
            abort.set()
            for t in turn_g + turn_f:
                t.wake()
            raise

    def stop_workers() -> None:  # also on Ctrl-C in the calling thread
        abort.set()
        for t in turn_g + turn_f:
            t.wake()

    try:
        map_ordered(guarded, range(len(units)), n_threads, on_error=stop_workers)
    finally:
        if bar is not None:
            bar.close()
    if abort.is_set():  # a worker failed after another one's error was already raised
        raise HiquantError("statistics collection was aborted")

    if gram:
        out.n_tokens = n * T
    if fisher:
        out.n_sequences = n
        if fisher_full:
            for name, F in out.fisher.items():
                out.fisher_col[name] = F.sum(axis=0, dtype=np.float64)
                out.fisher_row[name] = F.sum(axis=1, dtype=np.float64)
    out.meta = {
        "model": model.fingerprint(),
        "model_path": str(model.path),
        "modified_weights": model.modified_weights(),
        "n_windows": int(n), "seqlen": int(T),
        "windows_sha256": hashlib.sha256(windows.astype("<i8").tobytes()).hexdigest(),
        "gram": bool(gram), "fisher": bool(fisher), "fisher_full": bool(fisher_full),
        "gram_kernel": _core.gram_kernel_name(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **(meta or {}),
    }
    return out


def stats_key(model, windows: np.ndarray, *, gram: bool = True, fisher: bool = True,
              calib: dict | None = None, fisher_full: bool = True) -> str:
    """The cache key: sha256 over the model fingerprint, the exact window ids, what is collected,
    the calibration settings and the statistics format."""
    if model.modified_weights():
        raise InvalidArgumentError("the model has weights replaced by set_weight(); statistics "
                                   "of a modified model are not cached (call collect_stats)")
    windows = np.ascontiguousarray(windows)
    blob = json.dumps({
        "format_version": FORMAT_VERSION,
        "model": model.fingerprint(),
        "windows": hashlib.sha256(windows.astype("<i8").tobytes()).hexdigest(),
        "shape": list(windows.shape), "gram": bool(gram), "fisher": bool(fisher),
        "calib": calib or {}, **({} if fisher_full else {"fisher_full": False}),
    }, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def load_or_collect(cache_dir, model, windows: np.ndarray, *, gram: bool = True,
                    fisher: bool = True, calib: dict | None = None, progress: bool = True,
                    n_threads: int | None = None, fisher_full: bool = True,
                    collect=None) -> CalibStats:
    """Statistics from ``cache_dir`` when a file with the same key exists (same model files and
    config, same windows, same settings), else :func:`collect_stats` and save them there.
    ``calib``: calibration settings to record and key on (file hash, n, seqlen, seed, ...).
    ``collect``: the collector, with :func:`collect_stats`'s signature (default that; the torch
    backend passes :func:`hiquant.torch_pipeline.collect_fisher`)."""
    windows = _check_windows(model, windows)
    key = stats_key(model, windows, gram=gram, fisher=fisher, calib=calib, fisher_full=fisher_full)
    path = Path(cache_dir) / f"calib-stats-{key[:32]}.safetensors"
    if path.exists():
        try:
            st = CalibStats.load(path)
            if st.meta.get("cache_key") == key:
                return st
        except HiquantError:
            pass  # unreadable or stale: collect again and overwrite it
    st = (collect or collect_stats)(model, windows, gram=gram, fisher=fisher, progress=progress,
                                    n_threads=n_threads,
                                    meta={"cache_key": key, "calib": calib or {}},
                                    fisher_full=fisher_full)
    st.save(path)
    return st


# ---------------------------------------------------------------------------------- per block


@dataclass(frozen=True)
class LayerStats:
    """What a layer quantizer receives about its calibration inputs: ``gram`` ``G = Σ x xᵀ``
    (float64 ``(d_in, d_in)``, shared by the layers of one input group), ``n_tokens``, the
    number of input rows summed into it, and per input channel ``abs_sum`` ``Σ |x_j|`` and
    ``abs_max`` ``max |x_j|`` (float64 ``(d_in,)``; AWQ's and SmoothQuant's activation
    statistics, which G does not hold; None when not collected)."""

    gram: np.ndarray
    n_tokens: int
    abs_sum: np.ndarray | None = None
    abs_max: np.ndarray | None = None

    @property
    def abs_mean(self) -> np.ndarray:
        """Mean absolute input per channel, ``abs_sum / n_tokens`` (AWQ's activation scale)."""
        if self.abs_sum is None:
            raise InvalidArgumentError("these statistics hold no per-channel activation sums; "
                                       "collect them with hiquant.stats.block_grams")
        return self.abs_sum / self.n_tokens


def block_grams(model, b: int, h: np.ndarray, *, batch_size: int,
                n_threads: int | None = None) -> dict:
    """Gram matrices of block ``b``'s linear inputs over the hidden states ``h`` entering it
    (``(n, seqlen, hidden)``), with the block's current weights: ``{linear name: LayerStats}``,
    with each channel's ``Σ|x|`` and ``max|x|`` from the same pass.

    Batches of ``batch_size`` windows run on the worker pool, each into its own partial sums; the
    partials are added in batch order, so the result does not depend on the thread count. Layers
    that share an input (``model.input_groups(b)``) share one matrix."""
    from ._threads import map_ordered
    groups = model.input_groups(b)
    firsts = {g[0]: g for g in groups}

    def run(sl):
        part = {}

        def capture(name, X):
            if name in firsts:
                G = np.zeros((X.shape[1], X.shape[1]), np.float64)
                gram_accumulate(G, np.ascontiguousarray(X, np.float32))
                A = np.abs(X)
                part[name] = (G, X.shape[0], np.add.reduce(A, axis=0, dtype=np.float64),
                              A.max(axis=0).astype(np.float64))

        model.block_forward(b, h[sl], capture=capture)
        return part

    slices = [slice(a, min(len(h), a + batch_size)) for a in range(0, len(h), batch_size)]
    total: dict = {}
    for part in map_ordered(run, slices, n_threads):
        for name, (G, n, asum, amax) in part.items():
            if name in total:
                t = total[name]
                t[0][...] += G
                t[1] += n
                t[2] += asum
                np.maximum(t[3], amax, out=t[3])
            else:
                total[name] = [G, n, asum, amax]
    out = {}
    for g in groups:
        G, n, asum, amax = total[g[0]]
        st = LayerStats(G, int(n), asum, amax)
        out.update({name: st for name in g})
    return out
