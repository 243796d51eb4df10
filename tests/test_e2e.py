"""End-to-end tuning (hiquant.e2e): its scale gradients against brute force, the stored-precision
rounding of tuned scales, what a tuning run may and may not change, and its settings."""

from __future__ import annotations

import numpy as np
import pytest

from hiquant import QuantizeSettings
from hiquant.config import resolve
from hiquant.e2e import norm_names, part_scale_grad, tune, with_scales
from hiquant.errors import InvalidArgumentError
from hiquant.model import load_model
from hiquant.storage import QuantizedLayer, QuantPart


def _part(rng, d_out=12, n_cols=70, bits=2, group=32, scale_bits=6):
    W = rng.standard_normal((d_out, n_cols)).astype(np.float32)
    return QuantPart.from_weights(W, bits, group, scale_bits=scale_bits)


@pytest.mark.parametrize("scale_bits", [16, 8, 6])
@pytest.mark.parametrize("group", [32, 0, 64])
def test_part_scale_grad_equals_the_directional_derivative_of_each_group_scale(scale_bits, group):
    # the weights are linear in each group's scale: d<dW, W(s)>/ds_g computed by brute force,
    # one group at a time, in float64 from the part's codes and zeros (ragged last group: 70
    # columns in groups of 32 or 64)
    rng = np.random.default_rng(0)
    part = _part(rng, group=group, scale_bits=scale_bits)
    dW = rng.standard_normal(part.codes.shape)
    got = part_scale_grad(part, dW)
    d_out, n = part.codes.shape
    g = group if 0 < group < n else n
    starts = list(range(0, n, g))
    assert got.shape == (d_out, len(starts)) and got.dtype == np.float64
    for r in range(d_out):
        for gi, c0 in enumerate(starts):
            cols = slice(c0, min(c0 + g, n))
            dWg = dW[r, cols]
            q = part.codes[r, cols].astype(np.float64) - float(part.zero[r, gi])
            assert got[r, gi] == pytest.approx(float(np.dot(dWg, q)), rel=1e-12, abs=1e-12)


def test_part_scale_grad_rejects_a_wrong_shape():
    part = _part(np.random.default_rng(1))
    with pytest.raises(InvalidArgumentError, match="dW has shape"):
        part_scale_grad(part, np.zeros((3, 3)))


