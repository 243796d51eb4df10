"""Tiny random Hugging Face checkpoints for tests, and an independent float64 reference forward.

``write_checkpoint(folder, arch, ...)`` writes ``config.json`` (transformers 4.x or 5.x style),
``model.safetensors`` or shards + index (F32/F16 with the ``safetensors`` library's own writer,
BF16 with a minimal writer here) and a character-level ``tokenizer.json``. It returns the weights
as float32 arrays *after* rounding to the stored dtype, so references compute with exactly the
weights the runtime reads.

``reference_logits(cfg, weights, ids)`` is a deliberately naive float64 forward pass (loops over
sequences and heads, formulas written from the papers/transformers docs), independent of
``hiquant.model``'s batched layout.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np

ARCHS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
MODEL_TYPE = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
              "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
CHARS = [chr(c) for c in range(32, 127)] + ["\n", "\t"]


def make_config(arch: str = "LlamaForCausalLM", *, hidden: int = 32, layers: int = 2,
                heads: int = 4, kv_heads: int = 2, head_dim: int | None = None,
                inter: int = 48, vocab: int = 100, tie: bool = False, style: str = "5.x",
                rope_theta: float = 10000.0, rope_scaling: dict | None = None,
                dtype: str = "float32", attention_bias: bool | None = None,
                sliding_window: int | None = None, eps: float = 1e-6) -> dict:
    """A config.json dict as transformers 4.x (``style="4.x"``) or 5.x writes it."""
    cfg = {
        "architectures": [arch], "model_type": MODEL_TYPE[arch], "hidden_size": hidden,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "intermediate_size": inter, "vocab_size": vocab, "rms_norm_eps": eps,
        "hidden_act": "silu", "max_position_embeddings": 256, "tie_word_embeddings": tie,
        "bos_token_id": 0, "eos_token_id": 0, "initializer_range": 0.02,
        "attention_dropout": 0.0, "use_cache": False,
    }
    if head_dim is not None or arch == "Qwen3ForCausalLM":
        cfg["head_dim"] = head_dim if head_dim is not None else hidden // heads
    if attention_bias is not None:
        cfg["attention_bias"] = attention_bias
    if arch == "MistralForCausalLM":
        cfg["sliding_window"] = sliding_window
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        cfg["use_sliding_window"] = sliding_window is not None
        cfg["sliding_window"] = sliding_window
        cfg["max_window_layers"] = layers
    if style == "5.x":
        rp = {"rope_theta": rope_theta, "rope_type": "default"}
        if rope_scaling:
            rp.update(rope_scaling)
        cfg["rope_parameters"] = rp
        cfg["dtype"] = dtype
        cfg["transformers_version"] = "5.0.0"
    elif style == "4.x":
        cfg["rope_theta"] = rope_theta
        cfg["rope_scaling"] = dict(rope_scaling) if rope_scaling else None
        cfg["torch_dtype"] = dtype
        cfg["transformers_version"] = "4.45.0"
    else:
        raise ValueError(style)
    return cfg


def _hd(cfg):
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def _bias(cfg):
    arch = cfg["architectures"][0]
    if arch == "Qwen2ForCausalLM":
        return True, False
    if arch == "MistralForCausalLM":
        return False, False
    b = bool(cfg.get("attention_bias", False))
    return b, b


def tensor_shapes(cfg: dict) -> dict:
    """Every tensor name → shape, written out independently of hiquant.model."""
    D, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    H, K, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], _hd(cfg)
    qkv_bias, o_bias = _bias(cfg)
    out = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not cfg["tie_word_embeddings"]:
        out["lm_head.weight"] = (V, D)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({
            p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
            p + "self_attn.q_proj.weight": (H * hd, D), p + "self_attn.k_proj.weight": (K * hd, D),
            p + "self_attn.v_proj.weight": (K * hd, D), p + "self_attn.o_proj.weight": (D, H * hd),
            p + "mlp.gate_proj.weight": (I, D), p + "mlp.up_proj.weight": (I, D),
            p + "mlp.down_proj.weight": (D, I),
        })
        if qkv_bias:
            out.update({p + "self_attn.q_proj.bias": (H * hd,), p + "self_attn.k_proj.bias": (K * hd,),
                        p + "self_attn.v_proj.bias": (K * hd,)})
        if o_bias:
            out[p + "self_attn.o_proj.bias"] = (D,)
        if cfg["architectures"][0] == "Qwen3ForCausalLM":
            out[p + "self_attn.q_norm.weight"] = (hd,)
            out[p + "self_attn.k_norm.weight"] = (hd,)
    return out


def random_weights(cfg: dict, seed: int = 0, scale: float = 1.0) -> dict:
    """float32 weights with enough spread that every nonlinearity is exercised."""
    rng = np.random.default_rng(seed)
    w = {}
    for name, shape in tensor_shapes(cfg).items():
        if name.endswith("norm.weight"):
            w[name] = (1.0 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
        elif name.endswith(".bias"):
            w[name] = (0.2 * rng.standard_normal(shape)).astype(np.float32)
        else:
            fan_in = shape[1]
            std = scale * (1.0 if "embed" in name else 1.5 / math.sqrt(fan_in))
            w[name] = (std * rng.standard_normal(shape)).astype(np.float32)
    return w


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 → bfloat16 bits (finite inputs)."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_bits_to_f32(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)


def round_to(w: np.ndarray, st_dtype: str) -> np.ndarray:
    if st_dtype == "F32":
        return w.astype(np.float32)
    if st_dtype == "F16":
        return w.astype(np.float16).astype(np.float32)
    if st_dtype == "BF16":
        return bf16_bits_to_f32(f32_to_bf16_bits(w))
    raise ValueError(st_dtype)


def write_raw_safetensors(path, tensors: dict, *, metadata: dict | None = None,
                          header_patch=None, truncate: int | None = None,
                          header_len_override: int | None = None) -> None:
    """Minimal safetensors writer: ``tensors`` maps name → (dtype string, shape, bytes).
    ``header_patch(header)`` may corrupt the header dict before it is written; ``truncate``
    drops that many bytes from the end; ``header_len_override`` writes a wrong length prefix."""
    header, blobs, off = {}, [], 0
    for name, (dt, shape, data) in tensors.items():
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    if metadata:
        header["__metadata__"] = metadata
    if header_patch is not None:
        header_patch(header)
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    blob = struct.pack("<Q", header_len_override if header_len_override is not None else len(hb))
    blob += hb + b"".join(blobs)
    if truncate:
        blob = blob[:-truncate]
    Path(path).write_bytes(blob)


def _save(path: Path, weights: dict, st_dtype: str) -> None:
    if st_dtype == "BF16":
        write_raw_safetensors(path, {n: ("BF16", w.shape, f32_to_bf16_bits(w).tobytes())
                                     for n, w in weights.items()}, metadata={"format": "pt"})
    else:
        from safetensors.numpy import save_file
        np_dt = np.float32 if st_dtype == "F32" else np.float16
        save_file({n: np.ascontiguousarray(w.astype(np_dt)) for n, w in weights.items()},
                  str(path), metadata={"format": "pt"})


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A character-level BPE tokenizer (no merges) over printable ASCII, newline and tab."""
    from tokenizers import Tokenizer, models

    vocab = {"<unk>": 0}
    for ch in CHARS[: vocab_size - 1]:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.save(str(folder / "tokenizer.json"))


