"""nnU-Net CT normalisation: the per-dataset intensity fingerprint (which voxels, which cases),
the clipped z-scores in the slice store, the window fallback, one set of inputs for pretraining
and fine-tuning, and a dataset linked to another by `intensity_from` in the workflow."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from data_helpers import phantom_ct, phantom_label, save_nifti, write_dicom_series, write_msd

from medclust.errors import MedclustError
from medclust.io.readers import load_image
from medclust.io.slice_store import read_case
from medclust.io.sources import CaseEntry
from medclust.preprocess.index import make_splits
from medclust.preprocess.intensity import (
    IntensityFingerprint,
    body_mask,
    hu_to_store,
    load_fingerprint,
    write_fingerprint,
)
from medclust.preprocess.pipeline import PreprocessSettings, preprocess_case, preprocess_image

REPO = Path(__file__).resolve().parents[1]
NNUNET = {"spacing": [2.0, 2.0, 2.0], "size": [16, 16], "dtype": "float32", "ct_normalization": "nnunet"}


def _cases_json(path: Path, dataset: str, entries: list[CaseEntry]) -> Path:
    path.write_text(json.dumps({"dataset": dataset, "cases": [e.to_dict() for e in entries]}), encoding="utf-8")
    return path


def test_fingerprint_of_a_known_foreground(tmp_path):
    """Foreground HU 1..1000 (label 1) inside -2000 HU background: nnU-Net's numbers in closed form."""
    image = np.full((20, 10, 8), -2000, np.int16)
    label = np.zeros(image.shape, np.uint8)
    flat_image, flat_label = image.reshape(-1), label.reshape(-1)
    flat_image[:1000] = np.arange(1, 1001)
    flat_label[:1000] = 1
    img = save_nifti(tmp_path / "a.nii.gz", image, np.diag([1.0, 1.0, 2.0, 1.0]))
    lab = save_nifti(tmp_path / "a_lab.nii.gz", label, np.diag([1.0, 1.0, 2.0, 1.0]), dtype=np.uint8)
    cases = _cases_json(tmp_path / "cases.json", "known", [CaseEntry("a", str(img), str(lab), modality="CT")])
    record = write_fingerprint("known", cases, tmp_path / "intensity.json")
    # linear-interpolated percentiles of 1..1000: 1 + 0.005 * 999 and 1 + 0.995 * 999
    assert record["clip_hu"] == pytest.approx([5.995, 995.005])
    assert record["mean"] == pytest.approx(500.5)
    assert record["std"] == pytest.approx(np.sqrt((1000**2 - 1) / 12.0))
    assert record["foreground"] == "labels" and record["cases"] == ["a"] and record["n_foreground_voxels"] == 1000
    assert record["provenance"]["inputs"] and json.loads((tmp_path / "intensity.json").read_text(encoding="utf-8")) == record
    fingerprint, fallback = load_fingerprint(tmp_path / "intensity.json")
    assert fallback is None and fingerprint.clip_hu == pytest.approx((5.995, 995.005))


