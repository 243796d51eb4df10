"""Speed and memory of hiquant's NumPy runtime against PyTorch CPU (transformers) doing the same
work on llama-bench at seqlen 512:

1. forward: per-window losses of W windows (tokens/s);
2. forward + backward: per-sequence weight gradients of W windows, one sequence at a time;
3. calibration statistics: Gram matrices of every linear input + empirical Fisher diagonal
   (per-sequence gradients squared) over N × 512 calibration windows, each side in its own
   subprocess for its time and peak resident memory (VmHWM).

Both sides run at 1 thread and at ``--threads`` (``--quick``: 1 thread only): hiquant with worker
threads over windows (single-threaded BLAS each), PyTorch with ``torch.set_num_threads``. The
speed-up is reported per thread count and best against best. ``--gram-accuracy`` measures the Gram
accumulation error instead (the numbers in hiquant/stats.py's docstring).

    python bench/runtime.py [--quick] [--threads N] [--settings 1,N] [--windows W] [--no-torch]
                            [--gram-accuracy]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import emit, environment, interleaved, peak_rss_mib  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ASSETS = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "bench"))


def _windows(model, calib: str, n: int, seqlen: int, seed: int = 0,
             max_chars: int | None = None) -> np.ndarray:
    """The reference protocol's windows (``max_chars``: tokenize only the start of the text)."""
    from hiquant.calib import load_text, sample_windows, tokenize_text
    text = load_text(calib)
    ids = tokenize_text(model.tokenizer, text[:max_chars] if max_chars else text)
    return sample_windows(ids, n, seqlen, seed)


def _torch_model(path: str):
    import torch
    import transformers
    tm = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return tm.eval()


def _torch_linears(tm):
    import torch
    return {n: mod for n, mod in tm.named_modules()
            if isinstance(mod, torch.nn.Linear) and n.startswith("model.layers.")}


def _torch_seq_loss(tm, ids_t):
    import torch
    logits = tm(ids_t).logits
    lp = torch.log_softmax(logits[:, :-1].float(), -1)
    return -lp.gather(-1, ids_t[:, 1:, None]).squeeze(-1).mean(1)


# ------------------------------------------------------------------------------ stats workers


def stats_worker(args) -> dict:
    """One side of the statistics benchmark, in a fresh process: time and peak RSS."""
    t_start = time.perf_counter()
    if args.side == "hiquant":
        import hiquant
        from hiquant.model import load_model
        from hiquant.stats import collect_stats
        hiquant.set_num_threads(args.threads)
        model = load_model(args.model)
        win = _windows(model, args.calib, args.windows, args.seqlen, max_chars=args.max_chars)
        t0 = time.perf_counter()
        st = collect_stats(model, win, progress=False, n_threads=args.threads)
        dt = time.perf_counter() - t0
        check = float(sum(float(F.sum(dtype=np.float64)) for F in st.fisher.values()))
        gcheck = float(sum(float(np.trace(G)) for G in {id(G): G for G in st.gram.values()}.values()))
    else:
        import torch

        from hiquant.model import load_model
        torch.set_num_threads(args.threads)
        model = load_model(args.model)  # for the tokenizer and the same windows only
        win = _windows(model, args.calib, args.windows, args.seqlen, max_chars=args.max_chars)
        del model
        tm = _torch_model(args.model)
        lin = _torch_linears(tm)
        gram, fisher, hooks = {}, {}, []
        shared = {}  # q/k/v and gate/up see the same input: one Gram each, as hiquant does

        def hook(name):
            key = name.rsplit(".", 1)[0] + (".qkv" if name.endswith(("q_proj", "k_proj", "v_proj"))
                                            else ".gu" if name.endswith(("gate_proj", "up_proj"))
                                            else "." + name.rsplit(".", 1)[1])

            def f(mod, inp):
                if key in shared.get("seen", set()):
                    return
                shared.setdefault("seen", set()).add(key)
                X = inp[0].detach().reshape(-1, inp[0].shape[-1])
                P = (X.T @ X).double()  # float32 products, float64 accumulation
                gram[key] = gram[key] + P if key in gram else P
            return f

        for name, mod in lin.items():
            hooks.append(mod.register_forward_pre_hook(hook(name)))
            fisher[name] = torch.zeros_like(mod.weight)
        t0 = time.perf_counter()
        for i in range(win.shape[0]):
            shared["seen"] = set()
            ids_t = torch.from_numpy(win[i:i + 1])
            tm.zero_grad(set_to_none=True)
            _torch_seq_loss(tm, ids_t).sum().backward()
            with torch.no_grad():
                for name, mod in lin.items():
                    fisher[name] += mod.weight.grad * mod.weight.grad
        fcol = {n: F.double().sum(0) for n, F in fisher.items()}
        dt = time.perf_counter() - t0
        check = float(sum(float(F.double().sum()) for F in fisher.values()))
        gcheck = float(sum(float(torch.trace(G)) for G in gram.values()))
        del fcol
    return {"side": args.side, "threads": args.threads, "windows": int(win.shape[0]),
            "seconds": dt, "tokens_per_s": win.size / dt,
            "peak_rss_mib": peak_rss_mib(),
            "fisher_sum": check, "gram_trace_sum": gcheck,
            "total_seconds": time.perf_counter() - t_start}


