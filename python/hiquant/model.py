"""The NumPy model runtime for LLaMA-family checkpoints: load, forward, backward.

hiquant evaluates the models it quantizes, collects the inputs of every linear layer and takes
per-sequence weight gradients (empirical Fisher) with this module alone: NumPy float32 with BLAS
matrix products on ``(B*T, d)`` matrices, batched attention, no loops over tokens or heads.
:class:`Model` implements :class:`hiquant.runtime.ModelRuntime`, the surface the stages use;
reading the model folder (``config.json``, safetensors) is :mod:`hiquant.checkpoint`'s, and the
worker pool and BLAS thread control are :mod:`hiquant._threads`'.

Supported checkpoints (Hugging Face layout): ``LlamaForCausalLM``, ``MistralForCausalLM``,
``Qwen2ForCausalLM`` (q/k/v biases) and ``Qwen3ForCausalLM`` (per-head q/k RMSNorm before RoPE);
grouped-query attention; tied or untied embeddings; RoPE ``default``, ``linear`` and ``llama3``
(computed exactly as transformers does, in float32); ``config.json`` written by transformers 4.x
(``rope_theta``/``rope_scaling``/``torch_dtype``) or 5.x (``rope_parameters``/``dtype``);
``model.safetensors`` or shards listed in ``model.safetensors.index.json``; tensors F32, F16 or
BF16. Anything else raises :class:`hiquant.errors.CheckpointError` naming the file and the tensor.

The forward pass follows transformers' float32 arithmetic operation by operation (RMSNorm as
``w * (x * rsqrt(mean(x²) + eps))``, RoPE with ``rotate_half``, scores ``(q kᵀ) * head_dim**-0.5``
with a causal mask, softmax in float32, ``silu(x) = x / (1 + exp(-x))``). The backward pass is
written by hand and checked against finite differences in float64 (``compute_dtype="float64"``)
and against torch autograd.

Memory. Weights stay in their stored dtype in memory-mapped files (page cache, shared and
reclaimable, read only when touched) and are expanded to the compute dtype one decoder block at a
time. Expanded blocks are kept in a least-recently-used cache of at most ``weight_cache_bytes``
(default 1 GiB) so that repeated forwards do not convert again. Peak anonymous memory (float32)
is about::

    weight_cache_bytes                                    (expanded blocks kept for reuse)
  + 4·(D·(H+2K)·hd + H·hd·D + 3·D·I)                      (the block being run)
  + 4·V·D                                                 (lm_head)
  + W · [ 4·B·T·(3·D + 2·(H+2K)·hd + 5·I)                 (one block's activations, per worker)
          + 4·B·H·T·(T+b)/2                               (causal attention probabilities)
          + 4·R·V ]                                       (logits in chunks of R rows)

with D hidden size, I MLP size, H heads, K key/value heads, hd head_dim, V vocabulary, W worker
threads, B sequences of T tokens per chunk (``sequence_losses``: B·T ≈ 512), b = the query block
(max(128, T/8)) and R = min(B·(T-1), 2²⁵/V). Backward passes keep every block's activations
(``weight_grads`` and ``collect_stats`` instead keep only each block's input, 4·B·T·D, and
recompute its activations in the backward pass when all blocks' would exceed 2 GiB / 1 GiB), so
a model whose float32 copy exceeds RAM still runs: for a 7B LLaMA (D=4096, I=11008, 32 heads,
V=32000) with one worker at T=512 that is about 0.75 GiB for a block, 0.5 GiB for lm_head,
0.2 GiB of activations and 0.06 GiB of logits, plus the weight cache.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from ._threads import map_ordered
from .checkpoint import (
    LINEAR_SUFFIXES,
    STORED_DTYPES,
    ModelConfig,
    SourceTensor,
    check_tensors,
    expand_tensor,
    file_digest,
    load_json,
    open_weights,
    parse_config,
)
from .errors import CheckpointError, InvalidArgumentError, InvalidTypeError, NumericalError

__all__ = [
    "Model",
    "BlockCache",
    "KVCache",
    "load_model",
    "rope_inv_freq",
]


# --------------------------------------------------------------------------------------------
# numerics shared by forward and backward


def _rmsnorm(x: np.ndarray, w: np.ndarray, eps: float):
    """transformers' RMSNorm in the compute dtype: w * (x * rsqrt(mean(x²) + eps)). Returns the
    output and r = rsqrt(mean(x²) + eps) (kept for the backward pass)."""
    var = np.mean(np.square(x), axis=-1, keepdims=True)
    var += x.dtype.type(eps)
    r = np.sqrt(var, out=var)
    np.divide(1, r, out=r)
    return w * (x * r), r


def _rmsnorm_backward(dy: np.ndarray, x: np.ndarray, w: np.ndarray, r: np.ndarray) -> np.ndarray:
    """d/dx of y = w * x * r, r = (mean(x²) + eps)^-1/2:  dx = r·g − x·r³·mean(g·x), g = w·dy."""
    g = dy * w
    dot = np.mean(g * x, axis=-1, keepdims=True)
    dot *= r * r * r
    g *= r
    g -= x * dot
    return g


def _rmsnorm_weight_grad(dy: np.ndarray, x: np.ndarray, r: np.ndarray) -> np.ndarray:
    """d/dw of y = w * x * r summed over every leading axis (float64, shape ``(x.shape[-1],)``)."""
    xr = (x * r).reshape(-1, x.shape[-1])
    return np.einsum("ij,ij->j", dy.reshape(-1, x.shape[-1]).astype(np.float64), xr,
                     dtype=np.float64)


def _rope_apply(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x·cos + rotate_half(x)·sin with half tables (both halves of transformers' cos are equal):
    out1 = x1·c − x2·s, out2 = x2·c + x1·s, rounded exactly as transformers rounds it."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    out = np.empty(x.shape, dtype=x.dtype)
    o1, o2 = out[..., :h], out[..., h:]
    np.multiply(x1, cos, out=o1)
    o1 -= x2 * sin
    np.multiply(x2, cos, out=o2)
    o2 += x1 * sin
    return out


def _rope_backward(d: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Adjoint of _rope_apply: dx1 = d1·c + d2·s, dx2 = d2·c − d1·s."""
    h = d.shape[-1] // 2
    d1, d2 = d[..., :h], d[..., h:]
    out = np.empty(d.shape, dtype=d.dtype)
    o1, o2 = out[..., :h], out[..., h:]
    np.multiply(d1, cos, out=o1)
    o1 += d2 * sin
    np.multiply(d2, cos, out=o2)
    o2 -= d1 * sin
    return out


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies in float32, as transformers computes them (default, linear, llama3)."""
    dim = cfg.head_dim
    f32 = np.float32
    expo = np.arange(0, dim, 2, dtype=np.int64).astype(f32) / f32(dim)
    inv = f32(1.0) / (f32(cfg.rope_theta) ** expo)
    sc = cfg.rope_scaling
    if sc is None:
        return inv
    if sc["rope_type"] == "linear":
        return inv / f32(sc["factor"])
    # llama3 (modeling_rope_utils._compute_llama3_parameters), float32 tensors, Python scalars
    factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
    old = sc["original_max_position_embeddings"]
    low_wl, high_wl = old / lo, old / hi
    wavelen = f32(2 * math.pi) / inv
    inv_l = np.where(wavelen > f32(low_wl), inv / f32(factor), inv)
    smooth = (f32(old) / wavelen - f32(lo)) / f32(hi - lo)
    smoothed = (f32(1) - smooth) * inv_l / f32(factor) + smooth * inv_l
    medium = ~(wavelen < f32(high_wl)) & ~(wavelen > f32(low_wl))
    return np.where(medium, smoothed, inv_l).astype(f32)


# --------------------------------------------------------------------------------------------
# the model


def _query_blocks(T: int) -> list[tuple[int, int]]:
    """Blocks of query positions for causal attention: at least 128 rows (efficient matrix
    products), at most 8 blocks."""
    size = max(128, -(-T // 8))
    return [(r0, min(T, r0 + size)) for r0 in range(0, T, size)]


class _BlockParams:
    __slots__ = ("Wqkv", "bqkv", "Wo", "bo", "Wgu", "Wd", "ln1", "ln2", "qn", "kn", "nbytes")


class KVCache:
    """Keys (after RoPE) and values of every decoder block for the positions run so far, for
    incremental decoding (:meth:`Model.forward_cached`): ``k[i]``, ``v[i]`` of shape
    ``(batch, num_kv_heads, max_len, head_dim)`` in the compute dtype, ``length`` positions
    filled. Build it with :meth:`Model.new_kv_cache`; it holds
    ``2·layers·batch·max_len·num_kv_heads·head_dim`` values."""

    __slots__ = ("k", "v", "length", "max_len", "batch", "cos", "sin")

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)


class BlockCache:
    """Activations of one block's forward pass, kept for :meth:`Model.block_backward`."""

    __slots__ = ("block", "shape", "x", "a", "r1", "q", "k", "rq", "rk", "qr", "kr", "v", "P",
                 "o", "h1", "m", "r2", "gu", "e1", "s")

    def nbytes(self) -> int:
        total = 0
        for s in self.__slots__:
            v = getattr(self, s, None)
            for a in (v if isinstance(v, list) else [v]):
                if isinstance(a, np.ndarray):
                    total += a.nbytes
        return total


