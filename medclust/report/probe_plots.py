"""Report figure of the learning monitor: probe scores against step, pretrained vs random init."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from medclust.data.probe_set import PROBE_LABELS, PROBE_METRICS
from medclust.report.plots import _empty, _save

__all__ = ["plot_probe_curves", "probe_labels"]

_COLUMN = re.compile(r"^probe/(?P<label>[^/]+)/(?P<kind>knn|linear)$")
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


def _last_finite(values: Sequence[float]) -> float:
    finite = np.asarray(values, float)
    finite = finite[np.isfinite(finite)]
    return float(finite[-1]) if finite.size else math.nan


def plot_probe_curves(curves: Mapping[str, Mapping[str, Sequence[float]]], path: str | Path) -> Path:
    """Probe scores against step, one panel per label: every method next to its random init.

    Args:
        curves: ``{method: columns of its metrics.csv}`` (``step``, ``probe/<label>/<knn|linear>``,
            ``probe_random/<label>/<knn|linear>``; empty fields NaN).
        path: the PNG to write.

    Returns:
        ``path``.
    """
    labels = probe_labels(curves)
    if not labels:
        return _empty(path, "Learning-monitor probes", "no probe scores were logged (pretrain.probe.enabled: false?)")
    ncols = min(len(labels), 3)
    nrows = math.ceil(len(labels) / ncols)
    fig = Figure(figsize=(4.6 * ncols, 3.4 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(labels) :]:
        ax.axis("off")
    methods = sorted(curves)
    for ax, label in zip(axes, labels):
        for kind, style in _KIND_STYLE.items():
            baselines = {m: _last_finite(curves[m].get(f"probe_random/{label}/{kind}", [])) for m in methods}
            finite = [v for v in baselines.values() if math.isfinite(v)]
            # every method's random init is the same seeded encoder: one grey line unless they differ
            shared = bool(finite) and max(finite) - min(finite) < 1e-9
            if shared:
                ax.axhline(finite[0], color="0.45", linestyle=style["linestyle"], linewidth=1.2, label=f"random init ({kind})")
            for i, method in enumerate(methods):
                data = curves[method]
                y = np.asarray(data.get(f"probe/{label}/{kind}", []), float)
                x = np.asarray(data.get("step", np.arange(y.size)), float)[: y.size]
                ok = np.isfinite(y)
                if ok.any():
                    ax.plot(x[ok], y[ok], color=f"C{i}", markersize=3.5, linewidth=1.4, label=f"{method} ({kind})", **style)
                if not shared and math.isfinite(baselines[method]):
                    ax.axhline(baselines[method], color=f"C{i}", alpha=0.6, linestyle=":", linewidth=1.0, label=f"{method} random init ({kind})")
        ax.set_title(f"{label} ({PROBE_METRICS.get(label, 'score')})")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Learning monitor: kNN (solid) and linear (dashed) probes, out of fold, vs random init (grey)")
    return _save(fig, path)
