"""The hybrid quantizer's high part around W_H or around its least-squares targets, layer by layer.

``high_compensation`` (hiquant.methods.hybrid.compensated_high) learns AdaRound's rounding of the
high-impact columns around ``W_H - E_L H_LH (H_HH + damp)^-1`` (the continuous optimum given the
frozen low part) instead of around ``W_H``. This compares the final layer loss of both, side by
side in one run, on real layers: the Grams of ``--blocks`` from ``--windows`` × 512 calibration
tokens through the float model, the high columns by ``diag(H) · ||W_col||²`` at each ``--ratios``,
W2 g64 + b_H 3 with 6-bit scale codes and GPTQ low codes (act_order), the default iterations.

    python bench/high_targets.py --quick          # CI: the embedded tiny model, few iterations
    python bench/high_targets.py --model ../shared/bench/llama-bench \\
        --calib ../shared/bench/corpus/calib.txt --blocks 3 --ratios 0.02,0.1,0.8
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import emit, environment  # noqa: E402
from hiquant import calib  # noqa: E402
from hiquant.methods import hybrid  # noqa: E402
from hiquant.model import load_model  # noqa: E402

KEYS = ("q_proj", "o_proj", "gate_proj", "down_proj")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model")
    ap.add_argument("--calib")
    ap.add_argument("--blocks", default="3")
    ap.add_argument("--ratios", default="0.02,0.1,0.8")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    seqlen, iters = 512, dict(lwc_iters=1000, adaround_iters=5000)
    if a.quick or a.model is None:
        from hiquant.datasets import embedded_calib_path, embedded_model_path
        a.model, a.calib = str(embedded_model_path()), str(embedded_calib_path())
        if a.quick:
            a.blocks, a.windows, seqlen = "1", 4, 128
            iters = dict(lwc_iters=50, adaround_iters=100)
    m = load_model(a.model)
    win, _ = calib.calibration_windows(m.tokenizer, a.calib, a.windows, seqlen, 0)
    blocks = [int(x) for x in a.blocks.split(",")]
    ratios = [float(x) for x in a.ratios.split(",")]
    grams: dict = {}

    def capture_for(b):
        def cap(name, X):
            G = grams.setdefault((b, name.split(".")[-1]), [0.0, 0])
            G[0] = G[0] + X.astype(np.float64).T @ X.astype(np.float64)
            G[1] += X.shape[0]
        return cap

    h = np.concatenate([m.embed(win[s:s + 8]) for s in range(0, len(win), 8)])
    for i in range(max(blocks) + 1):
        for s in range(0, len(win), 8):
            h[s:s + 8] = m.block_forward(i, h[s:s + 8], capture=capture_for(i) if i in blocks else None)
    rows = []
    print(f"{'layer':<22} {'ratio':>5} {'RTN':>9} {'around W_H':>11} {'targets':>9} {'change':>7}")
    for b in blocks:
        for key in KEYS:
            name = next(n for n in m.block_linear_names(b) if n.endswith(key))
            W = m.get_weight(name)
            H, N = grams[(b, key)]
            score = np.diag(H) * (W.astype(np.float64) ** 2).sum(0)
            for r in ratios:
                hi = np.sort(np.argsort(-score)[: int(np.ceil(r * W.shape[1]))])
                res = {}
                for comp in (False, True):
                    t0 = time.perf_counter()
                    q = hybrid.quantize_layer(W, H, N, hi, 2, 3, 64, scale_bits=6,
                                              low_rounding="gptq", act_order=True,
                                              high_compensation=comp, n_threads=a.threads, **iters)
                    res[comp] = (q.loss_final, time.perf_counter() - t0, q.loss_rtn)
                ch = res[True][0] / res[False][0] - 1
                rows.append({"layer": name, "ratio": r, "loss_rtn": res[False][2],
                             "loss_weights": res[False][0], "loss_targets": res[True][0],
                             "seconds": [res[False][1], res[True][1]]})
                print(f"{f'{b}.{key}':<22} {r:5.2f} {res[False][2]:9.3f} {res[False][0]:11.4f} "
                      f"{res[True][0]:9.4f} {100 * ch:+6.1f}%")
    emit({"bench": "high_targets", "model": a.model, "windows": a.windows, "seqlen": seqlen,
          "iters": iters, "rows": rows, **environment()})


if __name__ == "__main__":
    main()
