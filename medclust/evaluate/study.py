"""``medclust study``: the study table of one task — does pretraining help, by how much, with how few labels.

Input: the ``metrics.json`` of every run of the task (``per_case.csv`` beside each is used when
present). Output: ``results/study/{task}.csv`` with one row per (metric, init, fraction):

========================  ======================================================================
column                    meaning
========================  ======================================================================
task, type                task name and type
metric, primary           metric name; ``True`` for the task's primary metric
higher_is_better          direction of the metric (HD95: lower is better)
init, fraction            initialisation (``none`` = random) and label fraction
n_seeds, seeds            number of runs (seeds) in the cell and their seeds (``;``-joined)
n_cases                   test cases common to the cell's runs (resampling units; 0 = no records)
mean, std                 mean and sample std (ddof=1) over seeds of the run values
ci_low, ci_high           interval of the mean (NaN: none; ``ci_method`` says why)
ci_method                 how the interval was obtained: two-level bootstrap, student-t over
                          seeds, or ``none: <reason>``
ci_undefined              bootstrap replicates whose metric was undefined (counted, not dropped)
ref_init, n_pairs         reference arm (``none``) and number of seed pairs
diff_vs_ref               mean paired difference ``init - none`` (same fraction and seed)
diff_ci_low, diff_ci_high interval of that difference (same rule, per-seed paired differences)
diff_ci_method            how that interval was obtained (as ``ci_method``)
diff_ci_undefined         undefined bootstrap replicates of the difference
verdict                   ``helps`` / ``hurts`` / ``no detectable difference`` /
                          ``inconclusive (too few seeds or cases)``; empty for the reference
simulated, trained_on     whether simulated data were involved (any run of the cell), and how
ci_level, bootstrap       the confidence level and the number of bootstrap replicates
========================  ======================================================================

The statistics are described in :mod:`medclust.evaluate.statistics`.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from medclust.errors import BadInputError, MedclustError
from medclust.evaluate.evaluate_run import (
    HIGHER_IS_BETTER,
    _classification_arrays,
    case_resampler,
    read_per_case,
)
from medclust.evaluate.metrics import roc_auc_per_class
from medclust.evaluate.statistics import (
    CaseResampler,
    Unit,
    cell_rng,
    loop_resampler,
    paired_difference,
    summarise_cell,
    verdict,
)
from medclust.io.atomic import write_csv_atomic

log = logging.getLogger(__name__)

STUDY_COLUMNS = [
    "task", "type", "metric", "primary", "higher_is_better", "init", "fraction", "n_seeds", "seeds",
    "n_cases", "mean", "std", "ci_low", "ci_high", "ci_method", "ci_undefined", "ref_init", "n_pairs",
    "diff_vs_ref", "diff_ci_low", "diff_ci_high", "diff_ci_method", "diff_ci_undefined", "verdict",
    "simulated", "trained_on", "ci_level", "bootstrap",
]  # fmt: skip


@dataclass
class StudySettings:
    """Config ``study`` section (statistics part).

    Args:
        bootstrap_samples: bootstrap replicates per CI.
        ci_level: confidence level of every interval.
        seed: seed of the bootstrap draws.
        resample_cases: with >= 5 test cases, use the two-level bootstrap (false: the seed is
            always the unit).
        reference_init: the arm every other init is compared with (random init).
    """

    bootstrap_samples: int = 2000
    ci_level: float = 0.95
    seed: int = 0
    resample_cases: bool = True
    reference_init: str = "none"

    @classmethod
    def from_dict(cls, settings: Mapping[str, Any] | None) -> StudySettings:
        settings = dict(settings or {})
        return cls(
            bootstrap_samples=int(settings.get("bootstrap_samples", cls.bootstrap_samples)),
            ci_level=float(settings.get("ci_level", cls.ci_level)),
            seed=int(settings.get("seed", cls.seed)),
            resample_cases=bool(settings.get("resample_cases", cls.resample_cases)),
            reference_init=str(settings.get("reference_init", cls.reference_init)),
        )


@dataclass
class RunResult:
    """One evaluated run: its ``metrics.json`` and (optionally) its per-case rows."""

    path: Path
    record: dict[str, Any]
    rows: list[dict[str, str]] | None

    @property
    def key(self) -> tuple[str, float, int]:
        return str(self.record["init"]), float(self.record["fraction"]), int(self.record["seed"])

    def value(self, metric: str) -> float:
        value = self.record.get("metrics", {}).get(metric)
        return math.nan if value is None else float(value)


def load_run(path: str | Path) -> RunResult:
    """Read a run's ``metrics.json`` and, if present, the ``per_case.csv`` beside it."""
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise BadInputError(path, f"cannot read metrics: {err}") from err
    for key in ("task", "type", "init", "fraction", "seed", "primary_metric", "metrics"):
        if record.get(key) is None:
            raise BadInputError(path, f"key {key!r} is missing")
    per_case = path.parent / "per_case.csv"
    rows = read_per_case(per_case) if per_case.exists() else None
    return RunResult(path, record, rows)


