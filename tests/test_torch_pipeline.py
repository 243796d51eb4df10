"""The pipeline's block loop on the torch runtime's device (hiquant.torch_pipeline): the device
passes equal the host passes, the device Gram matrices equal the NumPy runtime's, the device
kernels (rtn, gptq, lwc, adaround) give the host kernels' codes, the torch backend gives the NumPy
backend's plans and perplexities, and a killed run resumes."""

from __future__ import annotations

import numpy as np
import pytest

import hiquant
from hiquant import pipeline
from hiquant.datasets import embedded_calib_path, embedded_model_path, embedded_test_path
from hiquant.model import load_model
from hiquant.runtime import DeviceRuntime
from hiquant.stats import block_grams
from tolerances import REDUCE_RTOL

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hiquant import torch_pipeline  # noqa: E402
from hiquant.torch_runtime import load_torch_model  # noqa: E402

# small runs of the embedded model (4 blocks, hidden 128): seconds each on the CPU
RUN = dict(wbits=3, group_size=32, n_calib=8, seqlen=128, eval_seqlen=256, eval_windows=8,
           progress=False)


def _ids(cfg, B=3, T=16, seed=1):
    return np.random.default_rng(seed).integers(0, cfg["vocab_size"], (B, T))


def test_torch_model_is_a_device_runtime_and_the_numpy_model_is_not(tiny_llama):
    assert isinstance(load_torch_model(tiny_llama[0]), DeviceRuntime)
    assert not isinstance(load_model(tiny_llama[0]), DeviceRuntime)


def test_device_passes_and_captures_equal_the_host_passes(tiny_llama):
    folder, cfg, _ = tiny_llama
    m = load_torch_model(folder)
    ids = _ids(cfg)
    h, hd = m.embed(ids), m.embed_device(ids)
    np.testing.assert_array_equal(m.to_host(hd), h)
    for b in range(m.num_blocks):
        ch, cd = {}, {}
        out = m.block_forward(b, h, capture=lambda n, X: ch.__setitem__(n, X.copy()))
        outd = m.block_forward_device(b, hd, capture=lambda n, X: cd.__setitem__(n, X.clone()))
        assert isinstance(outd, torch.Tensor) and outd.device == m.device
        np.testing.assert_array_equal(m.to_host(outd), out)
        assert list(cd) == list(ch) == m.block_linear_names(b)
        for n in ch:
            np.testing.assert_array_equal(cd[n].numpy(), ch[n])
        h, hd = out, outd
    np.testing.assert_array_equal(m.to_host(m.to_device(h)), h)


def test_device_passes_raise_on_bad_input(tiny_llama):
    folder, cfg, _ = tiny_llama
    m = load_torch_model(folder)
    h = m.embed(_ids(cfg))
    with pytest.raises(hiquant.InvalidTypeError, match="to_device"):
        m.block_forward_device(0, h)
    with pytest.raises(hiquant.InvalidTypeError, match="float32"):
        m.block_forward_device(0, torch.from_numpy(h).double())
    with pytest.raises(hiquant.InvalidArgumentError, match="shape"):
        m.block_forward_device(0, torch.from_numpy(h[:, :, :5].copy()))
    with pytest.raises(IndexError):
        m.block_forward_device(9, m.to_device(h))
    with pytest.raises(hiquant.InvalidTypeError, match="float32"):
        m.to_device(h.astype(np.float64))


def test_device_block_grams_equal_the_numpy_runtimes(tiny_llama):
    folder, cfg, _ = tiny_llama
    a, t = load_model(folder), load_torch_model(folder)
    ids = _ids(cfg, B=5, T=24)
    h = a.embed(ids)
    hd = torch_pipeline.embed_windows(t, ids, 2)
    for b in range(a.num_blocks):
        want = block_grams(a, b, h, batch_size=2, n_threads=1)
        got = torch_pipeline.block_grams(t, b, hd, batch_size=2)
        for g in a.input_groups(b):
            assert all(got[n] is got[g[0]] for n in g)  # one object per shared input
        for n, w in want.items():
            G = got[n].gram
            assert got[n].n_tokens == w.n_tokens == 5 * 24
            np.testing.assert_allclose(G, w.gram, rtol=REDUCE_RTOL,
                                       atol=REDUCE_RTOL * np.abs(w.gram).max())
            np.testing.assert_allclose(got[n].abs_sum, w.abs_sum, rtol=REDUCE_RTOL)
            np.testing.assert_allclose(got[n].abs_max, w.abs_max, rtol=REDUCE_RTOL)
            np.testing.assert_array_equal(G, got[n].gram_device.numpy())
        h = a.block_forward(b, h)
        hd = torch_pipeline.block_outputs(t, b, hd, 2)


