"""Check what an image file's header claims against the file itself, before any voxel is read.

A 1.6 KB ``.nii.gz`` whose header claims 1200x1200x1200 voxels would otherwise make the reader
allocate 3.5 GB before noticing the data are not there (and 4000^3 ends in ``MemoryError``).
Here the header alone is parsed and compared with:

- ``max_voxels`` (config): the most voxels one image may have;
- the bytes the file can actually deliver: the file size for an uncompressed file; for gzip
  the ``ISIZE`` trailer (uncompressed size mod 2^32), and where that does not match (a
  truncated or multi-member stream) a bounded streaming decompression that counts bytes and
  stops as soon as enough have come out (constant memory).

It also reads what nibabel would silently "fix": a zero voxel size in ``pixdim`` (nibabel sets it
to 1 mm) and a non-finite or singular affine; and gives a reason a person can act on for an empty
file or gzip data that are not NIfTI.
"""

from __future__ import annotations

import io
import math
import os
import re
import zlib
from pathlib import Path

import numpy as np

from medclust.errors import BadInputError
from medclust.io.image import check_affine, format_number, read_failure

# DEFLATE cannot compress better than about 1032:1, so compressed data of n bytes never hold
# more than this many bytes (plus a little for headers).
_DEFLATE_MAX_RATIO = 1032
_CHUNK = 1 << 20  # compressed bytes read at a time
_OUT_CHUNK = 1 << 24  # decompressed bytes produced at a time (16 MB), then discarded
_NIFTI2_HEADER = 540
_NIFTI1_HEADER = 348


def _shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(str(int(s)) for s in shape)


def check_voxel_count(path: str | os.PathLike[str], shape: tuple[int, ...], max_voxels: int | None) -> int:
    """Refuse an image whose header claims more than ``max_voxels`` voxels.

    Returns:
        The number of voxels claimed.

    Raises:
        BadInputError: more than ``max_voxels``.
    """
    voxels = math.prod(int(s) for s in shape)
    if max_voxels is not None and voxels > int(max_voxels):
        raise BadInputError(
            path,
            f"the header claims {_shape_text(shape)} = {voxels:,} voxels, more than max_voxels "
            f"({int(max_voxels):,}); raise max_voxels in the config if the image is real",
        )
    return voxels


def gunzip_prefix(path: str | os.PathLike[str], size: int) -> bytes:
    """The first ``size`` decompressed bytes of a gzip file (fewer if the stream ends or breaks).

    Raises:
        BadInputError: the file is not gzip data at all.
    """
    out = b""
    decompressor = zlib.decompressobj(wbits=31)
    with open(path, "rb") as handle:
        while len(out) < size:
            chunk = handle.read(64 * 1024)
            if not chunk:
                break
            try:
                out += decompressor.decompress(chunk, size - len(out))
            except zlib.error as err:
                if not out:
                    raise BadInputError(path, f"not an image: named .gz but not gzip data ({err})") from err
                break
            if decompressor.eof:
                break
    return out


def gzip_holds(path: str | os.PathLike[str], needed: int) -> int | None:
    """Whether a gzip file decompresses to at least ``needed`` bytes.

    Returns:
        None if it does; otherwise the number of bytes it really holds (truncated or corrupt).
    """
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() >= 18:  # smallest gzip member
            handle.seek(-4, os.SEEK_END)
            if int.from_bytes(handle.read(4), "little") == needed % (1 << 32):
                return None  # the common case: one member, exactly header + voxels
    count = 0
    decompressor = zlib.decompressobj(wbits=31)
    with open(path, "rb") as handle:
        while count < needed:
            pending = handle.read(_CHUNK)
            if not pending:
                return count
            while pending:
                try:
                    count += len(decompressor.decompress(pending, _OUT_CHUNK))
                except zlib.error:
                    return count
                if count >= needed:
                    return None
                if decompressor.eof:  # next gzip member, if any
                    pending = decompressor.unused_data
                    decompressor = zlib.decompressobj(wbits=31)
                else:
                    pending = decompressor.unconsumed_tail
    return None


