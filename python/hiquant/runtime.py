"""The model runtime protocol: everything hiquant's stages ask of a model, and nothing more.

The stages (calibration statistics, allocation, quantization, block-wise refinement, export,
evaluation) drive a model only through :class:`ModelRuntime`; they never touch a runtime's
private names (``tests/test_runtime.py`` checks both). :class:`hiquant.model.Model`, the NumPy
runtime, implements it; a PyTorch runtime on transformers' own decoder layers implements the
same members and plugs in unchanged.

A runtime is loaded by a function of the :class:`ModelLoader` shape (the NumPy runtime's is
:func:`hiquant.model.load_model`). Conventions every member follows:

* shapes: ``B`` sequences of ``T`` tokens, ``D`` = ``config.hidden_size``; hidden states are
  ``(B, T, D)`` arrays of the runtime's ``compute_dtype`` (float32; float64 for gradient checks);
  token ids are integer ndarrays ``(B, T)``;
* linear layers are named by their Hugging Face tensor stem without ``.weight``
  (``model.layers.0.self_attn.q_proj``); weights are ``(d_out, d_in)``; each block has seven,
  in the order q, k, v, o, gate, up, down;
* losses are per-sequence mean next-token cross-entropies in float64 (position t predicts
  ``ids[:, t + 1]``, no BOS);
* invalid input raises :class:`hiquant.errors.InvalidArgumentError` /
  :class:`~hiquant.errors.InvalidTypeError`; a bad model folder raises
  :class:`~hiquant.errors.CheckpointError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol, runtime_checkable

import numpy as np

from .checkpoint import ModelConfig, SourceTensor

__all__ = ["ModelRuntime", "DeviceRuntime", "ModelLoader"]


@runtime_checkable
class ModelRuntime(Protocol):
    """A loaded causal LM, as hiquant's stages use it (see the module docstring for shapes)."""

    #: The parsed ``config.json`` (:class:`hiquant.checkpoint.ModelConfig`).
    config: ModelConfig
    #: The folder the model was loaded from (exports copy ``config.json`` and tokenizer files).
    path: Path
    #: A ``tokenizers.Tokenizer`` (``encode(text).ids``), or None when the folder has none.
    tokenizer: Any
    #: numpy dtype of hidden states, activations and gradients (float32 or float64).
    compute_dtype: np.dtype

    # ---- structure

    @property
    def num_blocks(self) -> int:
        """Number of decoder blocks."""

    def linear_names(self) -> list[str]:
        """Every quantizable linear layer, block by block, q, k, v, o, gate, up, down."""

    def block_linear_names(self, i: int) -> list[str]:
        """The seven linear layers of block ``i`` (IndexError out of range)."""

    def linear_shape(self, name: str) -> tuple[int, int]:
        """``(d_out, d_in)`` of a linear layer, without reading its weight (KeyError if unknown)."""

    def input_groups(self, i: int) -> list[list[str]]:
        """Block ``i``'s linear layers grouped by shared input: ``[[q, k, v], [o], [gate, up],
        [down]]``. Layers of a group get the same array in ``block_forward``'s ``capture`` and
        share one Gram matrix."""

    # ---- weights

    def get_weight(self, name: str, *, original: bool = False) -> np.ndarray:
        """A fresh float32 C-contiguous ``(d_out, d_in)`` copy of a linear weight: the one set by
        :meth:`set_weight` unless ``original``, else the loaded one."""

    def set_weight(self, name: str, W) -> None:
        """Use ``W`` for this layer in later passes: a float32 ``(d_out, d_in)`` array (copied;
        NumericalError if not finite) or a quantized layer (``d_out``, ``d_in``, exact
        ``dequantize()``), kept as is and dequantized when the layer is used."""

    def reset_weight(self, name: str) -> None:
        """Go back to the loaded weight of one layer."""

    def reset_weights(self) -> None:
        """Go back to the loaded weights of every layer (and norm weights)."""

    def modified_weights(self) -> list[str]:
        """Names of the layers whose weight :meth:`set_weight` replaced, in model order."""

    # ---- equivalent transforms (AWQ, SmoothQuant fold per-channel scales into the model)

    def input_scalers(self, i: int) -> list:
        """Per :meth:`input_groups` group of block ``i``, the op whose output channel j is the
        group's input channel j up to a factor: an RMSNorm weight's tensor name (for q/k/v and
        gate/up), a linear layer's name (v_proj for o_proj, up_proj for down_proj: scale its
        rows), or None where no such op exists (e.g. v_proj under grouped-query attention)."""

    def get_norm_weight(self, name: str) -> np.ndarray:
        """A float32 copy of an RMSNorm weight tensor (``model.layers.0.input_layernorm.weight``)
        as currently used."""

    def set_norm_weight(self, name: str, w: np.ndarray) -> None:
        """Use ``w`` (float32) as that norm weight, rounded to its stored dtype; undone by
        :meth:`reset_weights`."""

    def modified_tensors(self) -> dict:
        """``{tensor name: float32 values}`` of the norm weights :meth:`set_norm_weight` set (the
        exporters write them instead of the source's)."""

    # ---- activation quantization

    @property
    def activation_bits(self) -> int | None:
        """Width of the per-token activation quantization of the decoder linears' inputs, or
        None."""

    def set_activation_bits(self, bits) -> None:
        """Quantize the input of every decoder linear per token (dynamic, symmetric) at ``bits``
        (8, 6, 4; None: off) in later forward passes."""

    # ---- passes

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """Token embeddings: int ids ``(B, T)`` → hidden states ``(B, T, D)``."""

    def block_forward(self, i: int, h: np.ndarray, *, cache: bool = False,
                      capture: Callable[[str, np.ndarray], None] | None = None):
        """Decoder block ``i`` on ``h`` ``(B, T, D)`` → ``(B, T, D)``; with ``cache=True``
        ``(output, cache)``, the cache an opaque object for :meth:`block_backward`.
        ``capture(name, X)`` is called for each linear layer with its input ``X``
        ``(B*T, d_in)`` in the compute dtype, read-only and valid only during the call (layers
        of one :meth:`input_groups` group receive the same array)."""

    def block_backward(self, i: int, cache, dh_out: np.ndarray, *, weight_grads: bool = True):
        """Backward pass of block ``i`` from its forward ``cache`` and the gradient ``dh_out``
        ``(B, T, D)`` of its output: ``(dh_in, grads)``, ``dh_in`` ``(B, T, D)`` and, when
        ``weight_grads``, ``grads`` ``{name: dW}`` for the block's seven layers (compute dtype,
        ``(d_out, d_in)``)."""

    def head_loss(self, h: np.ndarray, ids: np.ndarray, *, grad: bool = False):
        """Final norm, lm_head and per-sequence loss from the last block's output ``h``
        ``(B, T, D)``: float64 ``(B,)``; with ``grad=True`` ``(losses, dh)``, ``dh`` the
        gradient of ``losses.sum()`` with respect to ``h`` ``(B, T, D)``. Needs T >= 2."""

    def sequence_losses(self, ids: np.ndarray, *, batch_size: int | None = None,
                        n_threads: int | None = None, progress=None) -> np.ndarray:
        """Per-sequence losses of ``ids`` ``(B, T)``, float64 ``(B,)``, in chunks of
        ``batch_size`` (default :meth:`auto_batch`) on ``n_threads`` workers; the result does
        not depend on ``n_threads``. ``progress(n)`` is called as chunks of n sequences finish."""

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Next-token logits ``(B, T, vocab)`` in the compute dtype."""

    def weight_grads(self, ids: np.ndarray, *, recompute: bool | None = None) -> dict:
        """Gradient of the batch mean of the per-sequence losses with respect to every linear
        weight, ``{name: dW}`` (compute dtype, ``(d_out, d_in)``), in :meth:`linear_names`
        order. ``recompute=True`` keeps only block inputs and recomputes activations in the
        backward pass; None decides by :meth:`activation_bytes`."""

    def iter_block_weight_grads(self, ids: np.ndarray, *,
                                recompute: bool | None = None) -> Iterator[tuple[int, dict]]:
        """The gradients of :meth:`weight_grads` as ``(block, {name: dW})``, last block first,
        so that a consumer holds one block's worth at a time."""

    # ---- validation and sizing

    def check_ids(self, ids, name: str = "ids", min_len: int = 1) -> np.ndarray:
        """Validate token ids (integer ndarray ``(B, T)``, B >= 1, T >= ``min_len``, ids in the
        vocabulary) and return them; errors name the argument ``name``."""

    def check_seqlen(self, T: int) -> None:
        """Raise InvalidArgumentError when the runtime cannot run sequences of ``T`` tokens."""

    def activation_bytes(self, T: int) -> int:
        """Bytes of one block's activations for one sequence of ``T`` tokens (what a cached
        forward keeps): the one activation-size estimate stages size batches and choose
        recomputation by."""

    def auto_batch(self, T: int, budget: int = 128 << 20) -> int:
        """Sequences of ``T`` tokens per forward chunk (>= 1), independent of thread counts."""

    # ---- identity and tensor source

    def fingerprint(self) -> dict:
        """JSON-able identity of the loaded weights and config (content hashes): caches and
        resumable runs are keyed by it."""

    def source_tensors(self) -> list[SourceTensor]:
        """Every tensor of the source checkpoint, sorted by name, as the exporters copy it
        (:class:`hiquant.checkpoint.SourceTensor`: name, stored safetensors dtype, shape,
        ``read()`` → stored bytes)."""


