"""hiquant.allocate: cost model, IQP solver (vs brute force), M estimators (vs direct formulas)."""

from __future__ import annotations

import math
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

import hiquant.allocate as A
from hiquant._reference import allocation as ref
from hiquant.config import PAPER_CANDIDATES
from hiquant.errors import (
    HiquantWarning,
    InfeasibleBudgetError,
    InvalidArgumentError,
    InvalidTypeError,
    NumericalError,
)
from hiquant.storage import QuantizedLayer, storage_bits
from tolerances import REDUCE_RTOL

DATA = Path(__file__).parent / "data"


def load_instances(fname):
    z = np.load(DATA / fname)
    ids = sorted({k.split("_")[0] for k in z.files})
    return [{k[len(i) + 1:]: z[k] for k in z.files if k.startswith(i + "_")} for i in ids]


def rel_tol(x):
    return 1e-9 * max(1.0, abs(x))


def random_instance(rng, L, K, *, kind="indefinite", blocks=None):
    n = L * K
    if kind == "psd":
        X = rng.normal(size=(int(rng.integers(2, 8)), n))
        M = X.T @ X
    else:
        M = rng.normal(size=(n, n))
        M = (M + M.T) / 2
    if blocks is not None:
        M = M * np.equal.outer(np.repeat(blocks, K), np.repeat(blocks, K))
    costs = rng.integers(0, 25, size=(L, K)).astype(np.int64)
    lo, hi = int(costs.min(1).sum()), int(costs.max(1).sum())
    return np.ascontiguousarray(M), costs, int(rng.integers(lo, hi + 1))


# ------------------------------------------------------------------------------------------
# cost model


def test_layer_cost_bits_matches_reference_formula_and_the_storage_format():
    rng = np.random.default_rng(0)
    for _ in range(300):
        d_out, d_in = int(rng.integers(1, 300)), int(rng.integers(1, 300))
        k = int(rng.integers(0, d_in + 1))
        b_low, b_high = int(rng.choice([2, 3, 4, 8])), int(rng.choice([2, 3, 4, 8, 16]))
        g = int(rng.choice([-1, 0, 1, 7, 32, 64, 128, 1000]))
        sb = int(rng.choice([6, 8, 16]))
        want = ref.layer_cost_bits(d_out, d_in, k, b_low, b_high, g, sb)
        assert A.layer_cost_bits(d_out, d_in, k, b_low, b_high, g, sb) == want
        assert storage_bits(d_out, d_in, k, b_low, b_high, g, sb) == want


def test_layer_cost_bits_equals_bits_of_a_real_quantized_layer():
    rng = np.random.default_rng(1)
    W = rng.normal(size=(24, 40)).astype(np.float32)
    for k, b_high, g in [(0, 3, 8), (5, 3, 8), (13, 4, 16), (40, 3, 0), (7, 16, 8)]:
        idx = np.sort(rng.choice(40, k, replace=False))
        for sb in (16, 8, 6):
            ql = QuantizedLayer.rtn("l", W, 2, g, high_idx=idx, b_high=b_high, scale_bits=sb)
            assert ql.scale_bits == (sb if (k < 40 or b_high != 16) else 16)
            assert A.layer_cost_bits(24, 40, k, 2, b_high, g, sb) == ql.storage_bits()


def test_layer_cost_bits_known_values():
    # 4096x4096, 10% at 3 bits, g=64: low 3686 cols -> 58 groups, high 410 cols -> 7 groups
    want = 4096 * 3686 * 2 + 4096 * 58 * 18 + 4096 * 410 * 3 + 4096 * 7 * 19 + 4096
    assert A.layer_cost_bits(4096, 4096, 410, 2, 3, 64) == want
    assert A.layer_cost_bits(8, 16, 0, 2, 3, 64) == 8 * 16 * 2 + 8 * 18  # no mask, no high part
    assert A.layer_cost_bits(8, 16, 4, 2, 16, 0) == 8 * 12 * 2 + 8 * 18 + 8 * 4 * 16 + 16
    # 8-bit scales: 8-bit code + b-bit zero per group, a float16 super-scale per block of whole
    # rows holding <= 256 codes: low 58 groups -> 4 rows -> 1024 super-scales; high 7 groups ->
    # 36 rows -> ceil(4096 / 36) = 114
    want8 = (4096 * 3686 * 2 + 4096 * 58 * 10 + 1024 * 16 + 4096 * 410 * 3 + 4096 * 7 * 11
             + 114 * 16 + 4096)
    assert A.layer_cost_bits(4096, 4096, 410, 2, 3, 64, 8) == want8
    # 6-bit scale codes: the same super-scales, 2 bits less per group
    assert A.layer_cost_bits(4096, 4096, 410, 2, 3, 64, 6) == want8 - 2 * 4096 * (58 + 7)


