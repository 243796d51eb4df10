"""GPTQ codes on a fixed grid: the column order of the sweep, stored vs by decreasing H_ii.

The hybrid quantizer chooses its low part's codes with GPTQ on the grid LWC learned, the
high-impact columns last and free (methods/hybrid.py). On a fixed grid every group's parameters
are given, so the sweep's order is free; ``gptq_act_order`` picks it. This measures, on every
linear layer of a model, the layer loss ``tr(E H Eᵀ)`` of the low part's error E with the high
columns at their least-squares optimum (the compensation AdaRound then realizes), for the two
orders, on the min-max grid with 6-bit scale codes and the top ``--ratio`` Fisher columns as the
high part. Block b's Gram and Fisher come from the full-precision model on the calibration
windows (collect_stats).

    python bench/gptq_order.py [--quick] [--model DIR --calib FILE] [--windows 32]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import hiquant  # noqa: E402
from _common import emit, environment  # noqa: E402
from hiquant import learners as K  # noqa: E402
from hiquant.allocate import high_columns, ratio_to_k  # noqa: E402
from hiquant.calib import calibration_split  # noqa: E402
from hiquant.stats import collect_stats  # noqa: E402
from hiquant.storage import QuantPart  # noqa: E402


def free_tail_loss(E: np.ndarray, H: np.ndarray, d_low: int) -> float:
    """tr(E Sᵀ) of the low error E under the Schur complement S of the high block (float64)."""
    A, B, C = H[:d_low, :d_low], H[:d_low, d_low:], H[d_low:, d_low:]
    if C.size:
        C = C + 1e-2 * np.mean(np.diag(C)) * np.eye(C.shape[0])
        A = A - B @ np.linalg.solve(C, B.T)
    E = E.astype(np.float64)
    return float(np.einsum("ij,jk,ik->", E, A, E))


def main():
    from hiquant.datasets import embedded_calib_path, embedded_model_path
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the embedded model, 4 windows")
    p.add_argument("--model", default=None)
    p.add_argument("--calib", default=None)
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--ratio", type=float, default=0.15)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        hiquant.set_num_threads(args.threads)
    model_dir = args.model or embedded_model_path()
    calib = args.calib or embedded_calib_path()
    n, seqlen = (4, 128) if args.quick else (args.windows, args.seqlen)
    model = hiquant.load_model(model_dir)
    windows, _, _ = calibration_split(model.tokenizer, calib, n, seqlen, 0)
    t0 = time.perf_counter()
    st = collect_stats(model, windows, gram=True, fisher=True, fisher_full=False, progress=False)
    t_stats = time.perf_counter() - t0
    rows, totals = [], {"stored": 0.0, "act_order": 0.0}
    for name in model.linear_names():
        d_in = model.linear_shape(name)[1]
        W = np.ascontiguousarray(model.get_weight(name), np.float32)
        H = st.gram[name]
        hi = high_columns(st.fisher_col[name], ratio_to_k(args.ratio, d_in))
        lo = np.setdiff1d(np.arange(d_in), hi)
        perm = np.concatenate([lo, hi])
        Wp, Hp = np.ascontiguousarray(W[:, perm]), np.ascontiguousarray(H[np.ix_(perm, perm)])
        grid = QuantPart.from_weights(np.ascontiguousarray(Wp[:, :lo.size]), args.bits, args.group,
                                      scale_bits=6)
        loss = {}
        for label, act in (("stored", False), ("act_order", True)):
            r = K.gptq(Wp, Hp, bits=args.bits, group_size=args.group,
                       scale=np.ascontiguousarray(grid.scale_f32()), zero=grid.zero,
                       n_quant=lo.size, act_order=act)
            loss[label] = free_tail_loss(r.wq - Wp[:, :lo.size], Hp, lo.size)
            totals[label] += loss[label]
        rows.append((name, loss["act_order"] / loss["stored"]))
    ratios = np.array([r for _, r in rows])
    print(f"GPTQ on a fixed W{args.bits} g{args.group} grid, {args.ratio:.0%} high columns free, "
          f"{n} x {seqlen} tokens ({t_stats:.0f} s statistics)")
    print(f"{'layer':<40} {'act_order / stored loss':>24}")
    for name, r in rows:
        print(f"{name:<40} {r:24.3f}")
    print(f"layers where act_order is lower: {int((ratios < 1).sum())} of {len(ratios)}; "
          f"median ratio {np.median(ratios):.3f}; summed loss ratio "
          f"{totals['act_order'] / totals['stored']:.4f}")
    emit({"benchmark": "gptq_order", "quick": args.quick, "model": str(model_dir),
          "windows": n, "seqlen": seqlen, "bits": args.bits, "group": args.group,
          "ratio": args.ratio, "layers": len(ratios), "lower": int((ratios < 1).sum()),
          "median_ratio": round(float(np.median(ratios)), 4),
          "summed_ratio": round(totals["act_order"] / totals["stored"], 4), **environment()})


if __name__ == "__main__":
    main()
