"""Every bad input fails fast and clean, and no output can be mistaken for something it is not.

Each test is one finding of issue 22: the CLI answers a user or environment error with one line
(rc 2, no traceback) before any model work, and leaves nothing behind; NaN is an error, never a
number; a setting without effect warns; a packed folder cannot pass for a float checkpoint."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

import hiquant
from hiquant import cli
from hiquant.datasets import embedded_calib_path, embedded_model_path, embedded_test_path

MODEL = str(embedded_model_path())
CALIB = str(embedded_calib_path())
TEST = str(embedded_test_path())
FAST = ["--n-calib", "4", "--seqlen", "64", "--lwc-iters", "5", "--adaround-iters", "5",
        "--eval-windows", "2", "--eval-seqlen", "64", "--quiet"]


def run_cli(*argv):
    """``hiquant ARGV`` in a subprocess: (rc, stdout, stderr)."""
    r = subprocess.run([sys.executable, "-m", "hiquant", *map(str, argv)], capture_output=True,
                       text=True, timeout=600)
    return r.returncode, r.stdout, r.stderr


def assert_clean_failure(rc, err, *words):
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("hiquant "), err
    for w in words:
        assert w in err, (w, err)


def leftovers(tmp_path: Path) -> list:
    return sorted(p.name for p in tmp_path.iterdir())


# -- 1. a packed folder cannot pass for a float checkpoint ---------------------------------------

def test_packed_folder_is_refused_by_transformers_with_an_error_naming_hiquant(tmp_path):
    transformers = pytest.importorskip("transformers")
    hiquant.quantize(MODEL, method="rtn", wbits=3, out=tmp_path / "q", export="packed",
                     progress=False)
    with pytest.raises(ValueError, match="hiquant_packed"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q" / "packed")
    # and hiquant's own loader still reads it
    assert hiquant.open_checkpoint(tmp_path / "q" / "packed").config.arch == "LlamaForCausalLM"


# -- 2. inputs are checked before the quantization, which is never lost ------------------------

@pytest.mark.parametrize("bad,words", [
    (["--eval-text", "no-such-file.txt"], ["evaluation text", "no-such-file.txt"]),
    (["--eval-text", TEST, "--eval-windows", "0"], ["eval_windows"]),
    (["--eval-text", TEST, "--eval-seqlen", "100000"], ["eval_seqlen", "max_position_embeddings"]),
    (["--avg-bits", "1.0"], ["infeasible", "avg_bits >="]),
    (["--calib", "no-such-calib.txt"], ["calibration text"]),
])
def test_bad_run_inputs_fail_before_any_statistics_and_leave_nothing(tmp_path, bad, words):
    t0 = time.perf_counter()
    args = ["quantize", MODEL, "--method", "hiq", "--avg-bits", "2.5", "--calib", CALIB,
            "--out", tmp_path / "out",
            *FAST, *bad]
    rc, _, err = run_cli(*args)
    assert_clean_failure(rc, err, *words)
    assert leftovers(tmp_path) == []  # no output folder, no .progress folder
    assert time.perf_counter() - t0 < 60  # well before a Fisher pass and seven blocks


def test_a_failure_before_the_first_block_leaves_no_progress_folder(tmp_path, monkeypatch):
    """An error after the progress folder exists (here: in the allocation) removes it."""
    from hiquant import allocate
    def boom(*a, **k):
        raise hiquant.NumericalError("simulated failure in the allocation")
    monkeypatch.setattr(allocate, "plan_layers", boom)
    with pytest.raises(hiquant.NumericalError, match="simulated"):
        hiquant.quantize(MODEL, CALIB, method="fixed-ratio", ratio=0.1, n_calib=4, seqlen=64,
                         out=tmp_path / "out", progress_dir=tmp_path / "out.progress",
                         progress=False)
    assert leftovers(tmp_path) == []


# -- 3. user and environment errors are one line, rc 2 -------------------------------------------

@pytest.mark.parametrize("bad,words", [
    (["--group", "-5"], ["group_size"]),
    (["--candidates", "0.5,abc"], ["--candidates"]),
    (["--wbits", "3", "--hbits", "2"], ["wider than wbits"]),
    (["--method", "hqi"], ["invalid choice"]),
])
def test_bad_flags_exit_2_with_one_line_and_no_traceback(tmp_path, bad, words):
    rc, _, err = run_cli("quantize", MODEL, "--calib", CALIB, "--out", tmp_path / "o", *bad)
    assert_clean_failure(rc, err, *words)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("err_no,where", [(errno.EROFS, "output"), (errno.EACCES, "output"),
                                          (errno.ENOSPC, "export")])
def test_unwritable_or_full_outputs_are_an_output_error_and_nothing_is_left(
        tmp_path, monkeypatch, capsys, err_no, where):
    import tempfile

    from hiquant import export, preflight
    if where == "output":  # the folder cannot be written at all: found before any work
        def refuse(*a, **k):
            raise OSError(err_no, os.strerror(err_no))
        monkeypatch.setattr(tempfile, "mkstemp", refuse)
        monkeypatch.setattr(preflight.tempfile, "mkstemp", refuse)
    else:  # the disk fills up while the export is written
        real = export.write_fake_quant
        def full(*a, **k):
            real(*a, **k)
            raise OSError(err_no, os.strerror(err_no))
        monkeypatch.setattr(export, "write_fake_quant", full)
    rc = cli.main(["quantize", MODEL, "--method", "rtn", "--wbits", "3", "--out",
                   str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert_clean_failure(rc, err, os.strerror(err_no))
    if where == "output":
        assert leftovers(tmp_path) == []
    else:  # nothing partial under the output's name; the finished work is kept for --resume
        assert leftovers(tmp_path) == ["out.progress"] and "--resume" in err


# -- 4. NaN is an error naming the tensor, never a number ----------------------------------------

@pytest.fixture
def nan_checkpoint(tmp_path):
    import checkpoints
    folder, cfg, w = checkpoints.write_checkpoint(tmp_path / "nan")
    name = "model.layers.1.mlp.down_proj.weight"
    w = dict(w)
    w[name] = w[name].copy()
    w[name][3, 5] = np.nan
    checkpoints.write_checkpoint(folder, weights=w)
    return folder, name


def test_eval_of_a_nan_checkpoint_is_a_numerical_error_naming_the_tensor(nan_checkpoint, tmp_path):
    folder, name = nan_checkpoint
    text = tmp_path / "t.txt"
    text.write_text("hello world, this is some text. " * 200)
    rc, out, err = run_cli("eval", folder, "--text", text, "--seqlen", "16", "--windows", "4",
                           "--quiet")
    assert_clean_failure(rc, err, name, "NaN")
    assert "NaN" not in out and "nan" not in out  # no JSON with a non-number


def test_quantize_of_a_nan_checkpoint_names_the_tensor(nan_checkpoint, tmp_path):
    folder, name = nan_checkpoint
    text = tmp_path / "t.txt"
    text.write_text("hello world, this is some text. " * 200)
    with pytest.raises(hiquant.NumericalError, match=name.replace(".", r"\.")):
        hiquant.quantize(folder, text, method="gptq", wbits=3, group_size=16, n_calib=4,
                         seqlen=16, progress=False)


# -- 5. settings without effect warn; meaningless ones are refused -------------------------------

def test_settings_without_effect_warn():
    from hiquant.config import QuantizeSettings, resolve
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        resolve(QuantizeSettings(method="rtn", avg_bits=2.3))
        resolve(QuantizeSettings(method="hiq", avg_bits=2.3, ratio=0.1))
    msgs = [str(x.message) for x in w if issubclass(x.category, hiquant.HiquantWarning)]
    assert any("avg_bits has no effect for rtn" in m for m in msgs)
    assert any("ratio has no effect for hiq" in m for m in msgs)


def test_a_budget_above_what_the_candidates_can_use_warns(tmp_path, capsys):
    rc = cli.main(["quantize", MODEL, "--calib", CALIB, "--method", "hiq", "--avg-bits", "50",
                   "--estimator", "diagonal", "--objective", "layer", *FAST])
    err = capsys.readouterr().err
    assert rc == 0
    assert "warning: avg_bits=50.0 is more than hiq can use" in err


def test_seqlen_beyond_the_model_positions_is_refused(tmp_path):
    with pytest.raises(hiquant.InvalidArgumentError, match="max_position_embeddings"):
        hiquant.quantize(MODEL, CALIB, method="gptq", wbits=3, seqlen=100_000, progress=False)


def test_architecture_and_model_type_that_disagree_are_refused(tmp_path):
    import checkpoints
    folder, cfg, _ = checkpoints.write_checkpoint(tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="mistral", sliding_window=8)
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(hiquant.CheckpointError, match="model_type.*mistral"):
        hiquant.load_model(folder)


# -- 6. --overwrite replaces only what hiquant wrote ---------------------------------------------

def test_overwrite_refuses_a_folder_holding_files_hiquant_did_not_write(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(hiquant.InvalidArgumentError, match="notes.txt"):
        hiquant.quantize(MODEL, method="rtn", wbits=3, out=out, overwrite=True, progress=False)
    assert (out / "notes.txt").read_text() == "mine"
    shutil.rmtree(out)
    hiquant.quantize(MODEL, method="rtn", wbits=3, out=out, progress=False)
    hiquant.quantize(MODEL, method="rtn", wbits=4, out=out, overwrite=True, progress=False)
    assert json.loads((out / "report.json").read_text())["settings"]["wbits"] == 4
    assert (out.stat().st_mode & 0o777) != 0o700  # the usual mode, not mkdtemp's


# -- 7. rtn needs no calibration text ------------------------------------------------------------

def test_rtn_runs_without_calibration_text_and_pushes_no_windows(tmp_path, monkeypatch):
    from hiquant import blockwise
    calls = []
    monkeypatch.setattr(blockwise, "block_outputs", lambda *a, **k: calls.append(1))
    rep = hiquant.quantize(MODEL, method="rtn", wbits=3, progress=False)
    assert rep.settings["calibration"] is None and calls == []
    with pytest.raises(hiquant.InvalidArgumentError, match="calibration text"):
        hiquant.quantize(MODEL, method="gptq", wbits=3, progress=False)


# -- 8. the evaluation text is tokenized in pieces, up to the windows needed ---------------------

@pytest.mark.parametrize("path", [CALIB, TEST])
def test_tokenizing_in_pieces_equals_encoding_the_whole_text(path):
    from tokenizers import Tokenizer

    from hiquant.calib import tokenize_text
    tok = Tokenizer.from_file(str(Path(MODEL) / "tokenizer.json"))
    text = Path(path).read_text("utf-8")
    whole = np.asarray(tok.encode(text, add_special_tokens=False).ids)
    np.testing.assert_array_equal(tokenize_text(tok, text, piece_chars=4096), whole)
    np.testing.assert_array_equal(tokenize_text(tok, text, max_tokens=5000, piece_chars=4096),
                                  whole[:5000])


# -- 10. smaller ones ----------------------------------------------------------------------------

def test_quiet_prints_no_report_and_a_short_text_names_the_flag(tmp_path):
    rc, out, err = run_cli("quantize", MODEL, "--method", "rtn", "--wbits", "3", "--quiet")
    assert rc == 0 and "| layer |" not in err
    short = tmp_path / "short.txt"
    short.write_text("def f():\n    return 1\n" * 3)
    rc, _, err = run_cli("eval", MODEL, "--text", short, "--seqlen", "64", "--windows", "5",
                         "--quiet")
    assert_clean_failure(rc, err, "fewer than the 5 requested", "windows")


@pytest.mark.parametrize("kw,match", [
    (dict(method="awq"), "folds its scales into the normalization weights"),
    (dict(method="smoothquant"), "folds its scales into the normalization weights"),
    (dict(method="rtn", abits=8), "abits"),
])
def test_numpy_only_methods_on_the_torch_backend_are_refused_before_any_work(kw, match):
    pytest.importorskip("torch")
    from hiquant.config import QuantizeSettings, resolve
    with pytest.raises(hiquant.errors.InvalidArgumentError, match=match) as e:
        resolve(QuantizeSettings(backend="torch", device="cpu", **kw))
    assert "backend='numpy'" in str(e.value)
