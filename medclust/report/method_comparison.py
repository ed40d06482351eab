"""Method comparison: every pretraining method side by side, read from the files it wrote.

One row per method (the config's order, random init ``none`` last). Per free label of the learning
monitor (dataset, modality, body region, z bin, structures): the clustering quality of the method's
embedding (spherical k-means with k = the label's classes) and of its own cluster assignments
(NMI, ARI, Hungarian accuracy), and its kNN / linear probe scores, from
``results/pretrain/{method}/clustering.json``. Per downstream task: the primary metric at the
task's smallest label fraction as ``mean [ci_low, ci_high]``, the paired difference to random init
and the verdict, copied from the study table ``results/study/{task}.csv``.

Nothing is recomputed here. The study numbers are written with the 6 significant digits the study
CSV stores (so a cell reads exactly as the table does) and the verdict words are the table's. The
clustering and probe scores come from one pretraining run per method and have no interval: they
describe each encoder, and the headline never ranks methods by them; only the study table's
verdicts compare a method with random init (design §8).
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from medclust.data.probe_set import PROBE_LABELS, PROBE_METRICS
from medclust.errors import MedclustError
from medclust.evaluate.study import read_study_table
from medclust.io.atomic import write_csv_atomic, write_text_atomic
from medclust.report.verdicts import _CELL, VERDICT_COLOURS, effect_text

__all__ = [
    "MISSING", "MethodComparison", "TaskCells", "comparison_html", "comparison_table", "headline",
    "interval_text", "load_comparison", "method_order", "table_rows",
    "write_method_comparison",
]  # fmt: skip

MISSING = "—"
"""Cell text for a value that does not exist: a null score, a label a method did not report, a
method outside a task's fine-tuning grid."""

REFERENCE = "none"
"""Random initialisation: listed last, the reference of every verdict."""

_METRICS = (("nmi", "NMI"), ("ari", "ARI"), ("accuracy", "accuracy"))
_PROBES = (("knn", "kNN probe"), ("linear", "linear probe"))


