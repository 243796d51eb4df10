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
JSON and markdown to ``--hiquant-summary`` (default ``hiquant-summary.json`` / ``.md``). Results
whose settings differ only in the seed are also summarized together (:func:`spread_markdown`:
mean, min and max over the seeds), so that differences are read against the seed spread.
"""

from __future__ import annotations

import json
import re
import statistics
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
            "avg_bits": rep.avg_bits, "ppl": rep.ppl, "val_ppl": rep.val_ppl,
            "seconds": time.perf_counter() - t0,
            "seed": s["seed"],
            # every knob of the run (block_aug_loss, refine_order, iterations, ...) for the JSON
            "settings": json.loads(json.dumps(s, default=str)),
        })
        return rep

    return run


def summary_markdown(results: list) -> str:
    cols = ["case", "model", "method", "wbits", "hbits", "group_size", "scale_bits", "estimator",
            "candidates", "quantizer", "objective", "avg_bits", "ppl", "val_ppl", "seconds"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(f"{v:.4f}" if isinstance(v, float) else ("–" if v is None else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def seed_groups(results: list) -> list:
    """The results grouped by (model, every setting but the seed), in first-seen order: a list of
    ``(label, rows)``; the label is the first row's case with any ``seed<N>`` part removed."""
    groups: dict = {}
    for r in results:
        settings = {k: v for k, v in r.get("settings", {}).items() if k != "seed"}
        if isinstance(settings.get("calibration"), dict):  # the calibration record repeats it
            settings["calibration"] = {k: v for k, v in settings["calibration"].items()
                                       if k != "seed"}
        key = (r.get("model"), json.dumps(settings, sort_keys=True, default=str))
        if key not in groups:
            label = re.sub(r"(^|-)seed\d+(?=-|$)", "", str(r.get("case", ""))).strip("-")
            groups[key] = (label or str(r.get("case")), [])
        groups[key][1].append(r)
    return list(groups.values())


def _spread(values) -> str:
    v = [x for x in values if x is not None]
    if not v:
        return "–"
    if len(v) == 1:
        return f"{v[0]:.4f}"
    return f"{statistics.mean(v):.4f} ({min(v):.4f}–{max(v):.4f})"


def spread_markdown(results: list) -> str:
    """One row per group of :func:`seed_groups`: the seeds, and the mean (min–max) over them of
    the perplexity, the validation perplexity and the wall time."""
    lines = ["| case | model | seeds | avg_bits | ppl mean (min–max) | val_ppl mean (min–max) | "
             "seconds mean |", "|---|---|---|---|---|---|---|"]
    for label, rows in seed_groups(results):
        seeds = ",".join(str(r.get("seed")) for r in rows)
        lines.append(f"| {label} | {rows[0].get('model')} | {seeds} | "
                     f"{max(r['avg_bits'] for r in rows):.4f} | {_spread(r['ppl'] for r in rows)} | "
                     f"{_spread(r.get('val_ppl') for r in rows)} | "
                     f"{statistics.mean(r['seconds'] for r in rows):.0f} |")
    return "\n".join(lines) + "\n"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _RESULTS:
        return
    md = summary_markdown(_RESULTS)
    if any(len(rows) > 1 for _, rows in seed_groups(_RESULTS)):
        md += "\nOver seeds:\n\n" + spread_markdown(_RESULTS)
    terminalreporter.write_sep("=", "hiquant results")
    terminalreporter.write(md)
    base = Path(config.getoption("--hiquant-summary"))
    from ._atomic import atomic_write_text
    atomic_write_text(base.with_suffix(".json"), json.dumps(_RESULTS, indent=1))
    atomic_write_text(base.with_suffix(".md"), md)
    terminalreporter.write_line(f"hiquant: summary written to {base.with_suffix('.json')} and .md")
