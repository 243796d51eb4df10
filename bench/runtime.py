"""Speed and memory of hiquant's NumPy runtime against PyTorch CPU (transformers) doing the same
work on llama-bench at seqlen 512:

1. forward: per-window losses of W windows (tokens/s);
2. forward + backward: per-sequence weight gradients of W windows, one sequence at a time;
3. calibration statistics: Gram matrices of every linear input + empirical Fisher diagonal
   (per-sequence gradients squared) over N × 512 calibration windows, each side in its own
   subprocess for its time and peak resident memory (VmHWM).

hiquant runs windows on ``--threads`` worker threads with single-threaded BLAS; PyTorch runs with
``torch.set_num_threads`` at ``--threads`` and at 1 (on a busy machine its threaded kernels can
be slower than one thread) and the faster is the reference. ``--gram-accuracy`` measures the Gram
accumulation error instead (the numbers in hiquant/stats.py's docstring).

    python bench/runtime.py [--quick] [--threads N] [--no-torch] [--gram-accuracy]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import emit, environment, interleaved  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ASSETS = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "bench"))


def _windows(model, calib: str, n: int, seqlen: int, seed: int = 0) -> np.ndarray:
    from hiquant.calib import load_text, sample_windows, tokenize_text
    ids = tokenize_text(model.tokenizer, load_text(calib))
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


def _peak_rss_mib() -> float:
    """Peak resident memory of this process. VmHWM belongs to this process's address space;
    ru_maxrss (the fallback) also counts the parent's peak, which Linux carries across exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stats_worker(args) -> dict:
    """One side of the statistics benchmark, in a fresh process: time and peak RSS."""
    t_start = time.perf_counter()
    if args.side == "hiquant":
        import hiquant
        from hiquant.model import load_model
        from hiquant.stats import collect_stats
        hiquant.set_num_threads(args.threads)
        model = load_model(args.model)
        win = _windows(model, args.calib, args.windows, args.seqlen)
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
        win = _windows(model, args.calib, args.windows, args.seqlen)
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
            "peak_rss_mib": _peak_rss_mib(),
            "fisher_sum": check, "gram_trace_sum": gcheck,
            "total_seconds": time.perf_counter() - t_start}


def run_stats_worker(args, side: str, threads: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_stats-worker", side,
           "--threads", str(threads), "--model", args.model, "--calib", args.calib,
           "--windows", str(args.stats_windows), "--seqlen", str(args.seqlen)]
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
    ap.add_argument("--windows", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_stats-worker", dest="side", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    import hiquant
    if args.side:
        args.threads = args.threads or hiquant.get_num_threads()
        print(json.dumps(stats_worker(args)))
        return
    if not os.path.isdir(args.model):
        sys.exit(f"model folder {args.model} not found (the benchmark assets live in ../shared/bench)")
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

    from hiquant.model import load_model, map_ordered
    model = load_model(args.model)
    n_fwd = 4 if args.quick else 16
    n_bwd = 2 if args.quick else 8
    repeats = 2 if args.quick else 3
    args.stats_windows = args.windows or (4 if args.quick else 128)
    win = _windows(model, args.calib, max(n_fwd, n_bwd), args.seqlen)
    fw, bw = win[:n_fwd], win[:n_bwd]

    fns_fwd = {"hiquant": lambda: model.sequence_losses(fw, n_threads=threads)}
    fns_bwd = {"hiquant": lambda: map_ordered(lambda i: model.weight_grads(bw[i:i + 1]),
                                              range(n_bwd), threads)}
    torch_threads = sorted({threads, 1})
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

        for nt in torch_threads:
            fns_fwd[f"torch ({nt} thr)"] = torch_fwd(nt)
            fns_bwd[f"torch ({nt} thr)"] = torch_bwd(nt)
        # same numbers on both sides
        with torch.no_grad():
            torch.set_num_threads(threads)
            want = _torch_seq_loss(tm, fw_t[:2]).double().numpy()
        got = model.sequence_losses(fw[:2])
        print(f"check: per-window losses hiquant {got.round(5)} torch {want.round(5)}")

    t_fwd = interleaved(fns_fwd, repeats=repeats, warmup=1)
    t_bwd = interleaved(fns_bwd, repeats=repeats, warmup=1)
    tok_f, tok_b = n_fwd * args.seqlen, n_bwd * args.seqlen

    stats = {"hiquant": run_stats_worker(args, "hiquant", threads)}
    if have_torch:
        for nt in torch_threads:
            stats[f"torch ({nt} thr)"] = run_stats_worker(args, "torch", nt)

    print(f"\nllama-bench, seqlen {args.seqlen}, {threads} threads ({environment()['cpu']})")
    print(f"{'work':44s} {'side':16s} {'min s':>8s} {'median s':>9s} {'tokens/s':>9s} {'peak MiB':>9s}")
    table = {}
    for label, res, tok in ((f"forward, {n_fwd} windows", t_fwd, tok_f),
                            (f"forward+backward, {n_bwd} x 1 window", t_bwd, tok_b)):
        for side, r in res.items():
            print(f"{label:44s} {side:16s} {r['min']:8.3f} {r['median']:9.3f} "
                  f"{tok / r['min']:9.0f} {'':>9s}")
            table.setdefault(label.split(",")[0], {})[side] = {
                "min_s": r["min"], "median_s": r["median"], "tokens_per_s": tok / r["min"]}
    label = f"Gram+Fisher stats, {args.stats_windows} x {args.seqlen}"
    for side, r in stats.items():
        print(f"{label:44s} {side:16s} {r['seconds']:8.3f} {'':>9s} {r['tokens_per_s']:9.0f} "
              f"{r['peak_rss_mib']:9.0f}")
        table.setdefault("stats", {})[side] = r

    def ratio(key):
        t = table[key]
        ref = [v for k, v in t.items() if k.startswith("torch")]
        if not ref:
            return None
        if key == "stats":
            return min(v["seconds"] for v in ref) / t["hiquant"]["seconds"]
        return min(v["min_s"] for v in ref) / t["hiquant"]["min_s"]

    speedups = {k: ratio(k) for k in table}
    if have_torch:
        print("\nspeed-up of hiquant over the faster PyTorch setting: " +
              ", ".join(f"{k} {v:.2f}x" for k, v in speedups.items() if v))
    emit({"benchmark": "runtime", "quick": args.quick, "seqlen": args.seqlen,
          "threads": threads, "results": table, "speedup_vs_torch": speedups,
          "env": environment("torch", "transformers", "safetensors", "tokenizers")})


if __name__ == "__main__":
    main()
