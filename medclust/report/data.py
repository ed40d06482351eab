"""Load what the report figures show from the workflow's files (plain dicts and arrays).

- pretraining loss curves: ``results/pretrain/{method}/metrics.csv``;
- embeddings: ``results/pretrain/{method}/embeddings.npz``;
- study curves and tables: ``results/study/{task}.csv``;
- segmentation examples: a run's ``run.json``, its prediction NIfTIs, the original image and label
  files (the same files ``medclust evaluate`` scores) and its ``per_case.csv``;
- detection examples: a run's ``run.json`` (ground-truth lesions), ``detections.csv``, the slice
  store of the test cases (``store_affine`` maps world mm to store voxels) and ``per_case.csv``.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from medclust.errors import BadInputError
from medclust.io.slice_store import read_attrs, read_case


def read_loss_curve(path: str | Path) -> dict[str, list[float]]:
    """The numeric columns of a training ``metrics.csv`` (empty fields -> NaN)."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as err:
        raise BadInputError(path, f"cannot read training log: {err}") from err
    columns: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            try:
                number = float(value) if value not in ("", None) else math.nan
            except ValueError:
                continue
            columns.setdefault(key, []).append(number)
    return columns


def read_embeddings(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of an ``embeddings.npz`` (strings stay strings; no pickle)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError) as err:
        raise BadInputError(path, f"cannot read embeddings: {err}") from err


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise BadInputError(path, f"cannot read: {err}") from err


def _per_case(run_dir: Path) -> dict[str, dict[str, str]]:
    path = run_dir / "per_case.csv"
    if not path.exists():
        return {}
    with open(path, newline="", encoding="utf-8") as handle:
        return {row["case_id"]: row for row in csv.DictReader(handle)}


def _resolve(run_dir: Path, path: str | None) -> Path | None:
    if not path:
        return None
    candidate = Path(path)
    if candidate.is_absolute():
        return candidate
    return run_dir / candidate if (run_dir / candidate).exists() else candidate


