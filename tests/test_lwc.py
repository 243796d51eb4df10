"""LWC part: forward/backward/export against the float64 reference, finite differences, the
min-max RTN limit, PyTorch autograd trajectories, threads, and input errors."""

from __future__ import annotations

import numpy as np
import pytest

import hiquant
from hiquant import learners as K
from hiquant import quantizer as qz
from hiquant._reference import lwc as ref
from hiquant.storage import QuantPart
from tolerances import F32_ATOL, F32_RTOL, FD_RTOL, REDUCE_ATOL, REDUCE_RTOL

CASES = [(2, 32), (3, 64), (4, None), (3, 48)]  # (bits, group_size); 48 leaves a ragged group


def _layer(rows=24, cols=136, seed=0):
    rng = np.random.default_rng(seed)
    W = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    W[:, 3] *= 8  # an outlier column, so clipping matters
    return W


def _gram(cols, tokens=400, seed=1):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((tokens, cols))  # drawn first, then the mixing matrix
    X = X @ (np.eye(cols) + 0.2 * rng.standard_normal((cols, cols)) / np.sqrt(cols))
    return X, X.T @ X


def _random_params(lwc, seed=2):
    rng = np.random.default_rng(seed)
    return rng.uniform(0.0, 4.0, (2, lwc.shape[0], lwc.n_groups)).astype(np.float32)


@pytest.mark.parametrize("bits,group", CASES)
def test_lwc_forward_matches_reference(bits, group):
    W = _layer()
    lwc = K.LWC(W, bits, group)
    P = _random_params(lwc)
    lwc.params = P
    np.testing.assert_allclose(lwc.forward(), ref.forward(W, P[0], P[1], bits, group),
                               rtol=F32_RTOL, atol=F32_ATOL)
    s, z = lwc.scales()
    p = ref.params(W, P[0], P[1], bits, group)
    np.testing.assert_array_equal(s, p["scale"].astype(np.float32))
    np.testing.assert_array_equal(z, p["zero"].astype(np.uint8))


@pytest.mark.parametrize("bits,group", CASES)
def test_lwc_at_clip_one_equals_minmax_fake_quantize(bits, group):
    """gamma, beta -> +inf (sigmoid = 1 in double): bit-identical to the RTN primitive."""
    W = _layer()
    lwc = K.LWC(W, bits, group, init=40.0)
    np.testing.assert_array_equal(lwc.forward(), qz.fake_quantize(W, bits, group))
    s, z = lwc.scales()
    s_rtn, z_rtn = qz.minmax_params(W, bits, group)
    np.testing.assert_array_equal(s, s_rtn)
    np.testing.assert_array_equal(z, z_rtn)


@pytest.mark.parametrize("bits,group", CASES)
def test_lwc_gradient_matches_reference(bits, group):
    W = _layer()
    lwc = K.LWC(W, bits, group)
    P = _random_params(lwc)
    lwc.params = P
    d = np.random.default_rng(3).standard_normal(W.shape).astype(np.float32)
    g = lwc.backward(d)
    dg, db = ref.backward(W, P[0], P[1], bits, group, d)
    np.testing.assert_allclose(g[0], dg, rtol=REDUCE_RTOL, atol=REDUCE_ATOL)
    np.testing.assert_allclose(g[1], db, rtol=REDUCE_RTOL, atol=REDUCE_ATOL)


def _surrogate_loss(W, P, bits, group, frozen, H, N):
    """The loss through the straight-through surrogate: the rounding offsets c = rint(w/s) - w/s,
    the zero point and the clamp mask frozen at the point `frozen` was taken. Its exact
    derivative is what the STE backward computes."""
    maxq = 2**bits - 1
    p = ref.params(W, P[0], P[1], bits, group)
    W64 = W.astype(np.float64)
    wq = np.empty_like(W64)
    for j, (a, e) in enumerate(p["bounds"]):
        s = ((p["hi"] * p["sg"] - p["lo"] * p["sb"]) / maxq)[:, j:j + 1]  # unrounded scale
        c, z, inr, v = frozen["c"][:, a:e], frozen["z"][:, j:j + 1], frozen["in"][:, a:e], frozen["v"][:, a:e]
        wq[:, a:e] = s * (np.where(inr, W64[:, a:e] / s + c + z, v) - z)
    loss, _ = ref.gram_loss(W, wq, H, N)
    return loss


def _freeze(W, P, bits, group):
    maxq = 2**bits - 1
    p = ref.params(W, P[0], P[1], bits, group)
    W64 = W.astype(np.float64)
    c = np.empty_like(W64)
    inr = np.empty(W64.shape, bool)
    v = np.empty_like(W64)
    z = p["zero"]
    for j, (a, e) in enumerate(p["bounds"]):
        qs = W64[:, a:e] / p["scale"][:, j:j + 1]
        r = np.rint(qs)
        c[:, a:e] = r - qs
        vv = r + z[:, j:j + 1]
        inr[:, a:e] = (vv >= 0) & (vv <= maxq)
        v[:, a:e] = np.clip(vv, 0, maxq)
    return dict(c=c, z=z, **{"in": inr}, v=v)


