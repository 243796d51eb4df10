"""The Hugging Face model folder: ``config.json`` parsing and the safetensors weights.

Everything here reads files and validates them; nothing computes. :func:`parse_config` turns a
parsed ``config.json`` (transformers 4.x or 5.x) into a :class:`ModelConfig`; :func:`open_weights`
opens ``model.safetensors`` or the shards listed in ``model.safetensors.index.json`` (memory-mapped,
validated); :func:`expected_tensors` says which tensors a config implies and :func:`check_tensors`
checks a folder's tensors against them. Any problem raises :class:`hiquant.errors.CheckpointError`
naming the file and the tensor.

Supported architectures: :data:`SUPPORTED_ARCHITECTURES`; linear layers of a block are named by
:data:`LINEAR_SUFFIXES` under ``model.layers.<i>.``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from ._safetensors_io import SafetensorsFile, bf16_to_f32
from .errors import CheckpointError

__all__ = [
    "first_nonfinite",
    "SUPPORTED_ARCHITECTURES",
    "LINEAR_SUFFIXES",
    "STORED_DTYPES",
    "ModelConfig",
    "parse_config",
    "load_json",
    "open_weights",
    "expected_tensors",
    "check_tensors",
    "file_digest",
    "expand_tensor",
    "SourceTensor",
]

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)

# Linear layers of a decoder block in the order every hiquant stage uses: q, k, v, o, gate, up, down.
LINEAR_SUFFIXES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)

# the model_type transformers builds each architecture from (AutoConfig reads model_type)
MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
               "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
# the model_type of a hiquant packed folder: transformers refuses it with an error naming it
PACKED_MODEL_TYPE = "hiquant_packed"

# transformers' defaults for keys a config.json may omit (configuration_<arch>.py, 5.x). The
# structural sizes (hidden_size, layers, heads, intermediate_size, vocab_size) have defaults there
# too, but a config without them is malformed: we require them.
_ARCH_DEFAULTS = {
    "LlamaForCausalLM": dict(num_key_value_heads=None, head_dim=None, rms_norm_eps=1e-6,
                             tie_word_embeddings=False, attention_bias=False, sliding_window=None,
                             max_position_embeddings=2048),
    "MistralForCausalLM": dict(num_key_value_heads=8, head_dim=None, rms_norm_eps=1e-6,
                               tie_word_embeddings=False, attention_bias=False, sliding_window=4096,
                               max_position_embeddings=4096 * 32),
    "Qwen2ForCausalLM": dict(num_key_value_heads=32, head_dim=None, rms_norm_eps=1e-6,
                             tie_word_embeddings=False, attention_bias=True, sliding_window=4096,
                             max_position_embeddings=32768),
    "Qwen3ForCausalLM": dict(num_key_value_heads=32, head_dim=128, rms_norm_eps=1e-6,
                             tie_word_embeddings=False, attention_bias=False, sliding_window=4096,
                             max_position_embeddings=32768),
}

# safetensors dtypes the runtime computes with → hiquant's name for them
# safetensors dtypes the runtime computes with → their NumPy names
STORED_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}

# Non-parameter buffers some older checkpoints saved; they carry no information we need.
_IGNORED_TENSOR = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


# --------------------------------------------------------------------------------------------
# config


@dataclass(frozen=True)
class ModelConfig:
    """The parts of ``config.json`` the runtime uses, normalized across transformers 4.x/5.x.

    ``rope_scaling`` is None for plain RoPE, else a dict with ``rope_type`` ("linear" or
    "llama3") and its parameters. ``source_dtype`` is the dtype the weights are stored in.
    ``sliding_window`` is the attention window when the checkpoint enables one (the runtime then
    refuses sequences longer than it rather than silently attending too far). ``raw`` is the
    parsed config.json.
    """

    arch: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool
    source_dtype: str
    sliding_window: int | None = None
    max_position_embeddings: int = 2048
    o_bias: bool = False
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of ``raw`` (key order and whitespace do not matter)."""
        blob = json.dumps(self.raw, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()


def _cfg_error(path, msg: str) -> CheckpointError:
    return CheckpointError(f"{path}: {msg}")


def _get_int(raw: dict, key: str, path, *, default=None, required=False, minimum=1) -> int:
    if key not in raw or raw[key] is None:
        if required:
            raise _cfg_error(path, f"missing required key '{key}'; this does not look like a "
                             "Hugging Face causal-LM config.json")
        return default
    v = raw[key]
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise _cfg_error(path, f"'{key}' must be an integer, got {v!r}")
    if v < minimum:
        raise _cfg_error(path, f"'{key}' must be >= {minimum}, got {v}")
    return v


def _get_float(d: dict, key: str, path, default: float) -> float:
    v = d.get(key, None)
    if v is None:
        return float(default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _cfg_error(path, f"'{key}' must be a finite number, got {v!r}")
    return float(v)


def _get_bool(raw: dict, key: str, path, default: bool) -> bool:
    v = raw.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _cfg_error(path, f"'{key}' must be true or false, got {v!r}")
    return v


def _parse_rope(raw: dict, path, max_pos: int) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from a 5.x ``rope_parameters`` or 4.x ``rope_theta`` +
    ``rope_scaling``, following transformers' standardize_rope_params."""
    params = raw.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise _cfg_error(path, f"'rope_parameters' must be an object, got {params!r}")
        if params and all(isinstance(v, dict) for v in params.values()):
            raise _cfg_error(path, "per-layer-type 'rope_parameters' are not supported by the "
                             "LLaMA-family architectures hiquant runs")
        params = dict(params)
        if "rope_theta" not in params and raw.get("rope_theta") is not None:
            params["rope_theta"] = raw["rope_theta"]
    else:
        scaling = raw.get("rope_scaling")
        if scaling is not None and not isinstance(scaling, dict):
            raise _cfg_error(path, f"'rope_scaling' must be an object or null, got {scaling!r}")
        params = dict(scaling or {})
        params["rope_theta"] = raw.get("rope_theta", 10000.0)
    theta = _get_float(params, "rope_theta", path, 10000.0)
    if theta <= 0:
        raise _cfg_error(path, f"rope_theta must be positive, got {theta}")
    prf = params.get("partial_rotary_factor", raw.get("partial_rotary_factor"))
    if prf is not None and prf != 1.0:
        raise _cfg_error(path, f"partial_rotary_factor={prf} is not supported (only 1.0)")
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type == "default":
        return theta, None
    if rope_type == "linear":
        factor = _get_float(params, "factor", path, float("nan"))
        if not factor > 0:
            raise _cfg_error(path, "linear RoPE scaling needs a positive 'factor'")
        return theta, {"rope_type": "linear", "factor": factor}
    if rope_type == "llama3":
        out = {"rope_type": "llama3"}
        for k in ("factor", "low_freq_factor", "high_freq_factor"):
            if params.get(k) is None:
                raise _cfg_error(path, f"llama3 RoPE scaling needs '{k}'")
            out[k] = _get_float(params, k, path, 0.0)
        omp = params.get("original_max_position_embeddings", raw.get(
            "original_max_position_embeddings", max_pos))
        if isinstance(omp, bool) or not isinstance(omp, (int, float)) or omp <= 0:
            raise _cfg_error(path, f"'original_max_position_embeddings' must be positive, got {omp!r}")
        out["original_max_position_embeddings"] = omp
        if out["high_freq_factor"] == out["low_freq_factor"]:
            raise _cfg_error(path, "llama3 RoPE scaling needs high_freq_factor != low_freq_factor")
        return theta, out
    raise _cfg_error(path, f"RoPE type '{rope_type}' is not supported (supported: default, "
                     "linear, llama3)")


def parse_config(raw: dict, path="config.json", source_dtype: str = "float32") -> ModelConfig:
    """Validate a parsed config.json and normalize it into a :class:`ModelConfig`."""
    if not isinstance(raw, dict):
        raise _cfg_error(path, "must hold a JSON object")
    archs = raw.get("architectures")
    if not isinstance(archs, list) or len(archs) != 1 or not isinstance(archs[0], str):
        raise _cfg_error(path, f"'architectures' must list exactly one architecture, got {archs!r}")
    arch = archs[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise _cfg_error(path, f"architecture '{arch}' is not supported; hiquant runs "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    d = _ARCH_DEFAULTS[arch]
    model_type = raw.get("model_type")
    if model_type == PACKED_MODEL_TYPE:  # a hiquant packed folder keeps its source's type here
        model_type = raw.get("hiquant_source_model_type")
    if model_type is not None and model_type != MODEL_TYPES[arch]:
        raise _cfg_error(path, f"'architectures' says {arch} but 'model_type' says "
                         f"{model_type!r}: transformers builds a {model_type!r} model from this "
                         f"folder (its own attention, e.g. a sliding window), so hiquant's "
                         f"{arch} would compute other logits; make both name the same "
                         f"architecture ({MODEL_TYPES[arch]!r} for {arch})")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise _cfg_error(path, f"hidden_act '{act}' is not supported (only 'silu')")
    if raw.get("mlp_bias"):
        raise _cfg_error(path, "mlp_bias=true is not supported")
    hidden = _get_int(raw, "hidden_size", path, required=True)
    layers = _get_int(raw, "num_hidden_layers", path, required=True)
    heads = _get_int(raw, "num_attention_heads", path, required=True)
    inter = _get_int(raw, "intermediate_size", path, required=True)
    vocab = _get_int(raw, "vocab_size", path, required=True)
    kv = raw["num_key_value_heads"] if "num_key_value_heads" in raw else d["num_key_value_heads"]
    kv = heads if kv is None else _get_int({"num_key_value_heads": kv}, "num_key_value_heads", path)
    if heads % kv:
        raise _cfg_error(path, f"num_attention_heads={heads} is not a multiple of "
                         f"num_key_value_heads={kv}")
    hd = raw.get("head_dim", d["head_dim"])
    if hd is None:
        if hidden % heads:
            raise _cfg_error(path, f"hidden_size={hidden} is not a multiple of "
                             f"num_attention_heads={heads}; give head_dim explicitly")
        hd = hidden // heads
    else:
        hd = _get_int({"head_dim": hd}, "head_dim", path)
    if hd % 2:
        raise _cfg_error(path, f"head_dim={hd} must be even for RoPE")
    eps = _get_float(raw, "rms_norm_eps", path, d["rms_norm_eps"])
    if eps <= 0:
        raise _cfg_error(path, f"rms_norm_eps must be positive, got {eps}")
    max_pos = _get_int(raw, "max_position_embeddings", path, default=d["max_position_embeddings"])
    theta, scaling = _parse_rope(raw, path, max_pos)
    tie = _get_bool(raw, "tie_word_embeddings", path, d["tie_word_embeddings"])
    if arch == "Qwen2ForCausalLM":
        qkv_bias, o_bias = True, False  # hard-wired in transformers' Qwen2Attention
    elif arch == "MistralForCausalLM":
        qkv_bias = o_bias = False
    else:
        qkv_bias = o_bias = _get_bool(raw, "attention_bias", path, d["attention_bias"])
    window = None
    if arch == "MistralForCausalLM":
        window = raw["sliding_window"] if "sliding_window" in raw else d["sliding_window"]
    elif arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and raw.get("use_sliding_window"):
        window = raw.get("sliding_window", d["sliding_window"])
    if window is not None:
        window = _get_int({"sliding_window": window}, "sliding_window", path)
    return ModelConfig(
        arch=arch, hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv,
        head_dim=hd, intermediate_size=inter, vocab_size=vocab, rms_norm_eps=eps,
        rope_theta=theta, rope_scaling=scaling, tie_word_embeddings=tie,
        attention_bias=qkv_bias, qk_norm=arch == "Qwen3ForCausalLM", source_dtype=source_dtype,
        sliding_window=window, max_position_embeddings=max_pos, o_bias=o_bias, raw=raw)



# --------------------------------------------------------------------------------------------
# files and tensors


def file_digest(path) -> str:
    """sha256 (hex) of a whole file, streamed in 4 MiB reads (hashlib.file_digest needs 3.11)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def expand_tensor(raw: np.ndarray, st_dtype: str, out_dtype) -> np.ndarray:
    """Stored values → a fresh C-contiguous array of ``out_dtype``. ``raw`` is the stored array
    as :meth:`SafetensorsFile.array` returns it and ``st_dtype`` its safetensors dtype (a key of
    :data:`STORED_DTYPES`). BF16 is exact: the 16 bits are the top half of a float32."""
    if st_dtype == "BF16":
        f = bf16_to_f32(raw)
        return f if np.dtype(out_dtype) == np.float32 else f.astype(out_dtype)
    return np.array(raw, dtype=out_dtype, order="C", copy=True)


class SourceTensor(NamedTuple):
    """One tensor of a model's source checkpoint, as the exporters copy it: its safetensors
    ``name``, stored ``dtype`` (safetensors name, e.g. "BF16"), ``shape``, and ``read()`` giving
    its stored bytes (a memoryview of the file, or a C-contiguous array of that dtype), ready to
    write back unchanged."""

    name: str
    dtype: str
    shape: tuple
    read: Callable[[], np.ndarray]


def first_nonfinite(tensors) -> str | None:
    """The name of the first float tensor among ``tensors`` (:class:`SourceTensor`, e.g.
    ``model.source_tensors()``) that holds NaN or Inf, or None. Reads each tensor once."""
    np_dtype = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
    for t in tensors:
        if t.dtype not in np_dtype:
            continue
        raw = t.read()
        a = raw if isinstance(raw, np.ndarray) else np.frombuffer(raw, np_dtype[t.dtype])
        if t.dtype == "BF16":
            a = bf16_to_f32(a.view(np.uint16))
        if not np.all(np.isfinite(a)):
            return t.name
    return None


def load_json(path, what: str):
    """Parse the JSON file ``path``; ``what`` names it in the CheckpointError raised when it is
    missing or malformed ("config.json", "the shard index")."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: {what} is not valid JSON ({e}); fix or re-download it") from e


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name a checkpoint of ``cfg`` stores → its shape (embeddings, norms, linear
    weights ``(d_out, d_in)`` and biases, q/k norms, ``lm_head`` unless tied)."""
    D, I, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    nq, nkv, hd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.head_dim
    exp = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not cfg.tie_word_embeddings:
        exp["lm_head.weight"] = (V, D)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        exp[p + "input_layernorm.weight"] = (D,)
        exp[p + "post_attention_layernorm.weight"] = (D,)
        shapes = {"self_attn.q_proj": (nq, D), "self_attn.k_proj": (nkv, D),
                  "self_attn.v_proj": (nkv, D), "self_attn.o_proj": (D, nq),
                  "mlp.gate_proj": (I, D), "mlp.up_proj": (I, D), "mlp.down_proj": (D, I)}
        for s, shp in shapes.items():
            exp[p + s + ".weight"] = shp
        if cfg.attention_bias:
            exp[p + "self_attn.q_proj.bias"] = (nq,)
            exp[p + "self_attn.k_proj.bias"] = (nkv,)
            exp[p + "self_attn.v_proj.bias"] = (nkv,)
        if cfg.o_bias:
            exp[p + "self_attn.o_proj.bias"] = (D,)
        if cfg.qk_norm:
            exp[p + "self_attn.q_norm.weight"] = (hd,)
            exp[p + "self_attn.k_norm.weight"] = (hd,)
    return exp


def open_weights(folder) -> tuple[dict, dict]:
    """Open a folder's safetensors weights: ``(files, where)`` with ``files`` filename →
    :class:`SafetensorsFile` (memory-mapped, header validated) and ``where`` tensor name → the
    file holding it. Reads ``model.safetensors``, or every shard of
    ``model.safetensors.index.json`` checked against the index."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    if index.exists():
        idx = load_json(index, "the shard index")
        wm = idx.get("weight_map") if isinstance(idx, dict) else None
        if not isinstance(wm, dict) or not wm or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
            raise CheckpointError(f"{index}: needs a non-empty 'weight_map' of tensor name → "
                                  "shard file; fix or re-download it")
        files = {}
        for fname in sorted(set(wm.values())):
            fp = folder / fname
            if Path(fname).name != fname or not fp.is_file():
                raise CheckpointError(f"{index}: lists shard '{fname}', which is not a file in "
                                      f"{folder}; download the missing shard")
            files[fname] = SafetensorsFile(fp)
        where = {}
        for fname, f in files.items():
            for name in f.tensors:
                if name in where:
                    raise CheckpointError(f"{f.path}: tensor '{name}' is also in "
                                          f"{where[name].path}; the shards are inconsistent")
                if wm.get(name) != fname:
                    raise CheckpointError(
                        f"{f.path}: holds tensor '{name}' but {index.name} maps it to "
                        f"{wm.get(name)!r}; the index and the shards do not match")
                where[name] = f
        for name, fname in wm.items():
            if name not in where:
                raise CheckpointError(f"{folder / fname}: tensor '{name}' listed in {index.name} "
                                      "is missing from the shard; re-download it")
        return files, where
    if single.exists():
        f = SafetensorsFile(single)
        return {single.name: f}, {n: f for n in f.tensors}
    shards = sorted(p.name for p in folder.glob("model-*-of-*.safetensors"))
    if shards:
        raise CheckpointError(f"{folder}: has shards ({shards[0]}, ...) but no "
                              "model.safetensors.index.json; download the index too")
    raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json; "
                          "hiquant reads Hugging Face safetensors checkpoints (convert .bin "
                          "checkpoints with transformers' save_pretrained)")


def check_tensors(folder, cfg: ModelConfig, where: dict, *, provided: dict | None = None) -> dict:
    """Check the stored tensors (``where`` from :func:`open_weights`) against
    :func:`expected_tensors`: each present, F32/F16/BF16, of the implied shape, and nothing else
    stored. ``provided``: linear name (stem) → ``(d_out, d_in)`` of linear layers whose weights
    come from another source (see ``load_model(linear_source=...)``): their ``NAME.weight`` need
    not be stored, and other tensors stored under ``NAME.`` (a packed layer's codes) belong to
    that source; their biases are still read and checked here. Returns ``where`` without the
    tensors that belong to a provided layer."""
    folder = Path(folder)
    provided = dict(provided or {})
    expected = expected_tensors(cfg)
    prefixes = tuple(stem + "." for stem in provided)
    def theirs(n: str) -> bool:
        return n.startswith(prefixes) and (
            n not in expected or (n.endswith(".weight") and n[:-len(".weight")] in provided))

    own = {n: f for n, f in where.items() if not theirs(n)}
    for stem, shape in provided.items():
        want = expected.get(stem + ".weight")
        if want is None:
            raise CheckpointError(f"{folder}: '{stem}' is not a linear layer of this "
                                  f"{cfg.arch} ({cfg.num_layers} layers)")
        if tuple(shape) != want:
            raise CheckpointError(f"{folder}: layer '{stem}' has shape {tuple(shape)} but "
                                  f"config.json implies {want}")
    for name, shape in expected.items():
        if name.endswith(".weight") and name[:-len(".weight")] in provided:
            continue
        f = own.get(name)
        if f is None:
            hint = ""
            if name == "lm_head.weight":
                hint = " (or set tie_word_embeddings=true in config.json if the model ties them)"
            raise CheckpointError(f"{folder}: tensor '{name}' is missing from the checkpoint"
                                  f"{hint}; the weights do not match config.json")
        e = f.tensors[name]
        if e.dtype not in STORED_DTYPES:
            raise CheckpointError(f"{f.path}: tensor '{name}' has dtype {e.dtype}; hiquant "
                                  "reads F32, F16 and BF16 weights (convert the checkpoint)")
        if tuple(e.shape) != shape:
            raise CheckpointError(f"{f.path}: tensor '{name}' has shape {tuple(e.shape)} but "
                                  f"config.json implies {shape}; the weights and config.json do "
                                  "not match")
    extra = sorted(n for n in own if n not in expected and not _IGNORED_TENSOR.match(n))
    if extra:
        hint = ""
        if "lm_head.weight" in extra and cfg.tie_word_embeddings:
            hint = " (config.json says tie_word_embeddings=true but an lm_head is stored)"
        raise CheckpointError(f"{own[extra[0]].path}: unexpected tensor '{extra[0]}'"
                              f"{' and %d more' % (len(extra) - 1) if len(extra) > 1 else ''}"
                              f"{hint}; the checkpoint does not match config.json "
                              f"({cfg.arch}, {cfg.num_layers} layers)")
    return own
