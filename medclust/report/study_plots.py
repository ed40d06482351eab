"""Study figures: metric versus label fraction with the verdicts, and the study table as a figure.

Every number comes from a study table (``results/study/{task}.csv``). Intervals are drawn only
where the table has one; where it has none the figure says why (its ``ci_method``), and the
paired-difference panel names each comparison's verdict instead of suggesting one with a band.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from medclust.report.plots import _empty, _save, _title_with_note
from medclust.report.verdicts import comparison_rows

_INIT_STYLE = {"none": {"color": "0.35", "linestyle": "--"}}

SHORT_VERDICT = {
    "helps": "helps",
    "hurts": "hurts",
    "no detectable difference": "no detectable diff.",
    "inconclusive (too few seeds or cases)": "inconclusive",
}


def _finite(values: Sequence[float]) -> np.ndarray:
    return np.isfinite(np.asarray(values, dtype=np.float64))


def _method_kind(method: str) -> str:
    """``two-level bootstrap (...)`` -> ``two-level bootstrap``; ``none: why`` stays whole."""
    method = str(method or "")
    return method if method.startswith("none") else method.split(" (", 1)[0]


def missing_intervals(rows: Sequence[Mapping[str, Any]], difference: bool = False) -> list[str]:
    """``"init @ fraction: reason"`` for every row without an interval (cell, or its difference).

    Args:
        rows: study-table rows (one metric).
        difference: look at the paired difference to the reference instead of the cell.

    Returns:
        One line per row that the figure draws without a band, with the table's ``ci_method``.
    """
    prefix = "diff_" if difference else ""
    low, high, method = f"{prefix}ci_low", f"{prefix}ci_high", f"{prefix}ci_method"
    out = []
    for r in rows:
        if difference and (r["init"] == r.get("ref_init", "none") or not math.isfinite(r.get("diff_vs_ref", math.nan))):
            continue
        if not (math.isfinite(r.get(low, math.nan)) and math.isfinite(r.get(high, math.nan))):
            out.append(f"{r['init']} @ {r['fraction']:g}: {r.get(method, '')}")
    return out


def verdict_summary(rows: Sequence[Mapping[str, Any]]) -> str:
    """One line per compared init: its verdict at each fraction (primary metric)."""
    lines = []
    comparisons = comparison_rows(rows)
    for init in dict.fromkeys(r["init"] for r in comparisons):
        mine = sorted((r for r in comparisons if r["init"] == init), key=lambda r: r["fraction"])
        parts = [f"{r['fraction']:g}: {SHORT_VERDICT.get(str(r.get('verdict')), r.get('verdict'))}" for r in mine]
        lines.append(f"{init} vs {mine[0].get('ref_init', 'none')} — " + ", ".join(parts))
    return "\n".join(lines)


def plot_study_curves(rows: Sequence[Mapping[str, Any]], path: str | Path, metric: str | None = None) -> Path:
    """Metric versus label fraction per init with intervals, and the paired difference with verdicts.

    Args:
        rows: study-table rows of one task (typed, see ``read_study_table``).
        path: the PNG to write.
        metric: which metric (default: the primary one).

    Returns:
        ``path``.
    """
    if not rows:
        return _empty(path, "Study", "empty study table")
    metric = metric or next((r["metric"] for r in rows if r.get("primary")), rows[0]["metric"])
    rows = [r for r in rows if r["metric"] == metric]
    task = rows[0]["task"]
    simulated = any(r.get("simulated") for r in rows)
    level = rows[0].get("ci_level", 0.95)
    ref = rows[0].get("ref_init", "none")
    inits = list(dict.fromkeys(r["init"] for r in rows))
    has_diff = any(math.isfinite(r.get("diff_vs_ref", math.nan)) for r in rows)
    fig = Figure(figsize=(11.5 if has_diff else 5.5, 4.8), layout="constrained")
    axes = fig.subplots(1, 2 if has_diff else 1, squeeze=False)[0]
    fractions = sorted({r["fraction"] for r in rows})
    log_x = len(fractions) > 1 and min(fractions) > 0 and max(fractions) / min(fractions) >= 4
    for i, init in enumerate(inits):
        mine = sorted((r for r in rows if r["init"] == init), key=lambda r: r["fraction"])
        x = np.array([r["fraction"] for r in mine])
        style = _INIT_STYLE.get(init, {"color": f"C{i}", "linestyle": "-"})
        y = np.array([r["mean"] for r in mine])
        lo = np.array([r["ci_low"] for r in mine], dtype=np.float64)
        hi = np.array([r["ci_high"] for r in mine], dtype=np.float64)
        seeds = max(r.get("n_seeds", 0) for r in mine)
        axes[0].plot(x, y, marker="o", label=f"{init} (n={seeds} seeds)", **style)
        ok = np.isfinite(lo) & np.isfinite(hi)
        if ok.any():  # a band only between fractions that have an interval
            axes[0].fill_between(x, lo, hi, where=ok, color=style["color"], alpha=0.18, linewidth=0)
        if has_diff and init != ref:
            d = np.array([r["diff_vs_ref"] for r in mine], dtype=np.float64)
            dlo = np.array([r["diff_ci_low"] for r in mine], dtype=np.float64)
            dhi = np.array([r["diff_ci_high"] for r in mine], dtype=np.float64)
            axes[1].plot(x, d, marker="o", label=init, **style)
            good = np.isfinite(dlo) & np.isfinite(dhi)
            if good.any():
                axes[1].errorbar(x[good], d[good], yerr=[d[good] - dlo[good], dhi[good] - d[good]],
                                 fmt="none", ecolor=style["color"], capsize=4, linewidth=1.2)  # fmt: skip
            for xi, di, r in zip(x, d, mine):
                if math.isfinite(di):
                    label = SHORT_VERDICT.get(str(r.get("verdict")), str(r.get("verdict", "")))
                    axes[1].annotate(label, (xi, di), xytext=(5, 6), textcoords="offset points", fontsize=8,
                                     color=style["color"])  # fmt: skip
    direction = "higher is better" if rows[0].get("higher_is_better", True) else "lower is better"
    axes[0].set_ylabel(f"{metric} ({direction})")
    axes[0].set_title(f"{metric}: mean over seeds, {level:.0%} interval where the design has one", fontsize=10)
    axes[0].legend(fontsize=8, title="init")
    _note(axes[0], "no interval (no band) for", missing_intervals(rows))
    if has_diff:
        axes[1].axhline(0.0, color="0.3", linewidth=1)
        axes[1].set_ylabel(f"{metric}: init − {ref} (paired; {direction})")
        axes[1].set_title(f"paired difference to {ref}: {level:.0%} interval and verdict", fontsize=10)
        axes[1].legend(fontsize=8)
        _note(axes[1], "no interval, so inconclusive whatever the sign, for", missing_intervals(rows, difference=True))
    for ax in axes:
        ax.set_xlabel("label fraction")
        if log_x:
            ax.set_xscale("log")
            ax.minorticks_off()
        ax.set_xticks(fractions)
        ax.set_xticklabels([f"{f:g}" for f in fractions])
        ax.grid(alpha=0.3)
        ax.margins(x=0.12)  # room for the verdict labels at the outer fractions
    trained_on = ";".join(sorted({str(r.get("trained_on", "")) for r in rows}))
    title = f"Task {task}: does pretraining help?"
    summary = verdict_summary(rows) if rows[0].get("primary") else ""
    if summary:
        title += f"\nverdict ({metric}): {summary}"
    fig.suptitle(_title_with_note(title, simulated, trained_on), fontsize=11)
    return _save(fig, path)


def _note(ax: Any, head: str, items: Sequence[str], limit: int = 4) -> None:
    """Say below the panel which points have no interval, and why (the table's ci_method)."""
    if not items:
        return
    shown = list(items[:limit]) + ([f"… and {len(items) - limit} more"] if len(items) > limit else [])
    ax.text(0.0, -0.2, head + ":\n" + "\n".join(shown), transform=ax.transAxes, fontsize=7, va="top", wrap=True)


_TABLE_COLUMNS = [
    ("metric", 1.1),
    ("init", 0.8),
    ("fraction", 0.7),
    ("seeds", 0.5),
    ("cases", 0.5),
    ("mean ± std", 1.3),
    ("interval", 1.3),
    ("interval method", 2.4),
    ("Δ vs none [interval]", 1.9),
    ("Δ interval method", 2.4),
    ("verdict", 1.6),
]


def _fmt(value: float, digits: int = 3) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def plot_study_table(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """The study table of one task rendered as a figure (the CSV holds the full precision).

    Args:
        rows: study-table rows of one task.
        path: the PNG to write.

    Returns:
        ``path``.
    """
    if not rows:
        return _empty(path, "Study table", "empty study table")
    task = rows[0]["task"]
    simulated = any(r.get("simulated") for r in rows)
    cells = []
    for r in rows:
        reference = r["init"] == r.get("ref_init", "none")
        cells.append(
            [
                r["metric"],
                r["init"],
                f"{r['fraction']:g}",
                str(r.get("n_seeds", "")),
                str(r.get("n_cases", "")),
                f"{_fmt(r['mean'])} ± {_fmt(r['std'])}",
                f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]",
                _method_kind(r.get("ci_method", "")),
                "" if reference else f"{_fmt(r['diff_vs_ref'])} [{_fmt(r['diff_ci_low'])}, {_fmt(r['diff_ci_high'])}]",
                "" if reference else _method_kind(r.get("diff_ci_method", "")),
                "" if reference else str(r.get("verdict", "")),
            ]
        )
    widths = np.array([w for _, w in _TABLE_COLUMNS])
    fig = Figure(figsize=(16, 0.8 + 0.27 * (len(cells) + 1)), layout="constrained")
    ax = fig.add_subplot()
    ax.axis("off")
    table = ax.table(
        cellText=cells,
        colLabels=[c for c, _ in _TABLE_COLUMNS],
        colWidths=(widths / widths.sum()).tolist(),
        bbox=[0.0, 0.0, 1.0, 1.0],
        cellLoc="center",
    )
    table.auto_set_font_size(False)
    table.set_fontsize(7)
    for (row, _), cell in table.get_celld().items():
        if row == 0:
            cell.set_text_props(weight="bold")
            cell.set_facecolor("0.9")
        elif rows[row - 1].get("primary"):
            cell.set_facecolor("#eef5ff")
    level = rows[0].get("ci_level", 0.95)
    fig.suptitle(
        _title_with_note(
            f"Study table, task {task}: {level:.0%} intervals by the design's rule (two-level bootstrap with "
            f">= 5 test cases, else student-t over >= 3 seeds, else none); primary metric shaded",
            simulated,
            ";".join(sorted({str(r.get("trained_on", "")) for r in rows})),
        ),
        fontsize=10,
    )
    return _save(fig, path)
