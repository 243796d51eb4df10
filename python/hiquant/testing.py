"""pytest plugin for ablations driven from pytest (``pytest -p hiquant.testing``, or
``pytest_plugins = ["hiquant.testing"]`` in a conftest.py).

Fixtures:

* ``hiquant_cache_dir`` — a session-wide folder for calibration statistics (``--hiquant-cache``,
  default ``.hiquant_cache``), keyed to (model files, calibration settings), so a parametrized
  grid collects each model's statistics once.
* ``quantize_and_eval`` — ``quantize_and_eval(model_dir, calib, eval_text, **settings) -> Report``:
  runs :func:`hiquant.quantize` (models loaded once per session and reused), records the result.
* ``hiquant_results`` — the list of recorded results.

At the end of the session every recorded result is printed as a markdown table and written as
JSON and markdown to ``--hiquant-summary`` (default ``hiquant-summary.json`` / ``.md``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

_RESULTS: list = []
_MODELS: dict = {}


def pytest_addoption(parser):
    g = parser.getgroup("hiquant")
    g.addoption("--hiquant-cache", default=".hiquant_cache", help="calibration statistics cache folder")
    g.addoption("--hiquant-summary", default="hiquant-summary",
                help="write the session's results table to PATH.json and PATH.md")


@pytest.fixture(scope="session")
def hiquant_cache_dir(request) -> Path:
    p = Path(request.config.getoption("--hiquant-cache"))
    p.mkdir(parents=True, exist_ok=True)
    return p


@pytest.fixture(scope="session")
def hiquant_results() -> list:
    return _RESULTS


@pytest.fixture
def quantize_and_eval(request, hiquant_cache_dir):
    from .model import load_model
    from .pipeline import quantize

    def run(model_dir, calib, eval_text=None, **settings):
        key = str(Path(model_dir).resolve())
        if key not in _MODELS:
            _MODELS[key] = load_model(model_dir)
        t0 = time.perf_counter()
        rep = quantize(model_dir, calib, eval_text=eval_text, model=_MODELS[key],
                       cache_dir=hiquant_cache_dir, progress=False, **settings)
        s = rep.settings
        nodeid = request.node.nodeid
        _RESULTS.append({
            "test": nodeid, "case": nodeid[nodeid.index("[") + 1:-1] if "[" in nodeid else request.node.name,
            "quantizer": s.get("quantizer", "auto"), "model": Path(model_dir).name, "method": s["method"],
            "wbits": s["wbits"], "hbits": s["hbits"], "group_size": s["group_size"],
            "scale_bits": s.get("scale_bits", 16), "objective": s.get("objective", "layer"),
            "estimator": s["estimator"] if s["method"] == "hiq" else None,
            "candidates": list(s["candidates"]) if s["method"] == "hiq" else None,
            "avg_bits": rep.avg_bits, "ppl": rep.ppl, "seconds": time.perf_counter() - t0,
            "seed": s["seed"],
            # every knob of the run (block_aug_loss, refine_order, iterations, ...) for the JSON
            "settings": json.loads(json.dumps(s, default=str)),
        })
        return rep

    return run


def summary_markdown(results: list) -> str:
    cols = ["case", "model", "method", "wbits", "hbits", "group_size", "scale_bits", "estimator",
            "candidates", "quantizer", "objective", "avg_bits", "ppl", "seconds"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(f"{v:.4f}" if isinstance(v, float) else ("–" if v is None else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _RESULTS:
        return
    md = summary_markdown(_RESULTS)
    terminalreporter.write_sep("=", "hiquant results")
    terminalreporter.write(md)
    base = Path(config.getoption("--hiquant-summary"))
    from ._atomic import atomic_write_text
    atomic_write_text(base.with_suffix(".json"), json.dumps(_RESULTS, indent=1))
    atomic_write_text(base.with_suffix(".md"), md)
    terminalreporter.write_line(f"hiquant: summary written to {base.with_suffix('.json')} and .md")
