"""Synthetic images for the data-stage tests: NIfTI volumes, DICOM series, radiographs, manifests."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def oblique_lps_affine(spacing=(0.9, 1.1, 2.0), degrees=12.0, origin=(40.0, -20.0, 10.0)) -> np.ndarray:
    """A voxel->RAS affine whose x and y axes point L and P (an LPS-stored volume), rotated in-plane."""
    theta = np.deg2rad(degrees)
    rotation = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ rotation * np.asarray(spacing)[None, :]
    affine[:3, 3] = origin
    return affine


def world_grid(shape, affine) -> np.ndarray:
    """RAS world coordinates (N, 3) of every voxel centre, C order over ``shape``."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    return index @ affine[:3, :3].T + affine[:3, 3]


def save_nifti(path, array, affine=None, dtype=None) -> Path:
    """Write ``array`` as NIfTI (gzip if the name ends with .gz)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.asarray(array)
    if dtype is not None:
        array = array.astype(dtype)
    elif array.dtype == np.int64:
        array = array.astype(np.int16)
    img = nib.Nifti1Image(array, np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64))
    nib.save(img, str(path))
    return path


def phantom_ct(shape=(48, 40, 16), seed=0) -> np.ndarray:
    """An int16 'CT': air around a water ellipse with a bone disc and some noise (HU)."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    body = (x / 0.8) ** 2 + (y / 0.7) ** 2 < 1
    bone = (x - 0.2) ** 2 + (y + 0.1) ** 2 < 0.05
    hu = np.where(body, 20.0, -1000.0) + np.where(bone, 900.0, 0.0) + rng.normal(0, 10, shape) + 30 * z
    return hu.astype(np.int16)


def phantom_label(image: np.ndarray) -> np.ndarray:
    """Labels from the phantom's HU: 1 body, 2 bone."""
    return ((image > -500).astype(np.uint8) + (image > 500).astype(np.uint8)).astype(np.uint8)


def write_dicom_series(folder, volume_xyz, spacing=(0.8, 0.8, 2.5), origin_lps=(-20.0, -15.0, 30.0), modality="CT") -> Path:
    """Write ``volume_xyz`` (int16, x, y, z) as a DICOM series of axial slices with SimpleITK.

    The series is stored the usual DICOM way (LPS, identity direction): voxel (i, j, k) is at
    LPS ``origin + (i*sx, j*sy, k*sz)``. Slices are written in reverse order so that the reader
    must sort them by position.
    """
    import SimpleITK as sitk

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(volume_xyz, dtype=np.int16).T))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in origin_lps])
    series_uid = "1.2.826.0.1.3680043.8.498.1"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    nz = image.GetSize()[2]
    for k in reversed(range(nz)):
        piece = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": modality,
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"{series_uid}.{k + 1}",
            "0020|000d": "1.2.826.0.1.3680043.8.498.0",
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0010|0010": "SYNTHETIC^PHANTOM",
            "0028|1052": "0",
            "0028|1053": "1",
        }
        for key, value in tags.items():
            piece.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"slice{nz - k:03d}.dcm"))
        writer.Execute(piece)
    return folder


def write_radiograph_dicom(path, pixels_rows_cols, monochrome1=True, imager_spacing=(0.2, 0.3)) -> Path:
    """A CR DICOM file with the given (rows, columns) uint16 pixels."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    pixels = np.asarray(pixels_rows_cols, dtype=np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.PatientName = "SYNTHETIC^XRAY"
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.SamplesPerPixel = 1
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.ImagerPixelSpacing = [f"{imager_spacing[0]:g}", f"{imager_spacing[1]:g}"]
    ds.PixelData = pixels.tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)
    return path


def set_raw_value(path, keyword: str, text: str) -> Path:
    """Overwrite one element of an explicit-VR little-endian DICOM file with ``text`` as written.

    pydicom refuses to write a malformed value (``SliceThickness '7.2x'``), which scanners and
    converters do write; the element must already be in the file (it is found before the pixel
    data, so pixel bytes cannot be mistaken for it).
    """
    import struct

    from pydicom.datadict import dictionary_VR, tag_for_keyword

    path = Path(path)
    tag = tag_for_keyword(keyword)
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + dictionary_VR(tag).encode()
    data = path.read_bytes()
    at = data.index(head)
    (length,) = struct.unpack("<H", data[at + 6 : at + 8])
    value = text.encode("ascii") + (b" " if len(text) % 2 else b"")  # DICOM values have even lengths
    path.write_bytes(data[: at + 6] + struct.pack("<H", len(value)) + value + data[at + 8 + length :])
    return path


def radiograph_pixels(rows=120, cols=90) -> np.ndarray:
    """A MONOCHROME1-style radiograph (rows, cols): dense 'bone' square has LOW raw values."""
    pixels = np.full((rows, cols), 3000, dtype=np.uint16)
    pixels[rows // 4 : rows // 2, cols // 4 : cols // 2] = 500  # dense -> white once inverted
    pixels[: rows // 8, :] = 3500
    return pixels


def write_msd(root, cases: dict[str, tuple[np.ndarray, np.ndarray | None]], affine, modality="CT") -> Path:
    """An MSD folder: dataset.json + imagesTr/ + labelsTr/."""
    import json

    root = Path(root)
    training = []
    for name, (image, label) in cases.items():
        save_nifti(root / "imagesTr" / f"{name}.nii.gz", image, affine)
        item = {"image": f"./imagesTr/{name}.nii.gz"}
        if label is not None:
            save_nifti(root / "labelsTr" / f"{name}.nii.gz", label, affine, dtype=np.uint8)
            item["label"] = f"./labelsTr/{name}.nii.gz"
        training.append(item)
    meta = {"name": "synthetic", "modality": {"0": modality}, "labels": {"0": "background", "1": "body", "2": "bone"},
            "numTraining": len(training), "training": training, "test": []}
    (root / "dataset.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return root
