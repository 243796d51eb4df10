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

import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .config import EXPORTS, FISHER_DIAGONAL_ESTIMATORS, QuantizeSettings, needs_input_grams, resolve
from .errors import InvalidArgumentError, NumericalError
from .report import Report, versions

__all__ = ["Report", "quantize"]  # Report is defined in hiquant.report


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
    from . import torch_pipeline
    from .stats import collect_stats, load_or_collect
    iqp = spec.allocation == "iqp"
    kw = dict(gram=iqp and needs_input_grams(s.estimator, s.option_delta), fisher=True,
              progress=progress, n_threads=s.n_threads,
              fisher_full=iqp and s.estimator in FISHER_DIAGONAL_ESTIMATORS)
    # a device runtime computes the per-sequence gradients and their squares on its device
    collect = torch_pipeline.collect_fisher if torch_pipeline.is_device(model) else collect_stats
    if cache_dir is not None:
        return load_or_collect(cache_dir, model, windows, calib=calib_settings, collect=collect,
                               **kw)
    return collect(model, windows, **kw)


def _plans(model, windows, s, spec, shapes, st, timings, progress, state=None, resume=False):
    """One LayerPlan per layer (allocate.plan_layers), with M built first for the IQP. Timings:
    "sensitivity matrix" (M) and "allocation" (the plans), each counted once. With a progress
    ``state``, the measured M's finished blocks are saved as they finish and, with ``resume``,
    the saved ones are not recomputed."""
    from . import allocate
    sm = None
    if spec.allocation == "iqp":
        bar = _bar(progress, f"sensitivity matrix ({s.estimator})")
        with _Timer(timings, "sensitivity matrix"):
            try:
                sm = allocate.sensitivity_matrix(
                    model, windows, estimator=s.estimator, fisher_col=st.fisher_col,
                    fisher=st.fisher if s.estimator in FISHER_DIAGONAL_ESTIMATORS else None,
                    fisher_row=st.fisher_row,
                    option_delta=s.option_delta, grams=st.gram or None,
                    scale_bits=int(s.scale_bits), act_order=bool(s.gptq_act_order),
                    percdamp=float(s.gptq_percdamp),
                    candidates=s.candidates, b_low=s.wbits, b_high=s.hbits,
                    group_size=s.group_size, names=list(shapes),
                    n_windows=min(s.m_windows, len(windows)), pairs=s.m_pairs,
                    progress=bar.update_to if bar is not None else None, n_threads=s.n_threads,
                    partial=state.m_blocks() if state is not None and resume else None,
                    on_block=state.save_m_block if state is not None else None)
            finally:
                if bar is not None:
                    bar.close()
    with _Timer(timings, "allocation"):
        plans, alloc = allocate.plan_layers(s, shapes, fisher_col=st.fisher_col if st else None,
                                            sensitivity=sm)
    record = None
    if alloc is not None:
        record = {k: v for k, v in alloc.to_dict().items() if k != "layers"}
        record["m_seconds"] = sm.seconds
    return plans, record


def _bar(enabled: bool, desc: str):
    """A tqdm bar with ``update_to(done, total)`` for the (done, total) progress callbacks."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    class _Bar(tqdm):
        def update_to(self, done, total):
            self.total = total
            self.update(done - self.n)

    return _Bar(desc=desc, unit="step", leave=False)


def _quantize_block(model, b, h, h_fp, plans, kind, s):
    """Quantize block ``b`` (inputs ``h`` from the quantized blocks before it; ``h_fp`` the
    full-precision path's, for the block-wise objectives). Returns ``({name: QuantizedLayer},
    targets)`` with the block's weights in ``model`` left quantized."""
    from . import blockwise, torch_pipeline
    from .methods import quantizer
    from .stats import block_grams
    names = model.block_linear_names(b)
    dev = torch_pipeline.enabled(model, s)  # h is a device tensor: statistics on the device

    def grams_of_block():
        if dev:
            return torch_pipeline.block_grams(model, b, h, batch_size=bs)
        return block_grams(model, b, h, batch_size=bs, n_threads=s.n_threads)
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
        grams = grams_of_block() if kind != "rtn" else {}
        if s.objective == "refine":
            return blockwise.refine_block(model, b, h, targets, plans, kind, s, grams, aug), targets
        method = quantizer(kind)
        notes = {}
        prepare = getattr(method, "prepare_block", None)
        if prepare is not None:  # an equivalent transform of the block (awq), then its statistics
            notes = prepare(model, b, grams, {n: plans[n] for n in names}, s) or {}
            grams = grams_of_block()
        for n in names:
            out[n] = method.quantize(n, model.get_weight(n), grams.get(n), plans[n], s)
            out[n].info.update(notes.get(n, {}))
    for n, ql in out.items():
        model.set_weight(n, ql)  # kept quantized: ~1 byte per weight
    return out, targets


