"""Decoding speed and memory: greedy generation with the KV cache (`hiquant.generate.generate`)
from a float16 Hugging Face folder against hiquant's packed exports run on the packed kernels.

Models (each written to a temporary folder; weights quantized with round-to-nearest, since
speed and memory do not depend on how the codes were chosen):

* ``llama-bench`` (when ../shared/bench is present): the float16 checkpoint, and packed exports
  at W3 g128 (float16 scales) and W2 g64 + 10% of the columns at 3 bits (6-bit double-quantized
  scales: the hybrid methods' default format at about 2.3 bits);
* ``7b-shaped``: ``--layers`` decoder layers of LLaMA-2-7B's shapes with random float16 weights
  (bench/scale.py's checkpoint; ``--quick``: its small shape), the same formats.

Each (model, format) generates ``--new-tokens`` tokens after 8 prompt ids in its own process (so
that its peak resident memory is its own), ``--rounds`` rounds interleaved over the formats, one
thread by default. The float16 folder runs twice: "fp16 (dense)" with a weight cache large
enough to hold every expanded float32 weight (NumPy's BLAS), "fp16 (kernel)" on hiquant's FP16
kernel reading the mapped float16 values (``packed_kernels=True``, as ``hiquant generate`` runs
it); "vs fp16" is against the faster of the two. The packed exports hold only packed operators.
The 2-bit format also runs with the packed decode kernel's int8 tables (``decode_tables="int8"``,
opt-in; row "... int8"). Tokens/s counts the decode steps (the first new token comes from the
prefill). Ends with one JSON line.

    python bench/generate.py [--quick] [--layers 2] [--new-tokens 16] [--rounds 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import emit, environment, peak_rss_mib  # noqa: E402

# name: (b_low, group, high fraction, b_high, scale_bits)
FORMATS = {
    "W3g128": (3, 128, 0.0, 0, 16),
    "W2g64+10%@3": (2, 64, 0.10, 3, 6),
}


def export_formats(src: Path, out: Path) -> dict:
    """Packed exports of the checkpoint at `src`, one folder per format under `out`."""
    from hiquant.export import write_packed
    from hiquant.model import load_model
    from hiquant.storage import QuantizedLayer

    m = load_model(src, load_tokenizer=False)
    folders = {}
    for name, (bl, g, frac, bh, sb) in FORMATS.items():
        q = {}
        for n in m.linear_names():
            W = m.get_weight(n)
            k = int(round(frac * W.shape[1]))
            # the columns of largest norm stand in for the Fisher's choice
            hi = np.sort(np.argsort(-np.linalg.norm(W, axis=0))[:k]) if k else ()
            q[n] = QuantizedLayer.rtn(n, W, bl, g, hi, bh, sb)
        folders[name] = out / name
        write_packed(folders[name], m, q, {"method": "rtn"})
    return folders


def worker(folder: str, new_tokens: int, threads: int, cache_bytes: int, mode: str) -> dict:
    """mode "dense": dense float32 products; "kernels": the packed kernels; "int8": the packed
    kernels with int8 decode tables (a packed export)."""
    from hiquant import _threads
    from hiquant.generate import generate
    from hiquant.packed import load_packed, open_checkpoint
    _threads.set_num_threads(threads)
    _threads.set_blas_threads(threads)
    if mode == "int8":
        m = load_packed(folder, weight_cache_bytes=cache_bytes, decode_tables="int8")
    else:
        m = open_checkpoint(folder, weight_cache_bytes=cache_bytes,
                            packed_kernels=mode == "kernels")
    generate(m, np.arange(1, 3), 2)  # warm-up: first-call costs (caches, page faults) out
    r = generate(m, np.arange(1, 9), new_tokens)
    return {"decode_tokens_per_s": r.decode_tokens_per_s, "prefill_seconds": r.prefill_seconds,
            "kv_cache_bytes": r.kv_cache_bytes,
            "peak_rss_mib": peak_rss_mib()}


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, few tokens (CI)")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers of the 7B-shaped model")
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--assets", default=str(Path(__file__).resolve().parents[1].parent /
                                            "shared" / "bench"))
    ap.add_argument("--worker", nargs=4, metavar=("FOLDER", "TOKENS", "CACHE_BYTES", "MODE"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        folder, tokens, cache, mode = args.worker
        print(json.dumps(worker(folder, int(tokens), args.threads, int(cache), mode)))
        return
    from scale import SHAPE_7B, SHAPE_QUICK, write_checkpoint
    new_tokens = args.new_tokens or (4 if args.quick else 16)
    rows = []
    with tempfile.TemporaryDirectory(prefix="hq_generate_") as tmp:
        tmp = Path(tmp)
        models = {}
        bench = Path(args.assets) / "llama-bench"
        if (bench / "config.json").is_file() and not args.quick:
            models["llama-bench"] = bench
        shaped = "7b-shaped" if not args.quick else "small-shaped"
        write_checkpoint(tmp / shaped, SHAPE_QUICK if args.quick else SHAPE_7B, args.layers)
        models[shaped] = tmp / shaped
        runs = []
        for label, src in models.items():
            runs.append((label, "fp16 (dense)", src))
            runs.append((label, "fp16 (kernel)", src))
            for fmt, folder in export_formats(src, tmp / f"{label}-packed").items():
                runs.append((label, fmt, folder))
                if fmt.startswith("W2"):  # the int8 decode tables (opt-in) on the 2-bit format
                    runs.append((label, fmt + " int8", folder))
        results = {(lab, fmt): [] for lab, fmt, _ in runs}
        for _ in range(args.rounds):
            for lab, fmt, folder in runs:
                cache = 1 << 36 if fmt.startswith("fp16") else 1 << 30
                mode = ("dense" if fmt == "fp16 (dense)" else "int8" if fmt.endswith(" int8")
                        else "kernels")
                out = subprocess.run([sys.executable, __file__, "--worker", str(folder),
                                      str(new_tokens), str(cache), mode, "--threads",
                                      str(args.threads)],
                                     capture_output=True, text=True, check=True)
                results[(lab, fmt)].append(json.loads(out.stdout.strip().splitlines()[-1]))
        for lab, fmt, folder in runs:
            rs = results[(lab, fmt)]
            tps = [r["decode_tokens_per_s"] for r in rs]
            rows.append({"model": lab, "weights": fmt, "folder_bytes": folder_bytes(folder),
                         "decode_tokens_per_s_min": min(tps), "decode_tokens_per_s_max": max(tps),
                         "prefill_seconds_min": min(r["prefill_seconds"] for r in rs),
                         "peak_rss_mib": max(r["peak_rss_mib"] for r in rs)})
    print(f"{args.threads} thread(s), {new_tokens} new tokens after 8 prompt ids, "
          f"{args.rounds} rounds; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'model':<14}{'weights':<16}{'folder MB':>10}{'decode tok/s':>16}{'vs fp16':>9}"
          f"{'prefill s':>11}{'peak RSS MiB':>14}")
    dense = {}  # the faster of the two float16 runs
    for r in rows:
        if r["weights"].startswith("fp16"):
            dense[r["model"]] = max(dense.get(r["model"], 0.0), r["decode_tokens_per_s_max"])
    for r in rows:
        r["speedup_vs_fp16"] = r["decode_tokens_per_s_max"] / dense[r["model"]]
        print(f"{r['model']:<14}{r['weights']:<16}{r['folder_bytes'] / 1e6:>10.1f}"
              f"{r['decode_tokens_per_s_min']:>8.2f}-{r['decode_tokens_per_s_max']:<7.2f}"
              f"{r['speedup_vs_fp16']:>9.2f}{r['prefill_seconds_min']:>11.3f}"
              f"{r['peak_rss_mib']:>14.0f}")
    emit({"bench": "generate", "quick": args.quick, "threads": args.threads,
          "new_tokens": new_tokens, "layers": args.layers, "rows": rows, **environment()})


if __name__ == "__main__":
    main()