def run_stats_worker(args, side: str, threads: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_stats-worker", side,
           "--threads", str(threads), "--model", args.model, "--calib", args.calib,
           "--windows", str(args.stats_windows), "--seqlen", str(args.seqlen)]
    if args.max_chars:
        cmd += ["--max-chars", str(args.max_chars)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"stats worker {side} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ gram accuracy


def gram_accuracy(args) -> dict:
    """Error of float32-chunked Gram accumulation against float64, on real activations."""
    from hiquant import _core
    from hiquant.model import load_model
    model = load_model(args.model)
    n_win = 16 if args.quick else 128
    win = _windows(model, args.calib, n_win, args.seqlen)
    block = 3
    caps = {}

    def cap(name, X):
        caps.setdefault(name.rsplit(".", 1)[1], []).append(X.copy())

    for b0 in range(0, n_win, 8):
        h = model.embed(win[b0:b0 + 8])
        for i in range(block + 1):
            h = model.block_forward(i, h, capture=cap if i == block else None)
    rows = []
    result = {}
    for key, label in (("q_proj", "q/k/v input"), ("down_proj", "down input")):
        X = np.concatenate(caps[key])
        n, d = X.shape
        X64 = X.astype(np.float64)
        G64 = X64.T @ X64
        norm = np.sqrt(np.outer(np.diag(G64), np.diag(G64)))
        for R in (n, 4096, 256):
            G = np.zeros((d, d))
            _core.gram_accumulate(G, X, 0, R)
            E = G - G64
            mx, fro = float(np.abs(E / norm).max()), float(np.linalg.norm(E) / np.linalg.norm(G64))
            what = f"float32 over all {n} rows" if R == n else f"float32 per {R} rows"
            rows.append((label, d, what, mx, fro))
            result[f"{key}/chunk_{'all' if R == n else R}"] = {"max_rel": mx, "fro_rel": fro}
    print(f"Gram accumulation error vs float64 (llama-bench block {block}, {n} tokens)")
    print(f"{'input':14s} {'d':>5s}  {'accumulation':32s} {'max rel':>9s} {'fro rel':>9s}")
    for label, d, what, mx, fro in rows:
        print(f"{label:14s} {d:5d}  {what:32s} {mx:9.1e} {fro:9.1e}")
    return {"benchmark": "gram_accuracy", "tokens": int(n), "results": result}


# ------------------------------------------------------------------------------ main


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer windows and repeats (< 1 min)")
    ap.add_argument("--threads", type=int, default=None, help="default: hiquant's default")
    ap.add_argument("--model", default=os.path.join(ASSETS, "llama-bench"))
    ap.add_argument("--calib", default=os.path.join(ASSETS, "corpus", "calib.txt"))
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--gram-accuracy", action="store_true")
    ap.add_argument("--windows", type=int, default=None,
                    help="calibration windows for the statistics (default 128, --quick 2)")
    ap.add_argument("--settings", default=None,
                    help="comma-separated thread counts to compare (default: 1 and --threads)")
    ap.add_argument("--max-chars", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_stats-worker", dest="side", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    import hiquant
    if args.side:
        args.threads = args.threads or hiquant.get_num_threads()
        print(json.dumps(stats_worker(args)))
        return
    if not os.path.isdir(args.model):
        # Skipped, not failed: CI runs every --quick mode, with or without the shared assets.
        print(f"model folder {args.model} not found (the benchmark assets live in ../shared/bench); skipped")
        print(json.dumps({"benchmark": "runtime", "skipped": "assets not found"}))
        return
    if args.threads:
        hiquant.set_num_threads(args.threads)
    threads = hiquant.get_num_threads()
    if args.gram_accuracy:
        res = gram_accuracy(args)
        res["env"] = environment()
        emit(res)
        return

    have_torch = False
    if not args.no_torch:
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
            have_torch = True
        except ImportError:
            print("PyTorch/transformers not installed: hiquant only", file=sys.stderr)

    from hiquant._threads import map_ordered
    from hiquant.model import load_model
    model = load_model(args.model)
    # Each side runs at 1 thread and at --threads (quick: 1 thread only): hiquant with worker
    # threads over windows, PyTorch with its intra-op threads.
    if args.settings:
        settings = sorted({int(x) for x in args.settings.split(",")})
    else:
        settings = [1] if args.quick else sorted({1, threads})
    n_fwd = 2 if args.quick else 16
    n_bwd = 1 if args.quick else 8
    repeats = 1 if args.quick else 3
    args.stats_windows = args.windows or (2 if args.quick else 128)
    if args.quick and not args.max_chars:
        args.max_chars = 300_000  # tokenizing all 3.4 MB takes seconds in every process
    win = _windows(model, args.calib, max(n_fwd, n_bwd), args.seqlen, max_chars=args.max_chars)
    fw, bw = win[:n_fwd], win[:n_bwd]

    fns_fwd, fns_bwd = {}, {}
    for nt in settings:
        fns_fwd[f"hiquant {nt} thr"] = lambda nt=nt: model.sequence_losses(fw, n_threads=nt)
        fns_bwd[f"hiquant {nt} thr"] = lambda nt=nt: map_ordered(
            lambda i: model.weight_grads(bw[i:i + 1]), range(n_bwd), nt)
    if have_torch:
        import torch
        tm = _torch_model(args.model)
        fw_t, bw_t = torch.from_numpy(fw), torch.from_numpy(bw)

        def torch_fwd(nt):
            def f():
                torch.set_num_threads(nt)
                with torch.no_grad():
                    for b0 in range(0, n_fwd, 4):
                        _torch_seq_loss(tm, fw_t[b0:b0 + 4])
            return f

        def torch_bwd(nt):
            def f():
                torch.set_num_threads(nt)
                for i in range(n_bwd):
                    tm.zero_grad(set_to_none=True)
                    _torch_seq_loss(tm, bw_t[i:i + 1]).sum().backward()
            return f

        for nt in settings:
            fns_fwd[f"torch {nt} thr"] = torch_fwd(nt)
            fns_bwd[f"torch {nt} thr"] = torch_bwd(nt)
        with torch.no_grad():  # same numbers on both sides
            torch.set_num_threads(threads)
            want = _torch_seq_loss(tm, fw_t[:2]).double().numpy()
        got = model.sequence_losses(fw[:2])
        print(f"check: per-window losses hiquant {got.round(5)} torch {want.round(5)}")

    t_fwd = interleaved(fns_fwd, repeats=repeats, warmup=1)
    t_bwd = interleaved(fns_bwd, repeats=repeats, warmup=1)
    tok_f, tok_b = n_fwd * args.seqlen, n_bwd * args.seqlen
    stats = {}
    for nt in settings:
        stats[f"hiquant {nt} thr"] = run_stats_worker(args, "hiquant", nt)
        if have_torch:
            stats[f"torch {nt} thr"] = run_stats_worker(args, "torch", nt)

    print(f"\nllama-bench, seqlen {args.seqlen} ({environment()['cpu']}, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f})")
    print(f"{'work':40s} {'side':16s} {'min s':>8s} {'median s':>9s} {'tokens/s':>9s} {'peak MiB':>9s}")
    table = {}
    for key, label, res, tok in (("forward", f"forward, {n_fwd} windows", t_fwd, tok_f),
                                 ("forward+backward", f"forward+backward, {n_bwd} x 1 window",
                                  t_bwd, tok_b)):
        for side, r in res.items():
            print(f"{label:40s} {side:16s} {r['min']:8.3f} {r['median']:9.3f} "
                  f"{tok / r['min']:9.0f} {'':>9s}")
            table.setdefault(key, {})[side] = {
                "min_s": r["min"], "median_s": r["median"], "tokens_per_s": tok / r["min"]}
    label = f"Gram+Fisher stats, {args.stats_windows} x {args.seqlen}"
    for side, r in stats.items():
        print(f"{label:40s} {side:16s} {r['seconds']:8.3f} {'':>9s} {r['tokens_per_s']:9.0f} "
              f"{r['peak_rss_mib']:9.0f}")
        r["min_s"] = r["seconds"]
        table.setdefault("stats", {})[side] = r

    speedups = {}
    if have_torch:
        for key, t in table.items():
            for nt in settings:
                speedups[f"{key} {nt} thr"] = (t[f"torch {nt} thr"]["min_s"] /
                                               t[f"hiquant {nt} thr"]["min_s"])
            speedups[f"{key} best"] = (min(v["min_s"] for k, v in t.items() if k.startswith("torch"))
                                       / min(v["min_s"] for k, v in t.items()
                                             if k.startswith("hiquant")))
        print("\nspeed-up of hiquant over PyTorch (time ratio, same threads; best vs best): " +
              ", ".join(f"{k} {v:.2f}x" for k, v in speedups.items()))
    emit({"benchmark": "runtime", "quick": args.quick, "seqlen": args.seqlen,
          "threads": threads, "load_average": os.getloadavg()[0], "results": table,
          "speedup_vs_torch": speedups,
          "env": environment("torch", "transformers", "safetensors", "tokenizers")})


if __name__ == "__main__":
    main()
