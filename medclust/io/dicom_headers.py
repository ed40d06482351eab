"""DICOM slice files and their headers: which files form a series folder, and what each says.

Every entry of a series folder is accounted for (:func:`candidate_files`: a broken link or an
unopenable entry is an error, not a missing slice), and each slice's header is read with its
pixel data deferred and checked to be complete (:func:`read_slice_header`). The geometry these
headers form is checked by :mod:`medclust.io.dicom_series`.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medclust.errors import BadInputError
from medclust.io.image import path_problem, read_failure

__all__ = [
    "DICOM_SUFFIXES", "FolderImages", "SliceHeader", "candidate_files", "folder_images", "header_number", "is_dicom_file",
    "modality_from_tag", "read_slice_header",
]

_PIXEL_DATA = 0x7FE00010
_UNDEFINED_LENGTH = 0xFFFFFFFF
_DICOMDIR_SOP = "1.2.840.10008.1.3.10"
DICOM_SUFFIXES = (".dcm", ".dicom")
# DICOM Modality values that are projection radiographs.
_XR_MODALITIES = {"CR", "DX", "RG", "MG", "RF", "XA", "PX", "IO"}



def modality_from_tag(value: str | None) -> str | None:
    """CT, MR or XR from a DICOM ``Modality`` value (None if empty or another modality)."""
    if not value:
        return None
    value = str(value).upper().strip()
    if value in ("CT", "MR"):
        return value
    if value in _XR_MODALITIES:
        return "XR"
    return None


@dataclass
class SliceHeader:
    """What one slice file's header says about its place in the volume."""

    path: Path
    series_uid: str
    position: np.ndarray | None
    orientation: np.ndarray | None
    pixel_spacing: list[float] | None
    rows: int
    columns: int
    frames: int
    modality: str | None
    thickness: float | None
    pixels: dict[str, Any] | None = None  # how the pixel data are stored (medclust.io.dicom_pixels)
    rescale: tuple[float, float] = (1.0, 0.0)  # RescaleSlope, RescaleIntercept (1, 0 when absent)