@pytest.mark.parametrize("scale_bits", [16, 8, 6])
def test_with_scales_rounds_to_the_stored_precision_and_keeps_codes_and_zeros(scale_bits):
    rng = np.random.default_rng(2)
    part = _part(rng, scale_bits=scale_bits)
    same = with_scales(part, part.scale_f32())
    np.testing.assert_array_equal(same.scale, part.scale)  # the stored scales are fixed points
    moved = with_scales(part, part.scale_f32() * 1.07)
    np.testing.assert_array_equal(moved.codes, part.codes)
    np.testing.assert_array_equal(moved.zero, part.zero)
    assert moved.scale_bits == part.scale_bits
    s = moved.scale_f32()
    if scale_bits == 16:
        np.testing.assert_array_equal(s, (part.scale_f32() * 1.07).astype(np.float16)
                                      .astype(np.float32))
    else:  # the nearest code under the unchanged super-scales (codes 1..2**bits - 1)
        np.testing.assert_array_equal(moved.scale_super, part.scale_super)
        cmax = 2 ** scale_bits - 1
        sup = part.scale_super.astype(np.float64)[np.arange(12) // part.super_rows][:, None]
        target = np.clip(part.scale_f32() * 1.07, sup, cmax * sup)
        assert np.all(np.abs(s - target) <= 0.5 * sup * (1 + 1e-6))
        assert np.any(moved.scale == cmax)  # the block's largest scale cannot grow past it


def _rtn_model(tiny_llama, scale_bits=6):
    folder, cfg, _ = tiny_llama
    m = load_model(folder)
    layers = {}
    for n in m.linear_names():
        W = m.get_weight(n)
        k = W.shape[1] // 8
        layers[n] = QuantizedLayer.rtn(n, W, 2, 16, high_idx=np.arange(0, W.shape[1], 8)[:k],
                                       b_high=3, scale_bits=scale_bits)
        m.set_weight(n, layers[n])
    windows = np.random.default_rng(0).integers(0, cfg["vocab_size"], (6, 16))
    return m, layers, windows


def test_tuning_lowers_the_training_loss_and_changes_only_scales_and_norms(tiny_llama):
    m, layers, windows = _rtn_model(tiny_llama)
    before = {k: m.get_norm_weight(k) for k in norm_names(m)}
    tuned, info = tune(m, windows, layers, epochs=3, batch=2, norm_lr=1e-2, scale_lr=1e-2, seed=0)
    assert len(info["epoch_loss"]) == 3
    assert info["epoch_loss"][-1] < info["epoch_loss"][0]
    changed_scales = 0
    for n, ql in layers.items():
        t = tuned[n]
        assert t.storage_bits() == ql.storage_bits()
        np.testing.assert_array_equal(t.high_idx, ql.high_idx)
        for a, b in ((t.low, ql.low), (t.high, ql.high)):
            np.testing.assert_array_equal(a.codes, b.codes)
            np.testing.assert_array_equal(a.zero, b.zero)
            np.testing.assert_array_equal(a.scale_super, b.scale_super)
            changed_scales += int(np.sum(a.scale != b.scale))
        np.testing.assert_array_equal(m.get_weight(n), t.dequantize())  # set in the model
    assert changed_scales > 0
    assert any(not np.array_equal(m.get_norm_weight(k), before[k]) for k in before)


def test_tuning_with_zero_rates_changes_nothing_and_is_independent_of_threads(tiny_llama):
    m, layers, windows = _rtn_model(tiny_llama)
    norms = {k: m.get_norm_weight(k) for k in norm_names(m)}
    same, _ = tune(m, windows, layers, epochs=1, batch=3, norm_lr=0, scale_lr=0, seed=0)
    for n in layers:
        np.testing.assert_array_equal(same[n].dequantize(), layers[n].dequantize())
    for k, w in norms.items():
        np.testing.assert_array_equal(m.get_norm_weight(k), w)

    results = []
    for threads in (1, 2):
        m, layers, windows = _rtn_model(tiny_llama)
        tuned, info = tune(m, windows, layers, epochs=2, batch=3, norm_lr=1e-2, scale_lr=1e-2,
                           seed=4, n_threads=threads)
        results.append(({n: ql.dequantize() for n, ql in tuned.items()},
                        {k: m.get_norm_weight(k) for k in norm_names(m)}, info["epoch_loss"]))
    (w1, n1, l1), (w2, n2, l2) = results
    assert l1 == l2
    for n in w1:
        np.testing.assert_array_equal(w1[n], w2[n])
    for k in n1:
        np.testing.assert_array_equal(n1[k], n2[k])


def test_tune_rejects_bad_arguments(tiny_llama):
    m, layers, windows = _rtn_model(tiny_llama)
    with pytest.raises(InvalidArgumentError, match="epochs and batch"):
        tune(m, windows, layers, epochs=0, batch=1, norm_lr=1e-3, scale_lr=0, seed=0)
    with pytest.raises(InvalidArgumentError, match="learning rates"):
        tune(m, windows, layers, epochs=1, batch=1, norm_lr=-1.0, scale_lr=0, seed=0)


def test_e2e_epochs_auto_tunes_hiquants_learned_methods_only():
    assert resolve(QuantizeSettings(method="hiq", avg_bits=2.3, backend="numpy")).e2e_epochs == 2
    assert resolve(QuantizeSettings(method="lwc", backend="numpy")).e2e_epochs == 2
    for method in ("rtn", "gptq", "awq"):
        assert resolve(QuantizeSettings(method=method, backend="numpy")).e2e_epochs == 0
    assert resolve(QuantizeSettings(method="gptq", e2e_epochs=1, backend="numpy")).e2e_epochs == 1


@pytest.mark.parametrize("bad, match", [
    (dict(e2e_epochs=-1), "e2e_epochs must be"),
    (dict(e2e_epochs="two"), "e2e_epochs must be"),
    (dict(e2e_norm_lr=-1e-3), "e2e_norm_lr must be"),
    (dict(e2e_scale_lr=float("nan")), "e2e_scale_lr must be"),
    (dict(e2e_epochs=1, e2e_norm_lr=0, e2e_scale_lr=0), "trains nothing"),
    (dict(e2e_batch=0), "e2e_batch must be"),
])
def test_bad_e2e_settings_raise_clear_errors(bad, match):
    with pytest.raises(InvalidArgumentError, match=match):
        resolve(QuantizeSettings(method="lwc", backend="numpy", **bad))


def test_e2e_is_off_on_the_torch_backend_unless_asked_and_then_refused():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    kw = dict(method="lwc", backend="torch", device="cpu")
    assert resolve(QuantizeSettings(**kw)).e2e_epochs == 0
    with pytest.raises(InvalidArgumentError, match="NumPy backend only"):
        resolve(QuantizeSettings(e2e_epochs=1, **kw))
