"""Broken DICOM series, written as real DICOM files: every one is one line `folder: reason` (exit 2
under `on_bad_input: fail`), a row of the QC table under `skip`, never a volume with slices in
the wrong place. Gaps follow `dicom_gaps` (fail / skip / resample on the true positions)."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from data_helpers import LPS_TO_RAS, phantom_ct, set_raw_value

from medclust.cli import main
from medclust.errors import BadInputError
from medclust.io.dicom_series import DicomGapError
from medclust.io.readers import load_image
from medclust.io.slice_store import read_case
from medclust.preprocess.ingest import ingest_dataset, read_cases
from medclust.preprocess.intensity import write_fingerprint
from medclust.preprocess.pipeline import preprocess_case

SERIES = "1.2.826.0.1.3680043.8.498.77"
SHAPE = (16, 12)  # columns (x), rows (y)
STEP = 2.5
GAP_HINT = " (dicom_gaps: resample interpolates it onto a regular grid)"
PREP = {"spacing": [2.0, 2.0, 2.5], "size": [16, 16], "ct_normalization": "window"}  # no fingerprint needed


def write_slices(
    folder: Path,
    z_mm: list[float],
    *,
    series_uid: str = SERIES,
    orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0),
    pixel_spacing: str = "0.9\\0.8",
    seed: int = 0,
    first: int = 0,
    table: tuple[float, float, float] | None = None,
    decimals: int = 4,
    header: Callable[[int], dict[str, str]] | None = None,
) -> Path:
    """One CT slice file per position (LPS z in mm), named slice000.dcm, slice001.dcm, ...

    ``table`` is the direction the positions advance in (default: the slice normal; another one is
    a gantry tilt), ``decimals`` how ImagePositionPatient is rounded, ``header(k)`` header values
    of slice k that replace the defaults (keyword -> DICOM string).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    volume = phantom_ct((*SHAPE, len(z_mm)), seed=seed)
    normal = np.cross(orientation[:3], orientation[3:])
    along = normal if table is None else np.asarray(table, dtype=np.float64)
    for k, z in enumerate(z_mm):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = "CT"
        ds.PatientName = "SYNTHETIC^PHANTOM"
        ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.70"
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.71"
        ds.InstanceNumber = k + 1
        position = np.array([-20.0, -15.0, 0.0]) + float(z) * along
        ds.ImagePositionPatient = [f"{v:.{decimals}f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:g}" for v in orientation]
        ds.PixelSpacing = pixel_spacing.split("\\")
        ds.SliceThickness = f"{STEP:g}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = SHAPE[1], SHAPE[0]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
        for keyword, value in (header(k) if header else {}).items():
            setattr(ds, keyword, value)
        ds.PixelData = np.ascontiguousarray(volume[..., k].T).astype("<i2").tobytes()
        ds.save_as(str(folder / f"slice{first + k:03d}.dcm"), enforce_file_format=True)
    return folder


def _regular(n: int = 8) -> list[float]:
    return [30.0 + STEP * k for k in range(n)]


# --- the broken series: (make, expected reason); each make returns the series folder ------------


def _missing(root: Path) -> Path:
    folder = write_slices(root / "missing", _regular())
    (folder / "slice003.dcm").unlink()
    return folder


def _duplicate(root: Path) -> Path:
    z = _regular()
    z[4] = z[3]
    return write_slices(root / "duplicate", z)


def _irregular(root: Path) -> Path:
    return write_slices(root / "irregular", [0.0, 2.5, 5.0, 7.5, 11.0, 13.5, 16.0, 18.5])


def _truncated(root: Path) -> Path:
    folder = write_slices(root / "truncated", _regular())
    data = (folder / "slice004.dcm").read_bytes()
    (folder / "slice004.dcm").write_bytes(data[:-100])
    return folder


def _dangling(root: Path) -> Path:
    folder = write_slices(root / "dangling", _regular())
    os.symlink("/nonexistent/slice.dcm", folder / "slice008.dcm")
    return folder


