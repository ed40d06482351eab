"""The in-memory image every reader returns, and the checks every reader applies to it.

:class:`ImageData` is a voxel array plus its 4x4 voxel -> RAS affine. The helpers here turn the
ways an input can be broken into one-line :class:`~medclust.errors.BadInputError` reasons a
person who did not write the code can act on: a path that is a broken symbolic link or a link
loop (not "file not found"), an affine that is not a usable geometry (zero, NaN, singular), a
library exception reduced to its informative line.
"""

from __future__ import annotations

import errno
import gzip
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medclust.errors import BadInputError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Below this (mm) a voxel size is zero for all practical purposes (no scanner resolves 1 nm).
MIN_VOXEL_SIZE_MM = 1e-6


@dataclass
class ImageData:
    """One image as loaded.

    Attributes:
        array: voxel values in the file's own index order, trailing singleton axes removed;
            2 dims (column, row) for a 2D image, 3 dims (x, y, z) for a volume.
        affine: 4x4 voxel-index -> RAS world (mm) matrix for that index order (for a 2D image
            the third index is the constant 0).
        path: the file or folder read.
        kind: ``nifti``, ``itk``, ``dicom_series``, ``dicom`` or ``image``.
        modality: modality read from the file's header (DICOM), if any: CT, MR or XR.
        meta: extra header facts worth recording (e.g. photometric interpretation).
    """

    array: np.ndarray
    affine: np.ndarray
    path: str
    kind: str
    modality: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_2d(self) -> bool:
        """True for a single 2D image (radiograph, photo, single slice)."""
        return self.array.ndim == 2

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along each array axis (lengths of the affine's columns)."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return tuple(float(s) for s in norms[: self.array.ndim])

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of ``array``."""
        return tuple(int(s) for s in self.array.shape)


class _ImageBuffer:
    """Exposes a SimpleITK image's pixel buffer to numpy and keeps the image alive meanwhile.

    ``sitk.GetArrayViewFromImage`` returns a view that does not own the image: once the image is
    garbage-collected the view reads freed memory. A numpy array made from this object holds it
    (and so the image) as its ``base``.
    """

    def __init__(self, image: Any) -> None:
        import SimpleITK as sitk

        self.image = image
        self.__array_interface__ = sitk.GetArrayViewFromImage(image).__array_interface__


def dicom_affine_ras(
    row_dir: np.ndarray, col_dir: np.ndarray, normal: np.ndarray, pixel_spacing: Any, step_mm: float, origin_lps: np.ndarray
) -> np.ndarray:
    """Voxel (column, row, slice) -> RAS mm from DICOM's patient geometry (LPS).

    Args:
        row_dir, col_dir: ``ImageOrientationPatient``'s two direction cosines.
        normal: the slice direction.
        pixel_spacing: ``PixelSpacing`` (row spacing first, as DICOM writes it).
        step_mm: distance between slices along ``normal``.
        origin_lps: ``ImagePositionPatient`` of the first slice.
    """
    lps = np.eye(4)
    lps[:3, 0] = np.asarray(row_dir, dtype=np.float64) * float(pixel_spacing[1])
    lps[:3, 1] = np.asarray(col_dir, dtype=np.float64) * float(pixel_spacing[0])
    lps[:3, 2] = np.asarray(normal, dtype=np.float64) * float(step_mm)
    lps[:3, 3] = origin_lps
    return LPS_TO_RAS @ lps


def sitk_array_view(image: Any) -> np.ndarray:
    """The voxels of a SimpleITK image as an (x, y[, z]) numpy view (no copy) that keeps it alive."""
    return np.asarray(_ImageBuffer(image)).T


def path_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot be opened, in words, or None if it can be.

    Tells a broken symbolic link and a link loop apart from a plain missing file, because the
    remedy differs (fix the link, not the manifest).

    Args:
        path: file or folder.

    Returns:
        ``"file not found"``, ``"broken symbolic link (its target ... does not exist)"``,
        ``"symbolic link loop (...)"``, ``"permission denied"``, another ``os`` reason, or None.
    """
    try:
        os.stat(path)
        return None
    except FileNotFoundError:
        if os.path.islink(path):
            return f"broken symbolic link (its target {os.readlink(path)} does not exist)"
        return "file not found"
    except OSError as err:
        if err.errno == errno.ELOOP:
            target = os.readlink(path) if os.path.islink(path) else "?"
            return f"symbolic link loop (the link points to {target}, which leads back to itself)"
        if err.errno == errno.EACCES:
            return "permission denied"
        return f"cannot open ({err.strerror or err})"


def format_number(value: Any) -> str:
    """A number with as many digits as it needs to be told apart from its neighbours.

    ``2.0000002`` (float32) prints as ``2.0000002``, not ``2`` as ``{:g}`` would.
    """
    value = np.asarray(value).reshape(()).item() if not isinstance(value, np.generic) else value
    if isinstance(value, (np.floating, float)):
        return np.format_float_positional(value, trim="-") if np.isfinite(value) else str(value)
    return str(value)


def squeeze_trailing(array: np.ndarray, path: str | os.PathLike[str]) -> np.ndarray:
    """Drop trailing singleton axes; refuse anything that is still more than 3D.

    Raises:
        BadInputError: more than 3 dimensions, or fewer than 2.
    """
    shape = array.shape
    while array.ndim > 2 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim > 3:
        raise BadInputError(
            path, f"{array.ndim}D image (shape {tuple(shape)}): only 2D images and 3D volumes are supported"
        )
    if array.ndim < 2 or min(array.shape) < 1:
        raise BadInputError(path, f"not an image (shape {tuple(shape)})")
    return array


def check_affine(affine: np.ndarray, path: str | os.PathLike[str], spatial_axes: int = 3) -> None:
    """Refuse a voxel -> world matrix that is not a geometry: non-finite, a zero or negative-length
    voxel axis, or axes that are parallel (singular).

    Args:
        affine: 4x4 matrix (only the first ``spatial_axes`` columns are checked, so a 2D image's
            unused third column does not matter).
        path: named in the error.
        spatial_axes: 2 for a 2D image, 3 for a volume.

    Raises:
        BadInputError: naming the defect.
    """
    affine = np.asarray(affine, dtype=np.float64)
    columns = affine[:3, :spatial_axes]
    if affine.shape != (4, 4) or not np.isfinite(columns).all() or not np.isfinite(affine[:3, 3]).all():
        raise BadInputError(path, "invalid geometry: the affine (voxel -> world matrix) in the header has NaN/Inf values")
    sizes = np.linalg.norm(columns, axis=0)
    if (sizes < MIN_VOXEL_SIZE_MM).any():
        shown = "x".join(format_number(float(s)) for s in sizes)
        raise BadInputError(path, f"invalid geometry: voxel size {shown} mm in the header (a voxel size is zero)")
    unit = columns / sizes
    if spatial_axes == 3:
        volume = abs(float(np.linalg.det(unit)))
    else:
        volume = float(np.linalg.norm(np.cross(unit[:, 0], unit[:, 1])))
    if volume < 1e-3:  # axes within ~0.06 degrees of each other: no real scanner grid
        raise BadInputError(path, "invalid geometry: the affine in the header is singular (two voxel axes point the same way)")


def _itk_reason(text: str) -> str:
    """The informative line of an ITK/SimpleITK exception (the first line is only a source location)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    nrrd = [line for line in lines if line.startswith("[nrrd]")]
    if nrrd:  # teem's innermost complaint is the last one
        return re.sub(r"^\[nrrd\]\s*\w+:\s*", "", nrrd[-1])
    for k, line in enumerate(lines):
        if "ERROR:" in line:
            message = re.sub(r"^.*?ERROR:\s*\w+\(0x[0-9a-f]+\):\s*", "", line)
            rest = " ".join(lines[k + 1 : k + 2])
            return f"{message} {rest}".strip()
    return lines[-1] if lines else text


def read_failure(path: str | os.PathLike[str], err: BaseException) -> BadInputError:
    """One-line :class:`BadInputError` for an exception a reading library raised."""
    text = str(err).strip()
    from_itk = "ITK" in text
    if from_itk:
        text = _itk_reason(text)
    reason = text.splitlines()[0] if text else type(err).__name__
    if isinstance(err, gzip.BadGzipFile):
        return BadInputError(path, f"not an image: not gzip-compressed ({reason})")
    if type(err).__name__ in ("ImageFileError", "InvalidDicomError"):
        return BadInputError(path, f"not an image: {reason[:200]}")
    truncated_words = ("end-of-stream", "damaged", "fread got only", "truncated", "unexpected end")
    if isinstance(err, (EOFError, zlib.error)) or any(word in text.lower() for word in truncated_words):
        return BadInputError(path, f"truncated or corrupt file ({reason[:200]})")
    if from_itk:
        return BadInputError(path, f"cannot read image: {reason[:200]}")
    return BadInputError(path, f"cannot read image ({type(err).__name__}: {reason[:200]})")


def missing_input(path: str | os.PathLike[str], what: str = "file") -> BadInputError | None:
    """The error for an input that cannot be opened (see :func:`path_problem`), or None."""
    problem = path_problem(path)
    if problem is None:
        return None
    if what != "file" and problem == "file not found":
        problem = f"{what} not found"
    elif what != "file":
        problem = f"{what}: {problem}"
    return BadInputError(Path(path), problem)


__all__ = [
    "LPS_TO_RAS",
    "MIN_VOXEL_SIZE_MM",
    "ImageData",
    "check_affine",
    "dicom_affine_ras",
    "format_number",
    "missing_input",
    "path_problem",
    "read_failure",
    "sitk_array_view",
    "squeeze_trailing",
]
