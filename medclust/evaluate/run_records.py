"""Run folder -> per-case records: what ``medclust evaluate`` scores, read from a run's files.

For each task type, the run's predictions and ground truth become the rows of ``per_case.csv``
(segmentation: Dice/HD95 per class and test case against the original label file; classification:
the predicted items with targets and probabilities; detection: per scan, FP scores and per-lesion
TP scores, lesions below ``min_diameter_mm`` left out as irrelevant findings). Ground truth, the
predictions and the evaluation ROIs are read with :func:`medclust.io.readers.load_image`, the
reader of ingest and preprocessing. :mod:`medclust.evaluate.evaluate_run` summarises the rows.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medclust.errors import BadInputError
from medclust.evaluate.metrics import (
    FROC_FP_RATES,
    Detection,
    Nodule,
    assign_detections,
    match_detections,
    segmentation_scores,
    split_by_size,
)
from medclust.io.atomic import write_csv_atomic

log = logging.getLogger("medclust.evaluate.evaluate_run")


def _nanmean(values: Sequence[float]) -> float:
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else math.nan


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



def _resolve(run_dir: Path, path: str | None) -> Path | None:
    """Run-relative paths (predictions, roi) first, then paths relative to the working dir."""
    if path is None:
        return None
    candidate = Path(path)
    if candidate.is_absolute():
        return candidate
    inside = run_dir / candidate
    return inside if inside.exists() else candidate


def _load_label_map(
    path: Path, what: str, image_path: Path | None = None
) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """A label map, its RAS affine and its voxel spacing, read as ingest reads it.

    Ground truth goes through :func:`medclust.io.readers.load_image`, the reader ingest and
    preprocessing use, so every label format they accept (NIfTI, NRRD, MHA/MHD, a DICOM series
    folder) is scored on the same array order and affine it was trained from; predictions and
    ROIs (NIfTI written on that grid) go through it too. A PNG/TIFF mask of a 2D image is placed
    on that image's grid (``image_path``), as ingest places it (:func:`~medclust.io.readers.place_label`).
    """
    from medclust.io.readers import load_image, place_label

    try:
        image = load_image(path, label=True)  # a palette PNG keeps its class indices
        if image.kind == "image" and image_path is not None and image_path.exists():
            image = place_label(image, load_image(image_path))
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
        gt_raw, gt_affine, spacing = _load_label_map(gt_path, "ground-truth label", _resolve(run_dir, case.get("image")))
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


__all__ = ["EvaluationSettings", "read_per_case", "write_per_case"]
