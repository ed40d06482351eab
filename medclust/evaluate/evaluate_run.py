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
study table can never disagree.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medclust.errors import BadInputError, MedclustError
from medclust.evaluate.metrics import (
    FROC_FP_RATES,
    Detection,
    Nodule,
    froc,
    macro_mean,
    assign_detections,
    match_detections,
    roc_auc_per_class,
    segmentation_scores,
    split_by_size,
)
from medclust.evaluate.statistics import CaseResampler, loop_resampler, mean_of_columns_resampler
from medclust.io.atomic import write_csv_atomic, write_json_atomic
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


@dataclass
class EvaluationSettings:
    """Evaluation options: the run's fine-tuning settings, or ``medclust evaluate --settings``.

    Args:
        min_hit_radius_mm: floor of the detection hit radius (used when run.json has none).
        min_diameter_mm: lesions below this diameter are not FROC targets (used when run.json
            has none; LUNA16's 3 mm).
        fp_rates: FP per scan at which FROC sensitivity is reported.
    """

    min_hit_radius_mm: float = 5.0
    min_diameter_mm: float = 3.0
    fp_rates: tuple[float, ...] = FROC_FP_RATES

    @classmethod
    def from_dict(cls, settings: Mapping[str, Any] | None) -> EvaluationSettings:
        settings = dict(settings or {})
        return cls(
            min_hit_radius_mm=float(settings.get("min_hit_radius_mm", cls.min_hit_radius_mm)),
            min_diameter_mm=float(settings.get("min_diameter_mm", cls.min_diameter_mm)),
            fp_rates=tuple(float(r) for r in settings.get("fp_rates", FROC_FP_RATES)),
        )


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


def _nanmean(values: Sequence[float]) -> float:
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else math.nan


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


# --- run folder -> per-case records -----------------------------------------------------------


def _resolve(run_dir: Path, path: str | None) -> Path | None:
    """Run-relative paths (predictions, roi) first, then paths relative to the working dir."""
    if path is None:
        return None
    candidate = Path(path)
    if candidate.is_absolute():
        return candidate
    inside = run_dir / candidate
    return inside if inside.exists() else candidate


def _load_label_map(path: Path, what: str) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """A label map, its RAS affine and its voxel spacing, read as ingest reads it.

    Ground truth goes through :func:`medclust.io.readers.load_image`, the reader ingest and
    preprocessing use, so every label format they accept (NIfTI, NRRD, MHA/MHD, a DICOM series
    folder) is scored on the same array order and affine it was trained from; predictions and
    ROIs (NIfTI written on that grid) go through it too.
    """
    from medclust.io.readers import load_image

    try:
        image = load_image(path)
    except BadInputError as err:
        raise BadInputError(path, f"cannot read {what}: {err.reason}") from err
    data = np.asarray(image.array)
    if data.ndim not in (2, 3):
        raise BadInputError(path, f"{what} must be 2D or 3D, got shape {data.shape}")
    if not np.issubdtype(data.dtype, np.integer) and (
        not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data))
    ):
        raise BadInputError(path, f"{what} must hold integer labels")
    return data.astype(np.int32), np.asarray(image.affine, dtype=np.float64), tuple(image.spacing)


def _apply_label_map(raw: np.ndarray, label_map: Mapping[str, int] | None) -> np.ndarray:
    if label_map is None:
        return raw
    mapping = {int(k): int(v) for k, v in label_map.items()}
    low, high = int(raw.min()), int(raw.max())
    lut = np.zeros(high - low + 1, dtype=raw.dtype)
    for src, dst in mapping.items():
        if low <= src <= high:
            lut[src - low] = dst
    return lut[raw - low]


