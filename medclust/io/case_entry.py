"""One case of a dataset as discovered (:class:`CaseEntry`, the record of
``results/cases/{dataset}.json``), and the names users may write for its modality and split."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from medclust.errors import BadInputError
from medclust.io.readers import DICOM_SUFFIXES, IMAGE_2D_SUFFIXES, NIFTI_SUFFIXES

__all__ = ["CaseEntry", "normalise_modality", "normalise_split", "strip_image_suffix"]

_SPLIT_ALIASES = {
    "train": "train", "training": "train", "tr": "train",
    "val": "val", "valid": "val", "validation": "val",
    "test": "test", "testing": "test", "ts": "test",
}
_MODALITY_ALIASES = {
    "CT": "CT",
    "MR": "MR", "MRI": "MR", "T1": "MR", "T1W": "MR", "T2": "MR", "T2W": "MR", "FLAIR": "MR",
    "XR": "XR", "CR": "XR", "DX": "XR", "X-RAY": "XR", "XRAY": "XR", "RADIOGRAPH": "XR", "DRR": "XR",
}


@dataclass
class CaseEntry:
    """One case of a dataset as discovered (before QC).

    Attributes:
        case_id: unique id within the dataset; ``[A-Za-z0-9][A-Za-z0-9._-]*``.
        image: image file, or folder of a DICOM series.
        label: label map on the image's grid, if any.
        modality: CT, MR or XR (None: unknown so far; a DICOM header may tell).
        class_label: a per-case class for classification tasks, if any.
        split: train/val/test fixed by a manifest, if any.
        simulated: True for simulated radiographs.
        series_uid: DICOM series to read when ``image`` is a folder holding several.
        group: cases with the same group (patient; the CT a radiograph was simulated from)
            always land in the same split.
        resample_gaps: the DICOM series has missing slices or irregular spacing and is
            resampled onto a regular grid when read (``dicom_gaps: resample``; set by ingest).
        assume_spacing: (row, column) mm for a radiograph whose header records no usable
            pixel spacing (the dataset's ``assume_pixel_spacing``; set by ingest).
        error: a problem found during discovery (missing file, bad value); ingest reports it.
        source_name: the name the id was made from (not written; keeps ids unique).
    """

    case_id: str
    image: str
    label: str | None = None
    modality: str | None = None
    class_label: str | int | None = None
    split: str | None = None
    simulated: bool = False
    series_uid: str | None = None
    group: str | None = None
    resample_gaps: bool = False
    assume_spacing: tuple[float, float] | None = None
    error: BadInputError | None = field(default=None, compare=False)
    source_name: str | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The case as written to ``results/cases/{dataset}.json`` (contract keys)."""
        record: dict[str, Any] = {
            "case_id": self.case_id,
            "image": self.image,
            "label": self.label,
            "modality": self.modality,
            "class_label": self.class_label,
            "split": self.split,
            "simulated": bool(self.simulated),
        }
        # Optional keys beyond the contract, only written when set.
        if self.series_uid is not None:
            record["series_uid"] = self.series_uid
        if self.group is not None:
            record["group"] = self.group
        if self.resample_gaps:
            record["resample_gaps"] = True
        if self.assume_spacing is not None:
            record["assume_pixel_spacing"] = list(self.assume_spacing)
        return record

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> CaseEntry:
        """Inverse of :meth:`to_dict`."""
        return cls(
            case_id=str(record["case_id"]),
            image=str(record["image"]),
            label=record.get("label"),
            modality=record.get("modality"),
            class_label=record.get("class_label"),
            split=record.get("split"),
            simulated=bool(record.get("simulated", False)),
            series_uid=record.get("series_uid"),
            group=record.get("group"),
            resample_gaps=bool(record.get("resample_gaps", False)),
            assume_spacing=_spacing_pair(record.get("assume_pixel_spacing")),
        )


def _spacing_pair(value: Any) -> tuple[float, float] | None:
    """``[row, column]`` mm from a config or case record, or None."""
    if value is None:
        return None
    row, column = (float(v) for v in value)
    return (row, column)


def strip_image_suffix(name: str) -> str:
    """File name without its image suffix (``x.nii.gz`` -> ``x``)."""
    lower = name.lower()
    for suffix in (".nii.gz", *NIFTI_SUFFIXES, ".mha", ".mhd", ".nrrd", *IMAGE_2D_SUFFIXES, *DICOM_SUFFIXES):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def normalise_modality(value: str | None) -> str | None:
    """Map a modality name (CT, MRI, T1, CR, DX, X-ray ...) to CT, MR or XR; None if empty.

    Raises:
        ValueError: a non-empty value that is not a known modality.
    """
    return _alias(value, _MODALITY_ALIASES, str.upper, "unknown modality {!r} (expected CT, MR or XR)")


def normalise_split(value: str | None) -> str | None:
    """Map train/training, val/validation, test/testing to train, val, test; None if empty.

    Raises:
        ValueError: a non-empty value that is not a split name.
    """
    return _alias(value, _SPLIT_ALIASES, str.lower, "split {!r} is not train, val or test")


def _alias(value: str | None, aliases: Mapping[str, str], fold: Callable[[str], str], problem: str) -> str | None:
    """``aliases[fold(value)]`` (stripped); None for an empty value; ValueError(problem) if unknown."""
    if value is None or str(value).strip() == "":
        return None
    key = fold(str(value).strip())
    if key not in aliases:
        raise ValueError(problem.format(value))
    return aliases[key]