def _loop(root: Path) -> Path:
    folder = write_slices(root / "loop", _regular())
    (folder / "slice003.dcm").unlink()
    os.symlink("slice003.dcm", folder / "slice003.dcm")
    return folder


def _two_series(root: Path) -> Path:
    folder = write_slices(root / "two_series", _regular(4), series_uid=f"{SERIES}.1")
    write_slices(folder, _regular(4), series_uid=f"{SERIES}.2", first=4)
    return folder


def _tilted(root: Path) -> Path:
    folder = write_slices(root / "tilted", _regular(4))
    c, s = np.cos(np.deg2rad(10)), np.sin(np.deg2rad(10))
    write_slices(folder, [40.0, 42.5], orientation=(c, s, 0, -s, c, 0), first=4)
    return folder


def _gantry_tilt(root: Path) -> Path:
    """Slices tilted 20 degrees about the x axis, the table moving along z (not along the normal)."""
    c, s = np.cos(np.deg2rad(20)), np.sin(np.deg2rad(20))
    return write_slices(root / "gantry_tilt", _regular(), orientation=(1, 0, 0, 0, c, s), table=(0.0, 0.0, 1.0))


def _bad_value(root: Path, name: str, keyword: str, bad: str) -> Path:
    """Four slices; slice002's ``keyword`` reads ``bad`` (as some converters write it)."""
    folder = write_slices(root / name, _regular(4), header=lambda k: {keyword: "1"} if k == 2 else {})
    set_raw_value(folder / "slice002.dcm", keyword, bad)
    return folder


def _zero_spacing(root: Path) -> Path:
    return write_slices(root / "zero_spacing", _regular(4), pixel_spacing="0\\0")


def _not_dicom(root: Path) -> Path:
    folder = write_slices(root / "not_dicom", _regular(4))
    (folder / "slice004.dcm").write_text("exported by a viewer, not a slice\n", encoding="utf-8")
    return folder


def _truncated_size(folder: Path) -> str:
    size = (folder / "slice004.dcm").stat().st_size
    return f"slice file slice004.dcm is truncated: {size:,} bytes, its pixel data end at byte {size + 100:,}"


BAD: dict[str, tuple] = {
    "missing": (
        _missing,
        "1 missing slice(s): a gap of 5 mm between slice002.dcm and slice004.dcm (35.00 and 40.00 mm along the "
        "slice normal) in a series 2.5 mm apart" + GAP_HINT,
    ),
    "duplicate": (_duplicate, "1 duplicate slice position(s): slice003.dcm and slice004.dcm are both at 37.50 mm along the slice normal"),
    "irregular": (
        _irregular,
        # 0, 2.5, 5, 7.5, 11, ... 18.5: the least-squares grid from 0 is 372/140 = 2.657 mm, which
        # misses 7.5 (3 x 2.657 = 7.97) by 0.47 mm
        "irregular slice spacing: slices are 2.5 to 3.5 mm apart (slice003.dcm lies 0.47 mm off the closest regular "
        "grid, 2.66 mm apart)" + GAP_HINT,
    ),
    "truncated": (_truncated, _truncated_size),
    "dangling": (_dangling, "slice008.dcm in the series folder: broken symbolic link (its target /nonexistent/slice.dcm does not exist)"),
    "loop": (_loop, "slice003.dcm in the series folder: symbolic link loop (the link points to slice003.dcm, which leads back to itself)"),
    "two_series": (
        _two_series,
        f"2 DICOM series in one folder ({SERIES}.1, {SERIES}.2): give each its own manifest row with the series in the "
        "`series_uid` column, or use `format: dicom` (one case per series)",
    ),
    "tilted": (
        _tilted,
        "slices with different orientations in one series: slice000.dcm [1.0, 0.0, 0.0, 0.0, 1.0, 0.0], slice004.dcm "
        "[0.9848, 0.1736, 0.0, -0.1736, 0.9848, 0.0]",
    ),
    "gantry_tilt": (
        _gantry_tilt,
        # slice007 is 17.5 mm further along z: 17.5 x sin(20 deg) = 5.99 mm of it is in-plane
        "slice positions are not along the slice normal (gantry tilt or shifted stacks: in-plane offset up to 5.99 mm, "
        "slice007.dcm from slice000.dcm); resample it to an orthogonal grid first",
    ),
    "bad_thickness": (
        lambda root: _bad_value(root, "bad_thickness", "SliceThickness", "7.2x"),
        "slice file slice002.dcm: SliceThickness '7.2x' is not a number",
    ),
    "bad_frames": (
        lambda root: _bad_value(root, "bad_frames", "NumberOfFrames", "3x"),
        "slice file slice002.dcm: NumberOfFrames '3x' is not a number",
    ),
    "bad_slope": (
        # GDCM reads '1.7x' as 1.7 and the series passed, its values silently off
        lambda root: _bad_value(root, "bad_slope", "RescaleSlope", "1.7x"),
        "slice file slice002.dcm: RescaleSlope '1.7x' is not a number",
    ),
    "zero_spacing": (_zero_spacing, "invalid geometry: PixelSpacing 0\\0 mm in slice000.dcm (each must be a positive number)"),
    "not_dicom": (_not_dicom, "slice file slice004.dcm is not a DICOM file"),
}


