"""BiLLM (hiquant.methods.billm): the core step and the sweep against the float64 plain-loop twin
(hiquant._reference.billm), the α's and break points against brute force, the salient ranking,
the error against plain sign binarization, the exact storage and its packed round trip, bad input,
and the method end to end (exports, resume)."""

from __future__ import annotations

import numpy as np
import pytest

from hiquant import QuantizeSettings
from hiquant._reference import billm as ref
from hiquant.config import resolve
from hiquant.datasets import embedded_calib_path, embedded_model_path, embedded_test_path
from hiquant.errors import InvalidArgumentError, InvalidTypeError, NumericalError
from hiquant.methods import billm
from hiquant.storage import binary_storage_bits

FAST = dict(n_calib=8, seqlen=128, eval_seqlen=128, eval_windows=8)


def _layer(rng, d_out, d_in, n=96):
    W = rng.standard_normal((d_out, d_in)).astype(np.float32)
    W[:, rng.integers(0, d_in, 2)] *= 4.0  # a few large columns, as in LLM weights
    X = rng.standard_normal((n, d_in)) * rng.uniform(0.2, 3.0, d_in)
    return W, X.T @ X


@pytest.mark.parametrize("d_out,d_in,block", [(6, 20, 8), (5, 33, 16), (4, 24, 24), (7, 17, 5)])
def test_binarize_equals_the_float64_twin_on_random_layers(d_out, d_in, block):
    rng = np.random.default_rng(d_in * 31 + block)
    W, G = _layer(rng, d_out, d_in)
    G[3, :] = G[:, 3] = 0.0  # a dead input column
    res = billm.binarize(W, G, block)
    r = ref.billm(W, G, block)
    np.testing.assert_array_equal(res.part.salient, r["salient"])
    np.testing.assert_array_equal(res.part.alpha, r["alpha"])
    np.testing.assert_array_equal(res.part.sign, r["sign"])
    np.testing.assert_array_equal(res.part.sign2, r["sign2_full"][:, r["salient"]])
    np.testing.assert_array_equal(res.part.sparse, r["sparse_full"][:, ~r["salient"]])
    np.testing.assert_allclose(res.wq, r["wq"], rtol=1e-12, atol=1e-12)
    # the stored form reproduces the sweep's weights (float16 α's, float32 sums)
    np.testing.assert_allclose(res.part.dequantize(), r["wq"], rtol=1e-6, atol=1e-7)


def test_core_step_equals_the_twin_on_random_blocks():
    rng = np.random.default_rng(1)
    for m in (1, 2, 9, 16):
        Wb = rng.standard_normal((5, m)) * rng.uniform(0.1, 2.0, m)
        hd = rng.uniform(0.05, 1.0, m)
        bp = billm.block_params(Wb, hd)
        mask, alpha, p, errors = ref.block_params(Wb, hd)
        np.testing.assert_array_equal(bp.salient, mask)
        np.testing.assert_allclose(bp.alpha, alpha, rtol=1e-12, atol=1e-15)
        np.testing.assert_array_equal(bp.p, p)
        np.testing.assert_allclose(bp.errors, errors, rtol=1e-9, atol=1e-12)
        assert bp.error == pytest.approx(errors.min(), rel=1e-9)


def test_residual_alphas_are_the_least_squares_optima():
    rng = np.random.default_rng(2)
    X = rng.standard_normal((4, 11))
    a1, a2, err = billm.residual_alphas(X)
    grid = np.linspace(0.0, 3.0, 30001)
    for i in range(4):
        x = X[i]
        s1 = np.where(x >= 0, 1.0, -1.0)
        e1 = ((x[None, :] - grid[:, None] * s1[None, :]) ** 2).sum(axis=1)  # brute force α₁
        assert abs(grid[np.argmin(e1)] - a1[i]) <= grid[1]
        assert a1[i] == pytest.approx(x @ s1 / s1.size, rel=1e-12)  # closed form <x, s>/<s, s>
        r = x - a1[i] * s1
        s2 = np.where(r >= 0, 1.0, -1.0)
        e2 = ((r[None, :] - grid[:, None] * s2[None, :]) ** 2).sum(axis=1)
        assert abs(grid[np.argmin(e2)] - a2[i]) <= grid[1]
        assert a2[i] == pytest.approx(r @ s2 / s2.size, rel=1e-12)
        assert err[i] == pytest.approx(((r - a2[i] * s2) ** 2).sum(), rel=1e-12)


