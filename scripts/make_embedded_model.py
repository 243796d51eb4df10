#!/usr/bin/env python3
"""Regenerate hiquant's embedded default model: ``python/hiquant/data/{tiny-llama,corpus}``.

What it makes
  * ``corpus/calib.txt``, ``corpus/test.txt``: held-out source files of this interpreter's Python
    standard library (PSF licence), never trained on.
  * ``tiny-llama/``: a byte-level BPE tokenizer and a small LLaMA-architecture model
    (``LlamaForCausalLM`` layout as transformers 5.x writes it, float16 safetensors) trained from
    scratch on the rest of the standard library, plus ``recipe.json`` recording every choice and
    measurement (the stdlib text depends on the Python version, so that is recorded too).

The training text is not shipped: it is re-derived from ``sysconfig.get_paths()["stdlib"]``.

Dev-time dependency: PyTorch (CPU is enough) is needed by THIS SCRIPT ONLY, to train the model;
hiquant itself never imports it. Everything is seeded and runs on one thread by default, so the
same Python, torch and tokenizers versions reproduce the files bit for bit.

    python scripts/make_embedded_model.py            # about 10 minutes on one CPU thread
    python scripts/make_embedded_model.py --quick --out /tmp/emb   # smoke test, seconds
"""

from __future__ import annotations

import os

# One thread everywhere (the tokenizers trainer uses rayon, torch its own pool): this script
# shares a small machine, and one thread also keeps results independent of the core count.
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import hashlib
import json
import math
import platform
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "python" / "hiquant" / "data"

# ------------------------------------------------------------------------------------------------
# Recipe (everything here is recorded in recipe.json)
# ------------------------------------------------------------------------------------------------
SPLIT = {
    "seed": "hiquant-embedded-v1",  # salt of the hash that orders files for the split
    # Excluded from every split: test suites (deliberately odd code, e.g. bad encodings, and 17 MB
    # of it would dominate), codec tables and pydoc's topic dump (long data literals, not code).
    "exclude_dir_names": ["site-packages", "__pycache__", "test", "tests", "idle_test"],
    "exclude_top_dirs": ["encodings", "pydoc_data"],
    "target_chars_test": 250_000,
    "target_chars_calib": 250_000,
    # Only files up to this size are held out, so each held-out set spans many modules.
    "max_heldout_file_chars": 40_000,
}

TOKENIZER = {
    "type": "byte-level BPE (tokenizers)",
    "vocab_size": 1024,
    "min_frequency": 2,
    "special_tokens": ["<|endoftext|>"],  # id 0 = bos/eos, as in the shared llama-bench model
}

MODEL = {
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # GQA: each kv head serves 2 query heads
    "head_dim": 32,
    "intermediate_size": 384,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 256,
}

TRAIN = {
    "seed": 0,
    "threads": 1,
    "seqlen": 256,
    "batch": 8,
    "steps": 1800,
    "lr": 3e-3,
    "min_lr_ratio": 0.1,  # cosine decays to lr * min_lr_ratio
    "warmup_steps": 100,
    "betas": [0.9, 0.95],
    "eps": 1e-8,
    "weight_decay": 0.1,  # on 2-D weights (linears, embeddings); none on RMSNorm gains
    "grad_clip": 1.0,
    "init_std": 0.02,  # normal init; o_proj and down_proj scaled by 1/sqrt(2 * layers) (GPT-2)
    "dtype": "float32",
}

EVAL = {"seqlen": 256, "first_windows": 32,
        # [bits, group_size]; group 0 = one group per output row
        "rtn": [[2, 64], [2, 128], [2, 0], [3, 64], [3, 128], [4, 128]]}


