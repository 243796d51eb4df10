"""The PyTorch model runtime: transformers' own decoder layers, one layer's weights at a time.

:class:`TorchModel` implements :class:`hiquant.runtime.ModelRuntime` with the model class
transformers maps the checkpoint's ``config.json`` to (``AutoConfig`` + ``AutoModelForCausalLM``
built on the ``meta`` device: a skeleton without storage). Each decoder layer is a copy of the
skeleton's layer, materialized on ``device`` and filled from the safetensors files
(:func:`hiquant.checkpoint.open_weights`, memory-mapped) only when it runs, so that peak device
and host memory is about one decoder layer (plus the ``weight_cache_bytes`` of built layers kept
for reuse, default 1 GiB), the lm_head and the activations; the whole model is never loaded.

Supported: causal LMs whose decoder layers form a list ``model.layers`` with the seven separate
projections ``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj`` and that need nothing
but rotary position embeddings and a causal mask (:data:`SUPPORTED_MODEL_TYPES`: Llama, Mistral,
Qwen2, Qwen3, Gemma). Phi-3 (fused ``qkv_proj``/``gate_up_proj``) and the Gemma 2/3 families
(alternating sliding windows, soft-capping) are refused with a CheckpointError.

torch and transformers are optional (``pip install hiquant[torch]``): ``import hiquant`` never
imports this module; :func:`load_torch_model` does, and raises a HiquantError saying what to
install when they are missing. The device is ``"cpu"``, ``"cuda"`` or ``"cuda:N"``. Every member
takes and returns NumPy arrays as the protocol says; tensors cross to the host at those
boundaries only.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from .checkpoint import (
    LINEAR_SUFFIXES,
    STORED_DTYPES,
    ModelConfig,
    SourceTensor,
    expand_tensor,
    file_digest,
    load_json,
    open_weights,
    parse_config,
)
from .errors import CheckpointError, HiquantError, InvalidArgumentError, InvalidTypeError, NumericalError

__all__ = ["TorchModel", "TorchBlockCache", "load_torch_model", "SUPPORTED_MODEL_TYPES",
           "torch_available", "cuda_device_count"]

#: transformers ``model_type`` values whose decoder layers this runtime drives.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma")


def torch_available() -> bool:
    """Whether torch and transformers can be imported (without importing them)."""
    import importlib.util
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


def cuda_device_count() -> int:
    """CUDA GPUs torch sees; 0 without torch or (on Linux) without a loaded NVIDIA driver, in
    which cases torch is not imported."""
    import os
    import sys
    if not torch_available():
        return 0
    if sys.platform.startswith("linux") and not os.path.exists("/proc/driver/nvidia/version"):
        return 0
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _import_torch():
    try:
        import torch
        import transformers
    except ImportError as e:
        raise HiquantError(f"the torch backend needs torch and transformers ({e}); install them "
                           "with `pip install hiquant[torch]` or use backend='numpy'") from e
    return torch, transformers


def _is_int_array(a) -> bool:
    return isinstance(a, np.ndarray) and np.issubdtype(a.dtype, np.integer)


def _layer_shape(o) -> tuple[int, int]:
    if isinstance(o, np.ndarray):
        return tuple(o.shape)
    return (int(o.d_out), int(o.d_in))


def _override_array(o, dtype) -> np.ndarray:
    if isinstance(o, np.ndarray):
        return o.astype(dtype, copy=True)
    W = o.dequantize()
    return W.astype(dtype, copy=False) if W.dtype != dtype else W


class TorchBlockCache:
    """A block's forward graph, kept for one :meth:`TorchModel.block_backward`."""

    __slots__ = ("block", "shape", "h", "out", "layer", "used")


class _Built:
    """A decoder layer materialized on the device, with its byte size (for the LRU)."""

    __slots__ = ("layer", "nbytes", "linears")


