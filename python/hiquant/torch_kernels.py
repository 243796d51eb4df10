"""Quantization kernels in PyTorch, on the torch runtime's device: the Gram accumulation of a
linear layer's inputs, the uniform min-max quantizer and GPTQ.

They are the torch twins of the C++ kernels (``hiquant.stats.gram_accumulate``,
``hiquant.quantizer``, ``hiquant.learners.gptq`` / cpp/src/gptq.cpp) with the same arithmetic, so
that ``backend="torch"`` gives the NumPy backend's codes: each is checked against the float64
references in :mod:`hiquant._reference` (tests/test_torch_kernels.py). torch is imported lazily;
the NumPy backend never imports this module.

Conventions (hiquant.quantizer's): ``W`` float32 ``(d_out, d_in)``; groups of ``group_size``
consecutive input columns per row (``None``/0: one group per row; a shorter last group has its
own parameters); ``scale`` float32 and ``zero`` uint8 ``(d_out, n_groups)``; min-max ranges
include 0 and an all-zero group gets ``[-1, 1]``; ``code = clamp(rint(w / scale) + zero, 0,
2**bits - 1)`` with the division in float64 and round-half-to-even; ``w_hat = scale * (code -
zero)`` in float32. Gram matrices are float64.

Float32 products on CUDA must be true float32: with TF32 matrix products enabled
(``torch.backends.cuda.matmul.allow_tf32`` or ``torch.set_float32_matmul_precision`` other than
"highest") the kernels raise, since the Gram matrices and GPTQ's updates would lose ten mantissa
bits and the codes would no longer be the NumPy backend's.

Bad input raises :class:`hiquant.errors.InvalidTypeError` / :class:`InvalidArgumentError` /
:class:`NumericalError`, as the C++ kernels do.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .config import check_group_size
from .errors import HiquantError, InvalidArgumentError, InvalidTypeError, NumericalError

__all__ = [
    "GRAM_CHUNK",
    "gram_accumulate",
    "abs_stats_accumulate",
    "n_groups",
    "minmax_params",
    "quantize",
    "dequantize",
    "fake_quantize",
    "fp16_round_scale",
    "TorchGPTQResult",
    "gptq",
]

#: Rows per float32 product in :func:`gram_accumulate` (the C++ kernel's chunk): the chunk sums
#: are added in float64, so the error does not grow with the number of tokens.
GRAM_CHUNK = 256

FP16_TINY = 2.0 ** -14
FP16_MAX = 65504.0


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - exercised only without torch
        raise HiquantError(f"hiquant.torch_kernels needs torch ({e}); install it with "
                           "`pip install hiquant[torch]` or use backend='numpy'") from e
    return torch


def _is_tensor(x) -> bool:
    torch = _torch()
    return isinstance(x, torch.Tensor)


def _tensor(x, name: str, dtype, ndim: int):
    torch = _torch()
    if not isinstance(x, torch.Tensor):
        raise InvalidTypeError(f"{name} must be a torch.Tensor of {str(dtype)[6:]}, got "
                               f"{type(x).__name__}; convert it with torch.from_numpy(...)")
    if x.dtype != dtype:
        raise InvalidTypeError(f"{name} must have dtype {str(dtype)[6:]}, got {str(x.dtype)[6:]}; "
                               f"convert it with .to(torch.{str(dtype)[6:]})")
    if x.dim() != ndim:
        raise InvalidArgumentError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    return x


def _bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise InvalidTypeError(f"bits must be an int, got {type(bits).__name__}")
    if not 2 <= bits <= 8:
        raise InvalidArgumentError(f"bits must be an integer in 2..8, got {bits}")
    return bits


def _check_fp32_matmul(t) -> None:
    torch = _torch()
    if t.device.type == "cuda" and (torch.backends.cuda.matmul.allow_tf32
                                    or torch.get_float32_matmul_precision() != "highest"):
        raise InvalidArgumentError(
            "TF32 matrix products are enabled (torch.backends.cuda.matmul.allow_tf32 or "
            "torch.set_float32_matmul_precision('high'/'medium')); hiquant's Gram matrices and "
            "GPTQ need float32 products: set torch.backends.cuda.matmul.allow_tf32 = False and "
            "torch.set_float32_matmul_precision('highest')")


def _first_nonfinite(t):
    """(row, column) of the first non-finite entry of a 2-D tensor, or None."""
    torch = _torch()
    if bool(torch.isfinite(t.sum(dtype=torch.float64))):  # one reduction; NaN/Inf propagate
        return None
    bad = ~torch.isfinite(t)
    if not bool(bad.any()):  # pragma: no cover - finite values cannot overflow a float64 sum
        return None
    idx = int(torch.nonzero(bad.reshape(-1))[0])
    return idx // t.shape[1], idx % t.shape[1]


# ---------------------------------------------------------------------------------- Gram


def gram_accumulate(G, X, *, chunk: int | None = GRAM_CHUNK) -> None:
    """``G += Xᵀ X`` in place on ``G``'s device. ``G``: float64 ``(d, d)``; ``X``: float32
    ``(n, d)`` on the same device. ``chunk`` rows at a time are multiplied in float32 and the
    chunk products added in float64 (as the C++ kernel); ``chunk=None`` multiplies in float64
    (slower on most GPUs, exact up to float64 rounding). Raises NumericalError (``G`` untouched)
    when ``X`` holds NaN or Inf."""
    torch = _torch()
    _tensor(G, "G", torch.float64, 2)
    _tensor(X, "X", torch.float32, 2)
    d = G.shape[0]
    if G.shape[1] != d or X.shape[1] != d:
        raise InvalidArgumentError(f"G has shape {tuple(G.shape)} and X {tuple(X.shape)}; G must "
                                   "be (d, d) for X of d columns")
    if X.device != G.device:
        raise InvalidArgumentError(f"X is on {X.device} but G on {G.device}; move them to one "
                                   "device")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise InvalidArgumentError(f"chunk must be a positive int or None, got {chunk!r}")
    bad = _first_nonfinite(X)
    if bad is not None:
        raise NumericalError(f"the layer input X is not finite at row {bad[0]}, column {bad[1]}; "
                             "check the model's activations")
    if X.shape[0] == 0:
        return
    if chunk is None:
        Xd = X.to(torch.float64)
        G.addmm_(Xd.T, Xd)
        return
    _check_fp32_matmul(X)
    for a in range(0, X.shape[0], chunk):
        Xc = X[a:a + chunk]
        G.add_((Xc.T @ Xc).to(torch.float64))


def abs_stats_accumulate(abs_sum, abs_max, X) -> None:
    """``abs_sum += Σ_rows |X|`` (float64 ``(d,)``) and ``abs_max = max(abs_max, max_rows |X|)``
    (float64 ``(d,)``) in place: AWQ's and SmoothQuant's per-channel activation statistics, from
    the pass that collects the Gram matrix."""
    torch = _torch()
    _tensor(abs_sum, "abs_sum", torch.float64, 1)
    _tensor(abs_max, "abs_max", torch.float64, 1)
    _tensor(X, "X", torch.float32, 2)
    A = X.abs()
    abs_sum.add_(A.sum(dim=0, dtype=torch.float64))
    torch.maximum(abs_max, A.max(dim=0).values.to(torch.float64), out=abs_max)


# ---------------------------------------------------------------------------------- quantizer


def n_groups(d_in: int, group_size) -> int:
    """Parameter groups per row for ``d_in`` columns."""
    g = check_group_size(group_size)
    if d_in <= 0:
        return 0
    return 1 if (g <= 0 or g >= d_in) else -(-d_in // g)


def _width(d_in: int, group_size) -> int:
    g = check_group_size(group_size)
    return d_in if (g <= 0 or g >= d_in) else g


def _pad_groups(A, g: int, fill):
    """``A`` ``(rows, d)`` as ``(rows, n_groups, g)``, the last group padded with ``fill``."""
    torch = _torch()
    rows, d = A.shape
    ng = -(-d // g)
    if ng * g != d:
        A = torch.cat([A, A.new_full((rows, ng * g - d), fill)], dim=1)
    return A.reshape(rows, ng, g)


def fp16_round_scale(s):
    """Scales rounded to float16 (the stored precision) as float32, after clipping to float16's
    normal range ``[2^-14, 65504]`` (NaN to the smallest): the C++ ``fp16_round_scale``."""
    torch = _torch()
    s = torch.nan_to_num(s, nan=FP16_TINY).clamp(FP16_TINY, FP16_MAX)
    return s.to(torch.float16).to(torch.float32)


def _range_params(lo, hi, maxq: int, fp16_scales: bool):
    """(scale float32, zero float64 in 0..maxq) from float32 ranges that include 0."""
    torch = _torch()
    both0 = (lo == 0) & (hi == 0)
    lo = torch.where(both0, torch.full_like(lo, -1.0), lo)
    hi = torch.where(both0, torch.full_like(hi, 1.0), hi)
    s = ((hi.to(torch.float64) - lo.to(torch.float64)) / maxq).to(torch.float32)
    if fp16_scales:
        s = fp16_round_scale(s)
    z = torch.round(-lo.to(torch.float64) / s.to(torch.float64)).clamp(0, maxq)
    return s, z


def _check_weight(W, name="W"):
    torch = _torch()
    _tensor(W, name, torch.float32, 2)
    if W.shape[0] == 0 or W.shape[1] == 0:
        raise InvalidArgumentError(f"{name} must be a non-empty matrix, got shape {tuple(W.shape)}")
    bad = _first_nonfinite(W)
    if bad is not None:
        raise NumericalError(f"weight is not finite at row {bad[0]}, column {bad[1]}; check the "
                             "checkpoint or the preceding computation")
    return W


def minmax_params(W, bits: int, group_size=None):
    """Min-max ``(scale float32, zero uint8)`` of ``W`` per row and group, each
    ``(d_out, n_groups)`` (hiquant.quantizer.minmax_params: the scale is not rounded to float16)."""
    torch = _torch()
    maxq = 2 ** _bits(bits) - 1
    _check_weight(W)
    g = _width(W.shape[1], group_size)
    Wg = _pad_groups(W, g, 0.0)  # padding with 0 changes nothing: ranges include 0
    lo = Wg.amin(dim=2).clamp(max=0.0)
    hi = Wg.amax(dim=2).clamp(min=0.0)
    s, z = _range_params(lo, hi, maxq, False)
    return s.contiguous(), z.to(torch.uint8).contiguous()


def _check_params(W, scale, zero, bits, group_size):
    torch = _torch()
    rows, d = W.shape
    ng = n_groups(d, group_size)
    _tensor(scale, "scale", torch.float32, 2)
    _tensor(zero, "zero", torch.uint8, 2)
    for name, t in (("scale", scale), ("zero", zero)):
        if tuple(t.shape) != (rows, ng):
            raise InvalidArgumentError(f"{name} has shape {tuple(t.shape)} but a ({rows}, {d}) "
                                       f"matrix with group_size {group_size} needs ({rows}, {ng})")
        if t.device != W.device:
            raise InvalidArgumentError(f"{name} is on {t.device} but the matrix on {W.device}")
    bad = ~(torch.isfinite(scale) & (scale > 0))
    if bool(bad.any()):
        r, g = (int(v) for v in torch.nonzero(bad)[0])
        raise InvalidArgumentError(f"scale at row {r}, group {g} is {float(scale[r, g])}; scales "
                                   "must be finite and positive")
    bad = zero > 2 ** bits - 1
    if bool(bad.any()):
        r, g = (int(v) for v in torch.nonzero(bad)[0])
        raise InvalidArgumentError(f"zero point at row {r}, group {g} is {int(zero[r, g])}, above "
                                   f"2^bits - 1 = {2 ** bits - 1}")


def quantize(W, scale, zero, bits: int, group_size=None):
    """Integer codes (uint8, ``W``'s shape) of ``W`` under the given parameters."""
    torch = _torch()
    maxq = 2 ** _bits(bits) - 1
    _check_weight(W)
    _check_params(W, scale, zero, bits, group_size)
    rows, d = W.shape
    g = _width(d, group_size)
    Wg = _pad_groups(W, g, 0.0).to(torch.float64)
    q = torch.round(Wg / scale.to(torch.float64)[:, :, None]) + zero.to(torch.float64)[:, :, None]
    return q.clamp(0, maxq).to(torch.uint8).reshape(rows, -1)[:, :d].contiguous()


def dequantize(codes, scale, zero, bits: int, group_size=None):
    """float32 weights ``scale * (codes - zero)``."""
    torch = _torch()
    _bits(bits)
    _tensor(codes, "codes", torch.uint8, 2)
    _check_params(codes, scale, zero, bits, group_size)
    rows, d = codes.shape
    g = _width(d, group_size)
    C = _pad_groups(codes, g, 0).to(torch.float32)
    out = scale[:, :, None] * (C - zero.to(torch.float32)[:, :, None])
    return out.reshape(rows, -1)[:, :d].contiguous()


def fake_quantize(W, bits: int, group_size=None):
    """Round-to-nearest min-max quantize-dequantize of ``W`` (float32)."""
    scale, zero = minmax_params(W, bits, group_size)
    return dequantize(quantize(W, scale, zero, bits, group_size), scale, zero, bits, group_size)


# ---------------------------------------------------------------------------------- GPTQ


@dataclass
class TorchGPTQResult:
    """:class:`hiquant.learners.GPTQResult` with tensors on the device (see :func:`gptq`)."""

    codes: object  # uint8 (d_out, n_quant)
    scale: object  # float32 (d_out, n_groups)
    zero: object  # uint8 (d_out, n_groups)
    wq: object  # float32 (d_out, n_quant) == scale * (codes - zero)
    loss: float
    damp: float
    n_dead: int
    perm: object  # int64 (d_in,) loop order
    seconds: dict = field(default_factory=dict)

    def numpy(self):
        """The same result as a :class:`hiquant.learners.GPTQResult` of NumPy arrays."""
        from .learners import GPTQResult
        return GPTQResult(self.codes.cpu().numpy(), self.scale.cpu().numpy(),
                          self.zero.cpu().numpy(), self.wq.cpu().numpy(), self.loss, self.damp,
                          self.n_dead, self.perm.cpu().numpy(), dict(self.seconds))


def check_gram(H, d: int, name: str = "H") -> None:
    """The C++ ``check_gram``: float64 ``(d, d)``, finite, symmetric up to the rounding of an
    accumulated ``XᵀX``, with a non-negative diagonal."""
    torch = _torch()
    _tensor(H, name, torch.float64, 2)
    if tuple(H.shape) != (d, d):
        raise InvalidArgumentError(f"{name} has shape {tuple(H.shape)} but the weight has {d} "
                                   f"columns; pass the ({d}, {d}) Gram matrix of the same layer")
    bad = _first_nonfinite(H)
    if bad is not None:
        raise NumericalError(f"{name} is not finite at ({bad[0]}, {bad[1]}); recompute the "
                             "calibration statistics")
    dg = torch.diagonal(H)
    if bool((dg < 0).any()):
        i = int(torch.nonzero(dg < 0)[0])
        raise InvalidArgumentError(f"{name} has a negative diagonal entry {name}[{i}, {i}] = "
                                   f"{float(dg[i])}; pass the Gram matrix X^T X of the layer's "
                                   "inputs")
    tol = 1e-6 * torch.sqrt(dg.abs()[:, None] * dg.abs()[None, :]) + 1e-30
    asym = (H - H.T).abs() > tol
    if bool(asym.any()):
        i, j = (int(v) for v in torch.nonzero(asym)[0])
        raise InvalidArgumentError(f"{name} is not symmetric at ({i}, {j}): {float(H[i, j])} vs "
                                   f"{float(H[j, i])}; pass the Gram matrix X^T X")


def _inverse_cholesky_upper(A):
    """Upper ``U`` with ``Uᵀ U = A⁻¹`` (float64), by the reversed Cholesky of ``A`` as
    cpp/src/gptq.cpp: ``J A J = L Lᵀ`` gives ``U = J L⁻¹ J``."""
    torch = _torch()
    L, info = torch.linalg.cholesky_ex(A.flip(0, 1))
    if int(info) != 0:
        raise NumericalError("the damped Hessian is not positive definite (Cholesky failed); "
                             "raise percdamp, or collect more calibration tokens")
    eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    X = torch.linalg.solve_triangular(L, eye, upper=False)
    return X.flip(0, 1)


def gptq(W, H, *, bits: int, group_size=None, percdamp: float = 0.01, blocksize: int = 128,
         act_order: bool = False, fp16_scales: bool = True, scale=None, zero=None,
         n_quant: int | None = None) -> TorchGPTQResult:
    """GPTQ of one layer on ``W``'s device: :func:`hiquant.learners.gptq`'s algorithm and options
    (cpp/include/hiquant/gptq.hpp documents them) in torch, with the same arithmetic — the
    factorization in float64, the column loop in float32, the quantizer's division in float64.

    ``W`` float32 ``(d_out, d_in)`` and ``H`` float64 ``(d_in, d_in)`` tensors on one device;
    ``scale``/``zero`` (float32/uint8 ``(d_out, n_groups)`` tensors): a fixed grid; ``n_quant``:
    quantize only the first ``n_quant`` columns. Codes equal the C++ kernel's except where a
    float32 value lands within rounding of a half step (the lazy update's sums run in another
    order); tests/test_torch_kernels.py counts how often.
    """
    torch = _torch()
    t0 = time.perf_counter()
    bits = _bits(bits)
    _check_weight(W)
    rows, n = W.shape
    check_gram(H, n)
    if H.device != W.device:
        raise InvalidArgumentError(f"H is on {H.device} but W on {W.device}; move them to one "
                                   "device")
    gsz = check_group_size(group_size)
    for v, nm in ((blocksize, "blocksize"), (n_quant, "n_quant")):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise InvalidTypeError(f"{nm} must be an int, got {type(v).__name__}")
    if blocksize < 1:
        raise InvalidArgumentError(f"blocksize must be >= 1, got {blocksize}")
    if isinstance(percdamp, bool) or not isinstance(percdamp, (int, float)) \
            or not percdamp >= 0 or percdamp == float("inf"):
        raise InvalidArgumentError(f"percdamp must be a non-negative number, got {percdamp!r}")
    nq = n if not n_quant else int(n_quant)
    if not 0 < nq <= n:
        raise InvalidArgumentError(f"n_quant ({n_quant}) must be in 1..{n} (the columns)")
    grid = scale is not None
    if grid != (zero is not None):
        raise InvalidArgumentError("a fixed grid needs both its scales and its zero points")
    gs = gsz if 0 < gsz < nq else 0
    ng = -(-nq // gs) if gs else 1
    maxq = 2 ** bits - 1
    if grid:
        _check_params(W[:, :nq], scale, zero, bits, gs)
    _check_fp32_matmul(W)
    dev = W.device

    # dead columns, order, damping (float64)
    diag = torch.diagonal(H).clone()
    dead = diag == 0
    n_dead = int(dead.sum())
    diag[dead] = 1.0
    perm = torch.arange(n, device=dev)
    if act_order:  # only the quantized columns; the free ones keep their place after them
        perm[:nq] = torch.sort(diag[:nq], descending=True, stable=True).indices
    damp = float(percdamp) * float(diag.mean())
    A = H[perm][:, perm]
    A.diagonal().copy_(diag[perm] + damp)
    U = _inverse_cholesky_upper(A).to(torch.float32)
    del A
    Ud = torch.diagonal(U).clone()
    badu = ~(torch.isfinite(Ud) & (Ud > 0))
    if bool(badu.any()):
        c = int(perm[int(torch.nonzero(badu)[0])])
        raise NumericalError(f"the inverse Hessian factor has a non-positive or non-finite "
                             f"diagonal at column {c} in float32; raise percdamp")
    Ud2 = Ud.to(torch.float64) ** 2
    t1 = time.perf_counter()

    # working copy in loop order, dead columns zeroed
    Wc = W[:, perm].clone()
    Wc[:, dead[perm]] = 0.0
    perm_h = perm.cpu().tolist()
    pos_h = [0] * n
    for i, p in enumerate(perm_h):
        pos_h[p] = i
    forms = {}
    if gs:
        seen = set()
        for i in range(nq):
            g = perm_h[i] // gs
            if g not in seen:
                seen.add(g)
                c0 = g * gs
                forms[i] = (g, torch.tensor(pos_h[c0:min(c0 + gs, nq)], device=dev))

    out_scale = torch.empty((rows, ng), dtype=torch.float32, device=dev)
    out_zero = torch.empty((rows, ng), dtype=torch.uint8, device=dev)

    def form(g, vals):
        """The group's (scale, zero) as float32 and as float64 (the division's precision)."""
        if grid:
            s, z = scale[:, g], zero[:, g].to(torch.float64)
        else:
            lo = vals.amin(dim=1).clamp(max=0.0)
            hi = vals.amax(dim=1).clamp(min=0.0)
            s, z = _range_params(lo, hi, maxq, fp16_scales)
        out_scale[:, g] = s
        out_zero[:, g] = z.to(torch.uint8)
        return s, z.to(torch.float32), s.to(torch.float64), z

    # every group's parameters as formed; a column uses its own group's (with act_order the
    # groups' columns interleave in the loop)
    params = {}
    if not gs:  # parameters from the original row, as gptq.py's find_params(W)
        params[0] = form(0, W[:, :nq])
    codes_l = torch.empty((rows, nq), dtype=torch.uint8, device=dev)  # loop order
    wq_l = torch.empty((rows, nq), dtype=torch.float32, device=dev)
    loss = torch.zeros((), dtype=torch.float64, device=dev)
    bs = min(blocksize, nq)
    # Per column, the C++ loop's operations in its order and precision; the float64 ±512 clamp
    # before rounding is left out (it cannot change a code: beyond it the code clamps to 0 or
    # maxq either way). Codes, errors and residuals are kept per block and stored once.
    for i1 in range(0, nq, bs):
        i2 = min(i1 + bs, nq)
        nb = i2 - i1
        W1 = Wc[:, i1:i2].clone()
        Err = torch.empty((rows, nb), dtype=torch.float32, device=dev)
        Res = torch.empty((rows, nb), dtype=torch.float32, device=dev)
        Cod = torch.empty((rows, nb), dtype=torch.float32, device=dev)
        Ub = U[i1:i2, i1:i2]
        for i in range(nb):
            col = i1 + i
            if col in forms:
                g, cols = forms[col]
                params[g] = form(g, Wc[:, cols])
            s32, z32, s64, z64 = params[perm_h[col] // gs if gs else 0]
            w = W1[:, i]
            v = torch.round(w.to(torch.float64).div_(s64)).add_(z64).clamp_(0, maxq)
            c = Cod[:, i]
            c.copy_(v)  # integers: exact in float32
            dq = wq_l[:, col]
            torch.mul(s32, c - z32, out=dq)
            r = Res[:, i]
            torch.sub(w, dq, out=r)
            e = Err[:, i]
            torch.div(r, Ud[col], out=e)
            if i + 1 < nb:
                W1[:, i + 1:].sub_(torch.outer(e, Ub[i, i + 1:]))
        codes_l[:, i1:i2] = Cod.to(torch.uint8)
        loss += (Res.to(torch.float64) ** 2 / Ud2[i1:i2]).sum()
        if i2 < nq:
            Wc[:, i2:nq] -= Err @ U[i1:i2, i2:nq]
    codes = torch.empty_like(codes_l)
    wq = torch.empty_like(wq_l)
    if act_order:
        codes[:, perm[:nq]] = codes_l
        wq[:, perm[:nq]] = wq_l
    else:
        codes, wq = codes_l, wq_l
    loss_v = float(loss) / 2.0
    return TorchGPTQResult(codes, out_scale, out_zero, wq, loss_v, damp, n_dead, perm,
                           {"factor": t1 - t0, "loop": time.perf_counter() - t1})
