"""Ground truth in every accepted label format is scored: ingest -> preprocess -> index -> finetune.

Each case is written as an image and a label in one format (NIfTI, NRRD, MHA, MHD or a DICOM
series), checked by ingest's QC, preprocessed into a slice store, indexed and fine-tuned for two
steps; the run scores its test slabs against the original label file, read back the way ingest
read it.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from data_helpers import write_dicom_series
from finetune_helpers import phantom
from medclust.evaluate import evaluate_run
from medclust.io.sources import CaseEntry
from medclust.preprocess.index import write_index_and_splits
from medclust.preprocess.ingest import check_case
from medclust.preprocess.pipeline import preprocess_case
from medclust.train.recipes.finetune import run_finetune

SPACING = (2.0, 2.0, 4.0)
ORIGIN_LPS = (30.0, 28.0, -40.0)

SETTINGS = {
    "task": "organs", "type": "segmentation", "dataset": "d", "split": "slabs", "context_slices": 0,
    "label_groups": [["disc", [3]], ["square", [7]]],
    "steps": 2, "batch_size": 4, "lr": 1e-3, "warmup_steps": 0, "patch_size": [32, 32], "eval_every": 2,
    "decoder_channels": [16, 16, 8, 8, 8], "log_every": 1, "tensorboard": False, "progress": False,
    "backbone": "resnet10", "slabs": {"blocks": 2, "val_fraction": 0.2, "test_fraction": 0.2, "gap_mm": 4.0},
}  # fmt: skip


def _volumes() -> tuple[np.ndarray, np.ndarray]:
    """A phantom volume (int16) and its label map, both (x, y, z)."""
    image, label = phantom(20, size=32, seed=6)
    hu = np.moveaxis(image * 2000.0 - 1000.0, 0, 2).astype(np.int16)
    return hu, np.moveaxis(label, 0, 2).astype(np.int16)


def _write_itk(path, volume_xyz: np.ndarray) -> str:
    import SimpleITK as sitk

    # LPS with an identity direction, as scanners write it: the RAS affine flips x and y
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume_xyz.T))
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN_LPS)
    sitk.WriteImage(image, str(path))
    return str(path)


def _write_nifti(path, volume_xyz: np.ndarray) -> str:
    import nibabel as nib

    affine = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])  # the same LPS grid, in RAS
    affine[:3, 3] = (-ORIGIN_LPS[0], -ORIGIN_LPS[1], ORIGIN_LPS[2])
    nib.save(nib.Nifti1Image(volume_xyz, affine), str(path))
    return str(path)


def _write(kind: str, folder, name: str, volume_xyz: np.ndarray) -> str:
    if kind == "nifti":
        return _write_nifti(folder / f"{name}.nii.gz", volume_xyz)
    if kind == "dicom":
        return str(write_dicom_series(folder / name, volume_xyz, spacing=SPACING, origin_lps=ORIGIN_LPS))
    return _write_itk(folder / f"{name}.{kind}", volume_xyz)


@pytest.mark.parametrize("kind", ["nifti", "nrrd", "mha", "mhd", "dicom"])
def test_labels_of_every_accepted_format_are_scored(tmp_path, kind):
    hu, label = _volumes()
    data = tmp_path / "data"
    data.mkdir()
    entry = CaseEntry(
        case_id="c0", image=_write(kind, data, "image", hu), label=_write(kind, data, "label", label), modality="MR"
    )  # MR: percentile scaling, no dataset-level CT settings involved
    check_case(entry)  # ingest's QC: readable, label on the image grid
    slices = tmp_path / "slices" / "d"
    preprocess_case(entry, {"spacing": list(SPACING), "size": [32, 32]}, slices / "c0.h5", "d")
    write_index_and_splits("d", [entry], slices, slices / "index.json", slices / "splits.json", seed=0)
    out = tmp_path / "run"
    run_finetune(SETTINGS, slices, out, "none", 1.0, 0)

    scored = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert run["test_cases"][0]["label"] == entry.label
    # both classes lie in the test slabs, so both have a Dice (0 after two steps is fine)
    for key in ("dice_disc", "dice_square", "hd95_disc"):
        assert scored["metrics"][key] is not None and math.isfinite(scored["metrics"][key]), key
    # scoring a perfect prediction gives Dice 1: ground truth and prediction share one grid
    from medclust.io.original_grid import write_label_nifti
    from medclust.io.readers import load_image

    gt = load_image(entry.label)
    mapped = np.zeros(gt.array.shape, np.int16)
    mapped[np.asarray(gt.array) == 3] = 1
    mapped[np.asarray(gt.array) == 7] = 2
    write_label_nifti(out / "predictions" / "c0.nii.gz", mapped, gt.affine)
    perfect = evaluate_run(out)["metrics"]
    assert perfect["dice_disc"] == pytest.approx(1.0) and perfect["dice_square"] == pytest.approx(1.0)
    assert perfect["hd95_mean"] == pytest.approx(0.0)
