"""Preprocessing geometry (RAS, spacing, crop/pad, slicing) against nibabel affines, intensities,
2D radiographs, the HDF5 written per case, and the index + seeded case-level splits."""

from __future__ import annotations

import json

import h5py
import nibabel as nib
import numpy as np
import pytest
from data_helpers import (
    oblique_lps_affine,
    phantom_ct,
    phantom_label,
    radiograph_pixels,
    save_nifti,
    world_grid,
    write_dicom_series,
    write_radiograph_dicom,
)

from medclust.io.readers import load_image
from medclust.io.slice_store import REQUIRED_ATTRS, read_case
from medclust.io.sources import CaseEntry
from medclust.preprocess.index import build_index, make_splits, write_index_and_splits
from medclust.preprocess.pipeline import PreprocessSettings, preprocess_case, preprocess_image

GRADIENT = np.array([2.0, -3.0, 5.0])  # HU per mm along RAS x, y, z


def _settings(**overrides) -> PreprocessSettings:
    return PreprocessSettings.from_dict({"dtype": "float32", **overrides})


def _linear_volume(tmp_path, shape=(40, 34, 20), affine=None):
    """A volume whose value is a linear function of the RAS world position (exact under
    trilinear interpolation and block averaging), plus a label of world half-spaces."""
    affine = oblique_lps_affine() if affine is None else affine
    world = world_grid(shape, affine)
    values = (world @ GRADIENT).reshape(shape).astype(np.float32)
    label = ((world[:, 0] > 30).astype(np.int16) + 2 * (world[:, 2] > 25)).reshape(shape).astype(np.int16)
    return (
        save_nifti(tmp_path / "img.nii.gz", values, affine),
        save_nifti(tmp_path / "lab.nii.gz", label, affine),
        values,
        label,
        affine,
    )


