"""Shared helpers for benchmarks: timing side by side, and the environment record every result carries."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from importlib import metadata


def git_sha() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"],
                                       cwd=os.path.dirname(__file__), text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions(*names: str) -> dict:
    out = {"python": platform.python_version()}
    for n in ("hiquant", "numpy", *names):
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def environment(*extra_packages: str) -> dict:
    import hiquant
    return {
        "git_sha": git_sha(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": hiquant.get_num_threads(),
        "build_flags": hiquant._core.build_flags,
        "versions": versions(*extra_packages),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def torch_with_threads(bench: str, threads: int | None):
    """PyTorch for a benchmark that compares against it, with hiquant's and torch's thread counts
    set alike (``threads``, or hiquant's default); exits with a message where torch is missing.
    Returns ``(torch, n_threads)``."""
    try:
        import torch
    except ImportError:
        sys.exit(f"{bench} compares against PyTorch: pip install torch (CPU)")
    import hiquant
    if threads:
        hiquant.set_num_threads(threads)
    nt = hiquant.get_num_threads()
    torch.set_num_threads(nt)
    return torch, nt


def peak_rss_mib() -> float:
    """Peak resident memory of this process in MiB. VmHWM belongs to this process's address
    space; ru_maxrss (the fallback) also counts the parent's peak, which Linux carries across
    exec, so a worker started by a benchmark would report the benchmark's."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def interleaved(fns: dict, repeats: int = 7, warmup: int = 1) -> dict:
    """Time several callables side by side: each round runs every function once, in turn, so that
    machine noise hits all of them alike. Returns {name: {"min": s, "median": s, "runs": [...]}}."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    runs = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            runs[k].append(time.perf_counter() - t0)
    return {k: {"min": min(v), "median": statistics.median(v), "runs": v} for k, v in runs.items()}


def emit(result: dict) -> None:
    """The last line of every benchmark: one JSON object."""
    sys.stdout.flush()
    print(json.dumps(result, sort_keys=True))
