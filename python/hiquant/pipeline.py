"""The quantization pipeline, :func:`quantize`: its stages in order.

settings (:func:`hiquant.config.resolve`) → model (:func:`hiquant.load_model`) → calibration
windows (:mod:`hiquant.calib`) → statistics (:mod:`hiquant.stats`: Fisher column scores) →
allocation (:func:`hiquant.allocate.plan_layers`: one plan per layer, with M for hiq) →
block-by-block quantization (:mod:`hiquant.methods` for the layer-wise objective,
:mod:`hiquant.blockwise` for the block-wise ones) → evaluation (:mod:`hiquant.evaluate`) →
export (:mod:`hiquant.export`).

Blocks are quantized in order; the calibration inputs of block b+1 are the outputs of the
already-quantized blocks 0..b (as in GPTQ and OmniQuant). Within a block the Gram matrices of
its linears come from one pass with the block's full-precision weights, then its layers are
quantized, then the block's outputs under quantized weights feed the next block. With a progress
folder the run saves its state after every block and resumes from the last completed one.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .config import EXPORTS, QuantizeSettings, resolve
from .errors import InvalidArgumentError

__all__ = ["Report", "quantize"]


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
    timings: dict = field(default_factory=dict)
    allocation: dict | None = None
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
            f"(FP {fmt(self.fp_ppl)})",
            "",
            "| layer | shape | ratio | k | b_L | b_H | bits/weight |",
            "|---|---|---|---|---|---|---|",
        ]
        for L in self.layers:
            lines.append(f"| {L['name']} | {L['d_out']}×{L['d_in']} | {L['ratio']:.3f} | {L['k']} | "
                         f"{L['b_low']} | {L['b_high'] if L['k'] else '–'} | "
                         f"{L['bits_per_weight']:.4f} |")
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


class _Timer:
    def __init__(self, timings: dict, key: str):
        self.timings, self.key = timings, key

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.timings[self.key] = self.timings.get(self.key, 0.0) + time.perf_counter() - self.t0


def _progress_bar(iterable, enabled: bool, **kw):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, **kw)


def _fisher_scores(model, windows, s, spec, calib_settings, cache_dir, progress):
    """Fisher statistics for the methods that keep high-impact columns: the column scores, plus
    the full diagonal when the diagonal M estimator needs it (bounded memory otherwise)."""
    from .stats import collect_stats, load_or_collect
    kw = dict(gram=False, fisher=True, progress=progress, n_threads=s.n_threads,
              fisher_full=spec.allocation == "iqp" and s.estimator == "diagonal")
    if cache_dir is not None:
        return load_or_collect(cache_dir, model, windows, calib=calib_settings, **kw)
    return collect_stats(model, windows, **kw)


def _plans(model, windows, s, spec, shapes, st, timings):
    """One LayerPlan per layer (allocate.plan_layers), with M built first for the IQP."""
    from . import allocate
    sm = None
    if spec.allocation == "iqp":
        t_m = time.perf_counter()
        sm = allocate.sensitivity_matrix(
            model, windows, estimator=s.estimator, fisher_col=st.fisher_col,
            fisher=st.fisher if s.estimator == "diagonal" else None, candidates=s.candidates,
            b_low=s.wbits, b_high=s.hbits, group_size=s.group_size, names=list(shapes),
            n_windows=min(s.m_windows, len(windows)), pairs=s.m_pairs)
        timings["sensitivity matrix"] = time.perf_counter() - t_m
    plans, alloc = allocate.plan_layers(s, shapes, fisher_col=st.fisher_col if st else None,
                                        sensitivity=sm)
    record = None
    if alloc is not None:
        record = {k: v for k, v in alloc.to_dict().items() if k != "layers"}
        record["m_seconds"] = sm.seconds
    return plans, record


def _quantize_block(model, b, h, h_fp, plans, kind, s):
    """Quantize block ``b`` (inputs ``h`` from the quantized blocks before it; ``h_fp`` the
    full-precision path's, for the block-wise objectives). Returns ``({name: QuantizedLayer},
    targets)`` with the block's weights in ``model`` left quantized."""
    from . import blockwise
    from .methods import quantizer
    from .stats import block_grams
    names = model.block_linear_names(b)
    bs, targets, aug = s.calib_batch, None, None
    if s.objective in ("block", "refine"):
        # the full-precision model's output from the full-precision inputs (so a block also
        # corrects the error it receives), computed before any of the block's weights change
        targets = blockwise.block_outputs(model, b, h_fp, bs, s.n_threads)
        if s.block_aug_loss:  # OmniQuant's aug_loss: the FP block on the quantized inputs
            aug = blockwise.block_outputs(model, b, h, bs, s.n_threads)
    out = {}
    if s.objective == "block":
        res = blockwise.block_pass(model, b, h, targets, {n: plans[n] for n in names}, s,
                                   adaround=kind == "hybrid", aug_targets=aug)
        info = {"objective": "block", "steps": blockwise.block_steps(len(h), s)}
        out = {n: res[n].to_layer(n, info=info) for n in names}
    else:
        grams = (block_grams(model, b, h, batch_size=bs, n_threads=s.n_threads)
                 if kind != "rtn" else {})
        if s.objective == "refine":
            return blockwise.refine_block(model, b, h, targets, plans, kind, s, grams, aug), targets
        method = quantizer(kind)
        notes = {}
        prepare = getattr(method, "prepare_block", None)
        if prepare is not None:  # an equivalent transform of the block (awq), then its statistics
            notes = prepare(model, b, grams, {n: plans[n] for n in names}, s) or {}
            grams = block_grams(model, b, h, batch_size=bs, n_threads=s.n_threads)
        for n in names:
            out[n] = method.quantize(n, model.get_weight(n), grams.get(n), plans[n], s)
            out[n].info.update(notes.get(n, {}))
    for n, ql in out.items():
        model.set_weight(n, ql)  # kept quantized: ~1 byte per weight
    return out, targets


