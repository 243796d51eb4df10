"""Settings of a quantization run: one frozen object, every option vocabulary and width rule, and
one :func:`resolve` that settles each ``"auto"`` and validates everything before any model work.

A typo costs a second, never a calibration pass: :func:`hiquant.quantize` calls :func:`resolve`
before it loads calibration text or runs the model, and the resolved settings are what the
report records.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from .errors import InvalidArgumentError, InvalidTypeError

__all__ = [
    "QuantizeSettings",
    "resolve",
    "settle_pairs",
    "WEIGHT_BITS",
    "FP16_BITS",
    "HIGH_BITS",
    "SCALE_BITS",
    "SCALE_CODE_BITS",
    "DEFAULT_CANDIDATES",
    "PAPER_CANDIDATES",
    "WIDE_CANDIDATES",
    "ESTIMATORS",
    "FISHER_DIAGONAL_ESTIMATORS",
    "STATISTICS_ESTIMATORS",
    "needs_input_grams",
    "OPTION_DELTAS",
    "OBJECTIVES",
    "REFINE_ORDERS",
    "LOW_ROUNDINGS",
    "LWC_SCHEDULES",
    "QUANTIZERS",
    "EXPORTS",
    "BACKENDS",
    "check_bits",
    "check_group_size",
    "check_scale_bits",
    "ACT_BITS",
    "check_abits",
    "default_high_bits",
]

# ---- width rules (the one definition; the packed format stores exactly these widths)
WEIGHT_BITS = (2, 3, 4, 6, 8)  # code widths of a quantized part
ACT_BITS = (8, 6, 4)  # per-token dynamic symmetric activation quantization (Model.set_activation_bits)
FP16_BITS = 16  # a "width" of the high-impact part: kept in float16, not quantized
HIGH_BITS = WEIGHT_BITS + (FP16_BITS,)
SCALE_BITS = (16, 8, 6)  # stored scales: float16, or double-quantized codes of 8 or 6 bits
SCALE_CODE_BITS = (8, 6)

# ---- option vocabularies
PAPER_CANDIDATES = (0.02, 0.05, 0.10, 0.15, 0.20)  # the paper's candidate ratios
# a wider set: on llama-bench the paper's cap (20%) binds in most layers at W2 and every layer at
# W3; the default since it won on the validation windows over three seeds (bench/RESULTS.md)
WIDE_CANDIDATES = (0.02, 0.05, 0.10, 0.15, 0.20, 0.30, 0.40, 0.50, 0.60, 0.80)
DEFAULT_CANDIDATES = WIDE_CANDIDATES
# end-to-end tuning's passes over the calibration windows where e2e_epochs is "auto" (chosen on
# the validation windows, bench/RESULTS.md)
E2E_AUTO_EPOCHS = 2
ESTIMATORS = ("measured", "fisher", "diagonal", "rank1", "kfac")  # M of the allocation IQP (allocate.py)
# the estimators built from the full empirical-Fisher diagonal of every layer (no model passes)
FISHER_DIAGONAL_ESTIMATORS = ("diagonal", "kfac")
# the estimators built from the calibration statistics alone, without passes over the model
STATISTICS_ESTIMATORS = FISHER_DIAGONAL_ESTIMATORS + ("rank1",)
# how an option's perturbation Δ is formed for M: round-to-nearest, or GPTQ's codes on the
# parts' min-max grids (the hybrid quantizer's structure, allocate.option_deltas)
OPTION_DELTAS = ("rtn", "gptq")
OBJECTIVES = ("layer", "block", "refine")  # learned quantizers' objective (blockwise.py)
REFINE_ORDERS = ("lwc-first", "adaround-first")
LOW_ROUNDINGS = ("nearest", "gptq")  # codes of an LWC low part on its learned grid
LWC_SCHEDULES = ("constant", "cosine")  # block-wise LWC learning-rate schedules
QUANTIZERS = ("rtn", "gptq", "lwc", "adaround", "hybrid", "awq", "smoothquant",
              "billm")  # layer quantizers (methods/)
# where calibration_split carves the validation windows: evenly spread over the text (the
# calibration windows drawn around them) or the text's last tokens
VAL_SPLITS = ("spread", "tail")
# "compressed": compressed-tensors pack-quantized (transformers, vLLM; export_compressed.py); "all": all three
EXPORTS = ("fake", "packed", "both", "compressed", "all")
BACKENDS = ("numpy", "torch")  # model runtimes: hiquant.model (NumPy), hiquant.torch_runtime
# estimator="auto": the diagonal estimator while the full Fisher diagonal (4 bytes per linear
# weight) fits in this many bytes, else rank1 (the same M from the diagonal's row and column
# sums: d_out + d_in numbers per layer)
DIAGONAL_AUTO_BYTES = 2 << 30


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def check_bits(bits, name: str = "bits", *, allow_fp16: bool = False) -> int:
    """``bits`` as an int if it is a stored width (:data:`WEIGHT_BITS`, or 16 = FP16 when
    ``allow_fp16``); else :class:`InvalidArgumentError` (:class:`InvalidTypeError` for a
    non-integer)."""
    allowed = HIGH_BITS if allow_fp16 else WEIGHT_BITS
    if not _is_int(bits):
        raise InvalidTypeError(f"{name} must be an int, got {type(bits).__name__}")
    if int(bits) not in allowed:
        raise InvalidArgumentError(f"{name} must be one of {', '.join(map(str, allowed))}"
                                   f"{' (16 = FP16)' if allow_fp16 else ''}, got {bits}")
    return int(bits)


def check_group_size(group_size, name: str = "group_size") -> int:
    """Columns per quantization group as an int: a positive int, or ``0`` / ``None`` / ``-1`` for
    one group per output row (per channel). A group at least as wide as the part is one group
    per row too. Anything else raises :class:`InvalidArgumentError`."""
    if group_size is None:
        return 0
    if not _is_int(group_size):
        raise InvalidTypeError(f"{name} must be an int or None, got {type(group_size).__name__}")
    g = int(group_size)
    if g < -1 or g >= 2**31:
        raise InvalidArgumentError(f"{name} must be a positive int, or 0 (one group per output "
                                   f"row); got {g}")
    return max(g, 0)


def check_abits(abits) -> int | None:
    """``abits`` as an int if it is one of :data:`ACT_BITS`, None for no activation
    quantization; else InvalidArgumentError / InvalidTypeError."""
    if abits is None:
        return None
    if not _is_int(abits):
        raise InvalidTypeError(f"abits must be an int or None, got {type(abits).__name__}")
    if int(abits) not in ACT_BITS:
        raise InvalidArgumentError(f"abits must be one of {', '.join(map(str, ACT_BITS))} "
                                   f"(per-token activation quantization) or None, got {abits}")
    return int(abits)


def check_scale_bits(scale_bits) -> int:
    """``scale_bits`` as an int if it is one of :data:`SCALE_BITS`; else InvalidArgumentError."""
    if isinstance(scale_bits, bool) or scale_bits not in SCALE_BITS:
        raise InvalidArgumentError(f"scale_bits must be one of {', '.join(map(str, SCALE_BITS))} "
                                   f"(float16, or 8-/6-bit double-quantized codes), got "
                                   f"{scale_bits!r}")
    return int(scale_bits)


def default_high_bits(wbits: int) -> int:
    """The high-impact part's width when ``hbits`` is not given: the next stored width above
    ``wbits`` (2 → 3, 3 → 4, 4 → 8, 6 → 8) and FP16 above 8."""
    return {2: 3, 3: 4, 4: 8, 6: 8, 8: FP16_BITS}[wbits]


@dataclass(frozen=True)
class QuantizeSettings:
    """Every knob of a run; :func:`resolve` settles the ``"auto"`` values and the report records
    the resolved object verbatim. Frozen: derive variants with :func:`dataclasses.replace`."""

    method: str = "hiq"  # a name in hiquant.methods.METHODS
    wbits: int = 2  # the low (or only) part's width, one of WEIGHT_BITS
    hbits: int | None = None  # the high-impact part's width; None: default_high_bits(wbits)
    group_size: int = 64  # columns per group within each part; 0: one group per output row
    # stored scale precision: 16 (float16), 8 or 6 (double-quantized codes, hiquant.storage), or
    # "auto": 6 for the methods with high-impact columns (their budgets near the plain format
    # need cheap scales: W2 g64 with float16 scales cannot reach 2.30 bits), 16 otherwise (the
    # plain methods store float16 scales, as the peers do)
    scale_bits: int | str = "auto"
    avg_bits: float | None = None  # budget: average bits per weight over the quantized layers
    ratio: float | None = None  # fixed-ratio / fp16-retention: the ratio of every layer
    candidates: tuple = DEFAULT_CANDIDATES  # hiq: candidate ratios of every layer
    # M estimator for hiq, one of ESTIMATORS, or auto: diagonal while the full Fisher diagonal
    # fits DIAGONAL_AUTO_BYTES, else rank1 (allocate.sensitivity_matrix)
    estimator: str = "auto"
    # each option's Δ in M, one of OPTION_DELTAS (gptq needs every layer's input Gram, 8 bytes
    # per d_in², collected with the Fisher statistics)
    option_delta: str = "rtn"
    m_windows: int = 32  # calibration windows used to build M
    # cross terms between layers in M: measured, the same-block pairs (the paper's); fisher, every
    # pair of layers (off: the diagonal of its M). auto: on for measured; on for fisher only when
    # m_windows >= the layers allocated (its M has rank <= m_windows)
    m_pairs: bool | str = "auto"
    quantizer: str = "auto"  # the method's own layer quantizer, or one of QUANTIZERS (ablations)
    n_calib: int = 128  # calibration windows
    seqlen: int = 512  # tokens per calibration window
    seed: int = 0  # calibration window sampling and block-wise mini-batch order
    # validation windows (of eval_seqlen tokens) held out from the end of the calibration text:
    # calibration samples only the text before them, and the report gives their perplexity
    # (val_ppl) — where defaults are chosen; 0: no split
    val_windows: int = 0
    # where the validation windows lie, one of VAL_SPLITS: "spread" evenly over the calibration
    # text (its distribution), "tail" its last tokens (one stretch of the text, which need not
    # be like the rest: bench/RESULTS.md, "where the validation windows lie")
    val_split: str = "spread"
    calib_batch: int = 8  # windows per forward batch when pushing calibration data
    lwc_iters: int = 1000  # layer-wise LWC steps (full batch)
    lwc_lr: float = 1e-2
    adaround_iters: int = 5000  # layer-wise AdaRound steps (AdaRound's paper default)
    adaround_lr: float = 1e-3
    # the learned quantizers' objective: "layer" (Gram objective), "block" (block output MSE,
    # OmniQuant's) or "refine" (layer-wise LWC, block-wise refinement of its clipping, then
    # layer-wise AdaRound of the high columns); "auto": refine for lwc and hybrid, else layer
    objective: str = "auto"
    block_epochs: int = 2  # objective block/refine: passes over the calibration windows
    block_batch: int = 1  # objective block/refine: windows per step (OmniQuant: 1)
    block_lr: float | None = None  # objective block/refine: LWC learning rate (None: lwc_lr)
    block_aug_loss: bool = False  # OmniQuant's aug_loss (also fit the FP block on quantized inputs)
    block_lr_schedule: str = "constant"  # one of LWC_SCHEDULES
    refine_order: str = "lwc-first"  # one of REFINE_ORDERS (blockwise.refine_block)
    # codes of the low part on its learned grid, one of LOW_ROUNDINGS; "auto": gptq for the hybrid
    # quantizer where the grid is final first (layer, lwc-first refine), nearest otherwise
    low_rounding: str = "auto"
    gptq_percdamp: float = 0.01
    gptq_blocksize: int = 128
    # GPTQ's column order: by decreasing Gram diagonal (True) or as stored (False); "auto": True
    # where GPTQ chooses codes on a fixed grid (low_rounding="gptq": the order is free there and
    # lowers the layer loss), False for the gptq method (groups formed as the sweep reaches them,
    # as the peers' published runs)
    gptq_act_order: bool | str = "auto"
    # the high part's AdaRound around the layer's weights (False) or around the weights that best
    # absorb the frozen low part's error, W_H - E_L H_LH (H_HH + damp)^-1 (True; its grid is
    # the min-max grid of those targets)
    high_compensation: bool = False
    # end-to-end tuning after quantization (hiquant.e2e): passes over the calibration windows
    # that train the RMSNorm weights and the group scales (through their stored precision) on
    # the next-token cross-entropy; 0: off. "auto": E2E_AUTO_EPOCHS for the methods whose layers
    # hiquant learns (lwc and hybrid quantizers) on the NumPy backend, 0 for the peers' methods
    # (rtn, gptq, awq, smoothquant, billm: run as published) and on the torch backend (its runtime
    # does not set norm weights yet)
    e2e_epochs: int | str = "auto"
    e2e_batch: int = 4  # windows per Adam step
    e2e_norm_lr: float = 3e-3  # Adam's learning rate of the norm weights (0: keep them)
    e2e_scale_lr: float = 3e-3  # of the scales' relative factors (0: keep the scales)
    eval_seqlen: int = 512
    eval_windows: int = 200
    n_threads: int | None = None  # None: hiquant's default (hiquant.set_num_threads)
    # the input of every decoder linear quantized per token (dynamic, symmetric) at this width when
    # the quantized model is evaluated (one of ACT_BITS); None: activations stay float
    abits: int | None = None
    smooth_alpha: float = 0.5  # smoothquant's migration strength α (in [0, 1])
    # the model runtime, one of BACKENDS; "auto": torch when a CUDA GPU and torch/transformers are
    # present, else numpy (the report records the resolved one)
    backend: str = "auto"
    device: str = "auto"  # cpu | cuda | cuda:N (cuda needs backend torch); "auto": cuda if present

    def replace(self, **changes) -> "QuantizeSettings":
        """A copy with ``changes`` applied (unknown names raise InvalidArgumentError)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise InvalidArgumentError(f"unknown setting(s) {', '.join(unknown)}; see "
                                       "hiquant.QuantizeSettings for the names")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def layer_quantizer(self) -> str:
        """The layer quantizer that runs: ``quantizer``, or the method's own when it is "auto"
        (recorded as "auto", which names it unambiguously)."""
        from .methods import method_spec
        return method_spec(self.method).quantizer if self.quantizer == "auto" else self.quantizer


