"""The verdict table: does pretraining help, per task x init x label fraction (primary metric).

It opens the report (``workflow/report/workflow.rst`` embeds it) and sits under each task's study
figures. Every value comes from the study tables (``results/study/{task}.csv``): the paired
difference to random init, its interval, how that interval was obtained (``diff_ci_method``) and
the verdict :func:`medclust.evaluate.statistics.verdict` gave it. The output is an HTML fragment
(one ``<table>`` with inline styles), readable on its own and embeddable in a page.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medclust.io.atomic import write_text_atomic

VERDICT_COLOURS = {
    "helps": "#d9f2d9",
    "hurts": "#f7d6d6",
    "no detectable difference": "#eeeeee",
}
"""Row shading per verdict (inconclusive: none)."""

_CELL = "border:1px solid #bbb;padding:2px 6px;"


def comparison_rows(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The primary-metric comparisons (init versus the reference) of study-table rows, in order."""
    return [r for r in rows if r.get("primary") and r["init"] != r.get("ref_init", "none")]


def _number(value: Any, digits: int = 3) -> str:
    return "–" if value is None or not math.isfinite(float(value)) else f"{float(value):+.{digits}f}"


def effect_text(row: Mapping[str, Any]) -> str:
    """``+0.123 [+0.010, +0.236]`` or ``+0.123 (no interval)``."""
    effect = _number(row.get("diff_vs_ref", math.nan))
    low, high = row.get("diff_ci_low", math.nan), row.get("diff_ci_high", math.nan)
    if not (math.isfinite(low) and math.isfinite(high)):
        return f"{effect} (no interval)"
    return f"{effect} [{_number(low)}, {_number(high)}]"


def verdict_table_html(tables: Sequence[Sequence[Mapping[str, Any]]]) -> str:
    """The verdict table of one or several tasks as an HTML fragment.

    Args:
        tables: study-table rows (typed, see ``read_study_table``), one sequence per task.

    Returns:
        ``<table>…</table>`` plus a one-line legend; a sentence instead when there is no comparison.
    """
    rows = [r for table in tables for r in comparison_rows(table)]
    if not rows:
        return "<p>No comparison with random init in the study (only one init was run).</p>\n"
    level = float(rows[0].get("ci_level", 0.95))
    head = ["task", "metric", "init vs ref", "label fraction", "paired seeds", "test cases",
            f"effect [{level:.0%} interval]", "interval method", "verdict"]  # fmt: skip
    out = ['<table class="medclust-verdicts" style="border-collapse:collapse;font-size:90%">', "<thead><tr>"]
    out += [f'<th style="{_CELL}background:#e6e6e6">{html.escape(h)}</th>' for h in head]
    out.append("</tr></thead><tbody>")
    for r in rows:
        colour = VERDICT_COLOURS.get(str(r.get("verdict", "")), "")
        direction = "higher is better" if r.get("higher_is_better", True) else "lower is better"
        simulated = " (SIMULATED)" if r.get("simulated") else ""
        cells = [
            f"{r['task']}{simulated}",
            f"{r['metric']} ({direction})",
            f"{r['init']} − {r.get('ref_init', 'none')}",
            f"{float(r['fraction']):g}",
            str(r.get("n_pairs", "")),
            str(r.get("n_cases", "")),
            effect_text(r),
            str(r.get("diff_ci_method", "")),
            str(r.get("verdict", "")),
        ]
        style = f"{_CELL}background:{colour};" if colour else _CELL
        out.append("<tr>" + "".join(f'<td style="{style}">{html.escape(c)}</td>' for c in cells) + "</tr>")
    out.append("</tbody></table>")
    out.append(
        "<p style=\"font-size:85%\">Effect: mean paired difference init − random init (same fraction, "
        "seed and test cases). A verdict other than inconclusive needs an interval and at least 3 "
        "paired seeds; <i>helps</i>/<i>hurts</i>: the interval excludes 0 (in the metric's good / "
        "bad direction); <i>no detectable difference</i>: it contains 0.</p>"
    )
    return "\n".join(out) + "\n"


def write_verdict_table(tables: Sequence[Sequence[Mapping[str, Any]]], path: str | Path) -> Path:
    """Write :func:`verdict_table_html` to ``path`` atomically (UTF-8)."""
    write_text_atomic(path, verdict_table_html(tables))
    return Path(path)
