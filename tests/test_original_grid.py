"""Slice-store labels map back onto the original image grid (medclust.io.original_grid)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from medclust.io.original_grid import (
    resample_to_grid,
    slice_roi_on_original,
    store_index_to_world,
    store_to_original,
    world_to_store_index,
    write_label_nifti,
)
from medclust.io.slice_store import read_case
from medclust.preprocess.pipeline import preprocess_case


def _labelled_volume(shape=(22, 18, 12), seed=0) -> tuple[np.ndarray, np.ndarray]:
    """Smooth blobs (a label map that survives a small resampling) and a matching image."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(float)
    label = np.zeros(shape, np.uint8)
    for value in (1, 2, 5):
        centre = rng.uniform(3, np.array(shape) - 3)
        radius = rng.uniform(3, 5)
        label[np.linalg.norm(grid - centre, axis=-1) <= radius] = value
    image = (label * 100 + rng.normal(0, 5, shape)).astype(np.float32)
    return image, label


def _affine(spacing, angles_deg=(0, 0, 0), flip=(1, 1, 1), origin=(-20.0, 15.0, -40.0)) -> np.ndarray:
    rot = Rotation.from_euler("xyz", angles_deg, degrees=True).as_matrix()
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag(np.asarray(spacing) * np.asarray(flip))
    aff[:3, 3] = origin
    return aff


def _store_roundtrip(tmp_path, affine, target_spacing, size=(32, 32)):
    image, label = _labelled_volume()
    img_path, lab_path = tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), img_path)
    nib.save(nib.Nifti1Image(label, affine), lab_path)
    case = {"case_id": "c0", "image": str(img_path), "label": str(lab_path), "modality": "MR", "simulated": False}
    settings = {"spacing": list(target_spacing), "size": list(size), "slice_axis": 2, "dtype": "float32", "antialias": False}
    out = preprocess_case(case, settings, tmp_path / "c0.h5", "synthetic")
    stored = read_case(out)
    back = store_to_original(np.asarray(stored.label), stored.attrs)
    original = np.asarray(nib.load(lab_path).dataobj)
    return back, original, stored


@pytest.mark.parametrize(
    "affine",
    [
        _affine((1.5, 1.5, 2.5), angles_deg=(12, -8, 25)),  # oblique, RAS-like
        _affine((1.5, 1.5, 2.5), flip=(-1, -1, 1)),  # LPS storage order (DICOM-like)
        _affine((1.5, 1.5, 2.5), angles_deg=(5, 0, -10), flip=(-1, -1, 1)),  # oblique LPS
    ],
    ids=["oblique", "lps", "oblique-lps"],
)
def test_same_spacing_roundtrip_is_exact(tmp_path, affine):
    back, original, stored = _store_roundtrip(tmp_path, affine, target_spacing=(1.5, 1.5, 2.5))
    assert back.shape == original.shape
    assert back.dtype == np.asarray(stored.label).dtype
    np.testing.assert_array_equal(back, original)


def test_resampled_roundtrip_agrees(tmp_path):
    affine = _affine((1.5, 1.5, 2.5), angles_deg=(10, -5, 20), flip=(-1, 1, 1))
    back, original, _ = _store_roundtrip(tmp_path, affine, target_spacing=(1.0, 1.0, 2.0))
    assert back.shape == original.shape
    agreement = (back == original).mean()
    assert agreement >= 0.99, agreement
    for value in (1, 2, 5):  # every class survives
        assert ((back == value) & (original == value)).sum() >= 0.9 * (original == value).sum()


def test_cropped_field_of_view_is_background(tmp_path):
    affine = _affine((1.5, 1.5, 2.5))
    back, original, stored = _store_roundtrip(tmp_path, affine, target_spacing=(1.5, 1.5, 2.5), size=(16, 16))
    assert stored.image.shape[1:] == (16, 16)
    inside = back > 0
    np.testing.assert_array_equal(back[inside], original[inside])  # nothing invented
    assert (original > 0).sum() > inside.sum()  # something was cropped away


def test_fast_path_matches_monai_spatial_resample():
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    rng = np.random.default_rng(3)
    vol = rng.integers(0, 4, (20, 18, 9)).astype(np.int16)
    src = np.eye(4)
    src[:3, :3] = np.diag([2.0, 2.5, 4.0])[:, [2, 0, 1]] * np.array([1, -1, 1])  # permuted + flipped
    src[:3, 3] = [5.0, -3.0, 7.0]
    for dst in (np.diag([0.9, 1.1, 1.7, 1.0]), _affine((0.9, 1.1, 1.7), angles_deg=(0, 0, 11))):
        dst = dst.copy()
        dst[:3, 3] = [-10.0, -30.0, -5.0]
        ours = resample_to_grid(vol, src, dst, (40, 36, 30))
        monai = SpatialResample(mode="nearest", padding_mode="zeros", align_corners=True, dtype=np.float64)(
            MetaTensor(torch.as_tensor(vol, dtype=torch.float32)[None], affine=torch.as_tensor(src)),
            dst_affine=torch.as_tensor(dst),
            spatial_size=(40, 36, 30),
        )[0].numpy()
        # only exact ties (a point half-way between two voxel centres) may round differently
        assert (ours == monai).mean() > 0.99


def test_world_index_roundtrip_and_roi(tmp_path):
    affine = _affine((1.5, 1.5, 2.5), angles_deg=(0, 0, 30))
    _, _, stored = _store_roundtrip(tmp_path, affine, target_spacing=(1.5, 1.5, 2.5))
    idx = np.array([[3.0, 4.5, 7.25], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(world_to_store_index(stored.attrs, store_index_to_world(stored.attrs, idx)), idx, atol=1e-9)
    # the z position of slice s equals the world coordinate along the slice direction
    s = 5
    world = store_index_to_world(stored.attrs, [[s, 0, 0]])[0]
    direction = np.asarray(stored.attrs["store_affine"])[:3, 2]
    assert np.isclose(world @ direction / np.linalg.norm(direction), stored.z_mm[s])

    mask = np.zeros(stored.image.shape[0], bool)
    mask[4:8] = True
    roi = slice_roi_on_original(mask, stored.attrs)
    assert roi.shape == tuple(stored.attrs["original_shape"])
    slab = np.zeros(stored.image.shape, np.uint8)
    slab[4:8] = 1
    via_resample = store_to_original(slab, stored.attrs).astype(bool)
    assert roi.any() and (roi >= via_resample).all()  # same slices; the ROI also covers cropped voxels


def test_write_label_nifti(tmp_path):
    arr = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    aff = _affine((1.0, 2.0, 3.0), angles_deg=(0, 10, 0))
    path = write_label_nifti(tmp_path / "p.nii.gz", arr, aff)
    img = nib.load(path)
    np.testing.assert_array_equal(np.asarray(img.dataobj), arr)
    np.testing.assert_allclose(img.affine, aff, atol=1e-5)
    assert not list(tmp_path.glob("*.tmp*"))
