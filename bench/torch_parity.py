"""Parity of the torch backend's device kernels with the NumPy backend (issue 23).

On the full-precision model, calibration windows of calib.txt go through both runtimes block by
block (NumPy runtime, torch runtime on --device): per block the relative difference of the Gram
matrices (NumPy runtime + C++ kernel vs torch runtime + torch kernel with float32 chunk products,
and the torch kernel's float32 chunks vs float64 products on the same inputs: whether float64
accumulation is needed), the Fisher column scores of a few windows (per-sequence gradients on
each runtime), and GPTQ on the NumPy Gram of each layer of the first blocks: the torch kernel's
codes against the C++ kernel's (fraction differing) and both kernels' times side by side.

    python bench/torch_parity.py [--quick] [--model DIR] [--calib FILE] [--n-calib N]
                                 [--seqlen T] [--device cpu|cuda] [--gptq-blocks B]

--quick: the embedded model and corpus, 8 windows of 128 tokens. Prints a table and ends with one
JSON line (git SHA, CPU, threads, versions).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment  # noqa: E402


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default=None)
    ap.add_argument("--calib", default=None)
    ap.add_argument("--n-calib", type=int, default=None)
    ap.add_argument("--seqlen", type=int, default=None)
    ap.add_argument("--fisher-windows", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--gptq-blocks", type=int, default=None)
    args = ap.parse_args(argv)
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as e:
        print(f"torch backend not installed ({e}): nothing to compare")
        print(json.dumps(dict(benchmark="torch_parity", skipped=str(e), **environment())))
        return

    from hiquant import learners as K
    from hiquant import torch_kernels as tk
    from hiquant import torch_pipeline as tp
    from hiquant.calib import calibration_windows
    from hiquant.datasets import embedded_calib_path, embedded_model_path
    from hiquant.model import load_model
    from hiquant.stats import block_grams, collect_stats
    from hiquant.torch_runtime import load_torch_model

    here = Path(__file__).resolve().parent.parent
    bench = here.parent / "shared" / "bench"
    model_dir = args.model or (embedded_model_path() if args.quick else bench / "llama-bench")
    calib = args.calib or (embedded_calib_path() if args.quick else bench / "corpus" / "calib.txt")
    n_calib = args.n_calib or (8 if args.quick else 128)
    seqlen = args.seqlen or (128 if args.quick else 512)
    n_fisher = args.fisher_windows or (2 if args.quick else 8)
    gptq_blocks = args.gptq_blocks if args.gptq_blocks is not None else (1 if args.quick else 2)

    a = load_model(model_dir)
    t = load_torch_model(model_dir, device=args.device)
    windows, _ = calibration_windows(a.tokenizer, calib, n_calib, seqlen, 0)
    bs = 8
    h = np.concatenate([a.embed(windows[i:i + bs]) for i in range(0, n_calib, bs)])
    hd = tp.embed_windows(t, windows, bs)
    rows = []
    gptq_rows = []
    for b in range(a.num_blocks):
        gn = block_grams(a, b, h, batch_size=bs)
        gt = tp.block_grams(t, b, hd, batch_size=bs)
        # float64 products vs float32 chunks on the same (torch runtime) inputs, all windows
        firsts = [g[0] for g in a.input_groups(b)]
        G64 = {n: torch.zeros_like(gt[n].gram_device) for n in firsts}
        G32 = {n: torch.zeros_like(gt[n].gram_device) for n in firsts}

        def capture(n, X):
            if n in G64:
                tk.gram_accumulate(G64[n], X, chunk=None)
                tk.gram_accumulate(G32[n], X)

        for i in range(0, n_calib, bs):
            t.block_forward_device(b, hd[i:i + bs], capture=capture)
        for n0 in firsts:
            rows.append(dict(block=b, input=n0.split(".")[-1],
                             gram_rel_runtimes=_rel(gt[n0].gram, gn[n0].gram),
                             gram_rel_fp32_vs_fp64=_rel(G32[n0].cpu().numpy(),
                                                        G64[n0].cpu().numpy())))
        if b < gptq_blocks:
            for n in a.block_linear_names(b):
                W = a.get_weight(n)
                H = gn[n].gram
                t0 = time.perf_counter()
                rc = K.gptq(W, H, bits=args.bits, group_size=args.group)
                t1 = time.perf_counter()
                Wt = torch.from_numpy(W).to(t.device)
                Ht = torch.from_numpy(H).to(t.device)
                if t.device.type == "cuda":
                    torch.cuda.synchronize()
                t2 = time.perf_counter()
                rt = tk.gptq(Wt, Ht, bits=args.bits, group_size=args.group)
                codes = rt.codes.cpu().numpy()
                t3 = time.perf_counter()
                gptq_rows.append(dict(layer=n, differ=int((codes != rc.codes).sum()),
                                      total=int(codes.size), cpp_s=t1 - t0, torch_s=t3 - t2,
                                      loss_rel=rt.loss / rc.loss - 1))
        h = np.concatenate([a.block_forward(b, h[i:i + bs]) for i in range(0, n_calib, bs)])
        hd = tp.block_outputs(t, b, hd, bs)

    fw = windows[:n_fisher]
    fn = collect_stats(a, fw, gram=False, fisher=True, progress=False, fisher_full=False)
    ft = tp.collect_fisher(t, fw, progress=False, fisher_full=False)
    fisher_rel = max(_rel(ft.fisher_col[n], fn.fisher_col[n]) for n in fn.fisher_col)

    print(f"model {model_dir}, {n_calib} x {seqlen} calibration tokens, device {args.device}")
    print(f"{'block':>5} {'input':>10} {'Gram rel diff numpy/torch':>26} {'fp32 chunks vs fp64':>20}")
    for r in rows:
        print(f"{r['block']:>5} {r['input']:>10} {r['gram_rel_runtimes']:>26.2e} "
              f"{r['gram_rel_fp32_vs_fp64']:>20.2e}")
    print(f"Fisher column scores, {n_fisher} windows: max relative difference {fisher_rel:.2e}")
    print(f"{'layer':>40} {'codes differ':>14} {'C++ s':>8} {'torch s':>8} {'loss rel':>10}")
    for r in gptq_rows:
        print(f"{r['layer']:>40} {r['differ']:>7}/{r['total']:<7} {r['cpp_s']:>7.3f} "
              f"{r['torch_s']:>8.3f} {r['loss_rel']:>10.1e}")
    res = dict(benchmark="torch_parity", model=str(model_dir), n_calib=n_calib, seqlen=seqlen,
               device=args.device, gram=rows, fisher_windows=n_fisher,
               fisher_col_max_rel=fisher_rel, gptq=gptq_rows,
               gram_rel_max=max(r["gram_rel_runtimes"] for r in rows),
               gram_fp32_vs_fp64_max=max(r["gram_rel_fp32_vs_fp64"] for r in rows),
               gptq_codes_differ=sum(r["differ"] for r in gptq_rows),
               gptq_codes_total=sum(r["total"] for r in gptq_rows),
               **environment("torch", "transformers"))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
