"""Load any supported image into one in-memory form: a voxel array plus its RAS affine.

Supported inputs:

- 3D volumes: NIfTI (``.nii``, ``.nii.gz``) via nibabel; MetaImage/NRRD (``.mha``, ``.mhd``,
  ``.nrrd``) via SimpleITK; a DICOM series (a folder) via SimpleITK's ``ImageSeriesReader``
  (GDCM sorts the slices by position and applies the rescale slope/intercept, so CT is in HU).
- 2D images: PNG/JPEG/BMP/TIFF via Pillow (colour is converted to luminance) and single-frame
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
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medclust.errors import BadInputError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
IMAGE_2D_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DICOM_SUFFIXES = (".dcm", ".dicom")

# DICOM Modality values that are projection radiographs.
_XR_MODALITIES = {"CR", "DX", "RG", "MG", "RF", "XA", "PX", "IO"}
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Compressed NIfTI files up to this size are read into memory whole (see read_nifti).
_WHOLE_FILE_LIMIT = 1 << 30


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


def _lower_name(path: str | os.PathLike[str]) -> str:
    return Path(path).name.lower()


def is_dicom_file(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` is a file with the DICOM suffix or the ``DICM`` preamble marker."""
    path = Path(path)
    if not path.is_file():
        return False
    if _lower_name(path).endswith(DICOM_SUFFIXES):
        return True
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def image_kind(path: str | os.PathLike[str]) -> str:
    """Which reader handles ``path``: nifti, itk, dicom_series, dicom or image.

    Raises:
        BadInputError: the path does not exist or has no supported format.
    """
    p = Path(path)
    if not p.exists():
        raise BadInputError(path, "file not found")
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


def _squeeze_trailing(array: np.ndarray, path: str | os.PathLike[str]) -> np.ndarray:
    """Drop trailing singleton axes; refuse anything that is still more than 3D."""
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


def _read_failure(path: str | os.PathLike[str], err: BaseException) -> BadInputError:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, gzip.BadGzipFile):
        return BadInputError(path, f"not an image: not gzip-compressed ({reason})")
    if type(err).__name__ == "ImageFileError":
        return BadInputError(path, f"not an image: {reason[:200]}")
    if isinstance(err, (EOFError, zlib.error, gzip.BadGzipFile)) or "end-of-stream" in reason or "damaged" in str(err):
        return BadInputError(path, f"truncated or corrupt file ({reason})")
    return BadInputError(path, f"cannot read image ({type(err).__name__}: {reason[:200]})")


def read_nifti(path: str | os.PathLike[str]) -> ImageData:
    """Read a NIfTI file, keeping its on-disk dtype (scaled to float only if it has a slope).

    A ``.nii.gz`` up to ``_WHOLE_FILE_LIMIT`` bytes is read in one go, hashed (``meta["sha256"]``)
    and decompressed in one call, which is faster than nibabel's streaming ``GzipFile`` and
    spares a second pass over the file for the checksum.

    Args:
        path: ``.nii`` or ``.nii.gz`` file.

    Returns:
        The image; ``array`` is the (Fortran-ordered) voxel array in x, y, z order.

    Raises:
        BadInputError: unreadable, truncated, not NIfTI, or more than 3D.
    """
    import nibabel as nib

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
        array = np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
    except BadInputError:
        raise
    except Exception as err:  # nibabel/gzip raise many types for corrupt input
        raise _read_failure(path, err) from err
    array = _squeeze_trailing(array, path)
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
    return _LPS_TO_RAS @ lps


def _from_sitk(image: Any, path: str | os.PathLike[str], kind: str, modality: str | None) -> ImageData:
    import SimpleITK as sitk

    if image.GetNumberOfComponentsPerPixel() != 1:
        components = image.GetNumberOfComponentsPerPixel()
        raise BadInputError(path, f"{components}-component (vector/colour) volume is not supported")
    # SimpleITK arrays are (z, y, x) C-ordered; the transpose is an x, y, z view. A view of the
    # image's own buffer (no copy of the volume): `meta["sitk_image"]` keeps that buffer alive.
    array = sitk.GetArrayViewFromImage(image).T
    affine = _sitk_affine_ras(image)
    if image.GetDimension() == 2:
        full = np.eye(4)
        full[:2, :2] = affine[:2, :2]
        full[:2, 3] = affine[:2, 3]
        affine = full
    if image.GetDimension() > 3:
        raise BadInputError(path, f"{image.GetDimension()}D image: only 2D images and 3D volumes are supported")
    array = _squeeze_trailing(array, path)
    meta = {"sitk_image": image}
    return ImageData(array=array, affine=affine, path=str(path), kind=kind, modality=modality, meta=meta)


def read_itk(path: str | os.PathLike[str]) -> ImageData:
    """Read a single-file image with SimpleITK (MetaImage, NRRD)."""
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except Exception as err:
        raise _read_failure(path, err) from err
    return _from_sitk(image, path, "itk", None)


def dicom_series_ids(folder: str | os.PathLike[str]) -> list[str]:
    """SeriesInstanceUIDs of the DICOM series directly inside ``folder`` (not recursive)."""
    import SimpleITK as sitk

    return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or [])


def _modality_from_tag(value: str | None) -> str | None:
    if not value:
        return None
    value = str(value).upper().strip()
    if value in ("CT", "MR"):
        return value
    if value in _XR_MODALITIES:
        return "XR"
    return None


