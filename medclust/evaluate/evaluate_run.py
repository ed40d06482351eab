"""``medclust evaluate --run DIR``: score one fine-tuning run folder.

Reads ``run.json`` and the run's predictions (format: /tmp/medclust_downstream.md, v1; design §5)
and writes beside them, atomically:

- ``per_case.csv``: the per-case records every summary metric is computed from
  (segmentation: one row per test case with ``dice_<class>`` / ``hd95_<class>``; classification:
  one row per predicted item with its targets and probabilities; detection: one row per scan with
  its FP scores and per-lesion TP scores);
- ``metrics.json``: the run's identity (task, init, fraction, seed, ...), whether simulated data
  were involved, the summary ``metrics``, the ``primary_metric`` name the study uses and the
  ``study_metrics`` it tabulates.

The summary is always recomputed from the per-case records by :func:`summarise`, the same
function the study's bootstrap uses (through :func:`case_resampler`), so ``metrics.json`` and the
study table can never disagree. The records themselves are read from the run folder by
:mod:`medclust.evaluate.run_records`.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medclust.errors import BadInputError, MedclustError
from medclust.evaluate.metrics import FROC_FP_RATES, froc, macro_mean, roc_auc_per_class
from medclust.evaluate.run_records import (  # noqa: F401  (re-exported: report and tests import them here)
    EvaluationSettings,
    _apply_label_map,
    _classification_rows,
    _detection_rows,
    _nanmean,
    _resolve,
    _segmentation_rows,
    read_per_case,
    write_per_case,
)
from medclust.evaluate.statistics import CaseResampler, loop_resampler, mean_of_columns_resampler
from medclust.io.atomic import staged_path, write_json_atomic
from medclust.provenance import write_provenance

log = logging.getLogger(__name__)

PRIMARY_METRIC = {"segmentation": "dice_mean", "classification": "auc_macro", "detection": "froc_avg"}
"""The metric the study reports for each task type (higher is better for all three)."""

STUDY_METRICS = {
    "segmentation": ["dice_mean", "hd95_mean"],
    "classification": ["auc_macro", "accuracy"],
    "detection": ["froc_avg"],
}
"""Metrics tabulated in the study (the primary one first)."""

HIGHER_IS_BETTER = {"hd95_mean": False}


def class_key(name: str, value: object) -> str:
    """A metric-key-safe class name: lower case ``[a-z0-9_]``, falling back to the value."""
    key = re.sub(r"[^a-z0-9]+", "_", str(name).lower()).strip("_")
    return key or str(value)


def _class_keys(classes: Mapping[str, str]) -> dict[str, str]:
    """``{class value/index (str): unique key}`` in numeric order of the values."""
    keys: dict[str, str] = {}
    used: set[str] = set()
    for value in sorted(classes, key=lambda v: int(v)):
        key = class_key(classes[value], value)
        if key in used:
            key = f"{key}_{value}"
        used.add(key)
        keys[value] = key
    return keys


def is_simulated(run: Mapping[str, Any]) -> bool:
    """Whether the run was trained or tested on simulated data (report must say so)."""
    if "simulated" in run:
        return bool(run["simulated"])
    return "simulated" in str(run.get("trained_on", "")).lower() or any(
        bool(case.get("simulated", False)) for case in run.get("test_cases", [])
    )


# --- per-case records -> summary metrics ------------------------------------------------------


def _float(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def _scores(text: object) -> np.ndarray:
    """``"0.9;0.5"`` -> array; empty -> empty array."""
    text = str(text or "").strip()
    return np.array([float(s) for s in text.split(";") if s], dtype=np.float64)


def summarise(task_type: str, rows: Sequence[Mapping[str, Any]], info: Mapping[str, Any]) -> dict[str, float]:
    """Summary metrics of a run from its per-case records.

    Args:
        task_type: segmentation | classification | detection.
        rows: the ``per_case.csv`` rows (dicts; values may be strings).
        info: the ``metrics.json`` fields ``class_keys`` (and ``multilabel``, ``fp_rates``).

    Returns:
        ``{metric name: value}`` (see the module and :mod:`medclust.evaluate.metrics` docstrings).
    """
    keys = list(info["class_keys"].values())
    if task_type == "segmentation":
        out: dict[str, float] = {}
        for kind in ("dice", "hd95"):
            per_class = {k: _nanmean([_float(r.get(f"{kind}_{k}")) for r in rows]) for k in keys}
            out[f"{kind}_mean"] = macro_mean(list(per_class.values()))
            out.update({f"{kind}_{k}": v for k, v in per_class.items()})
        return {"dice_mean": out.pop("dice_mean"), "hd95_mean": out.pop("hd95_mean"), **out}
    if task_type == "classification":
        probs, targets = _classification_arrays(rows, info)
        return _classification_metrics(probs, targets, keys, bool(info.get("multilabel")))
    if task_type == "detection":
        fp_rates = tuple(info.get("fp_rates", FROC_FP_RATES))
        scans = _detection_arrays(rows)
        out = froc(*_pool(scans), len(scans), fp_rates)
        out["n_lesions"] = float(sum(int(_float(r["n_lesions"])) for r in rows))
        out["n_detections"] = float(sum(int(_float(r["n_detections"])) for r in rows))
        if rows and "n_small_lesions" in rows[0]:
            out["n_small_lesions"] = float(sum(int(_float(r["n_small_lesions"])) for r in rows))
        return out
    raise MedclustError(f"unknown task type {task_type!r} (expected segmentation, classification or detection)")


def _classification_arrays(rows: Sequence[Mapping[str, Any]], info: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(probs (N, C), targets (N, C) 0/1 or (N,) class indices) of classification rows."""
    n = len(info["class_keys"])
    probs = np.array([[_float(r[f"prob_{i}"]) for i in range(n)] for r in rows]).reshape(len(rows), n)
    if info.get("multilabel"):
        targets = np.array([[_float(r[f"target_{i}"]) for i in range(n)] for r in rows]).reshape(len(rows), n)
    else:
        targets = np.array([int(_float(r["target"])) for r in rows], dtype=np.int64)
    return probs, targets


