"""Command line: ``hiquant <subcommand> ...`` (eval, quantize, inspect, demo).

Each subcommand is one ``cmd_<name>(args) -> int`` function registered in :func:`build_parser`;
progress goes to stderr and the result ends stdout as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import fields

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
    sys.stdout.write(json.dumps(result, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def cmd_eval(args) -> int:
    """Perplexity of a checkpoint on a text file (reference protocol)."""
    from .calib import load_text, tokenize_text
    from .evaluate import perplexity
    from .packed import open_checkpoint

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


DEMO_METHODS = ("rtn", "gptq", "lwc", "fixed-ratio", "fp16-retention", "hiq")



def _scale_bits(text: str):
    try:
        return text if text == "auto" else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, 16, 8 or 6, got {text!r}") from None

def _proc_status_mib(keys) -> dict:
    """Fields of /proc/self/status in MiB (Linux; empty elsewhere)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in keys and v.strip().endswith("kB"):
                    out[k] = round(int(v.split()[0]) / 1024.0, 1)
    except OSError:
        pass
    return out


class _MemorySampler:
    """Samples /proc/self/status every 0.2 s on a daemon thread: the peak of RssAnon (the heap,
    what must fit in RAM) and of RssFile (pages of the memory-mapped checkpoint: page cache,
    reclaimable), which VmHWM lumps together."""

    def __init__(self):
        import threading
        self.peak = {"RssAnon": 0.0, "RssFile": 0.0}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _sample(self):
        for k, v in _proc_status_mib(tuple(self.peak)).items():
            self.peak[k] = max(self.peak[k], v)

    def _run(self):
        while not self._stop.wait(0.2):
            self._sample()

    def stop(self) -> dict:
        self._stop.set()
        self._t.join()
        self._sample()
        return {f"peak_{k}": v for k, v in self.peak.items()}


def _settings_from_args(args):
    from .config import QuantizeSettings
    names = {f.name for f in fields(QuantizeSettings)}
    kw = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return QuantizeSettings(**kw)


def _ratios(text: str) -> tuple:
    """--candidates: comma-separated ratios in [0, 1]."""
    try:
        vals = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in [0, 1] such as "
                                         f"0.02,0.05,0.1, got {text!r}") from None
    if not vals or any(not 0.0 <= v <= 1.0 for v in vals):
        raise argparse.ArgumentTypeError(f"every candidate ratio must be in [0, 1], got {text!r}")
    return vals


def _on_off_auto(text: str):
    """A switch with an automatic default: "on" → True, "off" → False, "auto" → "auto"."""
    try:
        return {"auto": "auto", "on": True, "off": False}[text]
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected auto, on or off, got {text!r}") from None


def _int_or_auto(text: str):
    """An int, or "auto"."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or an integer, got {text!r}") from None


def _on_off(text: str) -> bool:
    """A switch: "on" → True, "off" → False."""
    try:
        return {"on": True, "off": False}[text]
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}") from None


def cmd_quantize(args) -> int:
    """Quantize a checkpoint; the last stdout line is the run's JSON summary."""
    from . import _threads
    from .pipeline import quantize
    if args.threads:
        _threads.set_num_threads(args.threads)
    s = _settings_from_args(args)
    t0 = time.perf_counter()
    sampler = _MemorySampler()
    ckpt = (args.out.rstrip("/") + ".progress") if args.out else None
    rep = quantize(args.model, args.calib, settings=s, out=args.out, export=args.export,
                   eval_text=args.eval_text, fp_eval=args.fp_eval, overwrite=args.overwrite,
                   progress=not args.quiet, progress_dir=ckpt, resume=args.resume,
                   cache_dir=args.cache_dir)
    if not args.quiet:
        print(rep.markdown(), file=sys.stderr)
    import resource
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB
    mem = sampler.stop()  # peaks of anonymous and file-backed (memory-mapped checkpoint) RSS
    _emit({"command": "quantize", "method": rep.settings["method"], "avg_bits": rep.avg_bits,
           "ppl": rep.ppl, "fp_ppl": rep.fp_ppl, "val_ppl": rep.val_ppl, "total_bits": rep.total_bits,
           "timings": rep.timings, "seconds": time.perf_counter() - t0, "output": rep.output,
           "peak_rss_mib": round(peak_mib, 1), "peak_rss_split_mib": mem,
           "settings": rep.settings})
    return 0