def test_fingerprint_uses_labelled_training_cases_only(tmp_path):
    """Five labelled CTs, seeded split: the test case's (very bright) foreground stays out, so
    does every unlabelled voxel and the unlabelled CT."""
    rng = np.random.default_rng(3)
    entries, foregrounds = [], {}
    for i in range(5):
        image = rng.normal(40 * i, 100, (12, 10, 6)).astype(np.int16)
        label = (rng.uniform(size=image.shape) < 0.5).astype(np.uint8)
        image[label == 0] = -3000  # would move every statistic if it were counted
        save_nifti(tmp_path / f"c{i}.nii.gz", image)
        save_nifti(tmp_path / f"c{i}_lab.nii.gz", label, dtype=np.uint8)
        entries.append(CaseEntry(f"c{i}", str(tmp_path / f"c{i}.nii.gz"), str(tmp_path / f"c{i}_lab.nii.gz"), modality="CT"))
        foregrounds[f"c{i}"] = image[label > 0].astype(float)
    save_nifti(tmp_path / "u.nii.gz", np.full((12, 10, 6), 2500, np.int16))
    entries.append(CaseEntry("u", str(tmp_path / "u.nii.gz"), None, modality="CT", split="train"))
    splits = make_splits("five", entries, seed=7, val_fraction=0.2, test_fraction=0.2)
    assert len(splits["test"]) == 1
    foregrounds[splits["test"][0]] += 5000.0  # the test case is the odd one out
    for cid in splits["test"]:
        n = int(cid[1:])
        image = np.asarray(load_image(entries[n].image).array).copy()
        image[np.asarray(load_image(entries[n].label).array) > 0] += 5000
        save_nifti(entries[n].image, image)
    cases = _cases_json(tmp_path / "cases.json", "five", entries)
    fractions = {"val_fraction": 0.2, "test_fraction": 0.2}
    record = write_fingerprint("five", cases, tmp_path / "intensity.json", seed=7, splits_settings=fractions)
    used = [c for c in sorted(foregrounds) if c not in splits["test"]]
    pooled = np.concatenate([foregrounds[c] for c in used])
    assert record["excluded_test_cases"] == splits["test"] and sorted(record["cases"]) == used
    assert record["clip_hu"] == pytest.approx(list(np.percentile(pooled, [0.5, 99.5])))
    assert record["mean"] == pytest.approx(pooled.mean()) and record["std"] == pytest.approx(pooled.std())
    assert record["max"] < 2000  # neither the test case nor the unlabelled CT


def _chest(shape=(40, 36, 6)) -> np.ndarray:
    """Air around a 40 HU body holding two -850 HU lungs that run the full length of z."""
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    body = (x / 0.85) ** 2 + (y / 0.75) ** 2 < 1
    lungs = ((x - 0.35) ** 2 + y**2 < 0.09) | ((x + 0.35) ** 2 + y**2 < 0.09)
    plane = np.where(body, np.where(lungs, -850, 40), -1000)
    return np.repeat(plane[:, :, None], shape[2], axis=2).astype(np.int16)


def test_unlabelled_ct_uses_its_body_lungs_included(tmp_path):
    chest = _chest()
    # array axis 0 is superior: the axial slices lie across axis 0, not the last one
    volume = np.ascontiguousarray(np.transpose(chest, (2, 0, 1)))
    affine = np.array([[0, 2.0, 0, 0], [0, 0, 2.0, 0], [3.0, 0, 0, 0], [0, 0, 0, 1]])
    mask = body_mask(volume, affine)
    expected = np.transpose(chest > -1000, (2, 0, 1))
    np.testing.assert_array_equal(mask, expected)  # lungs in, outside air out
    path = save_nifti(tmp_path / "u.nii.gz", volume, affine)
    cases = _cases_json(tmp_path / "cases.json", "unlab", [CaseEntry("u", str(path), None, modality="CT")])
    record = write_fingerprint("unlab", cases, tmp_path / "intensity.json")
    values = volume[expected].astype(float)
    assert record["foreground"] == "body" and record["mean"] == pytest.approx(values.mean())
    assert record["clip_hu"] == pytest.approx([-850.0, 40.0])


def test_dataset_without_ct_training_cases_falls_back_to_the_window(tmp_path):
    mr = save_nifti(tmp_path / "m.nii.gz", np.random.default_rng(0).gamma(2.0, 100.0, (16, 16, 6)).astype(np.float32))
    ct = save_nifti(tmp_path / "c.nii.gz", phantom_ct((16, 16, 6)))
    entries = [CaseEntry("m", str(mr), modality="MR", split="train"), CaseEntry("c", str(ct), modality="CT", split="test")]
    record = write_fingerprint("mixed", _cases_json(tmp_path / "cases.json", "mixed", entries), tmp_path / "intensity.json")
    assert record["method"] == "ct_window" and "no CT training case" in record["reason"]
    out = preprocess_case(entries[1], NNUNET, tmp_path / "c.h5", "mixed", intensity=tmp_path / "intensity.json")
    stored = read_case(out)
    norm = json.loads(stored.attrs["normalisation"])
    assert norm["method"] == "ct_window" and "no CT training case" in norm["fallback"]
    assert stored.image.min() >= 0.0 and stored.image.max() <= 1.0


