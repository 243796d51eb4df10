"""Float64 NumPy references for hiquant.allocate (independent of the C++ core).

* :func:`layer_cost_bits` — the storage cost of one layer, written from the specification
  (not from :mod:`hiquant.storage`), so tests can check the library's single cost function.
* :func:`iqp_objective` — δᵀMδ of a one-hot choice.
* :func:`brute_force` — exhaustive enumeration of every choice (itertools order), the ground
  truth the native solver is tested against on small instances.
* :func:`block_diagonal_dp` — exact optimum of larger block-diagonal instances with small
  integer costs, by a dynamic program over cost values (a method independent of the native
  Pareto-front knapsack).
* :func:`measured_sequential` — the measured sensitivity matrix by the plain loop (set one or two
  perturbed weights on the model, recompute the loss, restore), one evaluation at a time: what
  :func:`hiquant.allocate.sensitivity_matrix` computed before its evaluations were batched and run
  on worker threads, kept as the reference they are tested and benchmarked against. It computes
  in the model's dtype (float32), like the library.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

__all__ = ["n_groups", "layer_cost_bits", "iqp_objective", "brute_force", "BruteForce",
           "block_diagonal_dp", "measured_sequential"]


def n_groups(n: int, group_size: int) -> int:
    """Parameter groups of ``n`` columns: 0 if n == 0; 1 if g <= 0 or g >= n; else ceil(n/g)."""
    if n == 0:
        return 0
    if group_size <= 0 or group_size >= n:
        return 1
    return math.ceil(n / group_size)


def layer_cost_bits(d_out: int, d_in: int, k: int, b_low: int, b_high: int, group_size: int,
                    scale_bits: int = 16) -> int:
    """Bits of a layer with ``k`` high-impact columns (see hiquant.allocate.layer_cost_bits).
    8- or 6-bit scale codes: a float16 super-scale per block of max(1, 256 // n_groups) whole rows
    of every non-empty quantized part (the last block may be short)."""

    def super_bits(n_cols: int) -> int:
        if scale_bits == 16 or n_cols == 0:
            return 0
        rows = max(1, 256 // n_groups(n_cols, group_size))
        return 16 * math.ceil(d_out / rows)

    low = d_out * (d_in - k) * b_low + d_out * n_groups(d_in - k, group_size) * (scale_bits + b_low)
    low += super_bits(d_in - k)
    if b_high == 16:
        high = d_out * k * 16
    else:
        high = d_out * k * b_high + d_out * n_groups(k, group_size) * (scale_bits + b_high)
        high += super_bits(k)
    mask = d_in if k > 0 else 0
    return low + high + mask


def iqp_objective(M: np.ndarray, choice) -> float:
    """δᵀMδ for the one-hot δ selecting option ``choice[l]`` of layer ``l``."""
    M = np.asarray(M, np.float64)
    choice = np.asarray(choice, np.int64)
    K = M.shape[0] // choice.size
    v = np.arange(choice.size) * K + choice
    return float(M[np.ix_(v, v)].sum())


class BruteForce:
    """Result of :func:`brute_force`."""

    def __init__(self, objective, choices, cost, second, n_feasible, min_cost):
        self.objective = objective  # optimal δᵀMδ
        self.choices = choices  # (n_opt, L) every choice within `rtol` of the optimum
        self.cost = cost  # cost of choices[0]
        self.second = second  # best objective among the other, non-optimal feasible choices
        self.n_feasible = n_feasible
        self.min_cost = min_cost  # smallest feasible budget

    @property
    def unique(self) -> bool:
        return self.choices.shape[0] == 1


def brute_force(M: np.ndarray, costs: np.ndarray, budget: int, rtol: float = 1e-9) -> BruteForce:
    """Every one-hot choice enumerated (K**L of them; keep K**L below a few million).

    Returns the optimum of ``δᵀMδ`` subject to ``Σ cost <= budget``; ``choices`` lists all
    optimal choices (objective within ``rtol`` relative of the best). ``min_cost`` is the
    cheapest total; ``objective`` is ``inf`` and ``choices`` empty when nothing fits."""
    M = np.asarray(M, np.float64)
    costs = np.asarray(costs, np.int64)
    L, K = costs.shape
    combos = np.array(list(itertools.product(range(K), repeat=L)), np.int64).reshape(-1, L)
    V = combos + np.arange(L) * K
    total = costs[np.arange(L), combos].sum(axis=1)
    min_cost = int(costs.min(axis=1).sum())
    ok = total <= budget
    if not ok.any():
        return BruteForce(math.inf, np.zeros((0, L), np.int64), None, math.inf, 0, min_cost)
    V, combos, total = V[ok], combos[ok], total[ok]
    obj = np.empty(V.shape[0])
    for s in range(0, V.shape[0], 8192):  # chunks keep memory at 8192 * L * L
        Vs = V[s:s + 8192]
        obj[s:s + 8192] = M[Vs[:, :, None], Vs[:, None, :]].sum(axis=(1, 2))
    best = float(obj.min())
    near = obj <= best + rtol * max(abs(best), 1e-300)
    order = np.flatnonzero(near)
    rest = obj[~near]
    second = float(rest.min()) if rest.size else math.inf
    return BruteForce(best, combos[order], int(total[order[0]]), second, int(ok.sum()), min_cost)


def block_diagonal_dp(M: np.ndarray, costs: np.ndarray, budget: int, blocks) -> tuple[float, np.ndarray]:
    """Exact optimum of a block-diagonal instance by a different method than the native one:
    every block's combinations enumerated with itertools, then a dynamic program over integer
    cost values (``best[c]`` = lowest objective of the blocks so far at total cost exactly c).
    Only for small integer costs (the table has ``budget + 1`` entries). Returns
    ``(objective, choice)``; ``(inf, empty)`` when nothing fits."""
    M = np.asarray(M, np.float64)
    costs = np.asarray(costs, np.int64)
    L, K = costs.shape
    blocks = np.asarray(blocks)
    groups = [np.flatnonzero(blocks == b) for b in np.unique(blocks)]
    best = np.full(budget + 1, np.inf)
    best[0] = 0.0
    back = []  # per block: (table of chosen combo per cost, previous cost per cost)
    for layers in groups:
        combos = np.array(list(itertools.product(range(K), repeat=len(layers))), np.int64)
        V = combos + layers * K
        cc = costs[layers, combos].sum(axis=1)
        oo = M[V[:, :, None], V[:, None, :]].sum(axis=(1, 2))
        new = np.full(budget + 1, np.inf)
        pick = np.full(budget + 1, -1)
        prev = np.full(budget + 1, -1)
        for c0 in np.flatnonzero(np.isfinite(best)):
            for j in range(len(combos)):
                c1 = c0 + cc[j]
                if c1 <= budget and best[c0] + oo[j] < new[c1]:
                    new[c1], pick[c1], prev[c1] = best[c0] + oo[j], j, c0
        back.append((layers, combos, pick, prev))
        best = new
    if not np.isfinite(best).any():
        return math.inf, np.zeros(0, np.int64)
    c = int(np.argmin(best))
    obj = float(best[c])
    choice = np.zeros(L, np.int64)
    for layers, combos, pick, prev in reversed(back):
        choice[layers] = combos[pick[c]]
        c = int(prev[c])
    return obj, choice


def measured_sequential(model, ids: np.ndarray, names, deltas, pairs: bool = True) -> np.ndarray:
    """The measured M, ``(L·K, L·K)`` float64 over ``names`` × options, one evaluation at a time.

    ``deltas[name]``: the K option perturbations Δ of the layer (float32, its shape). An
    evaluation sets the perturbed weight(s) with ``model.set_weight``, runs the blocks from the
    perturbed one to the end on the cached block inputs and takes the mean per-sequence loss:
    ``M[i,i] = 2 (L_i − L_0)``, and for options of two layers of one block
    ``M[i,j] = M[j,i] = L_ij − L_i − L_j + L_0``; 0 across blocks. The model's weights are left
    as they were."""
    K = len(deltas[names[0]])
    L = len(names)
    block_of = {n: b for b in range(model.num_blocks) for n in model.block_linear_names(b)}
    h = model.embed(ids)
    h_in = []
    for b in range(model.num_blocks):
        h_in.append(h)
        h = model.block_forward(b, h)
    base = float(np.mean(model.head_loss(h, ids)))

    def loss_from(b):
        x = h_in[b]
        for i in range(b, model.num_blocks):
            x = model.block_forward(i, x)
        return float(np.mean(model.head_loss(x, ids)))

    was_set = set(model.modified_weights())
    W = {n: model.get_weight(n) for n in names}

    def restore(n):
        if n in was_set:
            model.set_weight(n, W[n])
        else:
            model.reset_weight(n)

    M = np.zeros((L * K, L * K), np.float64)
    single = {}
    try:
        for li, n in enumerate(names):
            for m in range(K):
                model.set_weight(n, W[n] + deltas[n][m])
                single[li, m] = loss_from(block_of[n])
                M[li * K + m, li * K + m] = 2.0 * (single[li, m] - base)
            restore(n)
        if pairs:
            for li, n in enumerate(names):
                for lj in range(li + 1, L):
                    n2 = names[lj]
                    if block_of[n2] != block_of[n]:
                        continue
                    for m in range(K):
                        model.set_weight(n, W[n] + deltas[n][m])
                        for m2 in range(K):
                            model.set_weight(n2, W[n2] + deltas[n2][m2])
                            v = loss_from(block_of[n]) - single[li, m] - single[lj, m2] + base
                            M[li * K + m, lj * K + m2] = M[lj * K + m2, li * K + m] = v
                    restore(n)
                    restore(n2)
    finally:
        for n in names:
            restore(n)
    return M
