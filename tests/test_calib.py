"""Calibration text loaders, tokenization and the reference window protocol."""

from __future__ import annotations

import gzip
import json
import random

import numpy as np
import pytest

from hiquant.calib import (
    calibration_split,
    calibration_windows,
    leading_windows,
    load_jsonl_text,
    load_text,
    load_wikitext2,
    sample_windows,
    tokenize_text,
    validation_starts,
)
from hiquant.errors import InvalidArgumentError, InvalidTypeError
from hiquant.model import load_model


def test_sample_windows_reproduces_the_global_random_protocol():
    ids = np.arange(5000, dtype=np.int64) * 7 % 1013
    for seed, n, seqlen in ((0, 128, 512), (3, 10, 100), (1234, 1, 4998)):
        got = sample_windows(ids, n, seqlen, seed)
        random.seed(seed)  # the reference code: global state, then randint per window
        want = []
        for _ in range(n):
            i = random.randint(0, len(ids) - seqlen - 1)
            want.append(ids[i:i + seqlen])
        np.testing.assert_array_equal(got, np.stack(want))
        assert got.dtype == np.int64 and got.shape == (n, seqlen)


def test_sample_windows_leaves_the_global_random_state_alone():
    random.seed(42)
    expected = random.random()
    random.seed(42)
    sample_windows(np.arange(1000), 5, 10, seed=0)
    assert random.random() == expected


def test_sample_windows_rejects_too_short_text_and_bad_arguments():
    with pytest.raises(InvalidArgumentError, match="at least 513"):
        sample_windows(np.arange(512), 1, 512)
    with pytest.raises(InvalidArgumentError, match="n must be"):
        sample_windows(np.arange(100), 0, 10)
    with pytest.raises(InvalidArgumentError, match="1-D integer"):
        sample_windows(np.zeros((10, 10), np.int64), 1, 5)


def test_leading_windows_are_the_first_non_overlapping_windows():
    ids = np.arange(1050)
    w = leading_windows(ids, 100, 10)
    np.testing.assert_array_equal(w, np.arange(1000).reshape(10, 100))
    assert leading_windows(ids, 100).shape == (10, 100)
    with pytest.raises(InvalidArgumentError, match="pass at most 10 windows"):
        leading_windows(ids, 100, 11)


def test_wikitext2_join_matches_gptq_datautils(tmp_path):
    # the HF dataset rows are the raw file's lines (with their newline; "" for blank lines),
    # and GPTQ joins them with "\n\n"
    raw = " \n = Valkyria Chronicles III = \n \n Senjō no Valkyria 3 : Unrecorded Chronicles \n"
    p = tmp_path / "wiki.train.raw"
    p.write_text(raw, encoding="utf-8")
    rows = ["", " = Valkyria Chronicles III = \n", "",
            " Senjō no Valkyria 3 : Unrecorded Chronicles \n"]
    assert load_wikitext2(p) == "\n\n".join(rows)
    assert load_text(p) == "\n\n".join(rows)  # detected by name


def test_jsonl_and_json_and_gzip_records_are_joined(tmp_path):
    recs = [{"text": "first doc", "url": "a"}, {"text": "second\ndoc", "url": "b"}]
    p = tmp_path / "c4-train.00000-of-01024.json.gz"
    with gzip.open(p, "wt", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    assert load_text(p) == "first doc\n\nsecond\ndoc"
    q = tmp_path / "val.json"
    q.write_text(json.dumps(recs))
    assert load_jsonl_text(q) == "first doc\n\nsecond\ndoc"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"content": "no text"}\n')
    with pytest.raises(InvalidArgumentError, match="record 1 has no string field 'text'"):
        load_text(bad)
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(InvalidArgumentError, match="bad.jsonl:2: not valid JSON"):
        load_text(bad)