def _segmentation_rows(run_dir: Path, run: Mapping[str, Any], keys: Mapping[str, str]) -> list[dict[str, Any]]:
    rows = []
    classes = [int(v) for v in keys]
    for n, case in enumerate(run.get("test_cases", []), 1):
        case_id = str(case["case_id"])
        pred_path = _resolve(run_dir, case.get("prediction") or f"predictions/{case_id}.nii.gz")
        gt_path = _resolve(run_dir, case.get("label"))
        if gt_path is None:
            raise BadInputError(run_dir / "run.json", f"test case {case_id} has no ground-truth label")
        if not pred_path.exists():
            raise BadInputError(pred_path, f"prediction of test case {case_id} is missing")
        pred, pred_affine, _ = _load_label_map(pred_path, "prediction")
        gt_raw, gt_affine, spacing = _load_label_map(gt_path, "ground-truth label")
        if pred.shape != gt_raw.shape or not np.allclose(pred_affine, gt_affine, atol=1e-3):
            raise BadInputError(
                pred_path,
                f"prediction grid {pred.shape} does not match the original label grid {gt_raw.shape} of {gt_path}"
                " (shape or affine differ)",
            )
        gt = _apply_label_map(gt_raw, case.get("label_map"))
        roi = None
        roi_path = _resolve(run_dir, case.get("roi"))
        if roi_path is not None:
            roi_data, _, _ = _load_label_map(roi_path, "evaluation ROI")
            if roi_data.shape != gt.shape:
                raise BadInputError(roi_path, f"ROI shape {roi_data.shape} differs from the label grid {gt.shape}")
            roi = roi_data > 0
        scores = segmentation_scores(pred, gt, classes, spacing, roi=roi)
        row: dict[str, Any] = {"case_id": case_id}
        for value, key in keys.items():
            row[f"dice_{key}"] = scores[int(value)]["dice"]
        for value, key in keys.items():
            row[f"hd95_{key}"] = scores[int(value)]["hd95"]
        row["dice_mean"] = _nanmean([s["dice"] for s in scores.values()])
        row["hd95_mean"] = _nanmean([s["hd95"] for s in scores.values()])
        row["roi_voxels"] = int(roi.sum()) if roi is not None else int(gt.size)
        log.info("evaluated %d/%d %s: dice_mean %.4f", n, len(run["test_cases"]), case_id, row["dice_mean"])
        rows.append(row)
    return rows


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        raise BadInputError(path, "predictions file is missing")
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _classification_rows(run_dir: Path, run: Mapping[str, Any], keys: Mapping[str, str]) -> list[dict[str, Any]]:
    path = run_dir / run.get("predictions", "predictions.csv")
    rows = _read_csv(path)
    n = len(keys)
    needed = [f"prob_{i}" for i in range(n)]
    needed += [f"target_{i}" for i in range(n)] if run.get("multilabel") else ["target"]
    for column in ["case_id", *needed]:
        if rows and column not in rows[0]:
            raise BadInputError(path, f"column {column!r} is missing (run.json lists {n} classes)")
    keep = ["case_id", "slice_index", *needed]
    return [{c: r.get(c, "") for c in keep} for r in rows]


def _detection_rows(
    run_dir: Path, run: Mapping[str, Any], settings: EvaluationSettings
) -> tuple[list[dict[str, Any]], tuple[float, ...], float]:
    block = run.get("detection", {}) or {}
    radius = float(block.get("min_hit_radius_mm", settings.min_hit_radius_mm))
    min_diameter = float(block.get("min_diameter_mm", settings.min_diameter_mm))
    fp_rates = tuple(float(r) for r in block.get("fp_rates", settings.fp_rates))
    path = run_dir / run.get("predictions", "detections.csv")
    detections: dict[str, list[Detection]] = {}
    for r in _read_csv(path):
        try:
            det = Detection(str(r["case_id"]), (float(r["x_mm"]), float(r["y_mm"]), float(r["z_mm"])), float(r["score"]))
        except (KeyError, ValueError) as err:
            raise BadInputError(path, f"bad detection row {r}: {err}") from err
        detections.setdefault(det.case_id, []).append(det)
    rows = []
    for case in run.get("test_cases", []):
        case_id = str(case["case_id"])
        lesions = [
            Nodule(
                case_id,
                (float(l["x_mm"]), float(l["y_mm"]), float(l["z_mm"])),
                float(l.get("diameter_mm") or 0.0),
                str(l.get("small", "")).strip().lower() in ("true", "1", "yes"),
            )
            for l in case.get("lesions", [])
        ]
        targets, irrelevant = split_by_size(lesions, min_diameter)
        dets = detections.get(case_id, [])
        fp, tp = match_detections(dets, targets, radius, irrelevant=irrelevant)
        rows.append(
            {
                "case_id": case_id,
                "n_lesions": len(targets),
                "n_small_lesions": len(irrelevant),
                "n_detections": len(dets),
                "n_ignored_detections": int(
                    ((assign_detections(dets, targets, radius) < 0) & (assign_detections(dets, irrelevant, radius) >= 0)).sum()
                ),
                "n_hits": int((tp > 0).sum()),
                "fp_scores": ";".join(f"{s:.6g}" for s in fp),
                "tp_scores": ";".join(f"{s:.6g}" for s in tp),
            }
        )
    unknown = set(detections) - {str(c["case_id"]) for c in run.get("test_cases", [])}
    if unknown:
        raise BadInputError(path, f"detections for cases not in run.json test_cases: {sorted(unknown)[:5]}")
    return rows, fp_rates, min_diameter


def _format(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.10g}"
    return value


def write_per_case(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> None:
    """Write per-case rows as CSV atomically (NaN as an empty field)."""
    columns = list(columns or (rows[0].keys() if rows else ["case_id"]))
    write_csv_atomic(path, rows, columns, cell=_format)


def read_per_case(path: Path) -> list[dict[str, str]]:
    """The rows of a ``per_case.csv``."""
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


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
        run = json.loads(run_json.read_text(encoding="utf-8"))
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