@runtime_checkable
class DeviceRuntime(ModelRuntime, Protocol):
    """A runtime whose hidden states can stay on its compute device between blocks (the torch
    runtime): the pipeline then keeps the calibration activations there and collects the Gram
    matrices and runs GPTQ/RTN there (:mod:`hiquant.torch_pipeline`). The NumPy runtime is not
    one. Device hidden states are ``torch.Tensor`` ``(B, T, D)`` of the compute dtype on
    :attr:`device`; everything else is as :class:`ModelRuntime` says."""

    #: The ``torch.device`` the runtime computes on.
    device: Any

    def to_device(self, h: np.ndarray):
        """Hidden states ``(B, T, D)`` (a NumPy array of the compute dtype) as a tensor on the
        device."""

    def to_host(self, h) -> np.ndarray:
        """A device tensor of hidden states as a NumPy array of the compute dtype."""

    def embed_device(self, ids: np.ndarray):
        """:meth:`ModelRuntime.embed` as a tensor on the device."""

    def block_forward_device(self, i: int, h, *,
                             capture: Callable[[str, Any], None] | None = None,
                             cache: bool = False):
        """:meth:`ModelRuntime.block_forward` on a device tensor ``h``, returning a device
        tensor (with ``cache=True``, ``(output, cache)`` for :meth:`block_backward_device`);
        ``capture(name, X)`` receives each linear's input as a device tensor ``(B*T, d_in)`` of
        the compute dtype, read-only, valid only during the call."""

    def block_backward_device(self, i: int, cache, dh_out):
        """:meth:`ModelRuntime.block_backward` on device tensors: ``(dh_in, {name: dW})``."""

    def head_loss_device(self, h, ids: np.ndarray, *, grad: bool = False):
        """:meth:`ModelRuntime.head_loss` of a device tensor ``h``: NumPy float64 losses ``(B,)``,
        and with ``grad=True`` the gradient ``dh`` as a device tensor."""


class ModelLoader(Protocol):
    """How a runtime is loaded (:func:`hiquant.model.load_model` for the NumPy runtime).

    ``path``: a Hugging Face model folder; ``compute_dtype``: "float32" or "float64";
    ``weight_cache_bytes``: bound on expanded weights kept between calls; ``load_tokenizer``:
    read ``tokenizer.json`` when present; ``linear_source``: linear name → float32 array or
    quantized layer standing in for the stored weight (the packed reader loads through it)."""

    def __call__(self, path, *, compute_dtype: str = "float32",
                 weight_cache_bytes: int = 1 << 30, load_tokenizer: bool = True,
                 linear_source: Mapping | None = None) -> ModelRuntime: ...