def _is_int_array(a) -> bool:
    return isinstance(a, np.ndarray) and np.issubdtype(a.dtype, np.integer)


class Model:
    """A loaded checkpoint: the NumPy implementation of :class:`hiquant.runtime.ModelRuntime`.
    Build it with :func:`load_model`.

    Linear layers are named by their Hugging Face tensor stem without ``.weight``
    (``model.layers.0.self_attn.q_proj``); :meth:`linear_names` lists them in block order
    q, k, v, o, gate, up, down.

    ``files``: filename → SafetensorsFile, ``tensor_file``: tensor name → the file holding it
    (both from :func:`hiquant.checkpoint.open_weights`, checked by
    :func:`hiquant.checkpoint.check_tensors`); ``linear_source``: linear name → weight of the
    layers not read from the files (see :func:`load_model`).
    """

    def __init__(self, path: Path, config: ModelConfig, files: dict, tensor_file: dict,
                 tokenizer, compute_dtype, weight_cache_bytes: int,
                 linear_source: Mapping | None = None, packed_kernels: bool = False):
        self.path = Path(path)
        self.config = config
        self.tokenizer = tokenizer
        self.compute_dtype = np.dtype(compute_dtype)
        self.weight_cache_bytes = int(weight_cache_bytes)
        self._files = files  # filename → SafetensorsFile
        self._content_digests: dict = {}  # (path, size, mtime, inode) → sha256, for fingerprint()
        self._where = tensor_file  # tensor name → SafetensorsFile
        # linear name → array or quantized layer standing in for the stored NAME.weight
        self._source = dict(linear_source) if linear_source is not None else {}
        # forward products on the sources' operators (see load_model's packed_kernels)
        self.packed_kernels = bool(packed_kernels) and self.compute_dtype == np.float32
        self._overrides: dict[str, np.ndarray] = {}
        # non-linear tensor name → float32 values set by set_norm_weight (stored-dtype values)
        self._tensor_overrides: dict[str, np.ndarray] = {}
        self._abits: int | None = None  # per-token activation quantization (set_activation_bits)
        self._cache: OrderedDict = OrderedDict()
        self._cache_nbytes = 0
        self._rope_cache: dict = {}
        self._mask_cache: dict = {}
        # worker threads share the model: the caches are filled under this lock
        self._lock = threading.RLock()
        self._inv_freq = rope_inv_freq(config)
        c = config
        self._names = [[f"model.layers.{i}.{s}" for s in LINEAR_SUFFIXES]
                       for i in range(c.num_layers)]
        self._index = {n: (i, j) for i, ns in enumerate(self._names) for j, n in enumerate(ns)}
        self._nq = c.num_heads * c.head_dim
        self._nkv = c.num_kv_heads * c.head_dim

    # ---- introspection

    @property
    def num_blocks(self) -> int:
        return self.config.num_layers

    def linear_names(self) -> list[str]:
        """Every quantizable linear layer, in block order q, k, v, o, gate, up, down."""
        return [n for ns in self._names for n in ns]

    def block_linear_names(self, i: int) -> list[str]:
        """The seven linear layers of block ``i``."""
        return list(self._names[self._check_block(i)])

    def linear_shape(self, name: str) -> tuple[int, int]:
        """(d_out, d_in) of a linear layer, without reading it."""
        self._check_name(name)
        if name in self._source:
            return _layer_shape(self._source[name])
        return tuple(self._where[name + ".weight"].tensors[name + ".weight"].shape)

    def input_groups(self, i: int) -> list[list[str]]:
        """The linear layers of block ``i`` grouped by the input they share, in block order:
        ``[[q, k, v], [o], [gate, up], [down]]``. Layers of one group receive the same array in
        :meth:`block_forward`'s ``capture`` (and share one Gram matrix); this is the one place
        the runtime states that fact."""
        q, k, v, o, gate, up, down = self.block_linear_names(i)
        return [[q, k, v], [o], [gate, up], [down]]

    def source_tensors(self) -> list[SourceTensor]:
        """Every tensor of the checkpoint this model was loaded from, sorted by name, as the
        exporters copy it (:class:`hiquant.checkpoint.SourceTensor`: name, stored safetensors
        dtype, shape, ``read()`` → stored values). Linear weights given by ``linear_source``
        appear as ``NAME.weight``, float32 ("F32"), read as their dequantized values; weights
        replaced by :meth:`set_weight` do not show here (the source is what was loaded)."""
        out = []
        for name, f in self._where.items():
            t = f.tensors[name]
            out.append(SourceTensor(name, t.dtype, tuple(t.shape),
                                    (lambda f=f, n=name: f.raw(n))))
        for stem, o in self._source.items():
            out.append(SourceTensor(stem + ".weight", "F32", _layer_shape(o),
                                    (lambda o=o: _override_array(o, np.float32))))
        return sorted(out, key=lambda t: t.name)

    def fingerprint(self) -> dict:
        """What identifies these weights: the config hash and, per safetensors file, its size and
        the sha256 of its bytes. Caches and resumable runs keyed by it follow the content, not the
        file's metadata: a copied, re-downloaded or ``touch``-ed checkpoint keeps its key, and any
        changed byte changes it. (An earlier key used the mtime, so every copy of a checkpoint
        threw its statistics cache and run progress away.) The file hash is computed once per
        file state (path, size, mtime, inode) and kept on this object; hashing reads each file
        once, about as long as loading it."""
        files = {}
        for fname, f in sorted(self._files.items()):
            st = f.path.stat()
            memo_key = (str(f.path), st.st_size, st.st_mtime_ns, st.st_ino)
            if memo_key not in self._content_digests:
                self._content_digests[memo_key] = file_digest(f.path)
            files[fname] = {"size": st.st_size, "sha256": self._content_digests[memo_key]}
        return {"config_sha256": self.config.fingerprint(), "files": files}

    def __repr__(self) -> str:
        c = self.config
        return (f"Model({str(self.path)!r}, {c.arch}, {c.num_layers} blocks, hidden {c.hidden_size}, "
                f"heads {c.num_heads}/{c.num_kv_heads}, {c.source_dtype} weights, compute "
                f"{self.compute_dtype.name})")

    def _check_block(self, i) -> int:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise InvalidTypeError(f"block index must be an int, got {type(i).__name__}")
        if not 0 <= i < self.num_blocks:
            raise IndexError(f"block index {i} out of range; the model has {self.num_blocks} blocks")
        return int(i)

    def _check_name(self, name) -> tuple[int, int]:
        if name not in self._index:
            raise KeyError(f"{name!r} is not a linear layer of this model; see model.linear_names() "
                           f"(e.g. {self._names[0][0]!r})")
        return self._index[name]

    # ---- weights

    def _tensor(self, name: str, dtype=None) -> np.ndarray:
        if name in self._tensor_overrides:
            return self._tensor_overrides[name].astype(dtype or self.compute_dtype)
        f = self._where[name]
        return expand_tensor(f.array(name), f.tensors[name].dtype, dtype or self.compute_dtype)

    def get_weight(self, name: str, *, original: bool = False) -> np.ndarray:
        """A fresh float32 C-contiguous copy of a linear layer's weight ``(d_out, d_in)``: the
        weight set by :meth:`set_weight` if any (unless ``original=True``), else the checkpoint's
        (or the ``linear_source``'s, see :func:`load_model`)."""
        self._check_name(name)
        if not original and name in self._overrides:
            return _override_array(self._overrides[name], np.float32)
        if name in self._source:
            return _override_array(self._source[name], np.float32)
        return self._tensor(name + ".weight", np.float32)

    def set_weight(self, name: str, W: np.ndarray) -> None:
        """Use ``W`` (float32, the layer's shape) for this linear layer in later forward and
        backward passes, e.g. a quantized-dequantized weight. The array is copied. A model
        computing in float64 also accepts float64 (finite-difference checks need it).

        ``W`` may also be a quantized layer (anything with ``d_out``, ``d_in`` and an exact
        ``dequantize()``, e.g. :class:`hiquant.storage.QuantizedLayer`): it is kept as is and
        dequantized when the layer is used, so a quantized model holds about one byte per weight
        (its codes) instead of a float32 copy — what keeps the pipeline's memory bounded by the
        largest block."""
        i, _ = self._check_name(name)
        if not isinstance(W, np.ndarray) and callable(getattr(W, "dequantize", None)):
            shape = self.linear_shape(name)
            if (getattr(W, "d_out", None), getattr(W, "d_in", None)) != shape:
                raise InvalidArgumentError(f"the quantized layer has shape "
                                           f"{(getattr(W, 'd_out', None), getattr(W, 'd_in', None))} "
                                           f"but {name} has {shape}")
            self._overrides[name] = W
            self._evict(i)
            return
        if not isinstance(W, np.ndarray):
            raise InvalidTypeError(f"W must be a numpy.ndarray of float32, got {type(W).__name__}")
        if W.dtype != np.float32 and W.dtype != self.compute_dtype:
            raise InvalidTypeError(f"W must have dtype float32, got {W.dtype}; convert it with "
                                   "W.astype(numpy.float32)")
        shape = self.linear_shape(name)
        if W.shape != shape:
            raise InvalidArgumentError(f"W has shape {W.shape} but {name} has {shape}; pass a "
                                       "weight of the same layer")
        if not np.isfinite(W).all():

            raise NumericalError(f"W for {name} contains NaN or Inf")
        self._overrides[name] = np.array(W, order="C", copy=True)
        self._evict(i)

    def reset_weight(self, name: str) -> None:
        """Go back to the checkpoint's weight for this linear layer."""
        i, _ = self._check_name(name)
        if self._overrides.pop(name, None) is not None:
            self._evict(i)

    def reset_weights(self) -> None:
        """Go back to the checkpoint's weights for every linear layer and every norm weight
        replaced by :meth:`set_norm_weight`."""
        for name in list(self._overrides):
            self.reset_weight(name)
        for name in list(self._tensor_overrides):
            del self._tensor_overrides[name]
            self._evict(self._tensor_block(name))

    # ---- equivalent transforms (AWQ, SmoothQuant): norm weights and the ops scaling an input

    def input_scalers(self, i: int) -> list:
        """For each of :meth:`input_groups`'s groups of block ``i``, the op whose output
        channels *are* the group's input channels up to a per-channel factor, so that scaling
        that op's output channel j by ``1/s_j`` and the group's input columns j by ``s_j`` leaves
        the model's function unchanged: ``[input_layernorm weight, v_proj, post_attention_layernorm
        weight, up_proj]``. A norm is named by its tensor (``...input_layernorm.weight``, see
        :meth:`set_norm_weight`), a linear by its layer name (scale its rows). ``v_proj`` is None
        when o_proj's input channels are not v_proj's output channels one to one (grouped-query
        attention) or v_proj has a bias (the bias would have to be scaled too)."""
        q, k, v, o, gate, up, down = self.block_linear_names(i)
        pre = f"model.layers.{int(i)}."
        v_ok = self._nq == self._nkv and not self.config.attention_bias
        return [pre + "input_layernorm.weight", v if v_ok else None,
                pre + "post_attention_layernorm.weight", up]

    def _check_norm(self, name) -> None:
        if not isinstance(name, str) or name not in self._where or not name.endswith("norm.weight") \
                or len(self._where[name].tensors[name].shape) != 1:
            raise KeyError(f"{name!r} is not a norm weight of this model (e.g. "
                           "'model.layers.0.input_layernorm.weight', 'model.norm.weight')")

    def _tensor_block(self, name: str):
        parts = name.split(".")
        return int(parts[2]) if len(parts) > 3 and parts[1] == "layers" else "head"

    def get_norm_weight(self, name: str) -> np.ndarray:
        """A fresh float32 copy of an RMSNorm weight (a 1-D tensor named ``...norm.weight``): the
        one set by :meth:`set_norm_weight`, else the checkpoint's. KeyError for another name."""
        self._check_norm(name)
        return self._tensor(name, np.float32)

    def set_norm_weight(self, name: str, w: np.ndarray) -> None:
        """Use ``w`` (float32 ``(hidden,)``) as the RMSNorm weight ``name`` in later passes,
        rounded to the tensor's stored dtype (what an exported checkpoint holds, so a reloaded
        export computes the same function). Equivalent transforms (AWQ, SmoothQuant) fold their
        per-channel scales into the norm this way; :meth:`modified_tensors` lists what was set
        and the exporters write it; :meth:`reset_weights` goes back to the checkpoint's."""
        self._check_norm(name)
        shape = tuple(self._where[name].tensors[name].shape)
        if not isinstance(w, np.ndarray) or w.dtype != np.float32:
            raise InvalidTypeError(f"w must be a float32 numpy.ndarray, got "
                                   f"{getattr(w, 'dtype', type(w).__name__)}")
        if w.shape != shape:
            raise InvalidArgumentError(f"w has shape {w.shape} but {name} has {shape}")
        if not np.isfinite(w).all():
            raise NumericalError(f"w for {name} contains NaN or Inf")
        st = self._where[name].tensors[name].dtype
        if st == "F16":
            v = w.astype(np.float16).astype(np.float32)
            if not np.isfinite(v).all():
                raise NumericalError(f"w for {name} overflows float16, its stored dtype")
        elif st == "BF16":
            from ._safetensors_io import f32_to_bf16
            v = expand_tensor(f32_to_bf16(w), "BF16", np.float32)
        else:
            v = np.array(w, np.float32, order="C", copy=True)
        self._tensor_overrides[name] = v
        self._evict(self._tensor_block(name))

    # ---- activation quantization

    @property
    def activation_bits(self) -> int | None:
        """Width of the per-token activation quantization (:meth:`set_activation_bits`), or None."""
        return self._abits

    def set_activation_bits(self, bits) -> None:
        """Quantize the input of every linear layer of the decoder blocks (q/k/v, o, gate/up,
        down; not lm_head) in later forward passes: per token (row) dynamic symmetric,
        ``x̂ = rint(x / Δ)·Δ`` with ``Δ = max|x| / (2^(bits-1) − 1)`` (an all-zero row stays zero),
        as the Qwen3 study and SmoothQuant's per-token setting do. ``bits`` one of
        :data:`hiquant.config.ACT_BITS` (8, 6, 4) or None (off). ``capture`` receives the
        quantized inputs and the backward pass treats the rounding as the identity."""
        from .config import check_abits
        self._abits = check_abits(bits)

    def _act_quant(self, X: np.ndarray) -> np.ndarray:
        if self._abits is None:
            return X
        qmax = X.dtype.type(2 ** (self._abits - 1) - 1)
        d = np.abs(X).max(axis=1, keepdims=True) / qmax
        d[d == 0] = 1
        out = X / d
        np.rint(out, out=out)
        out *= d
        return out

    def modified_tensors(self) -> dict:
        """``{tensor name: float32 values}`` of the norm weights set by :meth:`set_norm_weight`
        (values already in the stored dtype's precision), sorted by name: what an exporter writes
        instead of the checkpoint's copy."""
        return {n: self._tensor_overrides[n].copy() for n in sorted(self._tensor_overrides)}

    def modified_weights(self) -> list[str]:
        """Names of the linear layers whose weight was replaced by :meth:`set_weight`."""
        return [n for n in self.linear_names() if n in self._overrides]

    def _evict(self, key) -> None:
        with self._lock:
            for k in (key, ("dense", key)):
                item = self._cache.pop(k, None)
                if item is not None:
                    self._cache_nbytes -= item.nbytes

    def clear_weight_cache(self) -> None:
        """Drop every expanded (compute-dtype) weight kept for reuse."""
        with self._lock:
            self._cache.clear()
            self._cache_nbytes = 0

    def _cached(self, key, build):
        with self._lock:
            return self._cached_locked(key, build)

    def _cached_locked(self, key, build):
        item = self._cache.get(key)
        if item is not None:
            self._cache.move_to_end(key)
            return item
        item = build()
        if item.nbytes <= self.weight_cache_bytes:
            while self._cache and self._cache_nbytes + item.nbytes > self.weight_cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._cache_nbytes -= old.nbytes
            self._cache[key] = item
            self._cache_nbytes += item.nbytes
        return item

    def _linear(self, name: str) -> np.ndarray:
        if name in self._overrides:
            return _override_array(self._overrides[name], self.compute_dtype)
        if name in self._source:
            return _override_array(self._source[name], self.compute_dtype)
        return self._tensor(name + ".weight")

    def _block_params(self, i: int) -> _BlockParams:
        """Block ``i``'s weights for the forward pass: with packed kernels, operators for the
        linears whose source provides one (see :func:`load_model`), dense arrays otherwise."""
        return self._cached(i, lambda: self._build_block(i, self.packed_kernels))

    def _dense_block_params(self, i: int) -> _BlockParams:
        """Block ``i``'s weights as dense arrays (the backward pass needs them)."""
        if not self.packed_kernels:
            return self._block_params(i)
        return self._cached(("dense", i), lambda: self._build_block(i, False))

    def _block_params_with(self, i: int, weights: Mapping, cache: bool) -> _BlockParams:
        """Block ``i``'s dense weights with the linears in ``weights`` replaced, for one
        :meth:`block_forward` call: a private copy (the stacked matrices touched are copied,
        the others shared read-only with the weight cache), never stored in the cache."""
        if cache:
            raise InvalidArgumentError("block_forward(weights=...) cannot keep a cache: the "
                                       "backward pass uses the model's weights; set_weight the "
                                       "layers instead")
        names = self._names[i]
        for n, W in weights.items():
            if n not in names:
                raise InvalidArgumentError(f"weights names {n!r}, which is not a linear layer of "
                                           f"block {i} ({', '.join(names)})")
            if not isinstance(W, np.ndarray):
                raise InvalidTypeError(f"weights[{n!r}] must be a numpy.ndarray, got "
                                       f"{type(W).__name__}")
            if W.dtype != np.float32 and W.dtype != self.compute_dtype:
                raise InvalidTypeError(f"weights[{n!r}] must have dtype float32, got {W.dtype}")
            if W.shape != self.linear_shape(n):
                raise InvalidArgumentError(f"weights[{n!r}] has shape {W.shape} but the layer has "
                                           f"{self.linear_shape(n)}")
        base = self._dense_block_params(i)
        p = _BlockParams()
        for s in _BlockParams.__slots__:
            setattr(p, s, getattr(base, s))
        c = self.config
        for attr, group, rows in (("Wqkv", names[:3], [self._nq, self._nkv, self._nkv]),
                                  ("Wo", names[3:4], [c.hidden_size]),
                                  ("Wgu", names[4:6], [c.intermediate_size] * 2),
                                  ("Wd", names[6:7], [c.hidden_size])):
            if not any(n in weights for n in group):
                continue
            if len(group) == 1:
                setattr(p, attr, np.asarray(weights[group[0]], dtype=self.compute_dtype))
                continue
            W = getattr(base, attr).copy()
            r0 = 0
            for n, r in zip(group, rows):
                if n in weights:
                    W[r0:r0 + r] = weights[n]
                r0 += r
            setattr(p, attr, W)
        return p

    def _linear_op(self, name: str):
        """The operator standing for a linear's weight (``x @ W.T`` as ``matmul(x)``): the
        source's operator, or the FP16 kernel on a weight stored in float16; None (used dense)
        for a set_weight override, a source without one and other stored dtypes."""
        if name in self._overrides:
            return None
        if name not in self._source:
            return self._f16_operator(name + ".weight")
        op = getattr(self._source[name], "operator", None)
        return op() if callable(op) else None

    def _stored_f16_matrix(self, tensor: str) -> bool:
        """Whether ``tensor`` is a matrix stored in float16 and not overridden."""
        f = self._where.get(tensor)
        return (f is not None and f.tensors[tensor].dtype == "F16"
                and len(f.tensors[tensor].shape) == 2 and tensor not in self._tensor_overrides)

    def _f16_operator(self, tensor: str):
        """Tensor ``tensor`` (d_out, d_in) as an operator on its stored float16 values (hiquant's
        FP16 kernel reading the mapped file: no float32 copy), or None where it is stored in
        another dtype or overridden."""
        if not self._stored_f16_matrix(tensor):
            return None
        from .packed_matmul import PackedLinear
        W16 = self._where[tensor].array(tensor)
        return PackedLinear(tensor, W16.shape[0], W16.shape[1],
                            [{"bits": 16, "n_cols": int(W16.shape[1]), "cols": None,
                              "weight": W16}])

    def _stacked(self, names: list[str], rows: list[int], ops: bool):
        """The weights of layers sharing their input, stacked by rows: one RowStack operator
        when every layer has one (``ops``), else one dense matrix (one matrix product)."""
        if ops:
            found = [self._linear_op(n) for n in names]
            if all(o is not None for o in found):
                if len(found) == 1:
                    return found[0]
                from .packed_matmul import RowStack
                return RowStack(found)
        if len(names) == 1:
            return self._linear(names[0])
        W = np.empty((sum(rows), self.config.hidden_size), dtype=self.compute_dtype)
        r0 = 0
        for n, r in zip(names, rows):
            W[r0:r0 + r] = self._linear(n)
            r0 += r
        return W

    def _build_block(self, i: int, ops: bool = False) -> _BlockParams:
        c = self.config
        p = _BlockParams()
        names = self._names[i]
        pre = f"model.layers.{i}."
        nq, nkv = self._nq, self._nkv
        # q, k and v (and gate and up) share their input: one stacked matrix, one matrix product.
        p.Wqkv = self._stacked(names[:3], [nq, nkv, nkv], ops)
        p.bqkv = None
        if c.attention_bias:
            p.bqkv = np.concatenate([self._tensor(n + ".bias") for n in names[:3]])
        p.Wo = self._stacked(names[3:4], [c.hidden_size], ops)
        p.bo = self._tensor(names[3] + ".bias") if c.o_bias else None
        I = c.intermediate_size
        p.Wgu = self._stacked(names[4:6], [I, I], ops)
        p.Wd = self._stacked(names[6:7], [c.hidden_size], ops)
        p.ln1 = self._tensor(pre + "input_layernorm.weight")
        p.ln2 = self._tensor(pre + "post_attention_layernorm.weight")
        p.qn = p.kn = None
        if c.qk_norm:
            p.qn = self._tensor(pre + "self_attn.q_norm.weight")
            p.kn = self._tensor(pre + "self_attn.k_norm.weight")
        p.nbytes = sum(getattr(p, s).nbytes for s in _BlockParams.__slots__[:-1]
                       if getattr(p, s) is not None)
        return p

    class _Head:
        __slots__ = ("norm", "W", "nbytes")

    def _head(self):
        def build():
            h = Model._Head()
            h.norm = self._tensor("model.norm.weight")
            src = ("model.embed_tokens.weight" if self.config.tie_word_embeddings
                   else "lm_head.weight")
            h.W = self._tensor(src)
            h.nbytes = h.norm.nbytes + h.W.nbytes
            return h
        return self._cached("head", build)

    # ---- forward pieces

    def check_ids(self, ids, name: str = "ids", min_len: int = 1) -> np.ndarray:
        """Validate token ids and return them unchanged: an integer ndarray ``(batch, seqlen)``
        with batch >= 1, seqlen >= ``min_len`` and every id in ``[0, vocab_size)``. Raises
        InvalidTypeError / InvalidArgumentError naming the argument ``name``."""
        if not _is_int_array(ids):
            raise InvalidTypeError(f"{name} must be an integer numpy.ndarray of token ids with "
                                   f"shape (batch, seqlen), got {type(ids).__name__}"
                                   + (f" of {ids.dtype}" if isinstance(ids, np.ndarray) else ""))
        if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < min_len:
            raise InvalidArgumentError(f"{name} must have shape (batch, seqlen) with batch >= 1 and "
                                       f"seqlen >= {min_len}, got {ids.shape}")
        V = self.config.vocab_size
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= V:
            raise InvalidArgumentError(f"{name} holds token id {lo if lo < 0 else hi} outside the "
                                       f"vocabulary [0, {V}); tokenize with this model's tokenizer")
        return ids

    def _check_h(self, h, name="h") -> np.ndarray:
        if not isinstance(h, np.ndarray):
            raise InvalidTypeError(f"{name} must be a numpy.ndarray, got {type(h).__name__}")
        if h.dtype != self.compute_dtype:
            raise InvalidTypeError(f"{name} must have dtype {self.compute_dtype} (the model's "
                                   f"compute dtype), got {h.dtype}")
        if h.ndim != 3 or h.shape[2] != self.config.hidden_size or h.shape[0] < 1 or h.shape[1] < 1:
            raise InvalidArgumentError(f"{name} must have shape (batch, seqlen, "
                                       f"{self.config.hidden_size}), got {h.shape}")
        return h

    def check_seqlen(self, T: int) -> None:
        """Raise InvalidArgumentError when sequences of ``T`` tokens cannot be run (longer than
        the checkpoint's sliding attention window, which the runtime does not implement)."""
        w = self.config.sliding_window
        if w is not None and T > w:
            raise InvalidArgumentError(
                f"sequences of {T} tokens exceed this checkpoint's sliding attention window of {w}; "
                f"hiquant does not implement sliding-window attention, use seqlen <= {w}")

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """Token embeddings: int ids (B, T) → compute-dtype hidden states (B, T, hidden)."""
        ids = self.check_ids(ids)
        self.check_seqlen(ids.shape[1])
        name = "model.embed_tokens.weight"
        f = self._where[name]
        rows = f.array(name)[ids.reshape(-1)]  # gathers only the rows used, in the stored dtype
        out = expand_tensor(rows, f.tensors[name].dtype, self.compute_dtype)
        return out.reshape(ids.shape[0], ids.shape[1], self.config.hidden_size)

    def _rope(self, T: int):
        with self._lock:
            return self._rope_locked(T)

    def _rope_locked(self, T: int):
        key = T
        if key not in self._rope_cache:
            if len(self._rope_cache) > 8:
                self._rope_cache.clear()
            # transformers computes the tables in float32 whatever the model's dtype
            pos = np.arange(T, dtype=np.float32)
            freqs = pos[:, None] * self._inv_freq[None, :]
            cd = self.compute_dtype
            self._rope_cache[key] = (np.cos(freqs).astype(cd), np.sin(freqs).astype(cd))
        return self._rope_cache[key]

    def _mask(self, Tb: int, G: int) -> np.ndarray:
        """Additive causal mask of a diagonal block: row (t, g) may see key j iff j <= t."""
        with self._lock:
            key = (Tb, G)
            if key not in self._mask_cache:
                if len(self._mask_cache) > 16:
                    self._mask_cache.clear()
                t = np.repeat(np.arange(Tb), G)
                m = np.where(np.arange(Tb)[None, :] <= t[:, None], 0.0, -np.inf)
                self._mask_cache[key] = m.astype(self.compute_dtype)
            return self._mask_cache[key]

    @staticmethod
    def _mm(X: np.ndarray, W) -> np.ndarray:
        """``X @ W.T`` for a dense weight, ``W.matmul(X)`` for an operator (packed kernels; one
        kernel thread per worker while sequence chunks run on several workers)."""
        if isinstance(W, np.ndarray):
            return X @ W.T
        from ._threads import kernel_threads
        return W.matmul(np.ascontiguousarray(X), n_threads=kernel_threads())

    def block_forward(self, i: int, h: np.ndarray, *, cache: bool = False,
                      capture: Callable[[str, np.ndarray], None] | None = None,
                      weights: Mapping[str, np.ndarray] | None = None):
        """Run decoder block ``i`` on hidden states ``h`` (B, T, hidden).

        ``capture(name, X)`` is called for each linear layer with its input ``X`` of shape
        ``(B*T, d_in)`` in the compute dtype (q, k and v receive the same array, as do gate and
        up). ``X`` is read-only for the callee and only valid during the call; copy it to keep it.
        ``weights``: ``{name: W}`` for some of block ``i``'s linear layers (float32 or the compute
        dtype, the layer's shape), used in this call only, as if :meth:`set_weight` had been
        called: the model is not changed, so calls with different ``weights`` may run at the same
        time on worker threads (the measured sensitivity matrix does). Not with ``cache=True``.
        Returns the output, or ``(output, BlockCache)`` with ``cache=True``.
        """
        i = self._check_block(i)
        h = self._check_h(h)
        c, cd = self.config, self.compute_dtype
        B, T, D = h.shape
        self.check_seqlen(T)
        P = self._block_params(i) if not weights else self._block_params_with(i, weights, cache)
        names = self._names[i]
        KV, G, hd = c.num_kv_heads, c.num_heads // c.num_kv_heads, c.head_dim
        nq, nkv, I = self._nq, self._nkv, c.intermediate_size
        eps = c.rms_norm_eps
        x = np.ascontiguousarray(h).reshape(B * T, D)

        a, r1 = _rmsnorm(x, P.ln1, eps)
        a = self._act_quant(a)
        if capture is not None:
            for n in names[:3]:
                capture(n, a)
        qkv = self._mm(a, P.Wqkv)
        if P.bqkv is not None:
            qkv += P.bqkv
        q = qkv[:, :nq].reshape(B, T, KV, G, hd)
        k = qkv[:, nq:nq + nkv].reshape(B, T, KV, hd)
        v = qkv[:, nq + nkv:].reshape(B, T, KV, hd)
        rq = rk = None
        if c.qk_norm:
            qn, rq = _rmsnorm(q, P.qn, eps)
            kn, rk = _rmsnorm(k, P.kn, eps)
        else:
            qn, kn = q, k
        cos, sin = self._rope(T)
        # Queries as (B, KV, T, G, hd): the G heads sharing a key/value head sit side by side, so
        # GQA needs no copies of k and v and a block of positions is one (rows·G, hd) matrix.
        qr = _rope_apply(qn.transpose(0, 2, 1, 3, 4), cos[:, None], sin[:, None])
        kr = _rope_apply(kn.transpose(0, 2, 1, 3), cos, sin)  # (B, KV, T, hd)
        vt = v.transpose(0, 2, 1, 3)
        scale = cd.type(hd ** -0.5)
        O = np.empty((B, KV, T, G, hd), dtype=cd)
        Ps = []
        # Causal attention by blocks of query positions: block [t0, t1) only sees keys < t1, so
        # the masked upper triangle is mostly never computed (62% of the square for 4 blocks).
        for t0, t1 in _query_blocks(T):
            nb = (t1 - t0) * G
            S = np.matmul(qr[:, :, t0:t1].reshape(B, KV, nb, hd), kr[:, :, :t1].swapaxes(-1, -2))
            S *= scale  # transformers scales the product, not q
            S[..., t0:t1] += self._mask(t1 - t0, G)
            S -= S.max(axis=-1, keepdims=True)
            np.exp(S, out=S)
            S /= S.sum(axis=-1, keepdims=True)
            O[:, :, t0:t1] = np.matmul(S, vt[:, :, :t1]).reshape(B, KV, t1 - t0, G, hd)
            Ps.append(S)
        o = self._act_quant(O.transpose(0, 2, 1, 3, 4).reshape(B * T, nq))
        if capture is not None:
            capture(names[3], o)
        h1 = self._mm(o, P.Wo)
        if P.bo is not None:
            h1 += P.bo
        h1 += x

        m, r2 = _rmsnorm(h1, P.ln2, eps)
        m = self._act_quant(m)
        if capture is not None:
            capture(names[4], m)
            capture(names[5], m)
        gu = self._mm(m, P.Wgu)
        g, u = gu[:, :I], gu[:, I:]
        e1 = np.negative(g)
        with np.errstate(over="ignore"):  # exp(-g) = inf for g << 0 gives silu = -0, as in torch
            np.exp(e1, out=e1)
        e1 += 1
        s = g / e1  # silu(g) = g / (1 + exp(-g)), as torch computes it
        s *= u
        s = self._act_quant(s)
        if capture is not None:
            capture(names[6], s)
        out = self._mm(s, P.Wd)
        out += h1
        out = out.reshape(B, T, D)
        if not cache:
            return out
        cch = BlockCache()
        cch.block, cch.shape = i, (B, T)
        cch.x, cch.a, cch.r1, cch.q, cch.k, cch.rq, cch.rk = x, a, r1, q, k, rq, rk
        cch.qr, cch.kr, cch.v, cch.P, cch.o = qr, kr, vt, Ps, o
        cch.h1, cch.m, cch.r2, cch.gu, cch.e1, cch.s = h1, m, r2, gu, e1, s
        return out, cch

    def block_backward(self, i: int, cache: BlockCache, dh_out: np.ndarray, *,
                       weight_grads: bool = True, norm_grads: bool = False):
        """Backward pass of block ``i`` from the cache of its forward pass.

        ``dh_out`` is the gradient with respect to the block's output (B, T, hidden). Returns
        ``(dh_in, grads)``: the gradient with respect to the block's input and, when
        ``weight_grads``, ``{name: dW}`` for its seven linear layers (compute dtype, (d_out, d_in));
        with ``norm_grads`` also ``{norm name: dw}`` (float64, the norm's shape) for the block's
        RMSNorm weights (input_layernorm, post_attention_layernorm, and q_norm / k_norm where the
        model has them) — what end-to-end tuning of the norms needs (:mod:`hiquant.e2e`).
        """
        i = self._check_block(i)
        if not isinstance(cache, BlockCache) or cache.block != i:
            raise InvalidArgumentError(f"cache must be the BlockCache returned by "
                                       f"block_forward({i}, ..., cache=True)")
        dh_out = self._check_h(dh_out, "dh_out")
        B, T = cache.shape
        if dh_out.shape[:2] != (B, T):
            raise InvalidArgumentError(f"dh_out has shape {dh_out.shape} but the cached forward "
                                       f"ran on ({B}, {T}, {self.config.hidden_size})")
        c, cd = self.config, self.compute_dtype
        P = self._dense_block_params(i)
        names = self._names[i]
        D, I = c.hidden_size, c.intermediate_size
        KV, G, hd = c.num_kv_heads, c.num_heads // c.num_kv_heads, c.head_dim
        nq, nkv = self._nq, self._nkv
        H = c.num_heads
        grads = {}
        dy = np.ascontiguousarray(dh_out).reshape(B * T, D)

        # MLP: out = h1 + (silu(g) * u) @ Wdᵀ
        if weight_grads:
            grads[names[6]] = dy.T @ cache.s
        ds = dy @ P.Wd
        g, u = cache.gu[:, :I], cache.gu[:, I:]
        sg = 1 / cache.e1  # sigmoid(g)
        dgu = np.empty((B * T, 2 * I), dtype=cd)
        np.divide(g, cache.e1, out=dgu[:, I:])  # silu(g), recomputed rather than kept
        dgu[:, I:] *= ds
        dg = dgu[:, :I]
        # silu'(g) = σ(g)·(1 + g·(1 − σ(g)))
        np.subtract(1, sg, out=dg)
        dg *= g
        dg += 1
        dg *= sg
        dg *= ds
        dg *= u
        if weight_grads:
            dWgu = dgu.T @ cache.m
            grads[names[4]], grads[names[5]] = dWgu[:I], dWgu[I:]
        dm = dgu @ P.Wgu
        pre = f"model.layers.{i}."
        if norm_grads:
            grads[pre + "post_attention_layernorm.weight"] = _rmsnorm_weight_grad(
                dm, cache.h1, cache.r2)
        dh1 = _rmsnorm_backward(dm, cache.h1, P.ln2, cache.r2)
        dh1 += dy

        # attention: h1 = x + o @ Woᵀ
        if weight_grads:
            grads[names[3]] = dh1.T @ cache.o
        do = dh1 @ P.Wo
        dO = np.ascontiguousarray(do.reshape(B, T, KV, G, hd).transpose(0, 2, 1, 3, 4))
        scale = cd.type(hd ** -0.5)
        dqr = np.empty((B, KV, T, G, hd), dtype=cd)
        dkr = np.zeros((B, KV, T, hd), dtype=cd)
        dv = np.zeros((B, KV, T, hd), dtype=cd)
        for (t0, t1), Pm in zip(_query_blocks(T), cache.P):
            nb = (t1 - t0) * G
            dOb = dO[:, :, t0:t1].reshape(B, KV, nb, hd)
            dP = np.matmul(dOb, cache.v[:, :, :t1].swapaxes(-1, -2))  # (B, KV, nb, t1)
            dv[:, :, :t1] += np.matmul(Pm.swapaxes(-1, -2), dOb)  # sums over the G query heads
            # softmax backward: dS = P ⊙ (dP − Σ_j P dP), then the score scale
            dP *= Pm
            rs = dP.sum(axis=-1, keepdims=True)
            dP -= Pm * rs
            dP *= scale
            dqr[:, :, t0:t1] = np.matmul(dP, cache.kr[:, :, :t1]).reshape(B, KV, t1 - t0, G, hd)
            dkr[:, :, :t1] += np.matmul(dP.swapaxes(-1, -2),
                                        cache.qr[:, :, t0:t1].reshape(B, KV, nb, hd))
        cos, sin = self._rope(T)
        dqn = _rope_backward(dqr, cos[:, None], sin[:, None]).transpose(0, 2, 1, 3, 4)
        dkn = _rope_backward(dkr, cos, sin).transpose(0, 2, 1, 3)  # (B, T, KV, hd)
        if c.qk_norm:
            if norm_grads:
                grads[pre + "self_attn.q_norm.weight"] = _rmsnorm_weight_grad(dqn, cache.q, cache.rq)
                grads[pre + "self_attn.k_norm.weight"] = _rmsnorm_weight_grad(dkn, cache.k, cache.rk)
            dqn = _rmsnorm_backward(dqn, cache.q, P.qn, cache.rq)
            dkn = _rmsnorm_backward(dkn, cache.k, P.kn, cache.rk)
        dqkv = np.empty((B * T, nq + 2 * nkv), dtype=cd)
        dv4 = dqkv.reshape(B, T, H + 2 * KV, hd)
        dv4[:, :, :H] = dqn.reshape(B, T, H, hd)
        dv4[:, :, H:H + KV] = dkn
        dv4[:, :, H + KV:] = dv.transpose(0, 2, 1, 3)
        if weight_grads:
            dW = dqkv.T @ cache.a
            grads[names[0]], grads[names[1]], grads[names[2]] = (
                dW[:nq], dW[nq:nq + nkv], dW[nq + nkv:])
        da = dqkv @ P.Wqkv
        if norm_grads:
            grads[pre + "input_layernorm.weight"] = _rmsnorm_weight_grad(da, cache.x, cache.r1)
        dx = _rmsnorm_backward(da, cache.x, P.ln1, cache.r1)
        dx += dh1
        if weight_grads:  # the linears in block order, then the norms
            grads = {**{n: np.ascontiguousarray(grads.pop(n)) for n in names}, **grads}
        return dx.reshape(B, T, D), grads

    # ---- incremental decoding (generation)

    def new_kv_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty :class:`KVCache` for ``batch`` sequences of at most ``max_len`` positions."""
        for nm, v in (("batch", batch), ("max_len", max_len)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise InvalidArgumentError(f"{nm} must be a positive int, got {v!r}")
        self.check_seqlen(int(max_len))
        c, cd = self.config, self.compute_dtype
        kv = KVCache()
        kv.batch, kv.max_len, kv.length = int(batch), int(max_len), 0
        shape = (kv.batch, c.num_kv_heads, kv.max_len, c.head_dim)
        kv.k = [np.zeros(shape, cd) for _ in range(self.num_blocks)]
        kv.v = [np.zeros(shape, cd) for _ in range(self.num_blocks)]
        # RoPE tables of every position (each row depends on its position only)
        pos = np.arange(kv.max_len, dtype=np.float32)
        freqs = pos[:, None] * self._inv_freq[None, :]
        kv.cos, kv.sin = np.cos(freqs).astype(cd), np.sin(freqs).astype(cd)
        return kv

    def forward_cached(self, ids: np.ndarray, kv: KVCache) -> np.ndarray:
        """Next-token logits ``(B, t, vocab)`` of the ``t`` new tokens ``ids`` (B, t) at positions
        ``kv.length .. kv.length + t - 1``, attending to the cached keys and values of the
        earlier positions; appends theirs to ``kv``. The first call (the prompt, ``kv.length ==
        0``) gives the logits :meth:`logits` gives; each later call with one token costs one
        product per linear layer (the packed kernels' GEMV with :func:`hiquant.load_packed`,
        where a float16 output matrix is also multiplied in place by the FP16 kernel) and
        attention over the cached positions, not a pass over the whole sequence."""
        if not isinstance(kv, KVCache):
            raise InvalidTypeError(f"kv must be a KVCache from model.new_kv_cache, got "
                                   f"{type(kv).__name__}")
        ids = self.check_ids(ids)
        B, t = ids.shape
        if B != kv.batch or kv.length + t > kv.max_len:
            raise InvalidArgumentError(f"ids has shape {ids.shape} but the cache holds {kv.batch} "
                                       f"sequences with {kv.max_len - kv.length} free positions "
                                       f"of {kv.max_len}; make a larger cache")
        h = self.embed(ids)
        for i in range(self.num_blocks):
            h = self._block_step(i, h, kv)
        kv.length += t
        op = self._head_operator()
        if op is None:
            hd, _, y, _ = self._final(h)
            return (y @ hd.W.T).reshape(B, t, -1)
        _, y, _ = self._final_norm(h, self._tensor("model.norm.weight"))
        return op.matmul(y).reshape(B, t, -1)

    def _head_operator(self):
        """With packed kernels and a float16 output matrix (``lm_head`` or the tied embeddings):
        that matrix as an operator on the stored float16 values (hiquant's FP16 kernel reading
        the mapped file, no float32 copy), for the decode steps; None otherwise."""
        src = "model.embed_tokens.weight" if self.config.tie_word_embeddings else "lm_head.weight"
        if not (self.packed_kernels and self._stored_f16_matrix(src)):
            return None
        return self._cached("head_operator", lambda: self._f16_operator(src))

    def _block_step(self, i: int, h: np.ndarray, kv: KVCache) -> np.ndarray:
        """block_forward's arithmetic for positions p0..p0+t-1 with keys/values from ``kv``."""
        c, cd = self.config, self.compute_dtype
        B, t, D = h.shape
        p0, p1 = kv.length, kv.length + t
        P = self._block_params(i)
        KV, G, hd = c.num_kv_heads, c.num_heads // c.num_kv_heads, c.head_dim
        nq, nkv, I = self._nq, self._nkv, c.intermediate_size
        eps = c.rms_norm_eps
        x = np.ascontiguousarray(h).reshape(B * t, D)
        a, _ = _rmsnorm(x, P.ln1, eps)
        a = self._act_quant(a)
        qkv = self._mm(a, P.Wqkv)
        if P.bqkv is not None:
            qkv += P.bqkv
        q = qkv[:, :nq].reshape(B, t, KV, G, hd)
        k = qkv[:, nq:nq + nkv].reshape(B, t, KV, hd)
        v = qkv[:, nq + nkv:].reshape(B, t, KV, hd)
        if c.qk_norm:
            q, _ = _rmsnorm(q, P.qn, eps)
            k, _ = _rmsnorm(k, P.kn, eps)
        cos, sin = kv.cos[p0:p1], kv.sin[p0:p1]
        qr = _rope_apply(q.transpose(0, 2, 1, 3, 4), cos[:, None], sin[:, None])  # (B,KV,t,G,hd)
        kv.k[i][:, :, p0:p1] = _rope_apply(k.transpose(0, 2, 1, 3), cos, sin)
        kv.v[i][:, :, p0:p1] = v.transpose(0, 2, 1, 3)
        S = np.matmul(qr.reshape(B, KV, t * G, hd), kv.k[i][:, :, :p1].swapaxes(-1, -2))
        S *= cd.type(hd ** -0.5)
        if t > 1:  # query (j, g) at position p0 + j sees keys 0 .. p0 + j
            rows = np.repeat(np.arange(p0, p1), G)
            S += np.where(np.arange(p1)[None, :] <= rows[:, None], 0.0, -np.inf).astype(cd)
        S -= S.max(axis=-1, keepdims=True)
        np.exp(S, out=S)
        S /= S.sum(axis=-1, keepdims=True)
        O = np.matmul(S, kv.v[i][:, :, :p1]).reshape(B, KV, t, G, hd)
        o = self._act_quant(O.transpose(0, 2, 1, 3, 4).reshape(B * t, nq))
        h1 = self._mm(o, P.Wo)
        if P.bo is not None:
            h1 += P.bo
        h1 += x
        m, _ = _rmsnorm(h1, P.ln2, eps)
        m = self._act_quant(m)
        gu = self._mm(m, P.Wgu)
        g, u = gu[:, :I], gu[:, I:]
        e1 = np.negative(g)
        with np.errstate(over="ignore"):
            np.exp(e1, out=e1)
        e1 += 1
        s = g / e1
        s *= u
        s = self._act_quant(s)
        out = self._mm(s, P.Wd)
        out += h1
        return out.reshape(B, t, D)

    # ---- head

    def _final(self, h: np.ndarray):
        hd = self._head()
        return (hd, *self._final_norm(h, hd.norm))

    def _final_norm(self, h: np.ndarray, norm: np.ndarray):
        """(x, y, r): the last block's output as rows ``(B*T, D)``, the final norm's output and
        its reciprocal RMS."""
        B, T, D = h.shape
        x = np.ascontiguousarray(h).reshape(B * T, D)
        y, r = _rmsnorm(x, norm, self.config.rms_norm_eps)
        return x, y, r

    def head_loss(self, h: np.ndarray, ids: np.ndarray, *, grad: bool = False,
                  norm_grad: bool = False):
        """Per-sequence mean next-token cross-entropy (float64, (B,)) from the last block's
        output ``h`` (B, T, hidden); position t predicts ids[:, t+1] (T-1 predictions, no BOS).

        With ``grad=True`` returns ``(losses, dh)`` where ``dh`` is the gradient of
        ``losses.sum()`` with respect to ``h``; with ``norm_grad`` too, ``(losses, dh,
        {"model.norm.weight": dw})``, the gradient with respect to the final norm's weight
        (float64).
        """
        if norm_grad and not grad:
            raise InvalidArgumentError("norm_grad=True needs grad=True")
        h = self._check_h(h)
        ids = self.check_ids(ids, min_len=2)
        B, T = ids.shape
        if h.shape[:2] != (B, T):
            raise InvalidArgumentError(f"h has shape {h.shape} but ids has {ids.shape}")
        hd, x, y, r = self._final(h)
        V, D = hd.W.shape
        cd = self.compute_dtype
        rows = np.arange(B * T).reshape(B, T)[:, :-1].reshape(-1)  # positions that predict
        targets = ids[:, 1:].reshape(-1)
        per_pos = np.empty(rows.size, dtype=np.float64)
        dy = np.zeros((B * T, D), dtype=cd) if grad else None
        chunk = max(1, (32768 * 1024) // V)  # bounds the logits buffer near 128 MiB in float32
        scale = cd.type(1.0 / (T - 1))
        for s0 in range(0, rows.size, chunk):
            rr, tt = rows[s0:s0 + chunk], targets[s0:s0 + chunk]
            logits = y[rr] @ hd.W.T
            mx = logits.max(axis=1, keepdims=True)
            logits -= mx
            tgt = logits[np.arange(rr.size), tt]
            np.exp(logits, out=logits)
            se = logits.sum(axis=1)
            per_pos[s0:s0 + rr.size] = np.log(se) - tgt
            if grad:
                logits /= se[:, None]  # softmax
                logits[np.arange(rr.size), tt] -= 1
                logits *= scale
                dy[rr] = logits @ hd.W
        losses = per_pos.reshape(B, T - 1).mean(axis=1)
        if not grad:
            return losses
        dx = _rmsnorm_backward(dy, x, hd.norm, r)
        if norm_grad:
            return losses, dx.reshape(B, T, D), {
                "model.norm.weight": _rmsnorm_weight_grad(dy, x, r)}
        return losses, dx.reshape(B, T, D)

    # ---- whole model

    def activation_bytes(self, T: int) -> int:
        """Bytes of one decoder block's activations for one sequence of ``T`` tokens, in the
        compute dtype: what ``block_forward(..., cache=True)`` keeps for the backward pass
        (attention probabilities ``H·T²``, the q/k/v projections and their RoPE'd copies, the
        MLP's ``5·I`` and ``4·D`` per token), the largest working set of a block. The one
        activation-size estimate: :meth:`auto_batch` sizes forward chunks by it and the backward
        passes (here and in :func:`hiquant.stats.collect_stats`) decide on recomputation by it."""
        c = self.config
        nq, nkv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        return self.compute_dtype.itemsize * T * (
            c.num_heads * T + 4 * c.hidden_size + 3 * (nq + 2 * nkv) + 5 * c.intermediate_size)

    def auto_batch(self, T: int, budget: int = 128 << 20) -> int:
        """Sequences of ``T`` tokens per forward chunk: enough for about 512 rows per matrix
        product (measured: one 512-token window per chunk beats 2 or 4, which only add memory
        traffic), fewer if one chunk's :meth:`activation_bytes` would exceed ``budget`` bytes.
        Independent of the thread count on purpose: the chunking decides the matrix shapes,
        hence the rounding, so results do not depend on how many workers run the chunks."""
        return max(1, min(-(-512 // T), budget // self.activation_bytes(T)))

    def forward(self, ids: np.ndarray) -> np.ndarray:
        """Hidden states after the last block (before the final norm), (B, T, hidden)."""
        h = self.embed(ids)
        for i in range(self.num_blocks):
            h = self.block_forward(i, h)
        return h

    def sequence_losses(self, ids: np.ndarray, *, batch_size: int | None = None,
                        n_threads: int | None = None, progress=None) -> np.ndarray:
        """Per-sequence mean next-token cross-entropy, float64 (B,).

        Sequences run in chunks of ``batch_size`` (default: by memory), each chunk through all
        blocks, chunks spread over ``n_threads`` workers (default: hiquant's thread count) with
        single-threaded BLAS. Results do not depend on ``n_threads``. ``progress``: optional
        callable(n_sequences_done) called as chunks finish.
        """
        ids = self.check_ids(ids, min_len=2)
        bs = batch_size or self.auto_batch(ids.shape[1])
        if isinstance(bs, bool) or not isinstance(bs, (int, np.integer)) or bs < 1:
            raise InvalidArgumentError(f"batch_size must be a positive int, got {batch_size!r}")
        self.check_seqlen(ids.shape[1])

        def run(b0):
            chunk = ids[b0:b0 + bs]
            out = self.head_loss(self.forward(chunk), chunk)
            if progress is not None:
                progress(len(chunk))
            return out

        return np.concatenate(map_ordered(run, range(0, ids.shape[0], bs), n_threads))

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Next-token logits (B, T, vocab) in the compute dtype."""
        ids = self.check_ids(ids)
        h = self.forward(ids)
        hd, _, y, _ = self._final(h)
        return (y @ hd.W.T).reshape(ids.shape[0], ids.shape[1], -1)

    def weight_grads(self, ids: np.ndarray, *, recompute: bool | None = None) -> dict:
        """Gradient of the mean over the batch of the per-sequence losses with respect to every
        linear weight: ``{name: dW}`` (compute dtype, (d_out, d_in)). Call with one sequence
        (B = 1) for per-sequence gradients. ``recompute=True`` keeps only each block's input and
        recomputes its activations during the backward pass (less memory, one more forward);
        None chooses it when the activations of all blocks (:meth:`activation_bytes`) would
        exceed 2 GiB."""
        grads = {}
        for _, g in self._block_weight_grads(ids, recompute, 2 << 30):
            grads.update(g)
        return {n: grads[n] for n in self.linear_names()}

    def iter_block_weight_grads(self, ids: np.ndarray, *, recompute: bool | None = None,
                                weight_grads: bool = True, norm_grads: bool = False,
                                losses: list | None = None):
        """The same gradients as :meth:`weight_grads`, yielded one block at a time from the last
        block to the first as ``(block, {name: dW})``, so that a caller that consumes each block's
        gradients (the Fisher estimator of M) holds one block's worth, not the model's: for a
        7B LLaMA that is 0.8 GB instead of 26 GB. ``recompute``: as weight_grads, but chosen
        when all blocks' activations would exceed 1 GiB. ``norm_grads``: each block's dict also
        holds its RMSNorm weights' gradients (:meth:`block_backward`), after a first item
        ``("head", {"model.norm.weight": dw})``; ``weight_grads=False`` leaves the linears out;
        ``losses``: a list that receives the per-sequence losses (float64 ``(B,)``) before the
        first item (end-to-end tuning, :mod:`hiquant.e2e`, needs all three)."""
        return self._block_weight_grads(ids, recompute, 1 << 30, weight_grads=weight_grads,
                                        norm_grads=norm_grads, losses=losses)

    def _block_weight_grads(self, ids: np.ndarray, recompute: bool | None, limit: int, **kw):
        ids = self.check_ids(ids, min_len=2)
        B, T = ids.shape
        if recompute is None:
            recompute = B * self.activation_bytes(T) * self.num_blocks > limit
        return self._backward_blocks(ids, recompute, **kw)

    def _backward_blocks(self, ids: np.ndarray, recompute: bool, *, weight_grads: bool = True,
                         norm_grads: bool = False, losses: list | None = None):
        B = ids.shape[0]
        h = self.embed(ids)
        saved = []
        for i in range(self.num_blocks):
            if recompute:
                saved.append(h)
                h = self.block_forward(i, h)
            else:
                h, cch = self.block_forward(i, h, cache=True)
                saved.append(cch)
        out = self.head_loss(h, ids, grad=True, norm_grad=norm_grads)
        dh = out[1]
        if losses is not None:
            losses.append(out[0])
        if B > 1:
            dh /= B
        if norm_grads:
            yield "head", {k: v / B for k, v in out[2].items()}
        for i in reversed(range(self.num_blocks)):
            cch = saved[i]
            if recompute:
                _, cch = self.block_forward(i, cch, cache=True)
            saved[i] = None
            dh, g = self.block_backward(i, cch, dh, weight_grads=weight_grads,
                                        norm_grads=norm_grads)
            yield i, g


def _layer_shape(o) -> tuple[int, int]:
    """(d_out, d_in) of an array or a quantized layer."""
    if isinstance(o, np.ndarray):
        return tuple(o.shape)
    return (int(o.d_out), int(o.d_in))


def _override_array(o, dtype) -> np.ndarray:
    """A fresh array of a set_weight override: an array, or a quantized layer dequantized now."""
    if isinstance(o, np.ndarray):
        return o.astype(dtype, copy=True)
    W = o.dequantize()
    return W.astype(dtype, copy=False) if W.dtype != dtype else W


def load_model(path, *, compute_dtype="float32", weight_cache_bytes: int = 1 << 30,
               load_tokenizer: bool = True, linear_source: Mapping | None = None,
               packed_kernels: bool = False) -> Model:
    """Load a Hugging Face checkpoint folder (see the module docstring for what is supported).

    ``compute_dtype`` "float32" (default) or "float64" (for gradient checks). Weights stay
    memory-mapped in their stored dtype; ``weight_cache_bytes`` bounds the expanded copies kept
    between calls. Raises CheckpointError on anything missing, malformed or inconsistent.

    ``linear_source``: linear weights taken from elsewhere than the folder's safetensors files,
    a mapping linear name (``model.layers.0.self_attn.q_proj``) → a float array ``(d_out, d_in)``
    or a quantized layer (``d_out``, ``d_in`` and an exact ``dequantize()``, e.g.
    :class:`hiquant.storage.QuantizedLayer`, or a lazy stand-in decoding on demand). Those
    layers' ``NAME.weight`` need not be stored, and other tensors stored under ``NAME.`` belong
    to the source and are not read (biases still are); the given weights are the model's own
    (``get_weight(original=True)``, ``reset_weight`` go back to them) and are dequantized each
    time a block's weights are expanded (the weight cache keeps them). The packed reader
    (:func:`hiquant.packed.load_packed`) loads through this.

    ``packed_kernels``: the forward pass multiplies by the ``linear_source`` layers that offer
    an ``operator()`` (an object with ``d_out``, ``d_in``, ``nbytes`` and ``matmul(X)`` =
    ``X @ W.T``, e.g. :class:`hiquant.packed_matmul.PackedLinear`) through it instead of through
    a dequantized float copy, and by the other linears stored in float16 on hiquant's FP16
    kernel (the mapped values, no float32 copy); the decode steps (:meth:`Model.forward_cached`)
    multiply a float16 output matrix the same way. The weight cache then holds the operators
    (for the packed reader, the packed bytes), q/k/v and gate/up as
    :class:`hiquant.packed_matmul.RowStack`. Layers replaced by :meth:`Model.set_weight`,
    backward passes and :meth:`Model.get_weight` use the dense weights as before; a float64
    model ignores the option.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder; pass a Hugging Face checkpoint folder "
                              "holding config.json and model.safetensors")
    cd = np.dtype(compute_dtype)
    if cd not in (np.float32, np.float64):
        raise InvalidArgumentError(f"compute_dtype must be float32 or float64, got {cd}")
    if not isinstance(packed_kernels, bool):
        raise InvalidTypeError(f"packed_kernels must be True or False, got {packed_kernels!r}")
    if isinstance(weight_cache_bytes, bool) or not isinstance(weight_cache_bytes, int) \
            or weight_cache_bytes < 0:
        raise InvalidArgumentError(f"weight_cache_bytes must be a non-negative int, got "
                                   f"{weight_cache_bytes!r}")
    source = {}
    if linear_source is not None:
        if not isinstance(linear_source, Mapping):
            raise InvalidTypeError(f"linear_source must be a mapping of linear name → weight, "
                                   f"got {type(linear_source).__name__}")
        for name, o in linear_source.items():
            if not (isinstance(o, np.ndarray) and o.ndim == 2 and o.dtype in (np.float32, cd)) \
                    and not (callable(getattr(o, "dequantize", None))
                             and hasattr(o, "d_out") and hasattr(o, "d_in")):
                raise InvalidTypeError(f"linear_source[{name!r}] must be a float32 array "
                                       "(d_out, d_in) or a quantized layer with d_out, d_in and "
                                       f"dequantize(), got {type(o).__name__}")
            source[name] = o
    cfg_path = folder / "config.json"
    raw = load_json(cfg_path, "config.json")
    cfg = parse_config(raw, cfg_path)
    files, where = open_weights(folder)
    where = check_tensors(folder, cfg, where,
                          provided={n: _layer_shape(o) for n, o in source.items()})
    lin = f"model.layers.0.{LINEAR_SUFFIXES[0]}.weight"
    if lin in where:
        src = STORED_DTYPES[where[lin].tensors[lin].dtype]
    else:  # the linears come from the source: the dtype the checkpoint was saved from
        src = str(raw.get("dtype") or raw.get("torch_dtype") or "float16")
    cfg = dataclasses.replace(cfg, source_dtype=src)

    tok = None
    tp = folder / "tokenizer.json"
    if load_tokenizer and tp.exists():
        try:
            from tokenizers import Tokenizer
            tok = Tokenizer.from_file(str(tp))
        except Exception as e:  # tokenizers raises its own Exception type
            raise CheckpointError(f"{tp}: cannot load the tokenizer ({e}); fix or re-download it") from e
    return Model(folder, cfg, files, where, tok, cd, weight_cache_bytes, linear_source=source,
                 packed_kernels=packed_kernels)