@pytest.mark.parametrize("bits,group", [(2, 32), (3, None)])
def test_lwc_gradient_matches_finite_differences(bits, group):
    """Central differences of the layer loss through the straight-through surrogate (rounding,
    zero and clamp mask frozen) against the native backward of the native Gram gradient."""
    W = _layer(rows=8, cols=64)
    X, H = _gram(64)
    N = X.shape[0]
    lwc = K.LWC(W, bits, group)
    P = _random_params(lwc).astype(np.float64)
    lwc.params = P.astype(np.float32)
    P = lwc.params.astype(np.float64)
    obj = K.LayerwiseObjective(W, H, N)
    obj.set_columns(0, lwc.forward())
    _, dwq = obj.evaluate()
    g = lwc.backward(dwq).astype(np.float64)
    frozen = _freeze(W, P, bits, group)
    eps = 1e-6
    rng = np.random.default_rng(5)
    for _ in range(12):
        idx = (rng.integers(2), rng.integers(P.shape[1]), rng.integers(P.shape[2]))
        Pp, Pm = P.copy(), P.copy()
        Pp[idx] += eps
        Pm[idx] -= eps
        fd = (_surrogate_loss(W, Pp, bits, group, frozen, H, N)
              - _surrogate_loss(W, Pm, bits, group, frozen, H, N)) / (2 * eps)
        # the native scale is float32, so the analytic value carries ~1e-7 relative error
        assert g[idx] == pytest.approx(fd, rel=max(FD_RTOL, 1e-3), abs=1e-6 * (1 + abs(fd)))


def test_lwc_export_reproduces_wq_with_fp16_scales():
    W = _layer()
    lwc = K.LWC(W, 3, 32)
    lwc.params = _random_params(lwc)
    ex = lwc.export()
    assert ex.codes.dtype == np.uint8 and ex.codes.max() <= 7
    assert ex.scale.dtype == np.float16  # the stored precision
    part = QuantPart(3, 32, ex.codes, ex.scale.astype(np.float16), ex.zero)
    np.testing.assert_array_equal(part.dequantize(), ex.wq)
    c, s, z, wq = ref.export(W, *lwc.params, 3, 32)
    np.testing.assert_array_equal(ex.codes, c)
    np.testing.assert_array_equal(ex.scale_f32(), s)
    np.testing.assert_array_equal(ex.zero, z)


def test_lwc_adamw_step_matches_reference_update():
    W = _layer()
    lwc = K.LWC(W, 2, 64, lr=1e-2, weight_decay=0.1)
    d = np.random.default_rng(7).standard_normal(W.shape).astype(np.float32)
    p = lwc.params.astype(np.float64)
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t in range(1, 4):
        g = lwc.backward(d).astype(np.float64)
        lwc.step(d)
        p, m, v = ref.adam_step(p, g, m, v, t, 1e-2, weight_decay=0.1)
        np.testing.assert_allclose(lwc.params, p, rtol=1e-6, atol=1e-6)


def test_lwc_results_identical_for_1_and_2_threads():
    W = _layer(rows=300, cols=256)
    X, H = _gram(256)
    out = []
    for nt in (1, 2):
        lwc = K.LWC(W, 2, 64, n_threads=nt)
        obj = K.LayerwiseObjective(W, H, X.shape[0], n_threads=nt)
        r = K.fit(obj, 15, lwc=lwc)
        out.append((lwc.params, lwc.forward(), r.loss, lwc.export().codes))
    for a, b in zip(*out):
        np.testing.assert_array_equal(a, b)


def test_lwc_bad_inputs_raise_clear_errors():
    W = _layer()
    with pytest.raises(TypeError, match="float32"):
        K.LWC(W.astype(np.float64), 3, 32)
    with pytest.raises(ValueError, match="2-dimensional"):
        K.LWC(W[0], 3, 32)
    with pytest.raises(ValueError, match="bits"):
        K.LWC(W, 9, 32)
    with pytest.raises(ValueError, match="bits"):
        K.LWC(W, 1, 32)
    with pytest.raises(TypeError, match="bits"):
        K.LWC(W, 3.0, 32)
    with pytest.raises(ValueError, match="group_size"):
        K.LWC(W, 3, -5)
    with pytest.raises(ValueError, match="C-contiguous"):
        K.LWC(np.asfortranarray(W), 3, 32)
    bad = W.copy()
    bad[2, 5] = np.nan
    with pytest.raises(hiquant.NumericalError, match="row 2, column 5"):
        K.LWC(bad, 3, 32)
    lwc = K.LWC(W, 3, 32)
    with pytest.raises(ValueError, match="dwq"):
        lwc.backward(np.zeros((3, 3), np.float32))
    with pytest.raises(hiquant.NumericalError, match="dwq"):
        lwc.backward(np.full(W.shape, np.inf, np.float32))
    with pytest.raises(ValueError, match="values"):
        lwc.params = np.zeros((2, 1, 1), np.float32)
    with pytest.raises(hiquant.NumericalError):
        lwc.params = np.full((2, W.shape[0], lwc.n_groups), np.nan, np.float32)
    with pytest.raises(ValueError, match="lr"):
        K.LWC(W, 3, 32, lr=-1.0)