def _positive_int(s, name, minimum=1):
    v = getattr(s, name)
    if not _is_int(v):
        raise InvalidTypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < minimum:
        raise InvalidArgumentError(f"{name} must be >= {minimum}, got {v}")


def _positive_float(v, name, *, allow_none=False):
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise InvalidTypeError(f"{name} must be a number, got {type(v).__name__}")
    if not (math.isfinite(v) and v > 0):
        raise InvalidArgumentError(f"{name} must be a positive finite number, got {v}")


def _choice(v, name, options, *, auto=False):
    if v == "auto" and auto:
        return
    if v not in options:
        raise InvalidArgumentError(f"{name} must be {'auto or ' if auto else ''}one of "
                                   f"{', '.join(options)}, got {v!r}")


def needs_input_grams(estimator: str, option_delta: str) -> bool:
    """Whether building M needs every layer's input Gram: the kfac estimator (its input factor)
    and the gptq option Δ's (GPTQ's sweep)."""
    return estimator == "kfac" or option_delta == "gptq"


def settle_pairs(pairs, estimator: str, n_windows: int | None = None,
                 n_layers: int | None = None):
    """``m_pairs`` settled for ``estimator``: True or False as given; ``"auto"`` is True for
    measured (the paper's same-block pairs), False for diagonal, rank1 and kfac (no cross terms)
    and, for fisher, ``n_windows >= n_layers`` (below full rank its M cannot carry cross terms);
    it stays ``"auto"`` while the estimator or those counts are unknown. Any other value raises
    :class:`InvalidTypeError`."""
    if not (isinstance(pairs, (bool, np.bool_)) or (isinstance(pairs, str) and pairs == "auto")):
        raise InvalidTypeError(f"m_pairs must be True, False or 'auto', got {pairs!r}")
    if not isinstance(pairs, str):
        return bool(pairs)
    if estimator == "measured":
        return True
    if estimator == "auto" or (estimator == "fisher" and (n_windows is None or n_layers is None)):
        return "auto"
    return estimator == "fisher" and n_windows >= n_layers