def is_dicom_file(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` is a file with the DICOM suffix or the ``DICM`` preamble marker."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.name.lower().endswith(DICOM_SUFFIXES):
        return True
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def candidate_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The DICOM files directly inside ``folder`` (hidden entries and sub-folders ignored).

    Raises:
        BadInputError: an entry that cannot be opened (broken symbolic link, link loop, no
            permission): a slice could be missing, so the series cannot be trusted.
    """
    root = Path(folder)
    found = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        path = root / entry.name
        problem = path_problem(path)
        if problem is not None:
            raise BadInputError(folder, f"{entry.name} in the series folder: {problem}")
        if is_dicom_file(path):
            found.append(path)
    return found


def _numbers(value: Any, count: int) -> np.ndarray | None:
    if value is None or value == "":
        return None
    try:
        numbers = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return np.full(count, np.nan)
    return numbers if numbers.size == count else np.full(count, np.nan)


def header_number(ds: Any, keyword: str, kind: type, path: str | os.PathLike[str], prefix: str = "") -> Any:
    """``kind(value)`` of one header element, None if it is absent or empty.

    Args:
        ds: the pydicom dataset.
        keyword: the element (``SliceThickness``).
        kind: ``int`` or ``float``.
        path: the file (or series folder) an error names.
        prefix: the error reason's start (``"slice file x.dcm: "`` for one file of a series).

    Raises:
        BadInputError: the value is not a number (``'7.2x'``): named here, with the file, because
            a bare ValueError from deep in ingest names neither and cannot be skipped.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns on the malformed value: reported below instead
        value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise BadInputError(path, f"{prefix}{keyword} {str(value)!r} is not a number") from None


def _read_dataset(path: Path, folder: str | os.PathLike[str]) -> Any:
    """pydicom dataset of one file, large values (pixel data) deferred; a file without the
    128-byte preamble is read too (GDCM reads those), a file that is not DICOM is an error."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about harmless VR oddities
        try:
            return pydicom.dcmread(str(path), defer_size=256)
        except InvalidDicomError:
            try:
                ds = pydicom.dcmread(str(path), defer_size=256, force=True)
            except Exception:
                ds = None
            if ds is not None and "Rows" in ds and _PIXEL_DATA in ds:
                return ds
            raise BadInputError(folder, f"slice file {path.name} is not a DICOM file") from None
        except Exception as err:
            raise BadInputError(folder, f"slice file {path.name} is unreadable ({read_failure(path, err).reason})") from err


def read_slice_header(path: Path, folder: str | os.PathLike[str]) -> SliceHeader | None:
    """The geometry of one slice file, after checking that its pixel data are complete.

    Returns:
        None for a DICOM file that is not an image (DICOMDIR, structured report ...).

    Raises:
        BadInputError: unreadable, truncated, pixel data shorter than the header needs, or a
            NumberOfFrames, SliceThickness or rescale value that is not a number.
    """
    name = path.name
    size = path.stat().st_size
    if size == 0:
        raise BadInputError(folder, f"slice file {name} is empty (0 bytes)")
    ds = _read_dataset(path, folder)
    if str(ds.get("SOPClassUID", "")) == _DICOMDIR_SOP or "Rows" not in ds:
        return None
    rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    frames = header_number(ds, "NumberOfFrames", int, folder, f"slice file {name}: ") or 1
    if _PIXEL_DATA not in ds:
        raise BadInputError(folder, f"slice file {name} has no pixel data (truncated?)")
    element = ds.get_item(_PIXEL_DATA, keep_deferred=True)
    length = int(getattr(element, "length", _UNDEFINED_LENGTH))
    tell = getattr(element, "value_tell", None)
    if length != _UNDEFINED_LENGTH:
        if tell is not None and tell + length > size:
            raise BadInputError(
                folder, f"slice file {name} is truncated: {size:,} bytes, its pixel data end at byte {tell + length:,}"
            )
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if syntax is None or not syntax.is_compressed:
            samples = int(ds.get("SamplesPerPixel") or 1)
            needed = rows * columns * frames * samples * int(ds.get("BitsAllocated") or 16) // 8
            if length < needed:
                raise BadInputError(
                    folder,
                    f"slice file {name} holds {length:,} bytes of pixel data, its {columns}x{rows} header needs {needed:,}",
                )
    thickness = header_number(ds, "SliceThickness", float, folder, f"slice file {name}: ")
    slope = header_number(ds, "RescaleSlope", float, folder, f"slice file {name}: ")
    intercept = header_number(ds, "RescaleIntercept", float, folder, f"slice file {name}: ")
    spacing = _numbers(ds.get("PixelSpacing"), 2)
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    pixels = None
    if tell is not None and length != _UNDEFINED_LENGTH:
        pixels = {
            "offset": int(tell), "length": length, "syntax": str(syntax or ""),
            "samples": int(ds.get("SamplesPerPixel") or 1), "bits_allocated": int(ds.get("BitsAllocated") or 0),
            "bits_stored": int(ds.get("BitsStored") or 0), "signed": int(ds.get("PixelRepresentation") or 0) == 1,
            "photometric": str(ds.get("PhotometricInterpretation") or ""),
            "slope": ds.get("RescaleSlope"), "intercept": ds.get("RescaleIntercept"),
        }
    return SliceHeader(
        path=path,
        series_uid=str(ds.get("SeriesInstanceUID", "") or ""),
        position=_numbers(ds.get("ImagePositionPatient"), 3),
        orientation=_numbers(ds.get("ImageOrientationPatient"), 6),
        pixel_spacing=None if spacing is None else [float(v) for v in spacing],
        rows=rows,
        columns=columns,
        frames=frames,
        modality=modality_from_tag(ds.get("Modality")),
        thickness=thickness,
        pixels=pixels,
        rescale=(1.0 if slope is None else slope, 0.0 if intercept is None else intercept),
    )


@dataclass(frozen=True)
class FolderImages:
    """The DICOM images directly inside a folder, as discovery needs them.

    Attributes:
        series: SeriesInstanceUID -> the files of that series that are slices of a volume (they
            carry an ``ImagePositionPatient``), by name.
        projections: files without a position (CR, DX, MG radiographs): each is a 2D image of its
            own, whatever series it belongs to.
        unreadable: DICOM files whose header could not be read (left for reading to report).
    """

    series: dict[str, list[Path]]
    projections: list[Path]
    unreadable: list[Path]


def folder_images(folder: str | os.PathLike[str]) -> FolderImages:
    """Sort the images directly inside ``folder`` into volume series and projection images
    (links and non-DICOM files are left for :func:`scan_series` to report)."""
    import pydicom

    series: dict[str, list[Path]] = {}
    projections: list[Path] = []
    unreadable: list[Path] = []
    root = Path(folder)
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        path = root / entry.name
        if entry.name.startswith(".") or path_problem(path) is not None or not is_dicom_file(path):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tags = ["SeriesInstanceUID", "SOPClassUID", "Rows", "ImagePositionPatient"]
                ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=tags)
        except Exception:
            unreadable.append(path)
            continue
        if "Rows" not in ds or str(ds.get("SOPClassUID", "")) == _DICOMDIR_SOP:
            continue
        if ds.get("ImagePositionPatient") in (None, ""):
            projections.append(path)
        else:
            series.setdefault(str(ds.get("SeriesInstanceUID", "") or ""), []).append(path)
    return FolderImages(series, projections, unreadable)
