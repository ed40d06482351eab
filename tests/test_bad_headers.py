"""Image headers that lie, written as real NIfTI / NRRD / DICOM bytes: a zero, NaN or singular
affine, a zero voxel size, a tiny file claiming a huge image, an empty or non-NIfTI gzip file.
Each is one line `file: reason` at QC (before any voxel is read), a skipped row of the QC table
under `on_bad_input: skip` while the other cases go on through preprocessing, and nothing
partial is written."""

from __future__ import annotations

import csv
import gzip
import json
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from data_helpers import phantom_ct, radiograph_pixels, save_nifti, set_raw_value, write_radiograph_dicom

from medclust.cli import main
from medclust.errors import BadInputError
from medclust.io.readers import load_image
from medclust.io.slice_store import read_case
from medclust.preprocess.ingest import ingest_dataset, read_cases
from medclust.preprocess.pipeline import preprocess_case

AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])
PREP = {"spacing": [4.0, 4.0, 3.0], "size": [8, 8], "ct_normalization": "window"}  # no fingerprint needed
VOLUME = phantom_ct((12, 10, 4))


def write_raw_nifti(path: Path, array: np.ndarray, *, srow=None, pixdim=None, shape=None, qform_code=0, sform_code=1) -> Path:
    """A NIfTI-1 file whose header fields are set directly (nibabel's writer would repair them)."""
    array = np.asarray(array)
    header = nib.Nifti1Header()
    header.set_data_dtype(array.dtype)
    header.set_data_shape(shape or array.shape)
    header["vox_offset"] = 352
    if pixdim is not None:
        values = header["pixdim"].copy()
        values[1 : 1 + len(pixdim)] = pixdim
        header["pixdim"] = values
    srow = np.asarray(AFFINE[:3] if srow is None else srow, dtype=np.float64)
    header["srow_x"], header["srow_y"], header["srow_z"] = srow
    header["sform_code"], header["qform_code"] = sform_code, qform_code
    raw = header.binaryblock + b"\0" * 4 + array.tobytes(order="F")
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


def _singular() -> np.ndarray:
    srow = AFFINE[:3].copy()
    srow[:, 2] = srow[:, 0]  # the z axis points along x
    return srow


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _nrrd(path: Path, fields: str, data: bytes, sizes: str = "12 10 4") -> Path:
    header = f"NRRD0004\ntype: short\ndimension: 3\nsizes: {sizes}\nendian: little\n{fields}\n\n"
    path.write_bytes(header.encode("ascii") + data)
    return path


RAW = np.ascontiguousarray(VOLUME.T).tobytes()  # NRRD is x fastest


def _radiograph_value(path: Path, keyword: str, bad: str) -> Path:
    """A radiograph whose ``keyword`` reads ``bad`` (as some converters write it)."""
    import pydicom

    write_radiograph_dicom(path, radiograph_pixels(20, 16))
    ds = pydicom.dcmread(path)
    setattr(ds, keyword, "1")
    ds.save_as(path)
    return set_raw_value(path, keyword, bad)


