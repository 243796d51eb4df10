"""Plots for notebooks and ``hiquant inspect`` (needs the [plot] extra: matplotlib)."""

from __future__ import annotations

import numpy as np

__all__ = ["plot_fisher_and_ratios", "plot_ppl_vs_bits"]


def _plt():
    try:
        import matplotlib
        if matplotlib.get_backend().lower() not in ("module://matplotlib_inline.backend_inline",):
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover
        raise ImportError("plots need matplotlib: pip install 'hiquant[plot]'") from e
    return plt


def fisher_heatmap_matrix(names, fisher_col, bins: int = 64) -> np.ndarray:
    """Each layer's column scores, sorted descending and resampled to ``bins`` points, as a
    share of the layer's total (log10), so layers of different widths share one heat map."""
    rows = []
    for n in names:
        fc = np.sort(np.asarray(fisher_col[n], np.float64))[::-1]
        fc = fc / max(fc.sum(), 1e-300)
        x = np.linspace(0, fc.size - 1, bins)
        rows.append(np.log10(np.interp(x, np.arange(fc.size), fc) + 1e-12))
    return np.array(rows)


def plot_fisher_and_ratios(names, fisher_col, ratios=None, path=None, fixed_ratio=None):
    plt = _plt()
    fig, axes = plt.subplots(1, 2 if ratios else 1, figsize=(12 if ratios else 7, 0.18 * len(names) + 2),
                             squeeze=False)
    ax = axes[0, 0]
    im = ax.imshow(fisher_heatmap_matrix(names, fisher_col), aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels([n.replace("model.layers.", "") for n in names], fontsize=6)
    ax.set_xlabel("input channels, sorted by Fisher score (resampled)")
    ax.set_title("log10 share of the layer's Fisher mass")
    fig.colorbar(im, ax=ax)
    if ratios:
        ax = axes[0, 1]
        r = [ratios[n] for n in names]
        ax.barh(range(len(names)), r, color="tab:orange", label="optimized (hiq)")
        if fixed_ratio is not None:
            ax.axvline(fixed_ratio, color="k", ls="--", label=f"fixed {fixed_ratio:.3f}")
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels([])
        ax.invert_yaxis()
        ax.set_xlabel("high-impact ratio")
        ax.set_ylabel("linear layer (the order of the left panel)")
        ax.set_title("chosen high-impact ratio per layer")
        ax.legend(fontsize=8)
    axes[0, 0].invert_yaxis() if not ratios else None
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=120)
    return fig


def plot_ppl_vs_bits(rows, path=None, fp_ppl=None):
    """rows: iterable of dicts with method, avg_bits, ppl."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    by = {}
    for r in rows:
        by.setdefault(r["method"], []).append((r["avg_bits"], r["ppl"]))
    for m, pts in by.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=m)
    if fp_ppl is not None:
        ax.axhline(fp_ppl, color="k", ls=":", label="FP16")
    ax.set_xlabel("average bits per weight (exact storage)")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=120)
    return fig
