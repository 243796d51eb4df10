"""BiLLM (Huang et al., 2024, "BiLLM: Pushing the Limit of Post-Training Quantization for LLMs"):
binarization of every weight, with a GPTQ/OBC-style error-compensating sweep.

Per layer, with the Hessian ``H ∝ X Xᵀ`` (hiquant's Gram of the calibration inputs, damped by
``gptq_percdamp`` as GPTQ damps it) and the upper Cholesky factor ``U`` of ``H⁻¹``, the columns are
processed in blocks of ``block_size`` (the run's ``group_size``; the paper's 128). For each block,
on its current (already compensated) weights ``W_b``, the **core step** (:func:`block_params`):

1. salient columns, chosen structurally: the score of column j is ``s_j = Σ_i w_ij² / [H⁻¹]_jj²``;
   the ``k`` best-scored columns are salient, with ``k`` searched over ``0..K``
   (``K = min(m - 1, ⌊MAX_SALIENT_FRACTION · m⌋)`` for a block of ``m`` columns) to minimize the
   block's binarization error (the salient part's residual error plus the non-salient part's error
   at its best break points, step 3);
2. salient weights: the **residual approximation** per row, ``α₁·sign(w) + α₂·sign(r)`` with
   ``r = w − α₁·sign(w)``, ``α₁ = mean |w|`` and ``α₂ = mean |r|`` over the row's salient weights
   of the block (each the least-squares optimum of its stage), i.e. two sign bits;
3. non-salient weights: per row a **break point** ``p`` splits them into a concentrated group
   ``|w| ≤ p`` and a sparse group ``|w| > p``, each binarized with its own ``α = mean |w|``;
   ``p`` minimizes the row's squared error exactly over every candidate (−∞ and each of the row's
   non-salient ``|w|``; prefix sums over the sorted magnitudes). The paper searches one ``p`` per
   block (the authors' code: 81 percentiles); ``p`` is not stored (the membership bitmap is), so the
   per-row optimum costs nothing and its error is never higher.

The α's are rounded to float16 (what is stored), then the block is swept column by column as GPTQ
sweeps: each column is binarized with the block's fixed salient set, α's and break points (signs and
memberships from the compensated weights), its error ``(w − q) / U_jj`` is propagated to the
block's later columns and, after the block, to the rest of the layer. The paper, like its code,
uses no mean offset (the authors' code also subtracts a per-row mean per group, which would cost
another float16 per group).

**Bits.** hiquant stores, exactly (:class:`hiquant.storage.BinaryPart`,
:func:`hiquant.storage.binary_storage_bits`): one sign bit per weight, a second sign bit per
salient weight, one concentrated/sparse membership bit per non-salient weight, the ``d_in``-bit
salient-column mask, and per row two float16 α's per block (α_c, α_s) plus two (α₁, α₂) per block
holding salient columns — 2 bits per weight plus ``32·(n_blocks + n_salient_blocks) / d_in`` per
row, about 2.5 bits per weight at blocks of 128. BiLLM's reported ~1.08–1.1 bits count the sign
bits and the salient columns' second bit (1 + the salient fraction); they leave out the membership
bitmap of the non-salient weights and the per-row α's.

A float64 plain-loop twin of the core step and of the sweep is :mod:`hiquant._reference.billm`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidArgumentError, InvalidTypeError, NumericalError
from ..storage import BinaryPart, QuantizedLayer

__all__ = ["MAX_SALIENT_FRACTION", "salient_scores", "salient_order", "max_salient",
           "residual_alphas", "split_search", "block_params", "BlockParams", "binarize",
           "BinarizeResult", "quantize"]

MAX_SALIENT_FRACTION = 0.4  # the salient-column search tries k = 0..⌊0.4·m⌋ (at most m − 1)

FP16_MAX = float(np.finfo(np.float16).max)


def _fp16(a: np.ndarray) -> np.ndarray:
    """α's as stored: float16 (non-negative, capped at float16's largest value), back in float64."""
    return np.minimum(np.asarray(a, np.float64), FP16_MAX).astype(np.float16).astype(np.float64)


def salient_scores(Wb: np.ndarray, hinv_diag: np.ndarray) -> np.ndarray:
    """Column scores ``s_j = Σ_i w_ij² / [H⁻¹]_jj²`` (float64 ``(m,)``)."""
    Wb = np.asarray(Wb, np.float64)
    return (Wb * Wb).sum(axis=0) / np.asarray(hinv_diag, np.float64) ** 2


def salient_order(scores: np.ndarray) -> np.ndarray:
    """Columns by descending score, ties by ascending index."""
    return np.argsort(-np.asarray(scores, np.float64), kind="stable")


def max_salient(m: int) -> int:
    """The largest salient count tried in a block of ``m`` columns."""
    return max(0, min(m - 1, int(math.floor(MAX_SALIENT_FRACTION * m))))


def residual_alphas(X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The residual approximation of each row of ``X`` ``(d_out, n)``: ``(α₁, α₂, error)``, each
    ``(d_out,)``; ``error`` = the row's squared error. Zeros for ``n == 0``."""
    X = np.asarray(X, np.float64)
    d_out, n = X.shape
    if n == 0:
        z = np.zeros(d_out)
        return z, z.copy(), z.copy()
    A = np.abs(X)
    a1 = A.mean(axis=1)
    R = np.abs(A - a1[:, None])  # |w − α₁·sign(w)|
    a2 = R.mean(axis=1)
    return a1, a2, ((R - a2[:, None]) ** 2).sum(axis=1)


