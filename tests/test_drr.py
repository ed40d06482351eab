"""Simulated radiographs: analytic line integrals of a phantom, label projection, dataset output."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medclust.errors import MedclustError
from medclust.preprocess.drr import (
    DrrRenderer,
    _nearest_samples,
    _project_bilinear,
    _ray_samples,
    drr_shape,
    hu_to_attenuation,
    render_drr,
)
from medclust.preprocess.drr_dataset import simulate_drr_dataset

MU = 0.02
SPACING = (0.5, 0.5, 2.0)


def cube_phantom() -> tuple[np.ndarray, np.ndarray]:
    """Air volume 40 x 40 x 82 mm with a 20 mm water cube (HU 0) at its centre, labelled.

    The cube's patient-left half (low x index = patient left in RAS) is label 7, the rest 5.
    """
    hu = np.full((81, 81, 42), -1000.0, dtype=np.float32)
    lab = np.zeros(hu.shape, dtype=np.uint8)
    # x, y: voxels 20..60 = 40 voxels * 0.5 mm = 20 mm centred on index 40; z: 10 voxels * 2 mm.
    hu[20:60, 20:60, 16:26] = 0.0
    lab[20:60, 20:60, 16:26] = 5
    lab[20:30, 20:60, 16:26] = 7
    return hu, lab


def test_attenuation_from_hu() -> None:
    mu = hu_to_attenuation(np.array([-2048.0, -1000.0, 0.0, 1000.0]), MU)
    assert mu == pytest.approx([0.0, 0.0, MU, 2 * MU])


@pytest.mark.parametrize("angle", [0.0, 90.0, 180.0, 270.0])
def test_cube_line_integral_is_path_length_times_mu(angle: float) -> None:
    hu, _ = cube_phantom()
    image, label = render_drr(hu, SPACING, angle, MU, pixel_spacing=1.0)
    assert label is None
    assert image.dtype == np.float32 and image.shape == drr_shape(hu.shape, SPACING, angle, 1.0)[:2]
    rows, cols = image.shape
    centre = image[rows // 2 - 3 : rows // 2 + 3, cols // 2 - 3 : cols // 2 + 3]
    # 20 mm of water along every central ray, at any of the four right angles.
    assert centre == pytest.approx(np.full(centre.shape, 20 * MU), abs=1e-5)
    assert image[:3].max() == 0.0 and image[:, :3].max() == 0.0  # air around the cube
    # The cube's 20 mm width (+- one pixel of linear interpolation) at half maximum.
    central_row = image[rows // 2]
    assert abs(int((central_row > 10 * MU).sum()) - 20) <= 1
    central_col = image[:, cols // 2]
    assert abs(int((central_col > 10 * MU).sum()) - 20) <= 1


def test_oblique_ray_through_the_cube_diagonal() -> None:
    hu, _ = cube_phantom()
    image, _ = render_drr(hu, SPACING, 45.0, MU, pixel_spacing=0.5)
    # Through the centre at 45 degrees the path is the square's diagonal, 20*sqrt(2) mm.
    assert image.max() == pytest.approx(20 * math.sqrt(2) * MU, rel=0.03)


def test_label_projection_longest_path_and_display_orientation() -> None:
    hu, lab = cube_phantom()
    rows = None
    for angle, left_label, right_label in [(0.0, 5, 7), (180.0, 7, 5)]:
        image, label = render_drr(hu, SPACING, angle, MU, 1.0, labels=lab)
        assert label.dtype == np.uint8 and label.shape == image.shape
        rows, cols = label.shape
        row = label[rows // 2]
        inside = np.flatnonzero(row)
        # PA (0): patient right (label 5 half) on the viewer's left; AP (180) mirrored.
        assert row[inside[0]] == left_label and row[inside[-1]] == right_label
        assert set(np.unique(label)) == {0, 5, 7}
        assert np.all(image[label > 0] > 0)  # a ray that crosses a structure crosses water
        assert label[rows // 2, cols // 2] > 0 and label[0, 0] == 0
    # Lateral: the ray crosses 5 mm of label 7 and 15 mm of label 5 -> label 5 everywhere.
    _, label = render_drr(hu, SPACING, 90.0, MU, 1.0, labels=lab)
    assert set(np.unique(label)) == {0, 5}
    assert label[rows // 2, label.shape[1] // 2] == 5


def test_threads_give_the_same_views() -> None:
    hu, lab = cube_phantom()
    hu[30:50, 25:35, 5:40] = 400.0  # something off-centre in every slab the threads split
    lab[30:50, 25:35, 5:40] = 9
    single = DrrRenderer(hu, SPACING, MU, lab, threads=1)
    for threads in (2, 3, 64):  # 64 > slices: capped at one slice per thread
        split = DrrRenderer(hu, SPACING, MU, lab, threads=threads)
        for angle in (0.0, 37.0):
            (a, la), (b, lb) = single.render(angle, 1.0), split.render(angle, 1.0)
            assert np.array_equal(a, b) and np.array_equal(la, lb)
            assert (la == 9).any() and a.max() > 0


@pytest.mark.parametrize(
    "plane, offset",
    [
        # oblique and scaled: some samples fall outside the slice, some a fraction beyond an edge
        (np.array([[0.83, -0.61], [0.55, 0.9]]), np.array([-3.3, -9.7])),
        # axis-aligned with a flip: samples on voxel centres, half-way between them (ties), on
        # the last voxel's centre and half a voxel beyond it
        (np.array([[0.0, 0.5], [-1.0, 0.0]]), np.array([-1.0, 53.5])),
    ],
)
@pytest.mark.parametrize("threads", [1, 2])
def test_in_plane_sampling_is_scipys_constant_mode(plane: np.ndarray, offset: np.ndarray, threads: int) -> None:
    """The shared-grid sampling gives what per-slice ``ndimage.affine_transform`` (order 1 and
    0, ``mode="constant"``: 0 beyond the edges, no blending with them) gives."""
    from scipy import ndimage

    rng = np.random.default_rng(3)
    slices = rng.random((5, 37, 53), dtype=np.float32)  # not square: a swapped axis shows
    codes = rng.integers(1, 6, size=slices.shape, dtype=np.uint8)
    cols, depth = 41, 67
    sample_i, sample_j, inside = _ray_samples(plane, offset, cols, depth, slices.shape[1:])
    assert 0 < inside.mean() < 1
    projection = _project_bilinear(slices, sample_i, sample_j, inside, threads, chunk=2)
    nearest, outside = _nearest_samples(sample_i, sample_j, inside, slices.shape[2])
    for k in range(len(slices)):
        bilinear = ndimage.affine_transform(slices[k], plane, offset, output_shape=(cols, depth), order=1, mode="constant")
        np.testing.assert_allclose(projection[k], bilinear.sum(axis=1, dtype=np.float64), rtol=1e-6, atol=1e-6)
        picked = codes[k].reshape(-1).take(nearest)
        picked[outside] = 0
        expected = ndimage.affine_transform(codes[k], plane, offset, output_shape=(cols, depth), order=0, mode="constant")
        assert np.array_equal(picked.reshape(cols, depth), expected)


def test_labels_on_another_grid_are_rejected() -> None:
    hu, lab = cube_phantom()
    with pytest.raises(MedclustError, match="label shape"):
        render_drr(hu, SPACING, 0.0, MU, 1.0, labels=lab[:-1])
    with pytest.raises(MedclustError, match="3D volume"):
        render_drr(hu[..., 0], SPACING, 0.0, MU, 1.0)


def _write_case(folder: Path) -> tuple[Path, Path]:
    hu, lab = cube_phantom()
    affine = np.diag([*SPACING, 1.0])
    # Store in LAS order (like the real chest CT) to exercise the RAS reorientation.
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = (hu.shape[0] - 1) * SPACING[0]
    las_affine = affine @ flip
    image = folder / "ct.nii.gz"
    label = folder / "ct_label.nii.gz"
    nib.save(nib.Nifti1Image(hu[::-1].astype(np.int16), las_affine), str(image))
    nib.save(nib.Nifti1Image(lab[::-1], las_affine), str(label))
    return image, label


def test_simulate_dataset_writes_marked_nifti_and_manifest(tmp_path: Path) -> None:
    image, label = _write_case(tmp_path)
    cases = tmp_path / "cases.json"
    cases.write_text(
        json.dumps(
            {
                "dataset": "ct",
                "cases": [
                    {"case_id": "c1", "image": str(image), "label": "ct_label.nii.gz", "modality": "CT", "split": "test", "simulated": False},
                    {"case_id": "xr", "image": str(image), "label": None, "modality": "XR", "split": None, "simulated": False},
                ],
            }
        ),
        encoding="utf-8",
    )
    out = tmp_path / "drr"
    manifest = simulate_drr_dataset(cases, out, {"angles": [0, 90], "mu_water": MU, "pixel_spacing": 1.0})
    with open(manifest, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert [r["image"] for r in rows] == ["images/c1_drr000.nii.gz", "images/c1_drr090.nii.gz"]
    assert all(r["simulated"] == "true" and r["modality"] == "XR" and r["split"] == "test" for r in rows)
    assert all(r["source_case"] == "c1" for r in rows)

    img = nib.load(str(out / rows[0]["image"]))
    lab = nib.load(str(out / rows[0]["label"]))
    assert b"SIMULATED" in img.header["descrip"].tobytes()
    assert np.allclose(img.affine, np.diag([1.0, 1.0, 1.0, 1.0]))
    data = np.asarray(img.dataobj)
    hu, lab_ras = cube_phantom()
    expected, expected_label = render_drr(hu, SPACING, 0.0, MU, 1.0, labels=lab_ras)
    # NIfTI axis 0 = image column: the stored array is the displayed image transposed.
    assert data.shape == expected.T.shape
    assert np.allclose(data, expected.T, atol=1e-5)
    assert np.asarray(lab.dataobj).dtype == np.uint8
    assert np.array_equal(np.asarray(lab.dataobj), expected_label.T)
    record = json.loads((out / "drr.json").read_text(encoding="utf-8"))
    assert record["simulated"] is True and len(record["images"]) == 2
    assert (out / "provenance.json").is_file()


def test_simulate_dataset_without_ct_cases_fails_clearly(tmp_path: Path) -> None:
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps({"dataset": "x", "cases": []}), encoding="utf-8")
    with pytest.raises(MedclustError, match="no CT cases"):
        simulate_drr_dataset(cases, tmp_path / "out", {})
    assert not (tmp_path / "out" / "manifest.tsv").exists()