def resolve(settings: QuantizeSettings, *, n_weights: int | None = None,
            n_layers: int | None = None, warn: bool = True) -> QuantizeSettings:
    """The settings with every ``"auto"`` settled and every value checked, or an
    :class:`InvalidArgumentError` / :class:`InvalidTypeError` naming the setting and what to do.

    ``n_weights`` (the number of weights in the model's quantized linears) settles
    ``estimator="auto"``; without it the estimator stays ``"auto"``. ``m_pairs="auto"`` settles
    with the estimator (:func:`settle_pairs`; for fisher with ``m_windows`` and ``n_layers``, the
    quantized linears). Resolving resolved settings returns them unchanged. With ``warn``, a
    setting that has no effect for the method (a budget for a method without high-impact columns,
    a ratio where the IQP chooses them) is reported as a :class:`~hiquant.HiquantWarning`.
    """
    from .methods import method_spec  # the registry: method names and what each needs

    if not isinstance(settings, QuantizeSettings):
        raise InvalidTypeError(f"settings must be a hiquant.QuantizeSettings, got "
                               f"{type(settings).__name__}")
    s = settings
    spec = method_spec(s.method)
    ch: dict = {}
    if "billm" in (spec.quantizer, s.quantizer):
        wbits = _check_billm(s)  # binarization: wbits 1, blocks of group_size columns
    else:
        wbits = check_bits(s.wbits, "wbits")
    if spec.allocation == "none":
        hbits = wbits  # no high-impact part
        if s.hbits is not None and s.hbits != wbits:
            raise InvalidArgumentError(f"method {s.method!r} has no high-impact columns; leave "
                                       "hbits unset")
    elif spec.fp16_high:
        hbits = FP16_BITS
        if s.hbits not in (None, FP16_BITS):
            raise InvalidArgumentError("fp16-retention keeps its high-impact columns in FP16; "
                                       "leave hbits unset")
    elif s.hbits is None:
        hbits = default_high_bits(wbits)
    else:
        hbits = check_bits(s.hbits, "hbits", allow_fp16=True)
        if hbits <= wbits:
            raise InvalidArgumentError(f"hbits ({hbits}) must be wider than wbits ({wbits}): the "
                                       "high-impact columns get the moderate width")
    ch.update(wbits=wbits, hbits=hbits, group_size=check_group_size(s.group_size))

    _choice(s.quantizer, "quantizer", QUANTIZERS, auto=True)
    kind = s.layer_quantizer
    if s.quantizer != "auto" and kind != spec.quantizer and spec.allocation != "none" \
            and kind not in ("rtn", "lwc", "hybrid"):
        # gptq/adaround ignore high-impact columns: an ablation of hiq's plans with them would
        # silently drop the plans
        raise InvalidArgumentError(f"quantizer {kind!r} cannot store the high-impact columns of "
                                   f"method {s.method!r}; use rtn, lwc or hybrid")
    scale_bits = s.scale_bits
    if scale_bits == "auto":
        scale_bits = 6 if spec.allocation != "none" and kind != "gptq" else 16
    scale_bits = check_scale_bits(scale_bits)
    if scale_bits != 16 and kind == "gptq":
        raise InvalidArgumentError("gptq forms its group scales as the column sweep reaches "
                                   "them and stores them as float16; use scale_bits=16")
    ch["scale_bits"] = scale_bits

    objective = s.objective
    _choice(objective, "objective", OBJECTIVES, auto=True)
    if objective == "auto":
        objective = "refine" if kind in ("lwc", "hybrid") else "layer"
    if objective != "layer" and kind not in ("lwc", "hybrid"):
        raise InvalidArgumentError(f"objective={objective!r} applies to the lwc and hybrid "
                                   f"quantizers (lwc, fixed-ratio, fp16-retention, hiq), not "
                                   f"{kind!r}")
    ch["objective"] = objective
    _choice(s.refine_order, "refine_order", REFINE_ORDERS)
    _choice(s.option_delta, "option_delta", OPTION_DELTAS)
    _choice(s.block_lr_schedule, "block_lr_schedule", LWC_SCHEDULES)
    # the low part's grid is final before its codes are chosen (not in the block objective, which
    # learns codes and grid together, nor after adaround-first's block pass)
    grid_final = kind in ("lwc", "hybrid") and (
        objective == "layer" or (objective == "refine" and s.refine_order == "lwc-first"))
    low_rounding = s.low_rounding
    _choice(low_rounding, "low_rounding", LOW_ROUNDINGS, auto=True)
    if low_rounding == "auto":
        low_rounding = "gptq" if kind == "hybrid" and grid_final else "nearest"
    if low_rounding == "gptq" and not grid_final:
        raise InvalidArgumentError(
            "low_rounding='gptq' chooses the codes of an LWC low part on its final grid: it "
            "applies to the lwc and hybrid quantizers with objective layer or refine "
            f"(refine_order lwc-first), not quantizer {kind!r} with objective {objective!r}"
            + (f", refine_order {s.refine_order!r}" if objective == "refine" else "")
            + "; pass low_rounding='nearest'")
    ch["low_rounding"] = low_rounding
    act_order = s.gptq_act_order
    if act_order == "auto":
        act_order = low_rounding == "gptq"
    elif not isinstance(act_order, (bool, np.bool_)):
        raise InvalidTypeError(f"gptq_act_order must be True, False or 'auto', got {act_order!r}")
    ch["gptq_act_order"] = bool(act_order)
    if not isinstance(s.high_compensation, (bool, np.bool_)):
        raise InvalidTypeError(f"high_compensation must be True or False, got "
                               f"{s.high_compensation!r}")

    for name in ("n_calib", "calib_batch", "block_epochs", "block_batch", "m_windows",
                 "eval_windows", "gptq_blocksize", "e2e_batch"):
        _positive_int(s, name)
    for name in ("seqlen", "eval_seqlen"):
        _positive_int(s, name, 2)
    for name in ("lwc_iters", "adaround_iters", "seed", "val_windows"):
        _positive_int(s, name, 0)
    _choice(s.val_split, "val_split", VAL_SPLITS)
    if s.n_threads is not None:
        _positive_int(s, "n_threads")
    for name in ("lwc_lr", "adaround_lr", "gptq_percdamp"):
        _positive_float(getattr(s, name), name)
    _positive_float(s.block_lr, "block_lr", allow_none=True)
    _positive_float(s.avg_bits, "avg_bits", allow_none=True)
    ch["abits"] = check_abits(s.abits)
    if isinstance(s.smooth_alpha, bool) or not isinstance(s.smooth_alpha, (int, float, np.floating)):
        raise InvalidTypeError(f"smooth_alpha must be a number, got {type(s.smooth_alpha).__name__}")
    if not 0.0 <= s.smooth_alpha <= 1.0:
        raise InvalidArgumentError(f"smooth_alpha must be in [0, 1], got {s.smooth_alpha}")
    if s.ratio is not None:
        if isinstance(s.ratio, bool) or not isinstance(s.ratio, (int, float, np.floating)):
            raise InvalidTypeError(f"ratio must be a number, got {type(s.ratio).__name__}")
        if not 0.0 <= s.ratio <= 1.0:
            raise InvalidArgumentError(f"ratio must be in [0, 1], got {s.ratio}")
    try:
        candidates = tuple(float(c) for c in s.candidates)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"candidates must be numbers in [0, 1], got "
                                   f"{s.candidates!r}") from None
    if not candidates or any(not (0.0 <= c <= 1.0) for c in candidates):
        raise InvalidArgumentError(f"candidate ratios must be in [0, 1], got {s.candidates}")
    ch["candidates"] = candidates
    if spec.allocation == "iqp" and s.avg_bits is None:
        raise InvalidArgumentError(f"method {s.method!r} needs a budget: pass avg_bits "
                                   "(e.g. 2.3)")

    if warn:
        _warn_no_effect(s, spec)
    estimator = s.estimator
    _choice(estimator, "estimator", ESTIMATORS, auto=True)
    if estimator == "auto" and n_weights is not None:
        estimator = "diagonal" if 4 * n_weights <= DIAGONAL_AUTO_BYTES else "rank1"
    ch["estimator"] = estimator
    ch["m_pairs"] = settle_pairs(s.m_pairs, estimator, s.m_windows, n_layers)
    ch["backend"], ch["device"] = _resolve_backend(s.backend, s.device)
    if ch["backend"] == "torch" and needs_input_grams(estimator, s.option_delta):
        raise InvalidArgumentError("estimator='kfac' and option_delta='gptq' need every layer's "
                                   "input Gram, which the torch backend's statistics do not "
                                   "collect yet; pass backend='numpy' or the rtn Δ's")
    if ch["backend"] == "torch" and s.abits is not None:
        raise InvalidArgumentError("abits (activation quantization) runs on the NumPy backend "
                                   "only for now; pass backend='numpy'")
    if ch["backend"] == "torch" and spec.quantizer in ("awq", "smoothquant"):
        # their equivalent transforms rewrite the RMSNorm weights: the NumPy runtime's surface
        raise InvalidArgumentError(f"{s.method} folds its scales into the normalization weights, "
                                   "which runs on the NumPy backend only for now; pass "
                                   "backend='numpy' (--backend numpy)")
    ch["e2e_epochs"] = _resolve_e2e(s, kind, ch["backend"])
    return dataclasses.replace(s, **ch)


