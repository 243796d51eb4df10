"""The layer-wise objective, the packed GEMM, Adam, the hybrid layer quantizer (sequential and
joint, FP16 retention, k = 0, every column high), the pipeline entry, Ctrl-C and progress, and
the block-wise driver on a tiny random checkpoint."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

import hiquant
from hiquant import blockwise
from hiquant import learners as K
from hiquant._reference import lwc as ref
from hiquant.allocate import LayerPlan
from hiquant.methods import hybrid
from hiquant.storage import QuantizedLayer
from tolerances import FD_RTOL, REDUCE_ATOL, REDUCE_RTOL


def _problem(rows=48, cols=160, tokens=500, seed=0):
    rng = np.random.default_rng(seed)
    W = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    X = rng.standard_normal((tokens, cols))  # drawn first, then the mixing matrix
    X = X @ (np.eye(cols) + 0.3 * rng.standard_normal((cols, cols)) / np.sqrt(cols))
    X[:, rng.choice(cols, 4, replace=False)] *= 8
    return W, X, X.T @ X


# ---------------------------------------------------------------------------------- GEMM, Adam


@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 300, 33), (37, 513, 45), (200, 64, 17)])
def test_gemm_kernels_match_float64_product(shape):
    M, Kd, N = shape
    rng = np.random.default_rng(1)
    A = rng.standard_normal((M, Kd)).astype(np.float32)
    B = rng.standard_normal((Kd, N)).astype(np.float32)
    want = A.astype(np.float64) @ B.astype(np.float64)
    kernels = [1] + ([2] if K._core.gemm_avx2_available() else [])
    for k in kernels:
        got = K._core.gemm(A, B, k, 2)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.sqrt(Kd))


def test_gemm_results_identical_for_1_and_2_threads():
    rng = np.random.default_rng(2)
    A = rng.standard_normal((301, 700)).astype(np.float32)
    B = rng.standard_normal((700, 190)).astype(np.float32)
    for k in (0, 1):
        np.testing.assert_array_equal(K._core.gemm(A, B, k, 1), K._core.gemm(A, B, k, 2))


def test_adam_and_adamw_match_torch_optim():
    torch = pytest.importorskip("torch")
    W, X, H = _problem(rows=8, cols=64)
    for wd in (0.0, 0.05):
        lwc = K.LWC(W, 2, 32, lr=3e-2, weight_decay=wd)
        p = torch.tensor(lwc.params, requires_grad=True)
        opt = torch.optim.AdamW([p], lr=3e-2, weight_decay=wd)
        rng = np.random.default_rng(3)
        for _ in range(6):
            d = rng.standard_normal(W.shape).astype(np.float32)
            g = lwc.backward(d)
            lwc.step(d)
            p.grad = torch.from_numpy(g)
            opt.step()
            np.testing.assert_allclose(lwc.params, p.detach().numpy(), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------- objective


def test_gram_loss_equals_explicit_token_loss():
    W, X, H = _problem()
    Wq = (W + np.random.default_rng(4).standard_normal(W.shape) * 0.01).astype(np.float32)
    loss, grad = K.gram_loss(W, Wq, H, X.shape[0])
    E = Wq.astype(np.float64) - W.astype(np.float64)
    explicit = float(((E @ X.T) ** 2).sum() / X.shape[0])
    assert loss == pytest.approx(explicit, rel=REDUCE_RTOL)
    _, grad_ref = ref.gram_loss(W, Wq, H, X.shape[0])
    np.testing.assert_allclose(grad, grad_ref, rtol=REDUCE_RTOL, atol=REDUCE_ATOL * np.abs(grad_ref).max())


def test_gram_gradient_matches_finite_differences():
    W, X, H = _problem(rows=6, cols=40)
    N = X.shape[0]
    Wq = (W + np.random.default_rng(5).standard_normal(W.shape) * 0.01).astype(np.float32)
    _, g = K.gram_loss(W, Wq, H, N)
    rng = np.random.default_rng(6)
    eps = 1e-4
    for _ in range(10):
        i, j = rng.integers(6), rng.integers(40)
        P, M = Wq.astype(np.float64), Wq.astype(np.float64)
        P[i, j] += eps
        M[i, j] -= eps
        fd = (ref.gram_loss(W, P, H, N)[0] - ref.gram_loss(W, M, H, N)[0]) / (2 * eps)
        assert g[i, j] == pytest.approx(fd, rel=max(FD_RTOL, 1e-3), abs=1e-6)


@pytest.mark.parametrize("window", [(0, 100), (100, 160), (30, 90), (0, 160)])
def test_active_window_loss_and_gradient_equal_the_full_layer(window):
    W, X, H = _problem()
    N = X.shape[0]
    rng = np.random.default_rng(7)
    Wq = (W + rng.standard_normal(W.shape) * 0.01).astype(np.float32)
    obj = K.LayerwiseObjective(W, H, N)
    obj.set_columns(0, Wq)
    obj.set_active(*window)
    loss, g = obj.evaluate()
    full, g_ref = ref.gram_loss(W, Wq, H, N)
    assert loss == pytest.approx(full, rel=REDUCE_RTOL)
    assert obj.full_loss() == pytest.approx(full, rel=REDUCE_RTOL)
    a0, a1 = window
    np.testing.assert_allclose(g, g_ref[:, a0:a1], rtol=REDUCE_RTOL, atol=REDUCE_ATOL * np.abs(g_ref).max())
    # a changed active column is seen; frozen columns are not re-read
    Wq2 = Wq.copy()
    Wq2[:, a0] += 0.01
    obj.set_columns(a0, Wq2[:, a0:a0 + 1].copy())
    assert obj.evaluate()[0] == pytest.approx(ref.gram_loss(W, Wq2, H, N)[0], rel=REDUCE_RTOL)


def test_objective_rejects_bad_gram_matrices():
    W, X, H = _problem(rows=4, cols=20)
    with pytest.raises(TypeError, match="float64"):
        K.LayerwiseObjective(W, H.astype(np.float32), 10)
    with pytest.raises(ValueError, match="H"):
        K.LayerwiseObjective(W, H[:10, :10], 10)
    with pytest.raises(ValueError, match="n_tokens"):
        K.LayerwiseObjective(W, H, 0)
    asym = H.copy()
    asym[0, 1] += 5
    with pytest.raises(ValueError, match="symmetric"):
        K.LayerwiseObjective(W, asym, 10)
    neg = H.copy()
    neg[2, 2] = -1
    with pytest.raises(ValueError, match="negative diagonal"):
        K.LayerwiseObjective(W, neg, 10)
    nan = H.copy()
    nan[1, 1] = np.nan
    with pytest.raises(hiquant.NumericalError):
        K.LayerwiseObjective(W, nan, 10)
    obj = K.LayerwiseObjective(W, H, 10)
    with pytest.raises(ValueError, match="window"):
        obj.set_active(5, 30)


# ---------------------------------------------------------------------------------- hybrid layer


def _high(H, W, ratio=0.1):
    score = np.diag(H) * (W.astype(np.float64) ** 2).sum(0)
    return np.sort(np.argsort(-score)[: int(np.ceil(ratio * W.shape[1]))])


@pytest.mark.parametrize("order", ["sequential", "joint"])
def test_hybrid_layer_beats_rtn_and_exports_exactly(order):
    W, X, H = _problem()
    hi = _high(H, W)
    r = hybrid.quantize_layer(W, H, X.shape[0], hi, 2, 3, 32, lwc_iters=60, adaround_iters=80,
                              order=order)
    assert r.order == order
    assert r.loss_final < r.loss_rtn
    np.testing.assert_array_equal(r.high_idx, hi)
    assert r.low.codes.shape == (48, 160 - hi.size) and r.high.codes.shape == (48, hi.size)
    assert r.low.codes.max() <= 3 and r.high.codes.max() <= 7
    layer = r.to_layer("x")
    np.testing.assert_array_equal(layer.dequantize(), r.wq)
    assert r.loss_final == pytest.approx(ref.gram_loss(W, r.wq, H, X.shape[0])[0], rel=REDUCE_RTOL)
    hist = r.history["adaround" if order == "sequential" else "joint"]
    assert hist["loss"].shape == (80,) and np.all(np.isfinite(hist["loss"]))


def test_adaround_phase_compensates_the_low_part_error():
    """With the low part frozen, AdaRound lowers the whole layer's loss below what rounding the
    high columns to nearest gives with the same low part."""
    W, X, H = _problem()
    hi = _high(H, W, 0.2)
    r = hybrid.quantize_layer(W, H, X.shape[0], hi, 2, 3, 32, lwc_iters=50, adaround_iters=300)
    lo = r.low_idx
    from hiquant.storage import QuantPart
    rtn_high = QuantPart.from_weights(np.ascontiguousarray(W[:, hi]), 3, 32).dequantize()
    wq = r.wq.copy()
    wq[:, hi] = rtn_high
    assert r.loss_final < ref.gram_loss(W, wq, H, X.shape[0])[0]
    assert np.array_equal(r.wq[:, lo], r.low.wq)


def test_compensated_high_targets_are_the_least_squares_fit_to_the_low_part_error():
    """Against an independent construction: the targets minimize ||(Wq - W) X^T|| over the
    continuous high columns (lstsq on the token matrix, no damping), and damping shrinks the step."""
    W, X, H = _problem()
    hi = _high(H, W, 0.2)
    lo = hybrid.low_columns(W.shape[1], hi)
    perm = np.concatenate([lo, hi])
    Wp = np.ascontiguousarray(W[:, perm])
    Hp = H[np.ix_(perm, perm)]
    wq_low = np.round(Wp[:, : lo.size] * 20) / 20  # any frozen low part
    E = wq_low.astype(np.float64) - Wp[:, : lo.size]
    Xp = X[:, perm]
    step, *_ = np.linalg.lstsq(Xp[:, lo.size:], -(Xp[:, : lo.size] @ E.T), rcond=None)
    want = Wp[:, lo.size:] + step.T
    got = hybrid.compensated_high(Wp, Hp, wq_low, lo.size, 0.0)
    assert got.dtype == np.float32 and got.shape == (48, hi.size)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    damped = hybrid.compensated_high(Wp, Hp, wq_low, lo.size, 0.1) - Wp[:, lo.size:]
    assert np.linalg.norm(damped) < np.linalg.norm(step)


def test_high_compensation_learns_the_high_part_on_the_grid_of_the_targets():
    W, X, H = _problem()
    hi = _high(H, W, 0.2)
    kw = dict(lwc_iters=50, adaround_iters=200, low_rounding="gptq", act_order=True)
    off = hybrid.quantize_layer(W, H, X.shape[0], hi, 2, 3, 32, **kw)
    on = hybrid.quantize_layer(W, H, X.shape[0], hi, 2, 3, 32, high_compensation=True, **kw)
    np.testing.assert_array_equal(on.low.codes, off.low.codes)  # the low part is not touched
    lo = on.low_idx
    perm = np.concatenate([lo, hi])
    target = hybrid.compensated_high(np.ascontiguousarray(W[:, perm]), H[np.ix_(perm, perm)],
                                     on.low.wq, lo.size, 0.01)
    from hiquant.storage import QuantPart
    grid = QuantPart.from_weights(target, 3, 32)
    np.testing.assert_array_equal(on.high.scale, grid.scale)  # min-max grid of the targets
    step = np.repeat(grid.scale_f32(), 32, axis=1)[:, : hi.size]
    assert np.all(np.abs(on.high.wq - target) <= step * 1.0001)  # AdaRound: floor or ceil
    np.testing.assert_array_equal(on.to_layer("x").dequantize(), on.wq)
    assert on.loss_final == pytest.approx(ref.gram_loss(W, on.wq, H, X.shape[0])[0],
                                          rel=REDUCE_RTOL)
    with pytest.raises(hiquant.HiquantError, match="high_compensation"):
        hiquant.config.resolve(hiquant.QuantizeSettings(high_compensation="yes"))


def test_fp16_retention_and_no_high_columns_and_all_columns_high():
    W, X, H = _problem()
    N = X.shape[0]
    hi = _high(H, W)
    r16 = hybrid.quantize_layer(W, H, N, hi, 2, 16, 32, lwc_iters=20, adaround_iters=10)
    assert r16.high is None and r16.high_fp16.dtype == np.float16
    np.testing.assert_array_equal(r16.wq[:, hi], W[:, hi].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(r16.to_layer("x").dequantize(), r16.wq)
    assert r16.to_layer("x").b_high == 16
    r0 = hybrid.quantize_layer(W, H, N, [], 3, 4, 32, lwc_iters=20, adaround_iters=10)
    assert r0.high is None and r0.high_idx.size == 0 and "adaround" not in r0.history
    np.testing.assert_array_equal(r0.to_layer("x").dequantize(), r0.wq)
    rall = hybrid.quantize_layer(W, H, N, np.arange(160), 2, 3, 32, lwc_iters=20, adaround_iters=10)
    assert rall.low is None and rall.high.codes.shape == W.shape
    np.testing.assert_array_equal(rall.to_layer("x").dequantize(), rall.wq)


@pytest.mark.parametrize("b_high", [3, 16])
def test_gptq_low_rounding_keeps_the_grid_and_matches_the_float64_twin(b_high):
    """low_rounding='gptq' re-chooses only the low part's codes on LWC's grid: scales and zero
    points identical to round-to-nearest's, codes those of the float64 GPTQ twin on that grid —
    the high columns last and free (AdaRound learns them next), or absent from H when they are
    FP16 (fixed at W)."""
    from hiquant._reference import gptq as ref_gptq
    W, X, H = _problem()
    hi = _high(H, W, 0.15)
    kw = dict(lwc_iters=40, adaround_iters=60, scale_bits=6)
    near = hybrid.quantize_layer(W, H, X.shape[0], hi, 2, b_high, 32, **kw)
    gq = hybrid.quantize_layer(W, H, X.shape[0], hi, 2, b_high, 32, low_rounding="gptq", **kw)
    np.testing.assert_array_equal(gq.low.scale, near.low.scale)
    np.testing.assert_array_equal(gq.low.zero, near.low.zero)
    np.testing.assert_array_equal(gq.low.scale_f32(), near.low.scale_f32())
    assert not np.array_equal(gq.low.codes, near.low.codes)
    perm = np.concatenate([gq.low_idx, hi])
    n = W.shape[1] if b_high != 16 else gq.low_idx.size
    Wp, Hp = W[:, perm][:, :n], H[np.ix_(perm, perm)][:n, :n]
    want = ref_gptq.gptq(Wp, Hp, 2, 32, scale=near.low.scale_f32(), zero=near.low.zero,
                         n_quant=gq.low_idx.size)
    np.testing.assert_array_equal(gq.low.codes, want["codes"])
    np.testing.assert_array_equal(gq.to_layer("x").dequantize(), gq.wq)
    assert gq.loss_final < near.loss_final
    assert gq.history["low_rounding"]["method"] == "gptq" and "low_rounding" not in near.history


def test_gptq_low_rounding_applies_to_a_given_low_part_too():
    W, X, H = _problem()
    hi = _high(H, W)
    low_only = hybrid.quantize_layer(W, H, X.shape[0], hi, 2, 3, 32, lwc_iters=40,
                                     adaround_iters=0)
    full = hybrid.quantize_layer(W, H, X.shape[0], hi, 2, 3, 32, lwc_iters=40, adaround_iters=60,
                                 low_rounding="gptq")
    again = hybrid.quantize_layer(W, H, X.shape[0], hi, 2, 3, 32, adaround_iters=60,
                                  low_fixed=low_only.low, low_rounding="gptq")
    np.testing.assert_array_equal(again.wq, full.wq)
    with pytest.raises(ValueError, match="low_rounding must be"):
        hybrid.quantize_layer(W, H, X.shape[0], hi, 2, 3, 32, low_rounding="stochastic")
    with pytest.raises(ValueError, match="sequential"):
        hybrid.quantize_layer(W, H, X.shape[0], hi, 2, 3, 32, low_rounding="gptq", order="joint")


def test_hybrid_results_identical_for_1_and_2_threads():
    W, X, H = _problem(rows=256, cols=192)
    hi = _high(H, W)
    a = hybrid.quantize_layer(W, H, X.shape[0], hi, 2, 3, 64, lwc_iters=10, adaround_iters=10, n_threads=1)
    b = hybrid.quantize_layer(W, H, X.shape[0], hi, 2, 3, 64, lwc_iters=10, adaround_iters=10, n_threads=2)
    np.testing.assert_array_equal(a.wq, b.wq)
    np.testing.assert_array_equal(a.history["lwc"]["loss"], b.history["lwc"]["loss"])
    np.testing.assert_array_equal(a.history["adaround"]["loss"], b.history["adaround"]["loss"])


def test_quantize_layer_raises_on_bad_input():
    W, X, H = _problem(rows=8, cols=40)
    with pytest.raises(TypeError, match="float32"):
        hybrid.quantize_layer(W.astype(np.float64), H, 10, [], 2, 3, 8)
    with pytest.raises(TypeError, match="float64"):
        hybrid.quantize_layer(W, H.astype(np.float32), 10, [], 2, 3, 8)
    with pytest.raises(ValueError, match="H has shape"):
        hybrid.quantize_layer(W, H[:5, :5], 10, [], 2, 3, 8)
    with pytest.raises(ValueError, match="high_idx"):
        hybrid.quantize_layer(W, H, 10, [40], 2, 3, 8)
    with pytest.raises(ValueError, match="repeated"):
        hybrid.quantize_layer(W, H, 10, [1, 1], 2, 3, 8)
    with pytest.raises(ValueError, match="b_high"):
        hybrid.quantize_layer(W, H, 10, [1], 2, 12, 8)
    with pytest.raises(ValueError, match="order"):
        hybrid.quantize_layer(W, H, 10, [1], 2, 3, 8, order="both")
    with pytest.raises(ValueError, match="lwc_iters"):
        hybrid.quantize_layer(W, H, 10, [1], 2, 3, 8, lwc_iters=-1)
    nan = W.copy()
    nan[1, 2] = np.nan
    with pytest.raises(hiquant.NumericalError, match="row 1, column 2"):
        hybrid.quantize_layer(nan, H, 10, [1], 2, 3, 8)


def test_progress_is_reported_per_phase():
    W, X, H = _problem(rows=8, cols=40)
    seen = {}
    hybrid.quantize_layer(W, H, X.shape[0], [0, 5], 2, 3, 8, lwc_iters=30, adaround_iters=40,
                          progress=lambda phase, d, t: seen.setdefault(phase, []).append((d, t)))
    assert seen["lwc"][-1] == (30, 30) and seen["adaround"][-1] == (40, 40)


def test_ctrl_c_interrupts_a_long_fit(sigint_raises):
    W, X, H = _problem(rows=64, cols=256)
    obj = K.LayerwiseObjective(W, H, X.shape[0])
    lwc = K.LWC(W, 2, 64)
    timer = threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT))
    t0 = time.perf_counter()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            K.fit(obj, 10**7, lwc=lwc)
    finally:
        timer.cancel()
    assert time.perf_counter() - t0 < 30


def test_fit_releases_the_gil():
    W, X, H = _problem(rows=128, cols=256)
    obj = K.LayerwiseObjective(W, H, X.shape[0], n_threads=1)
    lwc = K.LWC(W, 2, 64, n_threads=1)
    count = [0]
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            count[0] += 1

    t = threading.Thread(target=spin)
    t.start()
    try:
        K.fit(obj, 200, lwc=lwc)
    finally:
        stop.set()
        t.join()
    assert count[0] > 1000


def test_every_layer_quantizer_of_the_registry_returns_a_quantized_layer_for_its_plan():
    from hiquant.config import QuantizeSettings, resolve
    from hiquant.methods import quantizer
    from hiquant.stats import LayerStats
    W, X, H = _problem(rows=16, cols=64)
    hi = _high(H, W)
    for mode, plan in (("rtn", LayerPlan(0, np.zeros(0, np.int64), 3, 3, 16)),
                       ("gptq", LayerPlan(0, np.zeros(0, np.int64), 3, 3, 16)),
                       ("lwc", LayerPlan(0, np.zeros(0, np.int64), 2, 2, 16)),
                       ("adaround", LayerPlan(0, np.zeros(0, np.int64), 3, 3, 16)),
                       ("hybrid", LayerPlan(hi.size, hi, 2, 3, 16, 0.1)),
                       ("hybrid", LayerPlan(hi.size, hi, 2, 16, 16, 0.1))):
        method = {"hybrid": "fixed-ratio"}.get(mode, mode)
        s = resolve(QuantizeSettings(method=method, lwc_iters=10, adaround_iters=20,
                                     objective="layer", scale_bits=16))
        ql = quantizer(mode).quantize("m.x", W, LayerStats(H, X.shape[0]), plan, s)
        assert isinstance(ql, QuantizedLayer)
        assert ql.k == (hi.size if mode == "hybrid" else 0)
        if mode in ("rtn", "gptq"):
            continue
        assert ql.dequantize().shape == W.shape
        assert ql.storage_bits() > 0
        assert ql.info["loss_final"] <= ql.info["loss_rtn"] * 1.05


# ---------------------------------------------------------------------------------- block-wise


def test_block_driver_lowers_the_block_error_and_sets_the_weights(tmp_path):
    checkpoints = pytest.importorskip("checkpoints")
    from hiquant.model import load_model
    folder, cfg, _ = checkpoints.write_checkpoint(tmp_path / "m", hidden=32, layers=2, inter=48,
                                                  vocab=100, seed=3)
    model = load_model(folder)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 100, (4, 12))
    h = model.embed(ids)
    names = model.block_linear_names(0)
    target = model.block_forward(0, h)
    plans = {}
    for n in names:
        d_in = model.get_weight(n).shape[1]
        hi = np.sort(rng.choice(d_in, 4, replace=False)).astype(np.int64)
        plans[n] = LayerPlan(4, hi, 2, 3, 16, 0.1)
    # RTN of the same plans, for comparison
    for n in names:
        rtn = QuantizedLayer.rtn(n, model.get_weight(n), 2, 16, plans[n].high_idx, 3)
        model.set_weight(n, rtn.dequantize())
    rtn_loss, _ = blockwise.block_loss(model.block_forward(0, h), target)
    for n in names:
        model.reset_weight(n)
    seen = []
    res = blockwise.quantize_block(model, 0, h, plans, targets=target, lwc_iters=40,
                                adaround_iters=60, batch_size=2, lwc_lr=5e-3,
                                progress=lambda p, d, t: seen.append(p))
    assert set(res) == set(names) and set(seen) == {"lwc", "adaround"}
    r = res[names[0]]
    assert r.history["lwc"]["loss"].shape == (40,) and r.history["adaround"]["loss"].shape == (60,)
    assert r.loss_final < rtn_loss
    for n in names:
        np.testing.assert_array_equal(model.get_weight(n), res[n].wq)
        np.testing.assert_array_equal(res[n].to_layer(n).dequantize(), res[n].wq)
    with pytest.raises(ValueError, match="plans"):
        blockwise.quantize_block(model, 0, h, {})


@pytest.mark.parametrize("scale_bits", [16, 8, 6])
def test_low_fixed_reproduces_the_sequential_run(scale_bits):
    """AdaRound against a given low part (objective='refine' passes the block-refined one) is the
    sequential run's second phase: given that run's own LWC export it returns the same layer."""
    W, X, H = _problem()
    hi = _high(H, W)
    kw = dict(lwc_iters=40, scale_bits=scale_bits)
    full = hybrid.quantize_layer(W, H, X.shape[0], hi, 2, 3, 32, adaround_iters=60, **kw)
    low_only = hybrid.quantize_layer(W, H, X.shape[0], hi, 2, 3, 32, adaround_iters=0, **kw)
    assert low_only.lwc_params is not None and low_only.lwc_params.shape[0] == 2
    again = hybrid.quantize_layer(W, H, X.shape[0], hi, 2, 3, 32, adaround_iters=60,
                                  scale_bits=scale_bits, low_fixed=low_only.low)
    np.testing.assert_array_equal(again.wq, full.wq)
    assert again.lwc_params is None and again.history.keys() == {"adaround"}
    with pytest.raises(ValueError, match="low_fixed"):
        hybrid.quantize_layer(W, H, X.shape[0], hi, 2, 3, 16, low_fixed=low_only.low)
    with pytest.raises(ValueError, match="low_fixed"):
        hybrid.quantize_layer(W, H, X.shape[0], hi[:-1], 2, 3, 32, low_fixed=low_only.low)


def test_block_driver_starts_from_given_clipping_and_refines_it(tmp_path):
    """lwc_init: with no steps the block driver returns exactly the layer-wise LWC export of the
    given clipping; with steps from there it lowers the block's output error."""
    checkpoints = pytest.importorskip("checkpoints")
    from hiquant.model import load_model
    folder, _, _ = checkpoints.write_checkpoint(tmp_path / "m", hidden=32, layers=2, inter=48,
                                                vocab=100, seed=5)
    model = load_model(folder)
    rng = np.random.default_rng(1)
    h = model.embed(rng.integers(0, 100, (6, 16)))
    names = model.block_linear_names(0)
    target = model.block_forward(0, h)
    plans = {n: LayerPlan(0, np.zeros(0, np.int64), 2, 2, 16) for n in names}
    init, layerwise = {}, {}
    for n in names:  # the layer-wise LWC of each linear on a Gram matrix of random inputs
        W = model.get_weight(n)
        X = rng.standard_normal((200, W.shape[1]))
        r = hybrid.quantize_layer(W, X.T @ X, 200, [], 2, 2, 16, lwc_iters=30, scale_bits=8)
        init[n], layerwise[n] = r.lwc_params, r.wq
    res0 = blockwise.quantize_block(model, 0, h, plans, targets=target, lwc_iters=0,
                                 adaround_iters=0, lwc_init=init, scale_bits=8)
    for n in names:
        np.testing.assert_array_equal(res0[n].wq, layerwise[n])
    for n in names:
        model.reset_weight(n)
    res = blockwise.quantize_block(model, 0, h, plans, targets=target, lwc_iters=60,
                                adaround_iters=0, lwc_init=init, lwc_lr=5e-3, batch_size=6,
                                scale_bits=8)
    assert res[names[0]].loss_final < res0[names[0]].loss_final
    with pytest.raises(ValueError, match="lwc_init"):
        blockwise.quantize_block(model, 0, h, plans, targets=target, lwc_iters=0,
                              lwc_init={"nope": init[names[0]]})
    with pytest.raises(ValueError, match="lwc_init"):
        blockwise.quantize_block(model, 0, h, plans, targets=target, lwc_iters=0,
                              lwc_init={names[0]: init[names[0]][:, :1]})


