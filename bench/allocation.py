"""Ratio allocation: the IQP solver at LLaMA-2-7B scale, and the three M estimators on a model.

Part 1 (always): synthetic instances with the shapes of LLaMA-2-7B (32 blocks x q,k,v,o 4096x4096,
gate/up 11008x4096, down 4096x11008; 5 candidate ratios, costs from the cost model):

* ``exact_7b``: a block-diagonal M (measured-like: per-layer sensitivities, cross terms inside a
  block) solved by the exact path, side by side with the general path on the same instance;
* ``general_1120``: a dense Fisher-like M (224 layers x 5 = 1,120 variables, a rank-128 Gram
  matrix), solved by the general path: objective, lower bound, gap;
* ``reference``: the native solver against the pure-NumPy brute force on an instance small
  enough to enumerate (same optimum, both timed).

Part 2 (``--model DIR --calib FILE``): Fisher statistics, the three M estimators (time to build
each), allocations at 2.3 average bits (b_L=2, b_H=3, g=64) and at a feasible budget, per-layer
ratios of each estimator, and the agreement of ``fisher`` with ``measured`` (Spearman rank
correlation of their diagonals, and of the chosen ratios).

    python bench/allocation.py [--quick] [--threads N]
        [--model /work/shared/bench/llama-bench --calib /work/shared/bench/corpus/calib.txt]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import hiquant  # noqa: E402
import hiquant.allocate as A  # noqa: E402
from _common import emit, environment, interleaved  # noqa: E402
from hiquant._reference import allocation as ref  # noqa: E402

SHAPES_7B = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]
NAMES_7B = ["q", "k", "v", "o", "gate", "up", "down"]


def llama7b_instance(n_blocks=32, *, dense_fisher=False, avg_bits=2.25, group_size=128, seed=0,
                     rank=128):
    """(M, costs, budget_bits, blocks, shapes) shaped like LLaMA-2-7B."""
    rng = np.random.default_rng(seed)
    shapes = {f"{b}.{n}": s for b in range(n_blocks) for n, s in zip(NAMES_7B, SHAPES_7B)}
    cand = A.DEFAULT_CANDIDATES
    costs = A.option_costs(shapes, cand, 2, 3, group_size)
    L, K = costs.shape
    n_weights = sum(a * b for a, b in shapes.values())
    # Diagonal: layer sensitivity (log-normal) x the error left when a fraction phi(beta) of the
    # Fisher mass is kept at 3 bits (error ~ 1/4.5 of the 2-bit one), phi concave in beta.
    sens = rng.lognormal(0.0, 1.0, L)
    expo = rng.uniform(0.3, 0.6, L)
    beta = np.array(cand)
    phi = beta[None, :] ** expo[:, None]
    d = (sens[:, None] * ((1 - phi) + phi / 4.5) * (1 + 0.02 * rng.normal(size=(L, K)))).ravel()
    blocks = np.repeat(np.arange(n_blocks), 7)
    if dense_fisher:
        # Fisher-like: a_{s,(l,m)} = sqrt(d) (shared per-layer direction + per-option part).
        U = rng.normal(size=(rank, L, 1))
        Wn = rng.normal(size=(rank, L, K))
        Amat = (np.sqrt(d.reshape(L, K))[None] * (np.sqrt(0.8) * U + np.sqrt(0.2) * Wn)).reshape(rank, -1)
        M = Amat.T @ Amat / rank
    else:
        M = np.diag(d)
        same = np.equal.outer(np.repeat(blocks, K), np.repeat(blocks, K))
        rho = rng.uniform(-0.3, 0.5, size=(L, L))
        rho = np.triu(rho, 1)
        rho = rho + rho.T
        C = np.repeat(np.repeat(rho, K, 0), K, 1) * np.sqrt(np.outer(d, d))
        C *= 1 + 0.05 * rng.normal(size=C.shape)
        C = (C + C.T) / 2
        own = np.equal.outer(np.repeat(np.arange(L), K), np.repeat(np.arange(L), K))
        M = np.where(same & ~own, C, 0.0) + np.diag(d)
    budget = int(math.floor(avg_bits * n_weights))
    return np.ascontiguousarray(M), costs, budget, blocks, shapes, n_weights


def spearman(a, b) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(x):
        x = np.asarray(x, np.float64)
        order = np.argsort(x, kind="stable")
        r = np.empty(x.size)
        r[order] = np.arange(x.size)
        # average ranks of ties
        _, inv, cnt = np.unique(x, return_inverse=True, return_counts=True)
        sums = np.zeros(cnt.size)
        np.add.at(sums, inv, r)
        return (sums / cnt)[inv]
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def part_solver(args, out: dict) -> None:
    reps = 2 if args.quick else 5
    nb = 32
    # --- exact path, 7B-shaped
    M, costs, budget, blocks, _, nw = llama7b_instance(nb, avg_bits=args.avg_bits_7b)
    print(f"LLaMA-2-7B-shaped block-diagonal instance: {costs.shape[0]} layers x {costs.shape[1]} "
          f"options, budget {budget / nw:.4f} bits/weight (min {costs.min(1).sum() / nw:.4f}, "
          f"max {costs.max(1).sum() / nw:.4f})")
    res = {}
    fns = {
        "exact": lambda: res.__setitem__("exact", A.solve(M, costs, budget, blocks=blocks)),
        "exact, 1 thread": lambda: res.__setitem__(
            "exact1", A.solve(M, costs, budget, blocks=blocks, n_threads=1)),
    }
    if not args.quick:
        fns["general (same instance)"] = lambda: res.__setitem__(
            "general", A.solve(M, costs, budget, method="general"))
    t = interleaved(fns, repeats=reps, warmup=1)
    ex = res["exact"]
    assert res["exact1"].choice.tolist() == ex.choice.tolist()
    print(f"{'solver':28s} {'min s':>8s} {'median s':>9s} {'objective':>14s} {'lower bound':>14s} status")
    for k, v in t.items():
        r = {"exact": ex, "exact, 1 thread": res["exact1"]}.get(k, res.get("general"))
        print(f"{k:28s} {v['min']:8.3f} {v['median']:9.3f} {r.objective:14.6f} {r.lower_bound:14.6f} "
              f"{r.status} ({r.method})")
    out["exact_7b_s"] = t["exact"]["min"]
    out["exact_7b_median_s"] = t["exact"]["median"]
    out["exact_7b_1thread_s"] = t["exact, 1 thread"]["min"]
    out["exact_7b_states"] = ex.nodes
    out["exact_7b_objective"] = ex.objective
    out["exact_7b_avg_bits"] = ex.cost_bits / nw
    if "general" in res:
        g = res["general"]
        out["general_on_7b_s"] = t["general (same instance)"]["min"]
        out["general_on_7b_objective"] = g.objective
        out["general_on_7b_excess"] = (g.objective - ex.objective) / abs(ex.objective)

    # --- general path, dense Fisher-like 1,120 variables
    Mf, costs_f, budget_f, _, _, nwf = llama7b_instance(nb, dense_fisher=True, avg_bits=args.avg_bits_7b,
                                                        seed=1)
    res = {}
    t = interleaved({"general": lambda: res.__setitem__("g", A.solve(Mf, costs_f, budget_f))},
                    repeats=max(1, reps - 2), warmup=0 if args.quick else 1)
    g = res["g"]
    print(f"\ndense Fisher-like instance ({Mf.shape[0]} variables, rank 128): {t['general']['min']:.3f} s "
          f"(median {t['general']['median']:.3f}); objective {g.objective:.6f}, lower bound "
          f"{g.lower_bound:.6f}, gap {100 * g.gap:.2f}% [{g.bound_method}], status {g.status}")
    out["general_1120_s"] = t["general"]["min"]
    out["general_1120_median_s"] = t["general"]["median"]
    out["general_gap"] = g.gap
    out["general_bound_method"] = g.bound_method
    out["general_1120_status"] = g.status

    # --- native vs the pure-NumPy brute force, on an instance it can enumerate
    rng = np.random.default_rng(3)
    L, K = (6, 4) if args.quick else (8, 4)
    X = rng.normal(size=(16, L * K))
    Ms = X.T @ X
    cs = rng.integers(100, 1000, size=(L, K)).astype(np.int64)
    bs = int((cs.min(1).sum() + cs.max(1).sum()) // 2)
    res = {}
    t = interleaved({
        "native (exact)": lambda: res.__setitem__("n", A.solve(Ms, cs, bs)),
        "reference brute force": lambda: res.__setitem__("r", ref.brute_force(Ms, cs, bs)),
    }, repeats=reps, warmup=1)
    assert abs(res["n"].objective - res["r"].objective) <= 1e-9 * max(1, abs(res["r"].objective))
    print(f"\nbrute-force check ({K}^{L} = {K ** L} choices, dense PSD M): native "
          f"{t['native (exact)']['min'] * 1e3:.2f} ms, "
          f"reference {t['reference brute force']['min'] * 1e3:.1f} ms, "
          f"same optimum {res['n'].objective:.6f}")
    out["reference_check"] = {"choices": K ** L, "native_s": t["native (exact)"]["min"],
                              "reference_s": t["reference brute force"]["min"],
                              "speedup": t["reference brute force"]["min"] / t["native (exact)"]["min"]}


def part_model(args, out: dict) -> None:
    from hiquant.calib import calibration_windows
    from hiquant.model import load_model
    from hiquant.stats import collect_stats

    model = load_model(args.model)
    names = model.linear_names()
    if args.quick:  # the last two blocks only: keeps the measured estimator to seconds
        names = [n for b in range(model.num_blocks - 2, model.num_blocks)
                 for n in model.block_linear_names(b)]
    shapes = {n: model.linear_shape(n) for n in names}
    nw = sum(a * b for a, b in shapes.values())
    n_calib, seqlen = (4, 128) if args.quick else (args.n_calib, args.seqlen)
    windows, _ = calibration_windows(model.tokenizer, args.calib, n=n_calib, seqlen=seqlen, seed=0)
    print(f"\nmodel {args.model}: {len(names)} linear layers, {nw} weights; {n_calib} calibration "
          f"windows x {seqlen} tokens")
    t0 = time.perf_counter()
    st = collect_stats(model, windows, gram=False, fisher=True, progress=False)
    t_stats = time.perf_counter() - t0
    print(f"Fisher statistics: {t_stats:.1f} s")
    kw = dict(candidates=A.DEFAULT_CANDIDATES, b_low=2, b_high=3, group_size=64, names=names)
    sms, times = {}, {}
    m_windows, m_seqlen = (1, 64) if args.quick else (args.m_windows, args.m_seqlen)
    pairs = not args.quick
    specs = {
        "diagonal": dict(estimator="diagonal", fisher=st.fisher),
        "fisher": dict(estimator="fisher", n_windows=n_calib),
        "measured": dict(estimator="measured", n_windows=m_windows, seqlen=m_seqlen, pairs=pairs),
    }
    specs = {e: v for e, v in specs.items() if e in args.estimators}
    for est, extra in specs.items():
        t0 = time.perf_counter()
        sms[est] = A.sensitivity_matrix(model, windows, fisher_col=st.fisher_col, **kw, **extra)
        times[est] = time.perf_counter() - t0
        print(f"M[{est}]: {times[est]:.1f} s  ({sms[est].settings})")

    sb = args.scale_bits
    costs = A.option_costs(shapes, A.DEFAULT_CANDIDATES, 2, 3, 64, scale_bits=sb)
    min_avg = costs.min(1).sum() / nw
    max_avg = costs.max(1).sum() / nw
    out["scale_bits"] = sb
    out["min_feasible_avg_bits"] = min_avg
    out["max_avg_bits"] = max_avg
    print(f"budget range with {sb}-bit scales, g=64: {min_avg:.5f} .. {max_avg:.5f} bits/weight")
    for sb in (16, 8, 6):
        for g in (64, 128):
            c = A.option_costs(shapes, A.DEFAULT_CANDIDATES, 2, 3, g, scale_bits=sb)
            out.setdefault("min_feasible_by_scale_bits_and_group", {})[f"s{sb}_g{g}"] = c.min(1).sum() / nw
    print("min feasible avg bits (scale bits, group):",
          {k: round(v, 5) for k, v in out["min_feasible_by_scale_bits_and_group"].items()})
    any_sm = next(iter(sms.values()))
    try:
        A.allocate(shapes, st.fisher_col, any_sm, avg_bits=2.3, scale_bits=sb)
        out["avg_2.3"] = "feasible"
    except hiquant.InfeasibleBudgetError as e:
        out["avg_2.3"] = f"infeasible (min_feasible {e.min_feasible:.6f})"
        print(f"avg_bits=2.3: InfeasibleBudgetError: {e}")
    budget = args.avg_bits
    if budget is None:  # the 2.3 where feasible, else midway in the feasible range
        budget = 2.3 if min_avg <= 2.3 <= max_avg else round(min_avg + 0.5 * (max_avg - min_avg), 4)
    out["feasible_budget_avg_bits"] = budget
    allocs = {}
    for est, sm in sms.items():
        allocs[est] = A.allocate(shapes, st.fisher_col, sm, avg_bits=budget, scale_bits=sb)
        r = allocs[est].result
        print(f"allocation[{est}] at {budget} bits: achieved {allocs[est].avg_bits:.5f}, {r.status} "
              f"({r.method}), gap {r.gap:.3g}, {r.seconds:.3f} s")
    print(f"\nper-layer ratios at {budget} avg bits")
    print(f"{'layer':36s}" + "".join(f"{e:>10s}" for e in sms))
    for n in names:
        print(f"{n:36s}" + "".join(f"{allocs[e].ratios[n]:10.2f}" for e in sms))
    dg = {e: sm.diagonal() for e, sm in sms.items()}
    ratios = {e: np.array([allocs[e].ratios[n] for n in names]) for e in sms}
    if "measured" in sms:
        # The measured diagonal is 2 (L(θ+Δ) − L(θ)) ≈ 2 gᵀΔ + ΔᵀHΔ: on a few windows the gradient
        # g of those windows is not 0; negative entries show the first-order term dominating.
        Mm = sms["measured"].M
        out["measured_negative_diag_fraction"] = float(np.mean(dg["measured"] < 0))
        out["measured_offdiag_to_diag_ratio"] = float(
            np.abs(Mm - np.diag(np.diag(Mm))).sum() / max(np.abs(np.diag(Mm)).sum(), 1e-300))
    agree = {}
    for a_, b_ in (("fisher", "measured"), ("diagonal", "measured"), ("fisher", "diagonal")):
        if a_ in sms and b_ in sms:
            agree[f"spearman_diag_{a_}_vs_{b_}"] = spearman(dg[a_].ravel(), dg[b_].ravel())
            agree[f"spearman_layer_sensitivity_{a_}_vs_{b_}"] = spearman(dg[a_][:, 0], dg[b_][:, 0])
            agree[f"spearman_choices_{a_}_vs_{b_}"] = spearman(ratios[a_], ratios[b_])
            agree[f"same_choice_fraction_{a_}_vs_{b_}"] = float(np.mean(ratios[a_] == ratios[b_]))
    print("\nagreement:", {k: round(v, 4) for k, v in agree.items()})
    out["estimators"] = {
        e: {"build_s": times[e], "settings": sms[e].settings,
            "ratios": [float(x) for x in ratios[e]],
            "objective": allocs[e].result.objective, "status": allocs[e].result.status,
            "gap": allocs[e].result.gap, "solve_s": allocs[e].result.seconds,
            "avg_bits": allocs[e].avg_bits}
        for e in sms}
    out["agreement"] = agree
    out["stats_s"] = t_stats


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats; small model settings")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--avg-bits-7b", type=float, default=2.25)
    ap.add_argument("--model", default=None)
    ap.add_argument("--calib", default=None)
    ap.add_argument("--n-calib", type=int, default=32, help="windows for Fisher stats and M[fisher]")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--m-windows", type=int, default=2, help="windows for M[measured]")
    ap.add_argument("--m-seqlen", type=int, default=256, help="tokens per window for M[measured]")
    ap.add_argument("--estimators", default="diagonal,fisher,measured",
                    help="comma-separated subset of diagonal,fisher,measured")
    ap.add_argument("--avg-bits", type=float, default=None,
                    help="the budget of part 2 (default: 2.3 where feasible, else midway in the "
                         "feasible range)")
    ap.add_argument("--scale-bits", type=int, default=8, choices=(16, 8, 6),
                    help="stored scale precision for the costs (8: 2.3 bits is feasible at W2 g64)")
    args = ap.parse_args(argv)
    args.estimators = [e.strip() for e in args.estimators.split(",") if e.strip()]
    if args.threads:
        hiquant.set_num_threads(args.threads)
    out = {"bench": "allocation", "quick": bool(args.quick)}
    part_solver(args, out)
    if args.model and args.calib:
        part_model(args, out)
    out.update(environment())
    emit(out)


if __name__ == "__main__":
    main()
