"""Find the cases of a dataset, one discovery function per ``format`` of the config.

Formats (``datasets.<name>.format``):

- ``msd``: a Medical Segmentation Decathlon folder: ``dataset.json`` whose ``training`` list
  pairs ``imagesTr/*.nii.gz`` with ``labelsTr/*.nii.gz`` (without ``dataset.json``, images in
  ``imagesTr/`` are paired with same-named files in ``labelsTr/``). Modality from the config or
  from ``dataset.json``'s ``modality``.
- ``manifest``: a CSV (``.csv``) or TSV (``.tsv``, ``.txt``) table, one row per case, columns:
  ``image`` (required), ``label``, ``modality``, ``class_label``, ``split`` (train/val/test),
  ``case_id``, ``group`` (or ``source_case``/``patient_id``: cases of one group share a
  split), ``simulated``, ``series_uid`` (the DICOM series to read when an image folder holds
  several) (all optional). Relative paths are resolved against the manifest's folder. An image
  may be a NIfTI/MHA/NRRD file, a 2D image, or a folder holding a DICOM series.
- ``dicom``: a folder whose sub-folders (at any depth) each hold one DICOM series, or a folder
  that is itself one series. A one-file series is read as a 2D image (radiograph).
- ``images``: a folder (searched recursively) of 2D PNG/JPEG/TIFF/DICOM images.
- ``drr``: the manifest of radiographs simulated from another dataset
  (``results/drr/{dataset}/manifest.tsv``), manifest format with ``simulated`` true by default.

Problems with one row (a missing file, a broken symbolic link, an unknown modality) are
attached to that case as ``error`` so that ingest can skip or fail per ``on_bad_input``; problems
with the dataset itself (no folder, unreadable manifest, no ``image`` column) raise
:class:`BadInputError`.

Case ids are file-name safe and unique (:mod:`medclust.io.case_ids`: transliterated, with a
short hash of the name where different names collide); two cases with the very same name are
left as duplicates for ingest to report.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medclust.errors import BadInputError
from medclust.io.case_entry import (
    CaseEntry,
    normalise_modality,
    normalise_split,
    strip_image_suffix,
)
from medclust.io.case_ids import make_case_ids_unique, name_hash, sanitize_case_id
from medclust.io.dicom_headers import folder_images
from medclust.io.image import path_problem
from medclust.io.readers import (
    DICOM_SUFFIXES,
    IMAGE_2D_SUFFIXES,
    NIFTI_SUFFIXES,
    is_dicom_file,
)

FORMATS = ("msd", "manifest", "dicom", "images", "drr")
SPLITS = ("train", "val", "test")
_TRUE = {"1", "true", "yes", "y", "t"}
_FALSE = {"0", "false", "no", "n", "f", ""}


def _parse_bool(value: str | None, default: bool) -> bool:
    if value is None:
        return default
    key = str(value).strip().lower()
    if key in _TRUE:
        return True
    if key in _FALSE:
        return default if key == "" else False
    raise ValueError(f"simulated value {value!r} is not true/false")


def _parse_class_label(value: str | None) -> str | int | None:
    if value is None or str(value).strip() == "":
        return None
    text = str(value).strip()
    return int(text) if re.fullmatch(r"[+-]?\d+", text) else text


def _resolve(base: Path, value: str) -> str:
    """A path from a table, resolved against ``base`` unless absolute, kept relative if base is."""
    p = Path(os.path.expanduser(value.strip()))
    return os.path.normpath(p if p.is_absolute() else base / p)


def _label_problem(problem: str) -> str:
    return "label file not found" if problem == "file not found" else f"label file: {problem}"


def _require_path(path: str | os.PathLike[str], what: str) -> Path:
    p = Path(path)
    problem = path_problem(p)
    if problem == "file not found":
        raise BadInputError(path, f"{what} not found")
    if problem is not None:
        raise BadInputError(path, f"{what}: {problem}")
    return p


def read_manifest(
    path: str | os.PathLike[str], modality: str | None = None, simulated_default: bool = False
) -> list[CaseEntry]:
    """Parse a CSV/TSV manifest (see the module docstring for the columns).

    Args:
        path: the manifest file; ``.tsv``/``.tab``/``.txt`` are tab-separated, ``.csv``
            comma-separated, anything else is sniffed. Lines starting with ``#`` are ignored.
        modality: the dataset's modality, used where a row gives none.
        simulated_default: value of ``simulated`` where the column is absent or empty.

    Returns:
        One entry per row; a row with a missing file or a bad value carries ``error``.

    Raises:
        BadInputError: the manifest is missing, unreadable or has no ``image`` column.
    """
    manifest = _require_path(path, "manifest")
    if manifest.is_dir():
        raise BadInputError(path, "manifest must be a CSV/TSV file, not a folder")
    try:
        text = manifest.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise BadInputError(path, f"cannot read manifest ({err})") from err
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise BadInputError(path, "manifest is empty (no header row)")
    suffix = manifest.suffix.lower()
    if suffix in (".tsv", ".tab", ".txt"):
        delimiter = "\t"
    elif suffix == ".csv":
        delimiter = ","
    else:
        delimiter = "\t" if "\t" in lines[0] else ","
    reader = csv.DictReader(lines, delimiter=delimiter)
    columns = [c.strip().lower() for c in (reader.fieldnames or [])]
    if "image" not in columns:
        raise BadInputError(path, f"manifest has no 'image' column (columns: {', '.join(columns) or 'none'})")
    base = manifest.parent
    entries: list[CaseEntry] = []
    for row_number, raw in enumerate(reader, start=2):
        row = {(k or "").strip().lower(): (v.strip() if isinstance(v, str) else v) for k, v in raw.items()}
        image_value = row.get("image") or ""
        where = f"{manifest.name} row {row_number}"
        if not image_value:
            name = row.get("case_id") or f"row{row_number}"
            entries.append(
                CaseEntry(
                    case_id=sanitize_case_id(name),
                    image=str(manifest),
                    error=BadInputError(manifest, f"row {row_number}: empty 'image' value"),
                    source_name=name,
                )
            )
            continue
        image = _resolve(base, image_value)
        label = _resolve(base, row["label"]) if row.get("label") else None
        name = row.get("case_id") or strip_image_suffix(Path(image).name)
        group = row.get("group") or row.get("source_case") or row.get("patient_id") or None
        entry = CaseEntry(
            case_id=sanitize_case_id(name), image=image, label=label, group=group,
            series_uid=row.get("series_uid") or None, source_name=name,
        )
        try:
            entry.modality = normalise_modality(row.get("modality")) or normalise_modality(modality)
            entry.split = normalise_split(row.get("split"))
            entry.class_label = _parse_class_label(row.get("class_label"))
            entry.simulated = _parse_bool(row.get("simulated"), simulated_default)
        except ValueError as err:
            entry.error = BadInputError(image, f"{err} ({where})")
        if entry.error is None and (problem := path_problem(image)) is not None:
            entry.error = BadInputError(image, f"{problem} ({where})")
        if entry.error is None and label is not None and (problem := path_problem(label)) is not None:
            entry.error = BadInputError(label, f"{_label_problem(problem)} ({where})")
        entries.append(entry)
    return entries


def _msd_modality(meta: Mapping[str, Any]) -> str | None:
    found = meta.get("modality") or meta.get("channel_names") or {}
    values = list(found.values()) if isinstance(found, Mapping) else [found]
    for value in values:
        try:
            return normalise_modality(str(value))
        except ValueError:
            continue
    return None


def discover_msd(folder: str | os.PathLike[str], modality: str | None = None) -> list[CaseEntry]:
    """Cases of a Medical Segmentation Decathlon style folder.

    Args:
        folder: holds ``dataset.json`` (optional), ``imagesTr/`` and ``labelsTr/``.
        modality: overrides ``dataset.json``'s modality.

    Returns:
        One entry per training image, paired with its label.

    Raises:
        BadInputError: missing folder, unreadable ``dataset.json``, or no ``imagesTr/``.
    """
    root = _require_path(folder, "MSD folder")
    meta: dict[str, Any] = {}
    pairs: list[tuple[str, str | None]] = []
    dataset_json = root / "dataset.json"
    if dataset_json.is_file():
        try:
            meta = json.loads(dataset_json.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise BadInputError(dataset_json, f"cannot parse dataset.json ({err})") from err
        training = meta.get("training")
        if not isinstance(training, list):
            raise BadInputError(dataset_json, "dataset.json has no 'training' list")
        for item in training:
            if isinstance(item, Mapping) and item.get("image"):
                label = _resolve(root, str(item["label"])) if item.get("label") else None
                pairs.append((_resolve(root, str(item["image"])), label))
            elif isinstance(item, str):
                pairs.append((_resolve(root, item), None))
    else:
        images_dir = root / "imagesTr"
        if not images_dir.is_dir():
            raise BadInputError(root, "not an MSD folder (no dataset.json and no imagesTr/)")
        labels_dir = root / "labelsTr"
        for image in sorted(images_dir.iterdir()):
            # MSD tarballs ship macOS '._*' resource forks next to the images.
            if image.name.startswith(".") or not image.name.lower().endswith(NIFTI_SUFFIXES):
                continue
            label = labels_dir / image.name
            # lexists: a broken symbolic link to a label is reported, not read as "no label"
            pairs.append((os.path.normpath(image), os.path.normpath(label) if os.path.lexists(label) else None))
    dataset_modality = normalise_modality(modality) or _msd_modality(meta)
    entries = []
    for image, label in pairs:
        name = strip_image_suffix(Path(image).name)
        entry = CaseEntry(case_id=sanitize_case_id(name), image=image, label=label, modality=dataset_modality, source_name=name)
        if (problem := path_problem(image)) is not None:
            entry.error = BadInputError(image, f"{problem} (listed in dataset.json)")
        elif label is not None and (problem := path_problem(label)) is not None:
            entry.error = BadInputError(label, f"{_label_problem(problem)} (listed in dataset.json)")
        entries.append(entry)
    return entries


def _dicom_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """DICOM files directly in ``folder``, and entries that cannot be opened (broken links)."""
    files, broken = [], []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if path_problem(p) is not None:
            broken.append(p)
        elif p.is_file() and is_dicom_file(p):
            files.append(p)
    return files, broken


def discover_dicom(folder: str | os.PathLike[str], modality: str | None = None) -> list[CaseEntry]:
    """Cases of a folder of DICOM series (one series per sub-folder, at any depth).

    A folder that directly holds the slices of one series is one case named after the folder.
    A folder holding several series yields one case per series (``_s0``, ``_s1`` ... by UID).
    A file without ``ImagePositionPatient`` (a CR/DX/MG radiograph) is a 2D image of its own
    (``{folder}_{file}``; a radiographic series of several views is several images), read with
    pydicom (``MONOCHROME1`` handled), as is a folder's only file.
    Symbolic links to folders are followed (each real folder once). A folder with an entry that
    cannot be opened (a broken symbolic link, a link loop) is one case whose QC reports it,
    never a series silently missing a slice.

    Raises:
        BadInputError: the folder is missing.
    """
    root = _require_path(folder, "DICOM folder")
    if root.is_file():
        name = strip_image_suffix(root.name)
        entry = CaseEntry(sanitize_case_id(name), os.path.normpath(root), modality=normalise_modality(modality), source_name=name)
        return [entry]
    dataset_modality = normalise_modality(modality)
    entries: list[CaseEntry] = []
    seen: set[str] = set()
    for dirpath, dirnames, _ in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link back up the tree, or two links to one folder
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        here = Path(dirpath)
        files, broken = _dicom_files(here)
        if not files and not broken:
            continue
        rel = here.relative_to(root)
        name = root.name if str(rel) == "." else "_".join(rel.parts)
        base = sanitize_case_id(name)
        found = folder_images(here)
        if broken or found.unreadable or len(found.series) + len(found.projections) <= 1:
            # One case; reading it reports broken links, unreadable files or a missing series.
            image = files[0] if len(files) == 1 and not broken else here
            entries.append(CaseEntry(case_id=base, image=os.path.normpath(image), modality=dataset_modality, source_name=name))
            continue
        for path in found.projections:
            stem = strip_image_suffix(path.name)
            entries.append(
                CaseEntry(
                    case_id=sanitize_case_id(f"{name}_{stem}"), image=os.path.normpath(path), modality=dataset_modality,
                    source_name=f"{name}_{stem}",
                )
            )
        for k, uid in enumerate(sorted(found.series)):
            entries.append(
                CaseEntry(
                    case_id=f"{base}_s{k}", image=os.path.normpath(here), modality=dataset_modality,
                    series_uid=uid, source_name=f"{name}_s{k}",
                )
            )
    return entries


def discover_images(folder: str | os.PathLike[str], modality: str | None = "XR") -> list[CaseEntry]:
    """Cases of a folder of 2D images (PNG/JPEG/TIFF/BMP/DICOM), searched recursively.

    Case ids are the relative path without suffix, ``/`` replaced by ``_``.

    Raises:
        BadInputError: the folder is missing.
    """
    root = _require_path(folder, "image folder")
    dataset_modality = normalise_modality(modality) or "XR"
    candidates: list[Path]
    if root.is_file():
        candidates, root = [root], root.parent
    else:
        candidates = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                p = Path(dirpath) / name
                lower = name.lower()
                if lower.endswith(IMAGE_2D_SUFFIXES + DICOM_SUFFIXES) or ("." not in name and is_dicom_file(p)):
                    candidates.append(p)
    entries = []
    for p in candidates:
        rel = p.relative_to(root)
        name = "_".join((*rel.parts[:-1], strip_image_suffix(rel.name)))
        entries.append(CaseEntry(sanitize_case_id(name), os.path.normpath(p), modality=dataset_modality, source_name=name))
    return entries


def discover(settings: Mapping[str, Any]) -> list[CaseEntry]:
    """Cases of one dataset, from its resolved config entry.

    Args:
        settings: the dataset's config entry (``format``, ``path``, ``modality`` ...), as the
            workflow's ``dataset_settings`` resolves it. For ``drr`` datasets ``path`` is the
            manifest written by the radiograph simulation.

    Returns:
        The entries in a stable order, with unique ids (:func:`make_case_ids_unique`).

    Raises:
        BadInputError: the dataset itself is unusable (missing path, bad manifest).
    """
    fmt = settings.get("format")
    path = settings.get("path")
    name = settings.get("name", "<dataset>")
    if fmt not in FORMATS:
        raise BadInputError(name, f"unknown dataset format {fmt!r} (expected one of {', '.join(FORMATS)})")
    if not path:
        raise BadInputError(name, f"dataset of format {fmt} needs a 'path'")
    try:
        modality = normalise_modality(settings.get("modality"))
    except ValueError as err:
        raise BadInputError(name, str(err)) from err
    if fmt == "msd":
        entries = discover_msd(path, modality)
    elif fmt == "manifest":
        entries = read_manifest(path, modality)
    elif fmt == "drr":
        entries = read_manifest(path, modality or "XR", simulated_default=True)
    elif fmt == "dicom":
        entries = discover_dicom(path, modality)
    else:
        entries = discover_images(path, modality or "XR")
    make_case_ids_unique(entries)
    return entries


__all__ = [
    "FORMATS",
    "SPLITS",
    "CaseEntry",
    "discover",
    "discover_dicom",
    "discover_images",
    "discover_msd",
    "make_case_ids_unique",
    "name_hash",
    "normalise_modality",
    "normalise_split",
    "read_manifest",
    "sanitize_case_id",
    "strip_image_suffix",
]
