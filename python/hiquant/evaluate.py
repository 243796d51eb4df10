"""Perplexity with the reference protocol (``/work/shared/bench/README.md``).

1. ``ids`` = the whole evaluation text tokenized at once (no BOS, no special tokens);
2. the first ``windows × seqlen`` ids split into ``windows`` non-overlapping windows;
3. per window, the mean next-token cross-entropy over its ``seqlen - 1`` predicted positions;
   perplexity = ``exp(mean over windows)``.
"""

from __future__ import annotations

import math
import time

import numpy as np

from ._threads import resolve_workers
from .calib import leading_windows, load_text, tokenize_text
from .errors import InvalidArgumentError, NumericalError

__all__ = ["perplexity", "perplexity_of_text"]


def perplexity(model, ids: np.ndarray, seqlen: int = 512, windows: int | None = 200, *,
               batch_size: int | None = None, n_threads: int | None = None,
               progress: bool = True) -> dict:
    """Perplexity of ``model`` on the token ids ``ids`` (1-D) with the reference protocol.

    ``model``: any :class:`hiquant.runtime.ModelRuntime`. ``windows=None`` uses every full
    window. Windows run in chunks of ``batch_size`` (default ``model.auto_batch(seqlen)``) on
    ``n_threads`` workers (see ``ModelRuntime.sequence_losses``); the result does not depend on
    ``n_threads``. Returns ``{"ppl", "mean_loss", "seqlen", "windows", "n_tokens",
    "batch_size", "n_threads", "seconds", "tokens_per_s", "window_losses"}`` (``window_losses``:
    float64 array of the per-window mean losses).
    """
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise InvalidArgumentError(f"ids must be a 1-D integer array of token ids, got "
                                   f"{ids.dtype} with shape {ids.shape}")
    win = leading_windows(ids, seqlen, windows)
    n = win.shape[0]
    bs = batch_size or model.auto_batch(seqlen)
    nt = resolve_workers(n_threads)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n, desc="perplexity", unit="window", leave=False)
    t0 = time.perf_counter()
    try:
        losses = model.sequence_losses(win, batch_size=bs, n_threads=nt,
                                       progress=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    dt = time.perf_counter() - t0
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size:
        raise NumericalError(f"the loss of window {int(bad[0])} is {losses[bad[0]]} "
                             f"({bad.size} of {n} windows are not finite): "
                             f"{_nonfinite_weight(model)}")
    mean = float(losses.mean())
    return {"ppl": math.exp(mean), "mean_loss": mean, "seqlen": int(seqlen), "windows": int(n),
            "n_tokens": int(n * seqlen), "batch_size": int(bs), "n_threads": nt, "seconds": dt,
            "tokens_per_s": n * seqlen / dt, "window_losses": losses}


def _nonfinite_weight(model) -> str:
    """Names the first stored tensor of ``model`` holding NaN/Inf, or says that none does."""
    from .checkpoint import first_nonfinite
    name = first_nonfinite(model.source_tensors())
    if name is not None:
        return f"tensor {name!r} holds NaN or Inf; the checkpoint is corrupt — re-export it"
    return ("every stored weight is finite, so the activations overflow; evaluate in float32 "
            "(compute_dtype) or check the quantized layers")


def perplexity_of_text(model, path, seqlen: int = 512, windows: int | None = 200, *,
                       format: str = "auto", batch_size: int | None = None,
                       n_threads: int | None = None, progress: bool = True) -> dict:
    """Read and tokenize ``path`` with the model's tokenizer, then :func:`perplexity`."""
    ids = tokenize_text(model.tokenizer, load_text(path, format=format),
                        max_tokens=None if windows is None else windows * seqlen)
    out = perplexity(model, ids, seqlen, windows, batch_size=batch_size, n_threads=n_threads,
                     progress=progress)
    out["text_tokens"] = int(len(ids))
    return out
