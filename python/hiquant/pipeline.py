"""The quantization pipeline: statistics → M → ratio allocation → block-by-block quantization →
evaluation → export, for every method in :mod:`hiquant.methods`.

Blocks are quantized in order; the calibration inputs of block b+1 are the outputs of the
already-quantized blocks 0..b (as in GPTQ and OmniQuant). Within a block, the Gram matrices of all
seven linears come from one pass with the block's full-precision weights, then the seven layers
are quantized, then the block's outputs under quantized weights feed the next block.

Objectives of the learned quantizers (``objective``):

* ``"layer"``: each layer's Gram objective ``tr((W_q - W) H (W_q - W)^T)`` — cheap
  (thousands of full-batch steps in C++), blind to the error a block receives from the quantized
  blocks before it.
* ``"block"``: OmniQuant's — the block's output from the quantized path against the
  full-precision model's output, LWC and AdaRound learned from scratch on mini-batches of windows
  (one forward and backward of the block per step).
* ``"refine"`` (the default for lwc and the hybrid methods): the layer-wise LWC solution, then
  ``block_epochs`` passes of block-wise refinement of its clipping, then (``low_rounding``, gptq
  by default for the hybrid methods) GPTQ's error-compensating rounding of the low part on that
  grid, then layer-wise AdaRound of the high columns against the low part. Measured on
  llama-bench (W2 g64, hiq at 2.30 bits, 1000/5000 iterations, nearest codes): diagonal M layer
  10.37, refine (2 epochs) 9.91; fisher M layer 10.76, block from scratch (2 epochs)
  12.68 — a few block-wise epochs only help when they start from a good solution.

Options of the block-wise objectives: ``block_aug_loss`` (OmniQuant's aug_loss: the block also fits
the full-precision block's output on the quantized path's inputs) and, for refine,
``refine_order`` ("lwc-first", above, or "adaround-first": the layer-wise hybrid first, then the
block-wise clipping with the high columns fixed at their AdaRound values, so the block sees the
high columns' real quantization error).
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import InvalidArgumentError
from .methods import LayerPlan, method_info

__all__ = ["QuantizeSettings", "Report", "quantize"]

DEFAULT_CANDIDATES = (0.02, 0.05, 0.10, 0.15, 0.20)
OBJECTIVES = ("layer", "block", "refine")  # and "auto" (QuantizeSettings.objective)
REFINE_ORDERS = ("lwc-first", "adaround-first")
DIAGONAL_AUTO_BYTES = 2 << 30  # estimator="auto": the largest Fisher diagonal kept in memory


@dataclass
class QuantizeSettings:
    """Every knob of a run; recorded verbatim in its report."""

    method: str = "hiq"
    wbits: int = 2
    hbits: int | None = None  # default wbits + 1; 16 = FP16 retention
    group_size: int = 64
    # stored scale precision: 16 (float16), 8 or 6 (double-quantized codes, hiquant.storage), or
    # "auto": 6 for the methods with high-impact columns (hiq, fixed-ratio, fp16-retention), whose
    # budgets near the plain format need cheap scales — W2 g64 with float16 scales cannot reach
    # 2.30 bits at all, and 6-bit codes measured better than 8-bit ones there (9.35 vs 9.53) —,
    # 16 otherwise (rtn, gptq, lwc, adaround store plain float16 scales, as the peers do)
    scale_bits: int | str = "auto"
    avg_bits: float | None = None  # budget (average bits per weight over quantized layers)
    ratio: float | None = None  # fixed-ratio: the ratio of every layer
    candidates: tuple = DEFAULT_CANDIDATES
    # M estimator for hiq: measured | fisher | diagonal | auto (diagonal while the full Fisher
    # diagonal, 4 bytes per linear weight, fits DIAGONAL_AUTO_BYTES; else fisher, whose memory
    # does not grow with the model). Measured on llama-bench W2 g64 at 2.30 bits: diagonal 10.37,
    # fisher 10.76 (layer-wise, 1000/5000 iterations); 11.61 vs 11.74 at 200/500.
    estimator: str = "auto"
    m_windows: int = 32  # calibration windows used to build M (its cost grows with them)
    m_pairs: bool = True  # measured estimator: include the same-block pair terms
    quantizer: str = "auto"  # layer quantizer: the method's own, or rtn/gptq/lwc/adaround/hybrid (ablations)
    n_calib: int = 128
    seqlen: int = 512
    seed: int = 0
    calib_batch: int = 8
    # Iterations: measured on llama-bench hiq W2 g64 at 2.30 bits (fisher M, 2 cores): 200 / 500
    # gave ppl 11.74 with 92 s of quantization, 1000 / 5000 (AdaRound's paper default) 10.76 with
    # 250 s; the whole run stays far inside the 30-minute target, so the defaults buy quality.
    lwc_iters: int = 1000
    lwc_lr: float = 1e-2
    adaround_iters: int = 5000
    adaround_lr: float = 1e-3
    # learned quantizers: "layer" (Gram objective), "block" (block output MSE, OmniQuant's) or
    # "refine" (layer-wise LWC, then block-wise refinement of its clipping, then layer-wise
    # AdaRound of the high columns against the refined low part); "auto": refine for the lwc and
    # hybrid quantizers, layer for rtn / gptq / adaround (resolved and recorded in the report)
    objective: str = "auto"
    block_epochs: int = 2  # objective block/refine: passes over the calibration windows per block
    block_batch: int = 1  # objective block/refine: windows per step (OmniQuant: 1)
    block_lr: float | None = None  # objective block/refine: LWC learning rate (None: lwc_lr)
    # objective block/refine: OmniQuant's aug_loss — also fit the full-precision block's output
    # on the quantized path's inputs (the sum of both errors)
    block_aug_loss: bool = False
    block_lr_schedule: str = "constant"  # objective block/refine: LWC lr, constant or cosine decay
    # objective refine: "lwc-first" — layer-wise LWC, block-wise clipping with the high columns at
    # full precision, then layer-wise AdaRound of the high columns against the refined low part;
    # "adaround-first" — the layer-wise hybrid (LWC and AdaRound), then block-wise clipping with
    # the high columns fixed at their AdaRound values (the block sees their real error)
    refine_order: str = "lwc-first"
    # the low part's codes on its learned grid: "nearest" (round-to-nearest, as LWC trains and
    # OmniQuant exports) or "gptq" (GPTQ's error-compensating sweep on the fixed grid, the high
    # columns free; hybrid.quantize_layer). "auto": gptq for the hybrid methods (hiq, fixed-ratio,
    # fp16-retention) on the layer and lwc-first refine objectives, nearest otherwise — lwc stays
    # OmniQuant's quantizer. Measured on llama-bench W2 g64 at 2.30 bits (6-bit scales): hiq
    # 9.349 -> 8.916, fixed-ratio 9.518 -> 8.995.
    low_rounding: str = "auto"
    gptq_percdamp: float = 0.01
    gptq_blocksize: int = 128
    gptq_act_order: bool = False
    eval_seqlen: int = 512
    eval_windows: int = 200
    n_threads: int | None = None

    def resolved(self) -> "QuantizeSettings":
        s = QuantizeSettings(**asdict(self))
        info = method_info(s.method)
        if info["allocation"] == "none":
            s.hbits = s.wbits  # no high-impact part
        elif s.method == "fp16-retention":
            s.hbits = 16
        elif s.hbits is None:
            s.hbits = {2: 3, 3: 4, 4: 8, 8: 16}[s.wbits] if s.wbits in (2, 3, 4, 8) else s.wbits + 1
        if s.wbits not in (2, 3, 4, 8):
            raise InvalidArgumentError(f"wbits must be 2, 3, 4 or 8 (packable widths), got {s.wbits}")
        if s.hbits not in (2, 3, 4, 8, 16):
            raise InvalidArgumentError(f"hbits must be 2, 3, 4, 8 or 16 (FP16), got {s.hbits}")
        from .storage import check_scale_bits
        kind = info["quantizer"] if s.quantizer == "auto" else s.quantizer
        if s.scale_bits == "auto":
            s.scale_bits = 6 if info["allocation"] != "none" and kind != "gptq" else 16
        check_scale_bits(s.scale_bits)
        if s.scale_bits != 16 and kind == "gptq":
            raise InvalidArgumentError("gptq forms its group scales as the column sweep reaches "
                                       "them and stores them as float16; use scale_bits=16")
        if s.objective == "auto":
            s.objective = "refine" if kind in ("lwc", "hybrid") else "layer"
        if s.objective not in OBJECTIVES:
            raise InvalidArgumentError(f"objective must be one of {', '.join(OBJECTIVES)}, got "
                                       f"{s.objective!r}")
        if s.objective != "layer" and kind not in ("lwc", "hybrid"):
            raise InvalidArgumentError(f"objective={s.objective!r} applies to the lwc and hybrid "
                                       f"quantizers (lwc, fixed-ratio, fp16-retention, hiq), not "
                                       f"{kind!r}")
        if s.block_lr is not None and not (math.isfinite(s.block_lr) and s.block_lr > 0):
            raise InvalidArgumentError(f"block_lr must be a positive number, got {s.block_lr}")
        if s.refine_order not in REFINE_ORDERS:
            raise InvalidArgumentError(f"refine_order must be one of {', '.join(REFINE_ORDERS)}, "
                                       f"got {s.refine_order!r}")
        # where a low part's grid is final before its codes are chosen (not in the block
        # objective, which learns codes and grid together, nor after adaround-first's block pass,
        # which fixes the high columns first)
        from .hybrid import LOW_ROUNDINGS, LWC_SCHEDULES  # lazily: not part of `import hiquant`
        grid_final = kind in ("lwc", "hybrid") and (
            s.objective == "layer" or (s.objective == "refine" and s.refine_order == "lwc-first"))
        if s.low_rounding == "auto":
            s.low_rounding = "gptq" if kind == "hybrid" and grid_final else "nearest"
        if s.low_rounding not in LOW_ROUNDINGS:
            raise InvalidArgumentError(f"low_rounding must be one of {', '.join(LOW_ROUNDINGS)} "
                                       f"or auto, got {s.low_rounding!r}")
        if s.low_rounding == "gptq" and not grid_final:
            raise InvalidArgumentError(
                "low_rounding='gptq' chooses the codes of an LWC low part on its final grid: it "
                "applies to the lwc and hybrid quantizers with objective layer or refine "
                f"(refine_order lwc-first), not quantizer {kind!r} with objective "
                f"{s.objective!r}" + (f", refine_order {s.refine_order!r}"
                                       if s.objective == "refine" else "")
                + "; pass low_rounding='nearest'")
        if s.block_lr_schedule not in LWC_SCHEDULES:
            raise InvalidArgumentError(f"block_lr_schedule must be one of {', '.join(LWC_SCHEDULES)}"
                                       f", got {s.block_lr_schedule!r}")
        if s.block_epochs < 1 or s.block_batch < 1:
            raise InvalidArgumentError("block_epochs and block_batch must be >= 1")
        if s.avg_bits is not None and not (math.isfinite(s.avg_bits) and s.avg_bits > 0):
            raise InvalidArgumentError(f"avg_bits must be a positive number, got {s.avg_bits}")
        if s.ratio is not None and not (0.0 <= s.ratio <= 1.0):
            raise InvalidArgumentError(f"ratio must be in [0, 1], got {s.ratio}")
        from .allocate import ESTIMATORS
        if s.estimator != "auto" and s.estimator not in ESTIMATORS:
            raise InvalidArgumentError(f"estimator must be auto or one of {', '.join(ESTIMATORS)}, "
                                       f"got {s.estimator!r}")
        s.candidates = tuple(float(c) for c in s.candidates)
        if any(not (0.0 <= c <= 1.0) for c in s.candidates) or not s.candidates:
            raise InvalidArgumentError(f"candidate ratios must be in [0, 1], got {s.candidates}")
        return s


@dataclass
class Report:
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
        lines = [
            f"# hiquant report: {s['method']} W{s['wbits']} (b_H {s['hbits']}) g{s['group_size']}",
            "",
            f"model `{self.model}` · avg bits **{self.avg_bits:.4f}** · "
            f"ppl **{self.ppl if self.ppl is not None else '–'}** (FP {self.fp_ppl if self.fp_ppl is not None else '–'})",
            "",
            "| layer | shape | ratio | k | b_L | b_H | bits/weight |",
            "|---|---|---|---|---|---|---|",
        ]
        for L in self.layers:
            lines.append(f"| {L['name']} | {L['d_out']}×{L['d_in']} | {L['ratio']:.3f} | {L['k']} | "
                         f"{L['b_low']} | {L['b_high'] if L['k'] else '–'} | {L['bits_per_weight']:.4f} |")
        lines += ["", "| stage | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in self.timings.items()]
        return "\n".join(lines) + "\n"


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


def versions() -> dict:
    from importlib import metadata
    out = {"python": platform.python_version()}
    for n in ("hiquant", "numpy", "safetensors", "tokenizers"):
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    from . import _core
    out["build_flags"] = _core.build_flags
    return out


class _Timer:
    def __init__(self, timings: dict, key: str):
        self.timings, self.key = timings, key

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.timings[self.key] = self.timings.get(self.key, 0.0) + time.perf_counter() - self.t0


# ------------------------------------------------------------------------------------------------
# Plans: how many high-impact columns each layer gets, and which.

def top_columns(fisher_col: np.ndarray, k: int) -> np.ndarray:
    """The k input channels with the largest Fisher score (ties: lower index first), ascending."""
    from .allocate import high_columns
    return high_columns(fisher_col, int(k))


def n_high(ratio: float, d_in: int) -> int:
    """k = ceil(ratio * d_in) in exact decimal arithmetic (0.1 * 1000 is 100, not 101)."""
    from .allocate import ratio_to_k
    return ratio_to_k(ratio, d_in)


def _total_bits(shapes: dict, ks: dict, s: QuantizeSettings) -> int:
    from .storage import storage_bits
    return sum(storage_bits(d_out, d_in, ks[n], s.wbits, s.hbits, s.group_size, s.scale_bits)
               for n, (d_out, d_in) in shapes.items())


def uniform_ratio_for_budget(shapes: dict, s: QuantizeSettings, budget_bits: float) -> float:
    """The largest ratio, the same in every layer, whose exact storage fits the budget."""
    from .errors import InfeasibleBudgetError
    n_weights = sum(a * b for a, b in shapes.values())
    bits_at = lambda r: _total_bits(shapes, {n: n_high(r, d_in) for n, (_, d_in) in shapes.items()}, s)  # noqa: E731
    if bits_at(0.0) > budget_bits:
        raise InfeasibleBudgetError(
            f"a budget of {budget_bits / n_weights:.4f} bits per weight is below the cost of "
            f"W{s.wbits} g{s.group_size} with no high-impact columns "
            f"({bits_at(0.0) / n_weights:.4f}); raise the budget", bits_at(0.0) / n_weights)
    lo, hi = 0.0, 1.0
    if bits_at(1.0) <= budget_bits:
        return 1.0
    for _ in range(50):  # bisection on a monotone step function
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if bits_at(mid) <= budget_bits else (lo, mid)
    return lo


# ------------------------------------------------------------------------------------------------
# Gram matrices of one block's linear inputs (q/k/v share one input, as do gate/up).

def _input_key(name: str) -> str:
    for suffix, key in ((".self_attn.q_proj", "attn_in"), (".self_attn.k_proj", "attn_in"),
                        (".self_attn.v_proj", "attn_in"), (".mlp.gate_proj", "mlp_in"),
                        (".mlp.up_proj", "mlp_in")):
        if name.endswith(suffix):
            return name[: -len(suffix)] + "." + key
    return name


class _GramCollector:
    """capture() callback accumulating G = Σ x xᵀ (float64) per distinct linear input."""

    def __init__(self):
        self.grams: dict[str, np.ndarray] = {}
        self.tokens: dict[str, int] = {}
        self._seen_in_call: set = set()

    def __call__(self, name: str, X: np.ndarray) -> None:
        key = _input_key(name)
        if key in self._seen_in_call:  # q, k, v (gate, up) receive the same array
            return
        self._seen_in_call.add(key)
        G = self.grams.get(key)
        if G is None:
            G = self.grams[key] = np.zeros((X.shape[1], X.shape[1]), np.float64)
            self.tokens[key] = 0
        _gram_accumulate(G, np.ascontiguousarray(X, np.float32))
        self.tokens[key] += X.shape[0]

    def next_batch(self) -> None:
        self._seen_in_call = set()

    def gram(self, name: str) -> tuple[np.ndarray, int]:
        key = _input_key(name)
        return self.grams[key], self.tokens[key]


def _block_grams(model, b: int, h: np.ndarray, bs: int, n_threads) -> "_GramCollector":
    """Gram matrices of block b's linear inputs over all calibration windows. Batches run on
    worker threads, each into its own partial sums; the partials are added in batch order, so
    the result does not depend on the thread count."""
    from .model import map_ordered

    def run(sl):
        col = _GramCollector()
        model.block_forward(b, h[sl], capture=col)
        return col

    total = None
    for part in map_ordered(run, list(_batches(len(h), bs)), n_threads):
        if total is None:
            total = part
        else:
            for key, G in part.grams.items():
                total.grams[key] += G
                total.tokens[key] += part.tokens[key]
    return total


def _block_outputs(model, b: int, h: np.ndarray, bs: int, n_threads) -> np.ndarray:
    from .model import map_ordered
    outs = map_ordered(lambda sl: model.block_forward(b, h[sl]), list(_batches(len(h), bs)), n_threads)
    return np.concatenate(outs)


def _gram_accumulate(G: np.ndarray, X: np.ndarray) -> None:
    try:
        from .stats import gram_accumulate
    except ImportError:  # pragma: no cover - the native kernel is the normal path
        G += (X.T @ X).astype(np.float64)
        return
    gram_accumulate(G, X)


# ------------------------------------------------------------------------------------------------
# Layer quantizers (one per registry entry); each returns a QuantizedLayer.

def _quantize_layer(kind: str, name: str, W: np.ndarray, H: np.ndarray, n_tokens: int,
                    plan: LayerPlan, s: QuantizeSettings):
    from .storage import QuantizedLayer, QuantPart
    if kind == "rtn":
        return QuantizedLayer.rtn(name, W, plan.b_low, plan.group_size, plan.high_idx, plan.b_high,
                                  scale_bits=s.scale_bits)
    if kind == "gptq":
        from . import learners
        res = learners.gptq(W, H, bits=plan.b_low, group_size=plan.group_size,
                           percdamp=s.gptq_percdamp, blocksize=s.gptq_blocksize,
                           act_order=s.gptq_act_order, n_threads=s.n_threads)
        low = QuantPart(plan.b_low, plan.group_size, res.codes, res.scale.astype(np.float16), res.zero)
        return QuantizedLayer(name, W.shape[0], W.shape[1], np.zeros(0, np.int64), low)
    from . import hybrid
    mode = {"lwc": "lwc", "adaround": "adaround", "hybrid": "hybrid"}[kind]
    return hybrid.quantize_layer_as(name, W, H, n_tokens, plan, mode=mode, settings=s)


def _block_steps(n_windows: int, s: QuantizeSettings) -> int:
    return s.block_epochs * -(-n_windows // s.block_batch)


def _block_pass(model, b: int, h: np.ndarray, targets: np.ndarray, plans: dict,
                s: QuantizeSettings, *, adaround: bool, lwc_init: dict | None = None,
                aug_targets: np.ndarray | None = None, high_fixed: dict | None = None) -> dict:
    from . import hybrid
    steps = _block_steps(len(h), s)
    return hybrid.quantize_block(
        model, b, h, plans, targets=targets, lwc_iters=steps,
        lwc_lr=s.block_lr if s.block_lr is not None else s.lwc_lr,
        adaround_iters=steps if adaround else 0, adaround_lr=s.adaround_lr,
        batch_size=s.block_batch, seed=s.seed + b, n_threads=s.n_threads,
        scale_bits=s.scale_bits, lwc_init=lwc_init, aug_targets=aug_targets,
        high_fixed=high_fixed, lwc_schedule=s.block_lr_schedule)


def _refine_block(model, b: int, h: np.ndarray, targets: np.ndarray, plans: dict, kind: str,
                  s: QuantizeSettings, bs: int, aug_targets: np.ndarray | None = None) -> dict:
    """objective="refine" for block ``b``: (1) LWC of every linear on its layer-wise Gram
    objective (cheap, full batch); (2) block-wise refinement of those clipping parameters on the
    block's output error against the full-precision targets — the one thing a layer-wise
    objective cannot see: the error the block receives from the quantized blocks before it, and
    how its seven layers' errors combine through attention and the MLP; (3) with
    ``low_rounding="gptq"``, the low parts' codes re-chosen on their refined grids by GPTQ's
    error-compensating sweep (the grid, so the size, unchanged); (4) with the low parts frozen,
    AdaRound of the high columns on the layer-wise objective (5000 cheap Gram steps instead of a
    few hundred block steps). Leaves the block's weights in ``model`` quantized and returns
    ``{name: QuantizedLayer}``. With ``refine_order="adaround-first"`` (1) also runs the
    layer-wise AdaRound, (2) keeps its high columns fixed, and there is no (3) or (4)."""
    from . import hybrid
    names = model.block_linear_names(b)
    grams = _block_grams(model, b, h, bs, s.n_threads)
    W = {n: model.get_weight(n) for n in names}
    kw = hybrid.layer_kwargs(s)
    # the lwc quantizer (also as an ablation of a hybrid method's plans) has no high columns
    block_plans = {n: plans[n] if kind == "hybrid" else
                   LayerPlan(0, np.zeros(0, np.int64), plans[n].b_low, plans[n].b_low,
                             plans[n].group_size) for n in names}
    adaround_first = s.refine_order == "adaround-first"
    lwc_init, high_fixed = {}, {}
    for n in names:
        H, ntok = grams.gram(n)
        p = block_plans[n]
        ada = adaround_first and p.k and p.b_high != 16
        # only LWC's clipping is kept from here when the block pass follows: no rounding pass
        r = hybrid.quantize_layer(W[n], H, ntok, p.high_idx, p.b_low, p.b_high if p.k else p.b_low,
                                  p.group_size, **(kw if ada else {**kw, "adaround_iters": 0,
                                                                   "low_rounding": "nearest"}))
        if r.lwc_params is not None:
            lwc_init[n] = r.lwc_params
        if ada:
            high_fixed[n] = r.high
    res = _block_pass(model, b, h, targets, block_plans, s, adaround=False, lwc_init=lwc_init,
                      aug_targets=aug_targets, high_fixed=high_fixed)
    steps = _block_steps(len(h), s)
    out = {}
    for n in names:
        p = block_plans[n]
        info = {"objective": "refine", "steps": steps}
        adaround_part = p.k and p.b_high != 16 and not adaround_first
        if adaround_part or (s.low_rounding == "gptq" and res[n].low is not None):
            H, ntok = grams.gram(n)
            r = hybrid.quantize_layer(W[n], H, ntok, p.high_idx, p.b_low,
                                      p.b_high if p.k else p.b_low, p.group_size,
                                      low_fixed=res[n].low, **kw)
            ql = r.to_layer(n, info=info)
        else:  # neither AdaRound nor a rounding pass: the block pass's result is final
            ql = res[n].to_layer(n, info=info)
        model.set_weight(n, ql)
        out[n] = ql
    return out


# ------------------------------------------------------------------------------------------------
# The pipeline.

def _progress(iterable, enabled: bool, **kw):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, **kw)


def _batches(n: int, size: int):
    for a in range(0, n, size):
        yield slice(a, min(n, a + size))


def quantize(model_dir, calib, *, settings: QuantizeSettings | None = None, out=None,
             export: str = "both", eval_text=None, fp_eval: bool = False, overwrite: bool = False,
             progress: bool = True, model=None, cache_dir=None, checkpoint_dir=None,
             resume: bool = False, **overrides) -> Report:
    """Quantize a Hugging Face checkpoint and return the run :class:`Report`.

    ``model_dir``: the checkpoint folder; ``calib``: a calibration text file (plain text, WikiText
    raw or C4-style json/jsonl(.gz)); ``settings`` (or keyword overrides of
    :class:`QuantizeSettings`, e.g. ``method="hiq", wbits=2, group_size=64, avg_bits=2.3``);
    ``out``: an output folder (written atomically; never overwritten unless ``overwrite``) that
    receives ``fake/`` (a Hugging Face folder with dequantized weights in the source dtype) and/or
    ``packed/`` (hiquant's packed format) as ``export`` says ("fake", "packed", "both"), plus
    ``report.json`` and ``report.md``; ``eval_text``: a text file to measure perplexity on;
    ``cache_dir``: where calibration statistics are cached, keyed to the model files and the
    calibration settings, so that repeated runs (ablations) never recollect them;
    ``checkpoint_dir``: where progress is saved after every block (atomically); with
    ``resume=True`` a killed run continues from its last completed block and produces the same
    result as an uninterrupted run. The folder is removed when the run completes.
    """
    from . import calib as calib_mod
    from .evaluate import perplexity
    from .model import load_model

    s = (settings or QuantizeSettings())
    s = QuantizeSettings(**{**asdict(s), **overrides}).resolved()
    info = method_info(s.method)
    timings: dict = {}
    if export not in ("fake", "packed", "both"):
        raise InvalidArgumentError(f"export must be 'fake', 'packed' or 'both', got {export!r}")
    if out is not None and Path(out).exists() and not overwrite:
        raise InvalidArgumentError(f"{out} already exists; choose another folder or pass overwrite=True")

    with _Timer(timings, "load"):
        if model is None:
            model = load_model(model_dir)
        else:
            model.reset_weights()
    names = model.linear_names()
    shapes = {n: model.linear_shape(n) for n in names}
    n_weights = sum(a * b for a, b in shapes.values())
    if s.estimator == "auto":  # resolved here (it needs the model's size) and recorded as resolved
        s.estimator = "diagonal" if 4 * n_weights <= DIAGONAL_AUTO_BYTES else "fisher"

    with _Timer(timings, "calibration data"):
        windows, calib_settings = calib_mod.calibration_windows(model.tokenizer, calib, s.n_calib,
                                                               s.seqlen, s.seed)

    if info["allocation"] == "iqp" and s.avg_bits is None:
        raise InvalidArgumentError("method 'hiq' needs a budget: pass avg_bits (e.g. 2.3)")

    state = None
    if checkpoint_dir is not None:
        from .progress import ProgressState, plans_from_json, run_key
        state = ProgressState(checkpoint_dir, run_key(asdict(s), model.fingerprint(), calib_settings),
                              resume=resume)
        if cache_dir is None:  # statistics survive a crash too
            cache_dir = Path(checkpoint_dir) / "stats"

    # ---- statistics and plans
    fisher_col = None
    allocation = None
    restored = state.plans() if state is not None else None
    if restored is not None:
        plans = plans_from_json(restored)
        allocation = state.meta.get("allocation")
    elif info["fisher"]:
        with _Timer(timings, "fisher"):
            from .stats import collect_stats, load_or_collect
            # the (d_out, d_in) Fisher diagonal only when the diagonal M estimator needs it;
            # otherwise the column scores alone (bounded memory: stats.collect_stats)
            full = info["allocation"] == "iqp" and s.estimator == "diagonal"
            if cache_dir is not None:
                st = load_or_collect(cache_dir, model, windows, gram=False, fisher=True,
                                     calib=calib_settings, progress=progress, n_threads=s.n_threads,
                                     fisher_full=full)
            else:
                st = collect_stats(model, windows, gram=False, fisher=True, progress=progress,
                                   n_threads=s.n_threads, fisher_full=full)
            fisher_col = st.fisher_col
    budget_bits = s.avg_bits * n_weights if s.avg_bits is not None else None
    if restored is None:
        with _Timer(timings, "allocation"):
            ratios = {}
            if info["allocation"] == "none":
                ratios = {n: 0.0 for n in names}
            elif info["allocation"] in ("fixed", "fixed-budget"):
                if s.ratio is not None:
                    r = s.ratio
                elif budget_bits is not None:
                    r = uniform_ratio_for_budget(shapes, s, budget_bits)
                else:
                    r = 0.05 if info["allocation"] == "fixed" else 0.01
                ratios = {n: r for n in names}
            else:  # iqp
                if budget_bits is None:
                    raise InvalidArgumentError("method 'hiq' needs a budget: pass avg_bits (e.g. 2.3)")
                from . import allocate
                t_m = time.perf_counter()
                sm = allocate.sensitivity_matrix(
                    model, windows, estimator=s.estimator, fisher_col=fisher_col,
                    fisher=st.fisher if s.estimator == "diagonal" else None, candidates=s.candidates,
                    b_low=s.wbits, b_high=s.hbits, group_size=s.group_size, names=names,
                    n_windows=min(s.m_windows, len(windows)), pairs=s.m_pairs)
                timings["sensitivity matrix"] = time.perf_counter() - t_m
                alloc = allocate.allocate(shapes, fisher_col, sm, avg_bits=s.avg_bits,
                                          scale_bits=s.scale_bits, n_threads=s.n_threads)
                ratios = alloc.ratios
                allocation = {k: v for k, v in alloc.to_dict().items() if k != "layers"}
                allocation["m_seconds"] = sm.seconds
            plans = {}
            for n in names:
                d_out, d_in = shapes[n]
                k = n_high(ratios[n], d_in) if s.hbits != s.wbits else 0
                idx = top_columns(fisher_col[n], k) if k else np.zeros(0, np.int64)
                plans[n] = LayerPlan(k, idx, s.wbits, s.hbits, s.group_size, ratios[n])

    # ---- block-by-block quantization
    kind = info["quantizer"] if s.quantizer == "auto" else s.quantizer
    if kind not in ("rtn", "gptq", "lwc", "adaround", "hybrid"):
        raise InvalidArgumentError(f"quantizer must be auto, rtn, gptq, lwc, adaround or hybrid, got {kind!r}")
    qlayers = {}
    t_q = time.perf_counter()
    bs = max(1, s.calib_batch)
    start = 0
    if state is not None and state.done_blocks:
        start = state.done_blocks
        entries = state.meta["entries"]
        for b in range(start):
            names_b = model.block_linear_names(b)
            for name, ql in state.load_block(b, names_b, entries).items():
                model.set_weight(name, ql)  # kept quantized: ~1 byte per weight
                qlayers[name] = ql
        h = state.load_hidden()
    else:
        h = np.concatenate([model.embed(windows[sl]) for sl in _batches(len(windows), bs)])
    block_obj = s.objective in ("block", "refine")
    # the full-precision path: the block-wise objectives' targets
    if block_obj:
        h_fp = state.load_hidden("hidden_fp") if start > 0 else h.copy()
    else:
        h_fp = None
    for b in _progress(range(start, model.num_blocks), progress, desc=f"quantize ({s.method})",
                       unit="block", initial=start, total=model.num_blocks):
        names_b = model.block_linear_names(b)
        if block_obj:
            # the block-wise objectives' targets: the full-precision model's output from the
            # full-precision inputs (so a block also corrects the error it receives), computed
            # before any of the block's weights change
            targets = _block_outputs(model, b, h_fp, bs, s.n_threads)
            # aug_loss: the full-precision block on the quantized path's inputs
            aug_targets = _block_outputs(model, b, h, bs, s.n_threads) if s.block_aug_loss else None
        if s.objective == "block":
            # OmniQuant's objective: the block's output under quantized weights, from the inputs
            # the quantized blocks before it produce, against the targets
            res = _block_pass(model, b, h, targets, {n: plans[n] for n in names_b}, s,
                              adaround=kind == "hybrid", aug_targets=aug_targets)
            for name in names_b:
                ql = res[name].to_layer(name, info={"objective": "block",
                                                    "steps": _block_steps(len(h), s)})
                model.set_weight(name, ql)
                qlayers[name] = ql
        elif s.objective == "refine":
            qlayers.update(_refine_block(model, b, h, targets, plans, kind, s, bs, aug_targets))
        else:
            grams = _block_grams(model, b, h, bs, s.n_threads) if kind != "rtn" else None
            for name in names_b:
                W = model.get_weight(name)
                H, ntok = grams.gram(name) if grams is not None else (None, 0)
                ql = _quantize_layer(kind, name, W, H, ntok, plans[name], s)
                model.set_weight(name, ql)  # kept quantized: ~1 byte per weight
                qlayers[name] = ql
            del grams
        h = _block_outputs(model, b, h, bs, s.n_threads)
        if block_obj:
            h_fp = targets
        if state is not None:
            from .progress import plans_to_json
            from .export import layer_entry
            names_b = model.block_linear_names(b)
            entries = dict(state.meta["entries"]) if state.meta else {}
            entries.update({n: layer_entry(qlayers[n]) for n in names_b})
            state.save_block(b, {n: qlayers[n] for n in names_b}, h, plans_to_json(plans), entries,
                             allocation, hidden_fp=h_fp)
            if os.environ.get("HIQUANT_TEST_SLOW_BLOCKS"):  # test hook: widen the kill window
                time.sleep(float(os.environ["HIQUANT_TEST_SLOW_BLOCKS"]))
    timings["quantize"] = time.perf_counter() - t_q
    del h

    total_bits = sum(ql.storage_bits() for ql in qlayers.values())
    layers = [dict(name=n, d_out=shapes[n][0], d_in=shapes[n][1], ratio=float(plans[n].ratio),
                   k=qlayers[n].k, b_low=qlayers[n].b_low, b_high=qlayers[n].b_high,
                   bits=qlayers[n].storage_bits(),
                   bits_per_weight=qlayers[n].storage_bits() / (shapes[n][0] * shapes[n][1]),
                   **{k: v for k, v in qlayers[n].info.items() if isinstance(v, (int, float, str))})
              for n in names]
    report = Report(settings=asdict(s), model=str(Path(model.path).resolve()), layers=layers,
                    avg_bits=total_bits / n_weights, total_bits=int(total_bits), n_weights=int(n_weights),
                    timings=timings, allocation=allocation, versions=versions())
    report.settings["calibration"] = calib_settings
    if budget_bits is not None and total_bits > budget_bits + 1e-6:
        raise AssertionError(f"internal error: {total_bits} bits exceed the budget {budget_bits}")

    # ---- evaluation
    if eval_text is not None:
        with _Timer(timings, "evaluate"):
            test_ids = calib_mod.tokenize_text(model.tokenizer, calib_mod.load_text(eval_text))
            report.ppl = perplexity(model, test_ids, s.eval_seqlen, s.eval_windows, progress=progress)["ppl"]
            if fp_eval:
                model.reset_weights()
                report.fp_ppl = perplexity(model, test_ids, s.eval_seqlen, s.eval_windows,
                                           progress=progress)["ppl"]
                for n, ql in qlayers.items():
                    model.set_weight(n, ql)
        report.settings["eval"] = {"file": str(Path(eval_text).resolve()), "seqlen": s.eval_seqlen,
                                   "windows": s.eval_windows}

    # ---- export
    if out is not None:
        with _Timer(timings, "export"):
            from .export import write_outputs
            report.output = write_outputs(out, model, qlayers, report, export=export,
                                          overwrite=overwrite)
    if state is not None:
        state.remove()
    return report
