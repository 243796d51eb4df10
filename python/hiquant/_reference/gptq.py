"""GPTQ in float64 NumPy, written from the published algorithm (IST-DASLab/gptq, gptq.py) for the
tests: three factorizations as published (Cholesky, inverse from it, upper Cholesky of the
inverse), the block loop with in-block and lazy updates, parameters read from the global W as
gptq.py reads them. Independent of the C++ core (which uses a reversed Cholesky instead)."""

from __future__ import annotations

import numpy as np

from .lwc import fp16_round


def _params(vals, maxq, fp16_scales):
    lo = min(0.0, float(vals.min()))
    hi = max(0.0, float(vals.max()))
    if lo == 0.0 and hi == 0.0:
        lo, hi = -1.0, 1.0
    s = np.float32((hi - lo) / maxq)
    if fp16_scales:
        s = fp16_round(s)
    s = float(s)
    return s, float(np.clip(np.rint(-lo / s), 0, maxq))


def gptq(W, H, bits, group_size=None, percdamp=0.01, blocksize=128, act_order=False,
         fp16_scales=True, scale=None, zero=None, n_quant=None):
    """Returns dict(codes, scale, zero, wq, loss, perm) in the original column order. With
    ``scale``/``zero`` the group parameters are those (a fixed grid); with ``n_quant`` only the
    first ``n_quant`` columns are quantized, the others stay in H (and are updated, unused);
    ``act_order`` reorders the quantized columns only."""
    maxq = 2**bits - 1
    W0 = np.asarray(W, np.float32).astype(np.float64)
    rows, n = W0.shape
    nq = n_quant or n
    gs = group_size if group_size and 0 < group_size < nq else 0
    ng = -(-nq // gs) if gs else 1
    grid = scale is not None
    H = np.array(H, np.float64)
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    Wd = W0.copy()
    Wd[:, dead] = 0.0
    perm = np.arange(n)
    if act_order:  # only the quantized columns; the free ones keep their place after them
        perm[:nq] = np.argsort(-np.diag(H)[:nq], kind="stable")
    Wp = Wd[:, perm].copy()
    Hp = H[np.ix_(perm, perm)]
    damp = percdamp * np.mean(np.diag(Hp))
    Hp[np.diag_indices(n)] += damp
    L = np.linalg.cholesky(Hp)
    Linv = np.linalg.inv(L)
    Hinv = Linv.T @ Linv
    U = np.linalg.cholesky(Hinv).T  # upper

    if grid:
        grid_scale, grid_zero = np.asarray(scale, np.float64), np.asarray(zero, np.float64)
    scale = np.zeros((rows, ng), np.float32)
    zero = np.zeros((rows, ng), np.uint8)
    codes = np.zeros((rows, nq), np.uint8)
    wq = np.zeros((rows, nq), np.float64)

    def params(r, g, vals):
        if grid:
            return grid_scale[r, g], grid_zero[r, g]
        return _params(vals, maxq, fp16_scales)

    # every (row, group)'s parameters as formed; a column uses its own group's (with act_order
    # the groups' columns interleave in the loop)
    grp_s = np.zeros((rows, ng))
    grp_z = np.zeros((rows, ng))
    if not gs:
        for r in range(rows):
            grp_s[r, 0], grp_z[r, 0] = params(r, 0, W0[r, :nq])  # original row, as find_params(W)
            scale[r, 0], zero[r, 0] = grp_s[r, 0], grp_z[r, 0]
    pos = np.empty(n, np.int64)
    pos[perm] = np.arange(n)
    seen = set()
    loss = 0.0
    for i1 in range(0, nq, blocksize):
        i2 = min(i1 + blocksize, nq)
        W1 = Wp[:, i1:i2].copy()
        Err1 = np.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if gs and perm[col] // gs not in seen:
                g = perm[col] // gs
                seen.add(g)
                cols = pos[np.arange(g * gs, min(g * gs + gs, nq))]
                for r in range(rows):
                    grp_s[r, g], grp_z[r, g] = params(r, g, Wp[r, cols])  # global W
                    scale[r, g], zero[r, g] = grp_s[r, g], grp_z[r, g]
            w = W1[:, i]
            d = U[col, col]
            cg = perm[col] // gs if gs else 0
            cur_s, cur_z = grp_s[:, cg], grp_z[:, cg]
            q = np.clip(np.rint(np.clip(w / cur_s, -512, 512)) + cur_z, 0, maxq)
            dq = cur_s * (q - cur_z)
            codes[:, perm[col]] = q
            wq[:, perm[col]] = dq
            loss += float(((w - dq) ** 2 / d**2).sum())
            err = (w - dq) / d
            W1[:, i:] -= np.outer(err, U[col, i1 + i:i2])
            Err1[:, i] = err
        Wp[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return dict(codes=codes, scale=scale, zero=zero, wq=wq, loss=loss / 2, perm=perm, damp=damp)