def test_aug_loss_adds_the_error_against_the_second_target(tmp_path):
    """aug_targets (OmniQuant's aug_loss): each step's loss is the sum of the block's errors
    against both targets — at the first step (same weights, same seeded batch) exactly the sum of
    two single-target runs' first losses; a mis-shaped second target is refused."""
    checkpoints = pytest.importorskip("checkpoints")
    from hiquant.model import load_model
    folder, _, _ = checkpoints.write_checkpoint(tmp_path / "m", hidden=32, layers=2, inter=48,
                                                vocab=100, seed=7)
    model = load_model(folder)
    rng = np.random.default_rng(2)
    h = model.embed(rng.integers(0, 100, (4, 12)))
    names = model.block_linear_names(0)
    t1 = model.block_forward(0, h)
    t2 = model.block_forward(0, model.embed(rng.integers(0, 100, (4, 12))))
    plans = {n: LayerPlan(0, np.zeros(0, np.int64), 2, 2, 16) for n in names}
    kw = dict(lwc_iters=3, adaround_iters=0, batch_size=2, seed=4)

    def first_losses(**extra):
        for n in names:
            model.reset_weight(n)
        r = blockwise.quantize_block(model, 0, h, plans, **kw, **extra)[names[0]]
        return r.history["lwc"]["loss"], r.loss_final

    l1, _ = first_losses(targets=t1)
    l2, _ = first_losses(targets=t2)
    both, final = first_losses(targets=t1, aug_targets=t2)
    assert both[0] == pytest.approx(l1[0] + l2[0], rel=1e-12)
    assert both[1] != pytest.approx(l1[1] + l2[1], rel=1e-9)  # the updates differ from there
    # loss_final is the error against ``targets`` alone
    out = model.block_forward(0, h)
    assert final == pytest.approx(blockwise.block_loss(out, t1)[0], rel=1e-9)
    with pytest.raises(ValueError, match="aug_targets"):
        blockwise.quantize_block(model, 0, h, plans, targets=t1, aug_targets=t2[:2], **kw)


