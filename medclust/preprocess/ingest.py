"""Ingest one dataset: discover its cases, check each one (QC), write the QC table and case list.

Every case is read once (header and voxels) and must be: readable (not truncated, an image at
all; the header's claimed size is checked against the file and ``max_voxels`` before any voxel
is read), 2D or 3D (trailing singleton axes are ignored), with a valid geometry (finite,
non-singular affine, no zero voxel size), free of NaN/Inf, not constant, with a known
modality; a DICOM series must be one series with one orientation and slice positions that are
unique and regular along the slice normal (:mod:`medclust.io.dicom_series`); its label map (if
any) must be readable, on exactly the image's grid (shape and affine) and hold non-negative
integer values; case ids must be unique and manifest paths must exist.

A failing case is one line, ``path: reason`` (:class:`BadInputError`). With
``on_bad_input: fail`` the first one stops the ingest; with ``skip`` it is recorded in the QC
table (status ``skipped``) and left out of the case list. A DICOM series with missing slices or
irregular spacing follows ``dicom_gaps`` instead when that is set: ``fail`` stops, ``skip``
skips the case, ``resample`` keeps it (status ``ok``, the reason column says what was
resampled) and marks it ``resample_gaps`` so that preprocessing reads it the same way. A
dataset with no cases, or with no case that passes, is an error either way.

Outputs (both written atomically, only when the ingest succeeds):

- ``results/qc/{dataset}.tsv``: ``case_id, path, status (ok|skipped), reason`` then
  ``modality, shape, spacing_mm`` for information;
- ``results/cases/{dataset}.json``: ``{"dataset", "cases": [{"case_id", "image", "label",
  "modality", "class_label", "split", "simulated"}]}`` (plus ``series_uid``/``group`` when set).
"""

from __future__ import annotations

import csv
import io
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medclust.errors import BadInputError, MedclustError
from medclust.io.atomic import publish_together, write_json_atomic, write_text_atomic
from medclust.io.dicom_series import DicomGapError
from medclust.io.image import format_number
from medclust.io.readers import ImageData, load_image, place_label
from medclust.io.sources import CaseEntry, discover

log = logging.getLogger(__name__)

QC_COLUMNS = ("case_id", "path", "status", "reason", "modality", "shape", "spacing_mm")
DICOM_GAP_POLICIES = ("fail", "skip", "resample")


@dataclass
class QCRecord:
    """The QC outcome of one case."""

    entry: CaseEntry
    status: str  # ok | skipped
    reason: str = ""
    shape: tuple[int, ...] = ()
    spacing: tuple[float, ...] = ()
    error: BadInputError | None = None

    def row(self) -> dict[str, str]:
        return {
            "case_id": self.entry.case_id,
            "path": self.entry.image,
            "status": self.status,
            "reason": self.reason,
            "modality": self.entry.modality or "",
            "shape": "x".join(str(s) for s in self.shape),
            "spacing_mm": "x".join(f"{s:.4g}" for s in self.spacing),
        }


def _check_values(data: ImageData) -> None:
    array = data.array
    if array.size == 0:
        raise BadInputError(data.path, "empty image (no voxels)")
    if array.dtype.kind == "f":
        finite = np.isfinite(array)
        if not finite.all():
            bad = int(array.size - np.count_nonzero(finite))
            raise BadInputError(data.path, f"{bad} non-finite voxel values (NaN/Inf)")
    elif array.dtype.kind not in "biu":
        raise BadInputError(data.path, f"unsupported voxel type {array.dtype}")
    lo, hi = array.min(), array.max()
    if lo == hi:
        raise BadInputError(data.path, f"constant image (every voxel is {format_number(lo)})")


def _check_label(label: ImageData, image: ImageData) -> None:
    if label.shape != image.shape:
        raise BadInputError(label.path, f"label shape {label.shape} differs from image shape {image.shape}")
    tolerance = 1e-3 * max(max(image.spacing), 1.0)
    difference = float(np.abs(np.asarray(label.affine) - np.asarray(image.affine)).max())
    if difference > tolerance:
        raise BadInputError(
            label.path, f"label affine differs from image affine (by up to {difference:.3g} mm): not on the image grid"
        )
    values = label.array
    if values.dtype.kind == "f":
        if not np.isfinite(values).all():
            raise BadInputError(label.path, "non-finite label values (NaN/Inf)")
        fractional = values != np.rint(values)
        if fractional.any():
            # every digit the value has: 2.0000002 must not read as "2"
            example = format_number(values[fractional].flat[0])
            raise BadInputError(label.path, f"non-integer label values (e.g. {example}); labels must be integers")
    elif values.dtype.kind not in "biu":
        raise BadInputError(label.path, f"unsupported label type {values.dtype}")
    lo, hi = values.min(), values.max()
    if lo < 0:
        raise BadInputError(
            label.path,
            f"negative label values (e.g. {format_number(lo)}); labels must be 0 (background) or positive integers: "
            "remap the label file",
        )
    if hi > np.iinfo(np.int16).max:
        raise BadInputError(label.path, f"label values up to {format_number(hi)}, outside the int16 range")