def _targets_onehot(rows: Sequence[Mapping[str, Any]], info: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(probs (N, C), 0/1 targets (N, C)) of classification rows, single-label targets one-hot."""
    probs, targets = _classification_arrays(rows, info)
    if targets.ndim == 1:
        onehot = np.zeros_like(probs)
        onehot[np.arange(len(targets)), targets] = 1.0
        targets = onehot
    return probs, targets


def case_strata(
    task_type: str, rows: Sequence[Mapping[str, Any]], info: Mapping[str, Any], case_ids: Sequence[str]
) -> np.ndarray | None:
    """Stratum of every case for the bootstrap draws (``None``: unstratified).

    Classification: the case's label signature (per class: has a positive, has a negative), so
    every replicate keeps both labels of every class that has both. Detection: whether the scan
    has lesions. Segmentation: unstratified.
    """
    position = {c: i for i, c in enumerate(case_ids)}
    if task_type == "classification":
        _, targets = _targets_onehot(rows, info)
        positive = np.zeros((len(case_ids), targets.shape[1]), dtype=bool)
        negative = np.zeros_like(positive)
        for row, target in zip(rows, targets >= 0.5):
            i = position[str(row["case_id"])]
            positive[i] |= target
            negative[i] |= ~target
        signature = np.concatenate([positive, negative], axis=1)
        return np.unique(signature, axis=0, return_inverse=True)[1].reshape(-1)
    if task_type == "detection":
        lesions = {str(r["case_id"]): float(r.get("n_lesions") or 0) > 0 for r in rows}
        return np.array([int(lesions[c]) for c in case_ids])
    return None


def _auc_macro_resampler(rows: Sequence[Mapping[str, Any]], info: Mapping[str, Any]) -> CaseResampler:
    """Macro AUC on resampled cases; undefined when a class defined on all cases loses a label."""
    case_ids = list(dict.fromkeys(str(r["case_id"]) for r in rows))
    position = {c: i for i, c in enumerate(case_ids)}
    row_case = np.array([position[str(r["case_id"])] for r in rows], dtype=np.int64)
    members = [np.flatnonzero(row_case == i) for i in range(len(case_ids))]
    probs, targets = _targets_onehot(rows, info)
    defined = np.isfinite(np.asarray(roc_auc_per_class(probs, targets), dtype=np.float64))
    cache: dict[tuple[int, ...], float] = {}

    def metric_of(idx: np.ndarray) -> float:
        key = tuple(sorted(int(i) for i in idx))  # a draw is a multiset: compute each once
        if key not in cache:
            take = np.concatenate([members[i] for i in key])
            aucs = np.asarray(roc_auc_per_class(probs[take], targets[take]), dtype=np.float64)[defined]
            cache[key] = float(aucs.mean()) if aucs.size and np.isfinite(aucs).all() else math.nan
        return cache[key]

    return loop_resampler(case_ids, metric_of)


def run_resampler(run: RunResult, metric: str) -> CaseResampler | None:
    """The run's :class:`CaseResampler` for ``metric`` (stratified), or None without records."""
    if not run.rows:
        return None
    task_type = str(run.record["type"])
    if task_type == "classification" and metric == "auc_macro":
        resampler = _auc_macro_resampler(run.rows, run.record)
    else:
        resampler = case_resampler(task_type, run.rows, run.record, metric)
    return replace(resampler, strata=case_strata(task_type, run.rows, run.record, resampler.case_ids))


def metric_range(metric: str) -> tuple[float, float]:
    """The values a metric can take: HD95 (mm) is non-negative, Dice/AUC/FROC/accuracy lie in [0, 1]."""
    return (0.0, math.inf) if metric.startswith("hd95") else (0.0, 1.0)


def clip_to_range(value: float, metric: str) -> float:
    """An interval end clipped to the metric's range (NaN stays NaN).

    Clipping only removes values the mean cannot take, so the interval's coverage is unchanged.
    """
    if math.isnan(value):
        return value
    low, high = metric_range(metric)
    return min(max(value, low), high)


def _fraction_text(value: float) -> str:
    return f"{value:g}"


def study_table(runs: Sequence[RunResult], settings: StudySettings) -> list[dict[str, Any]]:
    """The study rows of one task (see the module docstring for the columns).

    Args:
        runs: every evaluated run of the task.
        settings: statistics settings.

    Returns:
        Rows ordered by metric (primary first), init (reference first) and fraction.

    Raises:
        MedclustError: runs of several tasks, or two runs with the same (init, fraction, seed).
    """
    if not runs:
        raise MedclustError("study: no runs given")
    tasks = {r.record["task"] for r in runs}
    if len(tasks) != 1:
        raise MedclustError(f"study: runs of several tasks given: {sorted(map(str, tasks))}")
    seen: dict[tuple[str, float, int], Path] = {}
    for r in runs:
        if r.key in seen:
            raise BadInputError(r.path, f"same init/fraction/seed {r.key} as {seen[r.key]}")
        seen[r.key] = r.path
    first = runs[0].record
    task, task_type = first["task"], first["type"]
    primary = first["primary_metric"]
    metrics = list(dict.fromkeys([primary, *first.get("study_metrics", [])]))
    ref = settings.reference_init
    inits = sorted({r.key[0] for r in runs}, key=lambda i: (i != ref, i))
    fractions = sorted({r.key[1] for r in runs})

    cached: dict[tuple[str, str, float], list[Unit]] = {}

    def units(metric: str, init: str, fraction: float) -> list[Unit]:
        # built once per cell: the reference arm's resamplers (and their caches) serve every comparison
        if (metric, init, fraction) not in cached:
            cached[metric, init, fraction] = [
                Unit(r.key[2], r.value(metric), run_resampler(r, metric))
                for r in sorted(runs, key=lambda r: r.key)
                if r.key[0] == init and r.key[1] == fraction
            ]
        return cached[metric, init, fraction]

    table: list[dict[str, Any]] = []
    for metric in metrics:
        for init in inits:
            for fraction in fractions:
                cell_runs = [r for r in runs if r.key[0] == init and r.key[1] == fraction]
                if not cell_runs:
                    continue
                arm = units(metric, init, fraction)
                name = (task, metric, init, _fraction_text(fraction))
                cell = summarise_cell(
                    arm,
                    settings.bootstrap_samples,
                    settings.ci_level,
                    cell_rng(settings.seed, *name),
                    resample_cases=settings.resample_cases,
                )
                higher_is_better = HIGHER_IS_BETTER.get(metric, True)
                row: dict[str, Any] = {
                    "task": task,
                    "type": task_type,
                    "metric": metric,
                    "primary": metric == primary,
                    "higher_is_better": higher_is_better,
                    "init": init,
                    "fraction": fraction,
                    "n_seeds": cell.n,
                    "seeds": ";".join(str(u.seed) for u in arm if math.isfinite(u.value)),  # those in n_seeds
                    "n_cases": cell.n_cases,
                    "mean": cell.mean,
                    "std": cell.std,
                    # a t-interval is symmetric; the mean of a bounded metric cannot leave its range
                    "ci_low": clip_to_range(cell.ci_low, metric),
                    "ci_high": clip_to_range(cell.ci_high, metric),
                    "ci_method": cell.ci_method,
                    "ci_undefined": cell.n_undefined,
                    "ref_init": ref,
                    "n_pairs": 0,
                    "diff_vs_ref": math.nan,
                    "diff_ci_low": math.nan,
                    "diff_ci_high": math.nan,
                    "diff_ci_method": "",
                    "diff_ci_undefined": 0,
                    "verdict": "",
                    "simulated": any(bool(r.record.get("simulated")) for r in cell_runs),
                    "trained_on": ";".join(sorted({str(r.record.get("trained_on") or "") for r in cell_runs})),
                    "ci_level": settings.ci_level,
                    "bootstrap": settings.bootstrap_samples,
                }
                if init != ref and any(r.key[0] == ref for r in runs):
                    span = metric_range(metric)[1] - metric_range(metric)[0]
                    paired = paired_difference(
                        arm,
                        units(metric, ref, fraction),
                        settings.bootstrap_samples,
                        settings.ci_level,
                        cell_rng(settings.seed, *name, "vs", ref),
                        resample_cases=settings.resample_cases,
                    )
                    row.update(
                        n_pairs=paired.n_pairs,
                        diff_vs_ref=paired.diff,
                        # the difference of two means within [a, b] lies within [a - b, b - a]
                        diff_ci_low=max(paired.ci_low, -span) if not math.isnan(paired.ci_low) else paired.ci_low,
                        diff_ci_high=min(paired.ci_high, span) if not math.isnan(paired.ci_high) else paired.ci_high,
                        diff_ci_method=paired.ci_method,
                        diff_ci_undefined=paired.n_undefined,
                        verdict=verdict(paired.ci_low, paired.ci_high, paired.n_pairs, higher_is_better),
                    )
                table.append(row)
    return table


def _cell_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def write_study_table(rows: Sequence[Mapping[str, Any]], path: str | Path) -> None:
    """Write the study rows as CSV, atomically (NaN as an empty field, booleans as true/false)."""
    write_csv_atomic(path, rows, STUDY_COLUMNS, cell=_cell_text)


_NUMERIC = {"fraction", "mean", "std", "ci_low", "ci_high", "diff_vs_ref", "diff_ci_low", "diff_ci_high", "ci_level"}
_INTEGER = {"n_seeds", "n_cases", "n_pairs", "bootstrap", "ci_undefined", "diff_ci_undefined"}
_BOOLEAN = {"primary", "higher_is_better", "simulated"}


def read_study_table(path: str | Path) -> list[dict[str, Any]]:
    """Read a study CSV back into typed rows (floats, ints, booleans; empty -> NaN)."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            raw = list(csv.DictReader(handle))
    except OSError as err:
        raise BadInputError(path, f"cannot read study table: {err}") from err
    rows = []
    for r in raw:
        row: dict[str, Any] = dict(r)
        for key in _NUMERIC & r.keys():
            row[key] = float(r[key]) if r[key] not in ("", None) else math.nan
        for key in _INTEGER & r.keys():
            row[key] = int(r[key]) if r[key] not in ("", None) else 0
        for key in _BOOLEAN & r.keys():
            row[key] = str(r[key]).lower() == "true"
        rows.append(row)
    return rows


def run_study(
    task: str, metrics_files: Sequence[str | Path], out: str | Path, settings: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Build and write ``out`` (the study table of ``task``) from the runs' ``metrics.json`` files.

    Args:
        task: the task name; every run must belong to it.
        metrics_files: ``metrics.json`` paths.
        out: the CSV to write.
        settings: the config ``study`` section.

    Returns:
        The table rows.
    """
    runs = [load_run(p) for p in metrics_files]
    wrong = [str(r.path) for r in runs if r.record["task"] != task]
    if wrong:
        raise MedclustError(f"study --task {task}: runs of another task given: {wrong[:3]}")
    opts = StudySettings.from_dict(settings)
    log.info("study %s: %d runs, %d bootstrap replicates", task, len(runs), opts.bootstrap_samples)
    rows = study_table(runs, opts)
    write_study_table(rows, out)
    return rows
