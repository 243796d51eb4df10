"""Fuzz targets shared by the hypothesis tests (tests/test_fuzz.py) and the coverage-guided
atheris driver (fuzz/run_atheris.py). Each target takes raw bytes and must either succeed or
raise one of the documented Python exceptions; anything else (a crash, a hang, another exception
type) is a finding."""

from __future__ import annotations

import json
import os
import struct
import tempfile

import numpy as np

from hiquant import quantizer as qz
from hiquant._safetensors_io import SafetensorsFile
from hiquant.errors import HiquantError
from hiquant.packed import layer_from_tensors

EXPECTED = (HiquantError, ValueError, TypeError, OverflowError)


def safetensors_reader(data: bytes) -> None:
    """Arbitrary bytes as a .safetensors file: parse, then read every tensor it claims."""
    fd, path = tempfile.mkstemp(suffix=".safetensors")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            st = SafetensorsFile(path)
            for name in st.tensors:
                st.array(name).sum()
        except EXPECTED:
            pass
    finally:
        os.unlink(path)


def safetensors_header(data: bytes) -> None:
    """Structured: a valid 8-byte length + JSON header built from the bytes, random payload."""
    if len(data) < 4:
        return
    n_tensors = data[0] % 4
    header = {}
    pos = 1
    for i in range(n_tensors):
        if pos + 3 > len(data):
            break
        dt = ["F32", "F16", "BF16", "U8", "X9"][data[pos] % 5]
        shape = [data[pos + 1] % 7, data[pos + 2] % 5]
        a = data[pos] * 3
        b = a + (data[pos + 1] * data[pos + 2]) % 97
        header[f"t{i}"] = {"dtype": dt, "shape": shape, "data_offsets": [a, b]}
        pos += 3
    body = json.dumps(header).encode()
    blob = struct.pack("<Q", len(body)) + body + data[pos:]
    safetensors_reader(blob)


