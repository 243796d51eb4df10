"""SmoothQuant doing its job (issue 20): on a copy of a model with made activation outliers that
leave the full-precision function unchanged — a few channels of every input_layernorm and
post_attention_layernorm weight multiplied by F and the matching input columns of q/k/v and
gate/up divided by F — per-token activation quantization degrades, and smoothing brings the
perplexity back to the unmodified model's.

Rows, side by side in one run, each at weights W{8,4} per channel (RTN; smoothquant = smoothing +
RTN) with activations A8 (and A4 with --a4): the unmodified model with rtn, the outlier copy with
rtn (no smoothing) and with smoothquant; plus the FP perplexity of both copies.

    python bench/smoothquant_outliers.py --model ../shared/bench/llama-bench \
        --calib ../shared/bench/corpus/calib.txt --text ../shared/bench/corpus/test.txt
    python bench/smoothquant_outliers.py --quick      # the embedded model, few windows (CI)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import environment  # noqa: E402


def make_outlier_copy(src: Path, dst: Path, channels, factor: float) -> None:
    """Copy the checkpoint folder with the equivalent outlier transform (FP function unchanged up
    to the stored dtype's rounding)."""
    from safetensors.numpy import load_file, save_file

    from hiquant.model import load_model
    shutil.copytree(src, dst)
    m = load_model(src)
    files = sorted(dst.glob("*.safetensors"))
    if len(files) != 1:
        raise SystemExit("the outlier copy supports single-file checkpoints")
    t = load_file(str(files[0]))
    ch = list(channels)
    for b in range(m.num_blocks):
        pre = f"model.layers.{b}."
        groups = m.input_groups(b)
        for norm, lins in ((pre + "input_layernorm.weight", groups[0]),
                           (pre + "post_attention_layernorm.weight", groups[2])):
            w = t[norm].astype(np.float32)
            w[ch] *= factor
            t[norm] = w.astype(t[norm].dtype)
            for lin in lins:
                W = t[lin + ".weight"].astype(np.float32)
                W[:, ch] /= factor
                t[lin + ".weight"] = W.astype(t[lin + ".weight"].dtype)
    save_file(t, str(files[0]), metadata={"format": "pt"})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--calib")
    ap.add_argument("--text")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--factor", type=float, default=30.0)
    ap.add_argument("--channels", default="7,63,101,200")
    ap.add_argument("--a4", action="store_true", help="also A4 rows")
    ap.add_argument("--wbits", default="8,4")
    args = ap.parse_args()
    import hiquant
    from hiquant.datasets import embedded_calib_path, embedded_model_path, embedded_test_path
    from hiquant.evaluate import perplexity_of_text
    from hiquant.model import load_model
    if args.quick:
        model, calib, text = embedded_model_path(), embedded_calib_path(), embedded_test_path()
        kw = dict(n_calib=8, seqlen=128, eval_seqlen=128, eval_windows=8)
        channels = [3, 40, 77]
    else:
        model, calib, text = Path(args.model), Path(args.calib), Path(args.text)
        kw = {}
        channels = [int(c) for c in args.channels.split(",")]
    s = hiquant.QuantizeSettings(**kw)
    abits = [8, 4] if args.a4 else [8]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        made = Path(tmp) / "outliers"
        make_outlier_copy(Path(model), made, channels, args.factor)
        for name, folder in (("original", Path(model)), ("outliers", made)):
            t0 = time.perf_counter()
            ppl = perplexity_of_text(load_model(folder), text, s.eval_seqlen, s.eval_windows,
                                     progress=False)["ppl"]
            rows.append(dict(model=name, method="FP", w=16, a=16, ppl=ppl,
                             seconds=time.perf_counter() - t0))
        for wb in (int(w) for w in args.wbits.split(",")):
            for ab in abits:
                for name, folder, method in (("original", Path(model), "rtn"),
                                             ("outliers", made, "rtn"),
                                             ("outliers", made, "smoothquant")):
                    t0 = time.perf_counter()
                    rep = hiquant.quantize(folder, calib, method=method, wbits=wb, group_size=0,
                                           abits=ab, eval_text=text, progress=False, **kw)
                    rows.append(dict(model=name, method=method, w=wb, a=ab, ppl=rep.ppl,
                                     avg_bits=rep.avg_bits, seconds=time.perf_counter() - t0))
    print("| model | method | W | A | ppl | s |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['method']} | {r['w']} | {r['a']} | {r['ppl']:.3f} | "
              f"{r['seconds']:.0f} |")
    print(json.dumps({"bench": "smoothquant_outliers", "quick": args.quick, "factor": args.factor,
                      "channels": channels, "rows": rows, **environment()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
