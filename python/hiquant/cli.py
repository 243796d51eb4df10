"""Command line: ``hiquant <subcommand> ...``.

Each subcommand is one ``cmd_<name>(args) -> int`` function registered in :func:`build_parser`;
progress goes to stderr and the result ends stdout as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

__all__ = ["main", "build_parser"]


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _apply_threads(n: int | None) -> dict:
    """hiquant's thread count (native kernels and the runtime's worker threads, each running
    NumPy's BLAS single-threaded)."""
    from . import _threads

    if n is not None:
        _threads.set_num_threads(n)
    return {"threads": _threads.get_num_threads()}


def _emit(result: dict) -> None:
    sys.stdout.write(json.dumps(result, sort_keys=True) + "\n")
    sys.stdout.flush()


def cmd_eval(args) -> int:
    """Perplexity of a checkpoint on a text file (reference protocol)."""
    from .evaluate import perplexity
    from .calib import load_text, tokenize_text
    from .model import load_model

    from .export import open_checkpoint

    threads = _apply_threads(args.threads)
    t0 = time.perf_counter()
    model = open_checkpoint(args.model)  # packed folders too
    print(f"hiquant: {model}", file=sys.stderr)
    text = load_text(args.text, format=args.format)
    ids = tokenize_text(model.tokenizer, text)
    print(f"hiquant: {args.text}: {len(ids)} tokens; {args.windows} windows of {args.seqlen}",
          file=sys.stderr)
    res = perplexity(model, ids, args.seqlen, args.windows, batch_size=args.batch_size,
                     n_threads=args.threads, progress=not args.quiet)
    res.pop("window_losses")
    print(f"hiquant: perplexity {res['ppl']:.4f} ({res['tokens_per_s']:.0f} tokens/s)",
          file=sys.stderr)
    _emit({"command": "eval", "model": os.path.abspath(args.model),
           "text": os.path.abspath(args.text), "text_tokens": int(len(ids)), **res, **threads,
           "arch": model.config.arch, "source_dtype": model.config.source_dtype,
           "compute_dtype": model.compute_dtype.name,
           "total_seconds": time.perf_counter() - t0})
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hiquant", description="Post-training quantization of LLMs "
                                 "with layer-wise optimized high-impact parameter ratios.")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("eval", help="perplexity of a checkpoint on a text file",
                       description=cmd_eval.__doc__)
    p.add_argument("model", metavar="MODEL_DIR", help="Hugging Face checkpoint folder")
    p.add_argument("--text", required=True, help="evaluation text (plain, wiki.*.raw or .jsonl)")
    p.add_argument("--format", default="auto", choices=("auto", "text", "wikitext2", "jsonl"))
    p.add_argument("--seqlen", type=_positive_int, default=512)
    p.add_argument("--windows", type=_positive_int, default=200)
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="windows per forward pass (default: by memory)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="threads for hiquant (default: OMP_NUM_THREADS or the cores available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)

    from .cli_pipeline import add_pipeline_commands
    add_pipeline_commands(sub)
    return ap


def main(argv=None) -> int:
    from .errors import HiquantError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except HiquantError as e:
        print(f"hiquant {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hiquant {args.command}: interrupted", file=sys.stderr)
        return 130