class TorchModel:
    """A checkpoint run by transformers' decoder layers on ``device``. Build it with
    :func:`load_torch_model`; members as :class:`hiquant.runtime.ModelRuntime` documents them."""

    def __init__(self, path, config: ModelConfig, hf_config, skeleton, files: dict, where: dict,
                 tokenizer, compute_dtype, device: str, weight_cache_bytes: int,
                 linear_source: Mapping | None = None):
        torch, _ = _import_torch()
        self._torch = torch
        self.path = Path(path)
        self.config = config
        self.hf_config = hf_config
        self.tokenizer = tokenizer
        self.compute_dtype = np.dtype(compute_dtype)
        self._tdtype = {np.dtype(np.float32): torch.float32,
                        np.dtype(np.float64): torch.float64}[self.compute_dtype]
        self.device = torch.device(device)
        self.weight_cache_bytes = int(weight_cache_bytes)
        self._skeleton = skeleton
        self._base = getattr(skeleton, skeleton.base_model_prefix)
        self._files, self._where = files, where
        self._source = dict(linear_source) if linear_source is not None else {}
        self._overrides: dict = {}
        self._tensor_overrides: dict = {}  # norm weight name → float32 values (set_norm_weight)
        self._content_digests: dict = {}
        self._cache: OrderedDict = OrderedDict()
        self._cache_nbytes = 0
        self._lock = threading.RLock()
        self._head_cache = None
        self._names = [[f"model.layers.{i}.{s}" for s in LINEAR_SUFFIXES]
                       for i in range(config.num_layers)]
        self._index = {n: (i, j) for i, ns in enumerate(self._names) for j, n in enumerate(ns)}
        rot = self._base.rotary_emb
        with torch.device(self.device):  # inv_freq is computed in __init__, on the device
            self._rotary = type(rot)(config=hf_config)
        emb = self._base.embed_tokens
        scale = getattr(emb, "scalar_embed_scale", None)
        self._embed_scale = None if scale in (None, 1.0) else float(scale)

    # ---- structure

    @property
    def num_blocks(self) -> int:
        return self.config.num_layers

    def linear_names(self) -> list[str]:
        return [n for ns in self._names for n in ns]

    def block_linear_names(self, i: int) -> list[str]:
        return list(self._names[self._check_block(i)])

    def linear_shape(self, name: str) -> tuple[int, int]:
        self._check_name(name)
        if name in self._source:
            return _layer_shape(self._source[name])
        return tuple(self._where[name + ".weight"].tensors[name + ".weight"].shape)

    def input_groups(self, i: int) -> list[list[str]]:
        q, k, v, o, gate, up, down = self.block_linear_names(i)
        return [[q, k, v], [o], [gate, up], [down]]

    def __repr__(self) -> str:
        c = self.config
        return (f"TorchModel({str(self.path)!r}, {c.arch}, {c.num_layers} blocks, hidden "
                f"{c.hidden_size}, device {self.device}, compute {self.compute_dtype.name})")

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

    def _array(self, name: str, dtype=None) -> np.ndarray:
        if name in self._tensor_overrides:
            return self._tensor_overrides[name].astype(dtype or self.compute_dtype)
        f = self._where[name]
        return expand_tensor(f.array(name), f.tensors[name].dtype, dtype or self.compute_dtype)

    def _tensor(self, a: np.ndarray):
        return self._torch.from_numpy(np.ascontiguousarray(a)).to(self.device, self._tdtype)

    def get_weight(self, name: str, *, original: bool = False) -> np.ndarray:
        self._check_name(name)
        if not original and name in self._overrides:
            return _override_array(self._overrides[name], np.float32)
        if name in self._source:
            return _override_array(self._source[name], np.float32)
        return self._array(name + ".weight", np.float32)

    def set_weight(self, name: str, W) -> None:
        i, _ = self._check_name(name)
        shape = self.linear_shape(name)
        if not isinstance(W, np.ndarray) and callable(getattr(W, "dequantize", None)):
            got = (getattr(W, "d_out", None), getattr(W, "d_in", None))
            if got != shape:
                raise InvalidArgumentError(f"the quantized layer has shape {got} but {name} has "
                                           f"{shape}")
            self._overrides[name] = W
            self._evict(i)
            return
        self._overrides[name] = np.array(self._check_weight(name, W), order="C", copy=True)
        self._evict(i)

    def _check_weight(self, name: str, W) -> np.ndarray:
        """``W`` as a weight of linear ``name`` (float32 or the compute dtype, its shape, finite)."""
        shape = self.linear_shape(name)
        if not isinstance(W, np.ndarray):
            raise InvalidTypeError(f"W must be a numpy.ndarray of float32, got {type(W).__name__}")
        if W.dtype != np.float32 and W.dtype != self.compute_dtype:
            raise InvalidTypeError(f"W must have dtype float32, got {W.dtype}; convert it with "
                                   "W.astype(numpy.float32)")
        if W.shape != shape:
            raise InvalidArgumentError(f"W has shape {W.shape} but {name} has {shape}; pass a "
                                       "weight of the same layer")
        if not np.isfinite(W).all():
            raise NumericalError(f"W for {name} contains NaN or Inf")
        return W

    def reset_weight(self, name: str) -> None:
        i, _ = self._check_name(name)
        if self._overrides.pop(name, None) is not None:
            self._evict(i)

    def reset_weights(self) -> None:
        for name in list(self._overrides):
            self.reset_weight(name)
        for name in list(self._tensor_overrides):
            del self._tensor_overrides[name]
            self._evict_tensor(name)

    # ---- equivalent transforms (AWQ, SmoothQuant): as the NumPy runtime

    def _check_norm(self, name) -> None:
        if not isinstance(name, str) or name not in self._where or not name.endswith("norm.weight") \
                or len(self._where[name].tensors[name].shape) != 1:
            raise KeyError(f"{name!r} is not a norm weight of this model (e.g. "
                           "'model.layers.0.input_layernorm.weight', 'model.norm.weight')")

    def _evict_tensor(self, name: str) -> None:
        parts = name.split(".")
        if len(parts) > 3 and parts[1] == "layers":
            self._evict(int(parts[2]))
        else:
            with self._lock:
                self._head_cache = None

    def modified_weights(self) -> list[str]:
        return [n for n in self.linear_names() if n in self._overrides]

    # ---- equivalent transforms and activation quantization (issue 20): the NumPy runtime's

    def _numpy_only(self, what: str):
        from .errors import InvalidArgumentError
        raise InvalidArgumentError(f"{what} runs on the NumPy runtime; pass backend='numpy' "
                                   "(--backend numpy)")

    def input_scalers(self, i: int) -> list:
        self._numpy_only("awq's and smoothquant's equivalent transform")

    def get_norm_weight(self, name: str) -> np.ndarray:
        self._numpy_only("awq's and smoothquant's equivalent transform")

    def set_norm_weight(self, name: str, w: np.ndarray) -> None:
        self._numpy_only("awq's and smoothquant's equivalent transform")

    def modified_tensors(self) -> dict:
        return {}  # set_norm_weight is the NumPy runtime's only

    @property
    def activation_bits(self) -> int | None:
        return None

    def set_activation_bits(self, bits) -> None:
        from .config import check_abits
        if check_abits(bits) is not None:
            self._numpy_only("activation quantization (abits)")

    def _evict(self, key) -> None:
        with self._lock:
            item = self._cache.pop(key, None)
            if item is not None:
                self._cache_nbytes -= item.nbytes

    def clear_weight_cache(self) -> None:
        with self._lock:
            self._cache.clear()
            self._cache_nbytes = 0
            self._head_cache = None

    def _linear_array(self, name: str) -> np.ndarray:
        if name in self._overrides:
            return _override_array(self._overrides[name], self.compute_dtype)
        if name in self._source:
            return _override_array(self._source[name], self.compute_dtype)
        return self._array(name + ".weight")

    def _layer(self, i: int) -> _Built:
        """Decoder layer ``i`` on the device (built from the files, or the LRU's copy)."""
        with self._lock:
            item = self._cache.get(i)
            if item is not None:
                self._cache.move_to_end(i)
                return item
            item = self._build(i)
            if item.nbytes <= self.weight_cache_bytes:
                while self._cache and self._cache_nbytes + item.nbytes > self.weight_cache_bytes:
                    _, old = self._cache.popitem(last=False)
                    self._cache_nbytes -= old.nbytes
                self._cache[i] = item
                self._cache_nbytes += item.nbytes
            return item

    def _build(self, i: int) -> _Built:
        torch = self._torch
        layer = copy.deepcopy(self._base.layers[i])
        layer.to_empty(device=self.device)
        layer.to(self._tdtype)
        pre = f"model.layers.{i}."
        linears = {}
        with torch.no_grad():
            for pname, p in layer.named_parameters():
                stem = pre + pname[:-len(".weight")] if pname.endswith(".weight") else None
                if stem in self._index:
                    a = self._linear_array(stem)
                    linears[stem] = dict(layer.named_modules())[pname[:-len(".weight")]]
                else:
                    a = self._array(pre + pname)
                p.copy_(torch.from_numpy(a).reshape(p.shape))
                p.requires_grad_(stem in self._index)
        b = _Built()
        b.layer = layer.eval()
        b.linears = [linears[n] for n in self._names[i]]
        b.nbytes = sum(p.numel() * p.element_size() for p in layer.parameters())
        return b

    def _head(self):
        """(final norm module, lm_head weight) on the device."""
        with self._lock:
            if self._head_cache is None:
                torch = self._torch
                norm = copy.deepcopy(self._base.norm)
                norm.to_empty(device=self.device)
                norm.to(self._tdtype)
                with torch.no_grad():
                    for pname, p in norm.named_parameters():
                        p.copy_(torch.from_numpy(self._array("model.norm." + pname)).reshape(p.shape))
                        p.requires_grad_(False)
                src = ("model.embed_tokens.weight" if self.config.tie_word_embeddings
                       else "lm_head.weight")
                self._head_cache = (norm.eval(), self._tensor(self._array(src)))
            return self._head_cache

    # ---- validation and sizing

    def check_ids(self, ids, name: str = "ids", min_len: int = 1) -> np.ndarray:
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

    def check_seqlen(self, T: int) -> None:
        w = self.config.sliding_window
        if w is not None and T > w:
            raise InvalidArgumentError(
                f"sequences of {T} tokens exceed this checkpoint's sliding attention window of {w}; "
                f"hiquant does not implement sliding-window attention, use seqlen <= {w}")

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

    def activation_bytes(self, T: int) -> int:
        """The NumPy runtime's estimate (same formula, so both size batches alike and produce
        the same chunking, hence comparable results)."""
        c = self.config
        nq, nkv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        return self.compute_dtype.itemsize * T * (
            c.num_heads * T + 4 * c.hidden_size + 3 * (nq + 2 * nkv) + 5 * c.intermediate_size)

    def auto_batch(self, T: int, budget: int = 128 << 20) -> int:
        return max(1, min(-(-512 // T), budget // self.activation_bytes(T)))

    # ---- passes

    def embed(self, ids: np.ndarray) -> np.ndarray:
        ids = self.check_ids(ids)
        self.check_seqlen(ids.shape[1])
        name = "model.embed_tokens.weight"
        f = self._where[name]
        rows = f.array(name)[ids.reshape(-1)]
        out = expand_tensor(rows, f.tensors[name].dtype, self.compute_dtype)
        if self._embed_scale is not None:  # Gemma: embeddings * sqrt(hidden) in the weight dtype
            out *= np.float32(self._embed_scale).astype(self.compute_dtype)
        return out.reshape(ids.shape[0], ids.shape[1], self.config.hidden_size)

    def _run_layer(self, built: _Built, x, params: dict | None = None):
        """The decoder layer on ``x``; ``params``: ``{parameter path: tensor}`` used instead of
        the layer's own for this call (``torch.func.functional_call``)."""
        torch = self._torch
        B, T, _ = x.shape
        pos = torch.arange(T, device=self.device).unsqueeze(0).expand(B, T)
        cos, sin = self._rotary(x, pos)
        kw = dict(attention_mask=None, position_ids=pos, position_embeddings=(cos, sin))
        if params:
            return torch.func.functional_call(built.layer, params, (x,), kw)
        return built.layer(x, **kw)

    def _call_params(self, i: int, weights) -> dict:
        """``{name: W}`` of block ``i``'s linears as functional_call's parameter dict."""
        if not hasattr(weights, "items"):
            raise InvalidTypeError(f"weights must be a mapping {{name: W}}, got "
                                   f"{type(weights).__name__}")
        pre = f"model.layers.{i}."
        out = {}
        for name, W in weights.items():
            b, _ = self._check_name(name)
            if b != i:
                raise InvalidArgumentError(f"{name!r} is not a linear layer of block {i} (it is "
                                           f"one of block {b})")
            W = self._check_weight(name, W)
            out[name[len(pre):] + ".weight"] = self._torch.from_numpy(
                np.ascontiguousarray(W, self.compute_dtype)).to(self.device)
        return out

    def block_forward(self, i: int, h: np.ndarray, *, cache: bool = False,
                      capture: Callable[[str, np.ndarray], None] | None = None,
                      weights: Mapping[str, np.ndarray] | None = None):
        """As :meth:`hiquant.model.Model.block_forward`; ``weights`` (``{name: W}`` for some of
        block ``i``'s linears) are used in this call only (the model is not changed; not with
        ``cache=True``), so the measured sensitivity matrix evaluates its perturbations without
        set_weight's rebuild of the layer."""
        i = self._check_block(i)
        h = self._check_h(h)
        self.check_seqlen(h.shape[1])
        torch = self._torch
        if weights and cache:
            raise InvalidArgumentError("weights= is for forward passes only (cache=False)")
        params = self._call_params(i, weights) if weights else None
        with self._lock:  # one layer module shared by every caller: its passes run one at a time
            built = self._layer(i)
            handles = []
            if capture is not None:
                seen: dict = {}

                def hook_for(name):
                    def hook(module, args):
                        x = args[0]
                        key = (x.data_ptr(), tuple(x.shape))
                        if key not in seen:
                            X = x.detach().reshape(-1, x.shape[-1]).contiguous()
                            seen[key] = X.cpu().numpy() if X.device.type != "cpu" else X.numpy()
                        capture(name, seen[key])
                    return hook

                for name, lin in zip(self._names[i], built.linears):
                    handles.append(lin.register_forward_pre_hook(hook_for(name)))
            try:
                x = torch.from_numpy(np.ascontiguousarray(h)).to(self.device)
                if not cache:
                    with torch.no_grad():
                        out = self._run_layer(built, x, params)
                    return self._numpy(out)
                with torch.enable_grad():
                    x.requires_grad_(True)
                    out = self._run_layer(built, x)
            finally:
                for hd in handles:
                    hd.remove()
        cch = TorchBlockCache()
        cch.block, cch.shape, cch.h, cch.out, cch.layer, cch.used = i, h.shape[:2], x, out, built, False
        return self._numpy(out), cch

    def _numpy(self, t) -> np.ndarray:
        t = t.detach()
        if t.device.type != "cpu":
            return t.cpu().numpy()
        return t.clone().numpy() if t.requires_grad else t.numpy()

    # ---- device passes (hiquant.runtime.DeviceRuntime): hidden states stay on the device

    def _check_ht(self, h, name="h"):
        torch = self._torch
        if not isinstance(h, torch.Tensor):
            raise InvalidTypeError(f"{name} must be a torch.Tensor on {self.device}, got "
                                   f"{type(h).__name__}; convert it with model.to_device(h)")
        if h.dtype != self._tdtype or h.device != self.device:
            raise InvalidTypeError(f"{name} must be a {self.compute_dtype} tensor on {self.device}, "
                                   f"got {str(h.dtype)[6:]} on {h.device}")
        if h.dim() != 3 or h.shape[2] != self.config.hidden_size or h.shape[0] < 1 \
                or h.shape[1] < 1:
            raise InvalidArgumentError(f"{name} must have shape (batch, seqlen, "
                                       f"{self.config.hidden_size}), got {tuple(h.shape)}")
        return h

    def to_device(self, h: np.ndarray):
        return self._torch.from_numpy(np.ascontiguousarray(self._check_h(h))).to(self.device)

    def to_host(self, h) -> np.ndarray:
        return self._numpy(self._check_ht(h))

    def embed_device(self, ids: np.ndarray):
        return self._torch.from_numpy(self.embed(ids)).to(self.device)

    def block_forward_device(self, i: int, h, *, capture=None, cache: bool = False):
        i = self._check_block(i)
        h = self._check_ht(h)
        self.check_seqlen(h.shape[1])
        torch = self._torch
        with self._lock:
            built = self._layer(i)
            handles = []
            if capture is not None:
                seen: dict = {}  # holds each captured input until the pass ends

                def hook_for(name):
                    def hook(module, args):
                        x = args[0]
                        key = (x.data_ptr(), tuple(x.shape))
                        if key not in seen:
                            seen[key] = x.detach().reshape(-1, x.shape[-1])
                        capture(name, seen[key])
                    return hook

                for name, lin in zip(self._names[i], built.linears):
                    handles.append(lin.register_forward_pre_hook(hook_for(name)))
            try:
                if not cache:
                    with torch.no_grad():
                        return self._run_layer(built, h)
                with torch.enable_grad():
                    x = h.detach().requires_grad_(True)
                    out = self._run_layer(built, x)
            finally:
                for hd in handles:
                    hd.remove()
        cch = TorchBlockCache()
        cch.block, cch.shape, cch.h, cch.out, cch.layer, cch.used = (i, tuple(h.shape[:2]), x, out,
                                                                     built, False)
        return out.detach(), cch

    def _check_cache(self, i: int, cache) -> None:
        if not isinstance(cache, TorchBlockCache) or cache.block != i:
            raise InvalidArgumentError(f"cache must be the TorchBlockCache returned by "
                                       f"block_forward({i}, ..., cache=True)")
        if cache.used:
            raise InvalidArgumentError("this block cache was already used by block_backward; run "
                                       "block_forward(..., cache=True) again")

    def _grads(self, i: int, cache, dy, weight_grads: bool):
        """(dh_in, [dW or None per linear]) as device tensors; uses up the cache."""
        torch = self._torch
        lins = cache.layer.linears
        inputs = [cache.h] + ([lin.weight for lin in lins] if weight_grads else [])
        with self._lock:
            gs = torch.autograd.grad(cache.out, inputs, grad_outputs=dy, allow_unused=True)
        cache.used, cache.out, cache.h = True, None, None
        return gs[0], list(gs[1:])

    def block_backward_device(self, i: int, cache, dh_out):
        i = self._check_block(i)
        self._check_cache(i, cache)
        dh_out = self._check_ht(dh_out, "dh_out")
        if tuple(dh_out.shape[:2]) != tuple(cache.shape):
            raise InvalidArgumentError(f"dh_out has shape {tuple(dh_out.shape)} but the cached "
                                       f"forward ran on {tuple(cache.shape)}")
        dh, gs = self._grads(i, cache, dh_out, True)
        grads = {}
        for name, lin, g in zip(self._names[i], cache.layer.linears, gs):
            grads[name] = self._torch.zeros_like(lin.weight) if g is None else g
        return dh, grads

    def head_loss_device(self, h, ids: np.ndarray, *, grad: bool = False):
        h = self._check_ht(h)
        ids = self.check_ids(ids, min_len=2)
        if tuple(h.shape[:2]) != ids.shape:
            raise InvalidArgumentError(f"h has shape {tuple(h.shape)} but ids has {ids.shape}")
        return self._head_loss(h, ids, grad)

    def block_backward(self, i: int, cache, dh_out: np.ndarray, *, weight_grads: bool = True):
        i = self._check_block(i)
        self._check_cache(i, cache)
        dh_out = self._check_h(dh_out, "dh_out")
        B, T = cache.shape
        if dh_out.shape[:2] != (B, T):
            raise InvalidArgumentError(f"dh_out has shape {dh_out.shape} but the cached forward "
                                       f"ran on ({B}, {T}, {self.config.hidden_size})")
        torch = self._torch
        lins = cache.layer.linears
        dy = torch.from_numpy(np.ascontiguousarray(dh_out)).to(self.device)
        dh, gs = self._grads(i, cache, dy, weight_grads)
        dh = self._numpy(dh)
        grads = {}
        if weight_grads:
            for name, lin, g in zip(self._names[i], lins, gs):
                grads[name] = (np.zeros(tuple(lin.weight.shape), self.compute_dtype) if g is None
                               else np.ascontiguousarray(self._numpy(g)))
        return dh, grads

    def head_loss(self, h: np.ndarray, ids: np.ndarray, *, grad: bool = False):
        h = self._check_h(h)
        ids = self.check_ids(ids, min_len=2)
        if h.shape[:2] != ids.shape:
            raise InvalidArgumentError(f"h has shape {h.shape} but ids has {ids.shape}")
        out = self._head_loss(self._torch.from_numpy(np.ascontiguousarray(h)).to(self.device),
                              ids, grad)
        return (out[0], self._numpy(out[1])) if grad else out

    def _head_loss(self, x, ids: np.ndarray, grad: bool):
        """head_loss on a device tensor ``x``: losses (NumPy float64) and, with ``grad``, the
        device gradient."""
        B, T = ids.shape
        torch = self._torch
        F = torch.nn.functional
        norm, W = self._head()
        ids_t = torch.from_numpy(ids.astype(np.int64)).to(self.device)
        tt = ids_t[:, 1:].reshape(-1)
        chunk = max(1, (32768 * 1024) // W.shape[0])
        with self._lock, torch.enable_grad():
            x = x.detach().requires_grad_(grad)
            y = norm(x)
            yy = y.detach()[:, :-1].reshape(-1, y.shape[-1])
            yy.requires_grad_(grad)
            per_pos = torch.empty(yy.shape[0], dtype=torch.float64, device=self.device)
            dyy = torch.zeros_like(yy) if grad else None
            for s0 in range(0, yy.shape[0], chunk):
                with torch.set_grad_enabled(grad):
                    lg = yy[s0:s0 + chunk] @ W.T
                    lp = F.cross_entropy(lg, tt[s0:s0 + chunk], reduction="none")
                per_pos[s0:s0 + lp.shape[0]] = lp.detach().double()
                if grad:
                    g, = torch.autograd.grad(lp.sum() / (T - 1), yy)
                    dyy += g
            losses = per_pos.reshape(B, T - 1).mean(dim=1).cpu().numpy()
            if not grad:
                return losses
            dy = torch.zeros_like(y)
            dy[:, :-1] = dyy.reshape(B, T - 1, -1)
            dx, = torch.autograd.grad(y, x, grad_outputs=dy)
        return losses, dx

    def forward(self, ids: np.ndarray) -> np.ndarray:
        """Hidden states after the last block (before the final norm), (B, T, hidden)."""
        h = self.embed(ids)
        for i in range(self.num_blocks):
            h = self.block_forward(i, h)
        return h

    def sequence_losses(self, ids: np.ndarray, *, batch_size: int | None = None,
                        n_threads: int | None = None, progress=None) -> np.ndarray:
        """Layer by layer (each decoder layer built once), chunks of ``batch_size`` sequences per
        pass; ``n_threads`` is accepted for the protocol (torch picks its own intra-op threads)."""
        ids = self.check_ids(ids, min_len=2)
        bs = batch_size or self.auto_batch(ids.shape[1])
        if isinstance(bs, bool) or not isinstance(bs, (int, np.integer)) or bs < 1:
            raise InvalidArgumentError(f"batch_size must be a positive int, got {batch_size!r}")
        self.check_seqlen(ids.shape[1])
        starts = range(0, ids.shape[0], bs)
        hs = [self.embed(ids[b0:b0 + bs]) for b0 in starts]
        for i in range(self.num_blocks):
            hs = [self.block_forward(i, h) for h in hs]
        out = []
        for b0, h in zip(starts, hs):
            out.append(self.head_loss(h, ids[b0:b0 + bs]))
            if progress is not None:
                progress(len(out[-1]))
        return np.concatenate(out)

    def logits(self, ids: np.ndarray) -> np.ndarray:
        ids = self.check_ids(ids)
        h = self.forward(ids)
        torch = self._torch
        norm, W = self._head()
        with torch.no_grad():
            y = norm(torch.from_numpy(h).to(self.device))
            return self._numpy(y @ W.T)

    def weight_grads(self, ids: np.ndarray, *, recompute: bool | None = None) -> dict:
        grads = {}
        for _, g in self.iter_block_weight_grads(ids, recompute=recompute):
            grads.update(g)
        return {n: grads[n] for n in self.linear_names()}

    def iter_block_weight_grads(self, ids: np.ndarray, *, recompute: bool | None = None):
        ids = self.check_ids(ids, min_len=2)
        B, T = ids.shape
        if recompute is None:
            recompute = B * self.activation_bytes(T) * self.num_blocks > (1 << 30)
        return self._backward_blocks(ids, bool(recompute))

    def _backward_blocks(self, ids: np.ndarray, recompute: bool):
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
        _, dh = self.head_loss(h, ids, grad=True)
        if B > 1:
            dh /= B
        for i in reversed(range(self.num_blocks)):
            cch = saved[i]
            if recompute:
                _, cch = self.block_forward(i, cch, cache=True)
            saved[i] = None
            dh, g = self.block_backward(i, cch, dh)
            yield i, g

    # ---- identity and tensor source

    def fingerprint(self) -> dict:
        """The NumPy runtime's fingerprint: config hash and per-file content hashes."""
        files = {}
        for fname, f in sorted(self._files.items()):
            st = f.path.stat()
            memo_key = (str(f.path), st.st_size, st.st_mtime_ns, st.st_ino)
            if memo_key not in self._content_digests:
                self._content_digests[memo_key] = file_digest(f.path)
            files[fname] = {"size": st.st_size, "sha256": self._content_digests[memo_key]}
        return {"config_sha256": self.config.fingerprint(), "files": files}

    def source_tensors(self) -> list[SourceTensor]:
        out = []
        for name, f in self._where.items():
            t = f.tensors[name]
            out.append(SourceTensor(name, t.dtype, tuple(t.shape), (lambda f=f, n=name: f.raw(n))))
        for stem, o in self._source.items():
            out.append(SourceTensor(stem + ".weight", "F32", _layer_shape(o),
                                    (lambda o=o: _override_array(o, np.float32))))
        return sorted(out, key=lambda t: t.name)


# --------------------------------------------------------------------------------------------
# loading


def _model_config(raw: dict, hf, path, src_dtype: str) -> ModelConfig:
    """hiquant's ModelConfig: :func:`parse_config` for the architectures it knows, else built
    from transformers' config object."""
    arch = raw.get("architectures", [None])[0]
    try:
        return parse_config(raw, path, src_dtype)
    except CheckpointError:
        if arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                    "Qwen3ForCausalLM"):
            raise
    heads = hf.num_attention_heads
    hd = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    rp = getattr(hf, "rope_parameters", None) or {}
    theta = rp.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
    return ModelConfig(
        arch=arch, hidden_size=hf.hidden_size, num_layers=hf.num_hidden_layers, num_heads=heads,
        num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads, head_dim=hd,
        intermediate_size=hf.intermediate_size, vocab_size=hf.vocab_size,
        rms_norm_eps=float(hf.rms_norm_eps), rope_theta=float(theta), rope_scaling=None,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        attention_bias=bool(getattr(hf, "attention_bias", False)), qk_norm=False,
        source_dtype=src_dtype, sliding_window=None,
        max_position_embeddings=int(getattr(hf, "max_position_embeddings", 2048)), raw=raw)


def _check_skeleton(folder, skeleton, where, provided: dict) -> dict:
    """Every parameter of the skeleton stored with its shape (F32/F16/BF16) and nothing else;
    returns ``where`` less the tensors of provided (linear_source) layers."""
    prefixes = tuple(stem + "." for stem in provided)
    expected = {n: tuple(p.shape) for n, p in skeleton.named_parameters()}
    own = {n: f for n, f in where.items()
           if not (n.startswith(prefixes) and (n not in expected or n.endswith(".weight")))}
    for name, shape in expected.items():
        if name.endswith(".weight") and name[:-len(".weight")] in provided:
            if tuple(provided[name[:-len(".weight")]]) != shape:
                raise CheckpointError(f"{folder}: layer '{name[:-7]}' has shape "
                                      f"{provided[name[:-7]]} but config.json implies {shape}")
            continue
        f = own.get(name)
        if f is None:
            raise CheckpointError(f"{folder}: tensor '{name}' is missing from the checkpoint; the "
                                  "weights do not match config.json")
        e = f.tensors[name]
        if e.dtype not in STORED_DTYPES:
            raise CheckpointError(f"{f.path}: tensor '{name}' has dtype {e.dtype}; hiquant reads "
                                  "F32, F16 and BF16 weights (convert the checkpoint)")
        if tuple(e.shape) != shape:
            raise CheckpointError(f"{f.path}: tensor '{name}' has shape {tuple(e.shape)} but "
                                  f"config.json implies {shape}; the weights and config.json do "
                                  "not match")
    extra = sorted(n for n in own if n not in expected and not n.endswith("rotary_emb.inv_freq"))
    if extra:
        raise CheckpointError(f"{own[extra[0]].path}: unexpected tensor '{extra[0]}'; the "
                              "checkpoint does not match config.json")
    return own


def load_torch_model(path, *, compute_dtype="float32", weight_cache_bytes: int = 1 << 30,
                     load_tokenizer: bool = True, linear_source: Mapping | None = None,
                     device: str = "cpu") -> TorchModel:
    """Load a Hugging Face folder for the torch runtime (the :class:`~hiquant.runtime.ModelLoader`
    signature plus ``device``): the config and a storage-less skeleton of transformers' model
    class, the memory-mapped safetensors files checked against the skeleton's parameters; no
    weight is read until a layer runs."""
    torch, transformers = _import_torch()
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder; pass a Hugging Face checkpoint folder "
                              "holding config.json and model.safetensors")
    cd = np.dtype(compute_dtype)
    if cd not in (np.float32, np.float64):
        raise InvalidArgumentError(f"compute_dtype must be float32 or float64, got {cd}")
    if isinstance(weight_cache_bytes, bool) or not isinstance(weight_cache_bytes, int) \
            or weight_cache_bytes < 0:
        raise InvalidArgumentError(f"weight_cache_bytes must be a non-negative int, got "
                                   f"{weight_cache_bytes!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InvalidArgumentError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError(f"device {device!r} asked for, but torch sees no CUDA GPU; "
                                   "use device='cpu'")
    if dev.type not in ("cpu", "cuda"):
        raise InvalidArgumentError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    source = dict(linear_source or {})
    cfg_path = folder / "config.json"
    raw = load_json(cfg_path, "config.json")
    try:
        hf = transformers.AutoConfig.from_pretrained(str(folder))
    except (ValueError, KeyError, OSError) as e:
        raise CheckpointError(f"{cfg_path}: transformers cannot read this config ({e})") from e
    mt = getattr(hf, "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"{cfg_path}: model_type {mt!r} is not supported by the torch "
                              f"runtime (supported: {', '.join(SUPPORTED_MODEL_TYPES)}; Phi-3's "
                              "fused projections and Gemma 2/3 are not yet)")
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(
            hf, dtype=torch.float32 if cd == np.float32 else torch.float64,
            attn_implementation="sdpa")
    base = getattr(skeleton, skeleton.base_model_prefix, None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise CheckpointError(f"{cfg_path}: {type(skeleton).__name__} has no list of decoder "
                              "layers at model.layers")
    for s in LINEAR_SUFFIXES:
        if not isinstance(layers[0].get_submodule(s), torch.nn.Linear):
            raise CheckpointError(f"{cfg_path}: decoder layer has no linear {s}")
    files, where = open_weights(folder)
    where = _check_skeleton(folder, skeleton, where,
                            {n: _layer_shape(o) for n, o in source.items()})
    lin = f"model.layers.0.{LINEAR_SUFFIXES[0]}.weight"
    if lin in where:
        src = STORED_DTYPES[where[lin].tensors[lin].dtype]
    else:
        src = str(raw.get("dtype") or raw.get("torch_dtype") or "float16")
    cfg = dataclasses.replace(_model_config(raw, hf, cfg_path, src), source_dtype=src)
    tok = None
    tp = folder / "tokenizer.json"
    if load_tokenizer and tp.exists():
        try:
            from tokenizers import Tokenizer
            tok = Tokenizer.from_file(str(tp))
        except Exception as e:
            raise CheckpointError(f"{tp}: cannot load the tokenizer ({e}); fix or re-download it") from e
    return TorchModel(folder, cfg, hf, skeleton, files, where, tok, cd, str(dev),
                      weight_cache_bytes, linear_source=source)
