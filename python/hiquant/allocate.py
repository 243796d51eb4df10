"""High-impact ratio allocation: the cost model, the sensitivity matrix M and the IQP.

Every quantized linear layer ``l`` gets one of K candidate ratios ``β_1..β_K`` (default 0.02,
0.05, 0.10, 0.15, 0.20; any values in [0, 1], 0 included). Option ``m`` of layer ``l`` keeps its
``k = ceil(β_m · d_in)`` input columns of highest Fisher column score at ``b_high`` bits and the
rest at ``b_low`` bits, both in groups of ``group_size``. A one-hot ``δ`` picks one option per
layer::

    minimize  δᵀ M δ   subject to   Σ_l Σ_m c[l, m] δ[l, m] <= budget,   Σ_m δ[l, m] = 1.

* :func:`layer_cost_bits` — the exact storage of one layer, in bits (the packed export writes
  exactly this many payload bits; it is :func:`hiquant.storage.storage_bits`, one formula).
* :func:`sensitivity_matrix` — M by one of :data:`ESTIMATORS` (``"measured"``, ``"fisher"``,
  ``"diagonal"``, ``"rank1"``, ``"kfac"``), recorded in the result. All estimate ``ΔᵀHΔ`` (twice
  the second-order loss increase) of the quantization error ``Δ``, so their scales are
  comparable.
* :func:`solve` — the raw IQP (C++: exact for block-diagonal M, a bounded heuristic otherwise).
* :func:`allocate` — layer shapes + Fisher column scores + M + a budget (average bits per weight
  or total bits) → per-layer ratio, ``k``, high-impact column indices and bits.

Δ of an option: round-to-nearest min-max quantization of the layer at the option's split
(:meth:`hiquant.storage.QuantizedLayer.rtn`: the :mod:`hiquant.quantizer` primitives applied to the
low and the high column subsets separately, each in its own groups, scales rounded through
float16 as stored), minus the full-precision weight. ``b_high = 16`` keeps the high columns in
FP16 (their Δ is the float16 rounding error).

The choice of k from a ratio is exact decimal arithmetic: ``k = ceil(Decimal(repr(β)) · d_in)``,
so ``β = 0.07`` with ``d_in = 100`` gives 7, not 8 (``0.07 * 100`` is 7.000000000000001 in binary
floating point).
"""

from __future__ import annotations

import math
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from fractions import Fraction
from typing import Callable, Mapping, Sequence

import numpy as np

from . import _core
from ._threads import resolve_n_threads
from .config import (
    DEFAULT_CANDIDATES,
    ESTIMATORS,
    FISHER_DIAGONAL_ESTIMATORS,
    HIGH_BITS,
    OPTION_DELTAS,
    STATISTICS_ESTIMATORS,
    WEIGHT_BITS,
    check_group_size,
    needs_input_grams,
    settle_pairs,
)
from .errors import (
    HiquantWarning,
    InfeasibleBudgetError,
    InvalidArgumentError,
    InvalidTypeError,
    NumericalError,
)
from .storage import QuantizedLayer, storage_bits

__all__ = [
    "DEFAULT_CANDIDATES",
    "ESTIMATORS",
    "OPTION_DELTAS",
    "ratio_to_k",
    "high_columns",
    "layer_cost_bits",
    "option_costs",
    "IQPResult",
    "solve",
    "iqp_objective",
    "option_deltas",
    "SensitivityMatrix",
    "sensitivity_matrix",
    "measured_evaluations",
    "LayerAllocation",
    "Allocation",
    "allocate",
    "LayerPlan",
    "uniform_ratio_for_budget",
    "plan_layers",
    "budget_range",
    "check_budget",
]

_METHODS = ("auto", "exact", "general")


# --------------------------------------------------------------------------------------------
# small validators


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _pos_int(v, name: str, minimum: int = 1) -> int:
    if not _is_int(v) or v < minimum:
        raise InvalidArgumentError(f"{name} must be an integer >= {minimum}, got {v!r}")
    return int(v)


def _bits(v, name: str, allowed) -> int:
    if not _is_int(v) or int(v) not in allowed:
        raise InvalidArgumentError(f"{name} must be one of {sorted(allowed)}, got {v!r}")
    return int(v)


def _group(v) -> int:
    return check_group_size(v)


def _candidates(c) -> tuple:
    try:
        vals = tuple(float(x) for x in c)
    except TypeError:
        raise InvalidTypeError(f"candidates must be a sequence of ratios, got {type(c).__name__}") from None
    if not vals:
        raise InvalidArgumentError("candidates is empty; pass at least one ratio in [0, 1]")
    for x in vals:
        if not (math.isfinite(x) and 0.0 <= x <= 1.0):
            raise InvalidArgumentError(f"candidate ratios must be in [0, 1], got {x!r}")
    if len(set(vals)) != len(vals):
        raise InvalidArgumentError(f"candidate ratios must be distinct, got {vals}")
    return vals


def _exact(x: float) -> Fraction:
    """The decimal value a float was written as (repr), as an exact fraction."""
    return Fraction(Decimal(repr(float(x))))


# --------------------------------------------------------------------------------------------
# cost model


def ratio_to_k(ratio: float, d_in: int) -> int:
    """High-impact columns for a ratio: ``ceil(ratio · d_in)`` in exact decimal arithmetic."""
    d_in = _pos_int(d_in, "d_in")
    r = float(ratio)
    if not (math.isfinite(r) and 0.0 <= r <= 1.0):
        raise InvalidArgumentError(f"ratio must be in [0, 1], got {ratio!r}")
    return int(math.ceil(_exact(r) * d_in))


def high_columns(fisher_col: np.ndarray, k: int) -> np.ndarray:
    """Ascending int64 indices of the ``k`` columns of highest score (ties: lower index first)."""
    s = np.asarray(fisher_col)
    if s.ndim != 1 or s.size == 0:
        raise InvalidArgumentError(f"fisher_col must be a non-empty 1-D array of column scores, "
                                   f"got shape {s.shape}")
    if not np.issubdtype(s.dtype, np.number) or np.iscomplexobj(s):
        raise InvalidTypeError(f"fisher_col must hold real numbers, got dtype {s.dtype}")
    s = s.astype(np.float64, copy=False)
    if not np.all(np.isfinite(s)):
        raise NumericalError("fisher_col contains NaN or Inf; recompute the Fisher statistics")
    if not _is_int(k) or not 0 <= k <= s.size:
        raise InvalidArgumentError(f"k must be an integer in [0, {s.size}], got {k!r}")
    order = np.argsort(-s, kind="stable")  # stable: equal scores keep ascending index order
    return np.sort(order[:int(k)]).astype(np.int64)


def layer_cost_bits(d_out: int, d_in: int, k: int, b_low: int, b_high: int,
                    group_size: int | None, scale_bits: int = 16) -> int:
    """Exact storage of a layer ``(d_out, d_in)`` with ``k`` high-impact columns, in bits.

    * low part: ``d_out·(d_in−k)·b_low`` code bits + ``d_out·ng(d_in−k, g)·(scale_bits + b_low)``
      (a scale and an integer zero point of the part's width per group);
    * high part, groups of g among the k high columns in ascending order:
      ``d_out·k·b_high + d_out·ng(k, g)·(scale_bits + b_high)``; with ``b_high == 16`` the high
      part is kept in FP16: ``d_out·k·16``, no scales or zeros;
    * the high-column mask: ``d_in`` bits when ``k > 0``;
    * ``scale_bits`` 16 (float16 scales), 8 or 6 (double-quantized: 8- or 6-bit codes per group
      plus, for each non-empty quantized part, a float16 super-scale per block of
      ``max(1, 256 // ng)`` whole rows, ``16·ceil(d_out / rows)`` bits).

    ``ng(n, g)`` is 0 for n == 0, 1 when g <= 0 or g >= n, else ``ceil(n/g)``. The packed export
    writes exactly this payload (this is :func:`hiquant.storage.storage_bits`).
    """
    d_out = _pos_int(d_out, "d_out")
    d_in = _pos_int(d_in, "d_in")
    if not _is_int(k) or not 0 <= k <= d_in:
        raise InvalidArgumentError(f"k must be an integer in [0, d_in = {d_in}], got {k!r}")
    b_low = _bits(b_low, "b_low", WEIGHT_BITS)
    b_high = _bits(b_high, "b_high", HIGH_BITS)
    return storage_bits(d_out, d_in, int(k), b_low, b_high, _group(group_size), scale_bits)


