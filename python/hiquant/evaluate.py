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

from .calib import leading_windows, load_text, tokenize_text
from .errors import InvalidArgumentError

__all__ = ["perplexity", "perplexity_of_text"]


def perplexity(model, ids: np.ndarray, seqlen: int = 512, windows: int | None = 200, *,
               batch_size: int | None = None, progress: bool = True) -> dict:
    """Perplexity of ``model`` on the token ids ``ids`` (1-D) with the reference protocol.

    ``windows=None`` uses every full window. Returns ``{"ppl", "mean_loss", "seqlen", "windows",
    "n_tokens", "seconds", "tokens_per_s", "window_losses"}`` (``window_losses`` is a float64
    array of the per-window mean losses).
    """
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise InvalidArgumentError(f"ids must be a 1-D integer array of token ids, got "
                                   f"{ids.dtype} with shape {ids.shape}")
    win = leading_windows(ids, seqlen, windows)
    n = win.shape[0]
    bs = batch_size or model._auto_batch(seqlen)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n, desc="perplexity", unit="window", leave=False)
    losses = np.empty(n, dtype=np.float64)
    t0 = time.perf_counter()
    try:
        for b0 in range(0, n, bs):
            losses[b0:b0 + bs] = model.sequence_losses(win[b0:b0 + bs], batch_size=bs)
            if bar is not None:
                bar.update(min(bs, n - b0))
                bar.set_postfix(ppl=f"{math.exp(losses[:b0 + bs].mean()):.4f}")
    finally:
        if bar is not None:
            bar.close()
    dt = time.perf_counter() - t0
    mean = float(losses.mean())
    return {"ppl": math.exp(mean), "mean_loss": mean, "seqlen": int(seqlen), "windows": int(n),
            "n_tokens": int(n * seqlen), "seconds": dt, "tokens_per_s": n * seqlen / dt,
            "window_losses": losses}


def perplexity_of_text(model, path, seqlen: int = 512, windows: int | None = 200, *,
                       format: str = "auto", batch_size: int | None = None,
                       progress: bool = True) -> dict:
    """Read and tokenize ``path`` with the model's tokenizer, then :func:`perplexity`."""
    ids = tokenize_text(model.tokenizer, load_text(path, format=format))
    out = perplexity(model, ids, seqlen, windows, batch_size=batch_size, progress=progress)
    out["text_tokens"] = int(len(ids))
    return out
