"""End-to-end table: every method of the registry on one checkpoint, each run as a user runs it
(`hiquant quantize ... --eval-text ... --out ...` in its own process), with its perplexity, exact
average bits, wall time and peak resident memory.

    python bench/pipeline.py [--quick] [--model DIR] [--calib FILE] [--test FILE]
                             [--configs w2g64,w3g128] [--methods rtn,gptq,...] [--threads N]
                             [--budget-w2 2.30] [--budget-w3 3.30] [--extra-hybrid "--scale-bits 8"]

Defaults: ``../shared/bench/llama-bench`` with 128 x 512 calibration windows from ``calib.txt``
(random.seed(0) starts, the reference runs' protocol) and the shared perplexity protocol on
``test.txt`` (200 x 512). rtn, gptq, lwc and adaround run at their own bits (W{b} g{g}: codes
plus float16 scales and b-bit zeros); fixed-ratio, fp16-retention and hiq share one budget per
config (their default storage: 6-bit scale codes, ``--scale-bits auto``). Runs share a statistics
cache (``--cache``) except the first hybrid run, which is timed from a cold cache as the
end-to-end figure. ``--quick`` (CI): the embedded model, two methods,
few windows. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from _common import emit, environment  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ASSETS = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "bench"))
# hiq first: its cold-cache run is the end-to-end figure
METHODS = ("rtn", "gptq", "lwc", "hiq", "fixed-ratio", "fp16-retention")
HYBRID = ("fixed-ratio", "fp16-retention", "hiq")
REFERENCE = {  # the peers' own code on llama-bench (../shared/bench/README.md)
    "w2g64": {"rtn": 20.08, "gptq": 16.30, "lwc (OmniQuant, block-wise)": 10.26},
    "w3g128": {"rtn": 8.33, "gptq": 7.87},
}


def run_one(args, method: str, wbits: int, group: int, budget: float | None, out_dir: str,
            cache: str | None, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "hiquant", "quantize", args.model, "--calib", args.calib,
           "--method", method, "--wbits", str(wbits), "--group", str(group),
           "--eval-text", args.test, "--out", out_dir, "--quiet"]
    if budget is not None and method in HYBRID:
        cmd += ["--avg-bits", str(budget)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if cache:
        cmd += ["--cache-dir", cache]
    cmd += extra
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    # the child's own peak RSS (ru_maxrss of RUSAGE_CHILDREN would be the max over all runs)
    peak_mib = None
    try:
        with open(os.path.join(out_dir, "report.json")) as f:
            rep = json.load(f)
    except OSError:
        rep = None
    if proc.returncode != 0:
        return {"method": method, "error": err.strip().splitlines()[-1:] or ["failed"],
                "wall_s": wall}
    last = json.loads(out.strip().splitlines()[-1])
    peak_mib = last.get("peak_rss_mib")
    row = {"method": method, "ppl": last.get("ppl"), "avg_bits": last.get("avg_bits"),
           "wall_s": round(wall, 1), "peak_rss_mib": peak_mib,
           "timings": {k: round(v, 1) for k, v in (rep or {}).get("timings", {}).items()}}
    if rep and rep.get("layers"):
        ratios = [L["ratio"] for L in rep["layers"]]
        row["ratio_min_mean_max"] = [min(ratios), sum(ratios) / len(ratios), max(ratios)]
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default=os.path.join(ASSETS, "llama-bench"))
    ap.add_argument("--calib", default=os.path.join(ASSETS, "corpus", "calib.txt"))
    ap.add_argument("--test", default=os.path.join(ASSETS, "corpus", "test.txt"))
    ap.add_argument("--configs", default="w2g64,w3g128")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--budget-w2", type=float, default=2.30)
    ap.add_argument("--budget-w3", type=float, default=3.30)
    ap.add_argument("--extra", default="", help="extra `hiquant quantize` arguments for every run")
    ap.add_argument("--extra-hybrid", default="", help="extra arguments for the hybrid methods")
    ap.add_argument("--keep", default=None, help="keep the outputs under this folder")
    ap.add_argument("--json-out", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    extra_q = []
    if args.quick:
        from hiquant.datasets import embedded_calib_path, embedded_model_path, embedded_test_path
        args.model, args.calib, args.test = (str(embedded_model_path()), str(embedded_calib_path()),
                                             str(embedded_test_path()))
        args.methods, args.configs = "rtn,hiq", "w2g64"
        args.budget_w2 = None  # hiq: the default budget below
        extra_q = ["--n-calib", "8", "--seqlen", "128", "--lwc-iters", "20",
                   "--adaround-iters", "20", "--eval-windows", "8", "--eval-seqlen", "128"]
    if not os.path.isdir(args.model):
        print(f"bench/pipeline.py: {args.model} is absent; skipping")
        emit({"benchmark": "pipeline", "skipped": f"{args.model} absent"})
        return
    work = args.keep or tempfile.mkdtemp(prefix="hiquant-pipeline-")
    cache = os.path.join(work, "stats-cache")
    rows = {}
    first_hybrid = True
    for cfg in [c.strip() for c in args.configs.split(",") if c.strip()]:
        wbits, group = int(cfg[1]), int(cfg.split("g")[1])
        budget = args.budget_w2 if wbits == 2 else args.budget_w3
        if budget is None:
            budget = 2.45
        rows[cfg] = []
        for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
            out_dir = os.path.join(work, f"{cfg}-{method}")
            if os.path.exists(out_dir):
                shutil.rmtree(out_dir)
            hybrid = method in HYBRID
            extra = extra_q + args.extra.split() + (args.extra_hybrid.split() if hybrid else [])
            # the first hybrid run starts from a cold statistics cache: the end-to-end time
            row = run_one(args, method, wbits, group, budget, out_dir,
                          None if (hybrid and first_hybrid) else cache, extra)
            if hybrid and first_hybrid:
                row["cold_cache"] = True
                first_hybrid = False
            rows[cfg].append(row)
            print(f"{cfg:7s} {method:15s} ppl {row.get('ppl')}  bits {row.get('avg_bits')}  "
                  f"{row.get('wall_s')} s  peak {row.get('peak_rss_mib')} MiB  "
                  f"{row.get('error', '')}", flush=True)
            if not args.keep:
                shutil.rmtree(out_dir, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print()
    for cfg, rs in rows.items():
        print(f"### {cfg} (reference: {REFERENCE.get(cfg)})")
        print("| method | ppl | avg bits | wall s | peak MiB |\n|---|---|---|---|---|")
        for r in rs:
            ppl = f"{r['ppl']:.3f}" if r.get("ppl") else r.get("error")
            bits = f"{r['avg_bits']:.4f}" if r.get("avg_bits") else "–"
            print(f"| {r['method']} | {ppl} | {bits} | {r.get('wall_s')} | {r.get('peak_rss_mib')} |")
        print()
    result = {"benchmark": "pipeline", "quick": args.quick, "model": args.model,
              "results": rows, "reference": REFERENCE, **environment()}
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)
    emit(result)


if __name__ == "__main__":
    main()
