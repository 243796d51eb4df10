"""Greedy text generation with the NumPy runtime's KV cache: :func:`generate`, and the
``hiquant generate MODEL_OR_PACKED --prompt TEXT --max-new-tokens N`` command (:func:`cmd_generate`),
for Hugging Face folders and packed exports (:func:`hiquant.load_packed`: every decode step
multiplies straight from the packed bytes, one GEMV per linear layer).

The prompt runs once through :meth:`hiquant.model.Model.forward_cached` (prefill); each new token
is the argmax of the last logits, and one more ``forward_cached`` call with that single token
extends the cache (decode). The command streams the text to stdout as tokens are produced and
ends with one JSON line: prompt and generated token counts, prefill and decode tokens/s, and the
process's peak resident memory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import sys
import time
from typing import Callable

import numpy as np

from .errors import InvalidArgumentError

__all__ = ["GenerateResult", "generate", "cmd_generate", "add_generate_command"]


@dataclasses.dataclass
class GenerateResult:
    """``tokens``: the generated ids (prompt excluded); ``prefill_seconds`` for the prompt,
    ``decode_seconds`` for the remaining tokens (one ``forward_cached`` call each)."""

    prompt_tokens: int
    tokens: list
    prefill_seconds: float
    decode_seconds: float
    kv_cache_bytes: int

    @property
    def decode_tokens_per_s(self) -> float:
        n = len(self.tokens) - 1  # the first new token comes from the prefill's logits
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else float("nan")

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else float("nan")


def generate(model, prompt_ids, max_new_tokens: int, *,
             on_token: Callable[[int], None] | None = None) -> GenerateResult:
    """Greedy decoding of ``max_new_tokens`` tokens after ``prompt_ids`` (a 1-D sequence of
    token ids, at least one) with the model's KV cache (:meth:`~hiquant.model.Model.new_kv_cache`,
    :meth:`~hiquant.model.Model.forward_cached`). ``on_token(id)`` is called as each token is
    chosen (streaming)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
            or max_new_tokens < 1:
        raise InvalidArgumentError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    ids = np.asarray(prompt_ids)
    if ids.ndim != 1 or ids.size < 1:
        raise InvalidArgumentError(f"prompt_ids must be a non-empty 1-D sequence of token ids, "
                                   f"got shape {ids.shape}; is the prompt empty?")
    ids = model.check_ids(ids.astype(np.int64)[None], "prompt_ids")
    kv = model.new_kv_cache(1, ids.shape[1] + int(max_new_tokens))
    out = []
    t0 = time.perf_counter()
    logits = model.forward_cached(ids, kv)[0, -1]
    t1 = time.perf_counter()
    while True:
        tok = int(np.argmax(logits))
        out.append(tok)
        if on_token is not None:
            on_token(tok)
        if len(out) == max_new_tokens:
            break
        logits = model.forward_cached(np.array([[tok]], np.int64), kv)[0, -1]
    t2 = time.perf_counter()
    return GenerateResult(int(ids.shape[1]), out, t1 - t0, t2 - t1, kv.nbytes)


def cmd_generate(args) -> int:
    """Greedy generation with a KV cache (Hugging Face folder or packed export): the text streams
    to stdout, the last stdout line is a JSON summary (tokens/s, peak RSS)."""
    from . import _threads
    from .errors import CheckpointError, InvalidArgumentError
    from .packed import is_packed_folder, load_packed, open_checkpoint

    if args.threads is not None:
        _threads.set_num_threads(args.threads)
    # NumPy's BLAS (the dense products) on as many threads as the packed kernels get
    _threads.set_blas_threads(_threads.get_num_threads())
    t0 = time.perf_counter()
    # native kernels for packed layers and float16 weights (a plain float16 folder decodes on
    # the FP16 kernel, reading its mapped file)
    if is_packed_folder(args.model):
        model = load_packed(args.model, packed_kernels=True, decode_tables=args.decode_tables)
    elif args.decode_tables != "float32":
        raise InvalidArgumentError(f"--decode-tables {args.decode_tables} applies to packed "
                                   f"exports; {args.model} is not one (no "
                                   "quantization_config.json)")
    else:
        model = open_checkpoint(args.model, packed_kernels=True)
    load_s = time.perf_counter() - t0
    tok = model.tokenizer
    if tok is None:
        raise CheckpointError(f"{args.model}: no tokenizer.json; generate needs the tokenizer")
    prompt = tok.encode(args.prompt, add_special_tokens=False).ids
    print(f"hiquant: {model}", file=sys.stderr)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    new: list = []
    shown = [""]

    def stream(t: int) -> None:
        new.append(t)
        text = tok.decode(new)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(shown[0]):])
            sys.stdout.flush()
            shown[0] = text

    res = generate(model, prompt, args.max_new_tokens, on_token=stream)
    sys.stdout.write(tok.decode(new)[len(shown[0]):] + "\n")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB
    summary = {"command": "generate", "model": os.path.abspath(args.model),
               "packed_kernels": bool(getattr(model, "packed_kernels", False)),
               "decode_tables": args.decode_tables,
               "prompt_tokens": res.prompt_tokens, "new_tokens": len(res.tokens),
               "prefill_seconds": res.prefill_seconds, "decode_seconds": res.decode_seconds,
               "prefill_tokens_per_s": res.prefill_tokens_per_s,
               "decode_tokens_per_s": res.decode_tokens_per_s,
               "kv_cache_bytes": res.kv_cache_bytes, "load_seconds": load_s,
               "peak_rss_mib": peak, "threads": _threads.get_num_threads()}
    print(f"hiquant: {len(res.tokens)} tokens, decode {res.decode_tokens_per_s:.1f} tokens/s, "
          f"peak RSS {peak:.0f} MiB", file=sys.stderr)
    sys.stdout.write(json.dumps(summary, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()
    return 0


def add_generate_command(sub) -> None:
    """Register ``hiquant generate`` on the CLI's subparsers."""
    p = sub.add_parser("generate", help="greedy generation with a KV cache (also DIR/packed)",
                       description=cmd_generate.__doc__)
    p.add_argument("model", metavar="MODEL_DIR", help="Hugging Face folder or packed export")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=None,
                   help="threads for hiquant (default: OMP_NUM_THREADS or the cores available)")
    from .packed_matmul import TABLES
    p.add_argument("--decode-tables", dest="decode_tables", choices=TABLES, default="float32",
                   help="tables of the packed decode kernel: float32 (exact, the default) or "
                        "int8 (T-MAC's route: 2-3x faster decode of 2-4-bit layers at the error "
                        "of 8-bit activations; packed exports only)")
    p.set_defaults(func=cmd_generate)


if __name__ == "__main__":  # python -m hiquant.generate MODEL --prompt ... (same as hiquant generate)
    import argparse

    _parser = argparse.ArgumentParser(prog="hiquant")
    add_generate_command(_parser.add_subparsers(dest="command", required=True))
    _args = _parser.parse_args(["generate", *sys.argv[1:]])
    sys.exit(_args.func(_args))
