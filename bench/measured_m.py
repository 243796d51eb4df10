"""The measured sensitivity matrix: the old one-at-a-time loop against the batched, threaded one.

Side by side in one run, on the same model, windows and layers (``--blocks``: the layers of those
blocks; every evaluation still runs the blocks after them and the head):

* ``old``: :func:`hiquant._reference.allocation.measured_sequential`, the loop
  ``sensitivity_matrix`` ran before (``set_weight``, recompute blocks b.., restore), with NumPy's
  BLAS as the caller has it (threaded);
* ``old, BLAS 1``: the same loop with single-threaded BLAS (separates the BLAS-threading effect
  from the rest);
* ``new``: ``sensitivity_matrix(estimator="measured")`` on 1 and on ``--threads`` workers, default
  ``eval_batch`` and ``--batch``.

Per variant: seconds, seconds per evaluation, speedup over ``old``, and max |M − M_old| / L0.
Then the cost model ``t_eval(b) = (B − b)·t_block + t_head`` with t_block and t_head measured
here (one worker, single-threaded BLAS, n_windows × seqlen tokens), and the whole model's
predicted time for singles and pairs (``hiquant.allocate.measured_evaluations`` evaluations).

    python bench/measured_m.py --quick                       # CI: the embedded tiny model
    python bench/measured_m.py --quick --backend torch       # the torch runtime's variants
    nice -n 10 python bench/measured_m.py --model /work/shared/bench/llama-bench \\
        --calib /work/shared/bench/corpus/calib.txt --m-windows 4 --seqlen 512 --blocks 7
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import hiquant  # noqa: E402
import hiquant.allocate as A  # noqa: E402
from _common import emit, environment  # noqa: E402
from hiquant import calib as C  # noqa: E402
from hiquant._reference import allocation as ref  # noqa: E402
from hiquant._threads import single_threaded_blas  # noqa: E402
from hiquant.model import load_model  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the embedded tiny model, seconds")
    ap.add_argument("--model")
    ap.add_argument("--calib")
    ap.add_argument("--m-windows", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--blocks", type=int, nargs="+", default=None,
                    help="evaluate the layers of these blocks (default: the last)")
    ap.add_argument("--pairs", action="store_true", help="include the same-block pairs")
    ap.add_argument("--threads", type=int, default=None, help="workers (default: hiquant's)")
    ap.add_argument("--batch", type=int, default=4, help="a second eval_batch to time")
    ap.add_argument("--backend", choices=("numpy", "torch"), default="numpy",
                    help="the runtime; torch: the old loop, the estimator's set_weight fallback "
                         "(a layer rebuilt per evaluation) and its per-call weights= path")
    a = ap.parse_args(argv)
    if a.quick or a.model is None:
        from hiquant.datasets import embedded_calib_path, embedded_model_path
        a.model, a.calib = str(embedded_model_path()), str(embedded_calib_path())
        if a.quick:
            a.m_windows, a.seqlen = 2, 64
    threads = a.threads or hiquant.get_num_threads()
    if a.backend == "torch":
        from hiquant.torch_runtime import load_torch_model
        model = load_torch_model(a.model)
    else:
        model = load_model(a.model)
    B = model.num_blocks
    blocks = a.blocks if a.blocks is not None else [B - 1]
    names = [n for b in blocks for n in model.block_linear_names(b)]
    ids = C.tokenize_text(model.tokenizer, C.load_text(a.calib),
                          max_tokens=a.m_windows * a.seqlen)[:a.m_windows * a.seqlen]
    ids = np.asarray(ids, np.int64).reshape(a.m_windows, a.seqlen)
    rng = np.random.default_rng(0)  # column scores only choose which columns are "high"
    fc = {n: rng.random(model.linear_shape(n)[1]) for n in names}
    cand, g = A.DEFAULT_CANDIDATES, 64
    K = len(cand)
    E = A.measured_evaluations([len(model.block_linear_names(b)) for b in blocks], K, a.pairs)

    def deltas():
        return {n: A.option_deltas(model.get_weight(n), fc[n], cand, 2, 3, g) for n in names}

    # The option deltas (RTN of each split, C++ kernels) are computed once and timed apart:
    # sensitivity_matrix's own calls get them from this table, so that every variant times the
    # loss evaluations only (small OpenMP kernels are very noisy on a loaded 2-core machine).
    t0 = time.perf_counter()
    D = deltas()
    t_deltas = time.perf_counter() - t0
    by_scores = {id(fc[n]): D[n] for n in names}
    real_option_deltas = A.option_deltas
    A.option_deltas = lambda W, scores, *rest, **kw: by_scores[id(scores)]

    def old():
        return ref.measured_sequential(model, ids, names, D, a.pairs)

    def old_blas1():
        with single_threaded_blas():
            return old()

    def new(workers, batch):
        return lambda: A.sensitivity_matrix(model, ids, estimator="measured", fisher_col=fc,
                                            candidates=cand, group_size=g, names=names,
                                            pairs=a.pairs, n_threads=workers,
                                            eval_batch=batch).M

    variants = {"old": old, "old, BLAS 1": old_blas1, "new, 1 worker": new(1, None),
                f"new, {threads} workers": new(threads, None),
                f"new, {threads} workers, batch {a.batch}": new(threads, a.batch)}
    if a.backend == "torch":
        class NoOverrides:  # the runtime as it was before block_forward took weights=
            def __getattr__(self, name):
                return getattr(model, name)

            def block_forward(self, i, h, *, cache=False, capture=None):
                return model.block_forward(i, h, cache=cache, capture=capture)

        def fallback():
            return A.sensitivity_matrix(NoOverrides(), ids, estimator="measured", fisher_col=fc,
                                        candidates=cand, group_size=g, names=names,
                                        pairs=a.pairs, n_threads=threads).M

        variants = {"old": old, "set_weight fallback": fallback, "new, 1 worker": new(1, None),
                    f"new, {threads} workers": new(threads, None)}
    repeats = 3 if a.quick else 1
    times = {k: [] for k in variants}
    Ms = {}
    for _ in range(repeats):  # side by side: each round runs every variant once, in turn
        for k, f in variants.items():
            t0 = time.perf_counter()
            Ms[k] = f()
            times[k].append(time.perf_counter() - t0)
    A.option_deltas = real_option_deltas
    best = {k: min(v) for k, v in times.items()}
    L0 = float(np.mean(model.sequence_losses(ids)))

    # cost model: one block and the head on n_windows x seqlen tokens (1 worker, BLAS 1)
    h = model.embed(ids)
    with single_threaded_blas():
        tb, th = [], []
        for _ in range(3):
            t0 = time.perf_counter()
            x = model.block_forward(B - 1, h)
            tb.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            model.head_loss(x, ids)
            th.append(time.perf_counter() - t0)
    t_block, t_head = min(tb), min(th)
    per_block = [len(model.block_linear_names(b)) for b in range(B)]

    def predict(pairs):
        per_eval = [(B - b) * t_block + t_head for b in range(B)]
        n = [A.measured_evaluations([per_block[b]], K, pairs) for b in range(B)]
        return sum(x * y for x, y in zip(n, per_eval)), sum(n)

    single_s, single_n = predict(False)
    pair_s, pair_n = predict(True)

    print(f"model {a.model}: {B} blocks; layers of blocks {blocks}, K={K}, "
          f"{'singles and pairs' if a.pairs else 'singles'}: {E} evaluations on "
          f"{a.m_windows} x {a.seqlen} tokens; L0 = {L0:.4f}")
    print(f"{'variant':32s} {'seconds':>9s} {'s/eval':>9s} {'speedup':>8s} {'max|dM|/L0':>11s}")
    rows = {}
    for k in variants:
        dm = float(np.abs(Ms[k] - Ms["old"]).max()) / L0
        rows[k] = {"seconds": best[k], "s_per_eval": best[k] / E,
                   "speedup": best["old"] / best[k], "max_dM_over_L0": dm}
        print(f"{k:32s} {best[k]:9.2f} {best[k] / E:9.4f} {best['old'] / best[k]:8.2f} {dm:11.2e}")
    print(f"(the option deltas of these layers, computed once outside the timings: "
          f"{t_deltas:.2f} s)")
    print(f"cost model (1 worker): t_block {t_block:.4f} s, t_head {t_head:.4f} s; whole model: "
          f"singles {single_n} evaluations ~ {single_s:.0f} s, with pairs {pair_n} ~ {pair_s:.0f} s "
          f"(divide by the workers' speedup on this machine)")
    emit({"bench": "measured_m", "backend": a.backend, "model": a.model, "blocks": blocks,
          "n_windows": a.m_windows,
          "seqlen": a.seqlen, "pairs": a.pairs, "evaluations": E, "L0": L0, "variants": rows,
          "deltas_seconds": t_deltas,
          "t_block": t_block, "t_head": t_head,
          "predicted_1_worker": {"singles": [single_n, single_s], "pairs": [pair_n, pair_s]},
          **environment(), "threads": threads})


if __name__ == "__main__":
    main()
