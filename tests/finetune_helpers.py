"""Tiny synthetic slice stores for the fine-tuning tests (written with the slice-store writer)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from medclust.io.slice_store import write_case


def store_affine(spacing=(2.0, 2.0, 4.0), origin=(-32.0, -32.0, -24.0)) -> np.ndarray:
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = origin
    return aff


def phantom(num_slices: int = 12, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A volume with a disc (label 3) on most slices and a square (label 7) on the upper half."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    image = 0.1 + 0.05 * rng.standard_normal((num_slices, size, size))
    label = np.zeros((num_slices, size, size), np.int64)
    for s in range(num_slices):
        cy, cx = size // 2 + rng.integers(-3, 4), size // 3 + rng.integers(-2, 3)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= (size // 6) ** 2
        if s < num_slices - 2:
            label[s][disc] = 3
        if s >= num_slices // 2:
            label[s, 4:12, size - 12 : size - 4] = 7
    image[label == 3] += 0.5
    image[label == 7] += 0.3
    return np.clip(image, 0, 1).astype(np.float32), label


def write_store(root: Path, dataset: str, cases: list[dict], splits: dict | None = None) -> Path:
    """Write ``root/dataset/{case}.h5`` + index.json + splits.json.

    Each case dict: case_id, image (S,H,W), optional label, affine, class_label, original_* attrs.
    When the original grid is the store grid (no original_shape / original_affine given), the
    label is also written as a real NIfTI source file (``root/sources``), so runs can be scored.
    """
    folder = Path(root) / dataset
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for case in cases:
        image = case["image"]
        s, h, w = image.shape
        affine = case.get("affine", store_affine())
        z0 = affine[2, 3]
        label_path = f"/data/{case['case_id']}_seg.nii.gz" if case.get("label") is not None else ""
        if label_path and "original_affine" not in case and case.get("original_shape", [h, w, s]) == [h, w, s]:
            sources = Path(root) / "sources"
            sources.mkdir(exist_ok=True)
            label_path = str(sources / f"{case['case_id']}_seg.nii.gz")
            # the store holds np.moveaxis(volume_xyz, slice_axis=2, 0)
            nib.save(nib.Nifti1Image(np.moveaxis(np.asarray(case["label"], np.int16), 0, 2), affine), label_path)
        attrs = {
            "case_id": case["case_id"],
            "dataset": dataset,
            "modality": "CT",
            "simulated": False,
            "source_path": f"/data/{case['case_id']}.nii.gz",
            "source_sha256": "0" * 64,
            "label_path": label_path,
            "original_shape": case.get("original_shape", [h, w, s]),
            "original_spacing": list(np.linalg.norm(affine[:3, :3], axis=0)),
            "original_affine": case.get("original_affine", affine),
            "store_affine": affine,
            "target_spacing": list(np.linalg.norm(affine[:3, :3], axis=0)),
            "slice_axis": 2,
            "z_positions_mm": [float(z0 + affine[2, 2] * k) for k in range(s)],
            "normalisation": json.dumps({"kind": "ct_window", "window": [-1000, 1000]}),
            "medclust_version": "test",
        }
        if case.get("class_label") is not None:
            attrs["class_label"] = case["class_label"]
        write_case(folder / f"{case['case_id']}.h5", image, attrs, label=case.get("label"), dtype="float32")
        label = case.get("label")
        entries.append(
            {
                "case_id": case["case_id"],
                "file": f"{case['case_id']}.h5",
                "modality": "CT",
                "num_slices": s,
                "shape": [s, h, w],
                "label_classes": sorted(int(v) for v in np.unique(label)) if label is not None else [],
                "simulated": False,
                "class_label": case.get("class_label"),
            }
        )
    (folder / "index.json").write_text(json.dumps({"dataset": dataset, "cases": entries}), encoding="utf-8")
    ids = [c["case_id"] for c in cases]
    splits = splits or {"train": ids, "val": [], "test": []}
    (folder / "splits.json").write_text(json.dumps({"dataset": dataset, "seed": 0, **splits}), encoding="utf-8")
    return folder
