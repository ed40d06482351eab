"""Read a DICOM series (a folder of slices) after checking its geometry from every slice's header.

GDCM alone sorts whatever files it can read and averages the spacing: a missing slice, two slices
at one position, irregular spacing or a truncated file all gave a volume with slices in the
wrong place, and files it could not open (a broken symbolic link, a link loop, a truncated file)
simply vanished from the series. Here every file in the folder is accounted for first
(:mod:`medclust.io.dicom_headers` finds the files and reads each header):

- every entry that is not hidden must open (a broken symbolic link or a link loop is an error,
  not a missing slice), every DICOM file must parse, and its pixel data must be complete
  (the declared length fits in the file and covers rows x columns x bits);
- the slices must form one series (``SeriesInstanceUID``; pick one with ``series_uid``) with one
  orientation (``ImageOrientationPatient``), one size and one valid ``PixelSpacing``;
- positions along the slice normal (``ImageOrientationPatient`` row x column, dotted with
  ``ImagePositionPatient``) must be unique and lie on a regular grid within
  ``GRID_TOLERANCE`` of the spacing, and each position must lie on the line along the normal
  through the first one (a gantry-tilted or shifted stack is refused: its slices are not where
  the affine would put them).

A series with missing slices or irregular spacing raises :class:`DicomGapError` (a
:class:`BadInputError`), unless ``resample_gaps`` is set: then the volume is linearly
interpolated along the normal onto a regular grid at the series' spacing, from the true slice
positions. Everything else wrong is a plain :class:`BadInputError`. The voxels are read by
SimpleITK (GDCM: every transfer syntax, rescale slope/intercept applied; float32 when the
slices' rescales differ or are not integral) from the checked file list in position order, or,
with ``unscaled`` (preprocessing), for an uncompressed 16-bit series by
:mod:`medclust.io.dicom_pixels` in one NumPy pass that also hashes the folder; the affine comes
from the headers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from medclust.errors import BadInputError
from medclust.io.dicom_headers import SliceHeader, candidate_files, read_slice_header
from medclust.io.header_checks import check_voxel_count
from medclust.io.image import (
    ImageData,
    check_affine,
    dicom_affine_ras,
    format_number,
    read_failure,
    sitk_array_view,
)

# Two slices closer than this (mm) along the normal are at the same position.
DUPLICATE_TOLERANCE_MM = 0.01
# A slice may sit this fraction of the spacing off the regular grid (header positions rounded to
# 0.1 mm stay well inside; a slice a tenth of a slice off is not).
GRID_TOLERANCE = 0.1
# Direction cosines of two slices that agree to this are one orientation.
ORIENTATION_TOLERANCE = 1e-3
# A slice may sit this fraction of the pixel spacing off the line through the first slice along the
# normal, and at least IN_PLANE_TOLERANCE_MM: positions rounded to 0.1 mm in an oblique series
# differ in-plane by up to ~0.09 mm, while a 1 degree gantry tilt at 2.5 mm steps moves a
# 20-slice series 0.9 mm.
IN_PLANE_TOLERANCE = 0.1
IN_PLANE_TOLERANCE_MM = 0.1
class DicomGapError(BadInputError):
    """A series with missing slices or irregular slice spacing.

    It can still be used by resampling it onto a regular grid at its true slice positions
    (``resample_gaps=True``; the config's ``dicom_gaps: resample``).
    """


@dataclass
class SeriesLayout:
    """The checked geometry of one series: slice files in position order and the grid they form.

    Attributes:
        folder: the series folder.
        series_uid: its SeriesInstanceUID.
        files: slice files sorted by position along the normal.
        offsets_mm: each file's position along the normal (mm, LPS), ascending.
        row_dir, col_dir, normal: unit vectors (LPS) of the image rows, columns and slice normal.
        pixel_spacing: (between rows, between columns) in mm, as DICOM orders it.
        step_mm: slice spacing of the regular grid.
        rows, columns: pixel matrix of every slice.
        modality: CT, MR or XR from the header, if known.
        gap: missing slices or irregular spacing, in words; None for a regular series.
    """

    folder: str
    series_uid: str
    files: list[str]
    offsets_mm: np.ndarray
    row_dir: np.ndarray
    col_dir: np.ndarray
    normal: np.ndarray
    origin_lps: np.ndarray
    pixel_spacing: tuple[float, float]
    step_mm: float
    rows: int
    columns: int
    modality: str | None
    gap: str | None = None
    headers: list[SliceHeader] | None = None  # in the order of ``files``

    def regular_offsets(self) -> np.ndarray:
        """Positions (mm along the normal) of the regular grid from the first to the last slice."""
        span = float(self.offsets_mm[-1] - self.offsets_mm[0])
        count = int(round(span / self.step_mm)) + 1 if len(self.files) > 1 else 1
        return self.offsets_mm[0] + self.step_mm * np.arange(count)

    def affine_ras(self) -> np.ndarray:
        """Voxel (column, row, slice) -> RAS mm of the regular grid."""
        return dicom_affine_ras(self.row_dir, self.col_dir, self.normal, self.pixel_spacing, self.step_mm, self.origin_lps)


def _one_series(headers: list[SliceHeader], folder: str | os.PathLike[str], series_uid: str | None) -> list[SliceHeader]:
    uids = sorted({h.series_uid for h in headers})
    if series_uid is None:
        if len(uids) > 1:
            raise BadInputError(
                folder,
                f"{len(uids)} DICOM series in one folder ({', '.join(uids)}): give each its own manifest row "
                "with the series in the `series_uid` column, or use `format: dicom` (one case per series)",
            )
        series_uid = uids[0]
    elif series_uid not in uids:
        raise BadInputError(folder, f"DICOM series {series_uid} not found in the folder (it holds {', '.join(uids)})")
    return [h for h in headers if h.series_uid == series_uid]


def _cosines(orientation: np.ndarray) -> list[float]:
    return [round(float(v), 4) + 0.0 for v in orientation]  # + 0.0: no "-0.0"


def _common_geometry(slices: list[SliceHeader], folder: str | os.PathLike[str]) -> tuple[np.ndarray, tuple[float, float]]:
    """One orientation, size and pixel spacing for every slice; returns (orientation, spacing)."""
    first = slices[0]
    for h in slices:
        if h.frames > 1:
            raise BadInputError(folder, f"{h.path.name} is a multi-frame DICOM ({h.frames} frames); convert it to NIfTI")
        if h.position is None or h.orientation is None:
            raise BadInputError(
                folder,
                f"slice file {h.path.name} has no ImagePositionPatient/ImageOrientationPatient: "
                "its place in the volume is unknown",
            )
        if not (np.isfinite(h.position).all() and np.isfinite(h.orientation).all()):
            raise BadInputError(folder, f"slice file {h.path.name}: ImagePositionPatient/ImageOrientationPatient are not numbers")
    row, col = first.orientation[:3], first.orientation[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-2 or abs(np.linalg.norm(col) - 1) > 1e-2 or abs(row @ col) > 1e-2:
        raise BadInputError(
            folder,
            f"invalid geometry: ImageOrientationPatient {_cosines(first.orientation)} of {first.path.name} "
            "is not two perpendicular unit vectors",
        )
    for h in slices[1:]:
        if np.abs(h.orientation - first.orientation).max() > ORIENTATION_TOLERANCE:
            raise BadInputError(
                folder,
                f"slices with different orientations in one series: {first.path.name} {_cosines(first.orientation)}, "
                f"{h.path.name} {_cosines(h.orientation)}",
            )
        if (h.rows, h.columns) != (first.rows, first.columns):
            raise BadInputError(
                folder,
                f"slices of different sizes in one series: {first.path.name} {first.columns}x{first.rows}, "
                f"{h.path.name} {h.columns}x{h.rows}",
            )
    if first.pixel_spacing is None:
        raise BadInputError(folder, f"{first.path.name} has no PixelSpacing: the voxel size is unknown")
    for h in slices:
        spacing = h.pixel_spacing
        if spacing is None or not all(np.isfinite(v) and v > 0 for v in spacing):
            shown = "\\".join(format_number(v) for v in spacing) if spacing else "missing"
            raise BadInputError(folder, f"invalid geometry: PixelSpacing {shown} mm in {h.path.name} (each must be a positive number)")
        if not np.allclose(spacing, first.pixel_spacing, rtol=1e-4, atol=1e-6):
            raise BadInputError(folder, f"slices with different PixelSpacing in one series: {first.path.name}, {h.path.name}")
    return first.orientation, (float(first.pixel_spacing[0]), float(first.pixel_spacing[1]))


def _check_in_plane(
    slices: list[SliceHeader], normal: np.ndarray, pixel_spacing: tuple[float, float], folder: str | os.PathLike[str]
) -> None:
    """Every slice position on the line through the first one along the slice normal.

    The volume's affine places slice k at first position + normal * step * k, so a position with
    an in-plane component (gantry tilt, a stack shifted by the table) would put its slice in the
    wrong place.

    Raises:
        BadInputError: a slice lies in-plane off that line by more than the tolerance.
    """
    first = np.asarray(slices[0].position, dtype=np.float64)
    shift = np.asarray([h.position for h in slices], dtype=np.float64) - first
    in_plane = np.linalg.norm(shift - np.outer(shift @ normal, normal), axis=1)
    tolerance = max(IN_PLANE_TOLERANCE_MM, IN_PLANE_TOLERANCE * min(pixel_spacing))
    worst = int(np.argmax(in_plane))
    if in_plane[worst] > tolerance:
        raise BadInputError(
            folder,
            f"slice positions are not along the slice normal (gantry tilt or shifted stacks: in-plane offset up to "
            f"{in_plane[worst]:.2f} mm, {slices[worst].path.name} from {slices[0].path.name}); "
            "resample it to an orthogonal grid first",
        )


def _grid(
    offsets: np.ndarray, names: list[str], folder: str | os.PathLike[str], thickness: float | None
) -> tuple[float, str | None]:
    """Slice spacing of the series and, if it is not regular, what is wrong (in words).

    Raises:
        BadInputError: two slices at one position.
    """
    if len(offsets) == 1:
        return (thickness if thickness and thickness > 0 else 1.0), None
    diffs = np.diff(offsets)
    same = np.flatnonzero(diffs < DUPLICATE_TOLERANCE_MM)
    if same.size:
        i = int(same[0])
        raise BadInputError(
            folder,
            f"{same.size} duplicate slice position(s): {names[i]} and {names[i + 1]} are both at "
            f"{offsets[i]:.2f} mm along the slice normal",
        )
    step = float(np.median(diffs))
    index = np.rint((offsets - offsets[0]) / step).astype(np.int64)
    fitted = float(index @ (offsets - offsets[0]) / max(float(index @ index), 1.0))
    residual = np.abs(offsets - offsets[0] - index * fitted)
    tolerance = max(DUPLICATE_TOLERANCE_MM, GRID_TOLERANCE * step)
    if (np.diff(index) < 1).any() or residual.max() > tolerance:
        worst = int(np.argmax(residual))
        return step, (
            f"irregular slice spacing: slices are {diffs.min():.3g} to {diffs.max():.3g} mm apart ({names[worst]} lies "
            f"{residual[worst]:.2f} mm off the closest regular grid, {fitted:.3g} mm apart)"
        )
    missing = int(index[-1]) + 1 - len(offsets)
    if missing:
        i = int(np.flatnonzero(np.diff(index) > 1)[0])
        return fitted, (
            f"{missing} missing slice(s): a gap of {diffs[i]:.3g} mm between {names[i]} and {names[i + 1]} "
            f"({offsets[i]:.2f} and {offsets[i + 1]:.2f} mm along the slice normal) in a series {fitted:.3g} mm apart"
        )
    return fitted, None


def scan_series(folder: str | os.PathLike[str], series_uid: str | None = None) -> SeriesLayout:
    """Check every slice header of a series folder and work out its grid.

    Args:
        folder: the folder holding the slices.
        series_uid: the series to take when the folder holds several.

    Returns:
        The layout; ``gap`` describes missing slices or irregular spacing (not raised here).

    Raises:
        BadInputError: unreadable/truncated files, broken links, several series, mixed
            orientations or sizes, invalid spacing, duplicate positions, positions off the slice
            normal (gantry tilt).
    """
    headers = [h for h in (read_slice_header(p, folder) for p in candidate_files(folder)) if h is not None]
    if not headers:
        raise BadInputError(folder, "no DICOM images found in the folder")
    slices = _one_series(headers, folder, series_uid)
    orientation, pixel_spacing = _common_geometry(slices, folder)
    row, col = orientation[:3] / np.linalg.norm(orientation[:3]), orientation[3:] / np.linalg.norm(orientation[3:])
    normal = np.cross(row, col)
    offsets = np.asarray([float(h.position @ normal) for h in slices])  # type: ignore[operator]
    order = np.argsort(offsets, kind="stable")
    slices = [slices[i] for i in order]
    offsets = offsets[order]
    names = [h.path.name for h in slices]
    _check_in_plane(slices, normal, pixel_spacing, folder)
    step, gap = _grid(offsets, names, folder, slices[0].thickness)
    return SeriesLayout(
        folder=str(folder),
        series_uid=slices[0].series_uid,
        files=[str(h.path) for h in slices],
        offsets_mm=offsets,
        row_dir=row,
        col_dir=col,
        normal=normal,
        origin_lps=np.asarray(slices[0].position, dtype=np.float64),
        pixel_spacing=pixel_spacing,
        step_mm=step,
        rows=slices[0].rows,
        columns=slices[0].columns,
        modality=next((h.modality for h in slices if h.modality), None),
        gap=gap,
        headers=slices,
    )


def _interpolate(array: np.ndarray, offsets: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Linear interpolation of (x, y, k) slices at ``offsets`` onto ``targets`` along k."""
    lower = np.clip(np.searchsorted(offsets, targets, side="right") - 1, 0, len(offsets) - 2)
    weight = np.clip((targets - offsets[lower]) / (offsets[lower + 1] - offsets[lower]), 0.0, 1.0)
    out = np.empty((*array.shape[:2], len(targets)), dtype=np.float32)
    for j, (i, w) in enumerate(zip(lower, weight)):
        out[..., j] = (1.0 - w) * array[..., i] + w * array[..., i + 1]
    return out


def read_dicom_series(
    folder: str | os.PathLike[str],
    series_uid: str | None = None,
    *,
    resample_gaps: bool = False,
    max_voxels: int | None = None,
    unscaled: bool = False,
) -> ImageData:
    """Read one DICOM series (a folder of slices) as a volume, after :func:`scan_series`.

    Args:
        folder: folder holding the slices of the series.
        series_uid: which series, if the folder holds several (default: the only one).
        resample_gaps: resample a series with missing slices or irregular spacing onto a
            regular grid at its true positions (float32) instead of raising.
        max_voxels: the most voxels accepted (None: no limit).
        unscaled: for an uncompressed, regular series: the stored values, read with NumPy in one
            pass over the folder that also hashes it (``meta["sha256"]``, as
            :func:`medclust.preprocess.pipeline.source_sha256`), and ``meta["intensity_scale"]``
            (rescale slope, intercept) to apply; other series are read by SimpleITK as usual.

    Returns:
        The volume in x, y, z index order with its RAS affine; ``modality`` from the header;
        ``meta``: ``num_files``, ``series_uid`` and, if resampled, ``resampled`` (what and why).

    Raises:
        DicomGapError: missing slices or irregular spacing and ``resample_gaps`` is False.
        BadInputError: anything else :func:`scan_series` refuses, or an unreadable volume.
    """
    import SimpleITK as sitk

    layout = scan_series(folder, series_uid)
    if layout.gap is not None and not resample_gaps:
        raise DicomGapError(folder, f"{layout.gap} (dicom_gaps: resample interpolates it onto a regular grid)")
    targets = layout.regular_offsets()
    check_voxel_count(folder, (layout.columns, layout.rows, max(len(targets), len(layout.files))), max_voxels)
    if unscaled and layout.gap is None:
        from medclust.io.dicom_pixels import read_stored_values

        stored = read_stored_values(layout)
        if stored is not None:
            array, meta = stored
            while array.ndim > 2 and array.shape[-1] == 1:  # a one-slice series is a 2D image
                array = array[..., 0]
            affine = layout.affine_ras()
            check_affine(affine, folder, array.ndim)
            return ImageData(array=array, affine=affine, path=str(folder), kind="dicom_series", modality=layout.modality,
                             meta={"num_files": len(layout.files), "series_uid": layout.series_uid, **meta})
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(layout.files)
    rescales = {h.rescale for h in layout.headers or []}
    if len(rescales) > 1 or any(slope != 1.0 or not intercept.is_integer() for slope, intercept in rescales):
        # GDCM picks the output type from the first file's rescale alone, so a later slice with
        # another slope/intercept is truncated or wraps around in that integer type (float32
        # holds any CT/MR value to its rounding)
        reader.SetOutputPixelType(sitk.sitkFloat32)
    warn = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK's "non uniform sampling" is handled here
    try:
        image = reader.Execute()
    except Exception as err:
        raise read_failure(folder, err) from err
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warn)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise BadInputError(folder, f"{image.GetNumberOfComponentsPerPixel()}-component (colour) series is not supported")
    array = sitk_array_view(image)  # (x, y, z) view of the buffer, which it keeps alive
    if array.ndim == 2:
        array = array[..., None]
    if array.shape != (layout.columns, layout.rows, len(layout.files)):
        expected = f"{len(layout.files)} slices of {layout.columns}x{layout.rows}"
        raise BadInputError(folder, f"read {array.shape} voxels from a series of {expected}")
    meta: dict[str, Any] = {"num_files": len(layout.files), "series_uid": layout.series_uid}
    if layout.gap is not None:
        array = _interpolate(array, layout.offsets_mm, targets)
        meta["resampled"] = f"resampled onto {len(targets)} regular slices {layout.step_mm:.3g} mm apart: {layout.gap}"
    while array.ndim > 2 and array.shape[-1] == 1:  # a one-slice series is a 2D image
        array = array[..., 0]
    affine = layout.affine_ras()
    check_affine(affine, folder, array.ndim)
    return ImageData(array=array, affine=affine, path=str(folder), kind="dicom_series", modality=layout.modality, meta=meta)


__all__ = ["DUPLICATE_TOLERANCE_MM", "GRID_TOLERANCE", "DicomGapError", "SeriesLayout", "read_dicom_series", "scan_series"]