def _shape_list(shapes) -> tuple[list[str], list[tuple[int, int]]]:
    """(names, shapes) from a mapping name → (d_out, d_in), a sequence of shapes, or a Model."""
    if hasattr(shapes, "linear_names") and hasattr(shapes, "linear_shape"):
        names = list(shapes.linear_names())
        return names, [tuple(shapes.linear_shape(n)) for n in names]
    if isinstance(shapes, Mapping):
        names = [str(n) for n in shapes]
        vals = list(shapes.values())
    else:
        vals = list(shapes)
        names = [f"layer{i}" for i in range(len(vals))]
    out = []
    for n, s in zip(names, vals):
        try:
            d_out, d_in = s
        except (TypeError, ValueError):
            raise InvalidArgumentError(f"the shape of {n} must be (d_out, d_in), got {s!r}") from None
        out.append((_pos_int(d_out, f"d_out of {n}"), _pos_int(d_in, f"d_in of {n}")))
    if not out:
        raise InvalidArgumentError("shapes is empty; pass the shape of every quantized layer")
    return names, out


def option_costs(shapes, candidates=DEFAULT_CANDIDATES, b_low: int = 2, b_high: int = 3,
                 group_size: int | None = 64, scale_bits: int = 16) -> np.ndarray:
    """int64 (L, K) matrix of :func:`layer_cost_bits` for every layer and candidate ratio."""
    _, sh = _shape_list(shapes)
    cand = _candidates(candidates)
    return np.array([[layer_cost_bits(do, di, ratio_to_k(b, di), b_low, b_high, group_size,
                                      scale_bits) for b in cand] for do, di in sh], np.int64)


# --------------------------------------------------------------------------------------------
# the IQP


@dataclass(frozen=True)
class IQPResult:
    """Outcome of :func:`solve`.

    ``status`` is ``"optimal"`` (exact path, or a bound that closes the gap) or ``"feasible"``
    (``lower_bound <= true optimum <= objective``); ``"infeasible"`` only for the cheapest
    fallback of :func:`allocate` with ``on_infeasible="cheapest"``. ``gap`` is
    ``(objective - lower_bound) / |objective|``. ``bound_method`` says how the bound was obtained.
    """

    status: str
    method: str  # "exact" or "general"
    objective: float
    lower_bound: float
    gap: float
    abs_gap: float
    choice: np.ndarray  # int64 (L,): option index per layer
    cost_bits: int
    budget_bits: int
    min_cost_bits: int
    bound_method: str
    iterations: int
    nodes: int
    n_components: int
    largest_component: int
    seconds: float

    def to_dict(self) -> dict:
        d = asdict(self)
        d["choice"] = self.choice.tolist()
        return d


def _as_M(M, L: int, K: int) -> np.ndarray:
    if not isinstance(M, np.ndarray):
        raise InvalidTypeError(f"M must be a numpy.ndarray of float64, got {type(M).__name__}")
    if M.dtype == np.float32:  # lossless, and said here rather than done silently in C++
        M = M.astype(np.float64)
    if M.dtype != np.float64:
        raise InvalidTypeError(f"M must have dtype float64, got {M.dtype}; convert it with "
                        "M.astype(numpy.float64)")
    n = L * K
    if M.shape != (n, n):
        raise InvalidArgumentError(
            f"M has shape {M.shape} but costs has shape ({L}, {K}): M must be ({n}, {n}), "
            "variables numbered layer-major (v = l * n_options + m)")
    return np.ascontiguousarray(M)


def _as_costs(costs) -> np.ndarray:
    c = np.asarray(costs)
    if c.ndim != 2 or c.size == 0:
        raise InvalidArgumentError(f"costs must be a non-empty (n_layers, n_options) array, got "
                                   f"shape {c.shape}")
    if np.issubdtype(c.dtype, np.floating):
        if not np.all(np.isfinite(c)):
            raise NumericalError("costs contains NaN or Inf; costs are bit counts")
        if np.any(c != np.round(c)) or np.any(np.abs(c) >= 2.0**62):
            raise InvalidArgumentError("costs must be integers (bit counts); round them or use "
                                       "layer_cost_bits")
        c = c.astype(np.int64)
    elif np.issubdtype(c.dtype, np.integer) and not np.issubdtype(c.dtype, np.bool_):
        if np.issubdtype(c.dtype, np.unsignedinteger) and c.size and c.max() >= 2**63:
            raise InvalidArgumentError("costs exceed the int64 range")
        c = c.astype(np.int64)
    else:
        raise InvalidTypeError(f"costs must be an integer array of bit counts, got dtype {c.dtype}")
    if np.any(c < 0):
        raise InvalidArgumentError("costs must be >= 0 (bit counts)")
    return np.ascontiguousarray(c)


def _as_budget(b, name="budget_bits") -> int:
    if isinstance(b, bool) or not isinstance(b, (int, float, np.integer, np.floating)):
        raise InvalidTypeError(f"{name} must be a number of bits, got {type(b).__name__}")
    if isinstance(b, (float, np.floating)):
        if not math.isfinite(b):
            raise NumericalError(f"{name} is {b}; pass a finite number of bits")
        b = math.floor(b)
    b = int(b)
    if b < 0:
        raise InvalidArgumentError(f"{name} must be >= 0, got {b}")
    return min(b, 2**63 - 1)


def solve(M: np.ndarray, costs, budget_bits, *, blocks=None, method: str = "auto",
          n_threads: int | None = None, progress: Callable[[int, int], None] | None = None,
          max_enumeration: int = 1 << 21, max_states: int = 20_000_000, fw_iterations: int = 400,
          restarts: int = 32, seed: int = 0, gap_tolerance: float = 1e-9) -> IQPResult:
    """Solve ``min δᵀMδ`` over one option per layer with ``Σ cost <= budget_bits``.

    ``M``: float64 ``(L·K, L·K)``, variable ``v = l·K + m`` (need not be symmetric; entries between
    two options of the same layer never matter). ``costs``: integer ``(L, K)`` bits.
    ``blocks``: optional block id per layer, asserting that M vanishes between blocks (checked).

    ``method="auto"`` uses the exact path when every group of coupled layers has at most
    ``max_enumeration`` option combinations, else the general path (``"exact"`` / ``"general"``
    force one). The general path returns a feasible solution, a valid lower bound and the gap:
    see ``cpp/include/hiquant/allocation.hpp`` for how the bound is computed. The result never
    exceeds the budget; a budget below the cheapest choice raises
    :class:`~hiquant.InfeasibleBudgetError` with ``min_feasible`` in bits. Deterministic for any
    ``n_threads``. ``progress(done, total)`` is called from the solver; Ctrl-C interrupts it.
    """
    c = _as_costs(costs)
    L, K = c.shape
    Mx = _as_M(M, L, K)
    budget = _as_budget(budget_bits)
    if method not in _METHODS:
        raise InvalidArgumentError(f"method must be one of {_METHODS}, got {method!r}")
    b = None
    if blocks is not None:
        b = np.asarray(blocks)
        if b.shape != (L,) or not np.issubdtype(b.dtype, np.integer):
            raise InvalidArgumentError(f"blocks must be {L} integer block ids (one per layer), got "
                                       f"shape {b.shape} and dtype {b.dtype}")
        b = np.ascontiguousarray(b, np.int64)
    for name, v, lo in (("max_enumeration", max_enumeration, 1), ("max_states", max_states, 1),
                        ("fw_iterations", fw_iterations, 0), ("restarts", restarts, 0),
                        ("seed", seed, 0)):
        _pos_int(v, name, lo)
    if not (isinstance(gap_tolerance, (int, float)) and gap_tolerance >= 0):
        raise InvalidArgumentError(f"gap_tolerance must be a number >= 0, got {gap_tolerance!r}")
    r = _core.solve_iqp(Mx, c, budget, b, method, int(max_enumeration), int(max_states),
                        int(fw_iterations), 100000, int(restarts), int(seed), float(gap_tolerance),
                        resolve_n_threads(n_threads), progress)
    return IQPResult(status=r["status"], method=r["method"], objective=r["objective"],
                     lower_bound=r["lower_bound"], gap=r["gap"], abs_gap=r["abs_gap"],
                     choice=r["choice"], cost_bits=int(r["cost"]), budget_bits=int(r["budget"]),
                     min_cost_bits=int(r["min_cost"]), bound_method=r["bound_method"],
                     iterations=int(r["iterations"]), nodes=int(r["nodes"]),
                     n_components=int(r["n_components"]),
                     largest_component=int(r["largest_component"]), seconds=float(r["seconds"]))