def _resolve_e2e(s: QuantizeSettings, kind: str, backend: str) -> int:
    """``e2e_epochs`` as an int (see :class:`QuantizeSettings`), its learning rates checked."""
    for name in ("e2e_norm_lr", "e2e_scale_lr"):
        v = getattr(s, name)
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise InvalidTypeError(f"{name} must be a number, got {type(v).__name__}")
        if not (math.isfinite(v) and v >= 0):
            raise InvalidArgumentError(f"{name} must be a finite number >= 0 (0: not trained), "
                                       f"got {v}")
    epochs = s.e2e_epochs
    if epochs == "auto":
        return E2E_AUTO_EPOCHS if kind in ("lwc", "hybrid") and backend == "numpy" else 0
    if not _is_int(epochs) or int(epochs) < 0:
        raise InvalidArgumentError(f"e2e_epochs must be 'auto' or an int >= 0, got {epochs!r}")
    epochs = int(epochs)
    if epochs and backend == "torch":
        raise InvalidArgumentError("end-to-end tuning (e2e_epochs > 0) sets the RMSNorm weights, "
                                   "which runs on the NumPy backend only for now; pass "
                                   "backend='numpy' (--backend numpy) or e2e_epochs=0")
    if epochs and s.e2e_norm_lr == 0 and s.e2e_scale_lr == 0:
        raise InvalidArgumentError("e2e_epochs > 0 with e2e_norm_lr = e2e_scale_lr = 0 trains "
                                   "nothing; give a learning rate or pass e2e_epochs=0")
    return epochs


