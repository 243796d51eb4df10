"""Incremental decoding with the KV cache (Model.new_kv_cache / forward_cached) and greedy
generation (hiquant.generate, ``hiquant generate``): the cached logits are the full forward's,
on every architecture variant and on packed exports."""

from __future__ import annotations

import json

import numpy as np
import pytest

import hiquant
from hiquant.datasets import embedded_calib_path, embedded_model_path
from hiquant.generate import generate
from hiquant.model import load_model
from hiquant.packed import load_packed
from hiquant.packed_matmul import kernel_name

VARIANTS = [("LlamaForCausalLM", {}),  # GQA
            ("Qwen2ForCausalLM", {"style": "4.x", "tie": True}),  # q/k/v biases
            ("Qwen3ForCausalLM", {})]  # q/k norms


def _incremental_logits(m, ids, split):
    kv = m.new_kv_cache(ids.shape[0], ids.shape[1] + 3)
    parts = [m.forward_cached(ids[:, :split], kv)]
    for j in range(split, ids.shape[1]):
        parts.append(m.forward_cached(ids[:, j:j + 1], kv))
    assert kv.length == ids.shape[1]
    return np.concatenate(parts, axis=1)


@pytest.mark.parametrize("arch,opts", VARIANTS)
def test_cached_decoding_gives_the_full_forwards_logits(tiny_checkpoint, arch, opts):
    folder, cfg, _ = tiny_checkpoint(arch, **opts)
    m = load_model(folder)
    ids = np.random.default_rng(1).integers(0, cfg["vocab_size"], (2, 13))
    full = m.logits(ids)
    for split in (1, 5, 13):  # prompt of one token, a prefix, the whole sequence at once
        np.testing.assert_allclose(_incremental_logits(m, ids, split), full, rtol=1e-4,
                                   atol=1e-5 * np.abs(full).max())


def test_greedy_generation_equals_argmax_of_the_full_forward():
    m = load_model(embedded_model_path())
    prompt = np.random.default_rng(2).integers(0, m.config.vocab_size, 9)
    streamed = []
    res = generate(m, prompt, 6, on_token=streamed.append)
    assert res.tokens == streamed and len(res.tokens) == 6 and res.prompt_tokens == 9
    seq = list(prompt)
    for _ in range(6):
        seq.append(int(np.argmax(m.logits(np.array([seq], np.int64))[0, -1])))
    assert res.tokens == seq[9:]


def test_cached_decoding_on_the_packed_kernels_matches_the_dense_reload(tmp_path):
    out = tmp_path / "q"
    hiquant.quantize(embedded_model_path(), embedded_calib_path(), method="rtn", wbits=3,
                     group_size=64, n_calib=4, seqlen=64, out=out, progress=False,
                     backend="numpy")
    pm = load_packed(out / "packed")
    dm = load_packed(out / "packed", packed_kernels=False)
    ids = np.random.default_rng(3).integers(0, pm.config.vocab_size, (1, 20))
    a, b = _incremental_logits(pm, ids, 8), _incremental_logits(dm, ids, 8)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())
    # the decode steps multiply the stored float16 output matrix on the FP16 kernel: no float32
    # copy of it is built (the dense reload builds one)
    from hiquant.packed_matmul import PackedLinear
    assert isinstance(pm._cache.get("head_operator"), PackedLinear) and "head" not in pm._cache
    assert "head" in dm._cache and "head_operator" not in dm._cache


def test_cache_overflow_and_bad_arguments_raise():
    m = load_model(embedded_model_path())
    kv = m.new_kv_cache(1, 4)
    m.forward_cached(np.zeros((1, 3), np.int64), kv)
    with pytest.raises(hiquant.InvalidArgumentError, match="free positions"):
        m.forward_cached(np.zeros((1, 2), np.int64), kv)
    with pytest.raises(hiquant.InvalidArgumentError, match="max_len"):
        m.new_kv_cache(1, 0)
    with pytest.raises(hiquant.InvalidArgumentError, match="max_new_tokens"):
        generate(m, [1, 2], 0)
    with pytest.raises(hiquant.InvalidArgumentError, match="prompt"):
        generate(m, [], 3)


def test_cli_generate_streams_the_text_and_ends_with_a_json_summary(capsys):
    from hiquant.cli import main
    assert main(["generate", str(embedded_model_path()), "--prompt", "def main(",
                 "--max-new-tokens", "5", "--threads", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert lines[0].startswith("def main(")
    assert summary["command"] == "generate" and summary["new_tokens"] == 5
    assert summary["peak_rss_mib"] > 0 and summary["decode_tokens_per_s"] > 0
    assert summary["packed_kernels"] is True  # a float16 folder decodes on the FP16 kernel


@pytest.mark.skipif(kernel_name("auto") != "avx2-fma",
                    reason="the table kernel (and its int8 tables) needs AVX2")
def test_int8_decode_tables_change_decode_steps_and_leave_longer_prompts_exact(tmp_path, capsys):
    """load_packed(decode_tables="int8"): a prompt of more than 8 tokens gives the exact logits
    (the prefill path), each decode step differs from the float32 tables' by the small error of
    8-bit activations; ``hiquant generate --decode-tables int8`` runs it, and refuses a folder that is
    not a packed export."""
    out = tmp_path / "q"
    hiquant.quantize(embedded_model_path(), embedded_calib_path(), method="rtn", wbits=2,
                     group_size=64, n_calib=4, seqlen=64, out=out, progress=False,
                     backend="numpy")
    exact = load_packed(out / "packed")
    fast = load_packed(out / "packed", decode_tables="int8")
    ids = np.random.default_rng(4).integers(0, exact.config.vocab_size, (1, 14))
    a, b = _incremental_logits(exact, ids, 10), _incremental_logits(fast, ids, 10)
    np.testing.assert_array_equal(a[:, :10], b[:, :10])
    scale = np.abs(a[:, 10:]).max()
    assert 0 < np.abs(a[:, 10:] - b[:, 10:]).max() < 0.05 * scale
    with pytest.raises(hiquant.InvalidArgumentError, match="decode_tables"):
        load_packed(out / "packed", decode_tables="int4")
    from hiquant.cli import main
    assert main(["generate", str(out / "packed"), "--prompt", "def main(", "--max-new-tokens",
                 "3", "--threads", "1", "--decode-tables", "int8"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["decode_tables"] == "int8"
    assert main(["generate", str(embedded_model_path()), "--prompt", "x",
                 "--decode-tables", "int8"]) != 0
    assert "applies to packed exports" in capsys.readouterr().err
