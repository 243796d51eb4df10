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


def _cmd(out, *extra):
    return [sys.executable, "-m", "hiquant", "quantize", str(embedded_model_path()),
            "--calib", str(embedded_calib_path()), "--method", "rtn", "--wbits", "3",
            "--group", "64", "--n-calib", "8", "--seqlen", "128", "--out", str(out), "--quiet", *extra]


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_killed_run_resumes_to_an_identical_result(tmp_path):
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
