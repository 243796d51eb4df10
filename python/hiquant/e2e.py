"""End-to-end tuning: the stage after quantization that trains a quantized model's free parameters
on the calibration windows' next-token cross-entropy, through the whole model.

With every block's codes final, what is still free without changing the storage is

* every RMSNorm weight (the blocks' input / post-attention norms, q_norm / k_norm where the model
  has them, and the final norm): float tensors kept in the source dtype, at no bit cost;
* the scale of every group of every quantized part, through its stored precision: float16
  scales, or the integer scale codes of double-quantized (6- or 8-bit) scales with the block's
  super-scale fixed. A scale is learned as ``s0 · u`` (``u`` starts at 1) and used rounded to the
  stored precision, with the rounding passed straight through in the backward pass (as EfficientQAT's
  end-to-end step-size training, here with the stored rounding in the loop).

Codes, zero points, high-impact columns and storage bits do not change; binarized (billm) layers
and float16 high parts have no scales and keep only the norms' tuning.

Each step averages the gradients of ``batch`` windows (computed on worker threads, summed in
window order, so the result does not depend on the thread count) and takes one Adam step; the
windows' order is a permutation drawn from the run's seed per epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._reference.lwc import adam_step
from ._threads import map_ordered
from .errors import InvalidArgumentError, NumericalError
from .storage import QuantizedLayer, QuantPart, fp16_scales

__all__ = ["tune", "part_scale_grad", "with_scales", "norm_names"]


def norm_names(model) -> list[str]:
    """The RMSNorm weights end-to-end tuning trains, in model order."""
    names = []
    for b in range(model.num_blocks):
        pre = f"model.layers.{b}."
        names += [pre + "input_layernorm.weight", pre + "post_attention_layernorm.weight"]
        if model.config.qk_norm:
            names += [pre + "self_attn.q_norm.weight", pre + "self_attn.k_norm.weight"]
    return names + ["model.norm.weight"]


def _group_starts(n_cols: int, group_size: int) -> np.ndarray:
    if group_size <= 0 or group_size >= n_cols:
        return np.zeros(1, np.int64)
    return np.arange(0, n_cols, group_size, dtype=np.int64)


def part_scale_grad(part: QuantPart, dW: np.ndarray) -> np.ndarray:
    """``dL/ds`` of every group scale of ``part`` from ``dW = dL/dW`` of its columns
    ``(d_out, n_cols)``: ``Σ_{j in group} dW[r, j] · (codes[r, j] - zero[r, g])`` (float64,
    ``(d_out, n_groups)``), the weights being ``s · (codes - zero)`` per group."""
    d_out, n = part.codes.shape
    if dW.shape != (d_out, n):
        raise InvalidArgumentError(f"dW has shape {dW.shape}, expected {(d_out, n)}")
    starts = _group_starts(n, part.group_size)
    widths = np.diff(np.append(starts, n))
    q = part.codes.astype(np.float64) - np.repeat(part.zero.astype(np.float64), widths, axis=1)
    return np.add.reduceat(dW.astype(np.float64) * q, starts, axis=1)


def with_scales(part: QuantPart, scale: np.ndarray) -> QuantPart:
    """``part`` with its group scales replaced by ``scale`` (float, ``(d_out, n_groups)``)
    rounded to the part's stored precision: float16, or codes ``clip(rint(scale / S), 1,
    2**bits - 1)`` under the part's own (unchanged) super-scales. Codes and zeros are kept."""
    scale = np.asarray(scale, np.float64)
    if part.scale_super is None:
        stored = fp16_scales(scale.astype(np.float32)).astype(np.float16)
        return QuantPart(part.bits, part.group_size, part.codes, stored, part.zero)
    sup = part.scale_super.astype(np.float64)[np.arange(part.codes.shape[0]) // part.super_rows]
    cmax = 2 ** part.scale_code_bits - 1
    codes = np.clip(np.rint(scale / sup[:, None]), 1, cmax).astype(np.uint8)
    return QuantPart(part.bits, part.group_size, part.codes, codes, part.zero, part.scale_super,
                     part.super_rows, part.scale_code_bits)


@dataclass
class _Adam:
    """Adam on one float64 array, torch's formula (β 0.9 / 0.999, ε 1e-8): the float64 step of
    :func:`hiquant._reference.lwc.adam_step`, which the native Adam is checked against."""

    x: np.ndarray
    lr: float

    def __post_init__(self):
        self.m = np.zeros_like(self.x)
        self.v = np.zeros_like(self.x)
        self.t = 0

    def step(self, g: np.ndarray) -> None:
        self.t += 1
        self.x, self.m, self.v = adam_step(self.x, g, self.m, self.v, self.t, self.lr)


def _parts(ql: QuantizedLayer):
    """(attribute, part, column indices) of the layer's parts with learnable scales."""
    out = []
    if ql.binary is not None:
        return out
    if ql.low is not None and ql.low.codes.size:
        out.append(("low", ql.low, ql.low_idx()))
    if ql.high is not None and ql.high.codes.size:
        out.append(("high", ql.high, ql.high_idx))
    return out


def tune(model, windows: np.ndarray, qlayers: dict, *, epochs: int, batch: int, norm_lr: float,
         scale_lr: float, seed: int, n_threads=None, progress: bool = False,
         recompute: bool | None = None) -> tuple[dict, dict]:
    """Train the norms and scales of ``model`` (whose linears are ``qlayers``, set with
    ``set_weight``) on ``windows`` (int ids ``(n, seqlen)``) for ``epochs`` passes of
    ``batch``-window Adam steps (learning rates ``norm_lr`` for the norms, ``scale_lr`` for the
    scales' relative factors). Leaves the tuned layers and norms set in ``model`` and returns
    ``({name: QuantizedLayer}, info)``; ``info`` holds the mean training loss of every epoch
    (the loss of each step's windows before that step's update). ``recompute``: as
    :meth:`hiquant.model.Model.iter_block_weight_grads`, which computes each window's
    gradients."""
    if epochs < 1 or batch < 1:
        raise InvalidArgumentError(f"epochs and batch must be >= 1, got {epochs} and {batch}")
    if not (norm_lr >= 0 and scale_lr >= 0):
        raise InvalidArgumentError("learning rates must be >= 0")
    windows = np.asarray(windows)
    n = windows.shape[0]
    names = list(qlayers)
    norms = {k: _Adam(model.get_norm_weight(k).astype(np.float64), norm_lr)
             for k in norm_names(model)} if norm_lr > 0 else {}
    s0 = {}  # (layer, part attribute) → (initial stored scales, relative factor's optimizer)
    if scale_lr > 0:
        for nm in names:
            for attr, part, _ in _parts(qlayers[nm]):
                s0[nm, attr] = (part.scale_f32().astype(np.float64),
                                _Adam(np.ones(part.scale.shape, np.float64), scale_lr))
    layers = dict(qlayers)
    rng = np.random.default_rng(seed)
    want_w = bool(s0)

    def window_grads(ids):
        losses, grads = [], {}
        for b, g in model.iter_block_weight_grads(ids, recompute=recompute, weight_grads=want_w,
                                                  norm_grads=True, losses=losses):
            if want_w and b != "head":  # reduce each layer's dW to its scale gradients here
                for nm in model.block_linear_names(b):
                    for attr, part, cols in _parts(layers[nm]):
                        if (nm, attr) in s0:
                            g[nm, attr] = part_scale_grad(part, g[nm][:, cols])
                    del g[nm]
            grads.update(g)
        return float(losses[0].sum()), grads

    info = {"epochs": int(epochs), "batch": int(batch), "norm_lr": float(norm_lr),
            "scale_lr": float(scale_lr), "epoch_loss": []}
    bar = None
    steps_per_epoch = -(-n // batch)
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=epochs * steps_per_epoch, desc="end-to-end tuning", unit="step",
                   leave=False)
    try:
        for _ in range(epochs):
            order = rng.permutation(n)
            total = 0.0
            for s in range(steps_per_epoch):
                sel = order[s * batch:(s + 1) * batch]
                res = map_ordered(window_grads, [windows[i:i + 1] for i in sel], n_threads)
                total += sum(r[0] for r in res)
                gsum: dict = {}
                for _, g in res:  # window order: independent of the thread count
                    for k, v in g.items():
                        gsum[k] = gsum[k] + v if k in gsum else np.array(v, np.float64)
                for k, v in gsum.items():
                    if not np.all(np.isfinite(v)):
                        raise NumericalError(f"end-to-end tuning: the gradient of {k} is not "
                                             "finite; lower the learning rates (e2e_norm_lr, "
                                             "e2e_scale_lr)")
                for k, opt in norms.items():
                    opt.step(gsum[k] / len(sel))
                    model.set_norm_weight(k, opt.x.astype(np.float32))
                for nm in names:
                    parts = {a: p for a, p, _ in _parts(layers[nm]) if (nm, a) in s0}
                    if not parts:
                        continue
                    new = {}
                    for attr, part in parts.items():
                        base, opt = s0[nm, attr]
                        opt.step(gsum[nm, attr] * base / len(sel))  # d/du of s0·u
                        new[attr] = with_scales(part, base * opt.x)
                    ql = layers[nm]
                    layers[nm] = QuantizedLayer(ql.name, ql.d_out, ql.d_in, ql.high_idx,
                                                new.get("low", ql.low), new.get("high", ql.high),
                                                ql.high_fp16, dict(ql.info))
                    model.set_weight(nm, layers[nm])
                if bar is not None:
                    bar.update(1)
            info["epoch_loss"].append(total / n)
    finally:
        if bar is not None:
            bar.close()
    return layers, info

