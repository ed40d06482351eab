"""Preprocessing's fast paths give what the general ones give: slab-wise block means (vs one
avg_pool3d), NIfTI and uncompressed DICOM series read unscaled with the slope/intercept applied per
slab (vs nibabel's float64 scaling and GDCM's rescaled int32 volume), bit for bit."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medclust.io.readers import load_image
from medclust.io.slice_store import read_case
from medclust.io.sources import CaseEntry
from medclust.preprocess import antialias, pipeline
from medclust.preprocess.pipeline import PreprocessSettings, preprocess_case


def test_block_mean_in_slabs_equals_one_pooling_and_applies_the_scale(monkeypatch):
    rng = np.random.default_rng(2)
    volume = rng.integers(-1024, 2000, (9, 12, 13)).astype(np.int16)  # slabs of 4, 4 and 1 plane (< 2)
    factors = (2, 3, 5)
    whole = F.avg_pool3d(torch.from_numpy(volume).float()[None, None] * 2.0 - 1024.0, factors, factors, ceil_mode=True)[0, 0]
    monkeypatch.setattr(antialias, "_SLAB_VOXELS", 12 * 13 * 4)
    slabbed = antialias.block_mean(volume, factors, scale=(2.0, -1024.0))
    assert torch.equal(slabbed, whole)  # integer voxels: the block sums are exact
    assert tuple(slabbed.shape) == (5, 4, 3)
    unscaled = volume.astype(np.float32)
    antialias.block_mean(unscaled, (1, 1, 1), scale=(2.0, 1.0))
    assert np.array_equal(unscaled, volume.astype(np.float32))  # a float32 input is never scaled in place


@pytest.mark.parametrize("factors", [(3, 1, 1), (1, 2, 2), (4, 1, 3)])
def test_block_mean_matches_avg_pool3d_for_plane_and_in_plane_blocks(monkeypatch, factors):
    rng = np.random.default_rng(5)
    volume = rng.integers(0, 256, (23, 10, 11)).astype(np.uint8)  # 23 planes: a partial last block
    monkeypatch.setattr(antialias, "_SLAB_VOXELS", 10 * 11 * 5)  # slabs cut through the blocks' rows
    pooled = F.avg_pool3d(torch.from_numpy(volume).float()[None, None], factors, factors, ceil_mode=True)[0, 0]
    assert torch.equal(antialias.block_mean(volume, factors), pooled)
    noisy = rng.normal(size=(23, 10, 11)).astype(np.float32)  # non-integer values: to float32 rounding
    pooled = F.avg_pool3d(torch.from_numpy(noisy)[None, None], factors, factors, ceil_mode=True)[0, 0]
    torch.testing.assert_close(antialias.block_mean(noisy, factors), pooled, rtol=1e-6, atol=1e-6)


def test_resample_in_source_axis_order_gives_spatial_resample_values():
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    from medclust.preprocess.resample import resample

    rng = np.random.default_rng(6)
    values = torch.from_numpy(rng.random((20, 24, 28)).astype(np.float32))
    # source axes run along y, z, x: a cyclic order, so a wrong inverse permutation shows
    src_affine = np.array([[0, 0, -0.9, 12], [1.1, 0, 0, -8], [0, 2.5, 0, 3], [0, 0, 0, 1]], dtype=float)
    cases = {"axis-aligned": np.diag([1.5, 1.5, 3.0, 1.0])}
    angle = 0.2
    oblique = np.eye(4)
    oblique[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    cases["oblique"] = oblique @ np.diag([1.5, 1.5, 3.0, 1.0])
    for name, dst_affine in cases.items():
        dst_affine[:3, 3] = [-12, -10, -8]
        out = resample(values, src_affine, dst_affine, (16, 18, 14), mode="bilinear")
        ref = SpatialResample(mode="bilinear", padding_mode="zeros", dtype=torch.float32)(
            MetaTensor(values[None], affine=torch.as_tensor(src_affine)),
            dst_affine=torch.as_tensor(dst_affine), spatial_size=(16, 18, 14),
        )[0].numpy()
        assert out.shape == (16, 18, 14) and (ref > 0).mean() > 0.3, name
        if name == "axis-aligned":
            np.testing.assert_array_equal(out, ref)
        else:
            np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)


def test_nifti_with_slope_and_intercept_gives_the_same_store_read_unscaled(tmp_path):
    rng = np.random.default_rng(3)
    stored = rng.integers(0, 3000, (40, 36, 24)).astype(np.int16)
    affine = np.diag([-0.8, -0.8, 2.5, 1.0])
    img = nib.Nifti1Image(stored, affine)
    img.header.set_slope_inter(1.0, -1024.0)
    path = tmp_path / "ct.nii.gz"
    nib.save(img, path)
    raw = load_image(path, unscaled=True)
    assert raw.array.dtype == np.int16 and raw.meta["intensity_scale"] == [1.0, -1024.0]
    assert load_image(path).array.dtype == np.float64  # other readers still get HU
    settings = PreprocessSettings.from_dict({"dtype": "float32", "spacing": [3.0, 3.0, 5.0], "size": [16, 16]})
    out = preprocess_case(CaseEntry(case_id="ct", image=str(path), modality="CT"), settings, tmp_path / "ct.h5", "d")
    scaled = pipeline.preprocess_image(load_image(path), "CT", settings)  # nibabel's float64 HU
    np.testing.assert_array_equal(read_case(out).image, scaled.image)


def _rescaled_series(tmp_path, intercepts):
    """A 6-slice CT series (SimpleITK-written) with RescaleSlope 2 and the given intercepts, and a
    text file beside the slices (it is hashed with the folder, never read as a slice)."""
    import pydicom
    from data_helpers import write_dicom_series

    volume = np.random.default_rng(4).integers(-500, 1500, (20, 18, 6)).astype(np.int16)
    folder = write_dicom_series(tmp_path / "series", volume)
    for path, intercept in zip(sorted(folder.glob("*.dcm")), intercepts):
        ds = pydicom.dcmread(path)
        ds.RescaleSlope, ds.RescaleIntercept = "2", str(intercept)
        ds.save_as(path)
    (folder / "notes.txt").write_text("reader annotations", encoding="utf-8")
    return folder


def test_uncompressed_series_read_once_gives_gdcm_values_and_the_folder_checksum(tmp_path):
    from medclust.preprocess.pipeline import source_sha256

    folder = _rescaled_series(tmp_path, [-1024] * 6)
    fast, gdcm = load_image(folder, unscaled=True), load_image(folder)
    assert fast.array.dtype == np.int16 and fast.meta["intensity_scale"] == [2.0, -1024.0]
    slope, intercept = fast.meta["intensity_scale"]
    np.testing.assert_array_equal(fast.array * slope + intercept, gdcm.array)
    np.testing.assert_array_equal(fast.affine, gdcm.affine)
    assert fast.meta["sha256"] == source_sha256(folder)
    settings = PreprocessSettings.from_dict({"dtype": "float32", "spacing": [1.6, 1.6, 5.0], "size": [16, 16]})
    out = preprocess_case(CaseEntry(case_id="s", image=str(folder), modality="CT"), settings, tmp_path / "s.h5", "d")
    np.testing.assert_array_equal(read_case(out).image, pipeline.preprocess_image(gdcm, "CT", settings).image)
    assert read_case(out).attrs["source_sha256"] == source_sha256(folder)


def test_a_series_with_per_slice_rescale_is_read_by_simpleitk(tmp_path):
    folder = _rescaled_series(tmp_path, [-1024, -1024, -1000, -1024, -1024, -1024])
    fast, gdcm = load_image(folder, unscaled=True), load_image(folder)
    assert "intensity_scale" not in fast.meta
    np.testing.assert_array_equal(fast.array, gdcm.array)