def iqp_objective(M: np.ndarray, costs, choice) -> float:
    """``δᵀMδ`` of a choice (one option index per layer), as the solver computes it."""
    c = _as_costs(costs)
    Mx = _as_M(M, *c.shape)
    ch = np.ascontiguousarray(np.asarray(choice), np.int64)
    return float(_core.iqp_objective(Mx, c, ch))


# --------------------------------------------------------------------------------------------
# the sensitivity matrix M


def option_deltas(W: np.ndarray, fisher_col: np.ndarray, candidates=DEFAULT_CANDIDATES,
                  b_low: int = 2, b_high: int = 3, group_size: int | None = 64, *,
                  kind: str = "rtn", gram: np.ndarray | None = None, scale_bits: int = 16,
                  act_order: bool = True, percdamp: float = 0.01) -> list:
    """Δ (float32 ``W``'s shape) of each candidate ratio: the split layer's quantized weights
    minus ``W``.

    ``kind="rtn"``: round-to-nearest of both parts on their min-max grids (float16 scales).
    ``kind="gptq"``: the hybrid quantizer's structure without its learning, on the layer's input
    Gram ``gram`` (float64 ``(d_in, d_in)``): the low columns' codes by GPTQ on their min-max
    grid (scales stored at ``scale_bits``) with the high columns free (the sweep's compensation,
    ``act_order``, ``percdamp``), then the high columns moved to their least-squares optimum
    given the low part's error and rounded by GPTQ on their own min-max grid (FP16 high columns,
    ``b_high=16``, stay fixed at ``W``: the sweep then sees the low columns only, as the hybrid
    quantizer does). LWC's learned clipping and AdaRound's learned rounding are left out: this is
    the cheap proxy of the quantizer actually used (bench/RESULTS.md measures how it tracks it).
    """
    W = np.ascontiguousarray(W, np.float32)
    d_out, d_in = W.shape
    cand = _candidates(candidates)
    g = _group(group_size)
    if kind not in OPTION_DELTAS:
        raise InvalidArgumentError(f"kind must be one of {OPTION_DELTAS}, got {kind!r}")
    if kind == "gptq":
        if gram is None:
            raise InvalidArgumentError("kind='gptq' needs gram, the Gram matrix of the layer's "
                                       "inputs (stats.collect_stats(..., gram=True).gram[name])")
        H = np.asarray(gram)
        if H.dtype != np.float64:
            raise InvalidTypeError(f"gram must be float64, got {H.dtype}")
        if H.shape != (d_in, d_in):
            raise InvalidArgumentError(f"gram has shape {H.shape}, expected ({d_in}, {d_in})")
    out = []
    for beta in cand:
        k = ratio_to_k(beta, d_in)
        idx = high_columns(fisher_col, k)
        if kind == "rtn":
            ql = QuantizedLayer.rtn("delta", W, b_low, g, high_idx=idx, b_high=b_high)
            out.append(ql.dequantize() - W)
        else:
            out.append(_gptq_delta(W, H, idx, b_low, b_high, g, scale_bits, act_order, percdamp))
    return out


def _gptq_delta(W, H, hi, b_low, b_high, g, scale_bits, act_order, percdamp) -> np.ndarray:
    from .learners import gptq
    from .storage import QuantPart
    d_out, d_in = W.shape
    mask = np.ones(d_in, bool)
    mask[hi] = False
    lo = np.flatnonzero(mask)
    d_low = lo.size
    perm = np.concatenate([lo, hi])
    Wp = np.ascontiguousarray(W[:, perm])
    Hp = np.ascontiguousarray(H[np.ix_(perm, perm)])
    wq = np.empty_like(Wp)
    n = d_in if b_high != 16 else d_low  # FP16 high columns are fixed, not free
    if d_low:
        grid = QuantPart.from_weights(np.ascontiguousarray(Wp[:, :d_low]), b_low, g,
                                      scale_bits=scale_bits)
        r = gptq(np.ascontiguousarray(Wp[:, :n]), np.ascontiguousarray(Hp[:n, :n]), bits=b_low,
                 group_size=g or None, percdamp=percdamp, n_threads=1,
                 scale=np.ascontiguousarray(grid.scale_f32()), zero=grid.zero, n_quant=d_low,
                 act_order=act_order)
        wq[:, :d_low] = r.wq
    if d_low < d_in and b_high == 16:
        wq[:, d_low:] = Wp[:, d_low:].astype(np.float16).astype(np.float32)
    elif d_low < d_in:
        Hh = Hp[d_low:, d_low:]
        Wh = Wp[:, d_low:].astype(np.float64)
        if d_low:  # the high columns' least-squares optimum given the low part's error E
            E = (wq[:, :d_low] - Wp[:, :d_low]).astype(np.float64)
            damp = percdamp * float(np.mean(np.diag(Hp)))
            Wh = Wh - np.linalg.solve(Hh + damp * np.eye(Hh.shape[0]), (E @ Hp[:d_low, d_low:]).T).T
        Wh = np.ascontiguousarray(Wh, np.float32)
        grid = QuantPart.from_weights(Wh, b_high, g, scale_bits=scale_bits)
        r = gptq(Wh, np.ascontiguousarray(Hh), bits=b_high, group_size=g or None,
                 percdamp=percdamp, n_threads=1, scale=np.ascontiguousarray(grid.scale_f32()),
                 zero=grid.zero, act_order=act_order)
        wq[:, d_low:] = r.wq
    out = np.empty_like(W)
    out[:, perm] = wq
    return out - W


@dataclass
class SensitivityMatrix:
    """M of the allocation IQP and how it was built.

    ``M``: float64 ``(L·K, L·K)``, layer-major over ``names`` × ``candidates``. ``blocks``: the
    transformer block of each layer (M vanishes between blocks for ``measured`` and ``diagonal``).
    ``estimator`` and ``settings`` are recorded in every allocation made with it.
    """

    M: np.ndarray
    names: list
    candidates: tuple
    estimator: str
    blocks: np.ndarray
    b_low: int
    b_high: int
    group_size: int
    seconds: float
    settings: dict = field(default_factory=dict)

    def diagonal(self) -> np.ndarray:
        """``M[v, v]`` reshaped to (L, K): the loss estimate of each option alone."""
        return np.diag(self.M).reshape(len(self.names), len(self.candidates)).copy()


def _model_layers(model, names):
    if names is None:
        names = list(model.linear_names())
    else:
        names = [str(n) for n in names]
        known = set(model.linear_names())
        for n in names:
            if n not in known:
                raise InvalidArgumentError(f"{n!r} is not a linear layer of the model; see "
                                           "model.linear_names()")
    block_of = {}
    for i in range(model.num_blocks):
        for n in model.block_linear_names(i):
            block_of[n] = i
    return names, np.array([block_of[n] for n in names], np.int64)


