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
n_cases                   test cases per run (the case-level resampling units; 0 = none)
mean, std                 mean and sample std (ddof=1) over seeds of the run values
ci_low, ci_high           hierarchical bootstrap CI of the mean (seeds, then cases within seeds)
ref_init, n_pairs         reference arm (``none``) and number of seed pairs
diff_vs_ref               mean paired difference ``init - none`` (same fraction and seed)
diff_ci_low, diff_ci_high paired bootstrap CI of that difference (pairs, then shared cases)
simulated, trained_on     whether simulated data were involved (any run of the cell), and how
ci_level, bootstrap       the CI level and the number of bootstrap replicates
========================  ======================================================================

The statistics are described in :mod:`medclust.evaluate.statistics`.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medclust.errors import BadInputError, MedclustError
from medclust.evaluate.evaluate_run import HIGHER_IS_BETTER, case_resampler, read_per_case
from medclust.evaluate.statistics import Unit, cell_rng, paired_difference, summarise_cell
from medclust.io.atomic import write_csv_atomic

log = logging.getLogger(__name__)

STUDY_COLUMNS = [
    "task", "type", "metric", "primary", "higher_is_better", "init", "fraction", "n_seeds", "seeds",
    "n_cases", "mean", "std", "ci_low", "ci_high", "ref_init", "n_pairs", "diff_vs_ref", "diff_ci_low",
    "diff_ci_high", "simulated", "trained_on", "ci_level", "bootstrap",
]  # fmt: skip


@dataclass
class StudySettings:
    """Config ``study`` section (statistics part).

    Args:
        bootstrap_samples: bootstrap replicates per CI.
        ci_level: confidence level of every interval.
        seed: seed of the bootstrap draws.
        resample_cases: also resample test cases within runs (hierarchical bootstrap).
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

    def units(metric: str, init: str, fraction: float) -> list[Unit]:
        out = []
        for r in sorted(runs, key=lambda r: r.key):
            if r.key[0] != init or r.key[1] != fraction:
                continue
            cases = None
            if settings.resample_cases and r.rows:
                cases = case_resampler(r.record["type"], r.rows, r.record, metric)
            out.append(Unit(r.key[2], r.value(metric), cases))
        return out

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
                    arm, settings.bootstrap_samples, settings.ci_level, cell_rng(settings.seed, *name)
                )
                row: dict[str, Any] = {
                    "task": task,
                    "type": task_type,
                    "metric": metric,
                    "primary": metric == primary,
                    "higher_is_better": HIGHER_IS_BETTER.get(metric, True),
                    "init": init,
                    "fraction": fraction,
                    "n_seeds": cell.n,
                    "seeds": ";".join(str(u.seed) for u in arm),
                    "n_cases": cell.n_cases,
                    "mean": cell.mean,
                    "std": cell.std,
                    "ci_low": cell.ci_low,
                    "ci_high": cell.ci_high,
                    "ref_init": ref,
                    "n_pairs": 0,
                    "diff_vs_ref": math.nan,
                    "diff_ci_low": math.nan,
                    "diff_ci_high": math.nan,
                    "simulated": any(bool(r.record.get("simulated")) for r in cell_runs),
                    "trained_on": ";".join(sorted({str(r.record.get("trained_on") or "") for r in cell_runs})),
                    "ci_level": settings.ci_level,
                    "bootstrap": settings.bootstrap_samples,
                }
                if init != ref and any(r.key[0] == ref for r in runs):
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
                        diff_ci_low=paired.ci_low,
                        diff_ci_high=paired.ci_high,
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
_INTEGER = {"n_seeds", "n_cases", "n_pairs", "bootstrap"}
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
