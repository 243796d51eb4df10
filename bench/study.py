"""The Qwen3 quantization study's grid on any model folder (issue 20).

*An Empirical Study of Qwen3 Quantization* (Zheng et al., 2025) runs the classic PTQ methods on
one model at 1–8 bits. This script runs the same grid through hiquant's one pipeline, with every
point's exact average bits (:func:`hiquant.storage.storage_bits`) and the shared perplexity
protocol, and writes a table and a plot of perplexity against average bits:

* weight-only ``rtn``, ``gptq``, ``awq`` at W8/W4/W3/W2, per output channel (``--group 0``)
  and with groups of 128;
* ``smoothquant`` with per-token activation quantization: W8A8, W4A8, W4A4 (weights per
  channel, as the study);
* ``billm`` (wbits 1, blocks of 128 columns; the exact count of what it stores is about 2.5
  bits, not the paper's ~1.1, which leaves out the membership bitmap and the α's);
* hiq's points: W2 g64 at 2.3 bits and W3 g128 at 3.3 bits (``--no-hiq`` skips them: they are
  the long runs).

Each finished run is written to ``OUT/runs/<name>.json`` (atomically) and skipped when the
script runs again, so a long grid can be stopped and continued, and rows added later. The
calibration and evaluation settings are hiquant's defaults (128 × 512-token calibration windows;
200 × 512-token evaluation windows) unless ``--quick``: the study calibrates on 128 × 2048 tokens,
which llama-bench's 512-token context does not allow.

    python bench/study.py --model ../shared/bench/llama-bench \
        --calib ../shared/bench/corpus/calib.txt --text ../shared/bench/corpus/test.txt \
        --out study-llama-bench
    python bench/study.py --quick        # the embedded model, a few windows, a small grid (CI)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import environment  # noqa: E402

WEIGHT_BITS = (8, 4, 3, 2)
GROUPS = (0, 128)


def grid(methods, hiq: bool, quick: bool) -> list[dict]:
    """The runs, in the order they are run (cheap first): dicts of quantize() overrides plus a
    name and a plot series."""
    from hiquant.methods import METHODS
    wbits = (4, 2) if quick else WEIGHT_BITS
    groups = (0, 32) if quick else GROUPS
    runs = []
    for m in methods:
        if m in ("rtn", "gptq", "awq"):
            for g in groups:
                for b in wbits:
                    if quick and m == "awq" and (b, g) != (2, 32):
                        continue  # awq's grid search is the slow one; one point keeps it tested
                    series = f"{m} g{g}" if g else f"{m} per-channel"
                    runs.append(dict(name=f"{m}-w{b}-g{g}", series=series, method=m, wbits=b,
                                     group_size=g))
        elif m == "smoothquant":
            for b, a in ((8, 8), (4, 8), (4, 4)):
                runs.append(dict(name=f"smoothquant-w{b}a{a}", series=f"smoothquant A{a}",
                                 method=m, wbits=b, group_size=0, abits=a))
        elif m == "billm":
            if "billm" not in METHODS:
                print("billm is not registered in this hiquant: its row is skipped")
                continue
            g = 32 if quick else 128  # BiLLM's block of columns (the paper's 128)
            runs.append(dict(name=f"billm-w1-g{g}", series="billm", method="billm", wbits=1,
                             group_size=g))
        else:
            raise SystemExit(f"unknown study method {m!r}")
    if hiq:
        # the README's two configurations; the embedded model's layers are too narrow for g64/g128
        for b, g, avg in (((2, 32, 2.6), (3, 32, 3.6)) if quick else ((2, 64, 2.3), (3, 128, 3.3))):
            runs.append(dict(name=f"hiq-w{b}-g{g}-{avg}", series="hiq", method="hiq", wbits=b,
                             group_size=g, avg_bits=avg))
    return runs


def run_one(run: dict, model_dir, calib, text, common: dict, runs_dir: Path) -> dict:
    import hiquant
    from hiquant._atomic import atomic_write_text
    path = runs_dir / f"{run['name']}.json"
    if path.exists():
        rec = json.loads(path.read_text())
        rec["cached"] = True
        return rec
    kw = {k: v for k, v in run.items() if k not in ("name", "series")}
    t0 = time.perf_counter()
    rep = hiquant.quantize(model_dir, calib, eval_text=text, progress=False, **common, **kw)
    rec = dict(name=run["name"], series=run["series"], method=run["method"], wbits=run["wbits"],
               group_size=rep.settings["group_size"], abits=rep.settings.get("abits"),
               avg_bits=rep.avg_bits, ppl=rep.ppl, seconds=time.perf_counter() - t0,
               settings=rep.settings, timings=rep.timings, environment=environment())
    atomic_write_text(path, json.dumps(rec, indent=1, sort_keys=True, default=str))
    rec["cached"] = False
    return rec


def table(rows, fp_ppl) -> str:
    lines = [f"FP16 perplexity {fp_ppl:.3f}" if fp_ppl else "", "",
             "| method | W | A | group | avg bits | ppl | wall s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        g = r["group_size"]
        lines.append(f"| {r['method']} | {r['wbits']} | {r['abits'] or 16} | "
                     f"{g if g else 'channel'} | {r['avg_bits']:.4f} | {r['ppl']:.3f} | "
                     f"{r['seconds']:.0f}{' (earlier run)' if r.get('cached') else ''} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--calib")
    ap.add_argument("--text", help="evaluation text (the final table's text)")
    ap.add_argument("--out", help="results folder (runs/, study.md, study.png); --quick: a temporary one")
    ap.add_argument("--methods", default="rtn,gptq,smoothquant,billm,awq")
    ap.add_argument("--no-hiq", dest="hiq", action="store_false", help="skip hiq's two points")
    ap.add_argument("--only", help="comma-separated run names (e.g. gptq-w3-g128) to run now")
    ap.add_argument("--quick", action="store_true", help="embedded model, few windows, small grid")
    args = ap.parse_args()

    import hiquant
    from hiquant.datasets import embedded_calib_path, embedded_model_path, embedded_test_path
    from hiquant.evaluate import perplexity_of_text
    from hiquant.model import load_model
    if args.quick:
        model_dir, calib, text = embedded_model_path(), embedded_calib_path(), embedded_test_path()
        common = dict(n_calib=8, seqlen=128, eval_seqlen=128, eval_windows=8, lwc_iters=20,
                      adaround_iters=20, block_epochs=1, m_windows=4)
        tmp = tempfile.TemporaryDirectory()
        out = Path(args.out) if args.out else Path(tmp.name)
    else:
        if not (args.model and args.calib and args.text and args.out):
            ap.error("--model, --calib, --text and --out are required (or --quick)")
        model_dir, calib, text, out = Path(args.model), Path(args.calib), Path(args.text), Path(args.out)
        common = {}
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    runs = grid([m.strip() for m in args.methods.split(",") if m.strip()], args.hiq, args.quick)
    if args.only:
        want = set(args.only.split(","))
        unknown = want - {r["name"] for r in runs}
        if unknown:
            ap.error(f"--only: unknown run names {sorted(unknown)}; the grid has "
                     f"{', '.join(r['name'] for r in runs)}")

    s = hiquant.QuantizeSettings(**common)
    fp_path = runs_dir / "fp.json"
    if fp_path.exists():
        fp_ppl = json.loads(fp_path.read_text())["ppl"]
    else:
        fp_ppl = perplexity_of_text(load_model(model_dir), text, s.eval_seqlen, s.eval_windows,
                                    progress=False)["ppl"]
        from hiquant._atomic import atomic_write_text
        atomic_write_text(fp_path, json.dumps({"ppl": fp_ppl, "environment": environment()}))

    rows = []
    for run in runs:
        if args.only and run["name"] not in want and not (runs_dir / f"{run['name']}.json").exists():
            continue
        rec = run_one(run, model_dir, calib, text, common, runs_dir)
        rows.append(rec)
        print(f"{rec['name']}: {rec['avg_bits']:.4f} bits, ppl {rec['ppl']:.3f}, "
              f"{rec['seconds']:.0f} s{' (earlier run)' if rec['cached'] else ''}", flush=True)

    md = table(rows, fp_ppl)
    print(md)
    from hiquant._atomic import atomic_write_text
    atomic_write_text(out / "study.md", md)
    try:
        from hiquant.plots import plot_ppl_vs_bits
        plot_ppl_vs_bits([dict(method=r["series"], avg_bits=r["avg_bits"], ppl=r["ppl"]) for r in rows],
                         path=str(out / "study.png"), fp_ppl=fp_ppl)
        plot = str(out / "study.png")
    except ImportError:
        plot = None
    print(json.dumps({"bench": "study", "quick": args.quick, "model": str(model_dir), "fp_ppl": fp_ppl,
                      "plot": plot, "rows": [{k: r[k] for k in ("name", "avg_bits", "ppl", "seconds",
                                                                 "cached")} for r in rows],
                      **environment()}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
