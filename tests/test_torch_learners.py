"""LWC, AdaRound, Adam and the layer-wise Gram objective in torch (hiquant.torch_learners) against
the float64 references in hiquant._reference (forward, closed-form gradients, a few optimizer
steps, the export) and the C++ parts; bad input raises hiquant errors."""

from __future__ import annotations

import numpy as np
import pytest

import hiquant
from hiquant import learners as K
from hiquant._reference import adaround as ref_ada
from hiquant._reference import lwc as ref_lwc
from test_gptq import _layer
from tolerances import F32_ATOL, F32_RTOL, REDUCE_RTOL

torch = pytest.importorskip("torch")

from hiquant import torch_learners as TL  # noqa: E402


def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


def _close(got, want, rtol=REDUCE_RTOL):
    want = np.asarray(want, np.float64)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol,
                               atol=rtol * max(float(np.abs(want).max()), 1e-30))


GROUPS = [(3, 16), (2, None), (4, 24)]  # 24 leaves a ragged last group of 40 columns


@pytest.mark.parametrize("bits,group", GROUPS)
def test_lwc_forward_and_gradient_equal_the_float64_reference(bits, group):
    W, H = _layer(24, 40, 200, seed=bits)
    rng = np.random.default_rng(1)
    part = TL.TorchLWC(_t(W), bits, group)
    part.params.copy_(_t(rng.uniform(-1, 5, tuple(part.params.shape)).astype(np.float32)))
    gamma, beta = part.params[0].double().numpy(), part.params[1].double().numpy()
    _close(part.forward().numpy(), ref_lwc.forward(W, gamma, beta, bits, group), F32_RTOL)
    dwq = rng.standard_normal(W.shape).astype(np.float32)
    dg, db = ref_lwc.backward(W, gamma, beta, bits, group, dwq)
    got = part.backward(_t(dwq)).numpy()
    _close(got[0], dg, 1e-5)
    _close(got[1], db, 1e-5)
    native = K.LWC(W, bits, group)
    native.params = part.params.numpy()
    np.testing.assert_allclose(part.forward().numpy(), native.forward(), rtol=F32_RTOL,
                               atol=F32_ATOL)


def _ref_lwc_fit(W, H, n, bits, group, steps, lr):
    ng = ref_lwc.group_ranges(W, group)[0].shape[1]
    p = np.full((2, W.shape[0], ng), 4.0)
    m, v = np.zeros_like(p), np.zeros_like(p)
    losses = []
    for t in range(1, steps + 1):
        wq = ref_lwc.forward(W, p[0], p[1], bits, group)
        loss, g = ref_lwc.gram_loss(W, wq, H, n)
        losses.append(loss)
        grad = np.stack(ref_lwc.backward(W, p[0], p[1], bits, group, g))
        p, m, v = ref_lwc.adam_step(p, grad, m, v, t, lr)
    return p, losses


def test_lwc_steps_follow_the_float64_reference_trajectory():
    W, H = _layer(24, 48, 300, seed=5)
    part = TL.TorchLWC(_t(W), 3, 16, lr=1e-2)
    losses = TL.fit(_t(W), _t(H), 300.0, 6, lwc=part)
    want_p, want_losses = _ref_lwc_fit(W, H, 300.0, 3, 16, 6, 1e-2)
    _close(losses, want_losses, 1e-4)
    _close(part.params.numpy(), want_p, 1e-5)
    assert losses[-1] < losses[0]
    codes, s16, zero, wq = ref_lwc.export(W, part.params[0].double().numpy(),
                                          part.params[1].double().numpy(), 3, 16)
    q = part.export()
    np.testing.assert_array_equal(q.codes, codes)
    np.testing.assert_array_equal(q.scale.astype(np.float32), s16)
    np.testing.assert_array_equal(q.zero, zero)


@pytest.mark.parametrize("bits,group", GROUPS)
def test_adaround_init_forward_gradient_and_export_equal_the_float64_reference(bits, group):
    W, _ = _layer(24, 40, 200, seed=bits)
    rng = np.random.default_rng(2)
    part = TL.TorchAdaRound(_t(W), bits, group)
    st = ref_ada.init(W, bits, group)
    np.testing.assert_array_equal(part.scale.numpy(), st["scale"].astype(np.float32))
    np.testing.assert_array_equal(part.zero.numpy(), st["zero"])
    V = part.V.reshape(24, -1)[:, :40].double().numpy()
    _close(V, st["V"], 1e-5)
    _close(part.forward().numpy(), ref_ada.forward(st, V), F32_RTOL)
    np.testing.assert_array_equal(part.forward(hard=True).numpy(),
                                  ref_ada.forward(st, V, hard=True).astype(np.float32))
    dwq = rng.standard_normal(W.shape).astype(np.float32)
    for lam, b in ((0.0, 20.0), (0.01, 20.0), (0.01, 3.0)):
        got, reg = part.backward(_t(dwq), lam, b)
        want, wreg = ref_ada.backward(st, V, dwq, lam, b)
        _close(got.numpy(), want, 1e-4)
        assert reg == pytest.approx(wreg, rel=1e-5, abs=1e-12)
    codes, s, z, _ = ref_ada.export(st, V)
    q = part.export()
    np.testing.assert_array_equal(q.codes, codes)
    np.testing.assert_array_equal(q.zero, z)
    native = K.AdaRound(W, bits, group)
    np.testing.assert_array_equal(q.codes, native.export().codes)  # initial V: same hard codes


