"""Builds the notebooks from the cells below and executes them in place (nbclient), so that the
stored outputs are always those of the current code. `python notebooks/make_notebooks.py`."""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).parent

WALKTHROUGH = [
    ("md", """# hiquant walkthrough

Quantize the small LLaMA-architecture model that ships with hiquant (trained on the Python
standard library's sources): calibrate, look at the Fisher scores of every input channel, let the
integer quadratic program choose each layer's high-impact ratio, quantize with several methods
and compare perplexity against the exact average bits each one stores."""),
    ("code", """import time, numpy as np
import hiquant
from hiquant.datasets import embedded_model_path, embedded_calib_path, embedded_test_path
from hiquant.model import load_model
from hiquant.calib import calibration_windows
from hiquant.stats import collect_stats
from hiquant import quantize, QuantizeSettings
from hiquant.config import resolve
from hiquant import plots
%matplotlib inline
model = load_model(embedded_model_path())
print(model)"""),
    ("md", "## 1. Calibration and the empirical Fisher\n\nPer-sequence gradients of the LM loss on 32 random "
           "windows of the calibration text; each input channel's score is the column sum of the squared "
           "gradients."),
    ("code", """windows, calib_settings = calibration_windows(model.tokenizer, embedded_calib_path(), n=32, seqlen=256, seed=0)
t0 = time.perf_counter()
stats = collect_stats(model, windows, gram=False, fisher=True, progress=False)
print(f"Fisher of {len(model.linear_names())} layers from {windows.shape} windows in {time.perf_counter() - t0:.1f} s")"""),  # noqa: E501
    ("code", """names = model.linear_names()
fig = plots.plot_fisher_and_ratios(names, stats.fisher_col)"""),
    ("md", "## 2. Allocation: per-layer ratios under one bit budget\n\n`fisher` estimator of M (inter-layer "
           "terms across blocks), 2-bit low part, 3-bit high part, groups of 64, budget 2.45 bits per weight "
           "counted exactly (codes, fp16 scales, packed zero points, the high-column mask)."),
    ("code", """from hiquant import allocate
shapes = {n: model.linear_shape(n) for n in names}
sm = allocate.sensitivity_matrix(model, windows, estimator="fisher", fisher_col=stats.fisher_col,
                                 b_low=2, b_high=3, group_size=64, n_windows=16)
alloc = allocate.allocate(shapes, stats.fisher_col, sm, avg_bits=2.45)
print(alloc.result.status, f"avg bits {alloc.avg_bits:.4f}", f"gap {alloc.result.gap:.2e}")
fixed = resolve(QuantizeSettings(method="fixed-ratio", wbits=2, group_size=64))
from hiquant.allocate import uniform_ratio_for_budget
r_fixed = uniform_ratio_for_budget(shapes, fixed, alloc.budget_bits)
fig = plots.plot_fisher_and_ratios(names, stats.fisher_col, alloc.ratios, fixed_ratio=r_fixed)"""),
    ("md", "## 3. Quantize with several methods\n\nEvery method runs through the same pipeline; `avg_bits` "
           "is the exact storage of each result."),
    ("code", """common = dict(wbits=2, group_size=64, n_calib=16, seqlen=256, eval_seqlen=256, eval_windows=50,
              lwc_iters=50, adaround_iters=100)  # short runs so the notebook executes in minutes
runs = [("rtn", {}), ("gptq", {}), ("lwc", {}),
        ("fixed-ratio", dict(avg_bits=2.45)), ("fp16-retention", dict(avg_bits=2.45)),
        ("hiq", dict(avg_bits=2.45))]
rows = []
for method, extra in runs:
    t0 = time.perf_counter()
    rep = quantize(embedded_model_path(), embedded_calib_path(), model=model, method=method,
                   eval_text=embedded_test_path(), progress=False, **common, **extra)
    rows.append(dict(method=method, avg_bits=rep.avg_bits, ppl=rep.ppl, seconds=time.perf_counter() - t0))
    print(f"{method:<15} {rep.avg_bits:.3f} bits  ppl {rep.ppl:8.3f}  ({rows[-1]['seconds']:.1f} s)")
model.reset_weights()
from hiquant.evaluate import perplexity_of_text
fp = perplexity_of_text(model, embedded_test_path(), 256, 50, progress=False)["ppl"]
print(f"FP16 perplexity {fp:.3f}")"""),  # noqa: E501
    ("code", """fig = plots.plot_ppl_vs_bits(rows, fp_ppl=fp)"""),
]

BYOM = [
    ("md", """# Bring your own model

Point `MODEL_DIR` at any Hugging Face folder (`config.json`, safetensors, `tokenizer.json`) of a
LLaMA, Mistral, Qwen2 or Qwen3 model, and `CALIB` / `TEST` at text files. By default this runs on
the embedded model so the notebook executes anywhere.

What to expect on a CPU: hiquant keeps weights memory-mapped in their stored dtype and expands one
decoder block at a time, so peak memory is about the stored model (mapped, not all resident) plus
the calibration hidden states (n_calib × seqlen × hidden × 4 bytes, twice for block-wise
objectives) plus one block's float32 weights and Gram matrices. Time is dominated by the block
forward passes over the calibration windows and by the LWC/AdaRound iterations."""),
    ("code", """import os, time, resource
import hiquant
from hiquant.datasets import embedded_model_path, embedded_calib_path, embedded_test_path
from hiquant.model import load_model
from hiquant import quantize
MODEL_DIR = os.environ.get("HIQUANT_MODEL", str(embedded_model_path()))
CALIB = os.environ.get("HIQUANT_CALIB", str(embedded_calib_path()))
TEST = os.environ.get("HIQUANT_TEST", str(embedded_test_path()))
model = load_model(MODEL_DIR)
print(model)
n_params = sum(a * b for a, b in map(model.linear_shape, model.linear_names()))
print(f"{n_params / 1e6:.1f} M parameters in quantized linear layers")"""),
    ("code", """seqlen = min(256, model.config.raw.get("max_position_embeddings", 2048))
t0 = time.perf_counter()
rep = quantize(MODEL_DIR, CALIB, model=model, method="hiq", wbits=2, group_size=64, avg_bits=2.45,
               n_calib=16, seqlen=seqlen, eval_seqlen=seqlen, eval_windows=50, eval_text=TEST,
               lwc_iters=50, adaround_iters=100, progress=False)
print(f"hiq: {rep.avg_bits:.3f} bits, perplexity {rep.ppl:.3f}, {time.perf_counter() - t0:.1f} s")
print(f"peak resident memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
print(rep.timings)"""),
    ("code", """from IPython.display import Markdown
Markdown(rep.markdown())"""),
]


def build(cells):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for kind, src in cells:
        cell = nbformat.v4.new_markdown_cell if kind == "md" else nbformat.v4.new_code_cell
        nb.cells.append(cell(src))
    return nb


def main(argv=None) -> int:
    for name, cells in (("01_walkthrough.ipynb", WALKTHROUGH), ("02_bring_your_own_model.ipynb", BYOM)):
        nb = build(cells)
        NotebookClient(nb, timeout=1800, kernel_name="python3",
                       resources={"metadata": {"path": str(HERE)}}).execute()
        nbformat.write(nb, HERE / name)
        print(f"wrote {HERE / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