def write_checkpoint(folder, arch: str = "LlamaForCausalLM", *, st_dtype: str = "F32",
                     shards: int = 1, seed: int = 0, tokenizer: bool = True,
                     weights: dict | None = None, **cfg_kwargs):
    """Write a tiny random checkpoint; returns (folder, config dict, float32 weights as stored)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dtype_name = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[st_dtype]
    cfg = make_config(arch, dtype=dtype_name, **cfg_kwargs)
    w = weights if weights is not None else random_weights(cfg, seed)
    w = {n: round_to(a, st_dtype) for n, a in w.items()}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    names = list(w)
    if shards <= 1:
        _save(folder / "model.safetensors", w, st_dtype)
    else:
        wm = {}
        for s in range(shards):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: w[n] for n in names[s::shards]}
            _save(folder / fname, part, st_dtype)
            wm.update({n: fname for n in part})
        total = sum(a.size * (4 if st_dtype == "F32" else 2) for a in w.values())
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": wm}, indent=2))
    if tokenizer:
        write_tokenizer(folder, cfg["vocab_size"])
    return folder, cfg, w


# ---------------------------------------------------------------------------------------------
# naive float64 reference


def _rms(x, w, eps):
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def reference_inv_freq(cfg: dict) -> np.ndarray:
    hd = _hd(cfg)
    rp = cfg.get("rope_parameters")
    if rp is None:
        rp = dict(cfg.get("rope_scaling") or {})
        rp["rope_theta"] = cfg.get("rope_theta", 10000.0)
    theta = rp["rope_theta"]
    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind == "linear":
        return inv / rp["factor"]
    if kind == "llama3":
        f, lo, hi = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"]
        old = rp.get("original_max_position_embeddings", cfg["max_position_embeddings"])
        out = []
        for x in inv:
            wl = 2 * math.pi / x
            if wl < old / hi:
                out.append(x)
            elif wl > old / lo:
                out.append(x / f)
            else:
                s = (old / wl - lo) / (hi - lo)
                out.append((1 - s) * x / f + s * x)
        return np.array(out)
    return inv


def _rope(x, inv):
    T, hd = x.shape
    ang = np.arange(T)[:, None] * inv[None, :]
    c, s = np.cos(ang), np.sin(ang)
    x1, x2 = x[:, : hd // 2], x[:, hd // 2:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=1)


def reference_logits(cfg: dict, weights: dict, ids: np.ndarray) -> np.ndarray:
    """Naive float64 forward: loops over sequences, layers and heads."""
    W = {n: a.astype(np.float64) for n, a in weights.items()}
    _D, H, K = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, eps = _hd(cfg), cfg["rms_norm_eps"]
    inv = reference_inv_freq(cfg)
    qk_norm = cfg["architectures"][0] == "Qwen3ForCausalLM"
    lm = W["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else W["lm_head.weight"]
    out = []
    for seq in ids:
        T = len(seq)
        x = W["model.embed_tokens.weight"][seq]
        for i in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{i}."

            def lin(name, inp):
                y = inp @ W[p + name + ".weight"].T
                return y + W[p + name + ".bias"] if p + name + ".bias" in W else y

            a = _rms(x, W[p + "input_layernorm.weight"], eps)
            q, k, v = lin("self_attn.q_proj", a), lin("self_attn.k_proj", a), lin("self_attn.v_proj", a)
            heads = []
            for h in range(H):
                j = h // (H // K)  # the key/value head this query head reads
                qh, kh, vh = q[:, h * hd:(h + 1) * hd], k[:, j * hd:(j + 1) * hd], v[:, j * hd:(j + 1) * hd]
                if qk_norm:
                    qh = _rms(qh, W[p + "self_attn.q_norm.weight"], eps)
                    kh = _rms(kh, W[p + "self_attn.k_norm.weight"], eps)
                qh, kh = _rope(qh, inv), _rope(kh, inv)
                sc = qh @ kh.T / math.sqrt(hd)
                sc[np.triu_indices(T, 1)] = -np.inf
                sc = np.exp(sc - sc.max(axis=1, keepdims=True))
                sc /= sc.sum(axis=1, keepdims=True)
                heads.append(sc @ vh)
            x = x + lin("self_attn.o_proj", np.concatenate(heads, axis=1))
            m = _rms(x, W[p + "post_attention_layernorm.weight"], eps)
            g, u = lin("mlp.gate_proj", m), lin("mlp.up_proj", m)
            x = x + lin("mlp.down_proj", g / (1 + np.exp(-g)) * u)
        out.append(_rms(x, W["model.norm.weight"], eps) @ lm.T)
    return np.stack(out)


def reference_losses(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Per-sequence mean next-token cross-entropy (float64)."""
    lg = logits[:, :-1].astype(np.float64)
    mx = lg.max(axis=-1, keepdims=True)
    lse = (np.log(np.exp(lg - mx).sum(axis=-1)) + mx[..., 0])
    tgt = np.take_along_axis(lg, ids[:, 1:, None], axis=-1)[..., 0]
    return (lse - tgt).mean(axis=1)


def torch_model(folder, dtype="float32"):
    """transformers' model for the folder (eager attention), or None without torch/transformers."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    tdt = {"float32": torch.float32, "float64": torch.float64}[dtype]
    m = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.float32, attn_implementation="eager")
    return m.to(tdt).eval()