@dataclass
class TaskCells:
    """The primary-metric rows of one study table at its smallest label fraction.

    Attributes:
        task: the task name.
        metric: the primary metric.
        fraction: the smallest label fraction of the table.
        reference: the init every verdict compares with (the table's ``ref_init``).
        higher_is_better: the metric's direction.
        simulated: any of these runs used simulated data.
        rows: ``{init: study-table row}`` at that fraction.
    """

    task: str
    metric: str
    fraction: float
    reference: str
    higher_is_better: bool
    simulated: bool
    rows: dict[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass
class MethodComparison:
    """Everything the table, the page and the figure show.

    Attributes:
        methods: row order (config order, ``none`` last).
        clustering: ``{method: contents of its clustering.json}``.
        labels: the free labels, in the learning monitor's order.
        tasks: one entry per study table, in the order given.
        has_assignments: some method reported clustering scores of its own assignments.
    """

    methods: list[str]
    clustering: dict[str, Mapping[str, Any]]
    labels: list[str]
    tasks: list[TaskCells]
    has_assignments: bool


# --- loading ------------------------------------------------------------------------------------


def _read_clustering(item: str | Path | Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    """(method, contents) of one clustering.json (a path, or its already-loaded contents)."""
    if isinstance(item, Mapping):
        data, where = item, "clustering results"
    else:
        where = str(item)
        try:
            data = json.loads(Path(item).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise MedclustError(f"{where}: cannot read clustering results: {err}") from err
    if not isinstance(data, Mapping) or not isinstance(data.get("method"), str) or not data["method"]:
        raise MedclustError(f"{where}: not a clustering.json of a pretraining run (no `method` name)")
    for key in ("labels", "probes"):
        if not isinstance(data.get(key) or {}, Mapping):
            raise MedclustError(f"{where}: `{key}` must be an object keyed by label")
    return data["method"], data


def _task_cells(item: str | Path | Sequence[Mapping[str, Any]]) -> TaskCells:
    """The primary-metric rows of one study table (a path, or rows from ``read_study_table``)."""
    where = str(item) if isinstance(item, (str, Path)) else "study table"
    rows = read_study_table(item) if isinstance(item, (str, Path)) else list(item)
    primary = [r for r in rows if r.get("primary")]
    if not primary:
        raise MedclustError(f"{where}: no rows of a primary metric (not a study table?)")
    fraction = min(float(r["fraction"]) for r in primary)
    chosen = [r for r in primary if float(r["fraction"]) == fraction]
    first = chosen[0]
    return TaskCells(
        task=str(first["task"]),
        metric=str(first["metric"]),
        fraction=fraction,
        reference=str(first.get("ref_init") or REFERENCE),
        higher_is_better=bool(first.get("higher_is_better", True)),
        simulated=any(bool(r.get("simulated")) for r in chosen),
        rows={str(r["init"]): r for r in chosen},
    )


def method_order(configured: Sequence[str] | None, found: Sequence[str]) -> list[str]:
    """Rows in the config's order, methods not listed there after them, ``none`` last.

    Args:
        configured: config ``pretrain.methods`` (None: the order of ``found``).
        found: the methods that have a clustering.json.

    Returns:
        The row order.

    Raises:
        MedclustError: a configured method has no clustering.json.
    """
    order = list(dict.fromkeys(configured if configured else found))
    missing = [m for m in order if m not in found]
    if missing:
        raise MedclustError(f"method comparison: no clustering.json given for {', '.join(missing)}")
    order += [m for m in found if m not in order]
    return [m for m in order if m != REFERENCE] + ([REFERENCE] if REFERENCE in order else [])


def load_comparison(
    clustering_files: Sequence[str | Path | Mapping[str, Any]],
    study_tables: Sequence[str | Path | Sequence[Mapping[str, Any]]],
    methods: Sequence[str] | None = None,
) -> MethodComparison:
    """Read every method's clustering.json and every task's study table.

    Args:
        clustering_files: ``results/pretrain/{method}/clustering.json`` (paths or loaded contents).
        study_tables: ``results/study/{task}.csv`` (paths or rows from ``read_study_table``).
        methods: config ``pretrain.methods``, for the row order.

    Returns:
        The comparison.
    """
    clustering: dict[str, Mapping[str, Any]] = {}
    for item in clustering_files:
        method, data = _read_clustering(item)
        if method in clustering:
            raise MedclustError(f"method comparison: two clustering.json files for method {method}")
        clustering[method] = data
    found = {
        label
        for data in clustering.values()
        for key in ("labels", "probes")
        for label in (data.get(key) or {})
    }
    labels = [label for label in PROBE_LABELS if label in found] + sorted(found - set(PROBE_LABELS))
    has_assignments = any(
        isinstance(entry, Mapping) and entry.get("assignments")
        for data in clustering.values()
        for entry in (data.get("labels") or {}).values()
    )
    return MethodComparison(
        methods=method_order(methods, list(clustering)),
        clustering=clustering,
        labels=labels,
        tasks=[_task_cells(t) for t in study_tables],
        has_assignments=has_assignments,
    )


# --- the table ----------------------------------------------------------------------------------


def _finite(value: Any) -> bool:
    try:
        return value is not None and not isinstance(value, bool) and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _score(value: Any) -> str:
    return f"{float(value):.3f}" if _finite(value) else MISSING


def _count(value: Any) -> str:
    return str(int(value)) if _finite(value) else MISSING


def _copied(value: Any) -> str:
    """A study-table number as the CSV stores it (6 significant digits)."""
    return f"{float(value):g}" if _finite(value) else MISSING


def interval_text(row: Mapping[str, Any]) -> str:
    """``mean [ci_low, ci_high]`` of a study-table row, or ``mean (no interval)``."""
    if not (_finite(row.get("ci_low")) and _finite(row.get("ci_high"))):
        return f"{_copied(row.get('mean'))} (no interval)"
    return f"{_copied(row.get('mean'))} [{_copied(row['ci_low'])}, {_copied(row['ci_high'])}]"


def _label_columns(label: str, with_assignments: bool) -> list[str]:
    columns = [f"{label}/items", f"{label}/classes"] + [f"{label}/embedding {name}" for _, name in _METRICS]
    if with_assignments:
        columns += [f"{label}/assignments clusters"] + [f"{label}/assignments {name}" for _, name in _METRICS]
    return columns + [f"{label}/{name}" for _, name in _PROBES]


def _task_columns(cells: TaskCells) -> list[str]:
    t, ref = cells.task, cells.reference
    return [f"{t}/{cells.metric} @ {cells.fraction:g}", f"{t}/difference vs {ref}", f"{t}/verdict vs {ref}"]


def _label_cells(data: Mapping[str, Any], label: str, with_assignments: bool) -> list[str]:
    entry = (data.get("labels") or {}).get(label) or {}
    embedding = entry.get("embedding") or {}
    own = entry.get("assignments") or {}
    probe = (data.get("probes") or {}).get(label) or {}
    cells = [_count(entry.get("items")), _count(entry.get("classes"))]
    cells += [_score(embedding.get(key)) for key, _ in _METRICS]
    if with_assignments:
        cells += [_count(own.get("clusters"))] + [_score(own.get(key)) for key, _ in _METRICS]
    return cells + [_score(probe.get(key)) for key, _ in _PROBES]


def _task_cells_of(cells: TaskCells, method: str) -> list[str]:
    row = cells.rows.get(method)
    if row is None:
        return [MISSING, MISSING, MISSING]
    if method == cells.reference:
        return [interval_text(row), "reference", "reference"]
    return [interval_text(row), effect_text(row), str(row.get("verdict") or MISSING)]


def table_rows(comparison: MethodComparison) -> list[dict[str, str]]:
    """One row per method: ``{column: text}``, every row with the same columns in the same order.

    Columns: ``method``; per label ``<label>/items``, ``/classes``, ``/embedding NMI|ARI|accuracy``,
    (if any method has a cluster head) ``/assignments clusters|NMI|ARI|accuracy``,
    ``/kNN probe``, ``/linear probe``; per task ``<task>/<metric> @ <fraction>``,
    ``/difference vs none``, ``/verdict vs none``. :data:`MISSING` marks what does not exist.
    """
    rows = []
    for method in comparison.methods:
        data = comparison.clustering[method]
        row = {"method": method}
        for label in comparison.labels:
            row.update(zip(_label_columns(label, comparison.has_assignments),
                           _label_cells(data, label, comparison.has_assignments)))  # fmt: skip
        for cells in comparison.tasks:
            row.update(zip(_task_columns(cells), _task_cells_of(cells, method)))
        rows.append(row)
    return rows


def comparison_table(
    clustering_files: Sequence[str | Path | Mapping[str, Any]],
    study_tables: Sequence[str | Path | Sequence[Mapping[str, Any]]],
    methods: Sequence[str] | None = None,
) -> list[dict[str, str]]:
    """The method comparison table (see :func:`table_rows`) straight from the files.

    Args:
        clustering_files: ``results/pretrain/{method}/clustering.json`` of every method.
        study_tables: ``results/study/{task}.csv`` of every task.
        methods: config ``pretrain.methods`` (row order; ``none`` goes last whatever its place).

    Returns:
        One ``{column: text}`` row per method.
    """
    return table_rows(load_comparison(clustering_files, study_tables, methods))


# --- the headline -------------------------------------------------------------------------------


def headline(comparison: MethodComparison, limit: int = 6) -> list[str]:
    """What the comparison supports, in the verdicts' words (a sentence per line).

    Only comparisons the study table called *helps* are named as helping; clustering and probe
    scores are described, never ranked.
    """
    by_verdict: dict[str, list[str]] = {}
    for cells in comparison.tasks:
        for method in comparison.methods:
            row = cells.rows.get(method)
            if row is None or method == cells.reference:
                continue
            by_verdict.setdefault(str(row.get("verdict") or "no verdict"), []).append(f"{method} on {cells.task}")
    lines = []
    if comparison.tasks:
        fractions = sorted({f"{c.fraction:g}" for c in comparison.tasks})
        lines.append(
            f"Fine-tuning (primary metric at label fraction {' / '.join(fractions)}), verdict vs random init "
            f"from the study tables: {sum(map(len, by_verdict.values()))} comparisons."
        )
        if not by_verdict.get("helps"):
            lines.append("No comparison has the verdict helps: no method was shown to help on any task.")
        for verdict in ["helps", "hurts"] + sorted(set(by_verdict) - {"helps", "hurts"}):
            names = by_verdict.get(verdict, [])
            if not names:
                continue
            shown = ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
            lines.append(f"{verdict}: {shown}.")
    lines.append(
        "Clustering and probe scores: one pretraining run per method, no interval; they describe each "
        "encoder and are not evidence that one method is better than another."
    )
    return lines


# --- the page -----------------------------------------------------------------------------------


def _html_table(rows: Sequence[Mapping[str, str]], columns: Sequence[str], groups: Mapping[str, str]) -> str:
    """``rows`` under a two-row header: the column groups (``<group>/<field>``), then the fields."""
    head = f"{_CELL}background:#e6e6e6"
    out = ['<table class="medclust-methods" style="border-collapse:collapse;font-size:90%">', "<thead><tr>"]
    out.append(f'<th rowspan="2" style="{head}">method</th>')
    spans: list[list[Any]] = []
    for column in columns:
        group = column.split("/", 1)[0]
        if spans and spans[-1][0] == group:
            spans[-1][1] += 1
        else:
            spans.append([group, 1])
    out += [f'<th colspan="{n}" style="{head}">{html.escape(groups.get(g, g))}</th>' for g, n in spans]
    out.append("</tr><tr>")
    out += [f'<th style="{head}">{html.escape(c.split("/", 1)[1])}</th>' for c in columns]
    out.append("</tr></thead><tbody>")
    for row in rows:
        cells = [f'<td style="{_CELL}font-weight:bold">{html.escape(row["method"])}</td>']
        for column in columns:
            text = row.get(column, MISSING)
            colour = VERDICT_COLOURS.get(text, "") if column.split("/", 1)[1].startswith("verdict") else ""
            style = f"{_CELL}background:{colour};" if colour else _CELL
            cells.append(f'<td style="{style}">{html.escape(text)}</td>')
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _html_section(rows: Sequence[Mapping[str, str]], columns: Sequence[str], groups: Mapping[str, str], empty: str, legend: str) -> list[str]:
    """One table of the page (or the sentence saying why there is none) and its legend."""
    body = f'<div style="overflow-x:auto">{_html_table(rows, columns, groups)}</div>' if columns else f"<p>{empty}</p>"
    return [body, f'<p style="font-size:85%">{html.escape(legend)}</p>']


def comparison_html(comparison: MethodComparison) -> str:
    """The comparison as a self-contained HTML page (inline styles, no external files)."""
    rows = table_rows(comparison)
    label_columns = [c for label in comparison.labels for c in _label_columns(label, comparison.has_assignments)]
    task_columns = [c for cells in comparison.tasks for c in _task_columns(cells)]
    label_groups = {label: f"{label} (probe: {PROBE_METRICS.get(label, 'score')})" for label in comparison.labels}
    task_groups = {
        c.task: f"{c.task}{' (SIMULATED)' if c.simulated else ''}: {c.metric} "
        f"({'higher' if c.higher_is_better else 'lower'} is better)"
        for c in comparison.tasks
    }
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>Pretraining methods compared</title></head>',
        '<body style="font-family:sans-serif">',
        "<h2>Pretraining methods compared</h2>",
        "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in headline(comparison)) + "</ul>",
        "<h3>Fine-tuning: primary metric at the smallest label fraction (copied from the study tables)</h3>",
    ]
    out += _html_section(
        rows, task_columns, task_groups, "No study table: no downstream task was configured.",
        "Cell: mean over seeds [interval] as the study table gives it; difference: mean paired difference to random "
        "init (same fraction, seed and test cases) [interval]; verdict: the study table's. "
        f"{MISSING}: the method is not in the task's fine-tuning grid.",
    )
    out.append("<h3>Pretraining: clustering of the probe items and probes (one run per method, no interval)</h3>")
    out += _html_section(
        rows, label_columns, label_groups, "No clustering results were reported.",
        "Embedding: spherical k-means of the encoder features with k = the label's classes; assignments: the "
        "method's own clusters (methods without a cluster head and random init have none). NMI, ARI and "
        "Hungarian-matched accuracy against the label; probes: out-of-fold kNN and linear probes. "
        f"{MISSING}: not defined or not reported.",
    )
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# --- the figure ---------------------------------------------------------------------------------


# --- all outputs --------------------------------------------------------------------------------


def write_method_comparison(
    comparison: MethodComparison,
    out_csv: str | Path | None = None,
    out_html: str | Path | None = None,
    out_png: str | Path | None = None,
) -> None:
    """Write the table (CSV), the page (HTML) and the figure (PNG), each atomically; None skips one."""
    if out_csv is not None:
        rows = table_rows(comparison)
        columns = list(rows[0]) if rows else ["method"]
        write_csv_atomic(out_csv, rows, columns)
    if out_html is not None:
        write_text_atomic(out_html, comparison_html(comparison))
    if out_png is not None:
        # the figure's module imports this one: imported here, not at the top
        from medclust.report.method_comparison_plot import plot_method_comparison

        plot_method_comparison(comparison, out_png)
