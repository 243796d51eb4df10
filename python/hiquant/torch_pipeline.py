"""The pipeline's block loop on a device runtime (:class:`hiquant.runtime.DeviceRuntime`, the torch
runtime): the calibration hidden states stay torch tensors on the runtime's device from the
embedding to the last block, each block's Gram matrices are accumulated there
(:func:`hiquant.torch_kernels.gram_accumulate`), and GPTQ and RTN run there
(:func:`hiquant.torch_kernels.gptq`, :func:`~hiquant.torch_kernels.quantize`), as do the lwc and
adaround methods with float16 scales (:mod:`hiquant.torch_learners`). Only the quantized layers
(codes, scales, zeros) come back to the host. The other layer quantizers (the hybrid one of hiq,
fixed-ratio and fp16-retention; lwc with scale codes or GPTQ rounding) receive the same
statistics, whose ``gram`` is copied to the host on first use, and run their C++ parts.

The empirical Fisher (per-sequence gradients of every linear, their squares summed) is also
collected on the device (:func:`collect_fisher`), for every objective; the M estimators and the
IQP run as on the NumPy backend (the IQP in the C++ core).

Used by :mod:`hiquant.pipeline` for the layer-wise objective when the runtime is a device runtime
(the block-wise objectives keep NumPy hidden states). torch is imported only here and in
:mod:`hiquant.torch_kernels`, never by the NumPy backend.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np

from .errors import InvalidArgumentError

__all__ = ["DeviceLayerStats", "is_device", "enabled", "embed_windows", "block_grams", "block_outputs",
           "to_host", "to_device", "rtn_layer", "gptq_layer", "learned_on_device",
           "learned_layer", "collect_fisher"]


def is_device(model) -> bool:
    """Whether ``model`` is a device runtime (:class:`hiquant.runtime.DeviceRuntime`)."""
    from .runtime import DeviceRuntime
    return isinstance(model, DeviceRuntime)


def enabled(model, settings) -> bool:
    """Whether the block loop runs on the device: a device runtime and the layer-wise
    objective."""
    return is_device(model) and settings.objective == "layer"


def _batches(n: int, size: int):
    return [slice(a, min(n, a + size)) for a in range(0, n, size)]


def embed_windows(model, windows: np.ndarray, batch_size: int):
    """The embeddings of every calibration window, one tensor ``(n, T, D)`` on the device."""
    import torch
    return torch.cat([model.embed_device(windows[sl]) for sl in _batches(len(windows), batch_size)])


def block_outputs(model, b: int, h, batch_size: int):
    """Block ``b``'s outputs for the device hidden states ``h`` (batches in order)."""
    import torch
    return torch.cat([model.block_forward_device(b, h[sl]) for sl in _batches(len(h), batch_size)])


def to_host(model, h):
    """Device hidden states as NumPy (for the progress folder); None stays None."""
    return None if h is None else model.to_host(h)


def to_device(model, h):
    """NumPy hidden states (from the progress folder) on the device; None stays None."""
    return None if h is None else model.to_device(np.ascontiguousarray(h))


class DeviceLayerStats:
    """:class:`hiquant.stats.LayerStats` whose statistics live on the device: ``gram_device``
    (float64 ``(d_in, d_in)`` tensor), ``n_tokens``, and as NumPy on first use ``gram``,
    ``abs_sum``, ``abs_max`` (float64), ``abs_mean`` — what the host-side quantizers read."""

    def __init__(self, gram_device, n_tokens: int, abs_sum_device, abs_max_device):
        self.gram_device = gram_device
        self.n_tokens = int(n_tokens)
        self.abs_sum_device = abs_sum_device
        self.abs_max_device = abs_max_device

    @cached_property
    def gram(self) -> np.ndarray:
        return self.gram_device.cpu().numpy()

    @cached_property
    def abs_sum(self) -> np.ndarray:
        return self.abs_sum_device.cpu().numpy()

    @cached_property
    def abs_max(self) -> np.ndarray:
        return self.abs_max_device.cpu().numpy()

    @property
    def abs_mean(self) -> np.ndarray:
        return self.abs_sum / self.n_tokens


def block_grams(model, b: int, h, *, batch_size: int) -> dict:
    """:func:`hiquant.stats.block_grams` on the device: ``{linear name: DeviceLayerStats}`` for
    block ``b`` from the device hidden states ``h`` ``(n, T, D)``, batches of ``batch_size``
    windows in order; layers sharing an input share one object."""
    import torch

    from . import torch_kernels as tk
    groups = model.input_groups(b)
    firsts = {g[0] for g in groups}
    acc: dict = {}

    def capture(name, X):
        if name not in firsts:
            return
        if X.dtype != torch.float32:
            raise InvalidArgumentError("the device Gram collection needs a float32 runtime (the "
                                       "default compute dtype)")
        if name not in acc:
            d = X.shape[1]
            z = dict(dtype=torch.float64, device=X.device)
            acc[name] = [torch.zeros((d, d), **z), 0, torch.zeros(d, **z), torch.zeros(d, **z)]
        a = acc[name]
        tk.gram_accumulate(a[0], X)
        tk.abs_stats_accumulate(a[2], a[3], X)
        a[1] += X.shape[0]

    for sl in _batches(len(h), batch_size):
        model.block_forward_device(b, h[sl], capture=capture)
    out = {}
    for g in groups:
        G, n, asum, amax = acc[g[0]]
        st = DeviceLayerStats(G, n, asum, amax)
        out.update({name: st for name in g})
    return out