def quantize(model_dir, calib=None, *, settings: QuantizeSettings | None = None, out=None,
             export: str = "both", eval_text=None, fp_eval: bool = False, overwrite: bool = False,
             progress: bool = True, model=None, cache_dir=None, progress_dir=None,
             resume: bool = False, **overrides) -> Report:
    """Quantize a Hugging Face model folder and return the run's :class:`Report`.

    ``model_dir``: the model folder; ``calib``: a calibration text file (plain text, WikiText raw
    or C4-style json/jsonl(.gz)); not needed by rtn, which uses no calibration data. ``settings``
    and/or keyword overrides of :class:`~hiquant.QuantizeSettings` (e.g. ``method="hiq",
    wbits=2, group_size=64, avg_bits=2.3``). Everything that can be checked without the model —
    settings, paths, the output folder — is checked first, then lengths and the budget against
    the model's config, all before any statistics. ``out``: an output folder (written
    atomically; an existing one is replaced only with ``overwrite`` and only if it is a previous
    hiquant output) that receives ``fake/`` (a Hugging Face folder with dequantized weights in the
    source dtype) and/or ``packed/`` (hiquant's packed format) as ``export`` says ("fake",
    "packed", "both"), plus ``report.json`` and ``report.md``. ``eval_text``: a text file to
    measure perplexity on — of the quantized weights in float32, exactly what ``packed/`` holds
    (``fake/`` rounds them to the source dtype); ``fp_eval`` also measures the unquantized model.
    ``model``: an already loaded runtime of ``model_dir`` to reuse (its weights are reset).
    ``cache_dir``: where calibration statistics are cached, keyed to the model files and the
    calibration settings. ``progress_dir``: where the run's state is saved after every block
    (atomically); with ``resume=True`` a killed run continues from its last completed block and
    ends with the same result as an uninterrupted run. The folder is removed on completion, and
    on a failure before the first block completes.
    """
    from . import preflight
    from .methods import METHODS
    from .model import load_model

    base = settings if settings is not None else QuantizeSettings()
    if not isinstance(base, QuantizeSettings):
        raise InvalidArgumentError(f"settings must be a hiquant.QuantizeSettings, got "
                                   f"{type(base).__name__}")
    s = resolve(base.replace(**overrides))  # validates every setting before any model work
    if export not in EXPORTS:
        raise InvalidArgumentError(f"export must be one of {', '.join(EXPORTS)}, got {export!r}")
    if export in ("compressed", "all") and s.abits:
        raise InvalidArgumentError(
            f"the compressed-tensors export holds the weights only, not the activation "
            f"quantization (abits={s.abits}); use export='packed' (which keeps it) or drop abits")
    spec = METHODS[s.method]
    # the validation split is carved from the calibration text; e2e tuning trains on it
    needs_calib = (spec.fisher or s.layer_quantizer != "rtn" or s.objective != "layer"
                   or s.val_windows > 0 or s.e2e_epochs > 0)
    if needs_calib:
        preflight.check_readable(calib, f"the calibration text of {s.method} (calib, --calib)")
    if eval_text is not None:
        preflight.check_readable(eval_text, "the evaluation text (eval_text, --eval-text)")
    if out is not None:
        preflight.check_output(out, overwrite)
    timings: dict = {}
    with _Timer(timings, "load"):
        if model is None and s.backend == "torch":
            from .torch_runtime import load_torch_model
            model = load_torch_model(model_dir, device=s.device)
        elif model is None:
            model = load_model(model_dir)
        else:
            model.reset_weights()
    shapes = {n: model.linear_shape(n) for n in model.linear_names()}
    n_weights = sum(a * b for a, b in shapes.values())
    # settles estimator="auto" (model size) and m_pairs="auto" (the fisher M's rank)
    s = resolve(s, n_weights=n_weights, n_layers=len(shapes), warn=False)
    if needs_calib:
        preflight.check_lengths(model, s.seqlen, "seqlen")
    if eval_text is not None:
        preflight.check_lengths(model, s.eval_seqlen, "eval_seqlen")
    from .allocate import check_budget
    check_budget(s, shapes)
    try:
        return _run(model, calib if needs_calib else None, s, spec, shapes, timings, out=out,
                    export=export, eval_text=eval_text, fp_eval=fp_eval, overwrite=overwrite,
                    progress=progress, cache_dir=cache_dir, progress_dir=progress_dir,
                    resume=resume)
    except NumericalError as e:  # name the tensor when the checkpoint itself is not finite
        from .checkpoint import first_nonfinite
        bad = first_nonfinite(model.source_tensors())
        if bad is None:
            raise
        raise NumericalError(f"{e} — tensor {bad!r} of {model.path} holds NaN or Inf; the "
                             "checkpoint is corrupt: re-export or re-download it") from e