def _windows(ids, n_windows, seqlen) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or ids.shape[1] < 2:
        raise InvalidArgumentError(f"ids must be an integer array (n_windows, seqlen >= 2), got "
                                   f"shape {ids.shape} and dtype {ids.dtype}")
    if n_windows is not None:
        ids = ids[:_pos_int(n_windows, "n_windows")]
    if seqlen is not None:
        ids = ids[:, :_pos_int(seqlen, "seqlen", 2)]
    return np.ascontiguousarray(ids, np.int64)


def sensitivity_matrix(model, ids: np.ndarray, *, estimator: str, fisher_col: Mapping,
                       fisher: Mapping | None = None, fisher_row: Mapping | None = None,
                       candidates=DEFAULT_CANDIDATES,
                       b_low: int = 2, b_high: int = 3, group_size: int | None = 64,
                       names: Sequence[str] | None = None, n_windows: int | None = None,
                       seqlen: int | None = None, pairs: bool | str = "auto",
                       delta_cache_bytes: int = 2 << 30,
                       progress: Callable[[int, int], None] | None = None,
                       n_threads: int | None = None, eval_batch: int | None = None,
                       partial: Mapping[int, np.ndarray] | None = None,
                       on_block: Callable[[int, np.ndarray], None] | None = None,
                       option_delta: str = "rtn", grams: Mapping | None = None,
                       scale_bits: int = 16, act_order: bool = True,
                       percdamp: float = 0.01) -> SensitivityMatrix:
    """Build M with one of :data:`ESTIMATORS` from a model and calibration windows ``ids``.

    ``fisher_col[name]``: the Fisher column scores that choose each option's high columns
    (``hiquant.stats.collect_stats(...).fisher_col``). ``n_windows`` / ``seqlen`` use the first
    windows / tokens of ``ids`` only (the estimators' cost grows with them). ``option_delta``:
    how each option's Δ is formed (:func:`option_deltas` ``kind``: ``"rtn"``, or ``"gptq"`` with
    ``scale_bits``, ``act_order``, ``percdamp`` and the input Grams ``grams[name]``).

    * ``"measured"`` (the paper's): ``M[i,i] = 2 (L(θ+Δ_i) − L(θ))`` and, for two options of
      different layers of the same transformer block, ``M[i,j] = M[j,i] = L(θ+Δ_i+Δ_j) −
      L(θ+Δ_i) − L(θ+Δ_j) + L(θ)`` (the FULL value in both entries), so that
      ``δᵀMδ = 2 (Σ_i ΔL_i + Σ_{i<j} ΔL_ij)``: twice the second-order inclusion-exclusion estimate
      of the loss increase, the same scale as ``ΔᵀHΔ``. Pairs in different blocks are 0. L is the
      mean per-sequence calibration loss over the windows. ``pairs=False`` skips the cross terms
      (``"auto"``: kept).

      Cost: ``E = L·K`` evaluations, plus ``K²·Σ_b C(l_b, 2)`` with pairs (``l_b`` layers of
      block b; :func:`measured_evaluations`), each a forward of blocks ``b..B−1`` and the head on
      ``n_windows × seqlen`` tokens from the cached inputs of block b (plus one unperturbed
      forward for those inputs). LLaMA-shaped blocks (7 linears, K = 5): ``35·B`` singles and
      ``525·B`` pairs; on average an evaluation runs ``(B+1)/2`` blocks and the head.
      Evaluations never change the model (``block_forward(..., weights=...)``): up to
      ``eval_batch`` of them are stacked along the batch axis (default: about 512 rows per
      matrix product) and run on ``n_threads`` workers (:func:`hiquant._threads.map_ordered`,
      single-threaded BLAS). M does not depend on ``n_threads``; on ``eval_batch`` only through
      the float32 rounding of the stacked products (bench/RESULTS.md, tests/test_measured_m.py).
      Resume: ``on_block(b, sub)`` receives each finished block's square sub-matrix of M (its
      layers × options, in ``names`` order); passing the saved ones back as ``partial={b: sub}``
      skips those blocks.
    * ``"fisher"``: ``a[s, v] = ⟨G_s, Δ_v⟩`` from per-sequence gradients ``G_s`` (one backward pass
      per window; float32 products summed in float64 across chunks of 4,096 terms),
      ``M = AᵀA / S``: every pair of layers, across blocks too (``δᵀMδ`` is the
      empirical-Fisher quadratic form of the total Δ). ``pairs=False`` keeps the diagonal only
      (each option's own quadratic form, no cross terms between layers). M has rank ≤ S: with
      fewer windows than layers the IQP can choose an allocation whose S gradient projections
      cancel across layers rather than one of low loss, so ``pairs="auto"`` keeps the cross
      terms only when S ≥ L, and ``pairs=True`` below that warns
      (:class:`~hiquant.errors.HiquantWarning`). The K Δ's of every layer (4·K bytes per
      weight) are kept in memory up to ``delta_cache_bytes``, else recomputed for every window.
    * ``"diagonal"``: ``M[v,v] = Σ F ⊙ Δ_v²`` with ``F = fisher[name]`` (the empirical Fisher
      diagonal), no cross terms. ``stats.collect_stats`` sums F over its S windows, which makes
      this S times the diagonal of the ``"fisher"`` M on the same windows; a constant factor
      never changes the allocation.
    * ``"rank1"``: the ``"diagonal"`` estimator with F replaced by its rank-1 approximation from
      its margins, ``F_oi ≈ R_o C_i / ΣF`` (``R = fisher_row[name]``, ``C = fisher_col[name]``,
      ``stats.collect_stats`` accumulates both without F): ``M[v,v] = R · (Δ_v² C) / ΣR``. It
      needs ``d_out + d_in`` numbers per layer instead of the 4 bytes per weight of F, so it is
      ``estimator="auto"``'s choice where F does not fit. It equals ``"diagonal"`` when F has
      rank 1 (one token per window: ``g = δ xᵀ``); on llama-bench its terms are within 7% of the
      diagonal estimator's and its allocations within 0.013% of the diagonal M's optimum
      (bench/rank1_fisher.py, bench/RESULTS.md).
    * ``"kfac"``: ``M[v,v] = Σ_o r_o (Δ_v H Δ_vᵀ)_oo``, the Kronecker-factored Fisher: ``H =
      grams[name]`` the input Gram and ``r_o = Σ_i F_oi / tr H`` each output row's share of the
      Fisher diagonal, so that ``F_oi ≈ r_o H_ii`` and the diagonal terms of the sum are the
      ``"diagonal"`` estimator's. The off-diagonal terms see correlated errors: GPTQ's codes
      (``option_delta="gptq"``) lower ``Δ H Δᵀ`` by compensating one column's error with the
      next ones, which ``Σ F ⊙ Δ²`` cannot see. No cross terms between layers.

    The model's weights are left as they were (a layer already replaced by ``set_weight`` gets
    its replacement back).
    """
    if estimator not in ESTIMATORS:
        raise InvalidArgumentError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    cand = _candidates(candidates)
    b_low = _bits(b_low, "b_low", WEIGHT_BITS)
    b_high = _bits(b_high, "b_high", HIGH_BITS)
    g = _group(group_size)
    names, blocks = _model_layers(model, names)
    K, L = len(cand), len(names)
    if fisher_col is None:
        raise InvalidArgumentError("fisher_col is required: it chooses the high-impact columns")
    for n in names:
        if n not in fisher_col:
            raise InvalidArgumentError(f"fisher_col has no entry for {n!r}; pass the column scores "
                                       "of every layer (stats.collect_stats(...).fisher_col)")
    if estimator in FISHER_DIAGONAL_ESTIMATORS:
        if fisher is None:
            raise InvalidArgumentError(f"estimator={estimator!r} needs fisher (the empirical "
                                       "Fisher diagonal of every layer, "
                                       "stats.collect_stats(...).fisher)")
        for n in names:
            if n not in fisher:
                raise InvalidArgumentError(f"fisher has no entry for {n!r}")
    if option_delta not in OPTION_DELTAS:
        raise InvalidArgumentError(f"option_delta must be one of {OPTION_DELTAS}, got "
                                   f"{option_delta!r}")
    if needs_input_grams(estimator, option_delta):
        if grams is None or any(n not in grams for n in names):
            raise InvalidArgumentError(
                f"estimator={estimator!r} with option_delta={option_delta!r} needs grams, the "
                "input Gram matrix of every layer (stats.collect_stats(..., gram=True).gram)")
    if estimator == "rank1":
        if fisher_row is None or any(n not in fisher_row for n in names):
            raise InvalidArgumentError("estimator='rank1' needs fisher_row, the Fisher diagonal's "
                                       "row sums of every layer (stats.collect_stats(...)"
                                       ".fisher_row)")
    ids = _windows(ids, n_windows, seqlen) if estimator not in STATISTICS_ESTIMATORS else None
    pairs = settle_pairs(pairs, estimator, ids.shape[0] if ids is not None else None, L)
    delta_cache_bytes = _pos_int(delta_cache_bytes, "delta_cache_bytes", 0)
    t0 = time.perf_counter()
    settings = dict(b_low=b_low, b_high=b_high, group_size=g, candidates=list(cand),
                    option_delta=option_delta)
    if option_delta == "gptq":
        settings.update(scale_bits=int(scale_bits), act_order=bool(act_order),
                        percdamp=float(percdamp))

    def deltas(n):
        return option_deltas(model.get_weight(n), fisher_col[n], cand, b_low, b_high, g,
                             kind=option_delta, gram=grams[n] if grams is not None else None,
                             scale_bits=scale_bits, act_order=act_order, percdamp=percdamp)

    M = np.zeros((L * K, L * K), np.float64)
    if estimator in STATISTICS_ESTIMATORS:  # each option's own term, no cross terms
        for li, n in enumerate(names):
            quad = _layer_form(estimator, n, tuple(model.linear_shape(n)), fisher, fisher_row,
                               fisher_col, grams)
            for m, D in enumerate(deltas(n)):
                M[li * K + m, li * K + m] = quad(D.astype(np.float64))
            if progress is not None:
                progress(li + 1, L)
    elif estimator == "fisher":
        settings.update(n_windows=int(ids.shape[0]), seqlen=int(ids.shape[1]))
        # The K Δ's of every layer are kept in memory when they fit delta_cache_bytes (the
        # gradients of each window come for all layers at once), else recomputed per window.
        need = 4 * K * sum(int(np.prod(model.linear_shape(n))) for n in names)
        cache = need <= delta_cache_bytes
        settings["delta_cache"] = bool(cache)
        D = {n: np.stack([d.reshape(-1) for d in deltas(n)]) for n in names} if cache else None
        S = ids.shape[0]
        A = np.zeros((S, L * K), np.float64)
        index = {n: li for li, n in enumerate(names)}
        for s in range(S):
            # one block's gradients at a time (model.iter_block_weight_grads): memory bounded by
            # the largest block, not the model
            for _, G in model.iter_block_weight_grads(ids[s:s + 1]):
                for n, grad in G.items():  # (not `g`: that is the group size deltas() uses)
                    li = index.get(n)
                    if li is None:
                        continue
                    g_s = np.asarray(grad, np.float32).reshape(-1)
                    Dn = D[n] if cache else np.stack([d.reshape(-1) for d in deltas(n)])
                    A[s, li * K:(li + 1) * K] = _dot_rows(Dn, g_s)
            if progress is not None:
                progress(s + 1, S)
        M = A.T @ A / S
        settings["A_rank"] = int(np.linalg.matrix_rank(A)) if A.size else 0
        settings["pairs"] = pairs
        if not pairs:
            M = np.diag(np.diag(M))
        elif S < L:
            warnings.warn(
                f"the fisher estimator's M from {S} windows has rank <= {S}, below the {L} layers "
                "it allocates: its cross terms between layers are noise the IQP can exploit "
                "(an allocation whose gradient projections cancel), not dependencies. Use "
                f"m_windows >= {L}, pairs off (m_pairs=False: the diagonal of this M) or the "
                "diagonal estimator", HiquantWarning, stacklevel=2)
    else:  # measured
        settings.update(n_windows=int(ids.shape[0]), seqlen=int(ids.shape[1]), pairs=pairs)
        M = _measured(model, ids, names, blocks, cand, deltas, pairs, progress,
                      n_threads=n_threads, eval_batch=eval_batch, partial=partial,
                      on_block=on_block)
    M = 0.5 * (M + M.T)
    if not np.all(np.isfinite(M)):
        raise NumericalError(f"the {estimator} estimator produced a non-finite M; check the "
                             "model's losses and gradients on these windows")
    return SensitivityMatrix(M=np.ascontiguousarray(M), names=names, candidates=cand,
                             estimator=estimator, blocks=blocks, b_low=b_low, b_high=b_high,
                             group_size=g, seconds=time.perf_counter() - t0, settings=settings)


