"""What the packed decode kernel's int8 tables cost in quality, and what they gain in speed.

A packed export is loaded twice, with the table kernel's float32 tables (exact, the default) and
with its int8 tables (``load_packed(..., decode_tables="int8")``, T-MAC's route, opt-in). Both run
the same windows of a text token by token through the KV cache (``Model.forward_cached`` with one
token per call, the decode path: every packed product is a one-token product on the table
kernel), teacher-forced, and the perplexity of those next-token predictions is reported beside
the whole-window perplexity (``hiquant.evaluate.perplexity``, the prefill path). float32 decode
must equal the whole-window value within float32 rounding (a check of the decode path); the
int8 row's difference is the cost of the 8-bit tables. Decode tokens/s of both loads are timed in
the same run, interleaved window by window.

The text defaults to a validation split carved from the calibration text (the quantize
pipeline's "spread" windows), so this choice is not made on test.txt; ``--text`` may name
another file (then its leading windows, the evaluation protocol). Without PACKED_DIR, the
embedded model quantized with round-to-nearest at W2 g64 (into a temporary folder) and its own
calibration text; ``--quick``: that, on 2 windows of 64 tokens (CI).

    python bench/decode_tables.py [PACKED_DIR] [--windows 8] [--seqlen 256] [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import emit, environment  # noqa: E402


def decode_losses(model, window: np.ndarray) -> tuple[float, float]:
    """(mean next-token cross-entropy, seconds) of one window run token by token."""
    kv = model.new_kv_cache(1, len(window))
    total, t0 = 0.0, time.perf_counter()
    for i in range(len(window) - 1):
        logits = model.forward_cached(window[None, i:i + 1], kv)[0, -1].astype(np.float64)
        m = logits.max()
        total += (m + math.log(np.exp(logits - m).sum())) - logits[window[i + 1]]
    return total / (len(window) - 1), time.perf_counter() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("packed", nargs="?", default=None,
                    help="a packed export (hiquant quantize --export packed); default: the "
                         "embedded model at RTN W2 g64")
    ap.add_argument("--quick", action="store_true", help="2 windows of 64 tokens (CI)")
    ap.add_argument("--calib", default=str(Path(__file__).resolve().parents[1].parent / "shared"
                                           / "bench" / "corpus" / "calib.txt"),
                    help="calibration text whose validation split is decoded (default)")
    ap.add_argument("--text", default=None, help="decode this text's leading windows instead")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.quick:
        args.windows, args.seqlen = 2, 64
    with tempfile.TemporaryDirectory(prefix="hq_decode_tables_") as tmp:
        if args.packed is None:
            import hiquant
            from hiquant.datasets import embedded_calib_path, embedded_model_path
            args.calib = str(embedded_calib_path())
            hiquant.quantize(embedded_model_path(), args.calib, method="rtn", wbits=2,
                             group_size=64, n_calib=4, seqlen=64, out=Path(tmp) / "q",
                             progress=False, backend="numpy")
            args.packed = str(Path(tmp) / "q" / "packed")
        run(args)


def run(args) -> None:
    from hiquant import _threads
    from hiquant.calib import calibration_split, leading_windows, tokenize_text
    from hiquant.evaluate import perplexity
    from hiquant.packed import load_packed
    from hiquant.packed_matmul import TABLES
    _threads.set_num_threads(args.threads)
    _threads.set_blas_threads(args.threads)
    models = {t: load_packed(args.packed, decode_tables=t) for t in TABLES}
    tok = models["float32"].tokenizer
    if args.text is not None:
        ids = tokenize_text(tok, Path(args.text).read_text())
        win = leading_windows(ids, args.seqlen, args.windows)
        source = f"{args.text}: leading windows"
    else:
        # the pipeline's validation split (its one calibration window is not used)
        _, win, _ = calibration_split(tok, args.calib, 1, args.seqlen, val_windows=args.windows,
                                      val_seqlen=args.seqlen, val_split="spread")
        source = f"{args.calib}: validation split (spread)"
    whole = perplexity(models["float32"], win.reshape(-1), args.seqlen, len(win),
                       progress=False)["ppl"]
    losses = {t: [] for t in models}
    seconds = {t: 0.0 for t in models}
    for w in win:  # interleaved, so that both loads see the same machine state
        for t, m in models.items():
            loss, s = decode_losses(m, w)
            losses[t].append(loss)
            seconds[t] += s
    n_steps = len(win) * (args.seqlen - 1)
    rows = []
    print(f"{source}, {len(win)} windows of {args.seqlen} tokens, {args.threads} thread(s)")
    print(f"{'path':<26}{'perplexity':>12}{'vs whole':>11}{'decode tok/s':>14}")
    print(f"{'whole windows (prefill)':<26}{whole:>12.4f}{'':>11}{'':>14}")
    for t in models:
        ppl = math.exp(float(np.mean(losses[t])))
        row = {"tables": t, "ppl": ppl, "rel_vs_whole": ppl / whole - 1,
               "decode_tokens_per_s": n_steps / seconds[t]}
        rows.append(row)
        print(f"{'decode, ' + t + ' tables':<26}{ppl:>12.4f}{row['rel_vs_whole']:>+11.2e}"
              f"{row['decode_tokens_per_s']:>14.1f}")
    emit({"bench": "decode_tables", "packed": os.path.abspath(args.packed), "source": source,
          "windows": len(win), "seqlen": args.seqlen, "whole_ppl": whole, "rows": rows,
          **environment()})


if __name__ == "__main__":
    main()
