"""What ``medclust predict --input`` accepts, turned into a list of cases.

Each ``--input`` is one of:

- an image file: NIfTI (``.nii``, ``.nii.gz``), MetaImage/NRRD (``.mha``, ``.mhd``, ``.nrrd``),
  a 2D image (PNG/JPEG/TIFF/BMP) or a single DICOM file (radiograph);
- a manifest (``.csv``/``.tsv``/``.txt`` with an ``image`` column, as for datasets; labels and
  other columns are ignored);
- a folder: every DICOM series in it (one per sub-folder, at any depth, as the ``dicom`` dataset
  format finds them) plus every other image file in it (searched recursively).

Discovery reuses :mod:`medclust.io.sources`, so a folder or manifest is read exactly as the data
stage reads it. Problems with one input (a missing file) are attached to its entry as ``error``
and follow ``on_bad_input`` later; case ids are made unique (``_2``, ``_3`` ...) because they name
the output files.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from medclust.errors import BadInputError
from medclust.io.readers import DICOM_SUFFIXES, IMAGE_2D_SUFFIXES, ITK_SUFFIXES, NIFTI_SUFFIXES, is_dicom_file
from medclust.io.sources import CaseEntry, discover_dicom, read_manifest, sanitize_case_id, strip_image_suffix

__all__ = ["MANIFEST_SUFFIXES", "collect_inputs"]

MANIFEST_SUFFIXES = (".csv", ".tsv", ".tab", ".txt")
_VOLUME_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES + IMAGE_2D_SUFFIXES


def _file_entry(path: Path, modality: str | None) -> CaseEntry:
    return CaseEntry(case_id=sanitize_case_id(strip_image_suffix(path.name)), image=os.path.normpath(path), modality=modality)


def _folder_entries(folder: Path, modality: str | None) -> list[CaseEntry]:
    entries = []
    has_dicom = False
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            lower = name.lower()
            path = Path(dirpath) / name
            if lower.endswith(_VOLUME_SUFFIXES):
                entries.append(_file_entry(path, modality))
            elif lower.endswith(DICOM_SUFFIXES) or ("." not in name and is_dicom_file(path)):
                has_dicom = True
    if has_dicom:
        for entry in discover_dicom(folder, modality):
            if entry.image.lower().endswith(_VOLUME_SUFFIXES):
                continue
            entries.append(entry)
    if not entries:
        raise BadInputError(folder, "no images found (NIfTI, MHA/NRRD, 2D images, DICOM series)")
    return entries


def collect_inputs(paths: Sequence[str | os.PathLike[str]], modality: str | None = None) -> list[CaseEntry]:
    """The cases of every ``--input``, in the given order.

    Args:
        paths: files, folders or manifests (see the module docstring).
        modality: CT, MR or XR for inputs whose header does not say (None: the model's).

    Returns:
        One entry per image; an input that does not exist, or a folder without images, is one
        entry carrying ``error``.
    """
    entries: list[CaseEntry] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            entries.append(CaseEntry(sanitize_case_id(strip_image_suffix(path.name)), str(path), error=BadInputError(path, "file not found")))
            continue
        try:
            if path.is_dir():
                entries.extend(_folder_entries(path, modality))
            elif path.name.lower().endswith(MANIFEST_SUFFIXES):
                for entry in read_manifest(path, modality):
                    if entry.error is not None and entry.label and entry.error.path == str(entry.label):
                        entry.error = None  # predict ignores labels, so a missing one does not matter
                    entry.label = None
                    entries.append(entry)
            else:
                entries.append(_file_entry(path, modality))
        except BadInputError as err:
            entries.append(CaseEntry(sanitize_case_id(strip_image_suffix(path.name)), str(path), error=err))
    used: set[str] = set()
    for entry in entries:
        base, n = entry.case_id, 1
        while entry.case_id in used:
            n += 1
            entry.case_id = f"{base}_{n}"
        used.add(entry.case_id)
    return entries
