"""The compressed-tensors export (issue 21): what transformers' own loader makes of it, and what
it costs on disk, side by side with hiquant's fake-quant and packed exports of the same run.

Per method: perplexity of ``compressed/`` loaded by ``AutoModelForCausalLM.from_pretrained`` (CPU,
float32 compute, the shared protocol's windows), of ``fake/`` on hiquant's NumPy runtime and the
run's own perplexity (the exact weights in float32); the relative gap; the bytes of each export's
``model.safetensors``; the quantized layers' bits per weight in each format; transformers' load
time; how many layers compressed-tensors holds quantized and how many dense.

    python bench/export_compressed.py --model ../shared/bench/llama-bench \\
        --calib ../shared/bench/corpus/calib.txt --text ../shared/bench/corpus/test.txt \\
        --methods gptq --wbits 3 --group 128
    python bench/export_compressed.py --from-out DIR --text test.txt   # an existing --export all run
    python bench/export_compressed.py --quick      # the embedded model, rtn/gptq/hiq, 8 windows (CI)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import environment  # noqa: E402


def transformers_ppl(folder: Path, tokenizer, text: Path, seqlen: int, windows: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    from hiquant.calib import leading_windows, load_text, tokenize_text
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    ids = tokenize_text(tokenizer, load_text(text), max_tokens=seqlen * windows)
    win = torch.from_numpy(np.asarray(leading_windows(ids, seqlen, windows), np.int64))
    losses = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, win.shape[0], 8):
            logits = model(win[i:i + 8]).logits[:, :-1].double()
            ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), win[i:i + 8, 1:],
                                                   reduction="none").mean(dim=1)
            losses.extend(ce.tolist())
    return {"ppl": math.exp(float(np.mean(losses))), "load_s": load_s,
            "eval_s": time.perf_counter() - t0}


def measure(out: Path, text: Path, seqlen: int, windows: int, method: str) -> dict:
    from hiquant.evaluate import perplexity_of_text
    from hiquant.model import load_model
    fake = load_model(out / "fake")
    ppl_fake = perplexity_of_text(fake, text, seqlen, windows, progress=False)["ppl"]
    ct = transformers_ppl(out / "compressed", fake.tokenizer, text, seqlen, windows)
    summary = json.loads((out / "compressed" / "hiquant_export.json").read_text())
    report = json.loads((out / "report.json").read_text())
    acc = summary["accounting"]
    size = {k: os.path.getsize(out / k / "model.safetensors") for k in ("fake", "packed", "compressed")}
    return dict(method=method, ppl_run=report.get("ppl"), ppl_fake=ppl_fake, ppl_ct=ct["ppl"],
                rel_gap=abs(ct["ppl"] - ppl_fake) / ppl_fake, load_s=ct["load_s"],
                eval_s=ct["eval_s"], bytes=size, bits_ct=acc["bits_per_weight"],
                bits_hiquant=acc["hiquant_storage_bits_per_weight"],
                layers_quantized=acc["layers_quantized"], layers_dense=acc["layers_dense"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--calib")
    ap.add_argument("--text")
    ap.add_argument("--from-out", help="an existing output folder of a run with --export all")
    ap.add_argument("--methods", default="gptq")
    ap.add_argument("--wbits", type=int, default=3)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--avg-bits", type=float, default=None, help="hiq's budget")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=200)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    import warnings

    import hiquant
    from hiquant.datasets import embedded_calib_path, embedded_model_path, embedded_test_path
    warnings.simplefilter("ignore")
    rows = []
    if args.from_out:
        rows.append(measure(Path(args.from_out), Path(args.text), args.seqlen, args.windows,
                            json.loads((Path(args.from_out) / "report.json").read_text())
                            .get("settings", {}).get("method", "?")))
    else:
        if args.quick:
            model, calib, text = embedded_model_path(), embedded_calib_path(), embedded_test_path()
            seqlen, windows = 128, 8
            runs = {"rtn": dict(wbits=4, group_size=64), "gptq": dict(wbits=3, group_size=64),
                    "hiq": dict(wbits=2, group_size=64, avg_bits=2.3, m_windows=4, lwc_iters=5,
                                adaround_iters=5, block_epochs=1)}
            small = dict(n_calib=4, seqlen=64)
        else:
            model, calib, text = Path(args.model), Path(args.calib), Path(args.text)
            seqlen, windows = args.seqlen, args.windows
            runs = {m: dict(wbits=args.wbits, group_size=args.group,
                            **({"avg_bits": args.avg_bits} if args.avg_bits else {}))
                    for m in args.methods.split(",")}
            small = {}
        with tempfile.TemporaryDirectory() as tmp:
            for method, kw in runs.items():
                out = Path(tmp) / method
                hiquant.quantize(model, calib, method=method, out=out, export="all",
                                 eval_text=text, eval_seqlen=seqlen, eval_windows=windows,
                                 progress=False, **small, **kw)
                rows.append(measure(out, Path(text), seqlen, windows, method))
    print("| method | ppl (run) | ppl fake/ (hiquant) | ppl compressed/ (transformers) | rel. gap "
          "| MB fake | MB packed | MB compressed | bits/w hiquant | bits/w compressed "
          "| layers q/dense | load s |")
    print("|" + "---|" * 12)
    for r in rows:
        mb = {k: v / 2 ** 20 for k, v in r["bytes"].items()}
        run = f"{r['ppl_run']:.4f}" if r["ppl_run"] else "-"
        print(f"| {r['method']} | {run} | {r['ppl_fake']:.4f} | {r['ppl_ct']:.4f} | "
              f"{r['rel_gap']:.1e} | {mb['fake']:.2f} | {mb['packed']:.2f} | "
              f"{mb['compressed']:.2f} | {r['bits_hiquant']:.3f} | {r['bits_ct']:.3f} | "
              f"{r['layers_quantized']}/{r['layers_dense']} | {r['load_s']:.1f} |")
    print(json.dumps({"bench": "export_compressed", "quick": args.quick, "rows": rows,
                      **environment("torch", "transformers", "compressed_tensors")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