def read_dicom_series(folder: str | os.PathLike[str], series_uid: str | None = None) -> ImageData:
    """Read one DICOM series (a folder of slices) as a volume.

    Args:
        folder: folder holding the slices of the series.
        series_uid: which series, if the folder holds several (default: the only one).

    Returns:
        The volume in x, y, z index order with its RAS affine; ``modality`` from the header.

    Raises:
        BadInputError: no series, several series and no ``series_uid``, or unreadable slices.
    """
    import SimpleITK as sitk

    ids = dicom_series_ids(folder)
    if not ids:
        raise BadInputError(folder, "no DICOM series found in folder")
    if series_uid is None:
        if len(ids) > 1:
            raise BadInputError(folder, f"{len(ids)} DICOM series in one folder; give the series UID")
        series_uid = ids[0]
    elif series_uid not in ids:
        raise BadInputError(folder, f"DICOM series {series_uid} not found")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except Exception as err:
        raise _read_failure(folder, err) from err
    modality = None
    try:  # one header is enough for the modality (a per-slice metadata pass is not)
        header = sitk.ImageFileReader()
        header.SetFileName(files[0])
        header.ReadImageInformation()
        if header.HasMetaDataKey("0008|0060"):
            modality = _modality_from_tag(header.GetMetaData("0008|0060"))
    except Exception:  # metadata is optional; the volume itself was read
        modality = None
    data = _from_sitk(image, folder, "dicom_series", modality)
    data.meta["num_files"] = len(files)
    data.meta["series_uid"] = series_uid
    return data


def read_dicom_2d(path: str | os.PathLike[str]) -> ImageData:
    """Read a single-frame DICOM image (radiograph) with pydicom.

    The modality LUT (rescale slope/intercept) is applied and ``MONOCHROME1`` images are
    inverted (``min + max - value``) so that, as for ``MONOCHROME2``, larger means brighter.
    Pixel spacing comes from ``PixelSpacing`` or, for projection radiographs,
    ``ImagerPixelSpacing`` (row spacing first); 1 mm if neither is present.

    Raises:
        BadInputError: unreadable, no pixel data, or multi-frame.
    """
    import pydicom
    from pydicom.pixels import apply_modality_lut

    try:
        ds = pydicom.dcmread(str(path))
        pixels = ds.pixel_array
    except Exception as err:
        raise _read_failure(path, err) from err
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        raise BadInputError(path, f"multi-frame DICOM ({frames} frames) is not supported; convert it to NIfTI")
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    if samples > 1:
        pixels = pixels[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    else:
        pixels = apply_modality_lut(pixels, ds)
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "MONOCHROME1":
        # min + max - x keeps the value range and dtype meaning; percentile scaling follows.
        lo, hi = pixels.min(), pixels.max()
        pixels = (np.asarray(hi, dtype=np.float64) + lo - pixels.astype(np.float64)).astype(np.float32)
    spacing = None
    for key in ("PixelSpacing", "ImagerPixelSpacing"):
        value = getattr(ds, key, None)
        if value is not None and len(value) == 2 and all(float(v) > 0 for v in value):
            spacing = (float(value[0]), float(value[1]))
            spacing_source = key
            break
    if spacing is None:
        spacing, spacing_source = (1.0, 1.0), "default 1 mm"
    # (row, column) pixel matrix -> MONAI's (x = column, y = row); DICOM spacing is row-first.
    affine = np.diag([spacing[1], spacing[0], 1.0, 1.0])
    array = _squeeze_trailing(np.asarray(pixels).T, path)
    modality = _modality_from_tag(getattr(ds, "Modality", None))
    meta = {"photometric": photometric, "spacing_source": spacing_source}
    return ImageData(array=array, affine=affine, path=str(path), kind="dicom", modality=modality, meta=meta)


def read_image_2d(path: str | os.PathLike[str]) -> ImageData:
    """Read a PNG/JPEG/BMP/TIFF image (grey levels kept; colour converted to luminance).

    Such files carry no reliable physical spacing, so 1 mm per pixel is assumed.
    """
    from PIL import Image

    try:
        with Image.open(str(path)) as img:
            img.load()
            if img.mode in ("RGB", "RGBA", "P", "LA", "CMYK", "YCbCr", "PA"):
                img = img.convert("L")
            pixels = np.asarray(img)
        if pixels.ndim != 2:
            raise BadInputError(path, f"not a single-channel 2D image (shape {pixels.shape})")
    except BadInputError:
        raise
    except Exception as err:
        raise _read_failure(path, err) from err
    array = _squeeze_trailing(pixels.T, path)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    return ImageData(array=array, affine=affine, path=str(path), kind="image", meta={"spacing_source": "default 1 mm"})


def load_image(path: str | os.PathLike[str], series_uid: str | None = None) -> ImageData:
    """Load any supported image (see the module docstring).

    Args:
        path: a file, or a folder holding one DICOM series.
        series_uid: DICOM series to read when the folder holds several.

    Returns:
        The image with its RAS affine.

    Raises:
        BadInputError: missing, unsupported, unreadable or more than 3D.
    """
    kind = image_kind(path)
    if kind == "nifti":
        return read_nifti(path)
    if kind == "itk":
        return read_itk(path)
    if kind == "dicom_series":
        return read_dicom_series(path, series_uid)
    if kind == "dicom":
        return read_dicom_2d(path)
    return read_image_2d(path)


__all__ = [
    "DICOM_SUFFIXES",
    "IMAGE_2D_SUFFIXES",
    "ITK_SUFFIXES",
    "NIFTI_SUFFIXES",
    "ImageData",
    "dicom_series_ids",
    "image_kind",
    "is_dicom_file",
    "load_image",
    "read_dicom_2d",
    "read_dicom_series",
    "read_image_2d",
    "read_itk",
    "read_nifti",
]
