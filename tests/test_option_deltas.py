"""Quantizer-aware perturbations for M (allocate.option_deltas kind="gptq") and the
Kronecker-factored estimator (estimator="kfac"), against float64 NumPy built from the
_reference twins; their settings and the pipeline's checks."""

from __future__ import annotations

import numpy as np
import pytest

import hiquant
import hiquant.allocate as A
from hiquant._reference import gptq as ref_gptq
from hiquant.config import QuantizeSettings, resolve
from hiquant.errors import InvalidArgumentError, InvalidTypeError
from hiquant.storage import QuantPart


def _layer(rows=24, cols=96, tokens=600, seed=0):
    rng = np.random.default_rng(seed)
    W = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    X = rng.standard_normal((tokens, cols))
    X = X @ (np.eye(cols) + 0.4 * rng.standard_normal((cols, cols)) / np.sqrt(cols))
    X[:, rng.choice(cols, 4, replace=False)] *= 8
    fc = np.abs(rng.standard_normal(cols)) + (np.arange(cols) % 7 == 0)
    return W, X.T @ X, fc


def _reference_delta(W, H, hi, b_low, b_high, g, scale_bits, act_order, percdamp):
    """The same construction from the float64 GPTQ twin and numpy least squares."""
    d_in = W.shape[1]
    lo = np.setdiff1d(np.arange(d_in), hi)
    perm = np.concatenate([lo, hi])
    Wp, Hp = W[:, perm], H[np.ix_(perm, perm)]
    dl = lo.size
    wq = np.zeros(Wp.shape)
    if dl:
        grid = QuantPart.from_weights(np.ascontiguousarray(Wp[:, :dl]), b_low, g,
                                      scale_bits=scale_bits)
        r = ref_gptq.gptq(Wp, Hp, b_low, g or None, percdamp, scale=grid.scale_f32(),
                          zero=grid.zero, n_quant=dl, act_order=act_order)
        wq[:, :dl] = r["wq"]
    if dl < d_in:
        E = wq[:, :dl] - Wp[:, :dl].astype(np.float64)
        Hh = Hp[dl:, dl:]
        damp = percdamp * np.mean(np.diag(Hp))
        Wh = Wp[:, dl:].astype(np.float64) - np.linalg.solve(
            Hh + damp * np.eye(d_in - dl), (E @ Hp[:dl, dl:]).T).T
        Wh = Wh.astype(np.float32)
        grid = QuantPart.from_weights(Wh, b_high, g, scale_bits=scale_bits)
        r = ref_gptq.gptq(Wh, Hh, b_high, g or None, percdamp, scale=grid.scale_f32(),
                          zero=grid.zero, act_order=act_order)
        wq[:, dl:] = r["wq"]
    out = np.empty(W.shape)
    out[:, perm] = wq
    return out - W


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("b_low,b_high,g,scale_bits", [(2, 3, 32, 6), (3, 4, 0, 16)])
def test_gptq_deltas_equal_the_float64_reference_construction(act_order, b_low, b_high, g,
                                                               scale_bits):
    W, H, fc = _layer(seed=b_low)
    cand = (0.0, 0.1, 0.3, 1.0)  # no high column, some, all
    got = A.option_deltas(W, fc, cand, b_low, b_high, g, kind="gptq", gram=H,
                          scale_bits=scale_bits, act_order=act_order)
    for beta, D in zip(cand, got):
        hi = A.high_columns(fc, A.ratio_to_k(beta, W.shape[1]))
        want = _reference_delta(W, H, hi, b_low, b_high, g, scale_bits, act_order, 0.01)
        assert D.dtype == np.float32 and D.shape == W.shape
        np.testing.assert_allclose(D, want, rtol=0, atol=1e-6)


def test_gptq_deltas_keep_fp16_high_columns_at_their_float16_rounding():
    W, H, fc = _layer(seed=5)
    D = A.option_deltas(W, fc, (0.2,), 2, 16, 32, kind="gptq", gram=H)[0]
    hi = A.high_columns(fc, A.ratio_to_k(0.2, W.shape[1]))
    np.testing.assert_array_equal(D[:, hi], W[:, hi].astype(np.float16).astype(np.float32) - W[:, hi])


def test_gptq_deltas_lower_the_gram_weighted_error_of_round_to_nearest():
    # the point of quantizer-aware Δ's: GPTQ's codes leave a smaller tr(Δ H Δᵀ) than RTN at the
    # same split, which the rtn Δ's would overstate for the layers GPTQ handles well
    W, H, fc = _layer(seed=11)
    cand = (0.05, 0.2)
    for kind_r, kind_g in zip(A.option_deltas(W, fc, cand, 2, 3, 32),
                              A.option_deltas(W, fc, cand, 2, 3, 32, kind="gptq", gram=H,
                                              scale_bits=16)):
        r, g = kind_r.astype(np.float64), kind_g.astype(np.float64)
        assert np.trace(g @ H @ g.T) < 0.9 * np.trace(r @ H @ r.T)