@pytest.mark.parametrize("integers", [False, True])  # integers: many equal magnitudes (ties)
def test_break_point_search_finds_the_brute_force_optimum_over_its_candidates(integers):
    rng = np.random.default_rng(3)
    X = rng.integers(-4, 5, (6, 14)).astype(np.float64) if integers else rng.laplace(size=(6, 14))
    p, ac, asp, err = billm.split_search(X)
    for i in range(X.shape[0]):
        a = np.abs(X[i])
        best = None
        for cand in [-np.inf] + sorted(set(a.tolist())):
            c, s = a[a <= cand], a[a > cand]
            e = ((c - (c.mean() if c.size else 0.0)) ** 2).sum() + \
                ((s - (s.mean() if s.size else 0.0)) ** 2).sum()
            if best is None or e < best[1] - 1e-12:
                best = (cand, e)
        assert p[i] == best[0]
        assert err[i] == pytest.approx(best[1], rel=1e-9, abs=1e-12)
        c, s = a[a <= p[i]], a[a > p[i]]
        assert ac[i] == pytest.approx(c.mean() if c.size else 0.0)
        assert asp[i] == pytest.approx(s.mean() if s.size else 0.0)
        tw = ref.split_row(X[i])
        assert tw[0] == p[i] and tw[3] == pytest.approx(err[i], rel=1e-9, abs=1e-12)


def test_salient_columns_rank_by_the_hessian_weighted_score():
    rng = np.random.default_rng(4)
    m = 12
    Wb = rng.standard_normal((8, m)) * 0.1
    Wb[:, 2] *= 5.0  # the largest weights, but a large [H⁻¹]_jj
    Wb[:, 7] *= 2.0  # smaller weights, a small [H⁻¹]_jj: the larger score
    hd = np.ones(m)
    hd[2], hd[7] = 10.0, 0.1
    s = billm.salient_scores(Wb, hd)
    np.testing.assert_allclose(s, (Wb ** 2).sum(axis=0) / hd ** 2)
    order = billm.salient_order(s)
    assert order[0] == 7 and list(order).index(2) > list(order).index(7)
    bp = billm.block_params(Wb, hd)
    k = int(bp.salient.sum())
    assert k >= 1
    assert set(np.flatnonzero(bp.salient)) == set(order[:k].tolist())  # the top-k by score
    assert bp.salient[7]


def test_billm_layer_error_is_lower_than_sign_binarization_with_per_row_alpha():
    rng = np.random.default_rng(5)
    W, G = _layer(rng, 48, 64, n=256)
    res = billm.binarize(W, G, 16)
    Wd = W.astype(np.float64)
    sign = np.where(Wd >= 0, 1.0, -1.0) * np.abs(Wd).mean(axis=1, keepdims=True)

    def err(Q):
        D = Q - Wd
        return float(np.einsum("ij,jk,ik->", D, G, D))

    assert err(res.part.dequantize().astype(np.float64)) < 0.5 * err(sign)