def _check_billm(s: QuantizeSettings) -> int:
    """billm's own rules: method billm with its own quantizer, wbits 1 (every weight binarized),
    a positive group_size (its block of columns: the paper's 128), float16 α's."""
    if s.method != "billm" or s.quantizer not in ("auto", "billm"):
        raise InvalidArgumentError(f"the billm quantizer binarizes whole layers and runs only as "
                                   f"method 'billm' (got method {s.method!r} with quantizer "
                                   f"{s.quantizer!r}); pass method='billm', quantizer='auto'")
    if not _is_int(s.wbits):
        raise InvalidTypeError(f"wbits must be an int, got {type(s.wbits).__name__}")
    if int(s.wbits) != 1:
        raise InvalidArgumentError(f"billm binarizes every weight: pass wbits=1 (--wbits 1), got "
                                   f"wbits={s.wbits}")
    g = check_group_size(s.group_size)
    if g < 1:
        raise InvalidArgumentError("billm binarizes in blocks of columns: pass a positive "
                                   "group_size, e.g. 128 (--group 128, the paper's block)")
    if s.scale_bits not in ("auto", 16):
        raise InvalidArgumentError(f"billm stores its per-row α's as float16; use scale_bits=16 "
                                   f"(or auto), got {s.scale_bits!r}")
    return 1


