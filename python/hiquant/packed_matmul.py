"""Matrix products straight from hiquant's packed format (native kernels, no float weights).

:class:`PackedLinear` holds one linear layer exactly as the packed export stores it (the bit
streams of :mod:`hiquant.packed`: codes at b_low / b_high bits, zero points, float16 or 8/6-bit
double-quantized scales with float16 super-scales, an optional float16 high part, the high-impact
column mask) and computes ``y = x @ W.T`` from those bytes, one token (GEMV) or a few (small-batch
GEMM) at a time, with AVX2+FMA where the CPU has it (``kernel="auto"``) and a portable kernel
otherwise. ``W`` itself is never formed; :meth:`PackedLinear.dequantize` forms it on request.

Kernels: ``"avx2"`` forms each weight ``s * (code - zero)`` in registers; ``"lut"`` (T-MAC's
table lookup) keeps a bit-plane copy of the codes of the 2-bit parts and of 3-bit high-impact
parts (at most half the columns), built when the layer is (:attr:`PackedLinear.planes_nbytes`
bytes, the codes' size again), and forms each group's ``s * (sum code*x - zero * sum x)`` from
per-token tables of subset sums of a few activations; ``"portable"`` forms the same group sums
column by column. ``"auto"`` takes the table kernel for one token (decode), the register kernel
for a few, dequantized blocks and the GEMM micro-kernel from 24 tokens on. Every kernel equals
dequantize-then-multiply within float32 rounding (the float64 twin is
:mod:`hiquant._reference.packed_matmul`) and gives results identical for any thread count; the
kernels differ in the last bits.

Tables (``tables=`` when the layer is built): ``"float32"`` (the default) keeps the table kernel
exact as above. ``"int8"`` is T-MAC's faster route, opt-in: the tables of each group of
activations are rounded to 8-bit integers (one scale per group and token), so a product on them
differs from the exact one by the error of 8-bit activations, at most ``|s| * xs / 2 *
(2^bits - 1) * ceil(g / 4)`` per (row, group) of a laid-out part, ``xs`` the group's largest
table entry / 127 (:func:`hiquant._reference.packed_matmul.int8_table_error_bound`; the twin
:func:`~hiquant._reference.packed_matmul.int8_table_matmul` computes the same tables). Only the
table kernel reads them, and ``"auto"`` takes it with int8 tables for products of up to 8
tokens (decode steps of up to 8 sequences, where it is 1.3-4x faster than the register kernel;
with float32 tables for one token): the other kernels, and every longer product under
``"auto"`` (prefill, evaluation), stay exact.
"""

from __future__ import annotations

import numpy as np

from . import _core
from ._threads import resolve_n_threads
from .errors import CheckpointError, InvalidArgumentError

__all__ = ["PackedLinear", "RowStack", "kernel_name", "KERNELS", "TABLES"]

KERNELS = ("auto", "portable", "avx2", "lut")
TABLES = ("float32", "int8")


def kernel_name(kernel: str = "auto") -> str:
    """The kernel ``kernel`` runs on this CPU: ``"avx2-fma"``, ``"avx2-lut"`` or ``"portable"``
    (``"auto"`` names the instruction set: ``"avx2-fma"`` also where decode takes the table
    kernel)."""
    return _core.packed_kernel_name(kernel)


def _part_from_tensors(prefix: str, tensors: dict, n_cols: int, bits: int, group: int,
                       scale_bits: int, rows, cols) -> dict:
    part = {"bits": int(bits), "n_cols": int(n_cols), "cols": cols, "group_size": int(group),
            "scale_bits": int(scale_bits)}
    if n_cols == 0:
        return part
    if bits == 16:
        part["weight"] = np.ascontiguousarray(tensors[f"{prefix}.weight"])
        return part
    for key in ("qweight", "qzeros", "scales"):
        part[key] = np.ascontiguousarray(tensors[f"{prefix}.{key}"])
    if scale_bits != 16:
        part["scales_super"] = np.ascontiguousarray(tensors[f"{prefix}.scales_super"])
        part["super_rows"] = int(rows)
    return part


