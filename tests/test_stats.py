"""Calibration statistics: native Gram/Fisher kernels against the float64 reference, collection
against per-sequence gradients and captured inputs, determinism, caching."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from hiquant import _core
from hiquant._reference import stats as ref
from hiquant.errors import HiquantError, InvalidArgumentError, NumericalError
from hiquant.model import load_model
from hiquant.stats import (
    CalibStats,
    collect_stats,
    fisher_accumulate,
    gram_accumulate,
    load_or_collect,
    stats_key,
)
from tolerances import REDUCE_ATOL, REDUCE_RTOL


def _scaled_err(G, want):
    """Entry-wise error relative to sqrt(G_ii G_jj), the scale of a Gram entry."""
    d = np.sqrt(np.outer(np.diag(want), np.diag(want)))
    return float((np.abs(G - want) / np.where(d > 0, d, 1.0)).max())


# --------------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("n,d", [(1, 1), (7, 5), (300, 96), (513, 97), (1000, 200), (256, 384)])
def test_gram_matches_float64_reference_for_edge_shapes(n, d):
    rng = np.random.default_rng(n * 1000 + d)
    X = (rng.standard_normal((n, d)) * rng.lognormal(0, 1, d)).astype(np.float32)
    G0 = np.zeros((d, d))
    G = G0.copy()
    gram_accumulate(G, X)
    want = ref.gram_accumulate(G0, X)
    assert _scaled_err(G, want) < 1e-6
    assert np.array_equal(G, G.T), "the Gram matrix must stay exactly symmetric"


def test_gram_accumulates_across_calls_and_chunks():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((900, 40)).astype(np.float32)
    G = np.zeros((40, 40))
    for r0 in range(0, 900, 250):
        gram_accumulate(G, X[r0:r0 + 250])
    assert _scaled_err(G, ref.gram_accumulate(np.zeros((40, 40)), X)) < 1e-6


def test_gram_chunked_float32_is_more_accurate_than_one_float32_sum():
    rng = np.random.default_rng(2)
    X = (1.0 + rng.standard_normal((20000, 16))).astype(np.float32)  # large means: hard case
    want = ref.gram_accumulate(np.zeros((16, 16)), X)
    errs = {}
    for R in (256, 20000):
        G = np.zeros((16, 16))
        _core.gram_accumulate(G, X, 1, R)
        errs[R] = _scaled_err(G, want)
    assert errs[256] < 1e-6 < errs[20000]


def test_gram_identical_for_any_thread_count():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((777, 300)).astype(np.float32)
    out = []
    for nt in (1, 2, 3, 4):
        G = np.zeros((300, 300))
        gram_accumulate(G, X, n_threads=nt)
        out.append(G)
    for G in out[1:]:
        np.testing.assert_array_equal(G, out[0])


def test_gram_rejects_bad_input_without_touching_g():
    X = np.ones((4, 3), np.float32)
    G = np.zeros((3, 3))
    with pytest.raises(TypeError, match="float32"):
        gram_accumulate(G, X.astype(np.float64))
    with pytest.raises(TypeError, match="float64"):
        gram_accumulate(G.astype(np.float32), X)
    with pytest.raises(ValueError, match="shape"):
        gram_accumulate(np.zeros((4, 4)), X)
    with pytest.raises(ValueError, match="C-contiguous"):
        gram_accumulate(G, np.ones((3, 4), np.float32).T)
    bad = X.copy()
    bad[2, 1] = np.inf
    with pytest.raises(NumericalError, match="NaN or Inf"):
        gram_accumulate(G, bad)
    np.testing.assert_array_equal(G, 0)
    asym = np.zeros((3, 3))
    asym[0, 1] = 1
    with pytest.raises(InvalidArgumentError, match="symmetric"):
        gram_accumulate(asym, X)
    G.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        gram_accumulate(G, X)


def test_fisher_accumulate_matches_reference_and_rejects_nan():
    rng = np.random.default_rng(4)
    F = np.abs(rng.standard_normal((70, 130))).astype(np.float32)
    g = rng.standard_normal((70, 130)).astype(np.float32)
    want = ref.fisher_accumulate(F, g)
    F2 = F.copy()
    fisher_accumulate(F2, g)
    np.testing.assert_allclose(F2, want, rtol=1e-6)
    before = F2.copy()
    g[3, 4] = np.nan
    with pytest.raises(NumericalError):
        fisher_accumulate(F2, g)
    np.testing.assert_array_equal(F2, before)
    with pytest.raises(ValueError, match="same layer"):
        fisher_accumulate(F2, g[:, :-1].copy())


def test_kernels_release_the_gil():
    X = np.random.default_rng(0).standard_normal((20000, 512)).astype(np.float32)
    G = np.zeros((512, 512))
    ticks = []
    stop = threading.Event()

    def count():
        while not stop.is_set():
            ticks.append(1)
            time.sleep(0.001)

    t = threading.Thread(target=count)
    t.start()
    try:
        t0 = time.perf_counter()
        gram_accumulate(G, X, n_threads=1)
        dt = time.perf_counter() - t0
    finally:
        stop.set()
        t.join()
    assert dt < 0.05 or len(ticks) > 5


# --------------------------------------------------------------------------------- collection


@pytest.fixture(scope="module")
def qwen(tiny_checkpoint):
    folder, cfg, w = tiny_checkpoint("Qwen2ForCausalLM", seed=7)
    return load_model(folder), cfg


def _windows(cfg, n=5, T=14, seed=0):
    return np.random.default_rng(seed).integers(0, cfg["vocab_size"], (n, T))


def test_fisher_equals_sum_of_squared_per_sequence_gradients(qwen):
    m, cfg = qwen
    win = _windows(cfg)
    st = collect_stats(m, win, gram=False, progress=False)
    want = ref.empirical_fisher(m.weight_grads(win[i:i + 1]) for i in range(len(win)))
    assert st.n_sequences == len(win)
    for name in m.linear_names():
        assert st.fisher[name].dtype == np.float32 and st.fisher[name].shape == m.linear_shape(name)
        np.testing.assert_allclose(st.fisher[name], want[name], rtol=REDUCE_RTOL,
                                   atol=REDUCE_ATOL * want[name].max())
        np.testing.assert_allclose(st.fisher_col[name], ref.fisher_col(st.fisher[name]), rtol=1e-12)
        np.testing.assert_allclose(st.fisher_row[name], ref.fisher_row(st.fisher[name]), rtol=1e-12)


def test_margins_only_fisher_equals_the_row_and_column_sums_of_the_full_diagonal(qwen, tmp_path):
    """fisher_full=False (the pipeline's default: bounded memory) keeps only F's margins
    fisher_col and fisher_row; they equal the full diagonal's column and row sums up to float32
    rounding, for 1 and 2 threads alike, and survive save/load."""
    m, cfg = qwen
    win = _windows(cfg)
    full = collect_stats(m, win, gram=False, progress=False)
    cols = [collect_stats(m, win, gram=False, progress=False, fisher_full=False, n_threads=nt)
            for nt in (1, 2)]
    assert cols[0].fisher == {} and cols[0].meta["fisher_full"] is False
    for name in m.linear_names():
        np.testing.assert_allclose(cols[0].fisher_col[name], full.fisher_col[name], rtol=1e-5)
        np.testing.assert_array_equal(cols[0].fisher_col[name], cols[1].fisher_col[name])
        np.testing.assert_allclose(cols[0].fisher_row[name], full.fisher_row[name], rtol=1e-5)
        np.testing.assert_array_equal(cols[0].fisher_row[name], cols[1].fisher_row[name])
    back = CalibStats.load(cols[0].save(tmp_path / "margins.safetensors"))
    for name in m.linear_names():
        np.testing.assert_array_equal(back.fisher_row[name], cols[0].fisher_row[name])
        np.testing.assert_array_equal(back.fisher_col[name], cols[0].fisher_col[name])


def test_block_by_block_gradients_equal_the_whole_model_gradients(qwen):
    m, cfg = qwen
    ids = _windows(cfg, n=1)
    want = m.weight_grads(ids)
    for ckpt in (False, True):
        got, blocks = {}, []
        for b, g in m.iter_block_weight_grads(ids, recompute=ckpt):
            blocks.append(b)
            got.update(g)
        assert blocks == list(reversed(range(m.num_blocks)))
        for name in m.linear_names():
            np.testing.assert_array_equal(got[name], want[name])


def test_gram_equals_sum_over_tokens_of_captured_inputs(qwen):
    m, cfg = qwen
    win = _windows(cfg)
    st = collect_stats(m, win, fisher=False, progress=False, batch_size=2)
    want = {}
    h = m.embed(win)
    for b in range(m.num_blocks):
        h = m.block_forward(b, h, capture=lambda n, X: want.__setitem__(
            n, ref.gram_accumulate(np.zeros((X.shape[1],) * 2), X)))
    assert st.n_tokens == win.size
    for name in m.linear_names():
        assert _scaled_err(st.gram[name], want[name]) < 1e-6
    names = m.block_linear_names(0)
    assert st.gram[names[0]] is st.gram[names[1]] is st.gram[names[2]]  # q, k, v share an input
    assert st.gram[names[4]] is st.gram[names[5]]  # gate, up
    np.testing.assert_allclose(st.hessian(names[6]), 2 * st.gram[names[6]] / win.size)


def test_gram_with_fisher_equals_gram_alone(qwen):
    m, cfg = qwen
    win = _windows(cfg, n=3)
    both = collect_stats(m, win, progress=False)
    alone = collect_stats(m, win, fisher=False, progress=False, batch_size=1)
    for name in m.linear_names():
        np.testing.assert_array_equal(both.gram[name], alone.gram[name])


def test_stats_identical_for_any_thread_count_and_checkpointing(qwen):
    m, cfg = qwen
    win = _windows(cfg, n=6)
    runs = [collect_stats(m, win, progress=False, n_threads=nt, recompute=ckpt)
            for nt, ckpt in ((1, False), (2, False), (3, True))]
    for st in runs[1:]:
        for name in m.linear_names():
            np.testing.assert_array_equal(st.gram[name], runs[0].gram[name])
            np.testing.assert_array_equal(st.fisher[name], runs[0].fisher[name])


def test_collect_stats_uses_weights_set_on_the_model(tiny_checkpoint):
    folder, cfg, _ = tiny_checkpoint("LlamaForCausalLM", seed=8)
    m = load_model(folder)
    win = _windows(cfg, n=2)
    base = collect_stats(m, win, progress=False)
    name = "model.layers.0.mlp.up_proj"
    m.set_weight(name, m.get_weight(name) * 0.5)
    changed = collect_stats(m, win, progress=False)
    assert changed.meta["modified_weights"] == [name]
    down = "model.layers.0.mlp.down_proj"  # its input is silu(gate) * up: halved
    np.testing.assert_allclose(changed.gram[down], base.gram[down] * 0.25, rtol=1e-5,
                               atol=1e-6 * base.gram[down].max())


def test_collect_stats_rejects_bad_windows(qwen):
    m, cfg = qwen
    with pytest.raises(TypeError, match="integer"):
        collect_stats(m, np.zeros((2, 4), np.float32), progress=False)
    with pytest.raises(InvalidArgumentError, match="seqlen >= 2"):
        collect_stats(m, np.zeros((2, 1), np.int64), progress=False)
    with pytest.raises(InvalidArgumentError, match="vocabulary"):
        collect_stats(m, np.full((2, 4), 10**6), progress=False)
    with pytest.raises(InvalidArgumentError, match="nothing to collect"):
        collect_stats(m, np.zeros((2, 4), np.int64), gram=False, fisher=False, progress=False)


def test_save_load_roundtrip_is_exact_and_atomic(qwen, tmp_path):
    m, cfg = qwen
    st = collect_stats(m, _windows(cfg, n=2), progress=False, meta={"calib": {"seed": 0}})
    path = st.save(tmp_path / "s.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]  # no temporary left behind
    back = CalibStats.load(path)
    assert back.n_tokens == st.n_tokens and back.n_sequences == st.n_sequences
    assert back.meta == st.meta
    for name in m.linear_names():
        np.testing.assert_array_equal(back.gram[name], st.gram[name])
        np.testing.assert_array_equal(back.fisher[name], st.fisher[name])
        np.testing.assert_array_equal(back.fisher_col[name], st.fisher_col[name])
    q, k = m.block_linear_names(1)[:2]
    assert back.gram[q] is back.gram[k]
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(HiquantError, match="cannot read"):
        CalibStats.load(tmp_path / "bad.safetensors")


def test_load_or_collect_reuses_cache_only_when_the_key_matches(tiny_checkpoint, tmp_path):
    folder, cfg, _ = tiny_checkpoint("LlamaForCausalLM", seed=9)
    m = load_model(folder)
    win = _windows(cfg, n=2)
    calib = {"file_sha256": "abc", "n": 2, "seqlen": 14, "seed": 0}
    a = load_or_collect(tmp_path, m, win, calib=calib, progress=False)
    files = sorted(tmp_path.iterdir())
    assert len(files) == 1
    b = load_or_collect(tmp_path, m, win, calib=calib, progress=False)
    assert b.meta["created"] == a.meta["created"] and b.meta["cache_key"] == a.meta["cache_key"]
    # any change of the windows, the settings or what is collected is a different key
    keys = {stats_key(m, win, calib=calib),
            stats_key(m, win[:, ::-1], calib=calib),
            stats_key(m, win, calib={**calib, "seed": 1}),
            stats_key(m, win, calib=calib, fisher=False)}
    assert len(keys) == 4
    load_or_collect(tmp_path, m, win, calib={**calib, "seed": 1}, progress=False)
    assert len(list(tmp_path.iterdir())) == 2
    # a modified model is never served from (or written to) the cache
    m.set_weight(m.linear_names()[0], m.get_weight(m.linear_names()[0]) * 2)
    with pytest.raises(InvalidArgumentError, match="not cached"):
        load_or_collect(tmp_path, m, win, calib=calib, progress=False)


def test_model_file_change_invalidates_the_cache_key(tiny_checkpoint, tmp_path):
    import shutil
    src = tiny_checkpoint("LlamaForCausalLM", seed=10)[0]
    folder = tmp_path / "m"
    shutil.copytree(src, folder)
    m = load_model(folder)
    win = _windows({"vocab_size": 100}, n=1)
    k1 = stats_key(m, win)
    cfg = (folder / "config.json").read_text()
    (folder / "config.json").write_text(cfg.replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05'))
    assert stats_key(load_model(folder), win) != k1


def test_copied_or_touched_checkpoint_keeps_the_cache_key(tiny_checkpoint, tmp_path):
    """The key follows the bytes, not the file metadata: a plain copy (new mtime and inode) and a
    touch keep the statistics cache and a run's resumable progress valid."""
    import os
    import shutil
    src = tiny_checkpoint("LlamaForCausalLM", seed=10)[0]
    win = _windows({"vocab_size": 100}, n=1)
    k_src = stats_key(load_model(src), win)
    folder = tmp_path / "copy"
    folder.mkdir()
    for f in src.iterdir():
        shutil.copyfile(f, folder / f.name)  # copyfile: no metadata, a fresh mtime
    os.utime(folder / "model.safetensors", ns=(1, 1))
    m = load_model(folder)
    assert stats_key(m, win) == k_src
    assert m.fingerprint() == load_model(src).fingerprint()


def test_one_changed_weight_byte_changes_the_fingerprint(tiny_checkpoint, tmp_path):
    """Same size, same header, same mtime: only the content differs, and the key sees it."""
    import hashlib
    import os
    import shutil
    src = tiny_checkpoint("LlamaForCausalLM", seed=10)[0]
    folder = tmp_path / "m"
    shutil.copytree(src, folder)
    path = folder / "model.safetensors"
    m = load_model(folder)
    fp = m.fingerprint()
    # the independent reference: sha256 of the file's bytes
    assert fp["files"]["model.safetensors"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the last byte is tensor data, never the header
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    win = _windows({"vocab_size": 100}, n=1)
    assert load_model(folder).fingerprint() != fp
    assert stats_key(load_model(folder), win) != stats_key(load_model(src), win)