def _store_world(result) -> tuple[np.ndarray, np.ndarray]:
    """Stored volume (x, y, z) and the RAS world position of each of its voxels."""
    volume = np.moveaxis(result.image, 0, result.slice_axis)
    return volume, world_grid(volume.shape, result.store_affine)


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("slice_axis", [2, 0])
def test_store_affine_maps_voxels_to_the_same_world_points(tmp_path, slice_axis, antialias):
    img_path, lab_path, values, label, affine = _linear_volume(tmp_path)
    lo, hi = float(values.min()) - 5, float(values.max()) + 5
    settings = _settings(spacing=[2.0, 2.5, 4.0], size=[24, 20], slice_axis=slice_axis, ct_window=[lo, hi], antialias=antialias)
    result = preprocess_image(load_image(img_path), "CT", settings, load_image(lab_path))

    volume, world = _store_world(result)
    in_plane = [a for a in range(3) if a != slice_axis]
    assert [volume.shape[a] for a in in_plane] == [24, 20]
    # RAS: every column of the stored affine points along +R, +A or +S
    dominant = np.argmax(np.abs(result.store_affine[:3, :3]), axis=0)
    assert sorted(dominant) == [0, 1, 2]
    assert all(result.store_affine[dominant[c], c] > 0 for c in range(3))
    np.testing.assert_allclose(np.linalg.norm(result.store_affine[:3, :3], axis=0), [2.0, 2.5, 4.0])
    assert result.target_spacing == pytest.approx([2.0, 2.5, 4.0])

    original_index = (world - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
    margin = 2.0 if antialias else 1.0  # block averaging reaches one more voxel inwards
    inside = np.all((original_index >= margin) & (original_index <= np.array(values.shape) - 1 - margin), axis=1)
    assert inside.sum() > 500
    expected = ((world @ GRADIENT) - lo) / (hi - lo)
    np.testing.assert_allclose(volume.reshape(-1)[inside], expected[inside], atol=1e-4)

    # labels: nearest neighbour of the original grid, as nibabel's affine says
    stored_label = np.moveaxis(result.label, 0, slice_axis).reshape(-1)
    nearest = np.rint(original_index[inside]).astype(int)
    np.testing.assert_array_equal(stored_label[inside], label[tuple(nearest.T)])

    # z positions: one per slice, `spacing` apart along the slice axis
    assert len(result.z_positions_mm) == result.image.shape[0]
    np.testing.assert_allclose(np.diff(result.z_positions_mm), [2.0, 2.5, 4.0][slice_axis])


def test_mapping_labels_back_to_the_original_grid_is_exact(tmp_path):
    """Same spacing, field of view fully inside `size`: only the RAS flip and the padding happen,
    so the label map goes back onto the LPS original exactly (nearest, via store_affine)."""
    from medclust.io.original_grid import store_to_original

    affine = np.diag([-1.5, -1.5, 3.0, 1.0])
    affine[:3, 3] = [30, 20, -10]
    label = phantom_label(phantom_ct((20, 16, 6)))
    image = phantom_ct((20, 16, 6))
    img = save_nifti(tmp_path / "i.nii.gz", image, affine)
    lab = save_nifti(tmp_path / "l.nii.gz", label, affine, dtype=np.uint8)
    case = {"case_id": "c", "image": str(img), "label": str(lab), "modality": "CT"}
    out = preprocess_case(case, {"spacing": [1.5, 1.5, 3.0], "size": [32, 24]}, tmp_path / "c.h5", "d")
    stored = read_case(out)
    assert stored.image.shape == (6, 32, 24)
    back = store_to_original(stored.label, stored.attrs, mode="nearest")
    assert back.shape == label.shape
    np.testing.assert_array_equal(back, label)


def test_ct_window_and_mr_percentiles_map_to_unit_range(tmp_path):
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    ct = phantom_ct((30, 30, 8))
    result = preprocess_image(load_image(save_nifti(tmp_path / "ct.nii.gz", ct, affine)), "CT",
                              _settings(spacing=[2, 2, 2], size=[30, 30], ct_window=[-1000, 1000]))
    assert result.image.min() >= 0 and result.image.max() <= 1
    assert result.image[:, 0, 0].max() < 0.05  # air (about -1000 HU) -> 0
    assert result.normalisation["method"] == "ct_window" and result.normalisation["window_hu"] == [-1000, 1000]

    mr = np.random.default_rng(1).gamma(2.0, 100.0, (30, 30, 8)).astype(np.float32)
    res = preprocess_image(load_image(save_nifti(tmp_path / "mr.nii.gz", mr, affine)), "MR",
                           _settings(spacing=[2, 2, 2], size=[30, 30], mr_percentiles=[1, 99], antialias=False))
    lo, hi = np.percentile(mr, [1, 99])
    assert res.normalisation["values"] == pytest.approx([lo, hi], rel=1e-4)
    assert res.image.min() == 0 and res.image.max() == 1
    assert 0.008 < (res.image > 0.999).mean() < 0.012  # the top 1 % is clipped


def test_antialiasing_removes_a_checkerboard_instead_of_aliasing_it(tmp_path):
    board = (np.indices((64, 64, 8)).sum(axis=0) % 2).astype(np.float32) * 1000.0 - 500
    path = save_nifti(tmp_path / "board.nii.gz", board, np.diag([0.5, 0.5, 1.0, 1.0]))
    common = dict(spacing=[2.0, 2.0, 1.0], size=[16, 16], ct_window=[-500, 500])
    smooth = preprocess_image(load_image(path), "CT", _settings(**common, antialias=True))
    aliased = preprocess_image(load_image(path), "CT", _settings(**common, antialias=False))
    assert smooth.normalisation["antialias_block"] == [4, 4, 1]
    assert np.abs(smooth.image[:, 2:-2, 2:-2] - 0.5).max() < 0.05
    assert aliased.image[:, 2:-2, 2:-2].std() > 0.2


def test_radiograph_fits_size_keeping_aspect(tmp_path):
    pixels = radiograph_pixels(rows=120, cols=60)
    dcm = write_radiograph_dicom(tmp_path / "x.dcm", pixels, imager_spacing=(0.5, 0.5))
    result = preprocess_image(load_image(dcm), "XR", _settings(size=[32, 32]))
    assert result.image.shape == (1, 32, 32) and result.slice_axis == 2
    # 120 rows x 0.5 mm = 60 mm tall fits 32 pixels -> 1.875 mm; 60 cols -> 16 pixels + padding
    assert result.target_spacing[:2] == pytest.approx([1.875, 1.875])
    columns_with_signal = np.flatnonzero(result.image[0].max(axis=1) > 0)
    assert 15 <= len(columns_with_signal) <= 17 and columns_with_signal[0] >= 7
    assert result.image.max() == pytest.approx(1.0) and result.image.min() == 0
    # store_affine: the dense square's centroid maps back onto its place in the original pixels
    original = load_image(dcm)
    weights = np.clip(result.image[0] - np.median(result.image[0][result.image[0] > 0]), 0, None)
    stored_centroid = [(np.indices(weights.shape)[a] * weights).sum() / weights.sum() for a in (0, 1)]
    world = result.store_affine @ np.array([*stored_centroid, 0.0, 1.0])
    original_index = np.linalg.solve(original.affine, world)[:2]
    square = radiograph_pixels(rows=120, cols=60).T < 1000  # (column, row) mask of the dense square
    expected = [np.indices(square.shape)[a][square].mean() for a in (0, 1)]
    np.testing.assert_allclose(original_index, expected, atol=0.5)


def test_preprocess_case_writes_every_contract_attribute(tmp_path):
    vol = phantom_ct((24, 20, 6))
    folder = write_dicom_series(tmp_path / "series", vol, spacing=(1.0, 1.0, 2.5))
    case = CaseEntry(case_id="s1", image=str(folder), modality=None, class_label="nodule")  # header says CT
    out = preprocess_case(case, {"spacing": [2.0, 2.0, 2.5], "size": [16, 16]}, tmp_path / "s1.h5", "dicomset")
    with h5py.File(out) as handle:
        assert set(REQUIRED_ATTRS) <= set(handle.attrs) and "class_label" in handle.attrs
        assert handle["image"].dtype == np.float16 and handle["image"].shape == (6, 16, 16)
        assert "label" not in handle
    attrs = read_case(out).attrs
    assert attrs["original_shape"] == [24, 20, 6] and attrs["original_spacing"] == pytest.approx([1, 1, 2.5])
    assert attrs["dataset"] == "dicomset" and attrs["class_label"] == "nodule" and attrs["simulated"] is False
    assert attrs["modality"] == "CT"
    assert json.loads(attrs["normalisation"])["window_hu"] == [-1000.0, 1000.0]
    assert len(attrs["z_positions_mm"]) == 6 and len(attrs["source_sha256"]) == 64
    assert np.asarray(attrs["store_affine"]).shape == (4, 4)


def test_nifti_and_dicom_of_the_same_volume_give_the_same_store(tmp_path):
    vol = phantom_ct((24, 20, 6))
    folder = write_dicom_series(tmp_path / "series", vol, spacing=(1.0, 1.0, 2.5), origin_lps=(-5.0, 7.0, 30.0))
    lps = np.diag([1.0, 1.0, 2.5, 1.0])
    lps[:3, 3] = [-5.0, 7.0, 30.0]
    nifti = save_nifti(tmp_path / "same.nii.gz", vol, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps)
    settings = _settings(spacing=[2.0, 2.0, 2.5], size=[16, 16])
    a = preprocess_image(load_image(folder), "CT", settings)
    b = preprocess_image(load_image(nifti), "CT", settings)
    np.testing.assert_allclose(a.store_affine, b.store_affine, atol=1e-4)
    np.testing.assert_allclose(a.image, b.image, atol=1e-5)


def test_one_slice_of_a_ct_is_stored_like_that_slice_of_the_volume(tmp_path):
    # A one-slice CT (a NIfTI X x Y x 1, or a single slice file of a DICOM series) is a thin volume:
    # oriented to RAS and resampled to the target spacing like the volume it comes from, not fit
    # to size unoriented like a radiograph (which mirrored it against the model's volumes).
    vol = phantom_ct((24, 20, 6))
    folder = write_dicom_series(tmp_path / "series", vol, spacing=(1.0, 1.0, 2.5), origin_lps=(-5.0, 7.0, 30.0))
    settings = _settings(spacing=[2.0, 2.0, 2.5], size=[16, 16])
    whole = preprocess_image(load_image(folder), "CT", settings)
    lps = np.diag([1.0, 1.0, 2.5, 1.0])
    lps[:3, 3] = [-5.0, 7.0, 30.0 + 2.5 * 2]
    one_nifti = load_image(save_nifti(tmp_path / "one.nii.gz", vol[:, :, 2:3], np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps))
    one_dicom = load_image(folder / "slice004.dcm")  # written last-first: file 4 of 6 is z index 2
    assert one_nifti.is_2d and one_dicom.is_2d
    for one in (one_nifti, one_dicom):
        thin = preprocess_image(one, "CT", settings)
        assert thin.image.shape == (1, 16, 16) and thin.slice_axis == 2
        np.testing.assert_allclose(thin.image[0], whole.image[2], atol=1e-5)
        np.testing.assert_allclose(thin.store_affine[:3, :2], whole.store_affine[:3, :2], atol=1e-4)
        assert thin.z_positions_mm == pytest.approx([whole.z_positions_mm[2]], abs=1e-4)


# --- index and splits -------------------------------------------------------------------------


def _cases(n, **kw):
    return [CaseEntry(case_id=f"c{i:02d}", image=f"/x/{i}.nii.gz", **kw) for i in range(n)]


def test_splits_are_seeded_case_level_and_cover_every_case():
    cases = _cases(20)
    a = make_splits("d", cases, seed=3, val_fraction=0.2, test_fraction=0.25)
    b = make_splits("d", cases, seed=3, val_fraction=0.2, test_fraction=0.25)
    c = make_splits("d", cases, seed=4, val_fraction=0.2, test_fraction=0.25)
    assert a == b and a != c
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (11, 4, 5)
    assert sorted(a["train"] + a["val"] + a["test"]) == [x.case_id for x in cases]
    assert a["seed"] == 3 and a["dataset"] == "d"


def test_manifest_split_wins_groups_stay_together_and_tiny_datasets_train():
    cases = _cases(9)
    cases[0].split = "test"
    cases[1].split = "val"
    for c in cases[2:6]:
        c.group = "patientA"
    cases[6].group = "patientA"
    cases[6].split = "val"  # a fixed member pulls its whole group
    s = make_splits("d", cases, seed=0, val_fraction=0.3, test_fraction=0.3)
    assert "c00" in s["test"] and "c01" in s["val"]
    assert {"c02", "c03", "c04", "c05", "c06"} <= set(s["val"])
    # one or two cases: everything free goes to train
    assert make_splits("d", _cases(2), 0, 0.2, 0.2) == {"dataset": "d", "seed": 0, "train": ["c00", "c01"], "val": [], "test": []}
    three = make_splits("d", _cases(3), 0, 0.2, 0.2)
    assert (len(three["train"]), len(three["val"]), len(three["test"])) == (1, 1, 1)
    fixed = _cases(2)
    fixed[1].split = "test"
    assert make_splits("d", fixed, 0, 0.2, 0.2)["test"] == ["c01"]
    with pytest.raises(Exception, match="must be < 1"):
        make_splits("d", cases, 0, 0.6, 0.5)


def test_index_reads_the_store(tmp_path):
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    image = phantom_ct((16, 16, 4))
    img = save_nifti(tmp_path / "a.nii.gz", image, affine)
    lab = save_nifti(tmp_path / "al.nii.gz", phantom_label(image), affine, dtype=np.uint8)
    cases = [CaseEntry("a", str(img), str(lab), "CT", class_label=2), CaseEntry("b", str(img), None, "CT")]
    for case in cases:
        preprocess_case(case, {"spacing": [2, 2, 3], "size": [16, 16]}, tmp_path / "store" / f"{case.case_id}.h5", "d")
    index, splits = write_index_and_splits(
        "d", cases, tmp_path / "store", tmp_path / "store" / "index.json", tmp_path / "store" / "splits.json", seed=0
    )
    assert index["cases"][0] == {
        "case_id": "a", "file": "a.h5", "modality": "CT", "num_slices": 4, "shape": [4, 16, 16],
        "label_classes": [0, 1, 2], "simulated": False, "class_label": 2,
    }
    assert index["cases"][1]["label_classes"] == [] and index["cases"][1]["class_label"] is None
    assert json.loads((tmp_path / "store" / "splits.json").read_text(encoding="utf-8"))["train"] == ["a", "b"]
    with pytest.raises(Exception, match="slice store file missing"):
        build_index("d", ["zzz"], tmp_path / "store")


def test_settings_defaults_come_from_the_schema():
    from medclust.config import load_schema

    defaults = load_schema()["properties"]["preprocess"]["properties"]
    settings = PreprocessSettings.from_dict({})
    assert list(settings.spacing) == defaults["spacing"]["default"]
    assert settings.antialias is defaults["antialias"]["default"]
    with pytest.raises(Exception, match="unknown key"):
        PreprocessSettings.from_dict({"spacingg": [1, 1, 1]})


def test_nibabel_reference_affine_is_respected_for_lps_input(tmp_path):
    """nibabel's as_closest_canonical is the reference for RAS reorientation without resampling."""
    affine = np.diag([-2.0, -2.0, 3.0, 1.0])
    vol = phantom_ct((16, 12, 4))
    path = save_nifti(tmp_path / "lps.nii.gz", vol, affine)
    canonical = nib.as_closest_canonical(nib.load(str(path)))
    result = preprocess_image(load_image(path), "CT", _settings(spacing=[2, 2, 3], size=[16, 12], ct_window=[-1000, 1000]))
    np.testing.assert_allclose(result.store_affine, canonical.affine, atol=1e-6)
    expected = np.clip((np.asarray(canonical.dataobj, dtype=np.float32) + 1000) / 2000, 0, 1)
    np.testing.assert_allclose(np.moveaxis(result.image, 0, 2), expected, atol=1e-5)


def test_cli_preprocess_standalone_image(tmp_path):
    from medclust.cli import main

    path = save_nifti(tmp_path / "vol.nii.gz", phantom_ct((20, 16, 6)), np.diag([2.0, 2.0, 3.0, 1.0]))
    settings = json.dumps({"spacing": [4.0, 4.0, 3.0], "size": [12, 12], "dtype": "float32"})
    code = main(["preprocess", "--image", str(path), "--modality", "CT", "--settings", settings, "--out", str(tmp_path / "v.h5")])
    assert code == 0
    case = read_case(tmp_path / "v.h5")
    assert case.image.shape == (6, 12, 12) and case.image.dtype == np.float32 and case.case_id == "vol"