def test_adaround_scheduled_steps_follow_the_float64_reference():
    W, H = _layer(16, 48, 300, seed=7)
    iters = 10  # the regularizer turns on at step 2 (warm-up 0.2)
    part = TL.TorchAdaRound(_t(W), 2, 16, lr=1e-2, iters=iters)
    losses = TL.fit(_t(W), _t(H), 300.0, iters, adaround=part)
    st = ref_ada.init(W, 2, 16)
    V = st["V"].copy()
    m, v = np.zeros_like(V), np.zeros_like(V)
    want = []
    for t in range(1, iters + 1):
        loss, g = ref_lwc.gram_loss(W, ref_ada.forward(st, V), H, 300.0)
        want.append(loss)
        on, b = ref_ada.schedule_b(t, iters)
        dV, _ = ref_ada.backward(st, V, g, 0.01 if on else 0.0, b)
        V, m, v = ref_lwc.adam_step(V, dV, m, v, t, 1e-2)
    _close(losses, want, 1e-4)
    _close(part.V.reshape(16, -1)[:, :48].numpy(), V, 1e-4)
    assert part.t == iters


def test_adam_equals_the_reference_formula_with_decoupled_weight_decay():
    rng = np.random.default_rng(3)
    p0 = rng.standard_normal(50)
    p = _t(p0.astype(np.float32))
    opt = TL.TorchAdam(p, 1e-2, weight_decay=0.1)
    want, m, v = p0.copy(), np.zeros(50), np.zeros(50)
    for t in range(1, 6):
        g = rng.standard_normal(50)
        opt.step(_t(g.astype(np.float32)))
        want, m, v = ref_lwc.adam_step(want, g.astype(np.float32), m, v, t, 1e-2,
                                       weight_decay=0.1)
    _close(p.numpy(), want, 1e-5)
    assert opt.steps == 5


def test_gram_loss_equals_the_float64_reference():
    W, H = _layer(20, 64, 300, seed=9)
    Wq = (W + np.random.default_rng(0).standard_normal(W.shape) * 1e-3).astype(np.float32)
    loss, g = TL.gram_loss(_t(W), _t(Wq), _t(H), 300.0)
    wl, wg = ref_lwc.gram_loss(W, Wq, H, 300.0)
    assert loss == pytest.approx(wl, rel=REDUCE_RTOL)
    _close(g.numpy(), wg)


def test_learners_raise_on_bad_input():
    W, H = _layer(8, 32, 100)
    with pytest.raises(hiquant.InvalidTypeError, match="torch.Tensor"):
        TL.TorchLWC(W, 3, 16)
    with pytest.raises(hiquant.InvalidArgumentError, match="bits"):
        TL.TorchLWC(_t(W), 1, 16)
    with pytest.raises(hiquant.InvalidArgumentError, match="dwq has shape"):
        TL.TorchLWC(_t(W), 3, 16).backward(torch.zeros(8, 31))
    with pytest.raises(hiquant.InvalidArgumentError, match="warmup"):
        TL.TorchAdaRound(_t(W), 3, 16, warmup=1.0)
    with pytest.raises(hiquant.InvalidArgumentError, match="iters"):
        TL.TorchAdaRound(_t(W), 3, 16, iters=-1)
    with pytest.raises(hiquant.InvalidArgumentError, match="scale has shape"):
        TL.TorchAdaRound(_t(W), 3, 16, scale=torch.ones(8, 3))
    Wn = W.copy()
    Wn[1, 2] = np.nan
    with pytest.raises(hiquant.NumericalError, match="row 1, column 2"):
        TL.TorchAdaRound(_t(Wn), 3, 16)
    with pytest.raises(hiquant.InvalidArgumentError, match="exactly one"):
        TL.fit(_t(W), _t(H), 100.0, 2)
    with pytest.raises(hiquant.InvalidArgumentError, match="finite"):
        TL.TorchLWC(_t(W), 3, 16, lr=float("nan"))