def _nifti_header(path: str | os.PathLike[str], compressed: bool) -> object:
    import nibabel as nib

    if compressed:
        with open(path, "rb") as handle:
            if handle.read(2) != b"\x1f\x8b":
                raise BadInputError(path, "not an image: named .nii.gz but not gzip-compressed")
        prefix = gunzip_prefix(path, _NIFTI2_HEADER + 4)
        where = " after decompression"
    else:
        with open(path, "rb") as handle:
            prefix = handle.read(_NIFTI2_HEADER + 4)
        where = ""
    if len(prefix) < _NIFTI1_HEADER:
        if not prefix:
            raise BadInputError(path, f"empty image file (0 bytes{where}): no NIfTI header")
        raise BadInputError(path, f"truncated or corrupt file: {len(prefix)} bytes{where}, too short for a NIfTI header")
    sizes = {int.from_bytes(prefix[:4], order) for order in ("little", "big")}
    if _NIFTI1_HEADER in sizes:
        header_class = nib.Nifti1Header
    elif _NIFTI2_HEADER in sizes and len(prefix) >= _NIFTI2_HEADER:
        header_class = nib.Nifti2Header
    else:
        kind = "gzip-compressed data without a NIfTI header inside" if compressed else "no NIfTI header at the start"
        raise BadInputError(path, f"not a NIfTI image ({kind})")
    try:
        return header_class.from_fileobj(io.BytesIO(prefix), check=False)
    except Exception as err:  # nibabel raises several types for a malformed header
        raise read_failure(path, err) from err


def check_nifti_file(path: str | os.PathLike[str], max_voxels: int | None = None) -> None:
    """Check a NIfTI file's header against the file before its voxels are read.

    Args:
        path: ``.nii`` or ``.nii.gz``.
        max_voxels: the most voxels accepted (None: no limit).

    Raises:
        BadInputError: empty, not NIfTI, an invalid size, data type, voxel size or affine, more
            voxels than ``max_voxels``, or fewer bytes than the header claims (truncated).
    """
    size = os.path.getsize(path)
    if size == 0:
        raise BadInputError(path, "empty image file (0 bytes)")
    compressed = str(path).lower().endswith(".gz")
    header = _nifti_header(path, compressed)
    dims = [int(v) for v in header["dim"]]  # type: ignore[index]
    ndim = dims[0]
    if not 1 <= ndim <= 7:
        raise BadInputError(path, f"invalid NIfTI header: {ndim} dimensions (dim[0] must be 1..7)")
    shape = tuple(dims[1 : ndim + 1])
    if min(shape) <= 0:
        raise BadInputError(path, f"invalid NIfTI header: image size {_shape_text(shape)} has an empty axis")
    try:
        dtype = np.dtype(header.get_data_dtype())  # type: ignore[attr-defined]
    except Exception as err:
        code = int(header["datatype"])  # type: ignore[index]
        raise BadInputError(path, f"invalid NIfTI header: unknown voxel data type code {code}") from err
    voxels = check_voxel_count(path, shape, max_voxels)
    # A single-file NIfTI's voxels start at vox_offset, never inside the header (+ 4 extension bytes).
    offset = max(int(float(header["vox_offset"])), int(header["sizeof_hdr"]) + 4)  # type: ignore[index]
    needed = offset + voxels * dtype.itemsize
    held = gzip_holds(path, needed) if compressed else (size if size < needed else None)
    if held is not None:
        where = " after decompression" if compressed else ""
        raise BadInputError(
            path,
            f"truncated or corrupt file: the header claims {_shape_text(shape)} {dtype.name} voxels "
            f"({needed:,} bytes with the header) but the file holds {held:,} bytes{where}",
        )
    # Spatial axes that survive squeezing trailing singletons (a 2D image ignores its 3rd axis).
    spatial = shape[:3]
    while len(spatial) > 2 and spatial[-1] == 1:
        spatial = spatial[:-1]
    axes = max(2, len(spatial)) if ndim >= 2 else 1
    if int(header["sform_code"]) == 0:  # type: ignore[index]
        # The qform and the fallback affine are built from pixdim, where nibabel turns a zero into 1.
        pixdim = [float(v) for v in header["pixdim"][1 : axes + 1]]  # type: ignore[index]
        if not all(np.isfinite(v) and v > 0 for v in pixdim):
            shown = "x".join(format_number(v) for v in pixdim)
            raise BadInputError(path, f"invalid geometry: voxel size {shown} mm in the header (pixdim); each must be positive")
    if axes >= 2:
        try:
            affine = header.get_best_affine()  # type: ignore[attr-defined]
        except Exception as err:
            raise BadInputError(path, f"invalid geometry: the header's orientation cannot be read ({err})") from err
        check_affine(affine, path, min(axes, 3))


_ITK_BYTES = {"raw", "none"}


def _itk_header_text(path: Path) -> str:
    with open(path, "rb") as handle:
        head = handle.read(256 * 1024)
    return head.decode("latin-1")


def _nrrd_fields(text: str) -> tuple[dict[str, str], int]:
    """NRRD header fields (lower-case keys) and the header's length in bytes."""
    end = re.search(r"\r?\n\r?\n", text)
    header = text[: end.start()] if end else text
    fields = {}
    for line in header.splitlines()[1:]:
        if ":" in line and not line.startswith("#"):
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.lstrip("=").strip()
    return fields, (end.end() if end else len(text))