def _device(settings):
    import torch
    return torch.device(settings.device)


def rtn_layer(name, W: np.ndarray, plan, settings):
    """:meth:`hiquant.storage.QuantizedLayer.rtn` of a plan without high-impact columns, the codes
    computed on the device: min-max parameters, the scales rounded to the stored precision
    (``scale_bits``) as :meth:`~hiquant.storage.QuantPart.from_weights` does, then the codes."""
    import torch

    from . import torch_kernels as tk
    from .storage import SCALE_CODE_BITS, QuantizedLayer, QuantPart, scale_codes, stored_scales
    Wt = torch.from_numpy(np.ascontiguousarray(W, np.float32)).to(_device(settings))
    b, g, sb = plan.b_low, plan.group_size, settings.scale_bits
    scale, zero = tk.minmax_params(Wt, b, g)
    scale_h, zero_h = scale.cpu().numpy(), zero.cpu().numpy()
    if sb in SCALE_CODE_BITS:
        s32, sc, sup = scale_codes(scale_h, sb)
    else:
        s32 = stored_scales(scale_h, sb)
    codes = tk.quantize(Wt, torch.from_numpy(np.ascontiguousarray(s32)).to(Wt.device), zero,
                        b, g).cpu().numpy()
    if sb in SCALE_CODE_BITS:
        low = QuantPart(b, g, codes, sc, zero_h, sup, scale_code_bits=sb)
    else:
        low = QuantPart(b, g, codes, s32.astype(np.float16), zero_h)
    return QuantizedLayer(name, W.shape[0], W.shape[1], np.zeros(0, np.int64), low)


def gptq_layer(name, W: np.ndarray, stats: DeviceLayerStats, plan, settings):
    """The gptq method (:mod:`hiquant.methods.gptq`) on the device, from ``stats.gram_device``."""
    import torch

    from . import torch_kernels as tk
    from .storage import QuantizedLayer, QuantPart
    s = settings
    H = stats.gram_device
    Wt = torch.from_numpy(np.ascontiguousarray(W, np.float32)).to(H.device)
    res = tk.gptq(Wt, H, bits=plan.b_low, group_size=plan.group_size, percdamp=s.gptq_percdamp,
                  blocksize=s.gptq_blocksize, act_order=s.gptq_act_order)
    low = QuantPart(plan.b_low, plan.group_size, res.codes.cpu().numpy(),
                    res.scale.cpu().numpy().astype(np.float16), res.zero.cpu().numpy())
    return QuantizedLayer(name, W.shape[0], W.shape[1], np.zeros(0, np.int64), low)


def learned_on_device(stats, settings, kind: str) -> bool:
    """Whether the ``lwc`` / ``adaround`` method runs on the device (:func:`learned_layer`): device
    statistics, float16 scales, and for lwc round-to-nearest codes on the learned grid (scale codes
    and GPTQ rounding run the C++ parts on the host)."""
    if getattr(stats, "gram_device", None) is None or settings.scale_bits != 16:
        return False
    return kind == "adaround" or settings.low_rounding == "nearest"


def learned_layer(name, W: np.ndarray, stats: DeviceLayerStats, plan, settings, kind: str):
    """The ``lwc`` or ``adaround`` method (every column one learned part) on the device with
    :mod:`hiquant.torch_learners`: the same part, objective, schedule and stored layer as
    :func:`hiquant.methods.hybrid.quantize_layer` with no high columns (lwc) or all of them
    (adaround); info ``loss_rtn``, ``loss_final``, ``order``, ``seconds`` as there."""
    import time

    import torch

    from . import torch_learners as TL
    from .storage import QuantizedLayer
    t0 = time.perf_counter()
    s = settings
    H = stats.gram_device
    N = float(stats.n_tokens)
    Wt = torch.from_numpy(np.ascontiguousarray(W, np.float32)).to(H.device)
    H32 = H.to(torch.float32)
    rtn = rtn_layer(name, W, plan, s).low.dequantize()
    loss_rtn, _ = TL.gram_loss(Wt, torch.from_numpy(rtn).to(H.device), H32, N)
    if kind == "lwc":
        part = TL.TorchLWC(Wt, plan.b_low, plan.group_size, lr=s.lwc_lr)
        TL.fit(Wt, H32, N, s.lwc_iters, lwc=part)
        order = "sequential"
    elif kind == "adaround":
        part = TL.TorchAdaRound(Wt, plan.b_low, plan.group_size, lr=s.adaround_lr,
                                iters=s.adaround_iters)
        TL.fit(Wt, H32, N, s.adaround_iters, adaround=part)
        order = "adaround"
    else:
        raise InvalidArgumentError(f"learned_layer runs lwc or adaround, got {kind!r}")
    low = part.export()
    loss_final, _ = TL.gram_loss(Wt, torch.from_numpy(low.dequantize()).to(H.device), H32, N)
    return QuantizedLayer(name, W.shape[0], W.shape[1], np.zeros(0, np.int64), low, None, None,
                          {"order": order, "loss_final": loss_final, "loss_rtn": loss_rtn,
                           "seconds": time.perf_counter() - t0})