def test_block_driver_keeps_fixed_high_columns_and_refines_the_clipping_around_them(tmp_path):
    """high_fixed: the given (AdaRound) high columns are the block's throughout and are returned
    unchanged, bit for bit; the clipping is still learned (the block error goes down from the
    layer-wise start); a high part of the wrong shape or for a plan without one is refused."""
    checkpoints = pytest.importorskip("checkpoints")
    from hiquant.model import load_model
    folder, _, _ = checkpoints.write_checkpoint(tmp_path / "m", hidden=32, layers=2, inter=48,
                                                vocab=100, seed=9)
    model = load_model(folder)
    rng = np.random.default_rng(3)
    h = model.embed(rng.integers(0, 100, (6, 16)))
    names = model.block_linear_names(0)
    target = model.block_forward(0, h)
    plans, init, fixed = {}, {}, {}
    for n in names:
        W = model.get_weight(n)
        hi = np.sort(rng.choice(W.shape[1], 4, replace=False)).astype(np.int64)
        plans[n] = LayerPlan(4, hi, 2, 3, 16, 0.1)
        X = rng.standard_normal((200, W.shape[1]))
        r = hybrid.quantize_layer(W, X.T @ X, 200, hi, 2, 3, 16, lwc_iters=30, adaround_iters=40,
                                  scale_bits=8)
        init[n], fixed[n] = r.lwc_params, r.high
    kw = dict(targets=target, adaround_iters=50, lwc_init=init, high_fixed=fixed, scale_bits=8,
              batch_size=6)
    res0 = blockwise.quantize_block(model, 0, h, plans, lwc_iters=0, **kw)
    for n in names:
        model.reset_weight(n)
    res = blockwise.quantize_block(model, 0, h, plans, lwc_iters=60, lwc_lr=5e-3, **kw)
    assert "adaround" not in res[names[0]].history  # nothing left to round
    assert res[names[0]].loss_final < res0[names[0]].loss_final
    for n in names:
        assert res[n].high is fixed[n]
        np.testing.assert_array_equal(res[n].wq[:, plans[n].high_idx], fixed[n].wq)
        np.testing.assert_array_equal(res[n].to_layer(n).dequantize(), res[n].wq)
        assert not np.array_equal(res[n].lwc_params, init[n])
    two_columns = hybrid.quantize_layer(model.get_weight(names[0]), np.eye(32), 32,
                                        plans[names[0]].high_idx[:2], 2, 3, 16, lwc_iters=5,
                                        adaround_iters=5).high
    bad = {**fixed, names[0]: two_columns}
    with pytest.raises(ValueError, match="high_fixed"):
        blockwise.quantize_block(model, 0, h, plans, lwc_iters=0, **{**kw, "high_fixed": bad})
    no_high = {n: LayerPlan(0, np.zeros(0, np.int64), 2, 2, 16) for n in names}
    with pytest.raises(ValueError, match="high_fixed"):
        blockwise.quantize_block(model, 0, h, no_high, targets=target, lwc_iters=0,
                              high_fixed={names[0]: fixed[names[0]]})


