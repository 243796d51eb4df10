"""The rank-1 Fisher M against the full-diagonal M: how close its terms are, and whether the IQP
allocates the same ratios from it.

The ``diagonal`` estimator needs the full empirical-Fisher diagonal F (4 bytes per weight: 26 GB
for a 7B model); ``rank1`` replaces F by ``R Cᵀ / ΣF`` from its row and column sums (d_out + d_in
numbers per layer). This collects F once on the pipeline's calibration windows (the run's
``calibration_split`` for ``--seed``, the validation windows held out), builds both M's with the
pipeline's option Δ's and solves the IQP at each ``--config``. Reported per config: the range of
rank1/diagonal over the M terms, the correlation of their logarithms, the layers whose ratio
differs, and the diagonal M's objective at rank1's choice relative to its own optimum (1 = the
same quality by the diagonal estimator's own measure). Bytes each estimator keeps are reported
too. Ends with one JSON line.

    python bench/rank1_fisher.py [--quick] [--seed 0]
        [--model ../shared/bench/llama-bench --calib ../shared/bench/corpus/calib.txt]
        [--configs 2:64:3:2.3,3:128:4:3.3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import emit, environment  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the embedded model, 8 windows (CI)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--calib", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--configs", default="2:64:3:2.3,3:128:4:3.3",
                    help="wbits:group:hbits:avg_bits, comma-separated")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    import hiquant
    from hiquant import allocate as A
    from hiquant.calib import calibration_split
    from hiquant.config import QuantizeSettings, resolve
    from hiquant.datasets import embedded_calib_path, embedded_model_path
    from hiquant.model import load_model
    from hiquant.stats import collect_stats
    if args.threads:
        hiquant.set_num_threads(args.threads)
    model_dir = args.model or str(embedded_model_path())
    calib = args.calib or str(embedded_calib_path())
    base = QuantizeSettings(method="hiq", avg_bits=2.3, seed=args.seed)
    n_calib, seqlen = (8, 128) if args.quick else (base.n_calib, base.seqlen)
    val_windows = 0 if args.quick else 64
    model = load_model(model_dir)
    windows, _, calib_settings = calibration_split(
        model.tokenizer, calib, n_calib, seqlen, args.seed, val_windows=val_windows,
        val_seqlen=base.eval_seqlen, val_split=base.val_split)
    t0 = time.perf_counter()
    st = collect_stats(model, windows, gram=False, progress=False)
    t_stats = time.perf_counter() - t0
    shapes = {n: model.linear_shape(n) for n in model.linear_names()}
    names = list(shapes)
    n_weights = sum(a * b for a, b in shapes.values())
    rows = []
    for spec in args.configs.split(","):
        wb, g, hb, avg = spec.split(":")
        s = resolve(QuantizeSettings(method="hiq", wbits=int(wb), group_size=int(g),
                                     hbits=int(hb), avg_bits=float(avg), seed=args.seed),
                    n_weights=n_weights, n_layers=len(names))
        kw = dict(fisher_col=st.fisher_col, candidates=s.candidates, b_low=s.wbits,
                  b_high=s.hbits, group_size=s.group_size, names=names,
                  option_delta=s.option_delta, scale_bits=int(s.scale_bits))
        res = {}
        for est in ("diagonal", "rank1"):
            t0 = time.perf_counter()
            sm = A.sensitivity_matrix(model, None, estimator=est, fisher=st.fisher,
                                      fisher_row=st.fisher_row, **kw)
            t_m = time.perf_counter() - t0
            _, al = A.plan_layers(s.replace(estimator=est), shapes, fisher_col=st.fisher_col,
                                  sensitivity=sm)
            res[est] = (sm, al, t_m)
        Md = res["diagonal"][0].M
        costs = A.option_costs(shapes, s.candidates, s.wbits, s.hbits, s.group_size,
                               int(s.scale_bits))

        def diag_objective(al):
            return A.iqp_objective(Md, costs, al.result.choice)
        d, r = np.diag(Md), np.diag(res["rank1"][0].M)
        rd, rr = ([la.ratio for la in res[e][1].layers] for e in ("diagonal", "rank1"))
        row = {"config": f"W{s.wbits} g{s.group_size} b_H {s.hbits} @ {s.avg_bits}",
               "term_ratio_min": float((r / d).min()), "term_ratio_max": float((r / d).max()),
               "log_corr": float(np.corrcoef(np.log(d), np.log(r))[0, 1]),
               "layers_differing": int(sum(a != b for a, b in zip(rd, rr))),
               "layers": len(names),
               "objective_rank1_vs_diagonal": float(diag_objective(res["rank1"][1])
                                                    / diag_objective(res["diagonal"][1])),
               "avg_bits": {e: res[e][1].avg_bits for e in res},
               "m_seconds": {e: round(res[e][2], 2) for e in res},
               "ratios": {"diagonal": rd, "rank1": rr}}
        rows.append(row)
        print(f"{row['config']}: rank1/diagonal terms {row['term_ratio_min']:.3f}–"
              f"{row['term_ratio_max']:.3f}, log corr {row['log_corr']:.6f}, "
              f"{row['layers_differing']} of {row['layers']} ratios differ, diagonal objective at "
              f"rank1's choice {row['objective_rank1_vs_diagonal']:.6f} of its optimum", flush=True)
    kept = {"diagonal_bytes": 4 * n_weights,
            "rank1_bytes": 8 * sum(a + b for a, b in shapes.values())}
    print(f"kept for M: diagonal {kept['diagonal_bytes'] / 2**20:.1f} MiB (F, float32), rank1 "
          f"{kept['rank1_bytes'] / 2**20:.3f} MiB (its margins, float64)")
    emit({"benchmark": "rank1_fisher", "quick": args.quick, "model": model_dir, "seed": args.seed,
          "calib": calib_settings, "stats_seconds": round(t_stats, 1), "rows": rows, **kept,
          **environment()})


if __name__ == "__main__":
    main()
