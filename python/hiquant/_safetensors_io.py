"""Raw, validated, streaming access to safetensors files.

Why not only the `safetensors` package: its NumPy API has no bfloat16 (NumPy lacks the dtype) and
its writer needs every tensor in memory at once. hiquant copies tensors it does not quantize
byte-for-byte in their stored dtype (BF16 included) and writes checkpoints one tensor at a time,
so that exporting a 7B model never holds more than one tensor beyond the model itself. The file
format is small and fully specified (8-byte little-endian header length, a JSON header with
dtype/shape/data_offsets per tensor, then the data); every offset is validated against the file.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from .errors import CheckpointError, InvalidArgumentError

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U8": 1, "U16": 2, "U32": 4, "U64": 8, "BOOL": 1}
NUMPY_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
                "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "U16": np.uint16,
                "U32": np.uint32, "U64": np.uint64, "BOOL": np.bool_}
MAX_HEADER = 100 * 1024 * 1024  # the format's own limit


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple
    start: int  # absolute file offset of the data
    nbytes: int


def read_header(path: str | os.PathLike) -> tuple[dict, dict, int]:
    """Parse and validate a safetensors header: ({name: TensorInfo}, metadata, data_start)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes); "
                                      "re-download or re-export it")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path}: header length {n} does not fit in the file ({size} bytes); "
                                      "the file is truncated or corrupt")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    data_len = size - data_start
    infos = {}
    spans = []
    for name, d in header.items():
        if not isinstance(d, dict):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry")
        dtype, shape, offs = d.get("dtype"), d.get("shape"), d.get("data_offsets")
        if dtype not in DTYPE_BYTES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
        if (not isinstance(shape, list) or not all(isinstance(x, int) and x >= 0 for x in shape)
                or not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(x, int) for x in offs)):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed shape or data_offsets")
        a, b = offs
        nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPE_BYTES[dtype] if shape else DTYPE_BYTES[dtype]
        if not (0 <= a <= b <= data_len) or b - a != nbytes:
            raise CheckpointError(
                f"{path}: tensor {name!r} has data_offsets [{a}, {b}] that do not match its "
                f"{dtype}{tuple(shape)} size ({nbytes} bytes) within the {data_len}-byte data "
                "section; the file is corrupt")
        infos[name] = TensorInfo(name, dtype, tuple(shape), data_start + a, nbytes)
        spans.append((a, b, name))
    spans.sort()
    for (a0, b0, n0), (a1, b1, n1) in zip(spans, spans[1:]):
        if a1 < b0:
            raise CheckpointError(f"{path}: tensors {n0!r} and {n1!r} overlap in the data section; "
                                  "the file is corrupt")
    return infos, meta, data_start


class SafetensorsFile:
    """A validated, memory-mapped safetensors file; tensors are zero-copy NumPy views."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tensors, self.metadata, _ = read_header(self.path)
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None

    def raw(self, name: str) -> memoryview:
        t = self.tensors[name]
        return memoryview(self._mm)[t.start:t.start + t.nbytes]

    def array(self, name: str) -> np.ndarray:
        """The tensor in its stored dtype (BF16 as uint16 bit patterns); read-only, zero-copy."""
        t = self.tensors[name]
        dt = np.uint16 if t.dtype == "BF16" else NUMPY_DTYPES[t.dtype]
        return np.frombuffer(self._mm, dtype=dt, count=t.nbytes // np.dtype(dt).itemsize,
                             offset=t.start).reshape(t.shape)


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """Exact bfloat16 → float32: the 16 stored bits are the high half of the float32."""
    return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bit patterns, round-to-nearest-even (NaN kept quiet)."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    nan = np.isnan(x)
    out = rounded.astype(np.uint16)
    out[nan] = 0x7FC0
    return out


Producer = Callable[[], "bytes | memoryview | np.ndarray"]


def write_streaming(path: str | os.PathLike, entries: Iterable[tuple[str, str, tuple, Producer]],
                    metadata: dict | None = None) -> int:
    """Write a safetensors file one tensor at a time. ``entries``: (name, dtype, shape, producer)
    where producer() returns that tensor's bytes. Returns the file size. Not atomic by itself:
    callers write into a temporary folder (see hiquant._atomic)."""
    entries = list(entries)
    header = {}
    off = 0
    for name, dtype, shape, _ in entries:
        n = int(np.prod(shape, dtype=np.int64)) * DTYPE_BYTES[dtype] if shape else DTYPE_BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    hjson = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hjson += b" " * (-len(hjson) % 8)  # align the data section to 8 bytes, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for name, dtype, shape, produce in entries:
            data = produce()
            # a flat byte view; memoryview.cast refuses zero-size shapes such as the (d_out, 0)
            # scales of a layer whose every column is high-impact
            buf = (memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
                   if isinstance(data, np.ndarray) else memoryview(data).cast("B"))
            want = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
            if buf.nbytes != want:
                raise InvalidArgumentError(
                    f"tensor {name}: the producer gave {buf.nbytes} bytes but its header entry "
                    f"needs {want}; pass data of the declared dtype and shape")
            f.write(buf)
        f.flush()
        os.fsync(f.fileno())
        return f.tell()