def test_cosine_schedule_starts_at_the_learning_rate_and_decays_to_zero(tmp_path):
    """lwc_schedule='cosine': lr at step 0, half of it midway, decreasing, ~0 at the last step;
    a one-step cosine run is the constant run exactly; an unknown schedule is refused."""
    lrs = [blockwise.cosine_lr(1e-2, t, 10) for t in range(10)]
    assert lrs[0] == 1e-2 and lrs[5] == pytest.approx(5e-3, rel=1e-12)
    assert all(a > b for a, b in zip(lrs, lrs[1:])) and 0 < lrs[-1] < 3e-4
    checkpoints = pytest.importorskip("checkpoints")
    from hiquant.model import load_model
    folder, _, _ = checkpoints.write_checkpoint(tmp_path / "m", hidden=32, layers=2, inter=48,
                                                vocab=100, seed=11)
    model = load_model(folder)
    h = model.embed(np.random.default_rng(5).integers(0, 100, (4, 12)))
    names = model.block_linear_names(0)
    plans = {n: LayerPlan(0, np.zeros(0, np.int64), 2, 2, 16) for n in names}
    target = model.block_forward(0, h)

    def run(iters, schedule):
        for n in names:
            model.reset_weight(n)
        return blockwise.quantize_block(model, 0, h, plans, targets=target, lwc_iters=iters,
                                     adaround_iters=0, batch_size=2, lwc_schedule=schedule)

    one_c, one_k = run(1, "cosine"), run(1, "constant")
    for n in names:
        np.testing.assert_array_equal(one_c[n].wq, one_k[n].wq)
    many_c, many_k = run(6, "cosine"), run(6, "constant")
    assert any(not np.array_equal(many_c[n].lwc_params, many_k[n].lwc_params) for n in names)
    with pytest.raises(ValueError, match="lwc_schedule"):
        run(1, "linear")
