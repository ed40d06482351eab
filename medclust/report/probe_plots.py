"""Report figure of the learning monitor: probe scores and effective ranks against step, pretrained vs random init."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from medclust.data.probe_set import PROBE_LABELS, PROBE_METRICS
from medclust.report.plots import _empty, _save

__all__ = ["plot_probe_curves", "probe_figure", "probe_labels", "rank_datasets"]

_COLUMN = re.compile(r"^probe/(?P<label>[^/]+)/(?P<kind>knn|linear)$")
_RANK = re.compile(r"^rank/(?P<dataset>[^/]+)$")
_KIND_STYLE = {"knn": {"linestyle": "-", "marker": "o"}, "linear": {"linestyle": "--", "marker": "s"}}


def probe_labels(curves: Mapping[str, Mapping[str, Sequence[float]]]) -> list[str]:
    """Labels with at least one finite probe score in any method's columns (known labels first)."""
    found = {
        m.group("label")
        for data in curves.values()
        for column, values in data.items()
        if (m := _COLUMN.match(column)) and np.isfinite(np.asarray(values, float)).any()
    }
    return [label for label in PROBE_LABELS if label in found] + sorted(found - set(PROBE_LABELS))


def rank_datasets(curves: Mapping[str, Mapping[str, Sequence[float]]]) -> list[str]:
    """Datasets with at least one finite effective rank (``rank/<dataset>``) in any method's columns."""
    return sorted(
        {
            m.group("dataset")
            for data in curves.values()
            for column, values in data.items()
            if (m := _RANK.match(column)) and np.isfinite(np.asarray(values, float)).any()
        }
    )


def _last_finite(values: Sequence[float]) -> float:
    finite = np.asarray(values, float)
    finite = finite[np.isfinite(finite)]
    return float(finite[-1]) if finite.size else math.nan


def plot_probe_curves(curves: Mapping[str, Mapping[str, Sequence[float]]], path: str | Path) -> Path:
    """Probe scores against step, one panel per label, then the effective rank of each dataset's
    features: every method next to its random init.

    Args:
        curves: ``{method: columns of its metrics.csv}`` (``step``, ``probe/<label>/<knn|linear>``,
            ``probe_random/<label>/<knn|linear>``, ``rank/<dataset>``, ``rank_random/<dataset>``;
            empty fields NaN).
        path: the PNG to write.

    Returns:
        ``path``.
    """
    fig = probe_figure(curves)
    if fig is None:
        return _empty(path, "Learning-monitor probes", "no probe scores were logged (pretrain.probe.enabled: false?)")
    return _save(fig, path)


def probe_figure(curves: Mapping[str, Mapping[str, Sequence[float]]]) -> Figure | None:
    """The figure of :func:`plot_probe_curves` (None when nothing was logged); panel titles name what they show."""
    labels = probe_labels(curves)
    ranked = rank_datasets(curves)
    if not labels and not ranked:
        return None
    # (title, {style name: (column, random-init column)}) per panel
    panels = [
        (f"{label} ({PROBE_METRICS.get(label, 'score')})", {k: (f"probe/{label}/{k}", f"probe_random/{label}/{k}") for k in _KIND_STYLE})
        for label in labels
    ]
    panels += [(f"effective rank, {name} features", {"rank": (f"rank/{name}", f"rank_random/{name}")}) for name in ranked]
    ncols = min(len(panels), 3)
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4.6 * ncols, 3.4 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(panels) :]:
        ax.axis("off")
    methods = sorted(curves)
    for ax, (title, columns) in zip(axes, panels):
        for kind, (column, random_column) in columns.items():
            style = _KIND_STYLE.get(kind, {"linestyle": "-", "marker": "^"})
            baselines = {m: _last_finite(curves[m].get(random_column, [])) for m in methods}
            finite = [v for v in baselines.values() if math.isfinite(v)]
            # every method's random init is the same seeded encoder: one grey line unless they differ
            shared = bool(finite) and max(finite) - min(finite) < 1e-9
            if shared:
                ax.axhline(finite[0], color="0.45", linestyle=style["linestyle"], linewidth=1.2, label=f"random init ({kind})")
            for i, method in enumerate(methods):
                data = curves[method]
                y = np.asarray(data.get(column, []), float)
                x = np.asarray(data.get("step", np.arange(y.size)), float)[: y.size]
                ok = np.isfinite(y)
                if ok.any():
                    ax.plot(x[ok], y[ok], color=f"C{i}", markersize=3.5, linewidth=1.4, label=f"{method} ({kind})", **style)
                if not shared and math.isfinite(baselines[method]):
                    ax.axhline(baselines[method], color=f"C{i}", alpha=0.6, linestyle=":", linewidth=1.0, label=f"{method} random init ({kind})")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(
        "Learning monitor: kNN (solid) and linear (dashed) probes, out of fold, vs random init (grey);\n"
        "effective rank of each dataset's features (far below random init: collapse)"
    )
    return fig
