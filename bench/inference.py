"""Inference kernels: y = W x straight from hiquant's packed format against FP32 and FP16 weights.

For each layer shape (LLaMA-2-7B's 4096x4096, 11008x4096, 4096x11008 by default; random weights
quantized with storage.QuantizedLayer.rtn so the format is the real one) and for one block of
llama-bench if ../shared/bench is present, times side by side, in one process:

* fp32-blas      NumPy float32 ``W @ x`` (BLAS);
* fp16-numpy     NumPy float16 ``W16 @ x16`` (NumPy's own float16 loop, no BLAS);
* fp16-convert   ``W16.astype(float32) @ x`` (converting the weights on every call);
* fp16-hiquant   hiquant's kernel on an all-FP16 layer (F16C conversion inside the product);
* hiquant W2 g64 + 10% at 3 bits, W3 g128 + 10% at 4 bits (6-bit double-quantized scales, the
  hybrid methods' default), plain W4 g128 (float16 scales), each with ``kernel="auto"`` (one
  token: the table kernel for 2-bit parts); for one token, the 2-bit format also on the register
  kernel (``kernel="avx2"``, row "... reg"), and every format with the table kernel's opt-in
  int8 tables (``tables="int8"``, row "... int8"), side by side;

for one token (GEMV), a batch of 8 (small-batch GEMM) and 32 tokens (from 24 tokens on the packed
kernels take their prefill path: dequantized row blocks into the GEMM micro-kernel); `--tokens`
chooses. Every call reads a different copy of the layer
(enough copies to exceed 3x the last-level cache), so the weights come from memory as in
decoding. Bytes moved per call = the weight data the call reads (one token on the table kernel:
its copy of the 2-bit parts, ``PackedLinear.decode_nbytes``); a multi-threaded copy loop
measured in the same run gives this machine's bandwidth (read + write bytes / s), and the
fraction reached is (bytes / time) / bandwidth. Ends with one JSON line.

    python bench/inference.py [--quick] [--threads N] [--repeats R] [--tokens 1,8,32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import hiquant  # noqa: E402
from _common import emit, environment  # noqa: E402
from hiquant._threads import set_blas_threads  # noqa: E402
from hiquant.packed_matmul import PackedLinear, kernel_name  # noqa: E402
from hiquant.storage import QuantizedLayer  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
QUICK_SHAPES = [(1024, 1024), (2752, 1024)]
# name: (b_low, group, high fraction, b_high, scale_bits)
FORMATS = {
    "W2g64+10%@3": (2, 64, 0.10, 3, 6),
    "W3g128+10%@4": (3, 128, 0.10, 4, 6),
    "W4g128": (4, 128, 0.0, 0, 16),
}
LLC_BYTES = 32 << 20


def copy_bandwidth(nbytes: int, threads: int, repeats: int) -> float:
    """Read + write bytes per second of a chunked np.copyto on `threads` threads (NumPy releases
    the GIL while copying)."""
    a = np.ones(nbytes // 4, np.float32)
    b = np.empty_like(a)
    chunks = np.array_split(np.arange(a.size), threads)
    spans = [(int(c[0]), int(c[-1]) + 1) for c in chunks if c.size]
    with ThreadPoolExecutor(threads) as ex:
        def run():
            list(ex.map(lambda s: np.copyto(b[s[0]:s[1]], a[s[0]:s[1]]), spans))
        run()
        best = min(_time(run) for _ in range(repeats))
    return 2 * a.nbytes / best


def _time(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def _copies(nbytes: int, floor: int = 2) -> int:
    return max(floor, -(-3 * LLC_BYTES // max(nbytes, 1)))


def _clone_packed(pl: PackedLinear) -> PackedLinear:
    parts = [{k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in p.items()}
             for p in pl._parts]
    return PackedLinear(pl.name, pl.d_out, pl.d_in, parts, tables=pl.tables)


def rotating(objs, call):
    it = [0]

    def f():
        o = objs[it[0] % len(objs)]
        it[0] += 1
        call(o)
    return f


def bench_layer(label, W, threads, repeats, batches, rng, cap_bytes):
    d_out, d_in = W.shape
    rows = []
    xs = {n: rng.standard_normal((n, d_in)).astype(np.float32) for n in batches}
    cands = {}
    n32 = min(_copies(W.nbytes), max(1, cap_bytes // W.nbytes))
    W32 = [W.copy() for _ in range(n32)]
    cands["fp32-blas"] = (W.nbytes, lambda x: rotating(W32, lambda w: w @ x.T))
    decode_bytes = {}  # one token reads other bytes than the format's (the table kernel's copy)
    W16 = [w.astype(np.float16) for w in W32[:max(1, min(n32, cap_bytes // (W.nbytes // 2)))]]
    cands["fp16-numpy"] = (W.nbytes // 2, lambda x: rotating(W16, lambda w: w @ x.astype(np.float16).T))
    cands["fp16-convert"] = (W.nbytes // 2,
                             lambda x: rotating(W16, lambda w: w.astype(np.float32) @ x.T))
    f16 = PackedLinear.from_layer(QuantizedLayer.rtn("fp16", W, 2, 64, np.arange(d_in), 16))
    f16s = [f16] + [_clone_packed(f16) for _ in range(_copies(f16.nbytes) - 1)]
    cands["fp16-hiquant"] = (f16.nbytes, lambda x: rotating(
        f16s, lambda p: p.matmul(x, n_threads=threads)))
    bits = {"fp32-blas": 32.0, "fp16-numpy": 16.0, "fp16-convert": 16.0, "fp16-hiquant": 16.0}
    for name, (bl, g, frac, bh, sb) in FORMATS.items():
        k = int(round(frac * d_in))
        hi = np.sort(rng.choice(d_in, k, replace=False)) if k else ()
        ql = QuantizedLayer.rtn(name, W, bl, g, hi, bh, sb)
        pl = PackedLinear.from_layer(ql)
        pls = [pl] + [_clone_packed(pl) for _ in range(_copies(pl.nbytes) - 1)]
        cands[name] = (pl.nbytes, (lambda pls: lambda x: rotating(
            pls, lambda p: p.matmul(x, n_threads=threads)))(pls))
        decode_bytes[name] = pl.decode_nbytes
        bits[name] = ql.storage_bits() / (d_out * d_in)
        if pl.planes_nbytes and 1 in batches:
            cands[name + " reg"] = (pl.nbytes, (lambda pls: lambda x: rotating(
                pls, lambda p: p.matmul(x, n_threads=threads, kernel="avx2")))(pls))
            bits[name + " reg"] = bits[name]
        p8 = PackedLinear.from_layer(ql, tables="int8")
        if p8.planes_nbytes and 1 in batches:
            p8s = [p8] + [_clone_packed(p8) for _ in range(_copies(p8.nbytes) - 1)]
            cands[name + " int8"] = (p8.nbytes, (lambda pls: lambda x: rotating(
                pls, lambda p: p.matmul(x, n_threads=threads)))(p8s))
            decode_bytes[name + " int8"] = p8.decode_nbytes
            bits[name + " int8"] = bits[name]
    for n in batches:
        x = xs[n]
        fns = {name: make(x) for name, (_, make) in cands.items()
               if n == 1 or not name.endswith((" reg", " int8"))}
        reps = {name: (max(2, repeats // 4) if name == "fp16-numpy" else repeats) for name in fns}
        times = {}
        for name, f in fns.items():  # interleaved rounds would mix cache states; one at a time
            f()
            times[name] = [_time(f) for _ in range(reps[name])]
        for name, ts in times.items():
            rows.append({"layer": label, "shape": [d_out, d_in], "tokens": n, "weights": name,
                         "bits": round(bits[name], 4),
                         "bytes": int(decode_bytes.get(name, cands[name][0]) if n == 1
                                      else cands[name][0]),
                         "min_s": min(ts), "median_s": statistics.median(ts)})
    return rows


def llama_bench_block(root: Path):
    folder = root / "llama-bench"
    if not (folder / "config.json").is_file():
        return []
    m = hiquant.load_model(folder, load_tokenizer=False)
    return [(f"llama-bench {n.split('.')[-1]}", m.get_weight(n)) for n in m.block_linear_names(0)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, few repeats (CI)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--tokens", default="1,8,32",
                    help="comma-separated token counts per call (default 1,8,32)")
    ap.add_argument("--assets", default=str(Path(__file__).resolve().parents[1].parent /
                                            "shared" / "bench"))
    args = ap.parse_args(argv)
    threads = args.threads or hiquant.get_num_threads()
    # the float32 BLAS row runs on as many threads as hiquant's kernels (False: not settable here,
    # the JSON says so)
    blas_set = set_blas_threads(threads)
    repeats = args.repeats or (3 if args.quick else 15)
    rng = np.random.default_rng(0)
    cap = (256 << 20) if args.quick else (1 << 30)
    bw = copy_bandwidth((64 if args.quick else 256) << 20, threads, 3 if args.quick else 7)
    layers = [(f"{o}x{i}", (rng.standard_normal((o, i)) * 0.02).astype(np.float32))
              for o, i in (QUICK_SHAPES if args.quick else SHAPES)]
    if not args.quick:
        layers += llama_bench_block(Path(args.assets))
    batches = tuple(int(t) for t in args.tokens.split(","))
    if not batches or min(batches) < 1:
        ap.error("--tokens takes positive integers, e.g. 1,8,32")
    rows = []
    for label, W in layers:
        rows += bench_layer(label, W, threads, repeats, batches, rng, cap)
    bw_after = copy_bandwidth((64 if args.quick else 256) << 20, threads, 3 if args.quick else 7)
    bw = max(bw, bw_after)
    base = {(r["layer"], r["tokens"], r["weights"]): r for r in rows}
    print(f"kernel {kernel_name()}, {threads} threads, copy bandwidth {bw / 1e9:.2f} GB/s "
          f"(read+write), load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'layer':<22}{'tok':>4} {'weights':<14}{'bits':>7}{'MB':>8}{'min ms':>9}{'med ms':>9}"
          f"{'GB/s':>7}{'%bw':>6}{'vs fp16':>8}{'vs fp32':>8}")
    for r in rows:
        r["GBps"] = r["bytes"] / r["min_s"] / 1e9
        r["bw_fraction"] = r["bytes"] / r["min_s"] / bw
        f16 = min(base[(r["layer"], r["tokens"], w)]["min_s"]
                  for w in ("fp16-numpy", "fp16-convert", "fp16-hiquant"))
        r["speedup_vs_best_fp16"] = f16 / r["min_s"]
        r["speedup_vs_fp32"] = base[(r["layer"], r["tokens"], "fp32-blas")]["min_s"] / r["min_s"]
        print(f"{r['layer']:<22}{r['tokens']:>4} {r['weights']:<14}{r['bits']:>7.3f}"
              f"{r['bytes'] / 1e6:>8.2f}{r['min_s'] * 1e3:>9.3f}{r['median_s'] * 1e3:>9.3f}"
              f"{r['GBps']:>7.2f}{100 * r['bw_fraction']:>6.1f}{r['speedup_vs_best_fp16']:>8.2f}"
              f"{r['speedup_vs_fp32']:>8.2f}")
    emit({"bench": "inference", "quick": args.quick, "kernel": kernel_name(),
          "copy_bandwidth_Bps": bw, "load_average": os.getloadavg(), "rows": rows,
          **environment(), "threads": threads, "blas_threads_set": blas_set})


if __name__ == "__main__":
    main()