def test_layer_cost_bits_rejects_bad_arguments():
    with pytest.raises(InvalidArgumentError, match="k must be"):
        A.layer_cost_bits(8, 16, 17, 2, 3, 8)
    with pytest.raises(InvalidArgumentError, match="b_high"):
        A.layer_cost_bits(8, 16, 1, 2, 12, 8)
    with pytest.raises(InvalidArgumentError, match="d_out"):
        A.layer_cost_bits(0, 16, 1, 2, 3, 8)
    with pytest.raises(InvalidArgumentError, match="scale_bits"):
        A.layer_cost_bits(8, 16, 1, 2, 3, 8, 32)


def test_ratio_to_k_is_the_exact_decimal_ceiling():
    assert math.ceil(0.07 * 100) == 8  # binary floating point: 7.000000000000001
    assert A.ratio_to_k(0.07, 100) == 7
    assert A.ratio_to_k(0.55, 100) == 55
    assert A.ratio_to_k(0.05, 4000) == 200
    assert A.ratio_to_k(0.1, 4096) == 410
    assert A.ratio_to_k(0.02, 11008) == 221
    assert A.ratio_to_k(0.0, 4096) == 0
    assert A.ratio_to_k(1.0, 77) == 77
    assert A.ratio_to_k(0.15, 20) == 3
    with pytest.raises(InvalidArgumentError):
        A.ratio_to_k(1.5, 10)


def test_high_columns_are_top_k_by_score_with_ties_to_the_lower_index():
    s = np.array([0.5, 2.0, 1.0, 2.0, 1.0, 0.1])
    assert A.high_columns(s, 0).tolist() == []
    assert A.high_columns(s, 1).tolist() == [1]
    assert A.high_columns(s, 3).tolist() == [1, 2, 3]  # 2.0, 2.0, then the first 1.0
    assert A.high_columns(s, 6).tolist() == list(range(6))
    with pytest.raises(NumericalError):
        A.high_columns(np.array([1.0, np.nan]), 1)


# ------------------------------------------------------------------------------------------
# the IQP against brute force


@pytest.mark.parametrize("fname", ["iqp_block_diagonal.npz", "iqp_dense.npz"])
def test_iqp_matches_brute_force_on_stored_instances(fname):
    """Exact path (auto: every instance is small enough to enumerate) = the brute-force optimum;
    the same choice when the optimum is unique."""
    for inst in load_instances(fname):
        r = A.solve(inst["M"], inst["costs"], int(inst["budget"]),
                    blocks=inst["blocks"] if fname.startswith("iqp_block") else None)
        assert r.method == "exact" and r.status == "optimal"
        assert r.cost_bits <= int(inst["budget"])
        assert r.objective == pytest.approx(float(inst["objective"]), rel=1e-9, abs=1e-9)
        assert r.lower_bound == r.objective and r.gap == 0.0
        if inst["unique"]:
            assert r.choice.tolist() == inst["choice"].tolist()
        assert r.min_cost_bits == int(inst["min_cost"])


@pytest.mark.parametrize("fname", ["iqp_block_diagonal.npz", "iqp_dense.npz"])
def test_iqp_general_path_bound_brackets_the_brute_force_optimum(fname):
    """General path: lower_bound <= true optimum <= objective, within budget."""
    hits = 0
    insts = load_instances(fname)
    for inst in insts:
        opt = float(inst["objective"])
        r = A.solve(inst["M"], inst["costs"], int(inst["budget"]), method="general")
        assert r.method == "general"
        assert r.cost_bits <= int(inst["budget"])
        assert r.lower_bound <= opt + rel_tol(opt)
        assert r.objective >= opt - rel_tol(opt)
        assert r.objective == pytest.approx(ref.iqp_objective(inst["M"], r.choice), rel=1e-12, abs=1e-12)
        hits += r.objective <= opt + rel_tol(opt)
        if r.status == "optimal":
            assert r.objective == pytest.approx(opt, rel=1e-8, abs=1e-9)
    assert hits >= 0.9 * len(insts)  # local search finds the optimum of nearly all small ones