def _split_sorted(a: np.ndarray, keep: np.ndarray, ties: bool = True):
    """Best break point per row over the kept entries of ``a`` (each row sorted ascending).
    Returns (explained, p, α_c, α_s): the row's error is ``Σ kept a² − explained``. ``ties``:
    whether a row may hold equal values (False skips their handling)."""
    w = np.where(keep, a, 0.0)
    cs = np.cumsum(w, axis=1)
    cn = np.cumsum(keep, axis=1)
    T, n = cs[:, -1], cn[:, -1]
    valid = keep
    if ties:
        # a split after position i is realizable by |w| <= a_i only when the next kept value is
        # larger
        nxt = np.minimum.accumulate(np.where(keep, a, np.inf)[:, ::-1], axis=1)[:, ::-1]
        nxt = np.concatenate([nxt[:, 1:], np.full((a.shape[0], 1), np.inf)], axis=1)
        valid = keep & (nxt > a)
    rest = n[:, None] - cn
    with np.errstate(divide="ignore", invalid="ignore"):
        e = np.where(valid, cs * cs / np.maximum(cn, 1)
                     + np.where(rest > 0, (T[:, None] - cs) ** 2 / np.maximum(rest, 1), 0.0),
                     -np.inf)
        e0 = np.where(n > 0, T * T / np.maximum(n, 1), 0.0)  # p = −∞: everything sparse
    i = np.argmax(e, axis=1)
    rows = np.arange(a.shape[0])
    best = e[rows, i]
    use0 = e0 >= best  # the first candidate (−∞) wins ties
    explained = np.where(use0, e0, best)
    t = np.where(use0, 0, cn[rows, i])
    C = np.where(use0, 0.0, cs[rows, i])
    p = np.where(use0, -np.inf, a[rows, i])
    ac = np.where(t > 0, C / np.maximum(t, 1), 0.0)
    asp = np.where(n - t > 0, (T - C) / np.maximum(n - t, 1), 0.0)
    return explained, p, ac, asp