def test_storage_bits_count_exactly_what_the_packed_tensors_hold_and_round_trip():
    from hiquant.export import layer_entry, layer_tensors
    from hiquant.packed import layer_from_tensors
    from hiquant.storage import QuantizedLayer
    rng = np.random.default_rng(6)
    W, G = _layer(rng, 10, 40)
    res = billm.binarize(W, G, 16)
    ql = QuantizedLayer("x", 10, 40, np.zeros(0, np.int64), None, binary=res.part)
    part = res.part
    ns, nb, nsb = part.n_salient, 3, int(part.salient_blocks().size)
    bits = binary_storage_bits(10, 40, ns, nb, nsb)
    assert bits == 2 * 10 * 40 + 40 + 16 * 10 * (2 * nb + 2 * nsb)
    assert ql.storage_bits() == bits and ql.b_low == 1 and ql.group_size == 16
    tensors = layer_tensors(ql)
    bit_arrays = ("sign", "sign2", "sparse", "salient_mask")
    packed_bits = sum(8 * tensors[f"x.bin.{n}"].nbytes for n in bit_arrays) + sum(
        16 * t.size for n, t in tensors.items() if n.startswith("x.bin.alpha"))
    assert 0 <= packed_bits - bits < 8 * len(bit_arrays)  # up to one padding byte per bit array
    back = layer_from_tensors("x", layer_entry(ql), tensors)
    np.testing.assert_array_equal(back.dequantize(), ql.dequantize())
    assert back.storage_bits() == bits


def test_packed_reader_refuses_a_binary_layer_with_a_missing_tensor():
    from hiquant.errors import CheckpointError
    from hiquant.export import layer_entry, layer_tensors
    from hiquant.packed import layer_from_tensors
    from hiquant.storage import QuantizedLayer
    rng = np.random.default_rng(7)
    W, G = _layer(rng, 4, 16)
    ql = QuantizedLayer("x", 4, 16, np.zeros(0, np.int64), None,
                        binary=billm.binarize(W, G, 8).part)
    tensors = layer_tensors(ql)
    del tensors["x.bin.sparse"]
    with pytest.raises(CheckpointError, match="x.bin.sparse"):
        layer_from_tensors("x", layer_entry(ql), tensors)


@pytest.mark.parametrize("kw,match", [
    (dict(wbits=2), "wbits=1"),
    (dict(wbits=1, group_size=0), "positive group_size"),
    (dict(wbits=1, scale_bits=8), "float16"),
    (dict(wbits=1, quantizer="rtn"), "method 'billm'"),
    (dict(wbits=1, objective="block"), "objective"),
])
def test_bad_settings_raise_invalid_argument_naming_the_fix(kw, match):
    with pytest.raises(InvalidArgumentError, match=match):
        resolve(QuantizeSettings(method="billm", **kw))


def test_billm_quantizer_is_refused_for_other_methods_and_wbits_1_elsewhere():
    with pytest.raises(InvalidArgumentError, match="method 'billm'"):
        resolve(QuantizeSettings(method="gptq", wbits=1, quantizer="billm"))
    with pytest.raises(InvalidArgumentError, match="wbits"):
        resolve(QuantizeSettings(method="rtn", wbits=1))


def test_bad_layer_inputs_raise_hiquant_errors():
    rng = np.random.default_rng(8)
    W, G = _layer(rng, 4, 8)
    with pytest.raises(InvalidTypeError):
        billm.binarize(W.astype(np.float64), G, 4)
    with pytest.raises(InvalidArgumentError, match="gram"):
        billm.binarize(W, G[:4, :4], 4)
    with pytest.raises(InvalidArgumentError, match="block_size"):
        billm.binarize(W, G, 0)
    Wn = W.copy()
    Wn[0, 0] = np.nan
    with pytest.raises(NumericalError):
        billm.binarize(Wn, G, 4)
    with pytest.raises(NumericalError, match="positive definite"):
        billm.binarize(W, -np.eye(8), 4, percdamp=0.01)


@pytest.fixture(scope="module")
def model():
    from hiquant.model import load_model
    return load_model(embedded_model_path())


