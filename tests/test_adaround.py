"""AdaRound part: initialization, forward/backward/export against the float64 reference, finite
differences, the schedule, PyTorch autograd trajectories, threads and input errors."""

from __future__ import annotations

import numpy as np
import pytest

import hiquant
from hiquant import learners as K
from hiquant import quantizer as qz
from hiquant._reference import adaround as ref
from hiquant._reference import lwc as ref_lwc
from hiquant.storage import QuantPart
from tolerances import F32_ATOL, F32_RTOL, FD_RTOL, REDUCE_ATOL, REDUCE_RTOL

CASES = [(2, 32), (3, 64), (4, None), (3, 48)]


def _layer(rows=20, cols=112, seed=0):
    rng = np.random.default_rng(seed)
    W = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    W[:, 1] *= 6
    return W


def _gram(cols, tokens=300, seed=1):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((tokens, cols))  # drawn first, then the mixing matrix
    X = X @ (np.eye(cols) + 0.2 * rng.standard_normal((cols, cols)) / np.sqrt(cols))
    return X, X.T @ X


@pytest.mark.parametrize("bits,group", CASES)
def test_adaround_init_sets_h_to_the_fractional_part(bits, group):
    W = _layer()
    a = K.AdaRound(W, bits, group)
    st = ref.init(W, bits, group)
    np.testing.assert_allclose(a.params, st["V"], rtol=1e-5, atol=1e-5)
    rest = W.astype(np.float64) / ref._expand(st["scale"], st["bounds"])
    rest -= np.floor(rest)
    np.testing.assert_allclose(ref.h_of(a.params), rest, atol=2e-6)
    # the soft forward reproduces W wherever it lies on the quantization grid's range
    np.testing.assert_allclose(a.forward(), ref.forward(st, st["V"]), rtol=F32_RTOL, atol=F32_ATOL)


