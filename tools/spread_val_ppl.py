"""Perplexity of finished runs on validation windows spread over their calibration text.

For runs made with the tail split (`--val-windows N --val-split tail`), whose reports give the
perplexity of the calibration text's last N windows only: `--windows` windows of `--seqlen`
tokens, evenly spaced over the text before the tail, each moved forward (97 tokens at a time) off
the run's own calibration windows (the reference draw over that text with the run's seed), are
evaluated on the run's packed export. This is how bench/RESULTS.md ("where the validation windows
lie", "hiq against the fixed ratio over three seeds") compares the two splits; runs made with
`--val-split spread` report such windows themselves. A model folder without a report is evaluated
with seed 0's windows. One JSON line per run.

    python tools/spread_val_ppl.py RUN_DIR... [--calib ../shared/bench/corpus/calib.txt]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from hiquant.calib import load_text, sample_starts, tokenize_text
from hiquant.evaluate import perplexity
from hiquant.packed import open_checkpoint


def spread_windows(ids, cut, seed, n_calib, seqlen, n, L):
    calib = sample_starts(cut, n_calib, seqlen, seed)  # the run's draw over ids[:cut]
    out = []
    for k in range(n):
        s = int(k * (cut - L) / n)
        while any(c < s + L and s < c + seqlen for c in calib):
            s += 97
        out.append(s)
    return np.concatenate([ids[s:s + L] for s in out]).astype(np.int64)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--calib", default=None, help="calibration text (default: the run's own)")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    args = ap.parse_args(argv)
    for d in map(Path, args.runs):
        rep = json.loads((d / "report.json").read_text()) if (d / "report.json").is_file() else None
        model = open_checkpoint(d / "packed" if rep else d)
        cal = (rep or {}).get("settings", {}).get("calibration") or {}
        path = args.calib or cal.get("file")
        ids = tokenize_text(model.tokenizer, load_text(path))
        held = cal.get("validation", {}).get("tokens", 0)
        seed, n_calib, seqlen = cal.get("seed", 0), cal.get("n", 128), cal.get("seqlen", 512)
        x = spread_windows(ids, len(ids) - held, seed, n_calib, seqlen, args.windows, args.seqlen)
        ppl = perplexity(model, x, args.seqlen, args.windows, progress=False)["ppl"]
        print(json.dumps({"run": str(d), "seed": seed, "spread_val_ppl": ppl,
                          "val_ppl": (rep or {}).get("val_ppl"), "ppl": (rep or {}).get("ppl")}),
              flush=True)


if __name__ == "__main__":
    main()
