"""Synthetic CT volumes in several file formats, a real slice store made from them, a tiny run."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.spatial.transform import Rotation

from medclust.io.slice_store import read_attrs
from medclust.preprocess.pipeline import preprocess_case

PREP = {"spacing": [2.0, 2.0, 4.0], "size": [32, 32], "slice_axis": 2, "dtype": "float16", "antialias": False, "ct_normalization": "nnunet"}
SEG_SETTINGS = {
    "task": "toy_organs",
    "type": "segmentation",
    "dataset": "toy",
    "steps": 3,
    "batch_size": 4,
    "lr": 1e-3,
    "warmup_steps": 0,
    "patch_size": [32, 32],
    "decoder_channels": [16, 16, 8, 8, 8],
    "eval_every": 2,
    "log_every": 1,
    "tensorboard": False,
    "progress": False,
    "backbone": "resnet10",
    "context_slices": 1,
    "predict_batch_size": 4,
    "split": "cases",
}


def ras_affine(spacing=(2.0, 2.0, 4.0), angles_deg=(0.0, 0.0, 0.0), origin=(-24.0, -20.0, -18.0)) -> np.ndarray:
    """Voxel -> RAS mm with a rotation (oblique when the angles are not 0)."""
    aff = np.eye(4)
    aff[:3, :3] = Rotation.from_euler("xyz", angles_deg, degrees=True).as_matrix() @ np.diag(spacing)
    aff[:3, 3] = origin
    return aff


def ct_volume(shape=(24, 22, 10), seed=0) -> tuple[np.ndarray, np.ndarray]:
    """An int16 HU volume (x, y, z): a soft-tissue body, a dense disc (label 1), a dark block (label 2)."""
    rng = np.random.default_rng(seed)
    x, y = np.mgrid[: shape[0], : shape[1]]
    hu = np.full(shape, -1000, np.int16)
    label = np.zeros(shape, np.uint8)
    cx, cy = shape[0] / 2 + rng.uniform(-1, 1), shape[1] / 2 + rng.uniform(-1, 1)
    body = ((x - cx) / (shape[0] * 0.45)) ** 2 + ((y - cy) / (shape[1] * 0.45)) ** 2 <= 1
    disc = (x - cx - 3) ** 2 + (y - cy) ** 2 <= 9
    for z in range(shape[2]):
        hu[..., z][body] = 40
        if 1 <= z < shape[2] - 1:
            hu[..., z][disc] = 400
            label[..., z][disc] = 1
        if z >= shape[2] // 2:
            hu[int(cx) - 7 : int(cx) - 3, int(cy) - 2 : int(cy) + 3, z] = -400
            label[int(cx) - 7 : int(cx) - 3, int(cy) - 2 : int(cy) + 3, z] = 2
    hu = hu + rng.integers(-20, 21, size=shape).astype(np.int16)
    return hu, label


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


def write_itk(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    """NRRD/MHA through SimpleITK (LPS, (z, y, x) arrays)."""
    import SimpleITK as sitk

    lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.T))
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in (lps / spacing).ravel()])
    image.SetOrigin([float(v) for v in np.diag([-1.0, -1.0, 1.0]) @ affine[:3, 3]])
    sitk.WriteImage(image, str(path))
    return path


def write_dicom_series(folder: Path, hu: np.ndarray, affine: np.ndarray) -> Path:
    """A real CT DICOM series (one file per z slice) of an (x, y, z) int16 HU volume."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, :3]
    origin = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, 3]
    sx, sy, sz = np.linalg.norm(lps, axis=0)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for k in range(hu.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientID, ds.PatientName, ds.StudyID = "TOY001", "Toy^Phantom", "1"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, k + 1
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName = "20240101", "120000", "", ""
        ds.PatientBirthDate, ds.PatientSex, ds.Manufacturer = "", "O", "test"
        ds.ImageOrientationPatient = [float(v) for v in (*(lps[:, 0] / sx), *(lps[:, 1] / sy))]
        ds.ImagePositionPatient = [float(v) for v in origin + lps[:, 2] * k]
        ds.PixelSpacing = [float(sy), float(sx)]
        ds.SliceThickness = float(sz)
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PixelData = np.ascontiguousarray(hu[:, :, k].T.astype(np.int16)).tobytes()
        ds.save_as(folder / f"slice{k:03d}.dcm", enforce_file_format=True)
    return folder


def make_training_store(root: Path, n_cases: int = 4) -> Path:
    """``root/slices/toy``: NIfTI CT cases (with labels) preprocessed by the real pipeline.

    CT normalisation is nnU-Net's: the fingerprint of the training and validation cases (all but
    the last, the test case) is written to ``intensity.json`` and applied to every case, as the data stage does.
    """
    from medclust.io.sources import CaseEntry
    from medclust.preprocess.intensity import compute_fingerprint

    sources = root / "sources"
    sources.mkdir(parents=True, exist_ok=True)
    folder = root / "slices" / "toy"
    folder.mkdir(parents=True, exist_ok=True)
    cases = []
    for i in range(n_cases):
        hu, label = ct_volume(seed=i)
        affine = ras_affine(origin=(-24.0 + i, -20.0, -18.0))
        image = write_nifti(sources / f"case{i}.nii.gz", hu, affine)
        lab = write_nifti(sources / f"case{i}_seg.nii.gz", label, affine)
        cases.append(CaseEntry(case_id=f"case{i}", image=str(image), label=str(lab), modality="CT"))
    fingerprint, _ = compute_fingerprint("toy", cases[:-1])
    (folder / "intensity.json").write_text(json.dumps({**fingerprint.record(), "dataset": "toy", "cases": list(fingerprint.cases)}), encoding="utf-8")
    entries = []
    for case in cases:
        preprocess_case(case, PREP, folder / f"{case.case_id}.h5", "toy", intensity=fingerprint)
        attrs = read_attrs(folder / f"{case.case_id}.h5")
        s = len(attrs["z_positions_mm"])
        entries.append({"case_id": case.case_id, "file": f"{case.case_id}.h5", "modality": "CT", "num_slices": s,
                        "shape": [s, 32, 32], "label_classes": [0, 1, 2], "simulated": False, "class_label": None})
    ids = [e["case_id"] for e in entries]
    (folder / "index.json").write_text(json.dumps({"dataset": "toy", "cases": entries}), encoding="utf-8")
    splits = {"dataset": "toy", "seed": 0, "train": ids[:-2], "val": ids[-2:-1], "test": ids[-1:]}
    (folder / "splits.json").write_text(json.dumps(splits), encoding="utf-8")
    return folder


def varied_package(run: Path, out: Path, probe: Path) -> Path:
    """A copy of ``run``'s package whose labels follow the image: a few-step model predicts one class
    almost everywhere, which would let a flipped or shifted label map pass unnoticed.

    The segmentation head is replaced by two decoder feature channels (class 1 and 2 logits) and a
    small constant (class 0), channels chosen on ``probe`` so that each class covers part of it.
    """
    import torch

    from medclust.io.sources import CaseEntry
    from medclust.predict import Predictor, load_package, write_package

    predictor = Predictor(run, device="cpu")
    prepared = predictor.prepare(CaseEntry("probe", str(probe)))
    seen = []
    hook = predictor.model.segmentation_head.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    predictor.logits(prepared)
    hook.remove()
    positive = (torch.cat(seen) > 0).float().mean(dim=(0, 2, 3))
    first = int(torch.argmin((positive - 0.6).abs()))
    rest = (positive - 0.25).abs()
    rest[first] = float("inf")
    second = int(torch.argmin(rest))
    package = load_package(run)
    state = package.load_state_dict()
    weight = torch.zeros_like(state["segmentation_head.0.weight"])
    weight[1, first, 1, 1], weight[2, second, 1, 1] = 1.0, 3.0
    state["segmentation_head.0.weight"] = weight
    state["segmentation_head.0.bias"] = torch.tensor([1e-4, 0.0, 0.0])
    meta = {k: v for k, v in package.meta.items() if k not in ("format", "format_version", "weights")}
    write_package(out, meta, state)
    return out