def cmd_inspect(args) -> int:
    """Per-layer Fisher column scores (and, for a hiquant output folder, the chosen ratios),
    with a PNG plot."""
    import numpy as np

    from .calib import calibration_windows
    from .model import load_model
    from .stats import collect_stats
    model = load_model(args.model)
    win, _ = calibration_windows(model.tokenizer, args.calib, args.n_calib, args.seqlen, args.seed)
    st = collect_stats(model, win, gram=False, fisher=True, progress=not args.quiet)
    rows = []
    for n in model.linear_names():
        fc = np.asarray(st.fisher_col[n], np.float64)
        top = np.sort(fc)[::-1]
        k = max(1, int(0.05 * fc.size))
        rows.append({"name": n, "d_in": int(fc.size), "fisher_total": float(fc.sum()),
                     "top5pct_share": float(top[:k].sum() / max(fc.sum(), 1e-300))})
    ratios = None
    if args.report:
        rep = json.loads(open(args.report).read())
        ratios = {L["name"]: L["ratio"] for L in rep["layers"]}
    if args.plot:
        from .plots import plot_fisher_and_ratios
        plot_fisher_and_ratios(model.linear_names(), st.fisher_col, ratios, args.plot)
    for r in rows:
        print(f"{r['name']:<45} Fisher {r['fisher_total']:.3e}  top-5% share {r['top5pct_share']:.3f}"
              + (f"  ratio {ratios[r['name']]:.3f}" if ratios else ""), file=sys.stderr)
    _emit({"command": "inspect", "model": os.path.abspath(args.model), "layers": rows,
           "ratios": ratios, "plot": args.plot})
    return 0


def cmd_demo(args) -> int:
    """Quantize the embedded model with hiq and the baselines and print the table."""
    from .calib import load_text, tokenize_text
    from .config import QuantizeSettings, resolve
    from .datasets import embedded_calib_path, embedded_model_path, embedded_test_path
    from .evaluate import perplexity
    from .methods import METHODS
    from .model import load_model
    from .pipeline import quantize

    model = load_model(embedded_model_path())
    seqlen = min(256, model.config.raw.get("max_position_embeddings", 256))
    ids = tokenize_text(model.tokenizer, load_text(embedded_test_path()))
    fp = perplexity(model, ids, seqlen, args.windows, progress=False)["ppl"]
    rows = [("FP16", "-", 16.0, fp, 0.0)]
    methods = args.methods.split(",")
    if args.avg_bits is None:
        # the budget: W{wbits} storage with the hybrid methods' scales (6-bit codes, their
        # default) plus 0.17 bit per weight for high-impact columns
        from .storage import storage_bits
        scale_bits = resolve(QuantizeSettings(method="fixed-ratio")).scale_bits
        names = model.linear_names()
        n_w = sum(a * b for a, b in map(model.linear_shape, names))
        base = sum(storage_bits(*model.linear_shape(n), 0, args.wbits, args.wbits, args.group,
                                scale_bits) for n in names) / n_w
        args.avg_bits = round(base + 0.17, 3)
        print(f"hiquant demo: budget {args.avg_bits} bits per weight (W{args.wbits} g{args.group} "
              f"with {scale_bits}-bit scales costs {base:.3f})", file=sys.stderr)
    for m in methods:
        # the demo's model is tiny (1 M parameters, 16 k calibration tokens): fewer LWC /
        # AdaRound steps, the layer-wise objective and nearest low codes, chosen because the
        # pipeline's defaults fit so small a calibration set too closely (bench/RESULTS.md)
        s = QuantizeSettings(method=m, wbits=args.wbits, group_size=args.group, seqlen=seqlen,
                             lwc_iters=200, adaround_iters=500, objective="layer",
                             low_rounding="nearest",
                             n_calib=args.n_calib, eval_seqlen=seqlen, eval_windows=args.windows,
                             avg_bits=args.avg_bits if METHODS[m].allocation != "none" else None)
        t0 = time.perf_counter()
        rep = quantize(embedded_model_path(), embedded_calib_path(), settings=s, model=model,
                       eval_text=embedded_test_path(), progress=False)
        rows.append((m, f"W{args.wbits} g{args.group}", rep.avg_bits, rep.ppl, time.perf_counter() - t0))
        print(f"  {m:<15} avg bits {rep.avg_bits:.3f}  ppl {rep.ppl:.3f}", file=sys.stderr)
    print("\n| method | config | avg bits | perplexity | seconds |\n|---|---|---|---|---|")
    for m, c, b, p, t in rows:
        print(f"| {m} | {c} | {b:.3f} | {p:.3f} | {t:.1f} |")
    _emit({"command": "demo", "fp_ppl": fp, "rows": [dict(method=m, config=c, avg_bits=b, ppl=p, seconds=t)
                                                     for m, c, b, p, t in rows]})
    return 0