def split_search(X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The break point of each row of ``X`` ``(d_out, n)``: ``(p, α_c, α_s, error)``, each
    ``(d_out,)``. Concentrated: ``|w| ≤ p``, sparse: ``|w| > p``; ``p`` minimizes
    ``Σ_conc (|w| − α_c)² + Σ_sparse (|w| − α_s)²`` with ``α = mean |w|`` of each group, over
    ``p ∈ {−∞} ∪ {|w_j|}`` (the smallest such ``p`` among equal errors)."""
    X = np.asarray(X, np.float64)
    a = np.sort(np.abs(X), axis=1)
    keep = np.ones(a.shape, bool)
    explained, p, ac, asp = _split_sorted(a, keep)
    return p, ac, asp, np.maximum((a * a).sum(axis=1) - explained, 0.0)


@dataclass
class BlockParams:
    """The core step's result for one block of ``m`` columns."""

    salient: np.ndarray  # bool (m,)
    alpha: np.ndarray  # float64 (d_out, 4): α₁, α₂, α_c, α_s (not yet rounded to float16)
    p: np.ndarray  # float64 (d_out,): break points (−inf: every non-salient weight is sparse)
    error: float  # the block's binarization error at the chosen k (float α's)
    errors: np.ndarray  # float64 (K + 1,): the error of every salient count tried


def block_params(Wb: np.ndarray, hinv_diag: np.ndarray) -> BlockParams:
    """BiLLM's core step on one block ``Wb`` ``(d_out, m)`` (see the module docstring)."""
    Wb = np.asarray(Wb, np.float64)
    d_out, m = Wb.shape
    order = salient_order(salient_scores(Wb, hinv_diag))
    A = np.abs(Wb)
    srt = np.argsort(A, axis=1, kind="stable")
    a = np.take_along_axis(A, srt, axis=1)
    a2 = a * a
    ties = bool((np.diff(a, axis=1) == 0).any())
    K = max_salient(m)
    errors = np.empty(K + 1)
    for k in range(K + 1):
        is_sal = np.zeros(m, bool)
        is_sal[order[:k]] = True
        e_s = residual_alphas(Wb[:, np.sort(order[:k])])[2].sum()
        keep = ~is_sal[srt]
        explained = _split_sorted(a, keep, ties)[0]
        e_n = np.maximum((a2 * keep).sum(axis=1) - explained, 0.0).sum()
        errors[k] = e_s + e_n
    k = int(np.argmin(errors))
    is_sal = np.zeros(m, bool)
    is_sal[order[:k]] = True
    a1, a2s, _ = residual_alphas(Wb[:, is_sal])
    _, p, ac, asp = _split_sorted(a, ~is_sal[srt])
    return BlockParams(is_sal, np.stack([a1, a2s, ac, asp], axis=1), p, float(errors[k]), errors)


@dataclass
class BinarizeResult:
    part: BinaryPart
    wq: np.ndarray  # float64 (d_out, d_in): the binarized weights as the sweep formed them
    loss: float  # GPTQ's loss estimate Σ (w − q)² / U_jj² / 2
    n_salient: int


def _inverse_factor(G: np.ndarray, percdamp: float, W: np.ndarray):
    """(W with dead columns zeroed, diag(H⁻¹), upper Cholesky factor of H⁻¹) for the damped H."""
    H = np.array(G, np.float64)
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H[np.diag_indices_from(H)] += percdamp * np.mean(np.diag(H))
    try:
        L = np.linalg.cholesky(H)
        Linv = np.linalg.inv(L)
        Hinv = Linv.T @ Linv
        U = np.linalg.cholesky(Hinv).T
    except np.linalg.LinAlgError:
        raise NumericalError("billm: the damped Gram matrix is not positive definite; raise "
                             "gptq_percdamp (e.g. 0.1) or use more calibration data") from None
    return np.diag(Hinv).copy(), U


def binarize(W: np.ndarray, gram: np.ndarray, block_size: int = 128,
             percdamp: float = 0.01) -> BinarizeResult:
    """BiLLM on one layer: ``W`` float32 ``(d_out, d_in)``, ``gram`` float64 ``(d_in, d_in)``
    (the layer's ``Σ x xᵀ``), blocks of ``block_size`` columns, damping ``percdamp``."""
    if not isinstance(W, np.ndarray) or W.dtype != np.float32:
        raise InvalidTypeError(f"W must be a float32 numpy array, got "
                               f"{getattr(W, 'dtype', type(W).__name__)}")
    if W.ndim != 2 or 0 in W.shape:
        raise InvalidArgumentError(f"W must be a non-empty 2-D (d_out, d_in) array, got shape "
                                   f"{W.shape}")
    if not isinstance(gram, np.ndarray) or gram.dtype != np.float64:
        raise InvalidTypeError(f"gram must be a float64 numpy array, got "
                               f"{getattr(gram, 'dtype', type(gram).__name__)}")
    d_out, d_in = W.shape
    if gram.shape != (d_in, d_in):
        raise InvalidArgumentError(f"W has shape {W.shape} but gram has {gram.shape}; pass the "
                                   f"Gram matrix of the same layer's inputs ({d_in}, {d_in})")
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) \
            or block_size < 1:
        raise InvalidArgumentError(f"billm binarizes in blocks of columns: block_size must be a "
                                   f"positive int (the paper's 128), got {block_size!r}")
    if not np.isfinite(W).all():
        raise NumericalError("billm: W holds NaN or Inf")
    if not np.isfinite(gram).all():
        raise NumericalError("billm: the Gram matrix holds NaN or Inf")
    Wd = W.astype(np.float64)
    hdiag, U = _inverse_factor(gram, percdamp, Wd)
    bs = int(block_size)
    nb = -(-d_in // bs)
    salient = np.zeros(d_in, bool)
    sign = np.zeros((d_out, d_in), bool)
    sign2 = np.zeros((d_out, d_in), bool)  # kept for the salient columns below
    sparse = np.zeros((d_out, d_in), bool)  # kept for the other columns below
    alpha = np.zeros((d_out, nb, 4), np.float16)
    Q = np.empty((d_out, d_in))
    loss = 0.0
    for b, i1 in enumerate(range(0, d_in, bs)):
        i2 = min(i1 + bs, d_in)
        W1 = Wd[:, i1:i2].copy()
        bp = block_params(W1, hdiag[i1:i2])
        a16 = _fp16(bp.alpha)
        alpha[:, b, :] = a16.astype(np.float16)
        salient[i1:i2] = bp.salient
        Err = np.empty_like(W1)
        for j in range(i2 - i1):
            c = i1 + j
            w = W1[:, j]
            s1 = w >= 0
            sg1 = np.where(s1, 1.0, -1.0)
            if bp.salient[j]:
                s2 = (w - a16[:, 0] * sg1) >= 0
                q = a16[:, 0] * sg1 + a16[:, 1] * np.where(s2, 1.0, -1.0)
                sign2[:, c] = s2
            else:
                sp = np.abs(w) > bp.p
                q = np.where(sp, a16[:, 3], a16[:, 2]) * sg1
                sparse[:, c] = sp
            sign[:, c] = s1
            Q[:, c] = q
            d = U[c, c]
            err = (w - q) / d
            loss += float(err @ err) / 2
            W1[:, j + 1:] -= np.outer(err, U[c, c + 1:i2])
            Err[:, j] = err
        Wd[:, i2:] -= Err @ U[i1:i2, i2:]
    part = BinaryPart(bs, salient, sign, sign2[:, salient], sparse[:, ~salient], alpha)
    return BinarizeResult(part, Q, loss, int(salient.sum()))


def quantize(name, W, stats, plan, settings) -> QuantizedLayer:
    """BiLLM binarization of ``W`` on its Gram matrix (``stats.gram``), blocks of
    ``plan.group_size`` columns, damping ``settings.gptq_percdamp``; the plan has no high columns
    and ``b_low == 1``."""
    if stats is None:
        raise InvalidArgumentError(f"{name}: billm needs the layer's Gram matrix (calibration "
                                   "statistics); pass stats")
    if plan.b_low != 1 or plan.k:
        raise InvalidArgumentError(f"{name}: billm binarizes every weight: its plan must have "
                                   f"b_low=1 and no high-impact columns (got b_low={plan.b_low}, "
                                   f"k={plan.k}); pass wbits=1")
    if plan.group_size < 1:
        raise InvalidArgumentError(f"{name}: billm binarizes in blocks of columns; pass a positive "
                                   "group_size (--group 128, the paper's block)")
    res = binarize(np.ascontiguousarray(W, np.float32), stats.gram, plan.group_size,
                   settings.gptq_percdamp)
    d_out, d_in = W.shape
    info = {"salient_columns": res.n_salient, "salient_fraction": res.n_salient / d_in,
            "loss": res.loss}
    return QuantizedLayer(name, d_out, d_in, np.zeros(0, np.int64), None, info=info,
                          binary=res.part)