# name -> (make(folder) -> file, expected reason (or a function of the file))
BAD: dict[str, tuple] = {
    "zero_affine": (
        lambda d: write_raw_nifti(d / "zero_affine.nii.gz", VOLUME, srow=np.zeros((3, 4))),
        "invalid geometry: voxel size 0x0x0 mm in the header (a voxel size is zero)",
    ),
    "nan_affine": (
        lambda d: write_raw_nifti(d / "nan_affine.nii.gz", VOLUME, srow=np.where(np.eye(3, 4) > 0, np.nan, 0.0)),
        "invalid geometry: the affine (voxel -> world matrix) in the header has NaN/Inf values",
    ),
    "singular_affine": (
        lambda d: write_raw_nifti(d / "singular_affine.nii.gz", VOLUME, srow=_singular()),
        "invalid geometry: the affine in the header is singular (two voxel axes point the same way)",
    ),
    "zero_voxel_qform": (
        lambda d: write_raw_nifti(d / "zero_voxel_qform.nii.gz", VOLUME, pixdim=(1.0, 0.0, 2.0), sform_code=0, qform_code=1),
        "invalid geometry: voxel size 1x0x2 mm in the header (pixdim); each must be positive",
    ),
    "zero_voxel_no_orientation": (
        lambda d: write_raw_nifti(d / "zero_voxel_no_orientation.nii", VOLUME, pixdim=(0.0, 1.0, 2.0), sform_code=0),
        "invalid geometry: voxel size 0x1x2 mm in the header (pixdim); each must be positive",
    ),
    "huge_claim": (
        # under max_voxels, so only the size check can stop it (it used to allocate 1.8 GB first)
        lambda d: write_raw_nifti(d / "huge_claim.nii.gz", np.zeros((2, 2, 2), np.int16), shape=(1000, 1000, 900)),
        "truncated or corrupt file: the header claims 1000x1000x900 int16 voxels (1,800,000,352 bytes with the "
        "header) but the file holds 368 bytes after decompression",
    ),
    "over_max_voxels": (
        lambda d: write_raw_nifti(d / "over_max_voxels.nii.gz", np.zeros((2, 2, 2), np.int16), shape=(4000, 4000, 4000)),
        "the header claims 4000x4000x4000 = 64,000,000,000 voxels, more than max_voxels (1,000,000,000); raise "
        "max_voxels in the config if the image is real",
    ),
    "truncated_nii": (
        lambda d: _write(d / "truncated_nii.nii", write_raw_nifti(d / "truncated_nii.nii", VOLUME).read_bytes()[:500]),
        "truncated or corrupt file: the header claims 12x10x4 int16 voxels (1,312 bytes with the header) but the file "
        "holds 500 bytes",
    ),
    "empty": (lambda d: _write(d / "empty.nii.gz", b""), "empty image file (0 bytes)"),
    "gzip_of_nothing": (
        lambda d: _write(d / "gzip_of_nothing.nii.gz", gzip.compress(b"")),
        "empty image file (0 bytes after decompression): no NIfTI header",
    ),
    "gzip_not_nifti": (
        lambda d: _write(d / "gzip_not_nifti.nii.gz", gzip.compress(b"if only this were a scan\n" * 40)),
        "not a NIfTI image (gzip-compressed data without a NIfTI header inside)",
    ),
    "nrrd_truncated": (
        lambda d: _nrrd(d / "nrrd_truncated.nrrd", "encoding: raw\nspacings: 1 1 2", RAW[:100]),
        "truncated or corrupt file: the header claims 12x10x4 voxels (960 bytes) but the file holds 100 bytes of data",
    ),
    "nrrd_nan_spacing": (
        lambda d: _nrrd(d / "nrrd_nan_spacing.nrrd", "encoding: raw\nspacings: 1 nan 2", RAW),
        "invalid geometry: spacing 1 nan 2 in the header (NaN = unknown voxel size)",
    ),
    "nrrd_no_space": (
        # ITK took a NRRD without a patient frame as LPS: a guess that mirrors it whenever wrong
        lambda d: _nrrd(d / "nrrd_no_space.nrrd", "encoding: raw\nspacings: 1 1 2", RAW),
        "invalid geometry: no 'space:' field, so its orientation in the patient is unknown; write the file with "
        "`space: left-posterior-superior` (or right-/left-anterior-superior) if that is what its axes are",
    ),
    "nrrd_scanner_space": (
        lambda d: _nrrd(d / "nrrd_scanner_space.nrrd", "encoding: raw\nspace: scanner-xyz\n"
                        "space directions: (1,0,0) (0,1,0) (0,0,2)", RAW),  # fmt: skip
        "invalid geometry: 'space: scanner-xyz' is not a patient frame, so its orientation in the patient is unknown; "
        "write the file with `space: left-posterior-superior` (or right-/left-anterior-superior) if that is what its "
        "axes are",
    ),
    "nrrd_zero_spacing": (
        lambda d: _nrrd(d / "nrrd_zero_spacing.nrrd", "encoding: raw\nspacings: 1 0 2", RAW),
        "cannot read image: axis 1 spacing (0) invalid",
    ),
    "nrrd_huge_gzip": (
        lambda d: _nrrd(d / "nrrd_huge_gzip.nrrd", "encoding: gzip\nspacings: 1 1 2", gzip.compress(b"\0" * 1000), sizes="900 900 900"),
        "truncated or corrupt file: the header claims 900x900x900 voxels (1,458,000,000 bytes), more than 29 bytes of "
        "compressed data can hold",
    ),
    "radiograph_zero_spacing": (
        lambda d: write_radiograph_dicom(d / "radiograph_zero_spacing.dcm", radiograph_pixels(20, 16), imager_spacing=(0.0, 0.0)),
        "invalid geometry: ImagerPixelSpacing 0\\0 mm (an uncalibrated detector: its pixel size is unknown); "
        "set the dataset's assume_pixel_spacing to accept it",
    ),
    # these crashed with a NumPy/int() traceback naming no file, which `skip` could not skip
    "radiograph_bad_slope": (
        lambda d: _radiograph_value(d / "radiograph_bad_slope.dcm", "RescaleSlope", "1.7x"),
        "RescaleSlope '1.7x' is not a number",
    ),
    "radiograph_bad_frames": (
        lambda d: _radiograph_value(d / "radiograph_bad_frames.dcm", "NumberOfFrames", "3x"),
        "NumberOfFrames '3x' is not a number",
    ),
    "radiograph_negative_spacing": (
        lambda d: write_radiograph_dicom(d / "radiograph_negative_spacing.dcm", radiograph_pixels(20, 16), imager_spacing=(-0.2, 0.2)),
        "invalid geometry: ImagerPixelSpacing -0.2\\0.2 mm (each must be a positive number)",
    ),
}


