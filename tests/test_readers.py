"""Readers (NIfTI, DICOM series, 2D DICOM/PNG) and dataset discovery (msd, manifest, dicom, images)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from data_helpers import (
    LPS_TO_RAS,
    phantom_ct,
    radiograph_pixels,
    save_nifti,
    write_dicom_series,
    write_msd,
    write_radiograph_dicom,
)

from medclust.errors import BadInputError
from medclust.io.readers import image_kind, load_image
from medclust.io.sources import CaseEntry, discover, read_manifest, sanitize_case_id

# --- readers ----------------------------------------------------------------------------------


def test_nifti_keeps_dtype_affine_and_drops_trailing_singletons(tmp_path):
    affine = np.diag([0.7, 0.8, 2.5, 1.0])
    affine[:3, 3] = [1, 2, 3]
    vol = phantom_ct((20, 18, 6))
    data = load_image(save_nifti(tmp_path / "ct.nii.gz", vol[..., None], affine))
    assert data.array.dtype == np.int16 and data.shape == (20, 18, 6)
    np.testing.assert_array_equal(data.array, vol)
    np.testing.assert_allclose(data.affine, affine)
    assert data.spacing == pytest.approx((0.7, 0.8, 2.5))
    assert len(data.meta["sha256"]) == 64
    flat = load_image(save_nifti(tmp_path / "xr.nii", np.arange(12.0).reshape(4, 3, 1), affine))
    assert flat.is_2d and flat.shape == (4, 3)


def test_dicom_series_is_sorted_and_converted_to_ras(tmp_path):
    vol = phantom_ct((16, 12, 5))
    folder = write_dicom_series(tmp_path / "series", vol, spacing=(0.8, 0.9, 2.5), origin_lps=(-20.0, -15.0, 30.0))
    data = load_image(folder)
    assert image_kind(folder) == "dicom_series"
    assert data.shape == (16, 12, 5) and data.modality == "CT"
    np.testing.assert_array_equal(np.asarray(data.array), vol)  # slices sorted by position, x/y not swapped
    lps = np.diag([0.8, 0.9, 2.5, 1.0])
    lps[:3, 3] = [-20.0, -15.0, 30.0]
    np.testing.assert_allclose(data.affine, LPS_TO_RAS @ lps, atol=1e-4)
    assert data.meta["num_files"] == 5


def test_dicom_radiograph_monochrome1_is_inverted(tmp_path):
    pixels = radiograph_pixels(rows=60, cols=40)
    mono1 = load_image(write_radiograph_dicom(tmp_path / "m1.dcm", pixels, monochrome1=True, imager_spacing=(0.2, 0.3)))
    mono2 = load_image(write_radiograph_dicom(tmp_path / "m2.dcm", pixels, monochrome1=False))
    assert mono1.is_2d and mono1.modality == "XR" and mono1.meta["photometric"] == "MONOCHROME1"
    # MONAI 2D order: axis 0 = column, axis 1 = row; spacing (column, row) from ImagerPixelSpacing (row, column)
    assert mono1.shape == (40, 60)
    assert mono1.spacing == pytest.approx((0.3, 0.2))
    dense = (slice(10, 20), slice(15, 30))  # columns 10..19, rows 15..29: the low raw values
    assert mono1.array[dense].mean() > mono1.array.mean()  # dense region bright after inversion
    assert mono2.array[dense].mean() < mono2.array.mean()  # MONOCHROME2 untouched: dense stays dark
    np.testing.assert_allclose(mono1.array, pixels.max() + pixels.min() - pixels.T.astype(np.float64))


def test_png_colour_to_grey_and_monai_axis_order(tmp_path):
    from PIL import Image

    rgb = np.zeros((30, 50, 3), dtype=np.uint8)
    rgb[:10, :, :] = 255
    Image.fromarray(rgb).save(tmp_path / "x.png")
    data = load_image(tmp_path / "x.png")
    assert data.shape == (50, 30) and data.array[:, :10].min() == 255 and data.array[:, 10:].max() == 0


def _palette_label(path: Path) -> np.ndarray:
    """Class indices 0, 1, 2 saved as a palette PNG (black, red, green), the usual mask export."""
    from PIL import Image

    indices = np.zeros((24, 32), np.uint8)
    indices[4:10, 4:12] = 1
    indices[14:20, 10:28] = 2
    image = Image.fromarray(indices, mode="P")
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0])
    image.save(path)
    return indices


def test_a_palette_png_label_keeps_its_class_indices_through_ingest_and_preprocessing(tmp_path):
    from PIL import Image

    from medclust.io.slice_store import read_case
    from medclust.preprocess.ingest import check_case
    from medclust.preprocess.pipeline import preprocess_case

    indices = _palette_label(tmp_path / "mask.png")
    Image.fromarray((np.arange(24 * 32).reshape(24, 32) % 200).astype(np.uint8)).save(tmp_path / "xr.png")
    entry = CaseEntry("xr", str(tmp_path / "xr.png"), label=str(tmp_path / "mask.png"), modality="XR")
    # converted to grey, indices 1 and 2 became 76 and 150: other classes that passed QC
    _, label = check_case(entry)
    np.testing.assert_array_equal(label.array, indices.T)
    store = read_case(preprocess_case(entry, {"spacing": [1.0, 1.0, 1.0], "size": [24, 32]}, tmp_path / "xr.h5", "x"))
    assert sorted(np.unique(store.label).tolist()) == [0, 1, 2]
    # read as an image (not a label), the palette is still shown as grey levels
    assert sorted(np.unique(load_image(tmp_path / "mask.png").array).tolist()) == [0, 76, 150]


def test_palette_png_ground_truth_is_scored_on_its_class_indices(tmp_path):
    from medclust.evaluate.run_records import _load_label_map

    indices = _palette_label(tmp_path / "truth.png")
    data, _, _ = _load_label_map(tmp_path / "truth.png", "label")
    np.testing.assert_array_equal(data, indices.T)


def test_a_png_mask_of_a_dicom_radiograph_takes_the_radiographs_grid(tmp_path):
    # A PNG has no geometry (1 mm assumed), so a mask exported beside a 0.2 mm radiograph was
    # refused as "not on the image grid"; it is on that grid, which the PNG cannot say.
    from PIL import Image

    from medclust.evaluate.run_records import _load_label_map
    from medclust.io.slice_store import read_case
    from medclust.preprocess.ingest import check_case
    from medclust.preprocess.pipeline import preprocess_case

    dcm = write_radiograph_dicom(tmp_path / "cxr.dcm", radiograph_pixels(40, 30), imager_spacing=(0.2, 0.2))
    mask = np.zeros((40, 30), np.uint8)
    mask[10:20, 5:15] = 1
    Image.fromarray(mask).save(tmp_path / "mask.png")
    entry = CaseEntry("cxr", str(dcm), label=str(tmp_path / "mask.png"), modality="XR")
    image, label = check_case(entry)
    np.testing.assert_array_equal(label.affine, image.affine)
    np.testing.assert_array_equal(label.array, mask.T)
    assert label.meta["spacing_source"] == "its image's (ImagerPixelSpacing)"
    store = read_case(preprocess_case(entry, {"spacing": [1.0, 1.0, 1.0], "size": [32, 32]}, tmp_path / "c.h5", "x"))
    assert sorted(np.unique(store.label).tolist()) == [0, 1]
    # scoring places the ground truth the same way (HD95 in the radiograph's mm)
    _, affine, spacing = _load_label_map(tmp_path / "mask.png", "ground-truth label", dcm)
    np.testing.assert_array_equal(affine, image.affine)
    assert spacing[:2] == pytest.approx((0.2, 0.2))
    # a mask of another size is still not on the image grid
    Image.fromarray(mask[:, :20]).save(tmp_path / "small.png")
    with pytest.raises(BadInputError, match="label shape"):
        check_case(CaseEntry("cxr", str(dcm), label=str(tmp_path / "small.png"), modality="XR"))


def test_a_colour_label_is_refused_and_a_grey_one_stored_as_rgb_is_not(tmp_path):
    from PIL import Image

    indices = _palette_label(tmp_path / "mask.png")
    colour = tmp_path / "colour.png"
    Image.open(tmp_path / "mask.png").convert("RGB").save(colour)
    with pytest.raises(BadInputError) as caught:
        load_image(colour, label=True)
    assert str(caught.value) == f"{colour}: colour label image: store class indices as a greyscale or palette PNG"
    grey = tmp_path / "grey.png"
    Image.fromarray(np.repeat(indices[..., None], 3, axis=2)).save(grey)
    np.testing.assert_array_equal(load_image(grey, label=True).array, indices.T)
    Image.fromarray(indices).save(tmp_path / "plain.png")
    np.testing.assert_array_equal(load_image(tmp_path / "plain.png", label=True).array, indices.T)


def test_a_multi_page_tiff_is_refused_not_cut_to_its_first_page(tmp_path):
    from PIL import Image

    pages = [Image.fromarray(np.full((16, 20), 40 * k, np.uint8)) for k in range(3)]
    stack = tmp_path / "stack.tif"
    pages[0].save(stack, save_all=True, append_images=pages[1:])
    with pytest.raises(BadInputError) as caught:
        load_image(stack)
    assert str(caught.value) == f"{stack}: multi-page image (3 pages): store each page as its own file, or a volume as NIfTI"
    pages[0].save(tmp_path / "one.tif")
    assert load_image(tmp_path / "one.tif").shape == (20, 16)


def test_unsupported_and_missing_paths(tmp_path):
    (tmp_path / "notes.txt").write_text("hello", encoding="utf-8")
    with pytest.raises(BadInputError, match="unsupported file type"):
        load_image(tmp_path / "notes.txt")
    with pytest.raises(BadInputError, match="file not found"):
        load_image(tmp_path / "nope.nii.gz")


# --- discovery --------------------------------------------------------------------------------


def _tiny(tmp_path, name, value=0):
    vol = phantom_ct((8, 8, 3), seed=value)
    return save_nifti(tmp_path / name, vol, np.eye(4))


@pytest.mark.parametrize("sep, suffix", [(",", ".csv"), ("\t", ".tsv")])
def test_manifest_csv_tsv_relative_paths_and_optional_columns(tmp_path, sep, suffix):
    sub = tmp_path / "data"
    _tiny(sub / "imgs", "a.nii.gz")
    _tiny(sub / "imgs", "b.nii.gz", 1)
    save_nifti(sub / "labs" / "a.nii.gz", np.zeros((8, 8, 3), np.uint8))
    rows = [
        ["image", "label", "modality", "class_label", "split"],
        ["imgs/a.nii.gz", "labs/a.nii.gz", "CT", "1", "test"],
        ["imgs/b.nii.gz", "", "mri", "nodule", ""],
    ]
    manifest = sub / f"list{suffix}"
    manifest.write_text("\n".join(sep.join(r) for r in rows) + "\n", encoding="utf-8")
    a, b = read_manifest(manifest)
    assert a.error is None and b.error is None
    assert a.image == str(sub / "imgs" / "a.nii.gz") and a.label == str(sub / "labs" / "a.nii.gz")
    assert (a.case_id, a.modality, a.class_label, a.split) == ("a", "CT", 1, "test")
    assert (b.label, b.modality, b.class_label, b.split, b.simulated) == (None, "MR", "nodule", None, False)
    # only the image column, modality from the dataset
    minimal = tmp_path / "min.csv"
    minimal.write_text("image\ndata/imgs/a.nii.gz\n", encoding="utf-8")
    (only,) = read_manifest(minimal, modality="CT")
    assert only.modality == "CT" and only.label is None and only.split is None and only.error is None


def test_manifest_row_problems_are_attached_not_raised(tmp_path):
    _tiny(tmp_path, "a.nii.gz")
    manifest = tmp_path / "m.tsv"
    manifest.write_text("image\tmodality\tsplit\na.nii.gz\tCT\tholdout\nmissing.nii.gz\tCT\t\n", encoding="utf-8")
    bad_split, missing = read_manifest(manifest)
    assert "split 'holdout' is not train, val or test" in str(bad_split.error)
    assert str(missing.error) == f"{tmp_path / 'missing.nii.gz'}: file not found (m.tsv row 3)"
    (tmp_path / "noimage.csv").write_text("path,label\nx,y\n", encoding="utf-8")
    with pytest.raises(BadInputError, match="no 'image' column"):
        read_manifest(tmp_path / "noimage.csv")


def test_manifest_group_and_simulated_columns(tmp_path):
    _tiny(tmp_path, "v0.nii.gz")
    (tmp_path / "m.tsv").write_text("image\tmodality\tsimulated\tsource_case\nv0.nii.gz\tXR\ttrue\tct1\n", encoding="utf-8")
    (entry,) = read_manifest(tmp_path / "m.tsv")
    assert entry.simulated is True and entry.group == "ct1"
    assert CaseEntry.from_dict(entry.to_dict()) == entry


def test_msd_with_and_without_dataset_json(tmp_path):
    vol = phantom_ct((8, 8, 3))
    root = write_msd(tmp_path / "Task", {"lung_001": (vol, vol > 0), "lung_002": (vol, None)}, np.eye(4))
    (root / "imagesTr" / "._lung_001.nii.gz").write_bytes(b"junk")  # macOS resource fork in MSD tars
    entries = discover({"name": "t", "format": "msd", "path": str(root)})
    assert [e.case_id for e in entries] == ["lung_001", "lung_002"]
    assert entries[0].label.endswith("labelsTr/lung_001.nii.gz") and entries[1].label is None
    assert all(e.modality == "CT" for e in entries)
    (root / "dataset.json").unlink()
    again = discover({"name": "t", "format": "msd", "path": str(root), "modality": "MR"})
    assert [e.case_id for e in again] == ["lung_001", "lung_002"] and again[0].modality == "MR"
    assert again[0].label is not None and again[1].label is None


def test_dicom_folder_discovery_one_case_per_series(tmp_path):
    vol = phantom_ct((8, 8, 3))
    write_dicom_series(tmp_path / "dicom" / "patientA" / "ct", vol)
    write_dicom_series(tmp_path / "dicom" / "patientB", vol)
    (tmp_path / "dicom" / "notes.tsv").write_text("x\n", encoding="utf-8")
    entries = discover({"name": "d", "format": "dicom", "path": str(tmp_path / "dicom"), "modality": "CT"})
    assert [e.case_id for e in entries] == ["patientA_ct", "patientB"]
    single = discover({"name": "d", "format": "dicom", "path": str(tmp_path / "dicom" / "patientB")})
    assert [e.case_id for e in single] == ["patientB"] and single[0].modality is None  # header decides later


def test_a_folder_of_radiographs_is_one_2d_case_per_file_beside_its_series(tmp_path):
    # Two views of one radiographic series (they share a SeriesInstanceUID) and one of another,
    # next to a CT series: each radiograph is a 2D image (no position in a volume), the CT one case.
    folder = tmp_path / "study"
    write_dicom_series(folder, phantom_ct((8, 8, 3)))
    import pydicom

    for name, series in (("pa", "1.2.3.1"), ("lateral", "1.2.3.1"), ("other", "1.2.3.2")):
        path = write_radiograph_dicom(folder / f"{name}.dcm", radiograph_pixels(12, 10))
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = series
        ds.save_as(path, enforce_file_format=True)
    entries = discover({"name": "d", "format": "dicom", "path": str(folder)})
    assert [(e.case_id, Path(e.image).name, e.series_uid is None) for e in entries] == [
        ("study_lateral", "lateral.dcm", True), ("study_other", "other.dcm", True), ("study_pa", "pa.dcm", True),
        ("study_s0", "study", False),
    ]
    for entry in entries:
        image = load_image(entry.image, entry.series_uid)
        assert image.array.shape == ((10, 12) if entry.series_uid is None else (8, 8, 3))
    # `medclust predict --input study/` finds the same four images
    from medclust.predict.inputs import collect_inputs

    assert sorted(e.case_id for e in collect_inputs([folder])) == [e.case_id for e in entries]


def test_images_folder_discovery(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    write_radiograph_dicom(tmp_path / "sub" / "b.dcm", radiograph_pixels(8, 8))
    (tmp_path / "sources.json").write_text(json.dumps({}), encoding="utf-8")
    entries = discover({"name": "x", "format": "images", "path": str(tmp_path)})
    assert [(e.case_id, e.modality) for e in entries] == [("a", "XR"), ("sub_b", "XR")]


def test_case_ids_are_sanitised():
    assert sanitize_case_id("LIDC IDRI/0001 (ct)") == "LIDC_IDRI_0001_ct"
    assert sanitize_case_id("__") == "case"
    assert Path(sanitize_case_id("a.b-c")).name == "a.b-c"


def test_modality_and_split_names_fold_to_the_canonical_ones():
    from medclust.io.case_entry import normalise_modality, normalise_split

    assert [normalise_modality(v) for v in (" mri ", "T1w", "dx", "X-ray", "ct", "", None)] == ["MR", "MR", "XR", "XR", "CT", None, None]
    assert [normalise_split(v) for v in ("Training", " VAL ", "ts", "", None)] == ["train", "val", "test", None, None]
    with pytest.raises(ValueError, match=r"unknown modality 'PET' \(expected CT, MR or XR\)"):
        normalise_modality("PET")
    with pytest.raises(ValueError, match="split 'holdout' is not train, val or test"):
        normalise_split("holdout")
