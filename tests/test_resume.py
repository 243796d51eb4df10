"""Crash safety: a real `hiquant quantize` run killed with SIGKILL mid-way resumes with --resume
and produces exactly the result of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from hiquant.datasets import embedded_calib_path, embedded_model_path


def _base_cmd(out, *extra):
    return [sys.executable, "-m", "hiquant", "quantize", str(embedded_model_path()),
            "--calib", str(embedded_calib_path()), "--method", "rtn", "--wbits", "3",
            "--group", "64", "--n-calib", "8", "--seqlen", "128", "--out", str(out), "--quiet", *extra]


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
@pytest.mark.parametrize("method", [
    [],  # rtn: the quantized path's hidden states
    # the block-wise refinement also needs the full-precision path's states (its targets)
    ["--method", "lwc", "--objective", "refine", "--lwc-iters", "20", "--block-epochs", "1"]],
    ids=["rtn", "lwc-refine"])
def test_killed_run_resumes_to_an_identical_result(tmp_path, method):
    def _cmd(out, *extra):
        return _base_cmd(out, *method, *extra)

    ref = tmp_path / "ref"
    subprocess.run(_cmd(ref), check=True, capture_output=True)

    out = tmp_path / "run"
    meta = tmp_path / "run.progress" / "meta.json"
    env = dict(os.environ, HIQUANT_TEST_SLOW_BLOCKS="1.5")
    p = subprocess.Popen(_cmd(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while time.time() - t0 < 60:
        if meta.exists() and json.loads(meta.read_text())["done_blocks"] >= 2:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not out.exists()  # nothing that looks like a result
    done = json.loads(meta.read_text())["done_blocks"]
    assert 2 <= done < 4  # killed mid-way (the embedded model has 4 blocks)

    r = subprocess.run(_cmd(out), capture_output=True, text=True)
    assert r.returncode != 0 and "--resume" in r.stderr  # progress is never silently discarded

    subprocess.run(_cmd(out, "--resume"), check=True, capture_output=True)
    for part in ("packed/model.safetensors", "fake/model.safetensors"):
        assert (out / part).read_bytes() == (ref / part).read_bytes()
    assert not (tmp_path / "run.progress").exists()


def test_a_kill_between_the_hidden_states_and_meta_json_resumes_from_the_previous_block(tmp_path):
    """The hidden states are written before meta.json; they are named by the block count they
    follow, so states written for a block whose meta.json never landed are not picked up."""
    import numpy as np

    from hiquant.progress import ProgressState
    st = ProgressState(tmp_path / "p", "key", resume=False)
    h1, h1_fp = np.full((2, 3), 1.0, np.float32), np.full((2, 3), -1.0, np.float32)
    st.save_block(0, {}, h1, {}, {}, None, hidden_fp=h1_fp)
    np.save(tmp_path / "p" / "hidden-2.npy", np.full((2, 3), 2.0, np.float32))  # block 1, killed
    again = ProgressState(tmp_path / "p", "key", resume=True)
    assert again.done_blocks == 1
    np.testing.assert_array_equal(again.load_hidden(), h1)
    np.testing.assert_array_equal(again.load_hidden("hidden_fp"), h1_fp)
    st.save_block(1, {}, h1 + 1, {}, {}, None)  # a layer-wise run keeps no full-precision path
    with pytest.raises(ValueError, match="hidden_fp"):
        ProgressState(tmp_path / "p", "key", resume=True).load_hidden("hidden_fp")
    assert not (tmp_path / "p" / "hidden-1.npy").exists()
