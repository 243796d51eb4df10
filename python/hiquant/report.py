"""The report of a run (:class:`Report`): resolved settings with calibration and evaluation,
per-layer plans and bits, exact average bits, perplexities, stage timings, the allocation, library
versions and the outputs written; ``report.json`` / ``report.md`` in every output folder."""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["Report", "versions"]


@dataclass
class Report:
    """What a run did: resolved settings (with calibration and evaluation), per-layer plans and
    bits, the exact average bits, perplexities, stage timings, the allocation, library versions
    and the outputs written."""

    settings: dict
    model: str
    layers: list = field(default_factory=list)  # per-layer dicts
    avg_bits: float = float("nan")
    total_bits: int = 0
    n_weights: int = 0
    ppl: float | None = None
    fp_ppl: float | None = None
    val_ppl: float | None = None  # on the validation windows held out of the calibration text
    timings: dict = field(default_factory=dict)
    allocation: dict | None = None
    e2e: dict | None = None  # end-to-end tuning: its settings and mean training loss per epoch
    versions: dict = field(default_factory=dict)
    output: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, default=_json_default)

    def markdown(self) -> str:
        s = self.settings
        fmt = lambda v: "–" if v is None else v  # noqa: E731
        lines = [
            f"# hiquant report: {s['method']} W{s['wbits']} (b_H {s['hbits']}) g{s['group_size']}",
            "",
            f"model `{self.model}` · avg bits **{self.avg_bits:.4f}** · ppl **{fmt(self.ppl)}** "
            f"(FP {fmt(self.fp_ppl)})"
            + (f" · validation ppl **{self.val_ppl}**" if self.val_ppl is not None else ""),
            "",
            "| layer | shape | ratio | k | b_L | b_H | bits/weight |",
            "|---|---|---|---|---|---|---|",
        ]
        for L in self.layers:
            lines.append(f"| {L['name']} | {L['d_out']}×{L['d_in']} | {L['ratio']:.3f} | {L['k']} | "
                         f"{L['b_low']} | {L['b_high'] if L['k'] else '–'} | "
                         f"{L['bits_per_weight']:.4f} |")
        if self.e2e:
            losses = ", ".join(f"{v:.4f}" for v in self.e2e["epoch_loss"])
            lines += ["", f"end-to-end tuning: {self.e2e['epochs']} epoch(s), training loss "
                          f"per epoch {losses}"]
        lines += ["", "| stage | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in self.timings.items()]
        return "\n".join(lines) + "\n"


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


def versions() -> dict:
    """Versions of Python, hiquant and its dependencies, and the native build flags."""
    from importlib import metadata

    from . import _core
    out = {"python": platform.python_version()}
    for n in ("hiquant", "numpy", "safetensors", "tokenizers"):
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    out["build_flags"] = _core.build_flags
    return out
