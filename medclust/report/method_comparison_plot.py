"""Figure of the method comparison: embedding NMI per label and method next to each task's primary metric."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from medclust.report.method_comparison import MISSING, MethodComparison, _finite, headline
from medclust.report.plots import _empty, _save
from medclust.report.study_plots import SHORT_VERDICT

__all__ = ["plot_method_comparison"]


def _nmi(comparison: MethodComparison, method: str, label: str) -> float:
    entry = (comparison.clustering[method].get("labels") or {}).get(label) or {}
    value = (entry.get("embedding") or {}).get("nmi")
    return float(value) if _finite(value) else math.nan


def plot_method_comparison(comparison: MethodComparison, path: str | Path) -> Path:
    """Embedding NMI per label and method (heat map) next to each task's primary metric.

    Task panels show the mean over seeds with its interval as error bars where the study table has
    one, the reference's mean as a dashed line and each method's verdict beside its point.

    Args:
        comparison: from :func:`load_comparison`.
        path: the PNG to write.

    Returns:
        ``path``.
    """
    methods = comparison.methods
    if not methods:
        return _empty(path, "Pretraining methods compared", "no clustering results were given")
    n = len(methods)
    widths = [max(2.8, 0.8 * len(comparison.labels) + 1.2)] + [3.4] * len(comparison.tasks)
    fig = Figure(figsize=(sum(widths) + 1.5, 1.8 + 0.36 * n), layout="constrained")
    axes = fig.subplots(1, len(widths), squeeze=False, gridspec_kw={"width_ratios": widths})[0]
    heat = np.array([[_nmi(comparison, m, label) for label in comparison.labels] for m in methods], dtype=float)
    ax = axes[0]
    if comparison.labels:
        cmap = colormaps["viridis"].with_extremes(bad="0.85")
        image = ax.imshow(np.ma.masked_invalid(heat), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
        for (i, j), value in np.ndenumerate(heat):
            text = f"{value:.2f}" if math.isfinite(value) else MISSING
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="w" if value < 0.6 else "k")
        ax.set_xticks(range(len(comparison.labels)), comparison.labels, rotation=35, ha="right", fontsize=8)
        fig.colorbar(image, ax=ax, shrink=0.8, label="NMI")
    ax.set_yticks(range(n), methods, fontsize=8)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_title("embedding k-means NMI\n(one run each, no interval)", fontsize=9)
    for ax, cells in zip(axes[1:], comparison.tasks):
        reference = cells.rows.get(cells.reference)
        if reference is not None and _finite(reference.get("mean")):
            ax.axvline(float(reference["mean"]), color="0.45", linestyle="--", linewidth=1)
        for i, method in enumerate(methods):
            row = cells.rows.get(method)
            if row is None:
                ax.text(0.02, i, f"{MISSING} not run", transform=ax.get_yaxis_transform(), fontsize=7,
                        va="center", color="0.5")  # fmt: skip
                continue
            mean = float(row["mean"]) if _finite(row.get("mean")) else math.nan
            colour = "0.35" if method == cells.reference else f"C{i % 10}"
            if _finite(row.get("ci_low")) and _finite(row.get("ci_high")):
                ax.errorbar(mean, i, xerr=[[mean - float(row["ci_low"])], [float(row["ci_high"]) - mean]],
                            fmt="o", color=colour, capsize=3, markersize=4)  # fmt: skip
            else:
                ax.plot(mean, i, "o", mfc="none", color=colour, markersize=4)
            word = "reference" if method == cells.reference else SHORT_VERDICT.get(str(row.get("verdict")), str(row.get("verdict", "")))
            ax.text(1.02, i, word, transform=ax.get_yaxis_transform(), fontsize=7, va="center",
                    color="k" if word in ("helps", "hurts") else "0.4", clip_on=False)  # fmt: skip
        ax.set_ylim(n - 0.5, -0.5)
        ax.set_yticks(range(n), [""] * n)
        ax.grid(axis="x", alpha=0.3)
        direction = "higher" if cells.higher_is_better else "lower"
        ax.set_title(f"{cells.task}{' (SIMULATED)' if cells.simulated else ''}", fontsize=9)
        ax.set_xlabel(f"{cells.metric} @ fraction {cells.fraction:g}\n({direction} is better; open: no interval)", fontsize=8)
    wrapped = [textwrap.fill(line, 150) for line in headline(comparison)]
    fig.suptitle("Pretraining methods compared\n" + "\n".join(wrapped), fontsize=9)
    return _save(fig, path)
