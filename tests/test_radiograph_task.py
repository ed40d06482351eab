"""Simulated radiographs all the way through: split by projection angle, 2D fine-tuning and scoring."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from finetune_helpers import write_store
from medclust.errors import MedclustError
from medclust.io.sources import discover
from medclust.preprocess.drr_dataset import angle_splits, simulate_drr_dataset
from medclust.preprocess.index import make_splits
from medclust.train.recipes.finetune import dataset_label_names, run_finetune

TINY = {"steps": 12, "batch_size": 4, "lr": 3e-3, "warmup_steps": 0, "patch_size": [32, 32],
        "decoder_channels": [16, 16, 8, 8, 8], "eval_every": 6, "log_every": 1, "backbone": "resnet10",
        "num_workers": 0, "val_max_slices": 8, "tensorboard": False, "progress": False}


def _ct_case(folder: Path) -> Path:
    hu = np.full((24, 24, 10), -1000, np.int16)
    lab = np.zeros(hu.shape, np.uint8)
    hu[6:18, 6:18, 2:8] = 0
    lab[6:18, 6:18, 2:8] = 5
    affine = np.diag([2.0, 2.0, 4.0, 1.0])
    nib.save(nib.Nifti1Image(hu, affine), str(folder / "ct.nii.gz"))
    nib.save(nib.Nifti1Image(lab, affine), str(folder / "lab.nii.gz"))
    cases = folder / "cases.json"
    cases.write_text(json.dumps({"dataset": "ct", "cases": [
        {"case_id": "c1", "image": "ct.nii.gz", "label": "lab.nii.gz", "modality": "CT", "split": None}]}), encoding="utf-8")
    return cases


def test_views_split_by_angle_each_its_own_group(tmp_path: Path) -> None:
    settings = {"angles": [0, 45, 90, 180, 270], "pixel_spacing": 2.0, "val_angles": [90], "test_angles": [45, -90]}
    manifest = simulate_drr_dataset(_ct_case(tmp_path), tmp_path / "drr", settings)
    with open(manifest, newline="", encoding="utf-8") as handle:
        rows = {r["angle_deg"]: r for r in csv.DictReader(handle, delimiter="\t")}
    assert {a: r["split"] for a, r in rows.items()} == {"0": "train", "45": "test", "90": "val", "180": "train", "270": "test"}
    assert rows["45"]["group"] == "c1_drr045" and rows["45"]["source_case"] == "c1"
    # the index's case-level split keeps the fixed per-angle splits (no one-group conflict)
    splits = make_splits("x", discover({"format": "drr", "path": str(manifest), "name": "x"}), 0, 0.2, 0.2)
    assert splits["test"] == ["c1_drr045", "c1_drr270"] and splits["val"] == ["c1_drr090"]
    assert splits["train"] == ["c1_drr000", "c1_drr180"]
    record = json.loads((tmp_path / "drr" / "drr.json").read_text(encoding="utf-8"))
    assert record["split_by_angle"] == {"45": "test", "90": "val", "270": "test"}


def test_without_angle_splits_views_follow_their_ct(tmp_path: Path) -> None:
    manifest = simulate_drr_dataset(_ct_case(tmp_path), tmp_path / "drr", {"angles": [0, 90], "pixel_spacing": 2.0})
    with open(manifest, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert [(r["split"], r["group"]) for r in rows] == [("", "c1"), ("", "c1")]


def test_angle_split_errors_name_the_key() -> None:
    with pytest.raises(MedclustError, match="test_angles: 30 is not one of drr.angles"):
        angle_splits({"angles": [0, 90], "test_angles": [30]})
    with pytest.raises(MedclustError, match="angle 90 is in both"):
        angle_splits({"angles": [0, 90], "val_angles": [90], "test_angles": [90]})


def test_drr_label_names_come_from_the_source_ct(tmp_path: Path) -> None:
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "3": "lung_left", "7": "heart"}}), encoding="utf-8")
    entry = {"format": "drr", "source": "ct", "source_entry": {"format": "msd", "path": str(tmp_path)}}
    assert dataset_label_names(entry) == {0: "background", 3: "lung_left", 7: "heart"}


def _radiograph(seed: int, size: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """A 2D 'radiograph' (S = 1): two bright lung fields (3) and a heart (7) between them."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    label = np.zeros((1, size, size), np.int64)
    shift = int(rng.integers(-2, 3))
    label[0, 8:32, 5 + shift : 16 + shift] = 3
    label[0, 8:32, 24 + shift : 35 + shift] = 3
    label[0][(yy - 26) ** 2 + (xx - 20 - shift) ** 2 <= 25] = 7
    image = 0.2 + 0.03 * rng.standard_normal((1, size, size))
    image[label == 3] += 0.6
    image[label == 7] += 0.3
    return np.clip(image, 0, 1).astype(np.float32), label


