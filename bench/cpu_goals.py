"""Issue 23's CPU-kernel goals, both measured side by side in one run.

* AdaRound step (3-bit, g128, every column learned) on ``bench/kernels.py``'s layer (1024 x 4096,
  4,096 calibration tokens) against the PyTorch CPU autograd step of the same objective
  (kernels.TorchAdaRound). Goal: at least 3x.
* Quantize + dequantize (min-max, 4-bit, g128 and per row) of ``bench/primitives.py``'s 4096 x 4096
  float32 matrix against vectorized NumPy (the faster of the float32 formulation and the float64
  reference). Goal: at least 5x, on both groupings.

hiquant is timed twice in the same rounds: with the AVX2 elementwise kernels ('auto') and with
the portable four-lane ones ('portable', the code before those kernels existed: same bits, see
hiquant/simd.hpp), so one run gives both the ratios and what the 8-lane kernels changed.

    python bench/cpu_goals.py [--quick] [--threads N] [--repeats R]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import emit, environment, torch_with_threads  # noqa: E402
from hiquant import _core  # noqa: E402
from hiquant import learners as K  # noqa: E402
from hiquant import quantizer as q  # noqa: E402
from hiquant._reference import quantizer as ref  # noqa: E402
from kernels import TorchAdaRound, make_layer, timed_pairs  # noqa: E402
from primitives import numpy_f32_fake_quantize  # noqa: E402

GOAL_ADAROUND = 3.0
GOAL_QDQ = 5.0


def with_kernel(kernel: str, fn):
    def run(state):
        _core.set_elementwise_kernel(kernel)
        try:
            return fn(state)
        finally:
            _core.set_elementwise_kernel("auto")
    return run


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="256 x 1024 layer, 1024 x 4096 matrix")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args(argv)
    torch, nt = torch_with_threads("bench/cpu_goals.py", args.threads)
    repeats = args.repeats or (2 if args.quick else 5)
    rows = []

    # ---- AdaRound step, every column learned (bench/kernels.py's measurement)
    d_out, d_in, tokens = (256, 1024, 1024) if args.quick else (1024, 4096, 4096)
    W, H = make_layer(d_out, d_in, tokens)
    g, steps = 128, 2
    obj = K.LayerwiseObjective(W, H, tokens)
    new_part = lambda: K.AdaRound(W, 3, g, iters=steps, warmup=0.0)  # noqa: E731
    fit = lambda a: K.fit(obj, steps, adaround=a)  # noqa: E731
    t = timed_pairs({
        "hiquant": (new_part, with_kernel("auto", fit)),
        "hiquant, portable elementwise": (new_part, with_kernel("portable", fit)),
        "torch": (lambda: TorchAdaRound(torch, W, H, tokens, 3, g, np.arange(d_in), W.copy()),
                  lambda ta: [ta.step() for _ in range(steps)]),
    }, repeats)
    ada = {k: v["median"] / steps for k, v in t.items()}
    rows += [("AdaRound step", k, v["min"] / steps, ada[k]) for k, v in t.items()]
    sp_ada = {k: ada["torch"] / ada[k] for k in ("hiquant", "hiquant, portable elementwise")}

    # ---- quantize + dequantize (bench/primitives.py's measurement)
    qrows = 1024 if args.quick else 4096
    M = np.random.default_rng(0).standard_normal((qrows, 4096)).astype(np.float32)
    sp_qdq, sp_qdq_portable = {}, {}
    for label, group in (("g128", 128), ("per-row", 0)):
        np.testing.assert_allclose(q.fake_quantize(M, 4, group), ref.fake_quantize(M, 4, group),
                                   rtol=1e-6, atol=1e-6)
        fns = {
            "hiquant": (lambda: None, with_kernel("auto", lambda _: q.fake_quantize(M, 4, group))),
            "hiquant, portable elementwise": (
                lambda: None, with_kernel("portable", lambda _: q.fake_quantize(M, 4, group))),
            "numpy_f32": (lambda: None, lambda _: numpy_f32_fake_quantize(M, 4, group)),
            "numpy_f64_reference": (lambda: None, lambda _: ref.fake_quantize(M, 4, group)),
        }
        tq = timed_pairs(fns, 3 * repeats)
        best = min(tq["numpy_f32"]["median"], tq["numpy_f64_reference"]["median"])
        sp_qdq[label] = best / tq["hiquant"]["median"]
        sp_qdq_portable[label] = best / tq["hiquant, portable elementwise"]["median"]
        rows += [(f"quantize+dequantize {label}", k, v["min"], v["median"]) for k, v in tq.items()]

    print(f"AdaRound layer {d_out} x {d_in} ({tokens} tokens, 3-bit g128); quantize+dequantize "
          f"{qrows} x 4096 4-bit; threads {nt}; GEMM {_core.gemm_kernel_name()}, elementwise "
          f"{_core.elementwise_kernel_name()}")
    print(f"{'measurement':<30} {'implementation':<30} {'min s':>9} {'median s':>9}")
    for what, impl, tmin, tmed in rows:
        print(f"{what:<30} {impl:<30} {tmin:9.4f} {tmed:9.4f}")
    qmin = min(sp_qdq.values())
    print(f"\nAdaRound step vs torch autograd: {sp_ada['hiquant']:.2f}x (goal {GOAL_ADAROUND:.0f}x; "
          f"portable elementwise {sp_ada['hiquant, portable elementwise']:.2f}x)")
    print(f"quantize+dequantize vs best NumPy: g128 {sp_qdq['g128']:.2f}x, per-row "
          f"{sp_qdq['per-row']:.2f}x (goal {GOAL_QDQ:.0f}x; portable elementwise "
          f"{sp_qdq_portable['g128']:.2f}x / {sp_qdq_portable['per-row']:.2f}x)")
    emit({
        "benchmark": "cpu_goals",
        "quick": args.quick,
        "adaround_shape": [d_out, d_in],
        "qdq_shape": [qrows, 4096],
        "gemm_kernel": _core.gemm_kernel_name(),
        "elementwise_kernel": _core.elementwise_kernel_name(),
        "adaround_speedup_vs_torch": round(sp_ada["hiquant"], 2),
        "adaround_speedup_vs_torch_portable": round(sp_ada["hiquant, portable elementwise"], 2),
        "qdq_speedup_vs_numpy": round(qmin, 2),
        "qdq_speedup_vs_numpy_g128": round(sp_qdq["g128"], 2),
        "qdq_speedup_vs_numpy_per_row": round(sp_qdq["per-row"], 2),
        "qdq_speedup_vs_numpy_portable": {k: round(v, 2) for k, v in sp_qdq_portable.items()},
        "goals": {"adaround": GOAL_ADAROUND, "qdq": GOAL_QDQ},
        "goals_met": {"adaround": sp_ada["hiquant"] >= GOAL_ADAROUND, "qdq": qmin >= GOAL_QDQ},
        "seconds_per_step": ada,
        **environment("torch"),
    })


if __name__ == "__main__":
    main()