def _torch_lwc_loss(torch, W, gamma, beta, bits, group, H, N):
    """Straightforward autograd version of the same objective (float64 compute, the scale
    rounded to float32 with a straight-through cast as the native part stores it)."""
    maxq = 2**bits - 1
    rows, cols = W.shape
    g = group if group else cols
    Wt = torch.from_numpy(W.astype(np.float64))
    Wg = Wt.reshape(rows, cols // g, g)
    lo = torch.clamp(Wg.amin(-1), max=0.0)
    hi = torch.clamp(Wg.amax(-1), min=0.0)
    hi_c = hi * torch.sigmoid(gamma.double())
    lo_c = lo * torch.sigmoid(beta.double())
    s = torch.clamp((hi_c - lo_c) / maxq, 1e-5, 1e4)
    s = s + (s.float().double() - s).detach()
    z = torch.clamp(torch.round(-lo_c / s), 0, maxq).detach()
    x = Wg / s[..., None]
    xi = x + (torch.round(x) - x).detach()
    q = torch.clamp(xi + z[..., None], 0, maxq)
    wq = ((q - z[..., None]) * s[..., None]).reshape(rows, cols).float()
    E = wq.double() - Wt
    return ((E @ torch.from_numpy(H)) * E).sum() / N


def test_lwc_loss_trajectory_matches_torch_autograd():
    torch = pytest.importorskip("torch")
    bits, group = 2, 32
    W = _layer(rows=16, cols=128)
    X, H = _gram(128)
    N = X.shape[0]
    steps = 25
    lwc = K.LWC(W, bits, group, lr=1e-2)
    obj = K.LayerwiseObjective(W, H, N)
    native = K.fit(obj, steps, lwc=lwc).loss
    gamma = torch.full((16, 4), 4.0, dtype=torch.float32, requires_grad=True)
    beta = torch.full((16, 4), 4.0, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.AdamW([gamma, beta], lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = _torch_lwc_loss(torch, W, gamma, beta, bits, group, H, N)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    np.testing.assert_allclose(native, losses, rtol=1e-4)
    assert losses[-1] < losses[0]
    np.testing.assert_allclose(lwc.params[0], gamma.detach().numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits,group", [(2, 64), (3, 32), (2, None)])
def test_lwc_incremental_evaluation_follows_the_product_trajectory(bits, group):
    """The incremental evaluator (per-row quadratic forms updated where codes change) computes the
    same loss and gradients as one product per step: over 200 Adam steps the two trajectories
    agree to float rounding, and the auto mode picks the incremental path."""
    W = _layer(rows=64, cols=256, seed=3)
    X, H = _gram(256, tokens=1000)
    runs = {}
    for mode in ("gemm", "incremental", "auto"):
        lwc = K.LWC(W, bits, group, lr=1e-2)
        obj = K.LayerwiseObjective(W, H, X.shape[0])
        r = K.fit(obj, 200, lwc=lwc, lwc_eval=mode)
        runs[mode] = (r, lwc.params, lwc.export().codes)
    g, inc, auto = runs["gemm"], runs["incremental"], runs["auto"]
    assert not g[0].incremental and inc[0].incremental and auto[0].incremental
    np.testing.assert_allclose(inc[0].loss, g[0].loss, rtol=1e-5)
    # Adam normalizes each parameter's gradient, so where a gradient is ~0 float rounding can move
    # a parameter by a few lr-sized steps; the parameters are O(4), lr 1e-2.
    np.testing.assert_allclose(inc[1], g[1], atol=2e-2)
    assert np.median(np.abs(inc[1] - g[1])) < 1e-5
    assert np.mean(inc[2] != g[2]) < 1e-4
    assert inc[0].changes is not None and inc[0].changes.shape == (200,)
    with pytest.raises(ValueError, match="lwc_eval"):
        K.fit(K.LayerwiseObjective(W, H, 10), 1, lwc=K.LWC(W, 2, 64), lwc_eval="fast")
