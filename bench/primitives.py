"""Quantize + dequantize throughput of the native primitives against vectorized NumPy.

Same function on both sides: min-max asymmetric parameters (range including 0), codes with
round-half-to-even, dequantization. NumPy runs it two ways: the float64 reference
(hiquant._reference, bit-identical codes) and a float32 vectorized version (the fastest plain
NumPy formulation). The speedup is reported against the faster of the two.

    python bench/primitives.py [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import hiquant  # noqa: E402
from _common import emit, environment, interleaved  # noqa: E402
from hiquant import quantizer as q  # noqa: E402
from hiquant._reference import quantizer as ref  # noqa: E402


def numpy_f32_fake_quantize(W: np.ndarray, bits: int, group: int) -> np.ndarray:
    """Vectorized float32 NumPy: reshape to (rows, groups, g) and work on whole arrays."""
    rows, cols = W.shape
    g = cols if group <= 0 else group
    Wg = W.reshape(rows, cols // g, g)
    maxq = np.float32(2**bits - 1)
    lo = np.minimum(Wg.min(axis=2, keepdims=True), 0)
    hi = np.maximum(Wg.max(axis=2, keepdims=True), 0)
    scale = (hi - lo) / maxq
    scale[scale == 0] = 2 / maxq
    zero = np.rint(-lo / scale)
    codes = np.clip(np.rint(Wg / scale) + zero, 0, maxq)
    return (scale * (codes - zero)).reshape(rows, cols)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1024 x 4096 and fewer repeats")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--bits", type=int, default=4)
    args = ap.parse_args(argv)
    if args.threads:
        hiquant.set_num_threads(args.threads)
    rows = 1024 if args.quick else 4096
    cols = 4096
    repeats = 3 if args.quick else 7
    W = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32)
    gbytes = W.nbytes / 1e9

    table = []
    speedups = {}
    for label, group in (("g128", 128), ("per-row", 0)):
        native = lambda: q.fake_quantize(W, args.bits, group)  # noqa: E731
        fns = {
            "hiquant": native,
            "numpy_f32": lambda: numpy_f32_fake_quantize(W, args.bits, group),
            "numpy_f64_reference": lambda: ref.fake_quantize(W, args.bits, group),
        }
        # Same function: the native output equals the float64 reference's to float32 rounding.
        np.testing.assert_allclose(native(), ref.fake_quantize(W, args.bits, group), rtol=1e-6, atol=1e-6)
        t = interleaved(fns, repeats=repeats)
        best_numpy = min(t["numpy_f32"]["median"], t["numpy_f64_reference"]["median"])
        speedups[label] = best_numpy / t["hiquant"]["median"]
        for name, v in t.items():
            table.append((label, name, v["min"] * 1e3, v["median"] * 1e3, gbytes / v["median"]))

    print(f"quantize+dequantize, {rows}x{cols} float32, {args.bits}-bit, threads={hiquant.get_num_threads()}")
    print(f"{'grouping':<9} {'implementation':<22} {'min ms':>9} {'median ms':>10} {'GB/s':>7}")
    for label, name, tmin, tmed, gbs in table:
        print(f"{label:<9} {name:<22} {tmin:9.2f} {tmed:10.2f} {gbs:7.2f}")
    for label, s in speedups.items():
        print(f"speedup vs best NumPy ({label}): {s:.1f}x")

    emit({
        "benchmark": "primitives",
        "shape": [rows, cols],
        "bits": args.bits,
        "quick": args.quick,
        "speedup_vs_numpy": round(min(speedups.values()), 2),
        "speedup_vs_numpy_g128": round(speedups["g128"], 2),
        "speedup_vs_numpy_per_row": round(speedups["per-row"], 2),
        "gbps": {f"{l}/{n}": round(g, 3) for l, n, _, _, g in table},
        **environment(),
    })


if __name__ == "__main__":
    main()