def _classification_metrics(probs: np.ndarray, targets: np.ndarray, keys: Sequence[str], multilabel: bool) -> dict[str, float]:
    if len(probs) == 0:
        return {"auc_macro": math.nan, "accuracy": math.nan, **{f"auc_{k}": math.nan for k in keys}}
    if multilabel:
        accuracy = float(((probs >= 0.5) == (targets >= 0.5)).mean())
    else:
        accuracy = float((probs.argmax(axis=1) == targets).mean())
    aucs = roc_auc_per_class(probs, targets)
    return {"auc_macro": macro_mean(aucs), "accuracy": accuracy, **{f"auc_{k}": a for k, a in zip(keys, aucs)}}


def _detection_arrays(rows: Sequence[Mapping[str, Any]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per scan (row): (FP scores, per-lesion TP scores)."""
    return [(_scores(r["fp_scores"]), _scores(r["tp_scores"])) for r in rows]


def _pool(scans: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    fps = [fp for fp, _ in scans]
    tps = [tp for _, tp in scans]
    return (np.concatenate(fps) if fps else np.zeros(0)), (np.concatenate(tps) if tps else np.zeros(0))


def case_resampler(
    task_type: str, rows: Sequence[Mapping[str, Any]], info: Mapping[str, Any], metric: str
) -> CaseResampler:
    """A :class:`CaseResampler` recomputing ``metric`` of a run on resampled test cases.

    Segmentation class-mean metrics are vectorised (``nanmean`` over classes of ``nanmean`` over
    cases, identical to :func:`summarise`); AUC and FROC are recomputed from the drawn cases'
    rows with the same functions :func:`summarise` uses (a case's rows travel together: it is the
    resampling unit).
    """
    case_ids = list(dict.fromkeys(str(r["case_id"]) for r in rows))
    keys = list(info["class_keys"].values())
    if task_type == "segmentation" and (metric.endswith("_mean") or metric.split("_", 1)[1] in keys):
        kind, which = metric.split("_", 1)
        columns = keys if which == "mean" else [which]
        by_case = {str(r["case_id"]): r for r in rows}
        matrix = np.array([[_float(by_case[c].get(f"{kind}_{k}")) for k in columns] for c in case_ids])
        return mean_of_columns_resampler(case_ids, matrix.reshape(len(case_ids), len(columns)))
    position = {c: i for i, c in enumerate(case_ids)}
    row_case = np.array([position[str(r["case_id"])] for r in rows], dtype=np.int64)
    if task_type == "classification":
        probs, targets = _classification_arrays(rows, info)
        members = [np.flatnonzero(row_case == i) for i in range(len(case_ids))]
        multilabel = bool(info.get("multilabel"))

        def compute(idx: np.ndarray) -> float:
            take = np.concatenate([members[int(i)] for i in idx]) if len(idx) else np.zeros(0, np.int64)
            return _classification_metrics(probs[take], targets[take], keys, multilabel).get(metric, math.nan)

    elif task_type == "detection":
        scans = _detection_arrays(rows)  # one row per scan
        fp_rates = tuple(info.get("fp_rates", FROC_FP_RATES))

        def compute(idx: np.ndarray) -> float:
            drawn = [scans[int(i)] for i in idx]
            return froc(*_pool(drawn), len(drawn), fp_rates).get(metric, math.nan)

    else:
        raise MedclustError(f"no case-level recomputation of {task_type} metric {metric!r}")
    # A resample is a multiset of cases: identical multisets give identical metrics, and with
    # few test cases most draws repeat one, so each distinct multiset is computed once.
    cache: dict[tuple[int, ...], float] = {}

    def metric_of(idx: np.ndarray) -> float:
        key = tuple(sorted(int(i) for i in idx))
        if key not in cache:
            cache[key] = compute(np.asarray(key, dtype=np.int64))
        return cache[key]

    return loop_resampler(case_ids, metric_of)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def evaluate_run(run_dir: str | Path, settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Score a run folder; write ``metrics.json`` and ``per_case.csv`` into it.

    Args:
        run_dir: ``results/finetune/{task}/{init}/{fraction}/{seed}``.
        settings: evaluation options, see :class:`EvaluationSettings` (the values recorded in
            run.json win).

    Returns:
        The ``metrics.json`` content.

    Raises:
        BadInputError: a missing/unreadable run.json, prediction or ground truth, or mismatched grids.
    """
    run_dir = Path(run_dir)
    opts = EvaluationSettings.from_dict(settings)
    run_json = run_dir / "run.json"
    try:
        # staged_path: inside the fine-tuning run's publish_together block run.json is still pending
        run = json.loads(staged_path(run_json).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise BadInputError(run_json, f"cannot read run description: {err}") from err
    task_type = run.get("type")
    if task_type not in PRIMARY_METRIC:
        raise BadInputError(run_json, f"'type' must be segmentation, classification or detection, got {task_type!r}")
    classes = {str(k): str(v) for k, v in (run.get("classes") or {}).items()}
    keys = _class_keys(classes)
    info: dict[str, Any] = {"class_keys": keys, "multilabel": bool(run.get("multilabel", False))}
    if task_type == "segmentation":
        if not keys:
            raise BadInputError(run_json, "segmentation run lists no 'classes'")
        rows = _segmentation_rows(run_dir, run, keys)
    elif task_type == "classification":
        rows = _classification_rows(run_dir, run, keys)
    else:
        rows, fp_rates, min_diameter = _detection_rows(run_dir, run, opts)
        info["fp_rates"] = list(fp_rates)
        info["min_diameter_mm"] = min_diameter
    metrics = summarise(task_type, rows, info)
    record = {
        "format_version": 1,
        "task": run.get("task"),
        "type": task_type,
        "dataset": run.get("dataset"),
        "train_dataset": run.get("train_dataset", run.get("dataset")),
        "init": run.get("init"),
        "fraction": run.get("fraction"),
        "seed": run.get("seed"),
        "mode": run.get("mode"),
        "trained_on": run.get("trained_on"),
        # how model selection was done: validation labels of the run's fraction only, counted
        "validation": run.get("validation"),
        "simulated": is_simulated(run),
        "primary_metric": PRIMARY_METRIC[task_type],
        "study_metrics": STUDY_METRICS[task_type],
        "classes": classes,
        "class_keys": keys,
        "multilabel": info["multilabel"],
        **({"fp_rates": info["fp_rates"]} if "fp_rates" in info else {}),
        **({"min_diameter_mm": info["min_diameter_mm"]} if "min_diameter_mm" in info else {}),
        "n_cases": len({str(r["case_id"]) for r in rows}),
        "n_rows": len(rows),
        "metrics": {k: _json_safe(v) for k, v in metrics.items()},
    }
    write_per_case(run_dir / "per_case.csv", rows)
    inputs = [run_json, *(_resolve(run_dir, c.get("label")) for c in run.get("test_cases", []) if c.get("label"))]
    write_provenance(run_dir, {"evaluate": dict(settings or {})}, [p for p in inputs if p], name="evaluate_provenance.json")
    write_json_atomic(run_dir / "metrics.json", record)
    log.info("%s: %s = %s", run_dir, record["primary_metric"], record["metrics"][record["primary_metric"]])
    return record