def _add_pipeline_commands(sub) -> None:
    from .config import (
        DEFAULT_CANDIDATES,
        ESTIMATORS,
        EXPORTS,
        LOW_ROUNDINGS,
        LWC_SCHEDULES,
        OBJECTIVES,
        OPTION_DELTAS,
        REFINE_ORDERS,
        SCALE_BITS,
        VAL_SPLITS,
    )
    from .methods import METHODS

    p = sub.add_parser("quantize", help="quantize a checkpoint", description=cmd_quantize.__doc__)
    p.add_argument("model", metavar="MODEL_DIR")
    p.add_argument("--calib", default=None,
                   help="calibration text file (every method but rtn needs one)")
    p.add_argument("--method", default="hiq", choices=tuple(METHODS))
    p.add_argument("--wbits", type=int, default=2, help="low bit width b_L")
    p.add_argument("--hbits", type=int, default=None,
                   help="high-impact width b_H (default: the next stored width; 16 = FP16)")
    p.add_argument("--group", dest="group_size", type=int, default=64, help="group size (0: per row)")
    p.add_argument("--avg-bits", dest="avg_bits", type=float, default=None, help="bit budget per weight")
    p.add_argument("--scale-bits", dest="scale_bits", type=_scale_bits, default=None,
                   choices=("auto",) + SCALE_BITS,
                   help="stored group-scale precision: 16 (float16), 8 or 6 (codes of that width, "
                        "double-quantized with a float16 super-scale per 256 scales); default auto: "
                        "6 for hiq, fixed-ratio and fp16-retention, 16 for the others")
    p.add_argument("--abits", type=int, default=None, choices=(8, 6, 4),
                   help="evaluate with the input of every decoder linear quantized per token "
                        "(dynamic, symmetric) at this width (default: float activations)")
    p.add_argument("--smooth-alpha", dest="smooth_alpha", type=float, default=None,
                   help="smoothquant's migration strength α in [0, 1] (default 0.5)")
    p.add_argument("--ratio", type=float, default=None, help="fixed-ratio: the ratio of every layer")
    p.add_argument("--candidates", type=_ratios, default=None,
                   help="comma-separated candidate ratios "
                        f"(default {','.join(map(str, DEFAULT_CANDIDATES))})")
    p.add_argument("--estimator", default=None, choices=("auto",) + ESTIMATORS,
                   help="M estimator for hiq (default auto: diagonal while the full Fisher "
                        "diagonal fits 2 GiB, i.e. up to ~0.5 B linear weights, else rank1, the "
                        "same M from the diagonal's row and column sums); kfac: "
                        "Kronecker-factored Fisher r_o x Gram (sees GPTQ's correlated errors)")
    p.add_argument("--option-delta", dest="option_delta", default=None, choices=OPTION_DELTAS,
                   help="each candidate's perturbation in M: rtn (round-to-nearest, default) or "
                        "gptq (GPTQ codes on the parts' min-max grids, high columns compensating: "
                        "the hybrid quantizer's structure; needs the input Grams)")
    p.add_argument("--m-windows", dest="m_windows", type=int, default=None,
                   help="calibration windows that build M (default 32; the measured estimator's "
                        "cost is linear in them)")
    p.add_argument("--m-pairs", dest="m_pairs", default=None, type=_on_off_auto,
                   metavar="{auto,on,off}",
                   help="cross terms between layers in M (off: single layers only): measured, "
                        "every pair of layers in a block; fisher, every pair. auto (default): on "
                        "for measured, on for fisher when --m-windows >= the layers")
    p.add_argument("--n-calib", dest="n_calib", type=int, default=None)
    p.add_argument("--seqlen", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--val-windows", dest="val_windows", type=int, default=None,
                   help="hold out this many eval-seqlen windows of the calibration text (no "
                        "calibration window overlaps them) and report their perplexity (val_ppl): "
                        "choose settings on it, not on the test text (default 0: no split)")
    p.add_argument("--val-split", dest="val_split", default=None, choices=VAL_SPLITS,
                   help="where the validation windows lie: spread evenly over the calibration "
                        "text, or its last tokens (tail)")
    p.add_argument("--lwc-iters", dest="lwc_iters", type=int, default=None)
    p.add_argument("--adaround-iters", dest="adaround_iters", type=int, default=None)
    p.add_argument("--objective", default=None, choices=("auto",) + OBJECTIVES,
                   help="learned quantizers: layer-wise Gram objective (layer), the MSE of each "
                        "decoder block's output against the full-precision model (block, "
                        "OmniQuant's), or refine: layer-wise, then block-wise refinement of the "
                        "clipping, then layer-wise AdaRound (default auto: refine for lwc and the "
                        "hybrid methods, layer otherwise)")
    p.add_argument("--block-epochs", dest="block_epochs", type=int, default=None,
                   help="--objective block/refine: passes over the calibration windows per block "
                        "(default 2)")
    p.add_argument("--block-batch", dest="block_batch", type=int, default=None,
                   help="--objective block/refine: calibration windows per step (default 1, "
                        "OmniQuant's)")
    p.add_argument("--block-lr", dest="block_lr", type=float, default=None,
                   help="--objective block/refine: LWC learning rate (default --lwc-lr)")
    p.add_argument("--block-lr-schedule", dest="block_lr_schedule", default=None,
                   choices=LWC_SCHEDULES,
                   help="--objective block/refine: LWC learning rate constant (default, "
                        "OmniQuant's) or decaying to 0 along a half cosine")
    p.add_argument("--block-aug-loss", dest="block_aug_loss", action="store_true", default=None,
                   help="--objective block/refine: OmniQuant's aug_loss (also fit the "
                        "full-precision block's output on the quantized path's inputs)")
    p.add_argument("--refine-order", dest="refine_order", default=None, choices=REFINE_ORDERS,
                   help="--objective refine: lwc-first (block-wise clipping with FP high columns, "
                        "then layer-wise AdaRound; default) or adaround-first (layer-wise hybrid, "
                        "then block-wise clipping with the high columns at their quantized values)")
    p.add_argument("--low-rounding", dest="low_rounding", default=None,
                   choices=("auto",) + LOW_ROUNDINGS,
                   help="codes of the LWC low part on its learned grid: nearest (as OmniQuant) or "
                        "gptq (GPTQ's error-compensating sweep on that grid; same size). Default "
                        "auto: gptq for the hybrid methods, nearest for lwc")
    p.add_argument("--gptq-act-order", dest="gptq_act_order", default=None,
                   type=_on_off_auto, metavar="{auto,on,off}",
                   help="GPTQ's columns by decreasing Gram diagonal (on) or as stored (off); "
                        "default auto: on for the low part's codes on its learned grid, off for "
                        "the gptq method")
    p.add_argument("--high-compensation", dest="high_compensation", default=None,
                   type=_on_off, metavar="{on,off}",
                   help="hybrid methods: AdaRound the high columns around the targets that absorb "
                        "the frozen low part's error (on) or around the layer's weights (off, "
                        "default)")
    p.add_argument("--e2e-epochs", dest="e2e_epochs", default=None, type=_int_or_auto,
                   metavar="{auto,N}",
                   help="end-to-end tuning after quantization: passes over the calibration "
                        "windows training the norm weights and group scales on the next-token "
                        "loss (0: off; default auto: 2 for lwc and the hybrid methods on the "
                        "NumPy backend, 0 otherwise)")
    p.add_argument("--e2e-batch", dest="e2e_batch", type=int, default=None,
                   help="end-to-end tuning: windows per step (default 4)")
    p.add_argument("--e2e-norm-lr", dest="e2e_norm_lr", type=float, default=None,
                   help="end-to-end tuning: learning rate of the norm weights (default 3e-3; 0 "
                        "keeps them)")
    p.add_argument("--e2e-scale-lr", dest="e2e_scale_lr", type=float, default=None,
                   help="end-to-end tuning: learning rate of the scales' relative factors "
                        "(default 3e-3; 0 keeps them)")
    p.add_argument("--eval-text", dest="eval_text", default=None)
    p.add_argument("--eval-windows", dest="eval_windows", type=int, default=None,
                   help="perplexity windows (default 200, the shared protocol)")
    p.add_argument("--eval-seqlen", dest="eval_seqlen", type=int, default=None)
    p.add_argument("--cache-dir", dest="cache_dir", default=None,
                   help="cache calibration statistics here (reused by runs with the same model "
                        "and calibration settings)")
    p.add_argument("--fp-eval", dest="fp_eval", action="store_true", help="also evaluate the FP model")
    p.add_argument("--backend", default=None, choices=("auto", "numpy", "torch"),
                   help="model runtime: numpy, or torch (transformers' decoder layers, pip install "
                   "hiquant[torch]); auto (default): torch on a CUDA GPU when present, else numpy")
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N for backend torch; auto (default): cuda when present")
    p.add_argument("--out", default=None, help="output folder (written atomically)")
    p.add_argument("--export", default="both", choices=EXPORTS)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--resume", action="store_true",
                   help="continue a killed run from OUT.progress (saved after every block)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("inspect", help="per-layer Fisher scores and chosen ratios, with a plot",
                       description=cmd_inspect.__doc__)
    p.add_argument("model", metavar="MODEL_DIR")
    p.add_argument("--calib", required=True)
    p.add_argument("--n-calib", dest="n_calib", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", default=None, help="a run's report.json, to show its ratios")
    p.add_argument("--plot", default=None, help="write a PNG plot here")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("demo", help="quantize the embedded model with hiq and the baselines",
                       description=cmd_demo.__doc__)
    p.add_argument("--methods", default=",".join(DEMO_METHODS))
    p.add_argument("--wbits", type=int, default=2)
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--avg-bits", dest="avg_bits", type=float, default=None)
    p.add_argument("--n-calib", dest="n_calib", type=int, default=64)
    p.add_argument("--windows", type=int, default=100)
    p.set_defaults(func=cmd_demo)


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

    _add_pipeline_commands(sub)
    from .generate import add_generate_command
    add_generate_command(sub)
    return ap


def main(argv=None) -> int:
    import warnings

    from .errors import HiquantError, HiquantWarning

    args = build_parser().parse_args(argv)

    def show(message, category, *rest, **kw):  # one line per warning, no source line
        print(f"hiquant {args.command}: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("always", HiquantWarning)
        warnings.showwarning = show
        try:
            return int(args.func(args) or 0)
        except HiquantError as e:
            print(f"hiquant {args.command}: error: {e}", file=sys.stderr)
            return 2
        except OSError as e:  # the environment (a file that vanished, a device error)
            print(f"hiquant {args.command}: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            hint = ""
            if args.command == "quantize" and getattr(args, "out", None):
                hint = (f"; progress after each completed block is kept in "
                        f"{args.out.rstrip('/')}.progress — rerun the same command with "
                        "--resume to continue")
            print(f"hiquant {args.command}: interrupted{hint}", file=sys.stderr)
            return 130