@pytest.mark.parametrize("bits,group", CASES)
def test_adaround_forward_and_backward_match_reference(bits, group):
    W = _layer()
    a = K.AdaRound(W, bits, group)
    st = ref.init(W, bits, group)
    rng = np.random.default_rng(4)
    V = rng.normal(0.0, 3.0, W.shape).astype(np.float32)  # includes clipped h (|V| > 2.4)
    a.params = V
    np.testing.assert_allclose(a.forward(), ref.forward(st, V), rtol=F32_RTOL, atol=F32_ATOL)
    np.testing.assert_array_equal(a.forward(hard=True), ref.forward(st, V, hard=True).astype(np.float32))
    d = rng.standard_normal(W.shape).astype(np.float32)
    for lam, b in ((0.0, 20.0), (0.01, 20.0), (0.05, 2.0), (0.01, 7.3)):
        g, reg = a.backward(d, lam, b)
        gr, regr = ref.backward(st, V, d, lam, b)
        np.testing.assert_allclose(g, gr, rtol=REDUCE_RTOL, atol=REDUCE_ATOL)
        assert reg == pytest.approx(regr, rel=1e-5, abs=1e-9)
        assert a.reg_loss(lam, b) == pytest.approx(ref.reg_loss(V, lam, b), rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("lam,b", [(0.0, 20.0), (0.02, 3.0)])
def test_adaround_gradient_matches_finite_differences(lam, b):
    """Central differences of layer loss + regularizer in V (|V| < 2, so no clip kink is crossed)
    against the native backward of the native Gram gradient."""
    bits, group = 3, 32
    W = _layer(rows=6, cols=64)
    X, H = _gram(64)
    N = X.shape[0]
    a = K.AdaRound(W, bits, group)
    st = ref.init(W, bits, group)
    rng = np.random.default_rng(6)
    V = rng.uniform(-1.9, 1.9, W.shape).astype(np.float32)
    a.params = V
    obj = K.LayerwiseObjective(W, H, N)
    obj.set_columns(0, a.forward())
    _, dwq = obj.evaluate()
    g, _ = a.backward(dwq, lam, b)

    def f(Vx):
        loss, _ = ref_lwc.gram_loss(W, ref.forward(st, Vx), H, N)
        return loss + ref.reg_loss(Vx, lam, b)

    V64 = V.astype(np.float64)
    eps = 1e-5
    for _ in range(15):
        idx = (rng.integers(W.shape[0]), rng.integers(W.shape[1]))
        Vp, Vm = V64.copy(), V64.copy()
        Vp[idx] += eps
        Vm[idx] -= eps
        fd = (f(Vp) - f(Vm)) / (2 * eps)
        assert g[idx] == pytest.approx(fd, rel=max(FD_RTOL, 2e-3), abs=1e-5 * (1 + abs(fd)))


def test_adaround_final_codes_are_integers_in_range_and_reproduce_wq():
    W = _layer()
    a = K.AdaRound(W, 3, 32)
    a.params = np.random.default_rng(8).normal(0, 3, W.shape).astype(np.float32)
    ex = a.export()
    assert ex.codes.dtype == np.uint8 and ex.codes.max() <= 7
    assert ex.scale.dtype == np.float16  # the stored precision
    part = QuantPart(3, 32, ex.codes, ex.scale.astype(np.float16), ex.zero)
    np.testing.assert_array_equal(part.dequantize(), ex.wq)
    np.testing.assert_array_equal(ex.wq, a.forward(hard=True))
    c, s, z, wq = ref.export(ref.init(W, 3, 32), a.params)
    np.testing.assert_array_equal(ex.codes, c)
    np.testing.assert_array_equal(ex.scale_f32(), s)
    np.testing.assert_array_equal(ex.zero, z)


def test_adaround_codes_are_floor_or_floor_plus_one():
    """AdaRound only chooses between floor(w / scale) and the step above it (then clamps)."""
    W = _layer()
    a = K.AdaRound(W, 4, 32)
    a.params = np.random.default_rng(9).normal(0, 5, W.shape).astype(np.float32)
    st = ref.init(W, 4, 32)
    codes = a.export().codes
    down, up = np.clip(st["base"], 0, 15), np.clip(st["base"] + 1, 0, 15)
    assert np.all((codes == down) | (codes == up))
    assert np.any(codes == up) and np.any((codes == down) & (down != up))


def test_adaround_schedule_follows_brecq():
    assert K.adaround_schedule(1, 100) == (False, 20.0)
    assert K.adaround_schedule(19, 100) == (False, 20.0)
    assert K.adaround_schedule(20, 100) == (True, 20.0)
    assert K.adaround_schedule(60, 100) == (True, pytest.approx(11.0))
    assert K.adaround_schedule(100, 100) == (True, 2.0)
    for t in (1, 37, 100):
        assert K.adaround_schedule(t, 100) == ref.schedule_b(t, 100)


def test_adaround_results_identical_for_1_and_2_threads():
    W = _layer(rows=400, cols=192)
    X, H = _gram(192)
    out = []
    for nt in (1, 2):
        a = K.AdaRound(W, 3, 64, iters=20, n_threads=nt)
        obj = K.LayerwiseObjective(W, H, X.shape[0], n_threads=nt)
        r = K.fit(obj, 20, adaround=a)
        out.append((a.params, r.loss, r.reg, a.export().codes))
    for x, y in zip(*out):
        np.testing.assert_array_equal(x, y)


def test_adaround_bad_inputs_raise_clear_errors():
    W = _layer()
    with pytest.raises(TypeError, match="float32"):
        K.AdaRound(W.astype(np.float16), 3, 32)
    with pytest.raises(ValueError, match="bits"):
        K.AdaRound(W, 0, 32)
    with pytest.raises(ValueError, match="warmup"):
        K.AdaRound(W, 3, 32, warmup=1.5)
    bad = W.copy()
    bad[0, 0] = np.inf
    with pytest.raises(hiquant.NumericalError):
        K.AdaRound(bad, 3, 32)
    a = K.AdaRound(W, 3, 32)
    with pytest.raises(ValueError, match="exponent b"):
        a.backward(np.zeros(W.shape, np.float32), 0.01, 0.5)
    with pytest.raises(ValueError, match="dwq"):
        a.backward(np.zeros((W.shape[0], W.shape[1] - 1), np.float32))
    obj = K.LayerwiseObjective(W, np.eye(W.shape[1]), 10)
    with pytest.raises(ValueError, match="iters"):
        K.fit(obj, 7, adaround=a)  # a.iters is 5000


def test_adaround_loss_trajectory_matches_torch_autograd():
    torch = pytest.importorskip("torch")
    bits, group, steps = 3, 32, 30
    W = _layer(rows=12, cols=96)
    X, H = _gram(96)
    N = X.shape[0]
    a = K.AdaRound(W, bits, group, iters=steps, lam=0.01, warmup=0.2)
    obj = K.LayerwiseObjective(W, H, N)
    r = K.fit(obj, steps, adaround=a)

    st = ref.init(W, bits, group)
    s = torch.from_numpy(ref._expand(st["scale"], st["bounds"]))
    z = torch.from_numpy(ref._expand(st["zero"], st["bounds"]))
    base = torch.from_numpy(st["base"])
    Wt = torch.from_numpy(W.astype(np.float64))
    Ht = torch.from_numpy(H)
    V = torch.tensor(st["V"].astype(np.float32), requires_grad=True)
    opt = torch.optim.Adam([V], lr=1e-3)
    losses, regs = [], []
    for t in range(1, steps + 1):
        opt.zero_grad()
        h = torch.clamp(torch.sigmoid(V) * 1.2 - 0.1, 0, 1).double()
        wq = (s * (torch.clamp(base + h, 0, 2**bits - 1) - z)).float().double()
        E = wq - Wt
        rec = ((E @ Ht) * E).sum() / N
        on, b = K.adaround_schedule(t, steps)
        reg = 0.01 * (1 - ((h - 0.5).abs() * 2).pow(b)).sum() if on else torch.zeros((), dtype=torch.float64)
        (rec + reg).backward()
        opt.step()
        losses.append(rec.item())
        regs.append(reg.item())
    np.testing.assert_allclose(r.loss, losses, rtol=1e-4)
    np.testing.assert_allclose(r.reg, regs, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(a.params, V.detach().numpy(), rtol=1e-4, atol=1e-5)


def test_adaround_with_given_scales_equals_the_default_when_given_its_own():
    """scale= replaces the min-max float16 scales (8-bit storage passes its rounded ones); given
    the very scales the default computes, everything is identical; bad scales are refused."""
    rng = np.random.default_rng(4)
    W = (rng.standard_normal((20, 72)) * 0.05).astype(np.float32)
    a = K.AdaRound(W, 3, 32)
    s = a.export().scale_f32()
    b = K.AdaRound(W, 3, 32, scale=np.ascontiguousarray(s))
    np.testing.assert_array_equal(a.params, b.params)
    np.testing.assert_array_equal(a.forward(), b.forward())
    ea, eb = a.export(), b.export()
    np.testing.assert_array_equal(ea.codes, eb.codes)
    np.testing.assert_array_equal(ea.zero, eb.zero)
    from hiquant.storage import scale8
    s8 = np.ascontiguousarray(scale8(s)[0])
    c = K.AdaRound(W, 3, 32, scale_bits=8)  # 8-bit storage: learned on its double-quantized scales
    np.testing.assert_array_equal(c.export().scale_f32(), s8)
    ex = c.export()
    np.testing.assert_array_equal(ex.wq, qz.dequantize(ex.codes, s8, ex.zero, 3, 32))
    d = K.AdaRound(W, 3, 32, scale=s8)  # float16 storage: given scales are rounded as stored
    np.testing.assert_array_equal(d.export().scale_f32(), s8.astype(np.float16).astype(np.float32))
    with pytest.raises(ValueError, match="scale must have shape"):
        K.AdaRound(W, 3, 32, scale=np.ones((20, 2), np.float32))
    with pytest.raises(hiquant.NumericalError, match="positive"):
        K.AdaRound(W, 3, 32, scale=np.zeros((20, 3), np.float32))