def _packed(folder):
    from safetensors.numpy import load_file
    return load_file(str(folder / "packed" / "model.safetensors"))


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_device_block_loop_exports_the_host_loops_bytes(method, tmp_path, monkeypatch):
    """Same runtime (torch), block loop on the device vs the host loop with the C++ kernels:
    the same tensors except where float32 sums in another order move a value across a rounding
    boundary (Gram chunk sums, GPTQ's lazy updates). rtn has no sums: identical bytes. For gptq
    one such flip changes the next blocks' inputs, so it cascades: measured 1 scale of one layer
    (perplexity within 1e-5) on an AVX2 CPU, and on an AVX-512 one a scale in block 1 growing to
    206 of 592,000 stored values by block 3 (3.5e-4, perplexity 0.09% apart). The bounds (1e-3
    of the values, 0.5% perplexity) hold such cascades; a wrong kernel moves far more."""
    kw = dict(RUN, method=method, backend="torch", device="cpu", export="packed",
              eval_text=embedded_test_path())
    rd = hiquant.quantize(embedded_model_path(), embedded_calib_path(), out=tmp_path / "d", **kw)
    monkeypatch.setattr(torch_pipeline, "enabled", lambda model, s: False)
    rh = hiquant.quantize(embedded_model_path(), embedded_calib_path(), out=tmp_path / "h", **kw)
    a, b = _packed(tmp_path / "d"), _packed(tmp_path / "h")
    assert a.keys() == b.keys()
    differ = sum(int((a[k] != b[k]).sum()) for k in a)
    total = sum(a[k].size for k in a)
    if method == "rtn":  # no sums: identical
        assert differ == 0 and rd.ppl == pytest.approx(rh.ppl, rel=1e-9)
    assert differ <= 1e-3 * total, f"{differ} of {total} stored values differ"
    assert rd.ppl == pytest.approx(rh.ppl, rel=5e-3)
    assert [x["name"] for x in rd.layers] == [x["name"] for x in rh.layers]
    assert rd.avg_bits == rh.avg_bits


# The torch runtime's float32 forward (transformers' layers) rounds differently from the NumPy
# runtime's, so the Gram matrices differ by ~1e-6 relative and GPTQ flips a few codes that sit
# at a half step. Measured relative differences in perplexity on this run: rtn 5e-8, gptq 5e-8 on
# an AVX2 CPU; on an AVX-512 one gptq 8.8e-4 (one scale of block 1 flipped, and the flip cascades
# through the later blocks' inputs: the test above); with n_calib=16, seqlen=256 gptq differs by
# 2.0e-4, identically with the host loop (the device kernels add nothing there).
@pytest.mark.parametrize("method,rtol", [("rtn", 1e-4), ("gptq", 5e-3)])
def test_torch_backend_gives_the_numpy_backends_perplexity_on_the_embedded_model(method, rtol):
    kw = dict(RUN, method=method, eval_text=embedded_test_path())
    rn = hiquant.quantize(embedded_model_path(), embedded_calib_path(), backend="numpy", **kw)
    rt = hiquant.quantize(embedded_model_path(), embedded_calib_path(), backend="torch",
                          device="cpu", **kw)
    assert rt.avg_bits == rn.avg_bits
    assert rt.ppl == pytest.approx(rn.ppl, rel=rtol)