def test_iqp_matches_brute_force_on_fresh_random_instances():
    rng = np.random.default_rng(123)
    for t in range(120):
        L, K = int(rng.integers(1, 7)), int(rng.integers(1, 5))
        blocks = np.sort(rng.integers(0, 3, L)) if t % 2 else None
        M, costs, budget = random_instance(rng, L, K, kind=["psd", "indefinite"][t % 3 == 0],
                                           blocks=blocks)
        bf = ref.brute_force(M, costs, budget)
        r = A.solve(M, costs, budget, blocks=blocks)
        assert r.status == "optimal" and r.cost_bits <= budget
        assert r.objective == pytest.approx(bf.objective, rel=1e-9, abs=1e-9)
        if bf.unique and bf.second - bf.objective > 1e-6:
            assert r.choice.tolist() == bf.choices[0].tolist()
        g = A.solve(M, costs, budget, method="general")
        assert g.cost_bits <= budget
        tol = rel_tol(bf.objective)
        assert g.lower_bound <= bf.objective + tol <= g.objective + 2 * tol


def test_exact_path_matches_an_independent_dp_on_many_blocks():
    """Beyond brute force: 8 blocks x 3 layers x 3 options (3^24 choices), against a dynamic
    program over integer cost values."""
    rng = np.random.default_rng(7)
    for t in range(6):
        nb, per, K = 8, 3, 3
        L = nb * per
        blocks = np.repeat(np.arange(nb), per)
        M, _, _ = random_instance(rng, L, K, kind="psd" if t % 2 else "indefinite", blocks=blocks)
        costs = rng.integers(0, 12, size=(L, K)).astype(np.int64)
        lo, hi = int(costs.min(1).sum()), int(costs.max(1).sum())
        for budget in (lo, (lo + hi) // 2, lo + (hi - lo) // 5, hi):
            want, choice = ref.block_diagonal_dp(M, costs, budget, blocks)
            r = A.solve(M, costs, budget, blocks=blocks)
            assert r.method == "exact" and r.n_components <= nb
            assert r.objective == pytest.approx(want, rel=1e-9, abs=1e-9)
            assert r.cost_bits <= budget


def test_components_are_detected_from_the_nonzeros_of_M():
    rng = np.random.default_rng(3)
    L, K = 30, 4
    blocks = np.repeat(np.arange(10), 3)
    M, costs, budget = random_instance(rng, L, K, blocks=blocks)
    r = A.solve(M, costs, budget)  # no blocks given: detected
    assert r.method == "exact" and r.n_components == 10 and r.largest_component == 3
    r2 = A.solve(M, costs, budget, blocks=blocks)
    assert r2.choice.tolist() == r.choice.tolist()


def test_blocks_that_M_contradicts_raise():
    rng = np.random.default_rng(4)
    M, costs, budget = random_instance(rng, 4, 2)
    with pytest.raises(InvalidArgumentError, match="not block-diagonal"):
        A.solve(M, costs, budget, blocks=np.array([0, 0, 1, 1]))


def test_exact_method_refuses_components_too_large_to_enumerate():
    rng = np.random.default_rng(5)
    M, costs, budget = random_instance(rng, 8, 4)
    with pytest.raises(InvalidArgumentError, match="max_enumeration"):
        A.solve(M, costs, budget, method="exact", max_enumeration=1000)
    assert A.solve(M, costs, budget, max_enumeration=1000).method == "general"


def test_non_symmetric_M_is_the_same_problem_as_its_symmetric_part():
    rng = np.random.default_rng(6)
    for _ in range(20):
        L, K = 5, 3
        M, costs, budget = random_instance(rng, L, K)
        N = np.triu(M) * 2 - np.diag(np.diag(M))  # δᵀNδ = δᵀMδ for every δ
        a, b = A.solve(M, costs, budget), A.solve(np.ascontiguousarray(N), costs, budget)
        assert a.objective == pytest.approx(b.objective, rel=1e-12, abs=1e-12)


def test_iqp_indefinite_M_general_path_gives_a_valid_bound_at_scale():
    """Larger dense indefinite instances: the bound stays below a strong primal (the best of the
    general path and a long local search from many random starts is not needed: lb <= obj)."""
    rng = np.random.default_rng(8)
    M, costs, budget = random_instance(rng, 40, 5)
    r = A.solve(M, costs, budget)
    assert r.method == "general" and r.status in ("optimal", "feasible")
    assert r.lower_bound <= r.objective and r.cost_bits <= budget
    assert np.isfinite(r.lower_bound) and r.gap >= 0


def test_iqp_raises_on_infeasible_budget_with_the_smallest_feasible_budget():
    rng = np.random.default_rng(9)
    M, costs, _ = random_instance(rng, 4, 3)
    lo = int(costs.min(1).sum())
    with pytest.raises(InfeasibleBudgetError) as e:
        A.solve(M, costs, lo - 1)
    assert e.value.min_feasible == lo
    assert isinstance(e.value, ValueError)
    assert A.solve(M, costs, lo).cost_bits == lo


def test_nan_or_inf_in_M_or_costs_raise_numerical_error():
    rng = np.random.default_rng(10)
    M, costs, budget = random_instance(rng, 3, 2)
    for bad in (np.nan, np.inf):
        Mb = M.copy()
        Mb[1, 4] = bad
        with pytest.raises(NumericalError, match="not finite"):
            A.solve(Mb, costs, budget)
        cb = costs.astype(np.float64)
        cb[0, 1] = bad
        with pytest.raises(NumericalError):
            A.solve(M, cb, budget)
    with pytest.raises(NumericalError):
        A.solve(M, costs, float("nan"))


def test_bad_inputs_raise_clear_errors():
    rng = np.random.default_rng(11)
    M, costs, budget = random_instance(rng, 3, 2)
    with pytest.raises(TypeError, match="float64"):
        A.solve(M.astype(np.int64), costs, budget)
    with pytest.raises(TypeError, match="ndarray"):
        A.solve(M.tolist(), costs, budget)
    with pytest.raises(InvalidArgumentError, match=r"\(6, 6\)"):
        A.solve(M[:4, :4].copy(), costs, budget)
    with pytest.raises(InvalidArgumentError, match=">= 0"):
        A.solve(M, -costs - 1, budget)
    with pytest.raises(InvalidArgumentError, match="integers"):
        A.solve(M, costs + 0.5, budget)
    with pytest.raises(InvalidArgumentError, match="blocks"):
        A.solve(M, costs, budget, blocks=[0, 1])
    with pytest.raises(InvalidArgumentError, match="method"):
        A.solve(M, costs, budget, method="fast")
    with pytest.raises(InvalidArgumentError, match="budget"):
        A.solve(M, costs, -5)


def _strip(r):
    d = r.to_dict()
    d.pop("seconds")
    return d


def test_results_identical_across_thread_counts():
    rng = np.random.default_rng(12)
    blocks = np.repeat(np.arange(12), 4)
    M, costs, budget = random_instance(rng, 48, 4, kind="psd", blocks=blocks)
    Md, _, _ = random_instance(rng, 48, 4)
    for MM in (M, Md):
        rs = [_strip(A.solve(MM, costs, budget, n_threads=t)) for t in (1, 2, 3)]
        assert rs[0] == rs[1] == rs[2]


def test_solver_reports_progress_and_ctrl_c_interrupts_it(sigint_raises):
    import _thread

    rng = np.random.default_rng(13)
    M, costs, budget = random_instance(rng, 200, 5)
    calls = []
    A.solve(M, costs, budget, fw_iterations=20, restarts=0,
            progress=lambda d, t: calls.append((d, t)))
    assert calls and all(0 < d <= t for d, t in calls)
    timer = threading.Timer(0.05, _thread.interrupt_main)
    timer.start()
    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        A.solve(M, costs, budget, fw_iterations=100000, restarts=100000)
    assert time.perf_counter() - t0 < 30
    timer.join()


def test_solver_releases_the_gil():
    rng = np.random.default_rng(14)
    M, costs, budget = random_instance(rng, 200, 5)
    count = [0]
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            count[0] += 1
            time.sleep(0.001)

    th = threading.Thread(target=spin)
    th.start()
    try:
        t0 = time.perf_counter()
        A.solve(M, costs, budget, fw_iterations=300, restarts=8)
        elapsed = time.perf_counter() - t0
        seen = count[0]
    finally:
        stop.set()
        th.join()
    assert elapsed > 0.05 and seen >= 5


def test_iqp_objective_matches_the_reference():
    rng = np.random.default_rng(15)
    M, costs, _ = random_instance(rng, 6, 3)
    ch = rng.integers(0, 3, 6)
    assert A.iqp_objective(M, costs, ch) == pytest.approx(ref.iqp_objective(M, ch), rel=1e-12)


# ------------------------------------------------------------------------------------------
# allocate()


def _shapes_and_scores(seed=0):
    rng = np.random.default_rng(seed)
    shapes = {"a": (64, 128), "b": (128, 64), "c": (64, 96), "d": (32, 64)}
    fc = {n: rng.random(s[1]) for n, s in shapes.items()}
    return shapes, fc


def test_allocate_picks_the_optimum_and_reports_exact_bits():
    shapes, fc = _shapes_and_scores()
    rng = np.random.default_rng(1)
    K, L = 5, 4
    M = np.diag(np.concatenate([np.sort(rng.random(K))[::-1] * (l + 1) for l in range(L)]))
    al = A.allocate(shapes, fc, M, avg_bits=3.45, group_size=16, candidates=PAPER_CANDIDATES)
    costs = A.option_costs(shapes, PAPER_CANDIDATES, 2, 3, 16)
    n_weights = sum(a * b for a, b in shapes.values())
    budget = math.floor(3.45 * n_weights)
    bf = ref.brute_force(M, costs, budget)
    assert al.result.objective == pytest.approx(bf.objective)
    assert al.total_bits == sum(la.bits for la in al.layers) <= budget
    assert al.avg_bits == al.total_bits / n_weights <= 3.45
    for la in al.layers:
        assert la.k == A.ratio_to_k(la.ratio, la.d_in) == la.high_idx.size
        assert la.high_idx.tolist() == A.high_columns(fc[la.name], la.k).tolist()
        assert la.bits == A.layer_cost_bits(la.d_out, la.d_in, la.k, 2, 3, 16)
    d = al.to_dict()
    assert d["result"]["status"] == "optimal" and len(d["layers"]) == 4


def test_allocate_infeasible_budget_names_min_feasible_in_the_users_unit():
    shapes, fc = _shapes_and_scores()
    K = len(A.DEFAULT_CANDIDATES)
    M = np.eye(4 * K)
    costs = A.option_costs(shapes)
    n_weights = sum(a * b for a, b in shapes.values())
    with pytest.raises(InfeasibleBudgetError) as e:
        A.allocate(shapes, fc, M, avg_bits=2.3)
    mf = e.value.min_feasible
    assert mf == pytest.approx(costs.min(1).sum() / n_weights)
    assert "avg_bits" in str(e.value) and "scale_bits=8 or 6" in str(e.value)  # what to do
    with pytest.raises(InfeasibleBudgetError, match=r"or scale_bits=6$"):
        A.allocate(shapes, fc, M, avg_bits=2.1, scale_bits=8)
    al = A.allocate(shapes, fc, M, avg_bits=mf)  # the number it names is feasible
    assert al.total_bits == costs.min(1).sum()
    with pytest.raises(InfeasibleBudgetError) as e:
        A.allocate(shapes, fc, M, total_bits=100)
    assert e.value.min_feasible == costs.min(1).sum()
    cheap = A.allocate(shapes, fc, M, avg_bits=2.3, on_infeasible="cheapest")
    assert cheap.result.status == "infeasible" and cheap.total_bits == costs.min(1).sum()


def test_allocate_validates_budget_and_scores():
    shapes, fc = _shapes_and_scores()
    M = np.eye(4 * len(A.DEFAULT_CANDIDATES))
    with pytest.raises(InvalidArgumentError, match="exactly one budget"):
        A.allocate(shapes, fc, M)
    with pytest.raises(InvalidArgumentError, match="exactly one budget"):
        A.allocate(shapes, fc, M, avg_bits=3, total_bits=10)
    with pytest.raises(InvalidArgumentError, match="fisher_col"):
        A.allocate(shapes, {**fc, "a": np.ones(3)}, M, avg_bits=3)
    with pytest.raises(NumericalError):
        A.allocate(shapes, fc, M, avg_bits=float("inf"))


def test_allocate_with_fp16_high_part_and_zero_ratio():
    shapes, fc = _shapes_and_scores()
    cand = (0.0, 0.05, 0.25)
    M = np.diag(np.tile([3.0, 2.0, 1.0], 4))
    al = A.allocate(shapes, fc, M, avg_bits=4.0, candidates=cand, b_high=16, group_size=0)
    for la in al.layers:
        assert la.bits == ref.layer_cost_bits(la.d_out, la.d_in, la.k, 2, 16, 0)
        if la.ratio == 0.0:
            assert la.k == 0 and la.high_idx.size == 0
    assert al.total_bits <= math.floor(4.0 * al.n_weights)


# ------------------------------------------------------------------------------------------
# the estimators, on a tiny random checkpoint


@pytest.fixture(scope="module")
def tiny():
    checkpoints = pytest.importorskip("checkpoints")
    import tempfile

    from hiquant.model import load_model

    d = tempfile.mkdtemp(prefix="hq_alloc_")
    folder, cfg, _ = checkpoints.write_checkpoint(Path(d) / "m", "LlamaForCausalLM", layers=2,
                                                  hidden=32, inter=48, heads=4, kv_heads=2,
                                                  vocab=64, seed=3)
    model = load_model(folder)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 64, size=(3, 12)).astype(np.int64)
    # empirical Fisher from per-sequence gradients (what stats.collect_stats reports)
    F = {n: np.zeros(model.linear_shape(n), np.float64) for n in model.linear_names()}
    for s in range(ids.shape[0]):
        G = model.weight_grads(ids[s:s + 1])
        for n in F:
            F[n] += G[n].astype(np.float64) ** 2 / ids.shape[0]
    fisher = {n: f.astype(np.float32) for n, f in F.items()}
    fisher_col = {n: f.sum(axis=0) for n, f in F.items()}
    return model, ids, fisher, fisher_col


