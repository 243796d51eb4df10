"""Peak memory of `hiquant quantize` on a synthetic checkpoint with LLaMA-2-7B's layer shapes
(hidden 4096, MLP 11008, 32 heads, vocabulary 32000) but only a few decoder layers, randomly
initialized in float16: the peak must follow the largest decoder block, not the model.

    python bench/memory.py [--quick] [--layers 1,2] [--methods rtn,gptq,hiq] [--n-calib 4]

A method may name hiq's M estimator after a colon (``hiq:diagonal,hiq:rank1``): the diagonal
estimator keeps the full Fisher diagonal (4 bytes per weight), rank1 only its margins.

Each run is a separate `hiquant quantize` process (its own peak RSS, VmHWM via ru_maxrss); the
checkpoint is written once per layer count into a temporary folder. Learned methods run with a
handful of iterations: memory does not depend on the iteration count. ``--quick`` (CI): a
scaled-down shape (hidden 512, MLP 1376, vocabulary 4000), one and two layers, rtn only.
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import emit, environment  # noqa: E402

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000)
QUICK = dict(hidden_size=512, intermediate_size=1376, num_attention_heads=8,
             num_key_value_heads=8, vocab_size=4000)


def write_checkpoint(folder: str, n_layers: int, shape: dict, seed: int = 0) -> int:
    """A LlamaForCausalLM folder with random float16 weights (std 0.02, norms 1). Returns the
    parameter count."""
    from safetensors.numpy import save_file

    from hiquant.datasets import embedded_model_path
    os.makedirs(folder, exist_ok=True)
    D, I, V = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    rng = np.random.default_rng(seed)

    def rnd(*s):
        return (rng.standard_normal(s, dtype=np.float32) * 0.02).astype(np.float16)

    t = {"model.embed_tokens.weight": rnd(V, D), "lm_head.weight": rnd(V, D),
         "model.norm.weight": np.ones(D, np.float16)}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[p + f"self_attn.{n}.weight"] = rnd(D, D)
        t[p + "mlp.gate_proj.weight"] = rnd(I, D)
        t[p + "mlp.up_proj.weight"] = rnd(I, D)
        t[p + "mlp.down_proj.weight"] = rnd(D, I)
        t[p + "input_layernorm.weight"] = np.ones(D, np.float16)
        t[p + "post_attention_layernorm.weight"] = np.ones(D, np.float16)
    save_file(t, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
           "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
           "tie_word_embeddings": False, "torch_dtype": "float16", "num_hidden_layers": n_layers,
           "bos_token_id": 1, "eos_token_id": 2, **shape}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    # any byte-level tokenizer whose ids stay below the vocabulary will do
    shutil.copy(os.path.join(embedded_model_path(), "tokenizer.json"), folder)
    return int(sum(a.size for a in t.values()))


def block_formula_mib(shape: dict, n_calib: int, seqlen: int) -> dict:
    """The terms of the peak (see the closing note / README) in MiB."""
    D, I, V = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    block_params = 4 * D * D + 3 * D * I
    mib = 1 << 20
    return {
        "block_weights_f32": 4 * block_params / mib,
        "block_grams_f64": 8 * (D * D + D * D + D * D + I * I) / mib,
        "largest_layer_hybrid_state": (8 * I * I + 4 * 3 * D * I) / mib,
        "calib_hidden_states_in_out": 2 * 4 * n_calib * seqlen * D / mib,
        "lm_head_f32": 4 * V * D / mib,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--layers", default="1,2")
    ap.add_argument("--methods", default="rtn,gptq,hiq")
    ap.add_argument("--n-calib", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    shape = QUICK if args.quick else LLAMA2_7B
    if args.quick:
        args.methods, args.n_calib, args.seqlen = "rtn", 2, 128
    from hiquant.datasets import embedded_calib_path
    calib = str(embedded_calib_path())
    work = tempfile.mkdtemp(prefix="hiquant-memory-")
    rows = []
    try:
        for nl in [int(x) for x in args.layers.split(",")]:
            ck = os.path.join(work, f"ckpt-{nl}")
            t0 = time.perf_counter()
            n_params = write_checkpoint(ck, nl, shape)
            print(f"checkpoint: {nl} layers, {n_params / 1e6:.0f} M params "
                  f"({time.perf_counter() - t0:.0f} s to write)", flush=True)
            for label in args.methods.split(","):
                method, _, estimator = label.partition(":")
                out = os.path.join(work, f"out-{nl}-{method}-{estimator}")
                cmd = [sys.executable, "-m", "hiquant", "quantize", ck, "--calib", calib,
                       "--method", method, "--wbits", "2", "--group", "64", "--n-calib",
                       str(args.n_calib), "--seqlen", str(args.seqlen), "--lwc-iters", "2",
                       "--adaround-iters", "2", "--out", out, "--export", "packed", "--quiet"]
                if method == "hiq":
                    cmd += ["--avg-bits", "2.4", "--scale-bits", "8"]
                if estimator:
                    cmd += ["--estimator", estimator]
                if args.threads:
                    cmd += ["--threads", str(args.threads)]
                t0 = time.perf_counter()
                p = subprocess.run(cmd, capture_output=True, text=True)
                wall = time.perf_counter() - t0
                if p.returncode != 0:
                    row = {"layers": nl, "method": label, "error": p.stderr.strip()[-500:]}
                else:
                    last = json.loads(p.stdout.strip().splitlines()[-1])
                    row = {"layers": nl, "method": label, "params_m": round(n_params / 1e6, 1),
                           "peak_rss_mib": last["peak_rss_mib"], "wall_s": round(wall, 1),
                           "peak_rss_split_mib": last.get("peak_rss_split_mib"),
                           "timings": {k: round(v, 1) for k, v in last["timings"].items()}}
                rows.append(row)
                print(json.dumps(row), flush=True)
                shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(ck, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n| layers | method | params (M) | peak RSS (MiB) | wall (s) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layers']} | {r['method']} | {r.get('params_m')} | {r.get('peak_rss_mib')} | "
              f"{r.get('wall_s')} |" + (f" error: {r['error'][:80]}" if "error" in r else ""))
    emit({"benchmark": "memory", "quick": args.quick, "shape": shape, "n_calib": args.n_calib,
          "seqlen": args.seqlen, "rows": rows,
          "formula_terms_mib": block_formula_mib(shape, args.n_calib, args.seqlen),
          **environment()})


if __name__ == "__main__":
    main()