def test_torch_backend_gives_the_numpy_backends_hiq_allocation_on_the_embedded_model():
    kw = dict(RUN, method="hiq", wbits=2, group_size=64, avg_bits=2.3, lwc_iters=2,
              adaround_iters=2, m_windows=2)
    rn = hiquant.quantize(embedded_model_path(), embedded_calib_path(), backend="numpy", **kw)
    rt = hiquant.quantize(embedded_model_path(), embedded_calib_path(), backend="torch",
                          device="cpu", **kw)
    assert [(x["name"], x["k"]) for x in rt.layers] == [(x["name"], x["k"]) for x in rn.layers]
    assert rt.avg_bits == rn.avg_bits


def test_a_killed_torch_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    kw = dict(RUN, method="gptq", backend="torch", device="cpu", eval_text=embedded_test_path())
    want = hiquant.quantize(embedded_model_path(), embedded_calib_path(), **kw)
    real = pipeline._quantize_block

    def killed_at_block_2(model, b, *a, **k):
        if b == 2:
            raise KeyboardInterrupt
        return real(model, b, *a, **k)

    monkeypatch.setattr(pipeline, "_quantize_block", killed_at_block_2)
    with pytest.raises(KeyboardInterrupt):
        hiquant.quantize(embedded_model_path(), embedded_calib_path(),
                         progress_dir=tmp_path / "p", **kw)
    monkeypatch.setattr(pipeline, "_quantize_block", real)
    got = hiquant.quantize(embedded_model_path(), embedded_calib_path(),
                           progress_dir=tmp_path / "p", resume=True, **kw)
    assert got.ppl == pytest.approx(want.ppl, rel=1e-6)


@pytest.mark.parametrize("kind", ["lwc", "adaround", "gptq", "rtn"])
def test_layer_quantizers_on_device_statistics_store_the_host_kernels_codes(kind):
    """One layer through the method registry: device statistics (torch parts and kernels) vs the
    same statistics on the host (C++ parts): lwc and adaround follow the same 20-step trajectory
    (identical codes and scales on three seeds measured; float32 rounding could flip a code at a
    half step, hence the 0.5% allowance), the same losses."""
    from hiquant.allocate import LayerPlan
    from hiquant.config import QuantizeSettings, resolve
    from hiquant.methods import quantizer
    from hiquant.stats import LayerStats
    from test_gptq import _layer
    W, H = _layer(48, 96, 400, seed=11)
    s = resolve(QuantizeSettings(method=kind, objective="layer", wbits=3, group_size=32,
                                 lwc_iters=20, adaround_iters=20, lwc_lr=1e-2, adaround_lr=1e-2,
                                 backend="torch", device="cpu"))
    plan = LayerPlan(0, np.zeros(0, np.int64), 3, 3, 32)
    zeros = np.zeros(96)
    dz = torch.zeros(96, dtype=torch.float64)
    method = quantizer(s.layer_quantizer)
    got = method.quantize("l", W, torch_pipeline.DeviceLayerStats(torch.from_numpy(H), 400, dz, dz),
                          plan, s)
    want = method.quantize("l", W, LayerStats(H, 400, zeros, zeros), plan,
                           s.replace(backend="numpy"))
    assert got.low.codes.shape == want.low.codes.shape
    flips = int((got.low.codes != want.low.codes).sum())
    assert flips <= (0 if kind in ("gptq", "rtn") else 0.005 * W.size), flips
    if flips == 0:
        np.testing.assert_array_equal(got.low.scale, want.low.scale)
    assert set(got.info) == set(want.info)
    for key in ("loss_rtn", "loss_final"):
        if key in want.info:
            assert got.info[key] == pytest.approx(want.info[key], rel=1e-6)


@pytest.mark.parametrize("method", ["lwc", "adaround"])
def test_lwc_and_adaround_on_the_torch_backend_give_the_numpy_backends_result(tiny_llama, method,
                                                                              tmp_path):
    folder, _, _ = tiny_llama
    text = tmp_path / "calib.txt"
    text.write_text("Pack my box with five dozen liquor jugs. " * 200)
    # e2e_epochs=0: end-to-end tuning runs on the NumPy backend only (resolve refuses it on torch)
    kw = dict(method=method, objective="layer", wbits=3, group_size=16, n_calib=8, seqlen=32,
              lwc_iters=10, adaround_iters=10, eval_text=text, eval_seqlen=32, eval_windows=6,
              e2e_epochs=0, progress=False)
    rn = hiquant.quantize(folder, text, backend="numpy", **kw)
    rt = hiquant.quantize(folder, text, backend="torch", device="cpu", **kw)
    assert [sorted(x) for x in rt.layers] == [sorted(x) for x in rn.layers]
    assert rt.avg_bits == rn.avg_bits
    assert rt.ppl == pytest.approx(rn.ppl, rel=1e-4)