def _layer_form(estimator: str, n: str, shape: tuple, fisher, fisher_row, fisher_col, grams):
    """Layer ``n``'s quadratic form ``D -> float`` (D float64, the layer's shape) of a statistics
    estimator (:data:`STATISTICS_ESTIMATORS`; see :func:`sensitivity_matrix`), its inputs
    checked against the layer's shape."""
    if estimator == "kfac":
        F = np.asarray(fisher[n])
        H = np.asarray(grams[n], np.float64)
        if F.shape != shape or H.shape != (shape[1], shape[1]):
            raise InvalidArgumentError(f"fisher[{n!r}] {F.shape} / grams[{n!r}] {H.shape} do "
                                       f"not match the weight {shape}")
        r = F.astype(np.float64).sum(axis=1) / max(float(np.trace(H)), np.finfo(float).tiny)
        return lambda D: float(r @ np.einsum("oi,oi->o", D @ H, D))
    if estimator == "diagonal":
        F = np.asarray(fisher[n])
        if F.shape != shape:
            raise InvalidArgumentError(f"fisher[{n!r}] has shape {F.shape} but the weight has "
                                       f"{shape}; pass the Fisher diagonal of the same layer")
        F64 = F.astype(np.float64)
        return lambda D: float(np.sum(F64 * D * D))
    R = np.asarray(fisher_row[n], np.float64)  # rank1
    C = np.asarray(fisher_col[n], np.float64)
    if (R.shape, C.shape) != ((shape[0],), (shape[1],)):
        raise InvalidArgumentError(
            f"fisher_row[{n!r}] {R.shape} / fisher_col[{n!r}] {C.shape} do not match the "
            f"weight {shape}; pass the margins of the same layer's Fisher")
    total = max(float(R.sum()), np.finfo(float).tiny)
    return lambda D: float(R @ ((D * D) @ C)) / total