def test_empty_missing_and_non_utf8_files_raise_clear_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n\n")
    with pytest.raises(InvalidArgumentError, match="contains no text"):
        load_text(tmp_path / "empty.txt")
    with pytest.raises(InvalidArgumentError, match="no such file"):
        load_text(tmp_path / "absent.txt")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(InvalidArgumentError, match="UTF-8"):
        load_text(tmp_path / "latin1.txt")
    with pytest.raises(InvalidArgumentError, match="format must be"):
        load_text(tmp_path / "latin1.txt", format="parquet")


def test_tokenize_text_is_the_whole_text_without_special_tokens(tiny_llama):
    m = load_model(tiny_llama[0])
    ids = tokenize_text(m.tokenizer, "ab\nc")
    assert ids.dtype == np.int64
    assert ids.tolist() == m.tokenizer.encode("ab\nc", add_special_tokens=False).ids
    assert len(ids) == 4
    with pytest.raises(InvalidArgumentError, match="empty"):
        tokenize_text(m.tokenizer, "")
    with pytest.raises(InvalidArgumentError, match="no tokenizer"):
        tokenize_text(None, "text")
    with pytest.raises(InvalidTypeError, match="text must be a str"):
        tokenize_text(m.tokenizer, b"bytes")


def test_calibration_windows_records_settings(tiny_llama, tmp_path):
    m = load_model(tiny_llama[0])
    p = tmp_path / "calib.txt"
    p.write_text("def f(x):\n    return x * 2\n" * 50)
    win, settings = calibration_windows(m.tokenizer, p, n=4, seqlen=32, seed=1)
    ids = tokenize_text(m.tokenizer, p.read_text())
    np.testing.assert_array_equal(win, sample_windows(ids, 4, 32, 1))
    assert settings["n"] == 4 and settings["seqlen"] == 32 and settings["seed"] == 1
    assert len(settings["file_sha256"]) == 64 and settings["n_text_tokens"] == len(ids)


def test_validation_split_holds_out_the_tail_and_calibration_never_sees_it(tiny_llama, tmp_path):
    m = load_model(tiny_llama[0])
    p = tmp_path / "calib.txt"
    p.write_text("".join(f"def f{i}(x):\n    return x * {i}\n" for i in range(300)))
    ids = tokenize_text(m.tokenizer, p.read_text())
    win, val, settings = calibration_split(m.tokenizer, p, n=16, seqlen=32, seed=3, val_windows=5,
                                           val_seqlen=40, val_split="tail")
    cut = len(ids) - 5 * 40
    np.testing.assert_array_equal(val, ids[cut:].reshape(5, 40))
    # the calibration windows are the reference draw over the text before the held-out tail
    np.testing.assert_array_equal(win, sample_windows(ids[:cut], 16, 32, 3))
    assert max(_starts_in(ids, win)) + 32 <= cut
    assert settings["validation"] == {"windows": 5, "seqlen": 40, "split": "tail", "first_token": cut,
                                      "tokens": 200}


def _starts_in(ids, windows):
    view = np.lib.stride_tricks.sliding_window_view(ids, windows.shape[1])
    return [int(np.flatnonzero((view == w).all(1))[0]) for w in windows]