def _resolve_backend(backend, device) -> tuple[str, str]:
    """(backend, device) with "auto" settled: torch on a CUDA GPU when one is present and torch
    and transformers are installed, else numpy on the CPU. Checks without importing torch when
    torch is absent or no NVIDIA driver is loaded."""
    from .torch_runtime import cuda_device_count, torch_available
    _choice(backend, "backend", BACKENDS, auto=True)
    if not isinstance(device, str) or not (
            device in ("auto", "cpu", "cuda") or (device.startswith("cuda:")
                                                  and device[5:].isdigit())):
        raise InvalidArgumentError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if backend == "numpy" and device not in ("auto", "cpu"):
        raise InvalidArgumentError(f"backend 'numpy' runs on the CPU; device {device!r} needs "
                                   "backend='torch'")
    if backend == "numpy":
        return "numpy", "cpu"
    if backend == "auto":
        if device == "cpu" or (device == "auto" and not (torch_available() and cuda_device_count())):
            return "numpy", "cpu"
        backend = "torch"
    if not torch_available():
        raise InvalidArgumentError("backend 'torch' needs torch and transformers; install them with "
                                   "`pip install hiquant[torch]` or use backend='numpy'")
    if device == "auto":
        return backend, "cuda" if cuda_device_count() else "cpu"
    if device.startswith("cuda"):
        n = cuda_device_count()
        idx = int(device[5:]) if ":" in device else 0
        if idx >= n:
            raise InvalidArgumentError(f"device {device!r} asked for, but torch sees {n} CUDA "
                                       "GPU(s); use device='cpu' or another index")
    return backend, device


def _warn_no_effect(s: QuantizeSettings, spec) -> None:
    import warnings

    from .errors import HiquantWarning
    notes = []
    if spec.allocation == "none" and s.avg_bits is not None:
        notes.append(f"avg_bits has no effect for {s.method}: it stores every column at wbits "
                     f"({s.wbits}); the report gives the bits it stores")
    if s.ratio is not None and spec.allocation != "fixed":
        notes.append(f"ratio has no effect for {s.method}"
                     + ("; its ratios come from the IQP" if spec.allocation == "iqp" else ""))
    if s.ratio is not None and spec.allocation == "fixed" and s.avg_bits is not None:
        notes.append("avg_bits has no effect when ratio is given: every layer keeps that ratio")
    if spec.allocation != "iqp" and tuple(s.candidates) != DEFAULT_CANDIDATES:
        notes.append(f"candidates have no effect for {s.method} (only hiq chooses among them)")
    for note in notes:
        warnings.warn(note, HiquantWarning, stacklevel=3)
