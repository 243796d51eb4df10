"""Real-size shapes: per decoder layer, the time of each stage and the peak host (and device)
memory of the NumPy runtime, the torch runtime on the CPU and, where a GPU is present, on CUDA;
with the extrapolation to a full 7B and a 70B model.

A checkpoint with LLaMA-2-7B's shapes (hidden 4096, MLP 11008, 32 heads, vocabulary 32000) and
random float16 weights is written to a temporary folder with ``--layers`` decoder layers (2-4 on
a small machine, 32 on a GPU machine). Each backend runs in its own process (so that each one's
peak resident memory is its own) through the pipeline's per-layer stages:

* ``forward``: the calibration windows through the layer (``blockwise.block_outputs``);
* ``grams``: the same forward with the inputs of the seven linears captured into their Gram
  matrices (``stats.block_grams``);
* ``backward``: one window's forward with cache and backward with weight gradients, per window
  (the empirical-Fisher pass takes one per calibration window: ``--n-calib`` of them);
* ``gptq``: GPTQ W2 g64 of the layer's seven linears from those Grams (the C++ core, the same
  for every backend).

Extrapolation (printed with its numbers): a run over L layers costs about
``L * (t_forward + t_grams + n_calib * t_backward + t_gptq)`` plus the lm_head; a 70B layer
(hidden 8192, MLP 28672, 64/8 heads) has ``P70/P7 = 4.31`` times the linear weights of a 7B
layer, so its matrix-product stages scale by that ratio (GPTQ by ``d_in``-cubic terms, about
4.3-8x). Peak memory is about one layer's float32 weights plus the activations, independent of L.

    python bench/scale.py [--quick] [--layers N] [--n-calib N] [--seqlen T] [--backends numpy,torch-cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

SHAPE_7B = dict(hidden=4096, inter=11008, heads=32, kv_heads=32, vocab=32000)
SHAPE_QUICK = dict(hidden=512, inter=1376, heads=8, kv_heads=8, vocab=32000)
SHAPE_70B = dict(hidden=8192, inter=28672, heads=64, kv_heads=8, vocab=32000)


def layer_params(s: dict) -> int:
    hd = s["hidden"] // s["heads"]
    D, I, kv = s["hidden"], s["inter"], s["kv_heads"] * hd
    return 2 * D * D + 2 * D * kv + 3 * D * I


def write_checkpoint(folder: Path, shape: dict, layers: int, seed: int = 0) -> None:
    """LLaMA config + random float16 weights, one tensor at a time (bounded memory)."""
    from hiquant._safetensors_io import write_streaming
    D, I, V, H, K = shape["hidden"], shape["inter"], shape["vocab"], shape["heads"], shape["kv_heads"]
    hd = D // H
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": D,
           "intermediate_size": I, "num_hidden_layers": layers, "num_attention_heads": H,
           "num_key_value_heads": K, "vocab_size": V, "rms_norm_eps": 1e-5, "hidden_act": "silu",
           "max_position_embeddings": 4096, "tie_word_embeddings": False,
           "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "dtype": "float16",
           "bos_token_id": 1, "eos_token_id": 2}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,), "lm_head.weight": (V, D)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
                       p + "self_attn.q_proj.weight": (H * hd, D), p + "self_attn.k_proj.weight": (K * hd, D),
                       p + "self_attn.v_proj.weight": (K * hd, D), p + "self_attn.o_proj.weight": (D, H * hd),
                       p + "mlp.gate_proj.weight": (I, D), p + "mlp.up_proj.weight": (I, D),
                       p + "mlp.down_proj.weight": (D, I)})

    def make(name, shp):
        def f():
            rng = np.random.default_rng([seed, sum(map(ord, name))])
            if len(shp) == 1:
                return (1.0 + 0.1 * rng.standard_normal(shp)).astype(np.float16)
            return (rng.standard_normal(shp, dtype=np.float32) * (shp[1] ** -0.5)).astype(np.float16)
        return f

    entries = [(n, "F16", shp, make(n, shp)) for n, shp in sorted(shapes.items())]
    write_streaming(folder / "model.safetensors", entries, {"format": "pt"})


def worker(args) -> dict:
    """One backend in this process: per-layer stage times and the process's peak memory."""
    import hiquant
    from hiquant import blockwise
    from hiquant.config import QuantizeSettings, resolve
    from hiquant.methods import quantizer
    from hiquant.stats import block_grams
    backend, _, device = args.worker.partition("-")
    if backend == "torch":
        from hiquant.torch_runtime import load_torch_model
        model = load_torch_model(args.folder, device=device)
    else:
        model = hiquant.load_model(args.folder)
    s = resolve(QuantizeSettings(method="gptq", wbits=2, group_size=64, backend="numpy"))
    from hiquant.allocate import plan_layers
    shapes = {n: model.linear_shape(n) for n in model.linear_names()}
    plans, _ = plan_layers(s, shapes)
    gptq = quantizer("gptq")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, model.config.vocab_size, (args.n_calib, args.seqlen))
    h = model.embed(ids)
    sync = lambda: None  # noqa: E731
    if backend == "torch" and device.startswith("cuda"):
        import torch
        sync = torch.cuda.synchronize
        torch.cuda.reset_peak_memory_stats()
    rows = []
    for b in range(model.num_blocks):
        t = {}
        t0 = time.perf_counter()
        grams = block_grams(model, b, h, batch_size=args.batch)
        sync()
        t["grams"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        out, cache = model.block_forward(b, h[:1], cache=True)
        model.block_backward(b, cache, np.ones_like(out))
        sync()
        t["backward"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for n in model.block_linear_names(b):
            model.set_weight(n, gptq.quantize(n, model.get_weight(n), grams[n], plans[n], s))
        t["gptq"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        h = blockwise.block_outputs(model, b, h, args.batch, None)
        sync()
        t["forward"] = time.perf_counter() - t0
        rows.append(t)
        del grams
    res = {"backend": args.worker, "layers": rows,
           "peak_host_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if backend == "torch" and device.startswith("cuda"):
        import torch
        res["peak_device_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a 512-hidden model, 2 layers, 2 x 64 tokens")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--n-calib", dest="n_calib", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1, help="windows per forward chunk")
    ap.add_argument("--backends", default=None,
                    help="comma list of numpy, torch-cpu, torch-cuda (default: all available)")
    ap.add_argument("--folder", default=None, help="reuse this checkpoint folder")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    from _common import emit, environment
    shape = SHAPE_QUICK if args.quick else SHAPE_7B
    if args.quick:
        args.layers, args.n_calib, args.seqlen = 2, 2, 64
    from hiquant.torch_runtime import cuda_device_count, torch_available
    backends = (args.backends.split(",") if args.backends else
                ["numpy"] + (["torch-cpu"] if torch_available() else [])
                + (["torch-cuda"] if cuda_device_count() else []))
    tmp = None
    folder = args.folder
    if folder is None:
        tmp = tempfile.TemporaryDirectory(prefix="hiquant-scale-")
        folder = str(Path(tmp.name) / "model")
        t0 = time.perf_counter()
        write_checkpoint(Path(folder), shape, args.layers)
        print(f"wrote {args.layers}-layer checkpoint of shape {shape} in "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    results = []
    for be in backends:
        cmd = [sys.executable, __file__, "--worker", be, "--folder", folder, "--layers",
               str(args.layers), "--n-calib", str(args.n_calib), "--seqlen", str(args.seqlen),
               "--batch", str(args.batch)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{be} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
            continue
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    stages = ("forward", "grams", "backward", "gptq")
    print(f"\nper decoder layer (mean over {args.layers}), {args.n_calib} x {args.seqlen} tokens, "
          f"shape {shape}")
    print(f"{'backend':<11}" + "".join(f"{s + ' s':>12}" for s in stages)
          + f"{'layer s':>12}{'peak host GiB':>15}{'peak dev GiB':>14}")
    summary = {}
    p_ratio = layer_params(SHAPE_70B) / layer_params(SHAPE_7B)
    for r in results:
        mean = {s: float(np.mean([L[s] for L in r["layers"]])) for s in stages}
        # the Fisher pass needs one backward per calibration window: n_calib of them per layer
        per_layer = mean["forward"] + mean["grams"] + args.n_calib * mean["backward"] + mean["gptq"]
        summary[r["backend"]] = dict(mean, per_layer_s=per_layer, peak_host_gib=r["peak_host_gib"],
                                     peak_device_gib=r.get("peak_device_gib"),
                                     est_7b_h=32 * per_layer / 3600 if not args.quick else None,
                                     est_70b_h=80 * p_ratio * per_layer / 3600 if not args.quick else None)
        print(f"{r['backend']:<11}" + "".join(f"{mean[s]:>12.3f}" for s in stages)
              + f"{per_layer:>12.2f}{r['peak_host_gib']:>15.2f}"
              + f"{r.get('peak_device_gib') or float('nan'):>14.2f}")
    if not args.quick:
        print(f"\nextrapolation: T(L) = L * (t_fwd + t_gram + n_calib * t_bwd + t_gptq); "
              f"7B: L = 32; 70B: L = 80 and per-layer x {p_ratio:.2f} (P70/P7 linear weights)")
        for be, v in summary.items():
            print(f"  {be}: 7B ~ {v['est_7b_h']:.2f} h, 70B ~ {v['est_70b_h']:.2f} h "
                  "(gptq-like stages; hiq adds LWC/AdaRound)")
    emit({"bench": "scale", "quick": args.quick, "shape": shape, "layers": args.layers,
          "n_calib": args.n_calib, "seqlen": args.seqlen, "results": summary,
          **environment("torch", "transformers")})


if __name__ == "__main__":
    main()