def test_billm_end_to_end_counts_its_bits_and_its_exports_reload_to_the_evaluated_model(
        model, tmp_path):
    from hiquant.evaluate import perplexity_of_text
    from hiquant.model import load_model
    from hiquant.packed import load_packed
    from hiquant.pipeline import quantize
    out = tmp_path / "billm"
    rep = quantize(embedded_model_path(), embedded_calib_path(), method="billm", wbits=1,
                   group_size=128, eval_text=embedded_test_path(), out=out, model=model,
                   progress=False, **FAST)
    exp = 0
    for L in rep.layers:
        d_out, d_in = L["d_out"], L["d_in"]
        ql_bits = L["bits"]
        assert L["b_low"] == 1 and L["k"] == 0
        nb = -(-d_in // 128)
        # 2 bits per weight + the mask + float16 α's: between (n_blocks) and (2 n_blocks) α pairs
        lo = binary_storage_bits(d_out, d_in, 0, nb, 0)
        assert lo <= ql_bits <= binary_storage_bits(d_out, d_in, 0, nb, nb)
        exp += ql_bits
    assert rep.total_bits == exp and rep.avg_bits == exp / rep.n_weights
    assert np.isfinite(rep.ppl)
    pm = load_packed(out / "packed")
    for name in model.linear_names()[:7]:
        np.testing.assert_array_equal(pm.get_weight(name), model.get_weight(name))
    ppl = perplexity_of_text(pm, embedded_test_path(), 128, 8, progress=False)["ppl"]
    assert ppl == pytest.approx(rep.ppl, rel=1e-5)
    fake = load_model(out / "fake")
    ppl = perplexity_of_text(fake, embedded_test_path(), 128, 8, progress=False)["ppl"]
    assert ppl == pytest.approx(rep.ppl, rel=2e-3)  # fp16 storage of the dequantized weights
    import json
    acc = json.loads((out / "packed" / "quantization_config.json").read_text())["accounting"]
    assert acc["storage_bits"] == rep.total_bits
    assert 0 <= 8 * acc["quantized_payload_bytes"] - rep.total_bits < 8 * 4 * len(rep.layers)


def test_billm_resumed_after_two_blocks_ends_identical_to_an_uninterrupted_run(model, tmp_path):
    from hiquant import pipeline
    from hiquant.pipeline import quantize
    kw = dict(method="billm", wbits=1, group_size=64, model=model, progress=False, **FAST)
    quantize(embedded_model_path(), embedded_calib_path(), out=tmp_path / "a", **kw)
    real = pipeline._quantize_block
    calls = []

    def dying(m, b, *a, **k):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(b)
        return real(m, b, *a, **k)

    pipeline._quantize_block = dying
    try:
        with pytest.raises(KeyboardInterrupt):
            quantize(embedded_model_path(), embedded_calib_path(), out=tmp_path / "b",
                     progress_dir=tmp_path / "prog", **kw)
    finally:
        pipeline._quantize_block = real
    quantize(embedded_model_path(), embedded_calib_path(), out=tmp_path / "b",
             progress_dir=tmp_path / "prog", resume=True, **kw)
    for sub in ("packed/model.safetensors", "fake/model.safetensors"):
        assert (tmp_path / "a" / sub).read_bytes() == (tmp_path / "b" / sub).read_bytes()


def test_cli_quantize_runs_billm_and_refuses_wbits_2(tmp_path, capsys):
    import json

    from hiquant import cli
    rc = cli.main(["quantize", str(embedded_model_path()), "--calib", str(embedded_calib_path()),
                   "--method", "billm", "--wbits", "2", "--out", str(tmp_path / "bad")])
    assert rc == 2 and "wbits=1" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    rc = cli.main(["quantize", str(embedded_model_path()), "--calib", str(embedded_calib_path()),
                   "--method", "billm", "--wbits", "1", "--group", "128", "--n-calib", "4",
                   "--seqlen", "64", "--quiet", "--export", "packed", "--out", str(tmp_path / "ok")])
    assert rc == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["method"] == "billm" and 2.0 < last["avg_bits"] < 3.0
