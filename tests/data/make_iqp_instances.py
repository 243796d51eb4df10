"""Regenerate the brute-force-solved IQP instances in this folder (deterministic):

    python tests/data/make_iqp_instances.py

``iqp_block_diagonal.npz`` — block-diagonal M (the exact path); ``iqp_dense.npz`` — dense M, PSD
(Fisher-like Gram matrices) and indefinite (the general path). Each instance ``iNNN_`` stores
``M`` (float64), ``costs`` (int64), ``budget``, ``blocks`` (block id per layer; all zero for
dense instances), and the brute-force answer: ``objective``, ``choice`` (the first optimal
choice in itertools order), ``unique`` (a single optimal choice, with a margin of at least 1e-6
relative to the runner-up), ``min_cost``. Solved by ``hiquant._reference.allocation.brute_force``
(pure NumPy/itertools: it never imports the native core).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "python"))
from hiquant._reference.allocation import brute_force, layer_cost_bits  # noqa: E402


def _costs(rng, L, K, kind):
    if kind == "model":  # cost-model costs of small layers, ratios like the defaults
        betas = np.sort(rng.choice([0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5], K, replace=False))
        g = int(rng.choice([0, 8, 16]))
        bl, bh = int(rng.choice([2, 3])), int(rng.choice([3, 4, 16]))
        out = []
        for _ in range(L):
            do, di = int(rng.choice([8, 16, 24])), int(rng.choice([16, 32, 48]))
            out.append([layer_cost_bits(do, di, math.ceil(b * di), bl, bh, g) for b in betas])
        return np.array(out, np.int64)
    return rng.integers(0, 30, size=(L, K)).astype(np.int64)


def _M(rng, L, K, kind):
    n = L * K
    if kind == "psd":
        A = rng.normal(size=(int(rng.integers(2, 10)), n)) * rng.lognormal(0, 1, n)
        return A.T @ A
    if kind == "sens":  # decreasing diagonal per layer, correlated cross terms (measured-like)
        d = np.concatenate([np.sort(rng.lognormal(0, 1, K))[::-1] for _ in range(L)])
        C = rng.uniform(-0.4, 0.6, size=(n, n))
        M = C * np.sqrt(np.outer(d, d))
        M = (M + M.T) / 2
        np.fill_diagonal(M, d)
        return M
    M = rng.normal(size=(n, n))
    return (M + M.T) / 2


def make(seed: int, dense: bool, count: int) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(count):
        L = int(rng.integers(1, 8))
        K = int(rng.integers(1, 5))
        while K ** L > 20000:
            L -= 1
        M = _M(rng, L, K, ["psd", "sens", "indefinite"][i % 3])
        if dense:
            blocks = np.zeros(L, np.int64)
        else:
            blocks = np.sort(rng.integers(0, max(1, L // 2) + 1, L)).astype(np.int64)
            M = M * np.equal.outer(np.repeat(blocks, K), np.repeat(blocks, K))
        costs = _costs(rng, L, K, "model" if i % 2 else "int")
        lo, hi = int(costs.min(1).sum()), int(costs.max(1).sum())
        budget = [lo, hi, int(rng.integers(lo, hi + 1)), (lo + hi) // 2][i % 4]
        bf = brute_force(M, costs, budget)
        margin = bf.second - bf.objective
        unique = bf.unique and margin > 1e-6 * max(1.0, abs(bf.objective))
        p = f"i{i:03d}_"
        out.update({p + "M": np.ascontiguousarray(M), p + "costs": costs,
                    p + "budget": np.int64(budget), p + "blocks": blocks,
                    p + "objective": np.float64(bf.objective), p + "choice": bf.choices[0],
                    p + "unique": np.bool_(unique), p + "min_cost": np.int64(bf.min_cost)})
    return out


def main():
    np.savez_compressed(HERE / "iqp_block_diagonal.npz", **make(20240601, dense=False, count=60))
    np.savez_compressed(HERE / "iqp_dense.npz", **make(20240602, dense=True, count=60))


if __name__ == "__main__":
    main()
