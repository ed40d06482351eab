"""Simulated radiographs for a whole dataset: a CT cases list -> DRR NIfTIs + manifest.

Renders every CT case of an ingest ``cases`` JSON at the configured angles with
:class:`medclust.preprocess.drr.DrrRenderer`. Everything this module writes is marked as
simulated (manifest column, NIfTI ``descrip``, ``drr.json``), because a DRR is not a
radiograph: no scatter, no beam hardening, no detector response, parallel instead of cone beam.
"""

from __future__ import annotations

import csv
import gzip
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from medclust.errors import BadInputError, MedclustError
from medclust.io.atomic import atomic_path, write_json_atomic
from medclust.preprocess.drr import DrrRenderer

log = logging.getLogger(__name__)

DRR_MANIFEST_COLUMNS = ("image", "label", "modality", "split", "simulated", "source_case", "group", "angle_deg")


def _angle_tag(angle: float) -> str:
    text = f"{angle % 360:g}".replace(".", "p").replace("-", "m")
    whole, _, frac = text.partition("p")
    return f"{int(whole):03d}" + (f"p{frac}" if frac else "")


def _load_ras(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Array (X, Y, Z) and affine of a volume reoriented to RAS with MONAI."""
    from monai.transforms import LoadImage, Orientation  # heavy import; only this path needs it

    try:
        img = LoadImage(image_only=True, ensure_channel_first=True)(str(path))
        img = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(img)
    except Exception as err:  # noqa: BLE001 - any reader failure becomes one line naming the file
        raise BadInputError(path, f"cannot read volume: {err}") from err
    array = np.asarray(img[0].numpy())
    affine = np.asarray(img.affine.numpy(), dtype=np.float64)
    if array.ndim != 3:
        raise BadInputError(path, f"not a 3D volume (shape {array.shape})")
    return array, affine


def _write_nifti_2d(array_hw: np.ndarray, pixel_spacing: float, path: Path, description: str) -> None:
    """2D NIfTI in MONAI's 2D axis order (axis 0 = image column, axis 1 = row from the top)."""
    import nibabel as nib

    affine = np.diag([pixel_spacing, pixel_spacing, 1.0, 1.0])
    img = nib.Nifti1Image(np.ascontiguousarray(array_hw.T), affine)
    img.header["descrip"] = description[:79].encode()
    img.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        # mtime=0: the same pixels give the same bytes (and sha256) on every run.
        tmp.write_bytes(gzip.compress(img.to_bytes(), compresslevel=6, mtime=0))


def angle_splits(settings: Mapping[str, Any]) -> dict[float, str]:
    """Fixed split per projection angle from the ``drr`` block (``val_angles``, ``test_angles``).

    Args:
        settings: the config ``drr`` block.

    Returns:
        ``{angle mod 360: "val" | "test"}``; empty when no angle has a fixed split.

    Raises:
        MedclustError: an angle is listed in both, or is not one of ``angles``.
    """
    angles = {float(a) % 360 for a in settings.get("angles", [0, 90, 180, 270])}
    fixed: dict[float, str] = {}
    for split in ("val", "test"):
        for angle in settings.get(f"{split}_angles") or []:
            key = float(angle) % 360
            if key not in angles:
                raise MedclustError(f"drr.{split}_angles: {angle:g} is not one of drr.angles")
            if fixed.get(key, split) != split:
                raise MedclustError(f"drr: angle {angle:g} is in both val_angles and test_angles")
            fixed[key] = split
    return fixed


def _resolve(path_text: str, cases_json: Path) -> Path:
    path = Path(path_text)
    if path.is_absolute() or path.exists():
        return path
    return cases_json.parent / path


def simulate_drr_dataset(
    cases_json: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    settings: Mapping[str, Any],
    threads: int = 1,
) -> Path:
    """Render DRRs for every CT case listed in an ingest ``cases`` JSON.

    Args:
        cases_json: ``results/cases/{source}.json`` (``{"dataset", "cases": [{"case_id",
            "image", "label", "modality", "split", ...}]}``).
        out_dir: ``results/drr/{dataset}``; receives ``images/``, ``labels/``, ``drr.json``,
            ``provenance.json`` and, last, ``manifest.tsv``.
        settings: the config ``drr`` block: ``angles``, ``mu_water``, ``pixel_spacing``,
            ``val_angles``, ``test_angles``.
        threads: threads that resample the slices of one view (the views are identical for any number).

    Returns:
        The manifest path. Columns: image, label (paths relative to the manifest), modality
        (XR), split, simulated (true), source_case, group, angle_deg. Without angle splits
        every view takes its source case's split and group (views of one CT never straddle
        splits). With ``val_angles``/``test_angles`` the views split by angle instead: those
        angles are val/test, the others train, and each view is its own group, so a task on
        them tests unseen projection angles of the same CTs, not unseen patients.
    """
    from medclust.provenance import write_provenance

    cases_json = Path(cases_json)
    out = Path(out_dir)
    angles = [float(a) for a in settings.get("angles", [0, 90, 180, 270])]
    mu_water = float(settings.get("mu_water", 0.02))
    pixel_spacing = float(settings.get("pixel_spacing", 1.0))
    by_angle = angle_splits(settings)
    try:
        source = json.loads(cases_json.read_text(encoding="utf-8"))
        cases = source["cases"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BadInputError(cases_json, f"cannot read the cases list: {err}") from err
    ct_cases = [c for c in cases if str(c.get("modality", "CT")).upper() == "CT"]
    if len(ct_cases) < len(cases):
        log.warning("%s: %d non-CT cases skipped", cases_json, len(cases) - len(ct_cases))
    if not ct_cases:
        raise BadInputError(cases_json, "no CT cases to simulate radiographs from")

    for sub in ("images", "labels"):  # exclusively ours: drop views of earlier settings
        shutil.rmtree(out / sub, ignore_errors=True)
        (out / sub).mkdir(parents=True, exist_ok=True)

    rows: list[dict[str, str]] = []
    records: list[dict[str, Any]] = []
    inputs: list[Path] = [cases_json]
    for n, case in enumerate(ct_cases, 1):
        image_path = _resolve(case["image"], cases_json)
        volume, affine = _load_ras(image_path)
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        if not np.allclose(np.abs(affine[:3, :3]), np.diag(spacing), atol=1e-3 * spacing.max()):
            log.warning("%s: oblique volume; projecting along its voxel axes", image_path)
        label = None
        if case.get("label"):
            label_path = _resolve(case["label"], cases_json)
            label, label_affine = _load_ras(label_path)
            if label.shape != volume.shape or not np.allclose(label_affine, affine, atol=1e-3):
                raise BadInputError(label_path, f"label grid differs from image grid of {image_path}")
            label = np.rint(label).astype(np.int32)
        inputs.append(image_path)
        renderer = DrrRenderer(volume, spacing, mu_water, label, threads=threads)
        del volume, label
        for angle in angles:
            started = time.perf_counter()
            drr, drr_label = renderer.render(angle, pixel_spacing)
            case_id = f"{case['case_id']}_drr{_angle_tag(angle)}"
            what = f"medclust SIMULATED DRR of {case['case_id']} angle {angle:g}"
            image_rel = f"images/{case_id}.nii.gz"
            _write_nifti_2d(drr.astype(np.float32), pixel_spacing, out / image_rel, what)
            label_rel = ""
            if drr_label is not None:
                label_rel = f"labels/{case_id}.nii.gz"
                _write_nifti_2d(drr_label, pixel_spacing, out / label_rel, what + " labels")
            split, group = case.get("split") or "", str(case["case_id"])
            if by_angle:
                split, group = by_angle.get(angle % 360, "train"), case_id
            rows.append(
                {
                    "image": image_rel,
                    "label": label_rel,
                    "modality": "XR",
                    "split": split,
                    "simulated": "true",
                    "source_case": str(case["case_id"]),
                    "group": group,
                    "angle_deg": f"{angle:g}",
                }
            )
            records.append(
                {
                    "case_id": case_id,
                    "simulated": True,
                    "source_case": case["case_id"],
                    "source_image": str(image_path),
                    "angle_deg": angle,
                    "shape_rows_cols": list(drr.shape),
                    "max_line_integral": float(drr.max()),
                }
            )
            log.info(
                "case %d/%d %s angle %g: %dx%d DRR in %.1f s",
                n, len(ct_cases), case["case_id"], angle, drr.shape[0], drr.shape[1], time.perf_counter() - started,
            )

    write_json_atomic(
        out / "drr.json",
        {
            "simulated": True,
            "source_dataset": source.get("dataset"),
            "method": "parallel-beam line integral of mu = mu_water*(1+HU/1000) clipped at 0; label = longest path",
            "geometry": "angle 0 = PA (rays posterior->anterior), rotation about superior axis; "
            "NIfTI axis 0 = image column (patient right at 0 for PA), axis 1 = row (superior at 0)",
            "mu_water_per_mm": mu_water,
            "pixel_spacing_mm": pixel_spacing,
            "angles_deg": angles,
            "split_by_angle": {f"{a:g}": v for a, v in sorted(by_angle.items())},
            "label_values": "structure ids of the source dataset's labels",
            "images": records,
        },
    )
    write_provenance(out, {"simulated": True, **dict(settings)}, inputs)
    manifest = out / "manifest.tsv"
    with atomic_path(manifest) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=DRR_MANIFEST_COLUMNS, delimiter="\t", lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
    log.info("%s: %d simulated radiographs from %d CT cases", manifest, len(rows), len(ct_cases))
    return manifest