def packed_layer(data: bytes) -> None:
    """A packed layer whose config entry and tensors come from the bytes."""
    if len(data) < 8:
        return
    d_out, d_in, k = 1 + data[0] % 9, 1 + data[1] % 17, data[2] % 20
    b_low, b_high, group = [2, 3, 4, 8, 5][data[3] % 5], [2, 3, 4, 8, 16, 1][data[4] % 6], data[5] % 9 - 1
    rng = np.random.default_rng(int.from_bytes(data[6:8], "little"))
    scale_bits = [16, 8, 6, 4][data[2] % 4] if len(data) > 8 else 16
    entry = {"d_out": d_out, "d_in": d_in, "k": k, "b_low": b_low, "b_high": b_high, "group_size": group,
             "scale_bits": scale_bits}
    version = 2
    if len(data) > 9:  # rows per super-scale (version 2), legal and malformed; or version 1
        rows = [None, {"low": 1}, {"low": 2, "high": 3}, {"low": 0}, "x", {"mid": 1}, {"low": True},
                {"high": 10**12}, {"low": -3}, {"low": 2.5}][data[9] % 10]
        if rows is not None:
            entry["scale_super_rows"] = rows
        version = 1 + (data[9] >= 128)
    tensors = {}
    for part in ("low", "high"):
        tensors[f"x.{part}.qweight"] = rng.integers(0, 256, size=rng.integers(0, 40), dtype=np.uint8)
        ng = rng.integers(0, 4)
        r = rng.random()
        tensors[f"x.{part}.scales"] = (
            rng.standard_normal((d_out, ng)).astype(np.float16) if scale_bits == 16 or r < 0.2 else
            rng.integers(0, 256, size=(d_out, ng), dtype=np.uint8) if r < 0.6 else
            rng.integers(0, 256, size=rng.integers(0, d_out * 4), dtype=np.uint8))  # packed 6-bit
        tensors[f"x.{part}.scales_super"] = rng.standard_normal(rng.integers(0, d_out + 2)).astype(np.float16)
        tensors[f"x.{part}.qzeros"] = rng.integers(0, 256, size=rng.integers(0, 8), dtype=np.uint8)
    tensors["x.high_mask"] = rng.integers(0, 256, size=(d_in + 7) // 8, dtype=np.uint8)
    tensors["x.high.weight"] = rng.standard_normal((d_out, k)).astype(np.float16)
    try:
        layer_from_tensors("x", entry, tensors, version=version).dequantize()
    except EXPECTED:
        pass


def quantizer_bindings(data: bytes) -> None:
    """Every binding with arrays and arguments derived from the bytes."""
    if len(data) < 6:
        return
    rows, cols = data[0] % 5, data[1] % 9
    bits = int.from_bytes(data[2:3], "little", signed=True) % 12 - 1
    group = int.from_bytes(data[3:4], "little", signed=True)
    dtype = [np.float32, np.float64, np.float16, np.uint8, np.int32][data[4] % 5]
    payload = np.frombuffer(data[6:] + b"\0" * 512, dtype=np.uint8)[: rows * cols * 4]
    with np.errstate(all="ignore"):
        W = (payload.view(np.float32)[: rows * cols].reshape(rows, cols).astype(dtype) if rows * cols
             else np.zeros((rows, cols), dtype))
    if data[5] & 1 and W.ndim == 2 and W.shape[1] > 1:
        W = W[:, ::2]  # non-contiguous
    for call in (
        lambda: qz.fake_quantize(W, bits, group),
        lambda: qz.minmax_params(W, bits, group),
        lambda: qz.pack_codes(np.asarray(payload[: rows * 3]), bits),
        lambda: qz.unpack_codes(np.asarray(payload[: rows]), bits, cols),
        lambda: _gptq_on_grid(W, bits, group, (data[5] >> 1) % (cols + 2), payload),
    ):
        try:
            call()
        except (EXPECTED + (ArithmeticError,)):
            pass


def _gptq_on_grid(W, bits, group, n_quant, payload):
    """GPTQ on a fixed grid with scales, zero points and n_quant from the bytes (any of them may
    be wrong: NaN or zero scales, zero points above 2^bits - 1, shapes that do not match)."""
    from hiquant import learners as K
    cols = W.shape[1] if W.ndim == 2 else 0
    raw = np.resize(payload, 4 * (cols + W.shape[0] * 64)) if payload.size else np.zeros(0, np.uint8)
    H = np.diag(1.0 + np.resize(raw, cols).astype(np.float64)) if cols else np.zeros((0, 0))
    ng = max(1, -(-max(n_quant, 1) // group)) if group > 0 else 1
    n = W.shape[0] * ng
    with np.errstate(all="ignore"):
        scale = np.resize(raw, 4 * n).view(np.float32).reshape(-1, ng)
    zero = np.resize(raw, n).reshape(-1, ng)
    K.gptq(W, H, bits=bits, group_size=group, scale=scale, zero=zero, n_quant=n_quant)


def packed_matmul(data: bytes) -> None:
    """A valid packed layer of any shape, widths, grouping, scale storage and high part, from the
    bytes (RTN codes of weights drawn from them), times activations on every native kernel: each
    equals dequantize-then-multiply within float32 rounding (the table kernel reads its own
    bit-plane copy of the 2-bit parts), and the table kernel with int8 tables equals their
    float64 twin within the same rounding."""
    if len(data) < 8:
        return
    from hiquant._reference import packed_matmul as ref
    from hiquant.packed_matmul import PackedLinear, kernel_name
    from hiquant.storage import QuantizedLayer
    d_out, d_in = 1 + data[0] % 40, 1 + data[1] % 200
    b_low, b_high = [2, 3, 4, 6, 8][data[2] % 5], [2, 3, 4, 6, 8, 16][data[3] % 6]
    group = [0, 1, 5, 8, 31, 32, 33, 64, 100][data[4] % 9]
    k = data[5] % (d_in + 1) if data[5] >= 64 else 0
    scale_bits = [16, 8, 6][data[6] % 3]
    rng = np.random.default_rng(int.from_bytes(data[7:9], "little"))
    W = (rng.standard_normal((d_out, d_in)) * 10.0 ** rng.integers(-3, 3)).astype(np.float32)
    hi = np.sort(rng.choice(d_in, k, replace=False)) if k else ()
    pl = PackedLinear.from_layer(QuantizedLayer.rtn("x", W, b_low, group, hi, b_high if k else 0,
                                                    scale_bits))
    Wq = pl.dequantize().astype(np.float64)
    x = rng.standard_normal((1 + (data[-1] % 3 if len(data) > 9 else 0), d_in)).astype(np.float32)
    bound = ref.error_bound(d_out, d_in, pl._parts, x)
    for kernel in ("portable",) + (("avx2", "lut") if kernel_name() == "avx2-fma" else ()):
        err = np.abs(pl.matmul(x, kernel=kernel).astype(np.float64) - x.astype(np.float64) @ Wq.T)
        if not np.all(err <= 4e-6 * bound + 1e-30):
            raise AssertionError(f"kernel {kernel}: the product differs from the dequantized "
                                 f"weights by {err.max()} (bound {bound.max()})")
    if kernel_name() == "avx2-fma":  # the int8 tables: as their twin computes them
        p8 = PackedLinear(pl.name, d_out, d_in, pl._parts, tables="int8")
        err = np.abs(p8.matmul(x, kernel="lut") - ref.int8_table_matmul(d_out, d_in, pl._parts, x))
        if not np.all(err <= 4e-6 * bound + 1e-30):
            raise AssertionError(f"int8 tables: the product differs from their twin by "
                                 f"{err.max()} (bound {bound.max()})")


TARGETS = {
    "safetensors_reader": safetensors_reader,
    "safetensors_header": safetensors_header,
    "packed_layer": packed_layer,
    "packed_matmul": packed_matmul,
    "quantizer_bindings": quantizer_bindings,
}