def test_device_backward_and_head_loss_equal_the_host_passes(tiny_llama):
    folder, cfg, _ = tiny_llama
    m = load_torch_model(folder)
    ids = _ids(cfg, B=2)
    h = m.embed(ids)
    out, c = m.block_forward(0, h, cache=True)
    outd, cd = m.block_forward_device(0, m.to_device(h), cache=True)
    np.testing.assert_array_equal(m.to_host(outd), out)
    losses, dh = m.head_loss(out, ids, grad=True)
    lossesd, dhd = m.head_loss_device(outd, ids, grad=True)
    np.testing.assert_array_equal(lossesd, losses)
    np.testing.assert_array_equal(m.to_host(dhd), dh)
    dx, grads = m.block_backward(0, c, dh)
    dxd, gradsd = m.block_backward_device(0, cd, dhd)
    np.testing.assert_array_equal(m.to_host(dxd), dx)
    assert list(gradsd) == list(grads)
    for n in grads:
        np.testing.assert_array_equal(gradsd[n].numpy(), grads[n])
    with pytest.raises(hiquant.InvalidArgumentError, match="already used"):
        m.block_backward_device(0, cd, dhd)


@pytest.mark.parametrize("fisher_full", [True, False])
def test_device_fisher_equals_the_numpy_runtimes(tiny_llama, fisher_full):
    from hiquant.stats import collect_stats
    folder, cfg, _ = tiny_llama
    windows = _ids(cfg, B=4, T=20, seed=5)
    want = collect_stats(load_model(folder), windows, gram=False, fisher=True, progress=False,
                         n_threads=1, fisher_full=fisher_full)
    t = load_torch_model(folder)
    got = torch_pipeline.collect_fisher(t, windows, progress=False, fisher_full=fisher_full)
    again = torch_pipeline.collect_fisher(t, windows, progress=False, fisher_full=fisher_full,
                                          recompute=True)
    assert got.n_sequences == want.n_sequences == 4
    assert list(got.fisher_col) == list(want.fisher_col)
    for n, c in want.fisher_col.items():
        np.testing.assert_allclose(got.fisher_col[n], c, rtol=REDUCE_RTOL,
                                   atol=REDUCE_RTOL * np.abs(c).max())
        np.testing.assert_array_equal(again.fisher_col[n], got.fisher_col[n])
        if fisher_full:
            F = want.fisher[n]
            np.testing.assert_allclose(got.fisher[n], F, rtol=REDUCE_RTOL,
                                       atol=REDUCE_RTOL * np.abs(F).max())
    assert bool(got.fisher) == fisher_full
    with pytest.raises(hiquant.InvalidArgumentError, match="Fisher only"):
        torch_pipeline.collect_fisher(t, windows, gram=True)
    with pytest.raises(hiquant.InvalidTypeError, match="integer"):
        torch_pipeline.collect_fisher(t, windows.astype(np.float32))


def test_device_fisher_is_cached_and_reloaded_by_load_or_collect(tiny_llama, tmp_path):
    from hiquant.stats import load_or_collect
    folder, cfg, _ = tiny_llama
    t = load_torch_model(folder)
    windows = _ids(cfg, B=2, T=16, seed=6)
    kw = dict(gram=False, fisher=True, progress=False, fisher_full=False,
              collect=torch_pipeline.collect_fisher)
    first = load_or_collect(tmp_path, t, windows, **kw)
    assert first.meta["device"] == str(t.device)
    assert len(list(tmp_path.glob("calib-stats-*.safetensors"))) == 1

    def must_not_run(*a, **k):
        raise AssertionError("collected again instead of loading the cache")

    again = load_or_collect(tmp_path, t, windows, **dict(kw, collect=must_not_run))
    for n, c in first.fisher_col.items():
        np.testing.assert_array_equal(again.fisher_col[n], c)