def _meta_fields(text: str) -> tuple[dict[str, str], int]:
    """MetaImage header fields (lower-case keys) and the header's length in bytes."""
    fields, offset = {}, 0
    for line in text.splitlines(keepends=True):
        offset += len(line)
        key, sep, value = line.partition("=")
        if not sep:
            break
        fields[key.strip().lower()] = value.strip()
        if key.strip().lower() == "elementdatafile":
            break
    return fields, offset


def check_itk_file(path: str | os.PathLike[str], max_voxels: int | None = None) -> None:
    """Check a MetaImage/NRRD file's header against its data before the voxels are read.

    Args:
        path: ``.mha``, ``.mhd``, ``.nrrd`` or ``.nhdr``.
        max_voxels: the most voxels accepted (None: no limit).

    Raises:
        BadInputError: unreadable header, NaN or zero spacing, more than ``max_voxels`` voxels,
            a missing data file, fewer data bytes than the header claims, or a NRRD without a
            patient ``space`` (RAS, LAS or LPS).
    """
    import SimpleITK as sitk

    p = Path(path)
    if p.stat().st_size == 0:
        raise BadInputError(path, "empty image file (0 bytes)")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
    except Exception as err:
        raise read_failure(path, err) from err
    shape = tuple(int(s) for s in reader.GetSize())
    components = int(reader.GetNumberOfComponents())
    voxels = check_voxel_count(path, shape, max_voxels)
    itemsize = sitk.Image([1] * len(shape), reader.GetPixelID()).GetSizeOfPixelComponent()
    needed = voxels * components * itemsize
    text = _itk_header_text(p)
    if p.suffix.lower() in (".nrrd", ".nhdr"):
        fields, header_bytes = _nrrd_fields(text)
        spacings = fields.get("spacings", "").split()
        if any(v.lower() == "nan" for v in spacings):
            # NRRD's "nan" means "unknown"; ITK would silently make it 1 mm.
            raise BadInputError(path, f"invalid geometry: spacing {' '.join(spacings)} in the header (NaN = unknown voxel size)")
        space = fields.get("space", "").strip().lower()
        encoding = fields.get("encoding", "raw").lower()
        data_file = fields.get("data file") or fields.get("datafile")
        compressed = encoding in ("gzip", "gz")
        plain = encoding == "raw"
    else:
        space = "left-posterior-superior"  # MetaImage directions are LPS by definition
        fields, header_bytes = _meta_fields(text)
        data_file = fields.get("elementdatafile")
        data_file = None if data_file is None or data_file.upper() == "LOCAL" else data_file
        compressed = fields.get("compresseddata", "false").lower() == "true"
        plain = not compressed
    if data_file is not None:
        if " " in data_file.strip() or "%" in data_file:
            _check_patient_space(path, space)
            return  # a list or pattern of slice files: ITK checks their sizes
        data = p.parent / data_file.strip()
        if not data.is_file():
            raise BadInputError(path, f"the data file {data.name} named in the header is missing")
        available = data.stat().st_size
    else:
        available = p.stat().st_size - header_bytes
    if plain and available < needed:
        raise BadInputError(
            path,
            f"truncated or corrupt file: the header claims {_shape_text(shape)} voxels ({needed:,} bytes) "
            f"but the file holds {max(available, 0):,} bytes of data",
        )
    if compressed and needed > _DEFLATE_MAX_RATIO * max(available, 0) + 4096:
        raise BadInputError(
            path,
            f"truncated or corrupt file: the header claims {_shape_text(shape)} voxels ({needed:,} bytes), more than "
            f"{max(available, 0):,} bytes of compressed data can hold",
        )
    _check_patient_space(path, space)


def _check_patient_space(path: str | os.PathLike[str], space: str) -> None:
    """A NRRD's ``space`` must be a patient frame: ITK reads any other (none, ``scanner-xyz``,
    ``3D-right-handed``) as LPS, a guess that mirrors the volume whenever it is wrong."""
    if space not in _PATIENT_SPACES:
        named = f"'space: {space}' is not a patient frame" if space else "no 'space:' field"
        raise BadInputError(
            path,
            f"invalid geometry: {named}, so its orientation in the patient is unknown; write the file with "
            "`space: left-posterior-superior` (or right-/left-anterior-superior) if that is what its axes are",
        )


# NRRD's patient frames (with or without a time axis), full and abbreviated names
_PATIENT_SPACES = {
    f"{name}{suffix}" for name in ("right-anterior-superior", "left-anterior-superior", "left-posterior-superior")
    for suffix in ("", "-time")
} | {"ras", "las", "lps", "rast", "last", "lpst"}


__all__ = ["check_itk_file", "check_nifti_file", "check_voxel_count", "gunzip_prefix", "gzip_holds"]