def _reason(kind: str, folder: Path) -> str:
    expected = BAD[kind][1]
    return expected(folder) if callable(expected) else expected


def _manifest(root: Path, folders: list[Path], series_uids: list[str] | None = None) -> Path:
    lines = ["image\tmodality" + ("\tseries_uid" if series_uids else "")]
    for k, folder in enumerate(folders):
        lines.append(f"{folder}\tCT" + (f"\t{series_uids[k]}" if series_uids else ""))
    path = root / "manifest.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _settings(manifest: Path, mode: str, **extra) -> dict:
    return {"name": "dcm", "format": "manifest", "path": str(manifest), "on_bad_input": mode, **extra}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_fail_mode_is_one_line_naming_the_folder_and_the_reason(tmp_path, capsys, kind):
    data = tmp_path / "data"
    good = write_slices(data / "good", _regular())
    bad = BAD[kind][0](data)
    manifest = _manifest(data, [good, bad])
    settings = json.dumps(_settings(manifest, "fail"))
    out = tmp_path / "out"
    code = main(["ingest", "--settings", settings, "--qc", str(out / "qc.tsv"), "--cases", str(out / "cases.json")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert err[-1] == f"medclust ingest: error: {bad}: {_reason(kind, bad)}"
    assert not out.exists() or not any(out.iterdir())  # nothing written, not even partly


def test_skip_mode_records_every_broken_series_and_keeps_the_good_one(tmp_path):
    data = tmp_path / "data"
    good = write_slices(data / "good", _regular())
    kinds = sorted(BAD)
    bad = [BAD[k][0](data) for k in kinds]
    manifest = _manifest(data, [good, *bad])
    out = tmp_path / "out"
    records = ingest_dataset(_settings(manifest, "skip"), out / "qc.tsv", out / "cases.json")
    assert [r.status for r in records] == ["ok"] + ["skipped"] * len(kinds)
    with open(out / "qc.tsv", encoding="utf-8") as handle:
        table = list(csv.DictReader(handle, delimiter="\t"))
    assert (table[0]["case_id"], table[0]["status"], table[0]["reason"], table[0]["shape"]) == ("good", "ok", "", "16x12x8")
    for kind, folder, row in zip(kinds, bad, table[1:]):
        assert (row["case_id"], row["path"], row["status"]) == (kind, str(folder), "skipped")
        assert row["reason"] == _reason(kind, folder)
    _, cases = read_cases(out / "cases.json")
    assert [c.case_id for c in cases] == ["good"]
    assert sorted(p.name for p in out.iterdir()) == ["cases.json", "qc.tsv"]  # no temp files left
    # the good series goes on through preprocessing
    store = preprocess_case(cases[0], PREP, out / "good.h5", "dcm")
    assert read_case(store).image.shape == (8, 16, 16)


def test_a_dangling_symlink_no_longer_turns_a_ct_into_one_2d_slice(tmp_path):
    """format: dicom discovery keeps a series folder with a broken link as one (failing) case."""
    root = tmp_path / "export"
    write_slices(root / "ct_a", _regular())
    folder = write_slices(root / "ct_b", _regular(2))
    (folder / "slice001.dcm").unlink()
    os.symlink("../../gone/slice001.dcm", folder / "slice001.dcm")
    out = tmp_path / "out"
    settings = {"name": "d", "format": "dicom", "path": str(root), "on_bad_input": "skip"}
    records = ingest_dataset(settings, out / "qc.tsv", out / "cases.json")
    assert [(r.entry.case_id, r.entry.image, r.status) for r in records] == [
        ("ct_a", str(root / "ct_a"), "ok"),
        ("ct_b", str(folder), "skipped"),
    ]
    assert records[1].reason == "slice001.dcm in the series folder: broken symbolic link (its target ../../gone/slice001.dcm does not exist)"


def test_gap_policy_resample_interpolates_at_the_true_positions(tmp_path):
    data = tmp_path / "data"
    full = write_slices(data / "full", _regular())
    gap = _missing(data)
    original = np.asarray(load_image(full).array, dtype=np.float64)
    with pytest.raises(DicomGapError):
        load_image(gap)
    resampled = load_image(gap, resample_gaps=True)
    assert resampled.shape == (16, 12, 8) and resampled.array.dtype == np.float32
    keep = [0, 1, 2, 4, 5, 6, 7]
    np.testing.assert_allclose(resampled.array[..., keep], original[..., keep])
    np.testing.assert_allclose(resampled.array[..., 3], (original[..., 2] + original[..., 4]) / 2)
    np.testing.assert_allclose(resampled.affine, load_image(full).affine, atol=1e-6)
    lps = np.diag([0.8, 0.9, STEP, 1.0])
    lps[:3, 3] = [-20.0, -15.0, 30.0]
    np.testing.assert_allclose(resampled.affine, LPS_TO_RAS @ lps, atol=1e-6)

    out = tmp_path / "out"
    manifest = _manifest(data, [gap])
    records = ingest_dataset(_settings(manifest, "fail", dicom_gaps="resample"), out / "qc.tsv", out / "cases.json")
    assert records[0].status == "ok"
    assert records[0].reason == "resampled onto 8 regular slices 2.5 mm apart: " + BAD["missing"][1].replace(GAP_HINT, "")
    record = json.loads((out / "cases.json").read_text(encoding="utf-8"))["cases"][0]
    assert record["resample_gaps"] is True
    _, (entry,) = read_cases(out / "cases.json")
    store = read_case(preprocess_case(entry, PREP, out / "gap.h5", "dcm"))
    assert store.image.shape[0] == 8 and np.diff(store.z_mm) == pytest.approx([STEP] * 7)
    # the CT intensity fingerprint reads the case as preprocessing does
    fingerprint = write_fingerprint("dcm", out / "cases.json", out / "intensity.json")
    assert fingerprint["cases"] == ["missing"]


def test_gap_policy_fail_and_skip_override_on_bad_input(tmp_path):
    data = tmp_path / "data"
    good = write_slices(data / "good", _regular())
    gap = _missing(data)
    zero = _zero_spacing(data)
    manifest = _manifest(data, [good, gap, zero])
    out = tmp_path / "out"
    # dicom_gaps: fail stops even though other bad cases are skipped
    with pytest.raises(DicomGapError, match=r"/missing: 1 missing slice\(s\)"):
        ingest_dataset(_settings(manifest, "skip", dicom_gaps="fail"), out / "qc.tsv", out / "cases.json")
    assert not out.exists()
    # dicom_gaps: skip skips the gap; on_bad_input: fail still stops at the zero spacing
    with pytest.raises(BadInputError, match="PixelSpacing 0"):
        ingest_dataset(_settings(manifest, "fail", dicom_gaps="skip"), out / "qc.tsv", out / "cases.json")
    manifest = _manifest(data, [good, gap])
    records = ingest_dataset(_settings(manifest, "fail", dicom_gaps="skip"), out / "qc.tsv", out / "cases.json")
    assert [(r.entry.case_id, r.status) for r in records] == [("good", "ok"), ("missing", "skipped")]
    # null (the default) follows on_bad_input
    with pytest.raises(DicomGapError):
        ingest_dataset(_settings(manifest, "fail", dicom_gaps=None), out / "qc2.tsv", out / "cases2.json")


def test_series_uid_column_picks_one_series_of_a_folder(tmp_path):
    data = tmp_path / "data"
    folder = write_slices(data / "two", _regular(4), series_uid=f"{SERIES}.1")
    write_slices(folder, [50.0, 52.5, 55.0], series_uid=f"{SERIES}.2", first=4)
    manifest = data / "list.tsv"
    manifest.write_text(
        f"case_id\timage\tmodality\tseries_uid\nfirst\ttwo\tCT\t{SERIES}.1\nsecond\ttwo\tCT\t{SERIES}.2\n"
        f"third\ttwo\tCT\t{SERIES}.9\n",
        encoding="utf-8",
    )
    out = tmp_path / "out"
    records = ingest_dataset(_settings(manifest, "skip"), out / "qc.tsv", out / "cases.json")
    assert [(r.entry.case_id, r.status, r.shape) for r in records] == [
        ("first", "ok", (16, 12, 4)), ("second", "ok", (16, 12, 3)), ("third", "skipped", ()),
    ]
    assert records[2].reason == f"DICOM series {SERIES}.9 not found in the folder (it holds {SERIES}.1, {SERIES}.2)"
    cases = json.loads((out / "cases.json").read_text(encoding="utf-8"))["cases"]
    assert [c["series_uid"] for c in cases] == [f"{SERIES}.1", f"{SERIES}.2"]
    assert load_image(folder, f"{SERIES}.2").affine[2, 3] == pytest.approx(50.0)


def test_oblique_positions_rounded_to_a_tenth_of_a_mm_are_still_along_the_normal(tmp_path):
    """The in-plane check tolerates header rounding: a real oblique series is not a gantry tilt."""
    c, s = np.cos(np.deg2rad(20)), np.sin(np.deg2rad(20))
    folder = write_slices(
        tmp_path / "oblique", _regular(), orientation=(c, 0, s, 0, 1, 0), decimals=1, pixel_spacing="0.5\\0.5"
    )
    image = load_image(folder)  # up to 0.065 mm in-plane from the rounding: more than a tenth of a pixel
    assert image.shape == (16, 12, 8)
    normal = LPS_TO_RAS[:3, :3] @ np.array([-s, 0.0, c])
    np.testing.assert_allclose(image.affine[:3, 2], normal * STEP, atol=0.02)


@pytest.mark.parametrize("unscaled", [False, True])
def test_per_slice_rescale_is_read_in_float_not_in_the_first_slices_type(tmp_path, unscaled):
    """GDCM took the first slice's integer type: later slices' 0.5 steps were truncated."""
    rescale = [("-1024", "1"), ("-1024.5", "0.5"), ("-1000", "1"), ("-1024.5", "0.5")]  # (intercept, slope)
    folder = write_slices(
        tmp_path / "rescale", _regular(4), header=lambda k: dict(zip(("RescaleIntercept", "RescaleSlope"), rescale[k]))
    )
    image = load_image(folder, unscaled=unscaled)  # preprocessing reads with unscaled=True
    assert image.array.dtype == np.float32 and "intensity_scale" not in image.meta
    stored = phantom_ct((*SHAPE, 4)).astype(np.float64)
    expected = np.stack([stored[..., k] * float(m) + float(b) for k, (b, m) in enumerate(rescale)], axis=-1)
    np.testing.assert_array_equal(image.array, expected)  # halves of HU are exact in float32