CAND = (0.0, 0.1, 0.25)


def _names(model, blocks):
    return [n for b in blocks for n in model.block_linear_names(b)]


def test_chunked_float32_dot_matches_float64():
    rng = np.random.default_rng(16)
    for P in (10, 4096, 4096 * 3 + 17):
        D = rng.normal(size=(5, P)).astype(np.float32)
        g = rng.normal(size=P).astype(np.float32)
        want = D.astype(np.float64) @ g.astype(np.float64)
        np.testing.assert_allclose(A._dot_rows(D, g), want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_option_deltas_are_rtn_of_the_split_layer(tiny):
    model, _, _, fc = tiny
    n = model.linear_names()[0]
    W = model.get_weight(n)
    D = A.option_deltas(W, fc[n], CAND, 2, 3, 8)
    for beta, d in zip(CAND, D):
        k = A.ratio_to_k(beta, W.shape[1])
        ql = QuantizedLayer.rtn(n, W, 2, 8, high_idx=A.high_columns(fc[n], k), b_high=3)
        np.testing.assert_array_equal(d, ql.dequantize() - W)
    assert np.abs(D[0]).sum() > np.abs(D[2]).sum()  # more columns at 3 bits, less error


def test_measured_estimator_matches_direct_loss_differences(tiny):
    model, ids, _, fc = tiny
    names = model.linear_names()
    sm = A.sensitivity_matrix(model, ids, estimator="measured", fisher_col=fc, candidates=CAND,
                              group_size=8)
    assert sm.estimator == "measured" and sm.M.shape == (len(names) * 3,) * 2
    assert model.modified_weights() == []  # every perturbation undone
    K = 3

    def loss(perturb):
        for n, m in perturb:
            W = model.get_weight(n, original=True)
            model.set_weight(n, W + A.option_deltas(W, fc[n], CAND, 2, 3, 8)[m])
        try:
            return float(np.mean(model.sequence_losses(ids)))
        finally:
            model.reset_weights()

    L0 = loss([])
    i, j = names.index(names[1]), names.index(names[5])  # same block (0)
    Li, Lj, Lij = loss([(names[i], 2)]), loss([(names[j], 0)]), loss([(names[i], 2), (names[j], 0)])
    assert sm.M[i * K + 2, i * K + 2] == pytest.approx(2 * (Li - L0), rel=1e-4, abs=1e-7)
    cross = Lij - Li - Lj + L0
    assert sm.M[i * K + 2, j * K + 0] == pytest.approx(cross, rel=1e-3, abs=1e-6)
    assert sm.M[j * K + 0, i * K + 2] == sm.M[i * K + 2, j * K + 0]  # full value in both entries
    k = names.index(model.block_linear_names(1)[0])  # another block: exactly 0
    assert sm.M[i * K + 2, k * K + 1] == 0.0
    # δᵀMδ for a choice touching only those two layers = 2 (ΔL_i + ΔL_j + cross) ≈ 2 ΔL_ij
    ch = np.zeros(len(names), np.int64)
    base = A.iqp_objective(sm.M, np.zeros((len(names), K), np.int64), ch)
    ch[i], ch[j] = 2, 0
    sub = np.zeros_like(sm.M)
    for v in (i * K + 2, j * K):
        for w in (i * K + 2, j * K):
            sub[v, w] = sm.M[v, w]
    assert ref.iqp_objective(sub, ch) == pytest.approx(2 * (Lij - L0), rel=1e-3, abs=1e-6)
    assert np.isfinite(base)


def test_measured_estimator_without_pairs_is_diagonal_and_keeps_caller_weights(tiny):
    model, ids, _, fc = tiny
    names = _names(model, [1])
    mine = model.get_weight(names[2]) * 0.5
    model.set_weight(names[2], mine)  # a caller's replacement must survive
    try:
        sm = A.sensitivity_matrix(model, ids, estimator="measured", fisher_col=fc,
                                  candidates=CAND, group_size=8, names=names, pairs=False,
                                  n_windows=2)
        assert model.modified_weights() == [names[2]]
        np.testing.assert_array_equal(model.get_weight(names[2]), mine)
    finally:
        model.reset_weights()
    assert np.count_nonzero(sm.M - np.diag(np.diag(sm.M))) == 0
    assert sm.settings["n_windows"] == 2 and sm.blocks.tolist() == [1] * 7


def test_fisher_estimator_matches_explicit_gradient_inner_products(tiny):
    model, ids, _, fc = tiny
    names = model.linear_names()
    with pytest.warns(HiquantWarning, match="rank <= 3, below the 14 layers"):
        sm = A.sensitivity_matrix(model, ids, estimator="fisher", fisher_col=fc, candidates=CAND,
                                  group_size=8, pairs=True)
    S, K = ids.shape[0], len(CAND)
    Amat = np.zeros((S, len(names) * K))
    for s in range(S):
        G = model.weight_grads(ids[s:s + 1])
        for li, n in enumerate(names):
            for m, d in enumerate(A.option_deltas(model.get_weight(n), fc[n], CAND, 2, 3, 8)):
                Amat[s, li * K + m] = np.vdot(G[n].astype(np.float64), d.astype(np.float64))
    np.testing.assert_allclose(sm.M, Amat.T @ Amat / S, rtol=REDUCE_RTOL, atol=1e-12 * np.abs(sm.M).max())
    assert np.linalg.eigvalsh(sm.M).min() > -1e-12 * np.abs(sm.M).max()  # a Gram matrix
    # without room to keep the Δ's, they are recomputed per window: the same M
    with pytest.warns(HiquantWarning, match="rank"):
        sm0 = A.sensitivity_matrix(model, ids, estimator="fisher", fisher_col=fc,
                                   candidates=CAND, group_size=8, delta_cache_bytes=0,
                                   pairs=True)
    assert sm0.settings["delta_cache"] is False and sm.settings["delta_cache"] is True
    np.testing.assert_array_equal(sm0.M, sm.M)


def test_fisher_estimator_keeps_cross_terms_only_at_full_rank_unless_told(tiny):
    model, ids, _, fc = tiny  # 3 windows, 14 layers
    kw = dict(estimator="fisher", fisher_col=fc, candidates=CAND, group_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # without cross terms: no rank warning
        off = A.sensitivity_matrix(model, ids, pairs=False, **kw)
        auto = A.sensitivity_matrix(model, ids, **kw)  # pairs="auto": 3 windows < 14 layers
        # as many windows as layers: auto keeps the cross terms, without a warning
        few = A.sensitivity_matrix(model, ids, names=_names(model, [0])[:3], **kw)
    with pytest.warns(HiquantWarning, match="m_windows >= 14"):
        full = A.sensitivity_matrix(model, ids, pairs=True, **kw)
    np.testing.assert_array_equal(off.M, np.diag(np.diag(full.M)))
    np.testing.assert_array_equal(auto.M, off.M)
    assert off.settings["pairs"] is False and auto.settings["pairs"] is False
    assert full.settings["pairs"] is True and few.settings["pairs"] is True
    assert np.count_nonzero(few.M - np.diag(np.diag(few.M))) > 0
    with pytest.raises(InvalidTypeError, match="pairs"):
        A.sensitivity_matrix(model, ids, pairs="on", **kw)


def test_diagonal_estimator_is_fisher_weighted_squared_error(tiny):
    model, _, fisher, fc = tiny
    names = _names(model, [0])
    sm = A.sensitivity_matrix(model, None, estimator="diagonal", fisher_col=fc, fisher=fisher,
                              candidates=CAND, group_size=8, names=names)
    K = len(CAND)
    for li, n in enumerate(names):
        for m, d in enumerate(A.option_deltas(model.get_weight(n), fc[n], CAND, 2, 3, 8)):
            want = float(np.sum(fisher[n].astype(np.float64) * d.astype(np.float64) ** 2))
            assert sm.M[li * K + m, li * K + m] == pytest.approx(want, rel=1e-12)
    assert np.count_nonzero(sm.M - np.diag(np.diag(sm.M))) == 0


def test_rank1_estimator_is_the_diagonal_estimator_on_the_fishers_rank1_margins_product(tiny):
    model, _, fisher, fc = tiny
    names = _names(model, [0, 1])
    rows = {n: fisher[n].astype(np.float64).sum(axis=1) for n in names}
    cols = {n: fisher[n].astype(np.float64).sum(axis=0) for n in names}
    kw = dict(candidates=CAND, group_size=8, names=names)
    sm = A.sensitivity_matrix(model, None, estimator="rank1", fisher_col=cols, fisher_row=rows,
                              **kw)
    # the float64 twin: the diagonal estimator on F' = R Cᵀ / ΣF, formed explicitly
    outer = {n: np.outer(rows[n], cols[n]) / rows[n].sum() for n in names}
    want = A.sensitivity_matrix(model, None, estimator="diagonal", fisher_col=cols, fisher=outer,
                                **kw)
    assert sm.estimator == "rank1"
    np.testing.assert_allclose(sm.M, want.M, rtol=1e-10, atol=0)
    assert np.count_nonzero(sm.M - np.diag(np.diag(sm.M))) == 0
    # where F has rank 1 (a window of one token: g = δ xᵀ) it is the diagonal estimator itself
    rank1_F = {n: (np.outer(rows[n], cols[n]) / rows[n].sum()).astype(np.float32) for n in names}
    exact = A.sensitivity_matrix(model, None, estimator="diagonal", fisher_col=cols,
                                 fisher=rank1_F, **kw)
    np.testing.assert_allclose(sm.M, exact.M, rtol=1e-6)
    with pytest.raises(InvalidArgumentError, match="fisher_row"):
        A.sensitivity_matrix(model, None, estimator="rank1", fisher_col=cols, **kw)
    bad = dict(rows, **{names[0]: rows[names[0]][:-1]})
    with pytest.raises(InvalidArgumentError, match="do not match"):
        A.sensitivity_matrix(model, None, estimator="rank1", fisher_col=cols, fisher_row=bad, **kw)


def test_allocate_from_a_sensitivity_matrix_records_the_estimator(tiny):
    model, ids, fisher, fc = tiny
    sm = A.sensitivity_matrix(model, ids, estimator="diagonal", fisher_col=fc, fisher=fisher,
                              candidates=CAND, group_size=8)
    al = A.allocate(model, fc, sm, avg_bits=4.5)  # g=8: 18/8 bits of scale and zero per weight
    assert al.estimator == "diagonal" and al.group_size == 8 and al.candidates == CAND
    assert al.result.method == "exact" and al.avg_bits <= 4.5
    assert any(la.ratio > 0 for la in al.layers)
    with pytest.raises(InvalidArgumentError, match="group_size"):
        A.allocate(model, fc, sm, avg_bits=4.5, group_size=64)
    with pytest.raises(InvalidArgumentError, match="estimator"):
        A.sensitivity_matrix(model, ids, estimator="hessian", fisher_col=fc)
