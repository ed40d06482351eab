"""Preprocessing's fast paths give what the general ones give: slab-wise block means (vs one
avg_pool3d), NIfTI and uncompressed DICOM series read unscaled with the slope/intercept applied per
slab (vs nibabel's float64 scaling and GDCM's rescaled int32 volume), bit for bit."""

from __future__ import annotations

import nibabel as nib
import numpy as np
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
    torch.testing.assert_close(slabbed, whole, rtol=0, atol=1e-3)
    assert tuple(slabbed.shape) == (5, 4, 3)
    unscaled = volume.astype(np.float32)
    antialias.block_mean(unscaled, (1, 1, 1), scale=(2.0, 1.0))
    assert np.array_equal(unscaled, volume.astype(np.float32))  # a float32 input is never scaled in place


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