def _dot_rows(D: np.ndarray, g: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """``D @ g`` for float32 ``D`` (K, P) and ``g`` (P,): float32 products summed in chunks of
    ``chunk`` terms (BLAS), chunk sums added in float64. Error about 1e-7 relative whatever P,
    at float32 speed (converting D to float64 per window would cost 100x more)."""
    P = g.size
    main = P - P % chunk
    out = np.zeros(D.shape[0], np.float64)
    if main:
        part = np.matmul(D[:, :main].reshape(D.shape[0], -1, 1, chunk),
                         g[:main].reshape(-1, chunk, 1))[..., 0, 0]
        out += part.astype(np.float64).sum(axis=1)
    if main < P:
        out += D[:, main:].astype(np.float64) @ g[main:].astype(np.float64)
    return out


def _overridable(model) -> bool:
    """Whether the runtime's block_forward takes per-call weight overrides (``weights=``)."""
    import inspect
    try:
        return "weights" in inspect.signature(model.block_forward).parameters
    except (TypeError, ValueError):
        return False


def measured_evaluations(n_layers_per_block: Sequence[int], n_candidates: int,
                         pairs: bool = True) -> int:
    """Loss evaluations of the measured estimator: ``L·K`` singles, plus
    ``K²·Σ_b C(l_b, 2)`` same-block pairs when ``pairs`` (``l_b`` layers in block b)."""
    K = int(n_candidates)
    ls = [int(x) for x in n_layers_per_block]
    return sum(ls) * K + (K * K * sum(x * (x - 1) // 2 for x in ls) if pairs else 0)


def _measured(model, ids, names, blocks, cand, deltas, pairs, progress, *, n_threads=None,
              eval_batch=None, partial=None, on_block=None) -> np.ndarray:
    """The measured M (see :func:`sensitivity_matrix`), block by block.

    An evaluation is a set of weight overrides (one layer, or two of the same block) of block b.
    Its loss: block b on the cached input of block b with the overrides (``block_forward(...,
    weights=...)``, the model is never changed), then blocks b+1.. and the head. Tasks are
    (up to ``eval_batch`` evaluations) × (a chunk of ``model.auto_batch(T)`` windows): the
    evaluations' block-b outputs are stacked along the batch axis and go through the rest of
    the model as one batch; tasks run on :func:`hiquant._threads.map_ordered`'s workers. The
    tasks and their shapes depend on ``eval_batch`` and the windows only, never on the thread
    count; an evaluation's loss is the mean of its per-sequence losses (float64), as before.
    Runtimes without ``weights=`` get the overrides by ``set_weight``, one task at a time."""
    from ._threads import map_ordered, resolve_workers
    K, L = len(cand), len(names)
    nb = model.num_blocks
    S, T = ids.shape
    fast = _overridable(model)
    wc = max(1, min(S, int(model.auto_batch(T))))  # windows per task (memory-bounded)
    chunks = [(s0, min(S, s0 + wc)) for s0 in range(0, S, wc)]
    if eval_batch is None:  # about 512 rows per product, as model.auto_batch aims for
        eval_batch = max(1, -(-512 // (wc * T)))
    eval_batch = _pos_int(eval_batch, "eval_batch")
    workers = resolve_workers(n_threads) if fast else 1

    by_block: dict[int, list[int]] = {}
    for li in range(L):
        by_block.setdefault(int(blocks[li]), []).append(li)
    partial = dict(partial or {})
    for b, sub in partial.items():
        n = len(by_block.get(int(b), ())) * K
        if not isinstance(sub, np.ndarray) or sub.shape != (n, n) or not n:
            raise InvalidArgumentError(f"partial[{b}] must be the ({n}, {n}) block of M of block "
                                       f"{b}'s layers, got "
                                       f"{getattr(sub, 'shape', type(sub).__name__)}")
    total = measured_evaluations([len(v) for v in by_block.values()], K, pairs)
    todo = {b: lis for b, lis in by_block.items() if b not in partial}
    M = np.zeros((L * K, L * K), np.float64)
    for b, sub in partial.items():  # rows of finished blocks, from an interrupted run
        v = np.array([li * K + m for li in by_block[int(b)] for m in range(K)])
        M[np.ix_(v, v)] = sub
    done = total - measured_evaluations([len(v) for v in todo.values()], K, pairs)
    if progress is not None and done:
        progress(done, total)
    if not todo:
        return M

    # Inputs of every block under the current (unperturbed) weights, and the base loss, computed
    # once, by window chunks on the workers.
    was_set = set(model.modified_weights())
    W: dict = {}
    first = min(todo)

    def base_chunk(c):
        x = model.embed(ids[c[0]:c[1]])
        hs = []
        for i in range(nb):
            hs.append(x if i >= first else None)
            x = model.block_forward(i, x)
        return hs, model.head_loss(x, ids[c[0]:c[1]])

    res = map_ordered(base_chunk, chunks, workers)
    h_in = [[r[0][i] for r in res] for i in range(nb)]  # [block][chunk]
    base = float(np.mean(np.concatenate([r[1] for r in res])))
    del res

    lock = threading.Lock()
    state = {"done": done}

    def restore(n):
        if n in was_set:
            model.set_weight(n, W[n])
        else:
            model.reset_weight(n)

    cur: dict = {}  # the block being evaluated: its weights "W" and option deltas "D"

    def overrides(e):  # built per task: all of a block's perturbed weights would not fit
        Wb, D = cur["W"], cur["D"]
        ov = {names[e[0]]: Wb[names[e[0]]] + D[e[0]][e[1]]}
        if len(e) == 4:
            ov[names[e[2]]] = Wb[names[e[2]]] + D[e[2]][e[3]]
        return ov

    def run(task):
        b, evals, ci = task
        s0, s1 = chunks[ci]
        x0 = h_in[b][ci]
        outs = []
        for ev in map(overrides, evals):
            if fast:
                outs.append(model.block_forward(b, x0, weights=ev))
            else:
                for n, Wn in ev.items():
                    model.set_weight(n, Wn)
                try:
                    outs.append(model.block_forward(b, x0))
                finally:
                    for n in ev:
                        restore(n)
        x = outs[0] if len(outs) == 1 else np.concatenate(outs)
        del outs
        for i in range(b + 1, nb):
            x = model.block_forward(i, x)
        tid = ids[s0:s1] if len(evals) == 1 else np.tile(ids[s0:s1], (len(evals), 1))
        losses = model.head_loss(x, tid).reshape(len(evals), s1 - s0)
        if progress is not None and ci == len(chunks) - 1:
            with lock:  # calls in increasing order of done, one at a time
                state["done"] += len(evals)
                progress(state["done"], total)
        return losses

    for b in sorted(todo):
        lis = todo[b]
        Wb = {names[li]: model.get_weight(names[li]) for li in lis}
        W.update(Wb)
        cur["W"], cur["D"] = Wb, {li: deltas(names[li]) for li in lis}
        evals = [(li, m) for li in lis for m in range(K)]
        if pairs:
            evals += [(li, m, lj, m2) for x, li in enumerate(lis) for lj in lis[x + 1:]
                      for m in range(K) for m2 in range(K)]

        tasks = [(b, evals[e0:e0 + eval_batch], ci) for e0 in range(0, len(evals), eval_batch)
                 for ci in range(len(chunks))]
        out = map_ordered(run, tasks, workers)
        # per evaluation: its per-sequence losses in window order, then their mean (float64)
        per = np.empty((len(evals), S), np.float64)
        for t, ((_, group, ci), losses) in enumerate(zip(tasks, out)):
            e0 = (t // len(chunks)) * eval_batch
            per[e0:e0 + len(group), chunks[ci][0]:chunks[ci][1]] = losses
        del out, tasks
        loss = {e: float(np.mean(per[j])) for j, e in enumerate(evals)}
        for li in lis:
            for m in range(K):
                M[li * K + m, li * K + m] = 2.0 * (loss[li, m] - base)
        if pairs:
            for e in evals[len(lis) * K:]:
                li, m, lj, m2 = e
                v = loss[e] - loss[li, m] - loss[lj, m2] + base
                M[li * K + m, lj * K + m2] = M[lj * K + m2, li * K + m] = v
        if on_block is not None:
            v = np.array([li * K + m for li in lis for m in range(K)])
            on_block(b, M[np.ix_(v, v)].copy())
    return M


# --------------------------------------------------------------------------------------------
# allocation


@dataclass(frozen=True)
class LayerAllocation:
    name: str
    d_out: int
    d_in: int
    option: int  # index into the candidates
    ratio: float
    k: int
    high_idx: np.ndarray  # ascending int64 (k,)
    bits: int  # layer_cost_bits of this choice

    @property
    def bits_per_weight(self) -> float:
        return self.bits / (self.d_out * self.d_in)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["high_idx"] = self.high_idx.tolist()
        d["bits_per_weight"] = self.bits_per_weight
        return d


@dataclass(frozen=True)
class Allocation:
    """Per-layer ratios chosen by :func:`allocate`, with the exact bits achieved."""

    layers: list  # LayerAllocation, in the order of the shapes given
    total_bits: int
    n_weights: int
    budget_bits: int
    candidates: tuple
    b_low: int
    b_high: int
    group_size: int
    scale_bits: int
    estimator: str | None  # from a SensitivityMatrix, else None (a raw M)
    result: IQPResult

    @property
    def avg_bits(self) -> float:
        """Average bits per weight achieved (exact count / weights)."""
        return self.total_bits / self.n_weights

    @property
    def ratios(self) -> dict:
        return {la.name: la.ratio for la in self.layers}

    def to_dict(self) -> dict:
        return {
            "avg_bits": self.avg_bits, "total_bits": self.total_bits, "n_weights": self.n_weights,
            "budget_bits": self.budget_bits, "budget_avg_bits": self.budget_bits / self.n_weights,
            "candidates": list(self.candidates), "b_low": self.b_low, "b_high": self.b_high,
            "group_size": self.group_size, "scale_bits": self.scale_bits,
            "estimator": self.estimator, "result": self.result.to_dict(),
            "layers": [la.to_dict() for la in self.layers],
        }


def _min_avg(min_cost: int, n_weights: int) -> float:
    """Smallest float x with floor(x · n_weights) >= min_cost, x as repr'd (so passing it back as
    avg_bits is feasible)."""
    x = min_cost / n_weights
    while math.floor(_exact(x) * n_weights) < min_cost:
        x = math.nextafter(x, math.inf)
    return x


def allocate(shapes, fisher_col: Mapping, M, *, avg_bits: float | None = None,
             total_bits: int | None = None, candidates=None, b_low: int | None = None,
             b_high: int | None = None, group_size: int | None = None, scale_bits: int = 16,
             blocks=None, method: str = "auto", on_infeasible: str = "raise",
             n_threads: int | None = None, progress=None, **solver_options) -> Allocation:
    """Choose each layer's high-impact ratio under a bit budget.

    ``shapes``: name → (d_out, d_in) (or a Model); ``fisher_col``: name → column scores (d_in,);
    ``M``: a :class:`SensitivityMatrix` (its candidates, widths, group size, blocks and estimator
    are used and recorded) or a float64 array over ``shapes`` × ``candidates``. Budget: exactly
    one of ``avg_bits`` (average bits per weight over these layers, counted by
    :func:`layer_cost_bits`; the budget is ``floor(avg_bits · n_weights)`` bits in exact decimal
    arithmetic) or ``total_bits``.

    Returns an :class:`Allocation`: per layer the ratio, ``k``, the ascending indices of its ``k``
    highest-scoring columns (ties: lower index) and its bits; the exact average achieved.
    An infeasible budget raises :class:`~hiquant.InfeasibleBudgetError` whose ``min_feasible`` is
    in the unit the budget was given in; ``on_infeasible="cheapest"`` returns the cheapest
    allocation instead (status ``"infeasible"``).
    """
    names, sh = _shape_list(shapes)
    estimator = None
    if isinstance(M, SensitivityMatrix):
        sm = M
        if list(sm.names) != names:
            raise InvalidArgumentError("M was built for other layers (or another order) than "
                                       "shapes; build it with names=list(shapes)")
        for arg, have, mine in (("candidates", candidates, sm.candidates), ("b_low", b_low, sm.b_low),
                                ("b_high", b_high, sm.b_high), ("group_size", group_size, sm.group_size)):
            if have is not None and ((_candidates(have) if arg == "candidates" else
                                      (_group(have) if arg == "group_size" else have)) != mine):
                raise InvalidArgumentError(f"{arg}={have!r} differs from the {mine!r} M was built "
                                           "with; leave it unset or rebuild M")
        candidates, b_low, b_high, group_size = sm.candidates, sm.b_low, sm.b_high, sm.group_size
        if blocks is None:
            blocks = sm.blocks if sm.estimator != "fisher" else None
        estimator = sm.estimator
        Mx = sm.M
    else:
        Mx = M
    cand = _candidates(DEFAULT_CANDIDATES if candidates is None else candidates)
    b_low = _bits(2 if b_low is None else b_low, "b_low", WEIGHT_BITS)
    b_high = _bits(3 if b_high is None else b_high, "b_high", HIGH_BITS)
    g = _group(64 if group_size is None else group_size)
    if on_infeasible not in ("raise", "cheapest"):
        raise InvalidArgumentError(f"on_infeasible must be 'raise' or 'cheapest', got {on_infeasible!r}")
    for n, (_, di) in zip(names, sh):
        if n not in fisher_col:
            raise InvalidArgumentError(f"fisher_col has no entry for {n!r}; pass the column "
                                       "scores of every layer")
        if np.shape(fisher_col[n]) != (di,):
            raise InvalidArgumentError(f"fisher_col[{n!r}] has shape {np.shape(fisher_col[n])} but "
                                       f"the layer has d_in = {di}; pass its (d_in,) column scores")
    ks = [[ratio_to_k(b, di) for b in cand] for _, di in sh]
    costs = np.array([[layer_cost_bits(do, di, k, b_low, b_high, g, scale_bits) for k in kk]
                      for (do, di), kk in zip(sh, ks)], np.int64)
    n_weights = sum(do * di for do, di in sh)
    if (avg_bits is None) == (total_bits is None):
        raise InvalidArgumentError("pass exactly one budget: avg_bits (bits per weight) or "
                                   "total_bits")
    if avg_bits is not None:
        if isinstance(avg_bits, bool) or not isinstance(avg_bits, (int, float, np.integer, np.floating)):
            raise InvalidTypeError(f"avg_bits must be a number, got {type(avg_bits).__name__}")
        if not math.isfinite(avg_bits):
            raise NumericalError(f"avg_bits is {avg_bits}; pass a finite number")
        if avg_bits <= 0:
            raise InvalidArgumentError(f"avg_bits must be positive, got {avg_bits}")
        budget = int(math.floor(_exact(avg_bits) * n_weights))
    else:
        budget = _as_budget(total_bits, "total_bits")
    try:
        res = solve(Mx, costs, budget, blocks=blocks, method=method, n_threads=n_threads,
                    progress=progress, **solver_options)
    except InfeasibleBudgetError as e:
        min_cost = int(costs.min(axis=1).sum())
        if on_infeasible == "raise":
            if avg_bits is not None:
                mf = _min_avg(min_cost, n_weights)
                raise InfeasibleBudgetError(
                    f"avg_bits={avg_bits} is infeasible: even the smallest ratio in every layer "
                    f"needs {min_cost / n_weights:.6f} bits per weight (b_low={b_low}, "
                    f"b_high={b_high}, group_size={g}, {scale_bits}-bit scales); pass "
                    f"avg_bits >= {mf!r}" + (" or store cheaper scales (scale_bits=8 or 6)"
                                              if scale_bits == 16 else
                                              " or scale_bits=6" if scale_bits == 8 else ""),
                    mf) from e
            raise InfeasibleBudgetError(
                f"total_bits={budget} is infeasible: the cheapest allocation needs {min_cost} "
                f"bits; pass total_bits >= {min_cost}", min_cost) from e
        choice = np.argmin(costs, axis=1).astype(np.int64)
        obj = iqp_objective(Mx, costs, choice)
        res = IQPResult(status="infeasible", method="cheapest", objective=obj,
                        lower_bound=float("nan"), gap=float("nan"), abs_gap=float("nan"),
                        choice=choice, cost_bits=int(costs[np.arange(len(sh)), choice].sum()),
                        budget_bits=budget, min_cost_bits=min_cost,
                        bound_method="none (budget infeasible)", iterations=0, nodes=0,
                        n_components=0, largest_component=0, seconds=0.0)
    layers = []
    for li, ((do, di), n) in enumerate(zip(sh, names)):
        m = int(res.choice[li])
        k = ks[li][m]
        layers.append(LayerAllocation(name=n, d_out=do, d_in=di, option=m, ratio=cand[m], k=k,
                                      high_idx=high_columns(fisher_col[n], k),
                                      bits=int(costs[li, m])))
    total = sum(la.bits for la in layers)
    return Allocation(layers=layers, total_bits=total, n_weights=n_weights, budget_bits=budget,
                      candidates=cand, b_low=b_low, b_high=b_high, group_size=g,
                      scale_bits=scale_bits, estimator=estimator, result=res)


# --------------------------------------------------------------------------------------------
# plans: what the quantizer stores for each layer, for every allocation kind


@dataclass(frozen=True)
class LayerPlan:
    """What a method stores for one layer: ``k`` high-impact columns (ascending ``high_idx``) at
    ``b_high`` bits (16: kept in FP16), the rest at ``b_low`` bits, groups of ``group_size``
    within each part; ``ratio`` is the candidate ratio the plan came from
    (``k = ratio_to_k(ratio, d_in)``). Made once, by :func:`plan_layers`; nobody recomputes it."""

    k: int
    high_idx: np.ndarray  # ascending int64 (k,)
    b_low: int
    b_high: int  # 16 = FP16 retention; ignored when k == 0
    group_size: int
    ratio: float = 0.0


def _uniform_bits(shapes: dict, ratio: float, s) -> int:
    return sum(storage_bits(d_out, d_in, ratio_to_k(ratio, d_in), s.wbits, s.hbits,
                            s.group_size, s.scale_bits) for d_out, d_in in shapes.values())


def uniform_ratio_for_budget(shapes: dict, settings, budget_bits: float) -> float:
    """The largest ratio, the same in every layer, whose exact storage fits ``budget_bits`` under
    the (resolved) settings' widths, group size and scale storage."""
    s = settings
    n_weights = sum(a * b for a, b in shapes.values())
    at0 = _uniform_bits(shapes, 0.0, s)
    if at0 > budget_bits:
        raise InfeasibleBudgetError(
            f"a budget of {budget_bits / n_weights:.4f} bits per weight is below the cost of "
            f"W{s.wbits} g{s.group_size} with no high-impact columns ({at0 / n_weights:.4f}); "
            "raise the budget", at0 / n_weights)
    if _uniform_bits(shapes, 1.0, s) <= budget_bits:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(50):  # bisection on a monotone step function
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _uniform_bits(shapes, mid, s) <= budget_bits else (lo, mid)
    return lo


def plan_layers(settings, shapes: dict, *, fisher_col: Mapping | None = None,
                sensitivity: SensitivityMatrix | None = None) -> tuple[dict, Allocation | None]:
    """One :class:`LayerPlan` per layer for the (resolved) settings' method, and the
    :class:`Allocation` when the IQP chose the ratios (else None).

    Allocation kinds (:data:`hiquant.methods.METHODS`): ``none`` — no high-impact columns;
    ``fixed`` — one ratio in every layer (``settings.ratio``, else the largest that fits
    ``avg_bits``, else the method's default ratio); ``iqp`` — per-layer ratios from
    :func:`allocate` on ``sensitivity`` (M) under ``avg_bits``. The high-impact columns of a
    layer are its ``k`` highest ``fisher_col`` scores (:func:`high_columns`).
    """
    from .methods import METHODS
    s = settings
    spec = METHODS[s.method]
    names = list(shapes)
    allocation = None
    if spec.allocation == "none" or s.hbits == s.wbits:
        ratios = {n: 0.0 for n in names}
    elif spec.allocation == "fixed":
        if s.ratio is not None:
            r = float(s.ratio)
        elif s.avg_bits is not None:
            n_weights = sum(a * b for a, b in shapes.values())
            r = uniform_ratio_for_budget(shapes, s, s.avg_bits * n_weights)
        else:
            r = spec.default_ratio
        ratios = {n: r for n in names}
    else:  # iqp
        if sensitivity is None:
            raise InvalidArgumentError(f"method {s.method!r} allocates with the IQP: pass the "
                                       "sensitivity matrix")
        allocation = allocate(shapes, fisher_col, sensitivity, avg_bits=s.avg_bits,
                              candidates=s.candidates, b_low=s.wbits, b_high=s.hbits,
                              group_size=s.group_size, scale_bits=s.scale_bits,
                              n_threads=s.n_threads)
        return ({la.name: LayerPlan(la.k, la.high_idx, s.wbits, s.hbits, s.group_size,
                                    float(la.ratio)) for la in allocation.layers}, allocation)
    plans = {}
    for n in names:
        k = ratio_to_k(ratios[n], shapes[n][1])
        if k and fisher_col is None:
            raise InvalidArgumentError(f"method {s.method!r} keeps high-impact columns: pass the "
                                       "Fisher column scores")
        idx = high_columns(fisher_col[n], k) if k else np.zeros(0, np.int64)
        plans[n] = LayerPlan(k, idx, s.wbits, s.hbits, s.group_size, ratios[n])
    return plans, allocation


def budget_range(settings, shapes: dict) -> tuple[float, float]:
    """The smallest and the largest average bits per weight the (resolved) settings' method can
    store on layers ``shapes``: every layer at its cheapest option and at its dearest (no
    high-impact columns and all of them for a fixed ratio; the smallest and the largest candidate
    for the IQP). Exact storage, as :func:`layer_cost_bits` counts it."""
    from .methods import METHODS
    s = settings
    n_weights = sum(a * b for a, b in shapes.values())
    if METHODS[s.method].allocation == "iqp":
        costs = option_costs(shapes, s.candidates, s.wbits, s.hbits, s.group_size, s.scale_bits)
        return costs.min(axis=1).sum() / n_weights, costs.max(axis=1).sum() / n_weights
    if METHODS[s.method].allocation == "none" or s.hbits == s.wbits:
        b = _uniform_bits(shapes, 0.0, s) / n_weights
        return b, b
    return _uniform_bits(shapes, 0.0, s) / n_weights, _uniform_bits(shapes, 1.0, s) / n_weights


def check_budget(settings, shapes: dict) -> None:
    """Before any statistics: an ``avg_bits`` below what the method can store raises
    :class:`~hiquant.InfeasibleBudgetError` (with ``min_feasible``); one above what it can use
    warns (:class:`~hiquant.HiquantWarning`: the result will have fewer bits than asked)."""
    from .methods import METHODS
    s = settings
    if s.avg_bits is None or METHODS[s.method].allocation == "none" or s.ratio is not None:
        return
    lo, hi = budget_range(s, shapes)
    if s.avg_bits < lo:
        n_weights = sum(a * b for a, b in shapes.values())
        mf = _min_avg(math.ceil(lo * n_weights - 1e-9), n_weights)
        raise InfeasibleBudgetError(
            f"avg_bits={s.avg_bits} is infeasible for {s.method} W{s.wbits} (b_H {s.hbits}) "
            f"g{s.group_size} with {s.scale_bits}-bit scales: its cheapest plan stores "
            f"{lo:.4f} bits per weight; pass avg_bits >= {mf!r}"
            + (" or store cheaper scales (scale_bits=8 or 6)" if s.scale_bits == 16 else ""), mf)
    if s.avg_bits > hi:
        warnings.warn(
            f"avg_bits={s.avg_bits} is more than {s.method} can use here: every layer at its "
            f"largest option stores {hi:.4f} bits per weight, so the result will have that; "
            + ("widen the candidate ratios (candidates=...)" if METHODS[s.method].allocation ==
               "iqp" else "raise hbits or wbits"), HiquantWarning, stacklevel=3)