def test_option_deltas_raise_on_bad_input():
    W, H, fc = _layer()
    with pytest.raises(InvalidArgumentError, match="kind"):
        A.option_deltas(W, fc, (0.1,), kind="hessian")
    with pytest.raises(InvalidArgumentError, match="gram"):
        A.option_deltas(W, fc, (0.1,), kind="gptq")
    with pytest.raises(InvalidTypeError, match="float64"):
        A.option_deltas(W, fc, (0.1,), kind="gptq", gram=H.astype(np.float32))
    with pytest.raises(InvalidArgumentError, match="shape"):
        A.option_deltas(W, fc, (0.1,), kind="gptq", gram=H[:10, :10])


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    from hiquant.stats import collect_stats
    folder, _, _ = tiny_checkpoint("LlamaForCausalLM", layers=2, hidden=32, inter=48, heads=4,
                                   kv_heads=2, vocab=64, seed=3)
    model = hiquant.load_model(folder)
    ids = np.random.default_rng(0).integers(0, 64, size=(4, 16)).astype(np.int64)
    st = collect_stats(model, ids, gram=True, fisher=True, progress=False)
    return model, ids, st


@pytest.mark.parametrize("option_delta", ["rtn", "gptq"])
def test_kfac_estimator_is_the_row_weighted_gram_form_of_each_delta(tiny, option_delta):
    model, ids, st = tiny
    cand = (0.0, 0.1, 0.25)
    sm = A.sensitivity_matrix(model, ids, estimator="kfac", fisher_col=st.fisher_col,
                              fisher=st.fisher, grams=st.gram, candidates=cand, group_size=8,
                              option_delta=option_delta, scale_bits=16)
    K = len(cand)
    assert sm.estimator == "kfac" and sm.settings["option_delta"] == option_delta
    for li, n in enumerate(sm.names):
        H = st.gram[n]
        r = st.fisher[n].astype(np.float64).sum(axis=1) / np.trace(H)
        for m, D in enumerate(A.option_deltas(model.get_weight(n), st.fisher_col[n], cand, 2, 3,
                                              8, kind=option_delta, gram=H, scale_bits=16)):
            D = D.astype(np.float64)
            want = sum(r[o] * (D[o] @ H @ D[o]) for o in range(D.shape[0]))
            assert sm.M[li * K + m, li * K + m] == pytest.approx(want, rel=1e-10)
    assert np.count_nonzero(sm.M - np.diag(np.diag(sm.M))) == 0


def test_kfac_equals_the_diagonal_estimator_for_a_kronecker_fisher_and_uncorrelated_inputs(tiny):
    # F_oi = r_o H_ii with a diagonal H: the Kronecker form is exact and has no cross terms, so
    # both estimators give the same M
    model, ids, st = tiny
    rng = np.random.default_rng(1)
    grams, fisher = {}, {}
    for n in model.linear_names():
        d_out, d_in = model.linear_shape(n)
        h = rng.uniform(0.5, 3.0, d_in)
        grams[n] = np.diag(h)
        fisher[n] = (rng.uniform(0.1, 2.0, d_out)[:, None] * h[None, :]).astype(np.float32)
    kw = dict(fisher_col=st.fisher_col, fisher=fisher, candidates=(0.0, 0.25), group_size=8)
    kfac = A.sensitivity_matrix(model, ids, estimator="kfac", grams=grams, **kw)
    diag = A.sensitivity_matrix(model, ids, estimator="diagonal", **kw)
    np.testing.assert_allclose(kfac.M, diag.M, rtol=1e-5)


def test_kfac_and_gptq_deltas_need_their_statistics(tiny):
    model, ids, st = tiny
    with pytest.raises(InvalidArgumentError, match="grams"):
        A.sensitivity_matrix(model, ids, estimator="kfac", fisher_col=st.fisher_col,
                             fisher=st.fisher)
    with pytest.raises(InvalidArgumentError, match="fisher"):
        A.sensitivity_matrix(model, ids, estimator="kfac", fisher_col=st.fisher_col,
                             grams=st.gram)
    with pytest.raises(InvalidArgumentError, match="grams"):
        A.sensitivity_matrix(model, ids, estimator="diagonal", fisher_col=st.fisher_col,
                             fisher=st.fisher, option_delta="gptq")
    with pytest.raises(InvalidArgumentError, match="option_delta"):
        A.sensitivity_matrix(model, ids, estimator="diagonal", fisher_col=st.fisher_col,
                             fisher=st.fisher, option_delta="lwc")


def test_settings_check_option_delta_and_refuse_kfac_on_the_torch_backend():
    with pytest.raises(InvalidArgumentError, match="option_delta"):
        resolve(QuantizeSettings(method="hiq", avg_bits=2.3, option_delta="awq"))
    s = resolve(QuantizeSettings(method="hiq", avg_bits=2.3, estimator="kfac",
                                 option_delta="gptq"))
    assert s.estimator == "kfac" and s.option_delta == "gptq"
    with pytest.raises(InvalidArgumentError, match="torch"):
        resolve(QuantizeSettings(method="hiq", avg_bits=2.3, estimator="kfac", backend="torch",
                                 device="cpu"))


def test_pipeline_runs_kfac_with_gptq_deltas_and_records_them(tiny_checkpoint, tmp_path):
    from hiquant.datasets import embedded_calib_path
    folder, _, _ = tiny_checkpoint("LlamaForCausalLM")
    rep = hiquant.quantize(folder, embedded_calib_path(), method="hiq", wbits=2, group_size=16,
                           avg_bits=2.95, estimator="kfac", option_delta="gptq", n_calib=4,
                           seqlen=32, lwc_iters=2, adaround_iters=2, objective="layer",
                           progress=False)
    assert rep.settings["estimator"] == "kfac" and rep.settings["option_delta"] == "gptq"
    assert rep.allocation["estimator"] == "kfac"
    assert rep.avg_bits <= 2.95