class PackedLinear:
    """One linear layer's weight ``(d_out, d_in)`` in hiquant's packed format, used as an operator:
    ``matmul(x)`` is ``x @ W.T`` for ``x`` float32 ``(d_in,)`` or ``(n_tokens, d_in)``.

    Build it with :meth:`from_layer` (a :class:`hiquant.storage.QuantizedLayer`) or
    :meth:`from_tensors` (the packed export's tensors and config entry, without unpacking).
    ``tables``: the table kernel's tables, ``"float32"`` (exact) or ``"int8"`` (faster decode,
    8-bit activation error; see the module docstring)."""

    def __init__(self, name: str, d_out: int, d_in: int, parts: list[dict],
                 tables: str = "float32"):
        if tables not in TABLES:
            raise InvalidArgumentError(f"tables must be one of {TABLES}, got {tables!r}")
        self.name, self.d_out, self.d_in = name, int(d_out), int(d_in)
        self._parts = parts
        self._m = _core.PackedMatrix(self.d_out, self.d_in, parts, 0, tables)

    @property
    def tables(self) -> str:
        """The table kernel's tables: ``"float32"`` or ``"int8"``."""
        return str(self._m.tables)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.d_out, self.d_in)

    @property
    def nbytes(self) -> int:
        """Bytes of weight data one product reads (codes, parameters, column indices)."""
        return int(self._m.nbytes)

    @property
    def decode_nbytes(self) -> int:
        """Bytes of weight data a one-token product (``kernel="auto"``) reads: :attr:`nbytes`,
        with the laid-out parts' bytes replaced by their table-kernel copy where there is one."""
        return int(self._m.decode_nbytes)

    @property
    def planes_nbytes(self) -> int:
        """Bytes of the table kernel's copy of the laid-out parts (bit-plane codes, scales and
        zero points reordered), held in memory beside the packed bytes (0 where the CPU lacks
        AVX2)."""
        return int(self._m.planes_nbytes)

    @classmethod
    def from_tensors(cls, name: str, entry: dict, tensors: dict, version: int = 2,
                     where: str = "packed checkpoint", tables: str = "float32") -> "PackedLinear":
        """From a packed export's tensors of layer ``name`` (``{tensor name: array}``) and its
        ``quantization_config.json`` entry. The tensors are validated by the same reader that
        :func:`hiquant.load_packed` uses, and kept as they are (no unpacking)."""
        from .packed import layer_from_tensors
        ql = layer_from_tensors(name, entry, tensors, where=where, version=version)  # validates
        k, d_in = ql.k, ql.d_in
        b_high = int(entry["b_high"]) if k else 0
        low_cols = ql.low_idx() if k else None
        parts = []
        rows = {"low": ql.low.super_rows if ql.low is not None else None,
                "high": ql.high.super_rows if ql.high is not None else None}
        sb = ql.scale_bits
        try:
            parts.append(_part_from_tensors(f"{name}.low", tensors, d_in - k, ql.b_low,
                                            ql.group_size, sb, rows["low"], low_cols))
            if k:
                parts.append(_part_from_tensors(f"{name}.high", tensors, k, b_high, ql.group_size,
                                                sb, rows["high"], ql.high_idx))
        except KeyError as e:
            raise CheckpointError(f"{where}: tensor {e.args[0]} is missing") from None
        return cls(name, ql.d_out, d_in, parts, tables=tables)

    @classmethod
    def from_layer(cls, ql, tables: str = "float32") -> "PackedLinear":
        """From a :class:`hiquant.storage.QuantizedLayer` (packed as the exporter packs it)."""
        from .export import layer_entry, layer_tensors
        return cls.from_tensors(ql.name, layer_entry(ql), layer_tensors(ql), tables=tables)

    def matmul(self, x: np.ndarray, *, n_threads=None, kernel: str = "auto") -> np.ndarray:
        """``x @ W.T``: float32 ``(d_in,)`` → ``(d_out,)``, ``(n, d_in)`` → ``(n, d_out)``
        (C-contiguous; a wrong dtype raises InvalidTypeError, a wrong shape
        InvalidArgumentError). ``kernel``: "auto", "portable", "avx2" or "lut"."""
        if kernel not in KERNELS:
            raise InvalidArgumentError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        return self._m.matmul(x, resolve_n_threads(n_threads), kernel)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.matmul(x)

    def dequantize(self) -> np.ndarray:
        """The float32 weight ``(d_out, d_in)`` (formed here; the products never form it)."""
        from ._reference.packed_matmul import dequantize_parts
        return dequantize_parts(self.d_out, self.d_in, self._parts).astype(np.float32)

    def __repr__(self) -> str:
        return f"PackedLinear({self.name!r}, {self.d_out}x{self.d_in}, {self.nbytes} bytes)"



class RowStack:
    """Operators whose weights share their input, stacked by rows: ``matmul(x)`` is
    ``x @ [W_1; W_2; ...].T``, the outputs of each operator's ``matmul`` side by side
    (float32 ``(n, sum d_out)``). The NumPy runtime runs q/k/v and gate/up this way on
    :class:`PackedLinear` operators, as it runs one product on their stacked dense weights."""

    def __init__(self, ops):
        ops = list(ops)
        if not ops or len({op.d_in for op in ops}) != 1:
            raise InvalidArgumentError("RowStack needs one or more operators with the same d_in, "
                                       f"got {[getattr(op, 'shape', None) for op in ops]}")
        self.ops = ops
        self.d_in = ops[0].d_in
        self.d_out = sum(op.d_out for op in ops)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.d_out, self.d_in)

    @property
    def nbytes(self) -> int:
        return sum(op.nbytes for op in self.ops)

    @property
    def decode_nbytes(self) -> int:
        return sum(op.decode_nbytes for op in self.ops)

    @property
    def planes_nbytes(self) -> int:
        return sum(op.planes_nbytes for op in self.ops)

    def matmul(self, x: np.ndarray, *, n_threads=None, kernel: str = "auto") -> np.ndarray:
        """``x @ W.T`` for ``x`` float32 ``(n, d_in)`` → ``(n, d_out)``."""
        if not isinstance(x, np.ndarray) or x.ndim != 2:
            raise InvalidArgumentError(f"x must be a 2-D float32 array (n, {self.d_in}), got "
                                       f"{getattr(x, 'shape', type(x).__name__)}")
        y = np.empty((x.shape[0], self.d_out), dtype=np.float32)
        r0 = 0
        for op in self.ops:
            y[:, r0:r0 + op.d_out] = op.matmul(x, n_threads=n_threads, kernel=kernel)
            r0 += op.d_out
        return y

    def dequantize(self) -> np.ndarray:
        return np.concatenate([op.dequantize() for op in self.ops], axis=0)

    def __repr__(self) -> str:
        return f"RowStack({self.ops!r})"
