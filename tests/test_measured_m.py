"""The measured sensitivity matrix, batched and on worker threads (issue 19): the same M as the
plain sequential loop (hiquant._reference.allocation.measured_sequential), for any thread count,
within float32 rounding for any batch size; resumable block by block; and the weight overrides
of Model.block_forward it relies on."""

from __future__ import annotations

import numpy as np
import pytest

import hiquant.allocate as A
from hiquant._reference import allocation as ref
from hiquant.errors import InvalidArgumentError, InvalidTypeError
from hiquant.model import load_model
from tolerances import MEASURED_M_RTOL

CAND = (0.0, 0.1, 0.5)
G = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import checkpoints
    folder, _, _ = checkpoints.write_checkpoint(tmp_path_factory.mktemp("mm") / "m",
                                                "LlamaForCausalLM", layers=2, hidden=32, inter=48,
                                                heads=4, kv_heads=2, vocab=64, seed=3)
    model = load_model(folder)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 64, size=(5, 12)).astype(np.int64)
    fc = {n: rng.random(model.linear_shape(n)[1]) for n in model.linear_names()}
    return model, ids, fc


def _deltas(model, fc, names):
    return {n: A.option_deltas(model.get_weight(n), fc[n], CAND, 2, 3, G) for n in names}


def _base_loss(model, ids):
    return float(np.mean(model.sequence_losses(ids)))


def _m(model, ids, fc, **kw):
    return A.sensitivity_matrix(model, ids, estimator="measured", fisher_col=fc,
                                candidates=CAND, group_size=G, **kw)


@pytest.mark.parametrize("pairs", [False, True], ids=["singles", "pairs"])
def test_measured_m_equals_the_sequential_loop_for_any_threads_and_batch(setup, pairs):
    model, ids, fc = setup
    names = model.linear_names()
    want = ref.measured_sequential(model, ids, names, _deltas(model, fc, names), pairs)
    if pairs:  # the pairs' terms are there (or the comparison would be void)
        assert np.count_nonzero(want - np.diag(np.diag(want))) > 0
    tol = MEASURED_M_RTOL * _base_loss(model, ids)
    got = {}
    for threads in (1, 2):
        for batch in (1, 4):
            got[threads, batch] = _m(model, ids, fc, pairs=pairs, n_threads=threads,
                                     eval_batch=batch).M
            np.testing.assert_allclose(got[threads, batch], want, rtol=0, atol=tol)
            assert model.modified_weights() == []
    # one evaluation per task runs exactly the sequential loop's products: bitwise equal
    np.testing.assert_array_equal(got[1, 1], want)
    for batch in (1, 4):  # the thread count never changes a bit
        np.testing.assert_array_equal(got[1, batch], got[2, batch])
    if not pairs:
        assert np.count_nonzero(got[1, 4] - np.diag(np.diag(got[1, 4]))) == 0


class _NoOverrides:
    """A runtime whose block_forward takes no ``weights=``: the
    estimator falls back to set_weight, one task at a time."""

    def __init__(self, model):
        self._m = model

    def __getattr__(self, name):
        return getattr(self._m, name)

    def block_forward(self, i, h, *, cache=False, capture=None):
        return self._m.block_forward(i, h, cache=cache, capture=capture)


def test_measured_m_on_a_runtime_without_weight_overrides_equals_the_sequential_loop(setup):
    model, ids, fc = setup
    names = model.block_linear_names(0)
    want = ref.measured_sequential(model, ids, names, _deltas(model, fc, names), True)
    rt = _NoOverrides(model)
    assert not A._overridable(rt) and A._overridable(model)
    np.testing.assert_array_equal(_m(rt, ids, fc, names=names, n_threads=2, eval_batch=1).M, want)
    got = _m(rt, ids, fc, names=names, n_threads=2, eval_batch=4).M
    np.testing.assert_allclose(got, want, rtol=0, atol=MEASURED_M_RTOL * _base_loss(model, ids))
    assert model.modified_weights() == []


def test_measured_m_keeps_a_callers_replaced_weight_as_the_point_of_expansion(setup):
    model, ids, fc = setup
    names = model.block_linear_names(1)
    mine = model.get_weight(names[3]) * 0.5
    model.set_weight(names[3], mine)
    try:
        want = ref.measured_sequential(model, ids, names, _deltas(model, fc, names), True)
        tol = MEASURED_M_RTOL * _base_loss(model, ids)
        got = _m(model, ids, fc, names=names, n_threads=2, eval_batch=3).M
        assert model.modified_weights() == [names[3]]
        np.testing.assert_array_equal(model.get_weight(names[3]), mine)
    finally:
        model.reset_weights()
    np.testing.assert_allclose(got, want, rtol=0, atol=tol)


def test_measured_m_resumed_from_finished_blocks_equals_an_uninterrupted_run(setup):
    model, ids, fc = setup
    saved, calls = {}, []
    full = _m(model, ids, fc, n_threads=2, on_block=lambda b, sub: saved.__setitem__(b, sub),
              progress=lambda d, t: calls.append((d, t))).M
    assert sorted(saved) == [0, 1]
    total = A.measured_evaluations([7, 7], len(CAND), True)
    assert calls[-1] == (total, total) and [d for d, _ in calls] == sorted(d for d, _ in calls)

    class Killed(Exception):
        pass

    kept = {}

    def die_after_first(b, sub):
        kept[b] = sub
        raise Killed

    with pytest.raises(Killed):
        _m(model, ids, fc, n_threads=2, on_block=die_after_first)
    assert sorted(kept) == [0]
    again, calls = [], []
    resumed = _m(model, ids, fc, n_threads=1, partial=kept, progress=lambda d, t: calls.append(d),
                 on_block=lambda b, sub: again.append(b)).M
    assert again == [1]  # block 0 was not recomputed
    assert calls[0] == total // 2 and calls[-1] == total  # progress starts after block 0
    np.testing.assert_array_equal(resumed, full)
    # every block given: nothing is computed, M is assembled from the parts
    np.testing.assert_array_equal(_m(model, ids, fc, partial=saved).M, full)
    with pytest.raises(InvalidArgumentError, match=r"partial\[0\]"):
        _m(model, ids, fc, partial={0: np.zeros((3, 3))})


