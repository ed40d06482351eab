"""Load any supported image into one in-memory form: a voxel array plus its RAS affine.

Supported inputs:

- 3D volumes: NIfTI (``.nii``, ``.nii.gz``) via nibabel; MetaImage/NRRD (``.mha``, ``.mhd``,
  ``.nrrd``) via SimpleITK; a DICOM series (a folder) via :mod:`medclust.io.dicom_series`
  (every slice's header is checked: one series, one orientation, positions along the slice
  normal unique and regular; GDCM applies the rescale slope/intercept, so CT is in HU).
- 2D images: PNG/JPEG/BMP/TIFF via Pillow (colour is converted to luminance, except in a label
  map, whose palette indices are its classes; a multi-page file is refused) and single-frame
  DICOM via pydicom (modality LUT applied, ``MONOCHROME1`` inverted so that bright = dense).

Every reader returns :class:`ImageData`: ``array`` in the file's own voxel order (x, y, z for
volumes) and ``affine``, the 4x4 matrix mapping a voxel index to RAS world millimetres (DICOM's
LPS is converted). 2D images follow MONAI's convention (as ``LoadImage`` with the PIL/ITK
readers and a 2D NIfTI): axis 0 is the image column (x), axis 1 the row from the top (y), so
``array.T`` is the picture as displayed. Trailing singleton axes are dropped, so a
``(X, Y, Z, 1)`` NIfTI is 3D and an ``(X, Y, 1)`` one is 2D.

NIfTI is read with nibabel directly rather than through MONAI ``LoadImage``: ``LoadImage``'s
``NibabelReader`` makes a C-ordered float32 copy of the whole volume, which on a 512x512x133 CT
costs as much as the rest of preprocessing together. Here the on-disk dtype and memory order are
kept; :mod:`medclust.preprocess.pipeline` converts once, after downsampling.

Before any voxel is read, what the header claims is checked against the file and against
``max_voxels`` (:mod:`medclust.io.header_checks`), and every affine is checked to be a geometry
(finite, no zero voxel size, not singular): a broken header is one line naming the file and the
reason, never a multi-gigabyte allocation or a crash later in preprocessing.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from medclust.errors import BadInputError
from medclust.io.dicom_headers import DICOM_SUFFIXES, header_number, is_dicom_file, modality_from_tag
from medclust.io.dicom_series import read_dicom_series
from medclust.io.header_checks import check_itk_file, check_nifti_file, check_voxel_count
from medclust.io.image import (
    LPS_TO_RAS,
    ImageData,
    check_affine,
    dicom_affine_ras,
    format_number,
    path_problem,
    read_failure,
    sitk_array_view,
    squeeze_trailing,
)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
IMAGE_2D_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# Compressed NIfTI files up to this size are read into memory whole (see read_nifti).
_WHOLE_FILE_LIMIT = 1 << 30


def _lower_name(path: str | os.PathLike[str]) -> str:
    return Path(path).name.lower()


def image_kind(path: str | os.PathLike[str]) -> str:
    """Which reader handles ``path``: nifti, itk, dicom_series, dicom or image.

    Raises:
        BadInputError: the path does not exist or has no supported format.
    """
    p = Path(path)
    problem = path_problem(p)
    if problem is not None:
        raise BadInputError(path, problem)
    if p.is_dir():
        return "dicom_series"
    name = _lower_name(p)
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(ITK_SUFFIXES):
        return "itk"
    if name.endswith(IMAGE_2D_SUFFIXES):
        return "image"
    if is_dicom_file(p):
        return "dicom"
    raise BadInputError(
        path,
        "unsupported file type (expected NIfTI .nii/.nii.gz, .mha/.nrrd, PNG/JPEG/TIFF, DICOM "
        "or a DICOM series folder)",
    )


def read_nifti(path: str | os.PathLike[str], max_voxels: int | None = None, unscaled: bool = False) -> ImageData:
    """Read a NIfTI file, keeping its on-disk dtype (scaled to float only if it has a slope).

    A ``.nii.gz`` up to ``_WHOLE_FILE_LIMIT`` bytes is read in one go, hashed (``meta["sha256"]``)
    and decompressed in one call, which is faster than nibabel's streaming ``GzipFile`` and
    spares a second pass over the file for the checksum.

    Args:
        path: ``.nii`` or ``.nii.gz`` file.
        max_voxels: the most voxels accepted (None: no limit); checked on the header first.
        unscaled: return the stored values and put ``(slope, intercept)`` in
            ``meta["intensity_scale"]`` (when the header sets them) instead of nibabel's float64
            copy of the whole volume (a 512x512x133 CT: 280 MB and ~0.3 s); the caller applies
            them (preprocessing does, per slab in float32).

    Returns:
        The image; ``array`` is the (Fortran-ordered) voxel array in x, y, z order.

    Raises:
        BadInputError: empty, not NIfTI, truncated, too large, invalid geometry, or more than 3D.
    """
    import nibabel as nib

    check_nifti_file(path, max_voxels)
    meta: dict[str, Any] = {}
    try:
        if _lower_name(path).endswith(".gz") and os.path.getsize(path) <= _WHOLE_FILE_LIMIT:
            raw = Path(path).read_bytes()
            meta["sha256"] = hashlib.sha256(raw).hexdigest()
            img = nib.Nifti1Image.from_bytes(gzip.decompress(raw))
            del raw
        else:
            img = nib.load(str(path))
        # asanyarray applies scl_slope/inter only when they are set; otherwise it is the raw
        # dtype with no float copy.
        proxy = img.dataobj
        slope, inter = float(getattr(proxy, "slope", 1.0)), float(getattr(proxy, "inter", 0.0))
        if unscaled and (slope, inter) != (1.0, 0.0) and hasattr(proxy, "get_unscaled"):
            array = proxy.get_unscaled()
            meta["intensity_scale"] = [slope, inter]
        else:
            array = np.asanyarray(proxy)
        affine = np.asarray(img.affine, dtype=np.float64)
    except BadInputError:
        raise
    except Exception as err:  # nibabel/gzip raise many types for corrupt input
        raise read_failure(path, err) from err
    array = squeeze_trailing(array, path)
    check_affine(affine, path, array.ndim)
    return ImageData(array=array, affine=affine, path=str(path), kind="nifti", meta=meta)


def _sitk_affine_ras(image: Any) -> np.ndarray:
    """RAS affine (x, y, z index order) of a SimpleITK image (which is LPS)."""
    ndim = image.GetDimension()
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(ndim, ndim)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    origin = np.asarray(image.GetOrigin(), dtype=np.float64)
    lps = np.eye(4)
    lps[:ndim, :ndim] = direction * spacing[None, :]
    lps[:ndim, 3] = origin
    return LPS_TO_RAS @ lps


def _from_sitk(image: Any, path: str | os.PathLike[str], kind: str, modality: str | None) -> ImageData:
    if image.GetNumberOfComponentsPerPixel() != 1:
        components = image.GetNumberOfComponentsPerPixel()
        raise BadInputError(path, f"{components}-component (vector/colour) volume is not supported")
    # SimpleITK arrays are (z, y, x) C-ordered; the transpose is an x, y, z view of the image's
    # own buffer (no copy of the volume) that keeps the image alive.
    array = sitk_array_view(image)
    affine = _sitk_affine_ras(image)
    if image.GetDimension() == 2:
        full = np.eye(4)
        full[:2, :2] = affine[:2, :2]
        full[:2, 3] = affine[:2, 3]
        affine = full
    if image.GetDimension() > 3:
        raise BadInputError(path, f"{image.GetDimension()}D image: only 2D images and 3D volumes are supported")
    array = squeeze_trailing(array, path)
    check_affine(affine, path, array.ndim)
    return ImageData(array=array, affine=affine, path=str(path), kind=kind, modality=modality)


def read_itk(path: str | os.PathLike[str], max_voxels: int | None = None) -> ImageData:
    """Read a MetaImage or NRRD image with SimpleITK, after checking its header against the file.

    Args:
        path: ``.mha``, ``.mhd``, ``.nrrd`` or ``.nhdr``.
        max_voxels: the most voxels accepted (None: no limit).

    Raises:
        BadInputError: unreadable, truncated, too large, invalid geometry, or more than 3D.
    """
    import SimpleITK as sitk

    check_itk_file(path, max_voxels)
    try:
        image = sitk.ReadImage(str(path))
    except Exception as err:
        raise read_failure(path, err) from err
    return _from_sitk(image, path, "itk", None)


def read_dicom_2d(
    path: str | os.PathLike[str],
    max_voxels: int | None = None,
    assume_spacing: Sequence[float] | None = None,
) -> ImageData:
    """Read a single-frame DICOM image (radiograph) with pydicom.

    The modality LUT (rescale slope/intercept) is applied and ``MONOCHROME1`` images are
    inverted (``min + max - value``) so that, as for ``MONOCHROME2``, larger means brighter.
    Pixel spacing comes from ``PixelSpacing`` or, for projection radiographs,
    ``ImagerPixelSpacing`` (row spacing first); ``assume_spacing`` (else 1 mm) if neither is
    present. A spacing that is present but negative or not a number is an error, not 1 mm; an
    all-zero one (an uncalibrated detector, e.g. pydicom's RG1_UNCR.dcm) is an error unless
    the dataset declares ``assume_pixel_spacing``, which is then used and recorded as the
    spacing source.

    Args:
        path: the DICOM file.
        max_voxels: the most pixels accepted (None: no limit), checked before decoding.
        assume_spacing: (row, column) mm to use when the header records no usable spacing.

    Raises:
        BadInputError: unreadable, truncated, no pixel data, multi-frame, more than
            ``max_voxels`` pixels, an invalid pixel spacing, or a NumberOfFrames or rescale
            value that is not a number.
    """
    import pydicom
    from pydicom.pixels import apply_modality_lut

    if os.path.getsize(path) == 0:
        raise BadInputError(path, "empty image file (0 bytes)")
    try:
        ds = pydicom.dcmread(str(path))
    except Exception as err:
        raise read_failure(path, err) from err
    if "PixelData" not in ds:
        raise BadInputError(path, "DICOM file without pixel data (not an image)")
    # checked here: int() and apply_modality_lut fail on '3x' with a traceback naming no file
    frames = header_number(ds, "NumberOfFrames", int, path) or 1
    header_number(ds, "RescaleSlope", float, path)
    header_number(ds, "RescaleIntercept", float, path)
    if frames > 1:
        raise BadInputError(path, f"multi-frame DICOM ({frames} frames) is not supported; convert it to NIfTI")
    check_voxel_count(path, (int(getattr(ds, "Columns", 0) or 0), int(getattr(ds, "Rows", 0) or 0)), max_voxels)
    try:
        pixels = ds.pixel_array
    except Exception as err:
        raise read_failure(path, err) from err
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    if samples > 1:
        pixels = pixels[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    else:
        try:
            pixels = apply_modality_lut(pixels, ds)
        except (TypeError, ValueError) as err:  # a malformed modality LUT sequence
            raise read_failure(path, err) from err
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "MONOCHROME1":
        # min + max - x keeps the value range and dtype meaning; percentile scaling follows.
        lo, hi = pixels.min(), pixels.max()
        pixels = (np.asarray(hi, dtype=np.float64) + lo - pixels.astype(np.float64)).astype(np.float32)
    spacing = None
    for key in ("PixelSpacing", "ImagerPixelSpacing"):
        value = getattr(ds, key, None)
        if value is None or value == "":
            continue
        items = [value] if isinstance(value, (str, bytes, int, float)) else list(value)
        try:
            numbers = [float(v) for v in items]
        except (TypeError, ValueError):
            numbers = []
        if len(numbers) == 2 and all(v == 0 for v in numbers):
            if assume_spacing is None:
                raise BadInputError(
                    path,
                    f"invalid geometry: {key} 0\\0 mm (an uncalibrated detector: its pixel size is unknown); "
                    "set the dataset's assume_pixel_spacing to accept it",
                )
            spacing_source = f"assume_pixel_spacing (header {key} 0\\0)"
            spacing = (float(assume_spacing[0]), float(assume_spacing[1]))
            break
        if len(numbers) != 2 or not all(np.isfinite(v) and v > 0 for v in numbers):
            shown = "\\".join(format_number(v) for v in numbers) if numbers else repr(str(value))
            raise BadInputError(path, f"invalid geometry: {key} {shown} mm (each must be a positive number)")
        spacing = (numbers[0], numbers[1])
        spacing_source = key
        break
    if spacing is None and assume_spacing is not None:
        spacing, spacing_source = (float(assume_spacing[0]), float(assume_spacing[1])), "assume_pixel_spacing"
    elif spacing is None:
        spacing, spacing_source = (1.0, 1.0), "default 1 mm"
    # (row, column) pixel matrix -> MONAI's (x = column, y = row); DICOM spacing is row-first.
    affine = np.diag([spacing[1], spacing[0], 1.0, 1.0])
    array = squeeze_trailing(np.asarray(pixels).T, path)
    modality = modality_from_tag(getattr(ds, "Modality", None))
    if modality in ("CT", "MR"):
        # one slice of a volume: placed in the patient frame like a series' slices (a radiograph
        # has no such frame), so preprocessing orients it as it orients the model's volumes
        affine = _slice_affine(ds, spacing, affine)
    meta = {"photometric": photometric, "spacing_source": spacing_source}
    return ImageData(array=array, affine=affine, path=str(path), kind="dicom", modality=modality, meta=meta)


def _slice_affine(ds: Any, spacing: tuple[float, float], fallback: np.ndarray) -> np.ndarray:
    """RAS affine of a CT/MR slice from ``ImagePositionPatient``/``ImageOrientationPatient``, built
    as a series' (:func:`~medclust.io.image.dicom_affine_ras`; slice thickness, or 1 mm, along the
    normal); ``fallback`` when either is missing or unusable."""
    try:
        position = np.asarray([float(v) for v in ds.ImagePositionPatient], dtype=np.float64)
        cosines = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
        thickness = float(getattr(ds, "SliceThickness", None) or 1.0)
    except (AttributeError, TypeError, ValueError):
        return fallback
    if position.size != 3 or cosines.size != 6 or not (np.isfinite(position).all() and np.isfinite(cosines).all()):
        return fallback
    row_dir, col_dir = cosines[:3], cosines[3:]
    normal = np.cross(row_dir, col_dir)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3) or not thickness > 0:
        return fallback
    return dicom_affine_ras(row_dir, col_dir, normal, spacing, thickness, position)


def _label_pixels(img: Any, path: str | os.PathLike[str]) -> np.ndarray:
    """Class indices of a 2D label image: a palette image's indices, a grey image's values.

    Converting to luminance would turn palette indices 0, 1, 2 into grey levels 0, 76, 150 that
    pass QC as other classes, so a palette is not converted, and a colour image is accepted only
    when it is grey in disguise (all channels equal).

    Raises:
        BadInputError: a colour image whose channels differ.
    """
    if img.mode == "P":
        return np.asarray(img)
    if img.mode == "PA":
        return np.asarray(img)[..., 0]  # the index channel; the alpha says nothing about classes
    if img.mode == "LA":
        return np.asarray(img.getchannel("L"))
    if img.mode in ("RGB", "RGBA", "CMYK", "YCbCr"):
        rgb = np.asarray(img.convert("RGB"))
        if not ((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all()):
            raise BadInputError(path, "colour label image: store class indices as a greyscale or palette PNG")
        return rgb[..., 0]
    return np.asarray(img)


def read_image_2d(path: str | os.PathLike[str], max_voxels: int | None = None, *, label: bool = False) -> ImageData:
    """Read a PNG/JPEG/BMP/TIFF image (grey levels kept; colour converted to luminance).

    Such files carry no reliable physical spacing, so 1 mm per pixel is assumed.

    Args:
        path: the image file.
        max_voxels: the most pixels accepted (None: no limit), checked before decoding.
        label: the file is a label map: palette indices are kept as the class values (not
            converted to grey) and a colour image is refused unless its channels are equal.

    Raises:
        BadInputError: empty, unreadable, more than one page (multi-page TIFF), not a 2D image,
            or, for a label, a colour image.
    """
    from PIL import Image

    if os.path.getsize(path) == 0:
        raise BadInputError(path, "empty image file (0 bytes)")
    try:
        with Image.open(str(path)) as img:
            pages = int(getattr(img, "n_frames", 1))
            if pages > 1:
                # Pillow reads the first page only: the other pages would vanish without a word
                raise BadInputError(
                    path, f"multi-page image ({pages} pages): store each page as its own file, or a volume as NIfTI"
                )
            check_voxel_count(path, tuple(img.size), max_voxels)
            img.load()
            if label:
                pixels = _label_pixels(img, path)
            else:
                if img.mode in ("RGB", "RGBA", "P", "LA", "CMYK", "YCbCr", "PA"):
                    img = img.convert("L")
                pixels = np.asarray(img)
        if pixels.ndim != 2:
            raise BadInputError(path, f"not a single-channel 2D image (shape {pixels.shape})")
    except BadInputError:
        raise
    except Exception as err:
        raise read_failure(path, err) from err
    array = squeeze_trailing(pixels.T, path)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    return ImageData(array=array, affine=affine, path=str(path), kind="image", meta={"spacing_source": "default 1 mm"})


def place_label(label: ImageData, image: ImageData) -> ImageData:
    """A 2D label map from a PNG/JPEG/TIFF/BMP, placed on the pixel grid of its image.

    Such a file has no geometry of its own (1 mm per pixel is assumed), so a mask exported
    beside a DICOM radiograph (0.14-0.2 mm pixels) would never be on the radiograph's grid. When
    the image is 2D and the two pixel grids have the same shape, the mask takes the image's
    affine (recorded in ``meta["spacing_source"]``); anything else is returned unchanged, for
    the grid check to judge.
    """
    if label.kind != "image" or not (label.is_2d and image.is_2d) or label.shape != image.shape:
        return label
    meta = {**label.meta, "spacing_source": f"its image's ({image.meta.get('spacing_source', image.kind)})"}
    return replace(label, affine=np.array(image.affine, dtype=np.float64), meta=meta)


def load_image(
    path: str | os.PathLike[str],
    series_uid: str | None = None,
    *,
    max_voxels: int | None = None,
    resample_gaps: bool = False,
    assume_spacing: Sequence[float] | None = None,
    unscaled: bool = False,
    label: bool = False,
) -> ImageData:
    """Load any supported image (see the module docstring).

    Args:
        path: a file, or a folder holding one DICOM series.
        series_uid: DICOM series to read when the folder holds several.
        max_voxels: the most voxels accepted, checked on the header before reading (None: no
            limit).
        resample_gaps: a DICOM series with missing slices or irregular spacing is resampled
            onto a regular grid at its true slice positions instead of being refused.
        assume_spacing: (row, column) mm for a single-frame DICOM whose header records no
            usable pixel spacing (the dataset's ``assume_pixel_spacing``).
        unscaled: NIfTI and uncompressed DICOM series: stored values plus
            ``meta["intensity_scale"]`` (see :func:`read_nifti`, :func:`read_dicom_series`).
        label: the file is a label map: a PNG/TIFF keeps its palette indices as class values
            (see :func:`read_image_2d`); every other format is read as usual.

    Returns:
        The image with its RAS affine.

    Raises:
        BadInputError: missing, unsupported, unreadable, truncated, too large, invalid geometry
            or more than 3D (:class:`~medclust.io.dicom_series.DicomGapError` for a series
            with gaps when ``resample_gaps`` is False).
    """
    kind = image_kind(path)
    if kind == "nifti":
        return read_nifti(path, max_voxels, unscaled=unscaled)
    if kind == "itk":
        return read_itk(path, max_voxels)
    if kind == "dicom_series":
        return read_dicom_series(path, series_uid, resample_gaps=resample_gaps, max_voxels=max_voxels, unscaled=unscaled)
    if kind == "dicom":
        return read_dicom_2d(path, max_voxels, assume_spacing)
    return read_image_2d(path, max_voxels, label=label)


__all__ = [
    "DICOM_SUFFIXES",
    "IMAGE_2D_SUFFIXES",
    "ITK_SUFFIXES",
    "NIFTI_SUFFIXES",
    "ImageData",
    "image_kind",
    "is_dicom_file",
    "load_image",
    "place_label",
    "read_dicom_2d",
    "read_dicom_series",
    "read_image_2d",
    "read_itk",
    "read_nifti",
]