# ------------------------------------------------------------------------------------------------
# Text
# ------------------------------------------------------------------------------------------------
def stdlib_files(root: Path) -> list[tuple[str, str]]:
    """(relative posix path, normalized text) of every eligible ``.py`` file, sorted by path."""
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        parts = rel.parts
        if any(d in SPLIT["exclude_dir_names"] for d in parts[:-1]):
            continue
        if len(parts) > 1 and parts[0] in SPLIT["exclude_top_dirs"]:
            continue
        try:
            text = p.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue  # none in CPython 3.x outside test/, but never guess an encoding
        text = text.replace("\r\n", "\n").replace("\r", "\n").rstrip() + "\n"
        if text.strip():
            out.append((rel.as_posix(), text))
    return out


def split_files(files: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    """Deterministic split by file: visit files in the order of a salted SHA-256 of their path;
    fill test, then calib, up to their targets with files no larger than the cap; the rest train."""
    def key(item):
        return hashlib.sha256(f"{SPLIT['seed']}:{item[0]}".encode()).hexdigest()

    splits = {"test": [], "calib": [], "train": []}
    size = {"test": 0, "calib": 0}
    for item in sorted(files, key=key):
        n = len(item[1])
        dest = "train"
        if n <= SPLIT["max_heldout_file_chars"]:
            for s in ("test", "calib"):
                if size[s] < SPLIT[f"target_chars_{s}"]:
                    dest = s
                    break
        if dest != "train":
            size[dest] += n
        splits[dest].append(item)
    for s in splits:  # within a split, path order: stable and readable
        splits[s].sort()
    return splits


def join_texts(items: list[tuple[str, str]]) -> str:
    # One blank line between files; no markers, so train and held-out text look alike.
    return "\n".join(t for _, t in items)


# ------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------
def train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER["vocab_size"],
        min_frequency=TOKENIZER["min_frequency"],
        special_tokens=TOKENIZER["special_tokens"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


# ------------------------------------------------------------------------------------------------
# Model (plain PyTorch, the Hugging Face LlamaForCausalLM forward written out)
# ------------------------------------------------------------------------------------------------
def build_torch_model(torch, cfg: dict):
    nn = torch.nn
    F = torch.nn.functional

    class RMSNorm(nn.Module):
        def __init__(self, d, eps):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(d))
            self.eps = eps

        def forward(self, x):
            # As transformers' LlamaRMSNorm: normalize in float32, cast back, then scale.
            dt = x.dtype
            h = x.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
            return self.weight * h.to(dt)

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            d, hd = cfg["hidden_size"], cfg["head_dim"]
            self.nh, self.nkv, self.hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], hd
            self.q_proj = nn.Linear(d, self.nh * hd, bias=False)
            self.k_proj = nn.Linear(d, self.nkv * hd, bias=False)
            self.v_proj = nn.Linear(d, self.nkv * hd, bias=False)
            self.o_proj = nn.Linear(self.nh * hd, d, bias=False)

        def forward(self, x, cos, sin):
            b, t, _ = x.shape
            q = self.q_proj(x).view(b, t, self.nh, self.hd).transpose(1, 2)
            k = self.k_proj(x).view(b, t, self.nkv, self.hd).transpose(1, 2)
            v = self.v_proj(x).view(b, t, self.nkv, self.hd).transpose(1, 2)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            # GQA as transformers' repeat_kv: query head h reads kv head h // (nh / nkv).
            rep = self.nh // self.nkv
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.hd ** -0.5)
            return self.o_proj(y.transpose(1, 2).reshape(b, t, self.nh * self.hd))

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            d, m = cfg["hidden_size"], cfg["intermediate_size"]
            self.gate_proj = nn.Linear(d, m, bias=False)
            self.up_proj = nn.Linear(d, m, bias=False)
            self.down_proj = nn.Linear(m, d, bias=False)

        def forward(self, x):
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = Attention()
            self.mlp = MLP()
            self.input_layernorm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
            self.post_attention_layernorm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])

        def forward(self, x, cos, sin):
            x = x + self.self_attn(self.input_layernorm(x), cos, sin)
            return x + self.mlp(self.post_attention_layernorm(x))

    class Body(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
            self.layers = nn.ModuleList(Layer() for _ in range(cfg["num_hidden_layers"]))
            self.norm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])

    class CausalLM(nn.Module):
        """Module names equal the Hugging Face tensor names (``model.layers.0.mlp.up_proj``...)."""

        def __init__(self):
            super().__init__()
            self.model = Body()
            self.lm_head = nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)
            hd = cfg["head_dim"]
            inv_freq = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.int64)
                                                     .float() / hd))
            self.register_buffer("inv_freq", inv_freq, persistent=False)

        def forward(self, ids):
            t = ids.shape[1]
            pos = torch.arange(t, dtype=torch.float32)
            freqs = torch.outer(pos, self.inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)  # transformers' rotate_half layout
            cos, sin = emb.cos()[None, None], emb.sin()[None, None]
            x = self.model.embed_tokens(ids)
            for layer in self.model.layers:
                x = layer(x, cos, sin)
            return self.lm_head(self.model.norm(x))

    def rotate_half(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    return CausalLM()


def init_weights(torch, model, cfg: dict):
    std = TRAIN["init_std"]
    resid_std = std / math.sqrt(2 * cfg["num_hidden_layers"])
    for name, p in model.named_parameters():
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            torch.nn.init.ones_(p)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            torch.nn.init.normal_(p, 0.0, resid_std)
        else:
            torch.nn.init.normal_(p, 0.0, std)


def hf_config(cfg: dict) -> dict:
    """config.json exactly as transformers 5.x writes LlamaConfig (keys of the shared bench model)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dtype": "float16",
        "eos_token_id": 0,
        "head_dim": cfg["head_dim"],
        "hidden_act": "silu",
        "hidden_size": cfg["hidden_size"],
        "initializer_range": TRAIN["init_std"],
        "intermediate_size": cfg["intermediate_size"],
        "max_position_embeddings": cfg["max_position_embeddings"],
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": cfg["num_attention_heads"],
        "num_hidden_layers": cfg["num_hidden_layers"],
        "num_key_value_heads": cfg["num_key_value_heads"],
        "pad_token_id": None,
        "pretraining_tp": 1,
        "rms_norm_eps": cfg["rms_norm_eps"],
        "rope_parameters": {"rope_theta": cfg["rope_theta"], "rope_type": "default"},
        "tie_word_embeddings": False,
        "transformers_version": "5.17.0",
        "use_cache": True,
        "vocab_size": cfg["vocab_size"],
    }


GENERATION_CONFIG = {
    "_from_model_config": True,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "output_attentions": False,
    "output_hidden_states": False,
    "transformers_version": "5.17.0",
    "use_cache": True,
}


# ------------------------------------------------------------------------------------------------
# Evaluation helpers
# ------------------------------------------------------------------------------------------------
def perplexity(torch, model, ids: np.ndarray, seqlen: int, n_windows: int | None = None,
               batch: int = 16) -> tuple[float, int]:
    """The shared protocol: non-overlapping windows of ``seqlen`` tokens from the start, no BOS,
    mean next-token cross-entropy per window, perplexity = exp(mean over windows)."""
    n = len(ids) // seqlen if n_windows is None else n_windows
    if n * seqlen > len(ids) or n < 1:
        raise ValueError(f"{n} windows of {seqlen} tokens need more than {len(ids)} tokens")
    w = torch.from_numpy(ids[: n * seqlen].astype(np.int64)).view(n, seqlen)
    losses = []
    with torch.no_grad():
        for i in range(0, n, batch):
            x = w[i:i + batch]
            logits = model(x[:, :-1]).float()
            ce = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none")
            losses.append(ce.view(x.shape[0], -1).double().mean(dim=1))
    return float(torch.cat(losses).mean().exp()), n


def rtn_fake_quant(W: np.ndarray, bits: int, group: int) -> np.ndarray:
    """Min-max round-to-nearest (range includes 0, round half to even, float64 math): the same
    convention as hiquant.quantizer, re-stated here so the script needs no built hiquant."""
    maxq = 2 ** bits - 1
    W = W.astype(np.float64)
    out = np.empty_like(W)
    group = W.shape[1] if group <= 0 else group
    for a in range(0, W.shape[1], group):
        blk = W[:, a:a + group]
        lo = np.minimum(blk.min(axis=1, keepdims=True), 0.0)
        hi = np.maximum(blk.max(axis=1, keepdims=True), 0.0)
        both0 = (lo == 0) & (hi == 0)
        lo[both0], hi[both0] = -1.0, 1.0
        s = ((hi - lo) / maxq).astype(np.float32).astype(np.float64)
        z = np.clip(np.rint(-lo / s), 0, maxq)
        out[:, a:a + group] = s * (np.clip(np.rint(blk / s) + z, 0, maxq) - z)
    return out


LINEAR_SUFFIXES = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                   "gate_proj.weight", "up_proj.weight", "down_proj.weight")


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help="data folder to (re)write (default: python/hiquant/data)")
    ap.add_argument("--steps", type=int, default=TRAIN["steps"])
    ap.add_argument("--threads", type=int, default=TRAIN["threads"])
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 20 steps, a few eval windows (never write it into the package)")
    args = ap.parse_args(argv)

    try:
        import torch
    except ImportError:
        print("error: this script trains the model with PyTorch, which is a dev-time dependency of "
              "this script only (hiquant never imports it). Install a CPU build, e.g.\n"
              "  pip install torch --index-url https://download.pytorch.org/whl/cpu",
              file=sys.stderr)
        return 2
    import safetensors
    import tokenizers
    from safetensors.numpy import save_file

    if args.quick and args.out.resolve() == DEFAULT_OUT.resolve():
        ap.error("--quick writes an undertrained model; pass --out to a scratch folder")
    steps = 20 if args.quick else args.steps
    torch.set_num_threads(args.threads)
    torch.manual_seed(TRAIN["seed"])
    t_start = time.time()

    def log(msg):
        print(f"[{time.time() - t_start:7.1f}s] {msg}", flush=True)

    # -- text ------------------------------------------------------------------------------------
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files(root)
    splits = split_files(files)
    texts = {s: join_texts(v) for s, v in splits.items()}
    log("stdlib %s: %d files; train %d files %.2f MB, calib %d files %d chars, test %d files %d "
        "chars" % (root, len(files), len(splits["train"]), len(texts["train"]) / 1e6,
                   len(splits["calib"]), len(texts["calib"]), len(splits["test"]),
                   len(texts["test"])))

    # -- tokenizer -------------------------------------------------------------------------------
    tok = train_tokenizer([t for _, t in splits["train"]])
    vocab = tok.get_vocab_size()
    train_ids = np.asarray(tok.encode(texts["train"]).ids, dtype=np.int32)
    calib_ids = np.asarray(tok.encode(texts["calib"]).ids, dtype=np.int32)
    test_ids = np.asarray(tok.encode(texts["test"]).ids, dtype=np.int32)
    if tok.decode(test_ids.tolist()) != texts["test"]:
        raise RuntimeError("the tokenizer does not round-trip the test text")
    log(f"tokenizer: vocab {vocab}; tokens train {len(train_ids)}, calib {len(calib_ids)}, "
        f"test {len(test_ids)}")

    # -- model + training ------------------------------------------------------------------------
    cfg = dict(MODEL, vocab_size=vocab)
    model = build_torch_model(torch, cfg)
    init_weights(torch, model, cfg)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": TRAIN["weight_decay"]},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=TRAIN["lr"], betas=tuple(TRAIN["betas"]), eps=TRAIN["eps"])

    def lr_at(step):  # linear warm-up, then cosine from lr to lr * min_lr_ratio
        warm = min(TRAIN["warmup_steps"], max(1, steps // 10))
        if step < warm:
            return TRAIN["lr"] * (step + 1) / warm
        prog = (step - warm) / max(1, steps - warm)
        r = TRAIN["min_lr_ratio"]
        return TRAIN["lr"] * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * prog)))

    rng = np.random.default_rng(TRAIN["seed"])
    T, B = TRAIN["seqlen"], TRAIN["batch"]
    offs = np.arange(T + 1)
    loss_log = []
    ema = None
    t_train = time.time()
    model.train()
    for step in range(steps):
        starts = rng.integers(0, len(train_ids) - T - 1, size=B)
        batch = torch.from_numpy(train_ids[starts[:, None] + offs].astype(np.int64))
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), TRAIN["grad_clip"])
        opt.step()
        lv = loss.item()
        ema = lv if ema is None else 0.98 * ema + 0.02 * lv
        if step % 50 == 0 or step == steps - 1:
            loss_log.append([step, round(lv, 4)])
            el = time.time() - t_train
            log(f"step {step:5d}/{steps}  loss {lv:.4f}  ema {ema:.4f}  lr {lr_at(step):.2e}  "
                f"{el / (step + 1):.3f}s/step")
    train_seconds = time.time() - t_train
    model.eval()

    # -- export (float16, HF names) --------------------------------------------------------------
    tensors = {k: v.detach().to(torch.float16).numpy() for k, v in model.state_dict().items()}
    staging = Path(tempfile.mkdtemp(prefix="hiquant-embedded-"))
    mdir, cdir = staging / "tiny-llama", staging / "corpus"
    mdir.mkdir()
    cdir.mkdir()
    save_file(tensors, str(mdir / "model.safetensors"), metadata={"format": "pt"})
    tok.save(str(mdir / "tokenizer.json"))
    (mdir / "config.json").write_text(json.dumps(hf_config(cfg), indent=2) + "\n")
    (mdir / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
    for s in ("calib", "test"):
        with open(cdir / f"{s}.txt", "w", encoding="utf-8", newline="\n") as f:
            f.write(texts[s])
    # The PSF licence asks that its text travel with derived copies of the sources.
    if (root / "LICENSE.txt").is_file():
        shutil.copyfile(root / "LICENSE.txt", cdir / "LICENSE-PSF.txt")
    else:
        log(f"warning: {root / 'LICENSE.txt'} not found; add the PSF licence text by hand")

    # -- verify the exported files ---------------------------------------------------------------
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    loaded = load_file(str(mdir / "model.safetensors"))
    tok2 = Tokenizer.from_file(str(mdir / "tokenizer.json"))
    if tok2.encode(texts["test"]).ids != test_ids.tolist():
        raise RuntimeError("the saved tokenizer encodes the test text differently")
    eval_model = build_torch_model(torch, cfg)
    eval_model.load_state_dict({k: torch.from_numpy(v.astype(np.float32)) for k, v in
                                loaded.items()})
    eval_model.eval()
    S = EVAL["seqlen"]
    n_first = 4 if args.quick else EVAL["first_windows"]
    n_all = 8 if args.quick else None
    ppl, n_win = perplexity(torch, eval_model, test_ids, S, n_all)
    ppl_first, _ = perplexity(torch, eval_model, test_ids, S, n_first)
    calib_ppl, n_calib_win = perplexity(torch, eval_model, calib_ids, S, n_all)
    log(f"fp16 weights: test ppl {ppl:.4f} ({n_win} windows of {S}); first {n_first}: "
        f"{ppl_first:.4f}; calib ppl {calib_ppl:.4f}")

    rtn = []
    for bits, group in EVAL["rtn"]:
        qm = build_torch_model(torch, cfg)
        sd = {}
        for k, v in loaded.items():
            w = v.astype(np.float32)
            if k.endswith(LINEAR_SUFFIXES):  # the 7 linears of each block; not embed / lm_head
                w = rtn_fake_quant(w, bits, group).astype(np.float32)
            sd[k] = torch.from_numpy(w)
        qm.load_state_dict(sd)
        qm.eval()
        qp, _ = perplexity(torch, qm, test_ids, S, n_all)
        rtn.append({"bits": bits, "group_size": group, "test_ppl_seq256": round(qp, 4)})
        log(f"RTN w{bits} g{group or 'row'}: test ppl {qp:.4f}")

    hf_check = {"transformers": None}
    try:
        import transformers
        from transformers import LlamaForCausalLM
    except ImportError:
        log("transformers not importable: skipped the logits check against LlamaForCausalLM")
    else:
        hf = LlamaForCausalLM.from_pretrained(str(mdir), dtype=torch.float32)
        hf.eval()
        x = torch.from_numpy(test_ids[: 2 * S].astype(np.int64)).view(2, S)
        with torch.no_grad():
            ref = hf(x).logits
            mine = eval_model(x)
        diff = float((ref - mine).abs().max())
        hf_check = {"transformers": transformers.__version__, "max_abs_logit_diff": diff,
                    "max_abs_logit": float(ref.abs().max())}
        log(f"transformers {transformers.__version__}: max |logit diff| {diff:.3e}")
        if diff > 1e-3:
            raise RuntimeError(f"the torch forward differs from LlamaForCausalLM by {diff}")

    recipe = {
        "what": "hiquant embedded default model: tiny LLaMA trained on the Python stdlib",
        "generated_by": "scripts/make_embedded_model.py",
        "quick": bool(args.quick),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "stdlib_path": str(root),
        "versions": {"torch": torch.__version__, "tokenizers": tokenizers.__version__,
                     "safetensors": safetensors.__version__, "numpy": np.__version__},
        "split": dict(SPLIT, n_files={s: len(v) for s, v in splits.items()},
                      chars={s: len(t) for s, t in texts.items()},
                      tokens={"train": int(len(train_ids)), "calib": int(len(calib_ids)),
                              "test": int(len(test_ids))},
                      files_test=[p for p, _ in splits["test"]],
                      files_calib=[p for p, _ in splits["calib"]],
                      join="each file: newlines normalized to \\n, trailing whitespace stripped, "
                           "one \\n appended; files joined with \\n in path order"),
        "tokenizer": dict(TOKENIZER, vocab_size_actual=vocab),
        "model": dict(cfg, n_params=int(n_params),
                      file_bytes=(mdir / "model.safetensors").stat().st_size),
        "training": dict(TRAIN, steps=steps, threads=args.threads,
                         tokens_seen=int(steps * B * T),
                         windows="uniformly random starts in the tokenized train text "
                                 "(numpy default_rng(seed)), seqlen+1 tokens each",
                         schedule="linear warm-up for min(warmup_steps, steps // 10) steps, then "
                                  "cosine to lr * min_lr_ratio",
                         final_loss_ema=round(ema, 4), loss_log=loss_log,
                         wall_seconds=round(train_seconds, 1),
                         machine=platform.processor() or platform.machine()),
        "eval_protocol": "non-overlapping windows of seqlen tokens from the start of the "
                         "tokenized text, no BOS; per-window mean next-token cross-entropy; "
                         "ppl = exp(mean over windows); float32 compute on the float16 weights",
        "test_ppl_seq256": round(ppl, 4),
        "test_windows_seq256": n_win,
        "test_ppl_seq256_first_windows": {"n_windows": n_first, "ppl": round(ppl_first, 4)},
        "calib_ppl_seq256": round(calib_ppl, 4),
        "calib_windows_seq256": n_calib_win,
        "rtn_test_ppl_seq256": rtn,
        "rtn_note": "min-max (range incl. 0) round-to-nearest of the 7 linears of every block, "
                    "per group of input columns (group_size 0: per output row); embeddings, norms "
                    "and lm_head kept",
        "hf_check": hf_check,
    }
    (mdir / "recipe.json").write_text(json.dumps(recipe, indent=1) + "\n")

    # -- install into --out (file by file, so readers never see a half-written file) --------------
    for sub in ("tiny-llama", "corpus"):
        dst = args.out / sub
        dst.mkdir(parents=True, exist_ok=True)
        for f in sorted((staging / sub).iterdir()):
            shutil.copyfile(f, dst / (f.name + ".tmp"))
            os.replace(dst / (f.name + ".tmp"), dst / f.name)
    shutil.rmtree(staging)
    log(f"wrote {args.out}; total {time.time() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