def _run(model, calib, s, spec, shapes, timings, *, out, export, eval_text, fp_eval, overwrite,
         progress, cache_dir, progress_dir, resume) -> Report:
    """The stages after the checks (see :func:`quantize`)."""
    from . import calib as calib_mod
    from . import torch_pipeline
    from .blockwise import batches, block_outputs
    from .evaluate import perplexity
    from .preflight import output_error
    names = list(shapes)
    n_weights = sum(a * b for a, b in shapes.values())
    kind = s.layer_quantizer
    dev = torch_pipeline.enabled(model, s)  # calibration hidden states stay on the device
    windows, val_windows, calib_settings = None, None, None
    if calib is not None:
        with _Timer(timings, "calibration data"):
            windows, val_windows, calib_settings = calib_mod.calibration_split(
                model.tokenizer, calib, s.n_calib, s.seqlen, s.seed, val_windows=s.val_windows,
                val_seqlen=s.eval_seqlen, val_split=s.val_split)
    state = None
    if progress_dir is not None:
        from .progress import ProgressState, run_key
        # evaluation settings do not change the quantized result: not part of the key, so a run
        # resumes with other evaluation settings
        key_settings = {k: v for k, v in asdict(s).items() if not k.startswith("eval_")}
        try:
            state = ProgressState(progress_dir, run_key(key_settings, model.fingerprint(),
                                                        calib_settings or {}), resume=resume)
        except OSError as e:
            raise output_error(progress_dir, e, "the progress folder") from e
        if cache_dir is None:  # statistics survive a crash too
            cache_dir = Path(progress_dir) / "stats"
    try:
        # ---- statistics and plans
        restored = state.plans() if state is not None else None
        if restored is not None:
            from .progress import plans_from_json
            plans, allocation = plans_from_json(restored), state.meta.get("allocation")
        else:
            st = None
            if spec.fisher:
                with _Timer(timings, "fisher"):
                    st = _fisher_scores(model, windows, s, spec, calib_settings, cache_dir,
                                        progress)
            plans, allocation = _plans(model, windows, s, spec, shapes, st, timings, progress,
                                       state, resume)
            del st

        # ---- block-by-block quantization
        qlayers: dict = {}
        t_q = time.perf_counter()
        start = state.done_blocks if state is not None else 0
        h = h_fp = None
        if start:
            for b in range(start):
                for name, ql in state.load_block(b, model.block_linear_names(b),
                                                 state.meta["entries"]).items():
                    model.set_weight(name, ql)
                    qlayers[name] = ql
            for name, w in state.load_tensors().items():  # norms an equivalent transform changed
                model.set_norm_weight(name, w)
            h = state.load_hidden() if windows is not None else None
            if dev:
                h = torch_pipeline.to_device(model, h)
        elif windows is not None and dev:
            h = torch_pipeline.embed_windows(model, windows, s.calib_batch)
        elif windows is not None:
            h = np.concatenate([model.embed(windows[sl])
                                for sl in batches(len(windows), s.calib_batch)])
        block_obj = s.objective in ("block", "refine")
        if block_obj:
            h_fp = state.load_hidden("hidden_fp") if start else h.copy()
        for b in _progress_bar(range(start, model.num_blocks), progress,
                               desc=f"quantize ({s.method})", unit="block", initial=start,
                               total=model.num_blocks):
            done, targets = _quantize_block(model, b, h, h_fp, plans, kind, s)
            qlayers.update(done)
            if h is not None and dev:  # the next block's calibration inputs (none for rtn)
                h = torch_pipeline.block_outputs(model, b, h, s.calib_batch)
            elif h is not None:
                h = block_outputs(model, b, h, s.calib_batch, s.n_threads)
            if block_obj:
                h_fp = targets
            if state is not None:
                _save_progress(state, b, done, torch_pipeline.to_host(model, h) if dev else h,
                               h_fp, plans, allocation, model.modified_tensors())
        timings["quantize"] = time.perf_counter() - t_q
        del h, h_fp
        e2e_info = None
        if s.e2e_epochs:  # after the last block; a resumed run repeats it (deterministic)
            from .e2e import tune
            with _Timer(timings, "e2e"):
                qlayers, e2e_info = tune(
                    model, windows, qlayers, epochs=s.e2e_epochs, batch=s.e2e_batch,
                    norm_lr=s.e2e_norm_lr, scale_lr=s.e2e_scale_lr, seed=s.seed,
                    n_threads=s.n_threads, progress=progress)
    except BaseException as e:
        if state is not None and not state.done_blocks and not isinstance(e, KeyboardInterrupt):
            state.remove()  # nothing worth resuming: leave nothing behind
        raise

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
                    e2e=e2e_info, versions=versions())
    report.settings["calibration"] = calib_settings

    # ---- evaluation
    if eval_text is not None:
        with _Timer(timings, "evaluate"):
            test_ids = calib_mod.tokenize_text(model.tokenizer, calib_mod.load_text(eval_text),
                                               max_tokens=s.eval_windows * s.eval_seqlen)
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
                                   "seqlen": s.eval_seqlen, "windows": s.eval_windows,
                                   "weights": "the quantized weights in float32, as packed/ "
                                              "stores them (fake/ rounds them to "
                                              f"{model.config.source_dtype})"}

    if val_windows is not None:  # the validation windows held out of the calibration text
        with _Timer(timings, "validation"):
            model.set_activation_bits(s.abits)
            try:
                report.val_ppl = perplexity(model, val_windows.reshape(-1), s.eval_seqlen,
                                            len(val_windows), progress=progress)["ppl"]
            finally:
                model.set_activation_bits(None)

    # ---- export
    if out is not None:
        with _Timer(timings, "export"):
            from .export import write_outputs
            try:
                report.output = write_outputs(out, model, qlayers, report, export=export,
                                              overwrite=overwrite)
            except OSError as e:
                err = output_error(out, e)
                if state is not None:  # the quantized layers are not lost
                    err = type(err)(f"{err}; the quantized blocks are kept in {state.dir}: "
                                    "rerun the same command with --resume to write them")
                raise err from e
    if state is not None:
        state.remove()
    return report


def _save_progress(state, b, done, h, h_fp, plans, allocation, tensors=None) -> None:
    from .export import layer_entry
    from .preflight import output_error
    from .progress import plans_to_json
    entries = dict(state.meta["entries"]) if state.meta else {}
    entries.update({n: layer_entry(ql) for n, ql in done.items()})
    try:
        state.save_block(b, done, h, plans_to_json(plans), entries, allocation, hidden_fp=h_fp,
                         tensors=tensors)
    except OSError as e:
        raise output_error(state.dir, e, "the progress folder") from e
    if os.environ.get("HIQUANT_TEST_SLOW_BLOCKS"):  # test hook: widen the kill window
        time.sleep(float(os.environ["HIQUANT_TEST_SLOW_BLOCKS"]))