def test_spread_validation_lies_evenly_over_the_text_and_calibration_draws_around_it(
        tiny_llama, tmp_path):
    m = load_model(tiny_llama[0])
    p = tmp_path / "calib.txt"
    p.write_text("".join(f"def f{i}(x):\n    return x * {i}\n" for i in range(400)))
    ids = tokenize_text(m.tokenizer, p.read_text())
    n_val, L, seqlen = 6, 40, 32
    win, val, settings = calibration_split(m.tokenizer, p, n=48, seqlen=seqlen, seed=5,
                                           val_windows=n_val, val_seqlen=L, val_split="spread")
    stride = len(ids) // n_val
    starts = validation_starts(len(ids), n_val, L, "spread")
    # one window centred in each of n_val equal stretches
    assert [int(s) // stride for s in starts] == list(range(n_val))
    assert all(s - k * stride == (stride - L) // 2 for k, s in enumerate(starts))
    np.testing.assert_array_equal(val, np.stack([ids[s:s + L] for s in starts]))
    # the calibration windows: the reference draw, redrawn (same stream) while a draw overlaps
    rng = random.Random(5)
    expect = []
    while len(expect) < 48:
        i = rng.randint(0, len(ids) - seqlen - 1)
        if all(i + seqlen <= s or s + L <= i for s in starts):
            expect.append(ids[i:i + seqlen])
    np.testing.assert_array_equal(win, np.stack(expect))
    for c in _starts_in(ids, win):
        assert all(c + seqlen <= s or s + L <= c for s in starts)
    assert settings["validation"] == {"windows": n_val, "seqlen": L, "split": "spread",
                                      "first_token": int(starts[0]), "tokens": n_val * L}
    # the validation windows do not depend on the seed; the calibration draw does
    win7, val7, _ = calibration_split(m.tokenizer, p, n=48, seqlen=seqlen, seed=7,
                                      val_windows=n_val, val_seqlen=L, val_split="spread")
    np.testing.assert_array_equal(val7, val)
    assert not np.array_equal(win7, win)


def test_a_spread_split_with_no_room_for_calibration_or_an_unknown_split_is_refused(
        tiny_llama, tmp_path):
    m = load_model(tiny_llama[0])
    p = tmp_path / "calib.txt"
    p.write_text("".join(f"def f{i}(x):\n    return x * {i}\n" for i in range(60)))
    n = len(tokenize_text(m.tokenizer, p.read_text()))
    # windows that overlap one another
    with pytest.raises(InvalidArgumentError, match="val_windows"):
        calibration_split(m.tokenizer, p, n=4, seqlen=16, val_windows=n // 30, val_seqlen=40,
                          val_split="spread")
    # gaps between the validation windows shorter than a calibration window
    with pytest.raises(InvalidArgumentError, match="no 64-token calibration window fits"):
        calibration_split(m.tokenizer, p, n=4, seqlen=64, val_windows=n // 50, val_seqlen=40,
                          val_split="spread")
    with pytest.raises(InvalidArgumentError, match="val_split"):
        calibration_split(m.tokenizer, p, n=4, seqlen=16, val_windows=2, val_seqlen=16,
                          val_split="middle")


def test_no_validation_split_leaves_calibration_windows_and_settings_unchanged(tiny_llama, tmp_path):
    m = load_model(tiny_llama[0])
    p = tmp_path / "calib.txt"
    p.write_text("def f(x):\n    return x * 2\n" * 80)
    win, val, settings = calibration_split(m.tokenizer, p, n=4, seqlen=32, seed=1)
    win2, settings2 = calibration_windows(m.tokenizer, p, n=4, seqlen=32, seed=1)
    assert val is None and "validation" not in settings and settings == settings2
    np.testing.assert_array_equal(win, win2)


def test_validation_split_that_leaves_no_calibration_window_is_refused(tiny_llama, tmp_path):
    m = load_model(tiny_llama[0])
    p = tmp_path / "calib.txt"
    p.write_text("def f(x):\n    return x * 2\n" * 20)
    with pytest.raises(InvalidArgumentError, match="fewer val_windows"):
        calibration_split(m.tokenizer, p, n=4, seqlen=32, val_windows=100, val_seqlen=32)
    with pytest.raises(InvalidArgumentError, match="val_windows"):
        calibration_split(m.tokenizer, p, n=4, seqlen=32, val_windows=-1)


@pytest.mark.bench_assets
def test_bench_calibration_protocol_matches_reference_starts(bench_assets):
    m = load_model(f"{bench_assets}/llama-bench")
    ids = tokenize_text(m.tokenizer, load_text(f"{bench_assets}/corpus/calib.txt"))
    win = sample_windows(ids, 128, 512, 0)
    random.seed(0)
    starts = [random.randint(0, len(ids) - 513) for _ in range(128)]
    np.testing.assert_array_equal(win[:, 0], ids[starts])