def _canonical(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A NIfTI reoriented to the closest RAS axes: (data (X, Y, Z), zooms)."""
    import nibabel as nib

    img = nib.as_closest_canonical(nib.load(str(path)))
    data = np.asanyarray(img.dataobj)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[..., None]
    return data, np.asarray(img.header.get_zooms()[:3], dtype=float)


def _normalise_for_display(image: np.ndarray) -> np.ndarray:
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return np.zeros_like(image, dtype=np.float32)
    # A constant fill outside the field of view (CT: -2048 / -1024) would set the lower percentile
    # and wash the anatomy out; leave it out of the display window.
    floor = finite.min()
    inside = finite[finite > floor]
    if (finite == floor).mean() > 0.05 and inside.size > 0.2 * finite.size:
        finite = inside
    low, high = np.percentile(finite, [1, 99])
    scale = high - low if high > low else 1.0
    return np.clip((image - low) / scale, 0, 1).astype(np.float32)


def _pick_slices(foreground_per_slice: np.ndarray, k: int) -> list[int]:
    """k slice indices spread over the slices that hold ground truth, largest area first in ties."""
    candidates = np.flatnonzero(foreground_per_slice > 0)
    if candidates.size == 0:
        return []
    if candidates.size <= k:
        return candidates.tolist()
    # Evenly spaced quantiles of the labelled range, then the largest-area slice near each.
    picks = []
    for q in np.linspace(0.2, 0.8, k):
        centre = candidates[int(round(q * (candidates.size - 1)))]
        window = candidates[np.abs(candidates - centre) <= max(1, candidates.size // (2 * k))]
        best = int(window[np.argmax(foreground_per_slice[window])])
        if best not in picks:
            picks.append(best)
    return sorted(picks)


def segmentation_example(run_dirs: Mapping[str, str | Path], n_slices: int = 3) -> dict[str, Any]:
    """Data for :func:`medclust.report.plots.plot_segmentation_overlays`.

    Args:
        run_dirs: ``{init: run folder}``, runs of one task at the same fraction and seed (same
            test cases, so the same slices are shown for every init).
        n_slices: axial slices to show, spread over the ground truth inside the evaluation ROI.

    Returns:
        The example dict (first test case of the first run).
    """
    if not run_dirs:
        return {"image": np.zeros((0, 1, 1))}
    first_init, first_dir = next(iter(run_dirs.items()))
    first_dir = Path(first_dir)
    run = _read_json(first_dir / "run.json")
    cases = run.get("test_cases", [])
    base = {
        "task": run.get("task"),
        "fraction": run.get("fraction"),
        "seed": run.get("seed"),
        "classes": run.get("classes", {}),
        "simulated": _simulated(run),
        "trained_on": run.get("trained_on", ""),
    }
    if not cases:
        return {**base, "image": np.zeros((0, 1, 1))}
    case = cases[0]
    case_id = str(case["case_id"])
    label, zooms = _canonical(_resolve(first_dir, case.get("label")))
    try:
        image, _ = _canonical(_resolve(first_dir, case.get("image")))
    except Exception:  # a DICOM folder or unreadable image: show the label maps on black
        image = np.zeros(label.shape, dtype=np.float32)
    if image.shape != label.shape:
        image = np.zeros(label.shape, dtype=np.float32)
    from medclust.evaluate.evaluate_run import _apply_label_map

    gt = _apply_label_map(label.astype(np.int32), case.get("label_map"))
    roi_path = _resolve(first_dir, case.get("roi"))
    roi = _canonical(roi_path)[0] > 0 if roi_path is not None else np.ones(gt.shape, bool)
    gt = np.where(roi, gt, 0)
    picks = _pick_slices((gt > 0).sum(axis=(0, 1)), n_slices)
    predictions: dict[str, np.ndarray] = {}
    scores: dict[str, str] = {}
    for init, run_dir in run_dirs.items():
        run_dir = Path(run_dir)
        other = _read_json(run_dir / "run.json")
        entry = next((c for c in other.get("test_cases", []) if str(c["case_id"]) == case_id), None)
        if entry is None:
            continue
        pred, _ = _canonical(_resolve(run_dir, entry.get("prediction") or f"predictions/{case_id}.nii.gz"))
        predictions[init] = np.where(roi, pred, 0)[..., picks].transpose(2, 0, 1).astype(np.int32)
        row = _per_case(run_dir).get(case_id)
        if row and row.get("dice_mean"):
            scores[init] = f"case Dice {float(row['dice_mean']):.3f}"
    display = _normalise_for_display(np.asarray(image[..., picks], dtype=np.float32))
    return {
        **base,
        "case_id": case_id,
        "image": display.transpose(2, 0, 1),
        "ground_truth": gt[..., picks].transpose(2, 0, 1),
        "predictions": predictions,
        "scores": scores,
        "slice_labels": [f"axial slice {z}" for z in picks],
        "aspect": float(zooms[1] / zooms[0]),
    }


def _simulated(run: Mapping[str, Any]) -> bool:
    from medclust.evaluate.evaluate_run import is_simulated

    return is_simulated(run)


def _world_to_store(attrs: Mapping[str, Any], points_mm: np.ndarray) -> np.ndarray:
    """World RAS mm (N, 3) -> store voxel coordinates (N, 3) in the store's x, y, z order."""
    affine = np.asarray(attrs["store_affine"], dtype=np.float64).reshape(4, 4)
    homogeneous = np.c_[points_mm, np.ones(len(points_mm))]
    return (np.linalg.inv(affine) @ homogeneous.T).T[:, :3]


def detection_example(
    run_dirs: Mapping[str, str | Path], slices_dir: str | Path, max_slices: int = 3
) -> dict[str, Any]:
    """Data for :func:`medclust.report.plots.plot_detection_examples`.

    Args:
        run_dirs: ``{init: run folder}`` of one task at the same fraction and seed.
        slices_dir: ``results/slices/{dataset}`` of the run's test dataset.
        max_slices: at most this many lesions (one slice each) are shown.

    Returns:
        The example dict. Detections within half the hit radius (or half a slice, whichever is
        larger) of the shown slice are drawn; "hit" is the evaluation's rule.
    """
    from medclust.evaluate.metrics import Detection, Nodule, assign_detections

    if not run_dirs:
        return {"slices": []}
    first_dir = Path(next(iter(run_dirs.values())))
    run = _read_json(first_dir / "run.json")
    block = run.get("detection", {}) or {}
    radius = float(block.get("min_hit_radius_mm", 5.0))
    detections: dict[str, dict[str, list[Detection]]] = {}
    for init, run_dir in run_dirs.items():
        path = Path(run_dir) / run.get("predictions", "detections.csv")
        per_case: dict[str, list[Detection]] = {}
        if path.exists():
            with open(path, newline="", encoding="utf-8") as handle:
                for r in csv.DictReader(handle):
                    det = Detection(r["case_id"], (float(r["x_mm"]), float(r["y_mm"]), float(r["z_mm"])), float(r["score"]))
                    per_case.setdefault(det.case_id, []).append(det)
        detections[init] = per_case
    slices_dir = Path(slices_dir)
    shown: list[dict[str, Any]] = []
    aspect = 1.0
    for case in run.get("test_cases", []):
        case_id = str(case["case_id"])
        lesions = [
            Nodule(case_id, (float(l["x_mm"]), float(l["y_mm"]), float(l["z_mm"])), float(l.get("diameter_mm", 0.0)))
            for l in case.get("lesions", [])
        ]
        store = slices_dir / f"{case_id}.h5"
        if not lesions or not store.exists():
            continue
        attrs = read_attrs(store)
        n_slices = len(attrs.get("z_positions_mm", [])) or 1
        axis = int(attrs.get("slice_axis", 2))
        affine = np.asarray(attrs["store_affine"], dtype=np.float64).reshape(4, 4)
        voxel_mm = np.linalg.norm(affine[:3, :3], axis=0)
        in_plane = [a for a in range(3) if a != axis]
        aspect = float(voxel_mm[in_plane[1]] / voxel_mm[in_plane[0]])
        lesion_vox = _world_to_store(attrs, np.array([l.center_mm for l in lesions]))
        hits = {init: assign_detections(pc.get(case_id, []), lesions, radius) >= 0 for init, pc in detections.items()}
        for lesion, vox in sorted(zip(lesions, lesion_vox), key=lambda p: -p[0].diameter_mm)[:max_slices]:
            s = int(np.clip(round(vox[axis]), 0, n_slices - 1))
            plane = np.asarray(read_case(store, slices=[s], load_label=False).image[0], dtype=np.float32)
            item = {
                "case_id": case_id,
                "image": _normalise_for_display(plane),
                "label": f"slice {s}, lesion Ø {lesion.diameter_mm:.1f} mm",
                "lesions": [],
                "detections": {},
            }
            for other, ov in zip(lesions, lesion_vox):
                if abs(ov[axis] - s) * voxel_mm[axis] <= max(other.diameter_mm / 2, voxel_mm[axis] / 2):
                    item["lesions"].append(
                        (float(ov[in_plane[0]]), float(ov[in_plane[1]]), other.diameter_mm / 2 / voxel_mm[in_plane[0]])
                    )
            for init, per_case in detections.items():
                dets = per_case.get(case_id, [])
                if not dets:
                    item["detections"][init] = []
                    continue
                dv = _world_to_store(attrs, np.array([d.center_mm for d in dets]))
                near = max(radius / 2, voxel_mm[axis] / 2)
                item["detections"][init] = [
                    (float(v[in_plane[0]]), float(v[in_plane[1]]), d.score, bool(hit))
                    for d, v, hit in zip(dets, dv, hits[init])
                    if abs(v[axis] - s) * voxel_mm[axis] <= near
                ]
            shown.append(item)
        if len(shown) >= max_slices:
            break
    return {
        "task": run.get("task"),
        "slices": shown[:max_slices],
        "inits": list(run_dirs),
        "aspect": aspect,
        "simulated": _simulated(run),
        "trained_on": run.get("trained_on", "?"),
        "fraction": run.get("fraction"),
        "seed": run.get("seed"),
    }
