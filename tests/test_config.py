"""Settings: one frozen object, one resolve() that settles every "auto" and validates everything
before any model work; the width rules and option vocabularies have one definition."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

import hiquant
from hiquant import allocate
from hiquant.config import (
    DEFAULT_CANDIDATES,
    HIGH_BITS,
    QUANTIZERS,
    WEIGHT_BITS,
    QuantizeSettings,
    check_group_size,
    resolve,
)
from hiquant.methods import METHODS, quantizer


def test_settings_are_frozen_and_replace_refuses_unknown_names():
    s = QuantizeSettings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.wbits = 3
    assert s.replace(wbits=3).wbits == 3 and s.wbits == 2
    with pytest.raises(hiquant.InvalidArgumentError, match="unknown setting.*wbit"):
        s.replace(wbit=3)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_resolve_settles_every_auto_and_is_idempotent(method):
    extra = dict(wbits=1) if method == "billm" else {}  # billm binarizes: wbits must be 1
    s = resolve(QuantizeSettings(method=method, avg_bits=2.5, **extra), n_weights=10_000)
    # quantizer="auto" stays: it names the method's own quantizer (s.layer_quantizer)
    auto = [f.name for f in dataclasses.fields(s) if getattr(s, f.name) == "auto"]
    assert auto == ["quantizer"] and s.layer_quantizer == METHODS[method].quantizer
    assert s.hbits is not None and s.scale_bits in (16, 8, 6)
    assert resolve(s, n_weights=10_000) == s


def test_resolve_without_the_model_size_leaves_only_the_estimator_and_its_pairs_auto():
    s = resolve(QuantizeSettings(method="hiq", avg_bits=2.3))
    assert s.estimator == "auto" and s.m_pairs == "auto"
    assert resolve(s, n_weights=1000).estimator == "diagonal"
    assert resolve(s, n_weights=1000).m_pairs is False
    # above DIAGONAL_AUTO_BYTES of Fisher diagonal: the same M from its margins, no cross terms
    assert resolve(s, n_weights=10**10).estimator == "rank1"
    assert resolve(s, n_weights=10**10).m_pairs is False
    fisher = QuantizeSettings(method="hiq", avg_bits=2.3, estimator="fisher")
    # the fisher M keeps its cross terms only at full rank: m_windows (32) >= the layers
    assert resolve(fisher).m_pairs == "auto"
    assert resolve(fisher, n_layers=224).m_pairs is False
    assert resolve(fisher, n_layers=32).m_pairs is True
    assert resolve(QuantizeSettings(method="hiq", avg_bits=2.3, estimator="measured")).m_pairs is True
    assert resolve(QuantizeSettings(method="hiq", avg_bits=2.3, estimator="fisher",
                                    m_pairs=True), n_layers=224).m_pairs is True


@pytest.mark.parametrize("bad,match", [
    (dict(method="hqi"), "unknown method"),
    (dict(wbits=5), "wbits must be one of"),
    (dict(wbits=2.0), "wbits must be an int"),
    (dict(wbits=3, hbits=2), "must be wider than wbits"),
    (dict(method="rtn", hbits=4), "no high-impact columns"),
    (dict(method="fp16-retention", hbits=4), "FP16"),
    (dict(group_size=-5), "group_size"),
    (dict(quantizer="omniquant"), "quantizer must be"),
    (dict(method="hiq", quantizer="gptq"), "cannot store the high-impact columns"),
    (dict(method="gptq", scale_bits=6), "scale_bits=16"),
    (dict(scale_bits=4), "scale_bits must be one of"),
    (dict(objective="blocks"), "objective must be"),
    (dict(method="rtn", objective="block"), "applies to the lwc and hybrid"),
    (dict(candidates=(0.1, 1.5)), "candidate ratios"),
    (dict(candidates=("a",)), "candidates must be numbers"),
    (dict(estimator="exact"), "estimator must be"),
    (dict(n_calib=0), "n_calib must be >= 1"),
    (dict(seqlen=1), "seqlen must be >= 2"),
    (dict(lwc_lr=float("nan")), "lwc_lr must be a positive finite number"),
    (dict(avg_bits=-1.0), "avg_bits"),
    (dict(ratio=2.0), "ratio must be in"),
    (dict(method="hiq", avg_bits=None), "needs a budget"),
])
def test_resolve_rejects_each_bad_setting_with_a_message_naming_it(bad, match):
    kw = dict(method="fixed-ratio", avg_bits=2.5)
    kw.update(bad)
    with pytest.raises(hiquant.HiquantError, match=match):
        resolve(QuantizeSettings(**kw))


def test_a_typo_fails_before_any_model_work(tmp_path):
    """quantize() validates its settings before it opens the model folder: a typo against a
    folder that does not even exist is reported as the typo, at once."""
    t0 = time.perf_counter()
    with pytest.raises(hiquant.InvalidArgumentError, match="unknown method"):
        hiquant.quantize(tmp_path / "no-such-model", tmp_path / "no-such-text", method="hqi")
    with pytest.raises(hiquant.InvalidArgumentError, match="export must be"):
        hiquant.quantize(tmp_path / "no-such-model", tmp_path / "no-such-text", method="rtn",
                         export="zip")
    assert time.perf_counter() - t0 < 5


def test_width_rules_and_vocabularies_have_one_definition():
    from hiquant import quantizer as qz
    assert tuple(qz.PACK_BITS) == WEIGHT_BITS
    assert HIGH_BITS == WEIGHT_BITS + (16,)
    assert allocate.DEFAULT_CANDIDATES is DEFAULT_CANDIDATES
    assert {spec.quantizer for spec in METHODS.values()} <= set(QUANTIZERS)
    for kind in QUANTIZERS:  # every quantizer name is a module with the one signature
        assert callable(quantizer(kind).quantize)
    assert check_group_size(None) == check_group_size(0) == check_group_size(-1) == 0


def test_plan_layers_gives_one_plan_per_layer_for_every_allocation_kind():
    rng = np.random.default_rng(0)
    shapes = {"a": (32, 64), "b": (64, 128)}
    fisher_col = {n: rng.random(d_in) for n, (_, d_in) in shapes.items()}
    none, alloc = allocate.plan_layers(resolve(QuantizeSettings(method="rtn", wbits=3)), shapes)
    assert alloc is None and all(p.k == 0 and p.high_idx.size == 0 for p in none.values())
    s = resolve(QuantizeSettings(method="fixed-ratio", ratio=0.1, group_size=32))
    fixed, _ = allocate.plan_layers(s, shapes, fisher_col=fisher_col)
    for n, p in fixed.items():
        assert p.k == allocate.ratio_to_k(0.1, shapes[n][1]) and p.b_high == s.hbits
        np.testing.assert_array_equal(p.high_idx, allocate.high_columns(fisher_col[n], p.k))
    s = resolve(QuantizeSettings(method="hiq", avg_bits=2.6, group_size=32))
    K = len(s.candidates)
    M = np.diag(np.tile(np.linspace(2.0, 1.0, K), len(shapes)))
    iqp, alloc = allocate.plan_layers(s, shapes, fisher_col=fisher_col, sensitivity=M)
    assert alloc is not None
    for la in alloc.layers:  # the plans are the allocation's own k and columns, not recomputed
        assert iqp[la.name].k == la.k and iqp[la.name].high_idx is la.high_idx
    with pytest.raises(hiquant.InvalidArgumentError, match="sensitivity"):
        allocate.plan_layers(s, shapes, fisher_col=fisher_col)
