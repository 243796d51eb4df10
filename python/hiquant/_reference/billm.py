"""BiLLM in float64 NumPy with plain loops, written from the paper (Huang et al., 2024) for the
tests: the core step per block (Hessian-weighted column scores, the salient count searched by
direct evaluation, the residual approximation, the break point by brute force over every candidate)
and the GPTQ-style sweep. Independent of :mod:`hiquant.methods.billm` (no prefix sums, no sorting
tricks: every candidate's error is computed from its definition)."""

from __future__ import annotations

import math

import numpy as np

MAX_SALIENT_FRACTION = 0.4


def _sgn(x: float) -> float:
    return 1.0 if x >= 0 else -1.0


def residual_row(x):
    """(α₁, α₂, error) of the residual approximation of one row's values ``x``."""
    x = [float(v) for v in x]
    n = len(x)
    if n == 0:
        return 0.0, 0.0, 0.0
    a1 = sum(abs(v) for v in x) / n
    r = [v - a1 * _sgn(v) for v in x]
    a2 = sum(abs(v) for v in r) / n
    err = sum((ri - a2 * _sgn(ri)) ** 2 for ri in r)
    return a1, a2, err


def split_row(x):
    """(p, α_c, α_s, error): the break point with the smallest error over p ∈ {−∞} ∪ {|x_j|},
    concentrated |x| ≤ p, sparse |x| > p, α = mean |x| of each group (the smallest p among ties)."""
    mags = [abs(float(v)) for v in x]
    best = None
    for p in [-math.inf] + sorted(set(mags)):
        conc = [v for v in mags if v <= p]
        spr = [v for v in mags if v > p]
        ac = sum(conc) / len(conc) if conc else 0.0
        asp = sum(spr) / len(spr) if spr else 0.0
        err = sum((v - ac) ** 2 for v in conc) + sum((v - asp) ** 2 for v in spr)
        if best is None or err < best[3]:
            best = (p, ac, asp, err)
    return best


def block_params(Wb, hinv_diag):
    """(salient mask (m,), α (d_out, 4) [α₁, α₂, α_c, α_s], p (d_out,), errors per k)."""
    Wb = np.asarray(Wb, np.float64)
    d_out, m = Wb.shape
    score = [sum(Wb[i, j] ** 2 for i in range(d_out)) / float(hinv_diag[j]) ** 2
             for j in range(m)]
    order = sorted(range(m), key=lambda j: (-score[j], j))
    K = max(0, min(m - 1, int(math.floor(MAX_SALIENT_FRACTION * m))))
    errors = []
    for k in range(K + 1):
        sal = set(order[:k])
        e = 0.0
        for i in range(d_out):
            e += residual_row([Wb[i, j] for j in range(m) if j in sal])[2]
            e += split_row([Wb[i, j] for j in range(m) if j not in sal])[3]
        errors.append(e)
    k = min(range(K + 1), key=lambda kk: (errors[kk], kk))
    sal = set(order[:k])
    mask = np.array([j in sal for j in range(m)])
    alpha = np.zeros((d_out, 4))
    p = np.zeros(d_out)
    for i in range(d_out):
        alpha[i, 0], alpha[i, 1], _ = residual_row([Wb[i, j] for j in range(m) if j in sal])
        p[i], alpha[i, 2], alpha[i, 3], _ = split_row([Wb[i, j] for j in range(m) if j not in sal])
    return mask, alpha, p, np.array(errors)


def billm(W, G, block_size=128, percdamp=0.01):
    """The whole layer: dict(wq (d_out, d_in) float64, salient (d_in,), alpha (d_out, n_blocks, 4)
    float16, sign, sign2_full, sparse_full (bool (d_out, d_in); sign2 only meaningful on salient
    columns, sparse on the others))."""
    W = np.asarray(W, np.float32).astype(np.float64)
    d_out, d_in = W.shape
    H = np.array(G, np.float64)
    for j in range(d_in):
        if H[j, j] == 0:
            H[j, j] = 1.0
            W[:, j] = 0.0
    damp = percdamp * float(np.mean(np.diag(H)))
    for j in range(d_in):
        H[j, j] += damp
    Hinv = np.linalg.inv(H)
    Hinv = 0.5 * (Hinv + Hinv.T)
    U = np.linalg.cholesky(Hinv).T
    nb = -(-d_in // block_size)
    wq = np.zeros((d_out, d_in))
    salient = np.zeros(d_in, bool)
    alpha16 = np.zeros((d_out, nb, 4), np.float16)
    sign = np.zeros((d_out, d_in), bool)
    sign2 = np.zeros((d_out, d_in), bool)
    sparse = np.zeros((d_out, d_in), bool)
    for b in range(nb):
        i1, i2 = b * block_size, min((b + 1) * block_size, d_in)
        mask, alpha, p, _ = block_params(W[:, i1:i2], [Hinv[j, j] for j in range(i1, i2)])
        a = np.minimum(alpha, float(np.finfo(np.float16).max)).astype(np.float16)
        alpha16[:, b] = a
        a = a.astype(np.float64)
        salient[i1:i2] = mask
        for c in range(i1, i2):
            for i in range(d_out):
                w = W[i, c]
                s1 = _sgn(w)
                if mask[c - i1]:
                    s2 = _sgn(w - a[i, 0] * s1)
                    q = a[i, 0] * s1 + a[i, 1] * s2
                    sign2[i, c] = s2 > 0
                else:
                    sp = abs(w) > p[i]
                    q = (a[i, 3] if sp else a[i, 2]) * s1
                    sparse[i, c] = sp
                sign[i, c] = s1 > 0
                wq[i, c] = q
                err = (w - q) / U[c, c]
                for c2 in range(c + 1, d_in):  # in-block and later columns alike (OBS update)
                    W[i, c2] -= err * U[c, c2]
    return dict(wq=wq, salient=salient, alpha=alpha16, sign=sign, sign2_full=sign2,
                sparse_full=sparse)
