"""Crash-safe progress of a quantization run: after every block, the block's quantized layers
and the calibration hidden states are written atomically, so a run killed at any point (SIGKILL
included) resumes from its last completed block and ends with a result identical to an
uninterrupted run."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from ._atomic import atomic_write_bytes, atomic_write_text
from .errors import InvalidArgumentError

STATE_VERSION = 3  # 2: hidden states named by block count, full-precision path kept;
# 3: 8-bit scales share a super-scale per block of rows (packed format version 2)


def run_key(settings: dict, model_fingerprint: dict, calib: dict) -> str:
    blob = json.dumps({"v": STATE_VERSION, "settings": settings, "model": model_fingerprint,
                       "calib": calib}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


class ProgressState:
    """A folder holding ``meta.json`` (run key, last completed block, plans), ``block-<b>.safetensors``
    (packed layers of block b), ``hidden.npy`` (the calibration hidden states after the last
    completed block) and ``m-block-<b>.npz`` (block b's rows of the measured sensitivity matrix,
    kept while M is built). Each file is replaced atomically; meta.json is written last, so it
    never points at a block whose files are incomplete."""

    def __init__(self, folder, key: str, *, resume: bool):
        self.dir = Path(folder)
        self.key = key
        meta = self.dir / "meta.json"
        self.meta = None
        if meta.exists():
            m = json.loads(meta.read_text())
            if not resume:
                raise InvalidArgumentError(
                    f"{self.dir} holds the progress of an earlier run; pass resume=True (--resume) "
                    "to continue it, or delete the folder to start over")
            if m.get("version") != STATE_VERSION:
                raise InvalidArgumentError(
                    f"{self.dir} holds progress written by another hiquant version (state format "
                    f"{m.get('version')}, this one reads {STATE_VERSION}); delete it to start over")
            if m.get("key") != key:
                raise InvalidArgumentError(
                    f"{self.dir} holds the progress of a run with other settings, model or "
                    "calibration data; it cannot be resumed with these (delete it to start over)")
            self.meta = m
        self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def done_blocks(self) -> int:
        return int(self.meta["done_blocks"]) if self.meta else 0

    def plans(self) -> dict | None:
        return self.meta.get("plans") if self.meta else None

    def load_hidden(self, which: str = "hidden") -> np.ndarray:
        """The hidden states after the last completed block: ``"hidden"`` (the quantized path)
        or ``"hidden_fp"`` (the full-precision path, kept by the block-wise objectives)."""
        path = self.dir / f"{which}-{self.done_blocks}.npy"
        if not path.exists():
            raise InvalidArgumentError(f"{self.dir} has no {which} states for block "
                                       f"{self.done_blocks}; it cannot be resumed with these "
                                       "settings (delete it to start over)")
        return np.load(path)

    def load_block(self, b: int, layer_names, entries: dict):
        from safetensors.numpy import load_file

        from .packed import layer_from_tensors
        tensors = load_file(str(self.dir / f"block-{b}.safetensors"))
        return {n: layer_from_tensors(n, entries[n], tensors, where=str(self.dir)) for n in layer_names}

    def load_tensors(self) -> dict:
        """The model's modified norm weights (``model.modified_tensors()``) after the last
        completed block, as saved with it; ``{}`` before the first."""
        if not self.done_blocks:
            return {}
        from safetensors.numpy import load_file
        tensors = load_file(str(self.dir / f"block-{self.done_blocks - 1}.safetensors"))
        return {k[len("modified/"):]: v for k, v in tensors.items() if k.startswith("modified/")}

    def save_block(self, b: int, qlayers: dict, hidden: np.ndarray, plans: dict, entries: dict,
                   allocation: dict | None = None, hidden_fp: np.ndarray | None = None,
                   tensors: dict | None = None) -> None:
        """``tensors``: the model's modified norm weights so far (saved in the block's file)."""
        from safetensors.numpy import save

        from .export import layer_tensors
        extra = {f"modified/{n}": np.ascontiguousarray(v) for n, v in (tensors or {}).items()}
        tensors = {}
        for ql in qlayers.values():
            tensors.update(layer_tensors(ql))
        tensors.update(extra)
        atomic_write_bytes(self.dir / f"block-{b}.safetensors", save(tensors))
        import io
        # hidden states are named by the block count they follow, so a kill between writing them
        # and meta.json leaves the previous block's states in place for the previous meta.json
        for which, arr in (("hidden", hidden), ("hidden_fp", hidden_fp)):
            if arr is None:
                continue
            buf = io.BytesIO()
            np.save(buf, arr)
            atomic_write_bytes(self.dir / f"{which}-{b + 1}.npy", buf.getvalue())
        self.meta = {"key": self.key, "version": STATE_VERSION, "done_blocks": b + 1,
                     "plans": plans, "entries": entries, "allocation": allocation}
        atomic_write_text(self.dir / "meta.json", json.dumps(self.meta, default=_jsonable))
        for which in ("hidden", "hidden_fp"):  # the states meta.json no longer points at
            (self.dir / f"{which}-{b}.npy").unlink(missing_ok=True)

    def save_m_block(self, b: int, sub: np.ndarray) -> None:
        """Keep block ``b``'s finished square sub-matrix of the measured M (its layers ×
        options), tagged with the run key, so that a run killed while building M resumes after
        the blocks already done (:func:`hiquant.allocate.sensitivity_matrix`'s ``partial``)."""
        import io
        buf = io.BytesIO()
        np.savez(buf, sub=np.asarray(sub, np.float64), key=np.array(self.key))
        atomic_write_bytes(self.dir / f"m-block-{int(b)}.npz", buf.getvalue())

    def m_blocks(self) -> dict:
        """``{block: sub-matrix}`` saved by :meth:`save_m_block` for this run key (files of
        another run are ignored)."""
        out = {}
        for path in sorted(self.dir.glob("m-block-*.npz")):
            try:
                with np.load(path) as z:
                    if str(z["key"]) == self.key:
                        out[int(path.stem[len("m-block-"):])] = z["sub"]
            except (OSError, ValueError, KeyError):
                continue  # unreadable: that block is recomputed
        return out

    def remove(self) -> None:
        import shutil
        shutil.rmtree(self.dir, ignore_errors=True)


def plans_to_json(plans: dict) -> dict:
    return {n: {"k": p.k, "high_idx": np.asarray(p.high_idx).tolist(), "b_low": p.b_low,
                "b_high": p.b_high, "group_size": p.group_size, "ratio": p.ratio}
            for n, p in plans.items()}


def plans_from_json(d: dict) -> dict:
    from .allocate import LayerPlan
    return {n: LayerPlan(v["k"], np.asarray(v["high_idx"], np.int64), v["b_low"], v["b_high"],
                         v["group_size"], v["ratio"]) for n, v in d.items()}


__all__ = ["ProgressState", "run_key", "plans_to_json", "plans_from_json"]
_ = os


def _jsonable(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