def quantize(model_dir, calib, *, settings: QuantizeSettings | None = None, out=None,
             export: str = "both", eval_text=None, fp_eval: bool = False, overwrite: bool = False,
             progress: bool = True, model=None, cache_dir=None, progress_dir=None,
             resume: bool = False, **overrides) -> Report:
    """Quantize a Hugging Face model folder and return the run's :class:`Report`.

    ``model_dir``: the model folder; ``calib``: a calibration text file (plain text, WikiText raw
    or C4-style json/jsonl(.gz)); ``settings`` and/or keyword overrides of
    :class:`~hiquant.QuantizeSettings` (e.g. ``method="hiq", wbits=2, group_size=64,
    avg_bits=2.3``), resolved and validated before any model work. ``out``: an output folder
    (written atomically; never overwritten unless ``overwrite``) that receives ``fake/`` (a
    Hugging Face folder with dequantized weights in the source dtype) and/or ``packed/``
    (hiquant's packed format) as ``export`` says ("fake", "packed", "both"), plus
    ``report.json`` and ``report.md``. ``eval_text``: a text file to measure perplexity on (of
    the quantized model held in memory; ``fp_eval`` also measures the unquantized one).
    ``model``: an already loaded runtime of ``model_dir`` to reuse (its weights are reset).
    ``cache_dir``: where calibration statistics are cached, keyed to the model files and the
    calibration settings. ``progress_dir``: where the run's state is saved after every block
    (atomically); with ``resume=True`` a killed run continues from its last completed block and
    ends with the same result as an uninterrupted run. The folder is removed on completion.
    """
    from . import calib as calib_mod
    from .evaluate import perplexity
    from .methods import METHODS
    from .model import load_model

    base = settings if settings is not None else QuantizeSettings()
    if not isinstance(base, QuantizeSettings):
        raise InvalidArgumentError(f"settings must be a hiquant.QuantizeSettings, got "
                                   f"{type(base).__name__}")
    s = resolve(base.replace(**overrides))  # validates everything before any model work
    if export not in EXPORTS:
        raise InvalidArgumentError(f"export must be one of {', '.join(EXPORTS)}, got {export!r}")
    if out is not None and Path(out).exists() and not overwrite:
        raise InvalidArgumentError(f"{out} already exists; choose another folder or pass "
                                   "overwrite=True")
    spec = METHODS[s.method]
    kind = s.layer_quantizer
    timings: dict = {}
    with _Timer(timings, "load"):
        if model is None:
            model = load_model(model_dir)
        else:
            model.reset_weights()
    names = model.linear_names()
    shapes = {n: model.linear_shape(n) for n in names}
    n_weights = sum(a * b for a, b in shapes.values())
    s = resolve(s, n_weights=n_weights)  # settles estimator="auto", which needs the model size
    with _Timer(timings, "calibration data"):
        windows, calib_settings = calib_mod.calibration_windows(model.tokenizer, calib, s.n_calib,
                                                               s.seqlen, s.seed)

    state = None
    if progress_dir is not None:
        from .progress import ProgressState, run_key
        state = ProgressState(progress_dir, run_key(asdict(s), model.fingerprint(), calib_settings),
                              resume=resume)
        if cache_dir is None:  # statistics survive a crash too
            cache_dir = Path(progress_dir) / "stats"

    # ---- statistics and plans
    restored = state.plans() if state is not None else None
    if restored is not None:
        from .progress import plans_from_json
        plans, allocation = plans_from_json(restored), state.meta.get("allocation")
    else:
        st = None
        if spec.fisher:
            with _Timer(timings, "fisher"):
                st = _fisher_scores(model, windows, s, spec, calib_settings, cache_dir, progress)
        with _Timer(timings, "allocation"):
            plans, allocation = _plans(model, windows, s, spec, shapes, st, timings)
        del st

    # ---- block-by-block quantization
    from .blockwise import batches, block_outputs
    qlayers: dict = {}
    t_q = time.perf_counter()
    start = state.done_blocks if state is not None else 0
    if start:
        for b in range(start):
            for name, ql in state.load_block(b, model.block_linear_names(b),
                                             state.meta["entries"]).items():
                model.set_weight(name, ql)
                qlayers[name] = ql
        for name, w in state.load_tensors().items():  # norms an equivalent transform changed
            model.set_norm_weight(name, w)
        h = state.load_hidden()
    else:
        h = np.concatenate([model.embed(windows[sl])
                            for sl in batches(len(windows), s.calib_batch)])
    block_obj = s.objective in ("block", "refine")
    h_fp = (state.load_hidden("hidden_fp") if start else h.copy()) if block_obj else None
    for b in _progress_bar(range(start, model.num_blocks), progress,
                           desc=f"quantize ({s.method})", unit="block", initial=start,
                           total=model.num_blocks):
        done, targets = _quantize_block(model, b, h, h_fp, plans, kind, s)
        qlayers.update(done)
        h = block_outputs(model, b, h, s.calib_batch, s.n_threads)
        if block_obj:
            h_fp = targets
        if state is not None:
            from .export import layer_entry
            from .progress import plans_to_json
            entries = dict(state.meta["entries"]) if state.meta else {}
            entries.update({n: layer_entry(ql) for n, ql in done.items()})
            state.save_block(b, done, h, plans_to_json(plans), entries, allocation,
                             hidden_fp=h_fp, tensors=model.modified_tensors())
            if os.environ.get("HIQUANT_TEST_SLOW_BLOCKS"):  # test hook: widen the kill window
                time.sleep(float(os.environ["HIQUANT_TEST_SLOW_BLOCKS"]))
    timings["quantize"] = time.perf_counter() - t_q
    del h, h_fp

    total_bits = sum(ql.storage_bits() for ql in qlayers.values())
    layers = [dict(name=n, d_out=shapes[n][0], d_in=shapes[n][1], ratio=float(plans[n].ratio),
                   k=qlayers[n].k, b_low=qlayers[n].b_low, b_high=qlayers[n].b_high,
                   bits=qlayers[n].storage_bits(),
                   bits_per_weight=qlayers[n].storage_bits() / (shapes[n][0] * shapes[n][1]),
                   **{k: v for k, v in qlayers[n].info.items() if isinstance(v, (int, float, str))})
              for n in names]
    report = Report(settings=asdict(s), model=str(Path(model.path).resolve()), layers=layers,
                    avg_bits=total_bits / n_weights, total_bits=int(total_bits),
                    n_weights=int(n_weights), timings=timings, allocation=allocation,
                    versions=versions())
    report.settings["calibration"] = calib_settings

    # ---- evaluation
    if eval_text is not None:
        with _Timer(timings, "evaluate"):
            test_ids = calib_mod.tokenize_text(model.tokenizer, calib_mod.load_text(eval_text))
            model.set_activation_bits(s.abits)  # the inputs of every linear, per token
            try:
                report.ppl = perplexity(model, test_ids, s.eval_seqlen, s.eval_windows,
                                        progress=progress)["ppl"]
            finally:
                model.set_activation_bits(None)
            if fp_eval:
                mods = model.modified_tensors()  # norms of an equivalent transform (awq)
                model.reset_weights()
                report.fp_ppl = perplexity(model, test_ids, s.eval_seqlen, s.eval_windows,
                                           progress=progress)["ppl"]
                for n, ql in qlayers.items():
                    model.set_weight(n, ql)
                for n, w in mods.items():
                    model.set_norm_weight(n, w)
        report.settings["eval"] = {"file": str(Path(eval_text).resolve()),
                                   "seqlen": s.eval_seqlen, "windows": s.eval_windows}

    # ---- export
    if out is not None:
        with _Timer(timings, "export"):
            from .export import write_outputs
            report.output = write_outputs(out, model, qlayers, report, export=export,
                                          overwrite=overwrite)
    if state is not None:
        state.remove()
    return report