def test_nnunet_store_holds_clipped_zscores_with_air_outside_the_field_of_view(tmp_path):
    ct = phantom_ct((12, 12, 4))  # air -1000, water ~20, bone ~920 HU, + noise and a z ramp
    img = load_image(save_nifti(tmp_path / "ct.nii.gz", ct, np.diag([2.0, 2.0, 2.0, 1.0])))
    fingerprint = IntensityFingerprint("src", "labels", (-900.0, 600.0), mean=-100.0, std=300.0)
    settings = PreprocessSettings.from_dict({**NNUNET, "antialias": False})
    result = preprocess_image(img, "CT", settings, intensity=fingerprint)
    assert result.image.shape == (4, 16, 16)  # 12 -> 16: two pixels of padding on each side
    inside = result.image[:, 2:14, 2:14]
    expected = (np.clip(np.moveaxis(ct.astype(float), 2, 0), -900, 600) + 100) / 300
    np.testing.assert_allclose(inside, expected, atol=1e-4)
    np.testing.assert_allclose(inside, hu_to_store(np.moveaxis(ct, 2, 0), result.normalisation), atol=1e-4)
    low, high = result.normalisation["output_range"]
    assert (low, high) == pytest.approx((-8 / 3, 7 / 3))
    assert np.all(result.image[:, :2, :] == pytest.approx(low))  # padding is the bottom of the range (air)
    assert result.normalisation["method"] == "nnunet" and result.normalisation["fingerprint_dataset"] == "src"
    with pytest.raises(MedclustError, match="no intensity fingerprint"):
        preprocess_image(img, "CT", settings)
    window = PreprocessSettings.from_dict({**NNUNET, "ct_normalization": "window", "ct_window": [-1000, 1000]})
    assert preprocess_image(img, "CT", window, intensity=fingerprint).normalisation["method"] == "ct_window"
    with pytest.raises(MedclustError, match="ct_normalization must be one of window, nnunet"):
        PreprocessSettings.from_dict({"ct_normalization": "zscore"})


def test_pretraining_and_finetuning_read_the_same_zscored_store_for_nifti_and_dicom(tmp_path):
    """One CT as a labelled NIfTI (dataset A, the fingerprint's source) and as a DICOM series
    (dataset B, linked to A): both stores hold the same z-scores under the same record, and
    the pretraining and fine-tuning loaders hand those exact values on."""
    from medclust.data.downstream import load_cases
    from medclust.data.pretrain_datasets import CaseArrays, collect_cases
    from medclust.preprocess.index import write_index_and_splits

    ct = phantom_ct((24, 20, 6))
    spacing, origin = (1.0, 1.0, 2.5), (-20.0, -15.0, 30.0)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [-origin[0], -origin[1], origin[2]]  # DICOM LPS origin in RAS
    img = save_nifti(tmp_path / "a" / "ct.nii.gz", ct, affine)
    lab = save_nifti(tmp_path / "a" / "lab.nii.gz", phantom_label(ct), affine, dtype=np.uint8)
    series = write_dicom_series(tmp_path / "b" / "series", ct, spacing=spacing, origin_lps=origin)
    a = CaseEntry("ct", str(img), str(lab), modality="CT")
    b = CaseEntry("ct", str(series), None, modality="CT")
    cases_a = _cases_json(tmp_path / "a.json", "A", [a])
    write_fingerprint("A", cases_a, tmp_path / "A" / "intensity.json")
    settings = {**NNUNET, "spacing": [2.0, 2.0, 2.5], "size": [16, 16]}
    stores = {}
    for name, entry, cases_json in (("A", a, cases_a), ("B", b, _cases_json(tmp_path / "b.json", "B", [b]))):
        folder = tmp_path / name
        preprocess_case(entry, settings, folder / "ct.h5", name, intensity=tmp_path / "A" / "intensity.json")
        write_index_and_splits(name, [entry], folder, folder / "index.json", folder / "splits.json", seed=0)
        stores[name] = folder
    fingerprint, _ = load_fingerprint(tmp_path / "A" / "intensity.json")
    stored = {name: read_case(folder / "ct.h5") for name, folder in stores.items()}
    for case in stored.values():
        assert json.loads(case.attrs["normalisation"])["mean"] == fingerprint.mean
        norm = json.loads(case.attrs["normalisation"])
        assert {k: v for k, v in norm.items() if k != "antialias_block"} == fingerprint.record()
    np.testing.assert_allclose(stored["A"].image, stored["B"].image, atol=1e-4)
    low, high = fingerprint.output_range
    assert stored["A"].image.min() == pytest.approx(low, abs=1e-5) and stored["A"].image.max() > 1.0  # z-scores
    pretrain = CaseArrays(collect_cases(stores, splits=["train"]))
    finetune = {name: load_cases(folder)[0] for name, folder in stores.items()}
    for i, name in enumerate(pretrain.cases):
        case_name = name.dataset
        np.testing.assert_array_equal(pretrain.slices(i, range(stored[case_name].image.shape[0])), stored[case_name].image)
        np.testing.assert_array_equal(finetune[case_name].image, stored[case_name].image)
        assert finetune[case_name].attrs["normalisation"] == stored[case_name].attrs["normalisation"]