def check_case(entry: CaseEntry, max_voxels: int | None = None) -> tuple[ImageData, ImageData | None]:
    """Read one case and run every QC check on it.

    Args:
        entry: the discovered case; its ``modality`` is filled from a DICOM header if unset; a
            DICOM series is resampled across gaps if its ``resample_gaps`` is set.
        max_voxels: the most voxels an image may have (checked on the header before reading).

    Returns:
        The loaded image and label (the caller may drop them).

    Raises:
        DicomGapError: a DICOM series with missing slices or irregular spacing (not resampled).
        BadInputError: the first check that fails, naming the file and the reason.
    """
    if entry.error is not None:
        raise entry.error
    image = load_image(
        entry.image,
        entry.series_uid,
        max_voxels=max_voxels,
        resample_gaps=entry.resample_gaps,
        assume_spacing=entry.assume_spacing,
    )
    _check_values(image)
    if entry.modality is None:
        entry.modality = image.modality
    if entry.modality is None:
        raise BadInputError(entry.image, "modality unknown: set `modality` for the dataset or a manifest column")
    label = None
    if entry.label:
        label = place_label(load_image(entry.label, max_voxels=max_voxels, label=True), image)
        _check_label(label, image)
    return image, label


def _mark_duplicates(entries: list[CaseEntry]) -> None:
    first: dict[str, CaseEntry] = {}
    for entry in entries:
        if entry.error is not None:
            continue
        if entry.case_id in first:
            entry.error = BadInputError(
                entry.image, f"duplicate case id '{entry.case_id}' (also {first[entry.case_id].image})"
            )
        else:
            first[entry.case_id] = entry


def _qc_table(records: list[QCRecord]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=QC_COLUMNS, delimiter="\t", lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow(record.row())
    return buffer.getvalue()


def ingest_dataset(
    settings: Mapping[str, Any],
    qc_path: str | os.PathLike[str],
    cases_path: str | os.PathLike[str],
    on_bad_input: str | None = None,
) -> list[QCRecord]:
    """Discover, check and list the cases of one dataset.

    Args:
        settings: the dataset's resolved config entry (``name``, ``format``, ``path``,
            ``modality``; ``on_bad_input`` if not given separately; ``max_voxels`` and
            ``dicom_gaps``, schema defaults if absent).
        qc_path: the QC table to write (``results/qc/{dataset}.tsv``).
        cases_path: the case list to write (``results/cases/{dataset}.json``).
        on_bad_input: ``fail`` or ``skip`` (default: ``settings["on_bad_input"]``, else skip).

    Returns:
        One QC record per discovered case.

    Raises:
        BadInputError: a bad case under ``fail`` (or a DICOM gap under ``dicom_gaps: fail``),
            an empty dataset, or no usable case.
    """
    from medclust.config import load_schema

    mode = on_bad_input or settings.get("on_bad_input", "skip")
    if mode not in ("fail", "skip"):
        raise MedclustError(f"on_bad_input must be 'fail' or 'skip', got {mode!r}")
    defaults = load_schema()["properties"]
    gaps = settings.get("dicom_gaps") or mode
    if gaps not in DICOM_GAP_POLICIES:
        raise MedclustError(f"dicom_gaps must be one of {', '.join(DICOM_GAP_POLICIES)}, got {gaps!r}")
    max_voxels = settings.get("max_voxels", defaults["max_voxels"]["default"])
    name = str(settings.get("name", Path(str(settings.get("path", "dataset"))).stem))
    source = settings.get("path", name)
    entries = discover(settings)
    if not entries:
        raise BadInputError(source, f"no cases found (format {settings.get('format')})")
    _mark_duplicates(entries)
    assume = settings.get("assume_pixel_spacing")
    if assume is not None:
        for entry in entries:
            entry.assume_spacing = (float(assume[0]), float(assume[1]))
    records: list[QCRecord] = []
    started = time.perf_counter()
    for number, entry in enumerate(entries, start=1):
        t0 = time.perf_counter()
        try:
            try:
                image, _ = check_case(entry, max_voxels)
            except DicomGapError:
                if gaps != "resample":
                    raise
                entry.resample_gaps = True
                image, _ = check_case(entry, max_voxels)
        except BadInputError as err:
            stop = gaps == "fail" if isinstance(err, DicomGapError) else mode == "fail"
            if stop:
                raise
            log.warning("%s case %d/%d %s skipped: %s", name, number, len(entries), entry.case_id, err)
            records.append(QCRecord(entry, "skipped", err.reason, error=err))
            continue
        records.append(QCRecord(entry, "ok", image.meta.get("resampled", ""), image.shape, image.spacing))
        log.info(
            "%s case %d/%d %s ok: %s %s (%.1f s)",
            name,
            number,
            len(entries),
            entry.case_id,
            entry.modality,
            "x".join(map(str, image.shape)),
            time.perf_counter() - t0,
        )
        del image
    good = [r.entry for r in records if r.status == "ok"]
    if not good:
        first = next(r.error for r in records if r.error is not None)
        raise BadInputError(source, f"no usable cases: all {len(records)} failed QC (first: {first})")
    with publish_together():  # both or neither: a kill in between left a QC table without its cases
        write_text_atomic(qc_path, _qc_table(records))
        write_json_atomic(cases_path, {"dataset": name, "cases": [e.to_dict() for e in good]})
    log.info(
        "%s: %d cases ok, %d skipped in %.1f s -> %s",
        name, len(good), len(records) - len(good), time.perf_counter() - started, cases_path,
    )
    return records


def read_cases(path: str | os.PathLike[str]) -> tuple[str, list[CaseEntry]]:
    """Read ``results/cases/{dataset}.json``: the dataset name and its entries.

    Raises:
        BadInputError: missing or malformed file.
    """
    import json

    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
        return str(record["dataset"]), [CaseEntry.from_dict(c) for c in record["cases"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BadInputError(path, f"cannot read case list ({err})") from err


__all__ = ["QC_COLUMNS", "QCRecord", "check_case", "ingest_dataset", "read_cases"]