def test_2d_segmentation_on_simulated_radiographs_splits_by_case_and_scores_on_the_grid(tmp_path: Path) -> None:
    affine = np.diag([2.0, 2.0, 1.0, 1.0])
    cases = []
    for k in range(8):
        image, label = _radiograph(k)
        cases.append({"case_id": f"v{k}", "image": image, "label": label, "affine": affine})
    store = write_store(tmp_path, "drr", cases, {"train": [f"v{k}" for k in range(5)], "val": ["v5"], "test": ["v6", "v7"]})
    for h5 in store.glob("*.h5"):  # mark the store simulated as the DRR preprocessing does
        import h5py

        with h5py.File(h5, "a") as f:
            f.attrs["simulated"] = True
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"3": "lung_right", "7": "heart"}}), encoding="utf-8")
    entry = {"format": "drr", "source": "ct", "source_entry": {"format": "msd", "path": str(tmp_path)}}
    settings = {**TINY, "task": "xr", "type": "segmentation", "dataset": "drr", "split": "cases", "context_slices": 0,
                "label_groups": [["lungs", ["lung_*"]], ["heart", ["heart"]]], "dataset_entry": entry,
                "train_dataset_entry": entry}
    out = tmp_path / "run"
    run_finetune(settings, store, out, "none", 1.0, 0)
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert sorted(c["case_id"] for c in run["test_cases"]) == ["v6", "v7"]  # whole images, the test split
    assert run["train_cases"] == [f"v{k}" for k in range(5)]
    scored = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert scored["simulated"] is True and scored["trained_on"] == "simulated images"
    with open(out / "per_case.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["case_id"] for r in rows] == ["v6", "v7"] and all(int(r["roi_voxels"]) == 40 * 40 for r in rows)
    assert min(float(r["dice_lungs"]) for r in rows) > 0.5  # it learns the lung fields in 12 steps
    pred = nib.load(str(out / "predictions" / "v6.nii.gz"))
    source = nib.load(str(tmp_path / "sources" / "v6_seg.nii.gz"))
    assert pred.shape == source.shape and np.allclose(pred.affine, source.affine)


def test_overlay_is_drawn_on_the_image_grid(tmp_path: Path) -> None:
    from PIL import Image

    from medclust.report.radiograph_overlay import plot_radiograph_prediction

    rows, cols = 30, 50  # not square: a transposed label map cannot pass
    Image.fromarray(np.tile(np.arange(cols, dtype=np.uint8), (rows, 1)) * 5).save(tmp_path / "xr.png")
    label = np.zeros((rows, cols), np.uint8)
    label[5:25, 5:20] = 1
    nib.save(nib.Nifti1Image(label.T.copy(), np.eye(4)), str(tmp_path / "pred.nii.gz"))  # predict's (column, row) order
    out = plot_radiograph_prediction(tmp_path / "xr.png", tmp_path / "pred.nii.gz", {1: "lungs"}, tmp_path / "f.png", "t")
    assert out.is_file() and out.read_bytes()[:4] == b"\x89PNG"
    nib.save(nib.Nifti1Image(label, np.eye(4)), str(tmp_path / "bad.nii.gz"))
    with pytest.raises(MedclustError, match="not on the image grid"):
        plot_radiograph_prediction(tmp_path / "xr.png", tmp_path / "bad.nii.gz", {1: "lungs"}, tmp_path / "g.png", "t")


def test_demo_has_the_radiograph_task_and_its_real_radiograph_figure(tmp_path: Path) -> None:
    import os
    import shutil
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    override = tmp_path / "x.yaml"
    override.write_text(f"results_dir: {tmp_path / 'res'}\n", encoding="utf-8")
    exe = shutil.which("snakemake") or "snakemake"
    target = f"{tmp_path / 'res'}/report/real_images/drr_lung_heart.png"
    done = subprocess.run(
        [exe, "-n", "-p", "--nolock", "--cores", "1", target, "--configfile", "config.yaml", str(override)],
        cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, encoding="utf-8", errors="replace",
        timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stdout[-2000:]
    text = done.stdout
    config = __import__("yaml").safe_load((repo / "config.yaml").read_text(encoding="utf-8"))
    init = next(i for i in config["finetune"]["inits"] if i != "none")
    fraction, seed = config["finetune"]["fractions"][0], config["finetune"]["seeds"][0]
    run = f"finetune/drr_lung_heart/{init}/{fraction:g}/{seed}"
    predict = next(line for line in text.splitlines() if "medclust predict " in line)
    assert f"{run} --input resources/demo/chest_xray --assume-pixel-spacing 0.2 0.2" in predict.replace("'", "")
    assert "medclust plot-radiograph" in text and "SIMULATED radiographs only" in text
    assert "simulate-drr" in text and "task=drr_lung_heart" in text
    rst = (repo / "workflow" / "report" / "real_images.rst").read_text(encoding="utf-8")
    assert "simulated radiographs only" in rst