@pytest.mark.slow
def test_workflow_links_a_dataset_to_another_datasets_fingerprint(tmp_path):
    """`intensity_from`: the DICOM dataset's cases are preprocessed with the labelled dataset's
    fingerprint (no fingerprint of its own), through the fingerprint and preprocess rules."""
    ct = phantom_ct((24, 20, 6))
    write_msd(tmp_path / "data" / "msd", {"ct_a": (ct, phantom_label(ct))}, np.diag([-1.0, -1.0, 2.5, 1.0]))
    write_dicom_series(tmp_path / "data" / "dicom" / "s1", ct, spacing=(1.0, 1.0, 2.5))
    (tmp_path / "config.yaml").write_text(
        "results_dir: results\nresources_dir: resources\n"
        "preprocess: {spacing: [2.0, 2.0, 2.5], size: [16, 16], dtype: float32, ct_normalization: nnunet}\n"
        "datasets:\n"
        "  labelled: {format: msd, path: data/msd, modality: CT}\n"
        "  series: {format: dicom, path: data/dicom, modality: CT, intensity_from: labelled}\n",
        encoding="utf-8",
    )
    target = "results/slices/series/s1.h5"
    done = subprocess.run(
        ["snakemake", "-s", str(REPO / "Snakefile"), "--cores", "1", target],
        cwd=tmp_path, capture_output=True, encoding="utf-8", errors="replace",
        env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((tmp_path / "results" / "slices" / "labelled" / "intensity.json").read_text(encoding="utf-8"))
    norm = json.loads(read_case(tmp_path / target).attrs["normalisation"])
    assert norm["method"] == "nnunet" and norm["fingerprint_dataset"] == "labelled"
    assert norm["clip_hu"] == record["clip_hu"] and (norm["mean"], norm["std"]) == (record["mean"], record["std"])
    assert record["foreground"] == "labels"
    assert not (tmp_path / "results" / "slices" / "series" / "intensity.json").exists()


def test_pretraining_views_of_zscored_input_pad_with_air_and_match_the_unit_range_views():
    """The view pipeline is shift/scale equivariant: a z-scored view is the [0, 1] view mapped
    alike, so rotation padding is the background (the minimum, air), not z = 0 (soft tissue)."""
    import torch

    from medclust.data.augment import AugmentSettings, seed_transform_, view_transform

    x = torch.rand(3, 24, 24) * 0.9 + 0.1
    x[:, 0, 0], x[:, -1, -1] = 0.0, 1.0  # [0, 1] exactly, background 0
    low, high = -1.3, 2.3  # the output range of a z-scored CT
    padded_somewhere = False
    for noise in (1.0, 0.0):
        settings = AugmentSettings(crop_scale=(1.0, 1.0), affine_prob=1.0, rotate_deg=30.0, flip_prob=0.0, noise_prob=noise)
        transform = view_transform((24, 24), settings)
        for seed in range(4):
            seed_transform_(transform, seed)
            unit = torch.as_tensor(transform(x))
            seed_transform_(transform, seed)
            scored = torch.as_tensor(transform(x * (high - low) + low))
            torch.testing.assert_close(scored, unit * (high - low) + low, atol=1e-4, rtol=1e-4)
            padded = unit == 0.0  # without noise: where the rotation left the image
            if noise == 0.0 and padded.any():
                padded_somewhere = True
                assert torch.allclose(scored[padded], torch.tensor(low))
    assert padded_somewhere