def _good(folder: Path) -> Path:
    save_nifti(folder / "good_seg.nii.gz", (VOLUME > 0).astype(np.uint8), AFFINE)
    return save_nifti(folder / "good.nii.gz", VOLUME, AFFINE)


def _manifest(folder: Path, images: list[Path]) -> Path:
    rows = ["image\tlabel\tmodality"]
    for image in images:
        label = "good_seg.nii.gz" if image.name == "good.nii.gz" else ""
        modality = "XR" if image.suffix == ".dcm" else "CT"
        rows.append(f"{image.name}\t{label}\t{modality}")
    path = folder / "manifest.tsv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def _settings(manifest: Path, mode: str) -> dict:
    return {"name": "hdr", "format": "manifest", "path": str(manifest), "on_bad_input": mode}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_fail_mode_is_one_line_naming_the_file_and_the_reason(tmp_path, capsys, kind):
    data = tmp_path / "data"
    data.mkdir()
    bad = BAD[kind][0](data)
    manifest = _manifest(data, [_good(data), bad])
    out = tmp_path / "out"
    code = main(["ingest", "--settings", json.dumps(_settings(manifest, "fail")), "--qc", str(out / "q.tsv"), "--cases", str(out / "c.json")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert err[-1] == f"medclust ingest: error: {bad}: {BAD[kind][1]}"
    assert not out.exists()


def test_skip_mode_records_each_and_preprocesses_the_rest(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    kinds = sorted(BAD)
    bad = [BAD[k][0](data) for k in kinds]
    manifest = _manifest(data, [_good(data), *bad])
    out = tmp_path / "out"
    records = ingest_dataset(_settings(manifest, "skip"), out / "qc.tsv", out / "cases.json")
    with open(out / "qc.tsv", encoding="utf-8") as handle:
        table = list(csv.DictReader(handle, delimiter="\t"))
    assert [(r["case_id"], r["status"]) for r in table] == [("good", "ok")] + [(k, "skipped") for k in kinds]
    for kind, path, row in zip(kinds, bad, table[1:]):
        assert (row["path"], row["reason"]) == (str(path), BAD[kind][1])
    assert [r.status for r in records].count("ok") == 1
    # the geometry problems used to pass QC and crash here; now only the good case gets here
    _, cases = read_cases(out / "cases.json")
    assert [c.case_id for c in cases] == ["good"]
    case = read_case(preprocess_case(cases[0], PREP, out / "good.h5", "hdr"))
    assert case.image.shape == (4, 8, 8) and case.label is not None
    assert sorted(p.name for p in out.iterdir()) == ["cases.json", "good.h5", "qc.tsv"]


def test_ingest_publishes_its_qc_table_and_case_list_together(tmp_path, monkeypatch):
    import medclust.preprocess.ingest as ingest

    data = tmp_path / "data"
    data.mkdir()
    manifest = _manifest(data, [_good(data)])

    def killed(*args, **kwargs):  # the job dies between the two outputs
        raise KeyboardInterrupt

    monkeypatch.setattr(ingest, "write_json_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        ingest_dataset(_settings(manifest, "fail"), tmp_path / "out" / "qc.tsv", tmp_path / "out" / "cases.json")
    out = tmp_path / "out"
    assert not out.exists() or not any(out.iterdir())  # neither output, and no temporary file


def test_a_tiny_file_claiming_a_huge_volume_is_refused_before_allocating(tmp_path):
    """400^3 int16 claimed (128 MB) by a 60-byte file: refused with at most a few MB allocated."""
    path = write_raw_nifti(tmp_path / "claims.nii.gz", np.zeros((2, 2, 2), np.int16), shape=(400, 400, 400))
    tracemalloc.start()
    try:
        with pytest.raises(BadInputError, match=r"truncated or corrupt file: the header claims 400x400x400 int16 voxels"):
            load_image(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"{peak / 2**20:.0f} MB allocated"


def test_a_multi_member_gzip_is_measured_by_streaming_not_rejected(tmp_path):
    """pigz/bgzip-style files have several gzip members, so ISIZE only counts the last one."""
    raw = write_raw_nifti(tmp_path / "plain.nii", VOLUME).read_bytes()
    path = tmp_path / "members.nii.gz"
    path.write_bytes(gzip.compress(raw[:700]) + gzip.compress(raw[700:]))
    np.testing.assert_array_equal(load_image(path).array, VOLUME)
    path.write_bytes(gzip.compress(raw[:700]) + gzip.compress(raw[700:1000]))
    with pytest.raises(BadInputError, match=r"\(1,312 bytes with the header\) but the file holds 1,000 bytes after decompression"):
        load_image(path)


@pytest.mark.parametrize("space,flip", [("left-posterior-superior", (-1, -1)), ("LAS", (-1, 1)), ("right-anterior-superior", (1, 1))])
def test_nrrd_patient_spaces_are_read_in_their_frame(tmp_path, space, flip):
    fields = f"encoding: raw\nspace: {space}\nspace directions: (1,0,0) (0,1,0) (0,0,2)\nspace origin: (10,20,30)"
    image = load_image(_nrrd(tmp_path / "frame.nrrd", fields, RAW))
    np.testing.assert_array_equal(image.array, VOLUME)
    np.testing.assert_allclose(np.diag(image.affine)[:3], [flip[0], flip[1], 2.0])
    np.testing.assert_allclose(image.affine[:3, 3], [10 * flip[0], 20 * flip[1], 30])


def test_standalone_preprocess_of_a_zero_affine_is_one_line(tmp_path, capsys):
    path = write_raw_nifti(tmp_path / "flat_affine.nii.gz", VOLUME, srow=np.zeros((3, 4)))
    out = tmp_path / "flat.h5"
    code = main(["preprocess", "--image", str(path), "--modality", "CT", "--out", str(out)])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"medclust preprocess: error: {path}: invalid geometry: voxel size 0x0x0 mm in the header (a voxel size is zero)"
    )
    assert not out.exists()


def test_an_uncalibrated_radiograph_passes_only_with_a_declared_pixel_spacing(tmp_path):
    """PixelSpacing 0\\0 (pydicom's real RG1_UNCR.dcm): refused by default, kept with assume_pixel_spacing."""
    data = tmp_path / "data"
    path = write_radiograph_dicom(data / "uncal.dcm", radiograph_pixels(20, 16), imager_spacing=(0.0, 0.0))
    manifest = _manifest(data, [path])
    with pytest.raises(BadInputError, match="assume_pixel_spacing"):
        ingest_dataset(_settings(manifest, "fail"), tmp_path / "a" / "q.tsv", tmp_path / "a" / "c.json")
    settings = {**_settings(manifest, "fail"), "assume_pixel_spacing": [0.4, 0.25]}
    ingest_dataset(settings, tmp_path / "b" / "q.tsv", tmp_path / "b" / "c.json")
    _, cases = read_cases(tmp_path / "b" / "c.json")
    assert cases[0].assume_spacing == (0.4, 0.25)  # carried to preprocessing through the case list
    image = load_image(cases[0].image, assume_spacing=cases[0].assume_spacing)
    assert image.meta["spacing_source"] == "assume_pixel_spacing (header ImagerPixelSpacing 0\\0)"
    assert np.allclose(np.diag(image.affine)[:2], [0.25, 0.4])  # x = column, y = row