def check_weight_overrides(model, i: int, h, names, other_block: int, seed: int) -> None:
    """block_forward(i, h, weights=...) with perturbed weights of ``names`` equals set_weight of
    them, leaves the model and its cache unchanged, and refuses a layer of ``other_block``, a
    wrong shape, a wrong dtype and cache=True. Shared by the NumPy and torch runtimes' tests."""
    rng = np.random.default_rng(seed)
    over = {n: model.get_weight(n) + 0.05 * rng.standard_normal(model.linear_shape(n))
            .astype(np.float32) for n in names}
    plain = model.block_forward(i, h)
    got = model.block_forward(i, h, weights=over)
    assert model.modified_weights() == []
    np.testing.assert_array_equal(model.block_forward(i, h), plain)  # the cache is untouched
    for n, W in over.items():
        model.set_weight(n, W)
    try:
        np.testing.assert_array_equal(got, model.block_forward(i, h))
    finally:
        model.reset_weights()
    assert not np.array_equal(got, plain)
    n0 = names[0]
    with pytest.raises(InvalidArgumentError, match=f"not a linear layer of block {i}"):
        model.block_forward(i, h, weights={model.block_linear_names(other_block)[0]: over[n0]})
    with pytest.raises(InvalidArgumentError, match="shape"):
        model.block_forward(i, h, weights={n0: over[n0][:, :-1].copy()})
    with pytest.raises(InvalidTypeError, match="float32"):
        model.block_forward(i, h, weights={n0: over[n0].astype(np.float16)})
    with pytest.raises(InvalidArgumentError, match="cache"):
        model.block_forward(i, h, weights={n0: over[n0]}, cache=True)


def test_block_forward_with_weight_overrides_equals_set_weight_and_leaves_the_model(setup):
    model, ids, _ = setup
    q, k, v, o, gate, up, down = model.block_linear_names(0)
    check_weight_overrides(model, 0, model.embed(ids), (k, o, up, down), other_block=1, seed=1)


def test_measured_evaluations_counts_singles_and_same_block_pairs():
    assert A.measured_evaluations([7] * 8, 5, False) == 280
    assert A.measured_evaluations([7] * 8, 5, True) == 280 + 25 * 8 * 21
    assert A.measured_evaluations([2, 1], 3, True) == 9 + 9


def test_a_run_killed_while_building_m_resumes_after_its_finished_blocks(tmp_path, monkeypatch):
    """The pipeline's progress folder keeps each finished block of M; a run interrupted there
    (Ctrl-C keeps the folder, as SIGKILL does) resumes without recomputing them, to the M of an
    uninterrupted run. (Each run stops once M is built: the rest of the pipeline is not at
    issue here.)"""
    from hiquant import quantize
    from hiquant.datasets import embedded_calib_path, embedded_model_path
    from hiquant.progress import ProgressState
    kw = dict(method="hiq", wbits=2, group_size=64, avg_bits=2.3, estimator="measured",
              m_pairs=False, m_windows=2, n_calib=4, seqlen=32, n_threads=2, backend="numpy",
              progress=False)

    class Built(KeyboardInterrupt):  # stops the run after M, keeping its progress folder
        pass

    Ms, computed = [], []
    real_sm, real_measured = A.sensitivity_matrix, A._measured

    def stop_after_m(*a, **k):
        Ms.append(real_sm(*a, **k).M)
        raise Built

    def count(*a, **k):
        computed.append(sorted((k.get("partial") or {})))
        return real_measured(*a, **k)

    monkeypatch.setattr(A, "sensitivity_matrix", stop_after_m)
    monkeypatch.setattr(A, "_measured", count)
    with pytest.raises(Built):
        quantize(embedded_model_path(), embedded_calib_path(), **kw)

    real_save = ProgressState.save_m_block
    saved = []

    def save_then_interrupt(self, b, sub):
        real_save(self, b, sub)
        saved.append(b)
        if len(saved) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(ProgressState, "save_m_block", save_then_interrupt)
    prog = tmp_path / "progress"
    with pytest.raises(KeyboardInterrupt):
        quantize(embedded_model_path(), embedded_calib_path(), progress_dir=prog, **kw)
    assert sorted(p.name for p in prog.glob("m-block-*.npz")) == ["m-block-0.npz",
                                                                  "m-block-1.npz"]
    monkeypatch.setattr(ProgressState, "save_m_block", real_save)
    with pytest.raises(Built):
        quantize(embedded_model_path(), embedded_calib_path(), progress_dir=prog, resume=True,
                 **kw)
    assert computed == [[], [], [0, 1]]  # the resumed run took blocks 0 and 1 from the folder
    assert len(Ms) == 2
    np.testing.assert_array_equal(Ms[1], Ms[0])
    # a run with other settings (another run key) does not pick them up
    with pytest.raises(Built):
        quantize(embedded_model_path(), embedded_calib_path(), progress_dir=prog, resume=True,
                 **dict(kw, m_windows=1))
    assert computed[-1] == []