def collect_fisher(model, windows: np.ndarray, *, gram: bool = False, fisher: bool = True,
                   progress: bool = True, n_threads=None, meta: dict | None = None,
                   fisher_full: bool = True, recompute: bool | None = None):
    """:func:`hiquant.stats.collect_stats` with ``gram=False`` on the device: the empirical Fisher
    of every linear from per-sequence gradients (one window per forward and backward pass, as
    there), accumulated on the device — ``F += g²`` in float32 (``fisher_full``), else F's
    margins ``Σ_rows g²`` (the column scores) and ``Σ_cols g²`` in float64 — and returned as a
    :class:`hiquant.stats.CalibStats` of NumPy arrays. ``recompute`` keeps only block inputs
    (None: by ``activation_bytes``, as there). ``n_threads`` is accepted for the same signature
    (one device stream)."""
    import datetime
    import hashlib

    import torch

    from .errors import InvalidTypeError, NumericalError
    from .stats import CalibStats
    if gram or not fisher:
        raise InvalidArgumentError("the device collector computes the Fisher only (gram=False, "
                                   "fisher=True); the Gram matrices are collected per block")
    if not isinstance(windows, np.ndarray) or not np.issubdtype(windows.dtype, np.integer):
        raise InvalidTypeError("windows must be an integer numpy.ndarray of token ids (n, seqlen), "
                               f"got {type(windows).__name__}")
    if windows.ndim != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        raise InvalidArgumentError(f"windows must have shape (n, seqlen) with n >= 1 and "
                                   f"seqlen >= 2, got {windows.shape}")
    windows = np.ascontiguousarray(windows)
    n, T = windows.shape
    model.check_ids(windows, "windows", min_len=2)
    model.check_seqlen(T)
    nb = model.num_blocks
    if recompute is None:
        recompute = model.activation_bytes(T) * nb > (1 << 30)
    dev = model.device
    acc, acc_row = {}, {}  # F (fisher_full), else its column and row sums
    for name in model.linear_names():
        d_out, d_in = model.linear_shape(name)
        acc[name] = (torch.zeros((d_out, d_in), dtype=torch.float32, device=dev) if fisher_full
                     else torch.zeros(d_in, dtype=torch.float64, device=dev))
        if not fisher_full:
            acc_row[name] = torch.zeros(d_out, dtype=torch.float64, device=dev)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n, desc="calibration stats (fisher, device)", unit="window", leave=False)
    try:
        for u in range(n):
            ids = windows[u:u + 1]
            h = model.embed_device(ids)
            saved = []
            for b in range(nb):
                if recompute:
                    saved.append(h)
                    h = model.block_forward_device(b, h)
                else:
                    h, c = model.block_forward_device(b, h, cache=True)
                    saved.append(c)
            _, dh = model.head_loss_device(h, ids, grad=True)
            for b in reversed(range(nb)):
                c = saved[b]
                if recompute:
                    _, c = model.block_forward_device(b, c, cache=True)
                saved[b] = None
                dh, grads = model.block_backward_device(b, c, dh)
                for name, g in grads.items():
                    gg = g * g
                    if not bool(torch.isfinite(gg.sum())):
                        raise NumericalError(f"the gradient of {name} is not finite")
                    if fisher_full:
                        acc[name] += gg
                    else:
                        acc[name] += gg.sum(dim=0, dtype=torch.float64)
                        acc_row[name] += gg.sum(dim=1, dtype=torch.float64)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    out = CalibStats(n_sequences=n)
    for name, a in acc.items():
        if fisher_full:
            out.fisher[name] = a.cpu().numpy()
            out.fisher_col[name] = a.sum(dim=0, dtype=torch.float64).cpu().numpy()
            out.fisher_row[name] = a.sum(dim=1, dtype=torch.float64).cpu().numpy()
        else:
            out.fisher_col[name] = a.cpu().numpy()
            out.fisher_row[name] = acc_row[name].cpu().numpy()
    out.meta = {
        "model": model.fingerprint(),
        "model_path": str(model.path),
        "modified_weights": model.modified_weights(),
        "n_windows": int(n), "seqlen": int(T),
        "windows_sha256": hashlib.sha256(windows.astype("<i8").tobytes()).hexdigest(),
        "gram": False, "fisher": True, "fisher_full": bool(fisher_full),
        "device": str(dev),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **(meta or {}),
    }
    return out
