"""Every kind of bad input, as a real broken file: one line `path: reason`, `fail` exits 2 without
a traceback, `skip` records the case in the QC table and goes on."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from data_helpers import phantom_ct, phantom_label, save_nifti

from medclust.cli import main
from medclust.errors import BadInputError
from medclust.preprocess.ingest import ingest_dataset

AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])


def _good(folder: Path, name: str = "good") -> tuple[str, str]:
    image = phantom_ct((12, 10, 4))
    save_nifti(folder / f"{name}.nii.gz", image, AFFINE)
    save_nifti(folder / f"{name}_seg.nii.gz", phantom_label(image), AFFINE, dtype=np.uint8)
    return f"{name}.nii.gz", f"{name}_seg.nii.gz"


def _truncated(folder: Path) -> tuple[str, str]:
    path = save_nifti(folder / "truncated.nii.gz", phantom_ct((40, 40, 20)), AFFINE)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return "truncated.nii.gz", ""


def _not_an_image(folder: Path) -> tuple[str, str]:
    (folder / "notes.nii.gz").write_text("these are my notes, not a scan\n" * 10, encoding="utf-8")
    return "notes.nii.gz", ""


def _four_d(folder: Path) -> tuple[str, str]:
    save_nifti(folder / "fmri.nii.gz", np.random.default_rng(0).random((8, 8, 4, 3)).astype(np.float32), AFFINE)
    return "fmri.nii.gz", ""


def _non_finite(folder: Path) -> tuple[str, str]:
    vol = phantom_ct((12, 10, 4)).astype(np.float32)
    vol[3, 3, 1] = np.nan
    vol[4, 4, 2] = np.inf
    save_nifti(folder / "nan.nii.gz", vol, AFFINE)
    return "nan.nii.gz", ""


def _constant(folder: Path) -> tuple[str, str]:
    save_nifti(folder / "blank.nii.gz", np.full((12, 10, 4), -1000, np.int16), AFFINE)
    return "blank.nii.gz", ""


def _label_shape(folder: Path) -> tuple[str, str]:
    image, _ = _good(folder, "shape")
    save_nifti(folder / "shape_wrong.nii.gz", np.zeros((12, 10, 5), np.uint8), AFFINE)
    return image, "shape_wrong.nii.gz"


def _label_affine(folder: Path) -> tuple[str, str]:
    image, _ = _good(folder, "moved")
    shifted = AFFINE.copy()
    shifted[:3, 3] = [5.0, 0.0, 0.0]
    save_nifti(folder / "moved_wrong.nii.gz", np.zeros((12, 10, 4), np.uint8), shifted)
    return image, "moved_wrong.nii.gz"


def _label_float(folder: Path) -> tuple[str, str]:
    image, _ = _good(folder, "soft")
    soft = np.zeros((12, 10, 4), np.float32)
    soft[2:5, 2:5, 1] = 0.5
    save_nifti(folder / "soft_prob.nii.gz", soft, AFFINE)
    return image, "soft_prob.nii.gz"


def _missing(folder: Path) -> tuple[str, str]:
    return "does_not_exist.nii.gz", ""


def _label_almost_integer(folder: Path) -> tuple[str, str]:
    image, _ = _good(folder, "almost")
    label = phantom_label(phantom_ct((12, 10, 4))).astype(np.float32)
    label[label == 2] = np.float32(2.0000002)  # the float32 just above 2, as resampling software leaves it
    save_nifti(folder / "almost_seg.nii.gz", label, AFFINE)
    return image, "almost_seg.nii.gz"


def _label_negative(folder: Path) -> tuple[str, str]:
    image, _ = _good(folder, "neg")
    label = phantom_label(phantom_ct((12, 10, 4))).astype(np.int16)
    label[0, 0, 0] = -1  # an "ignore" value some tools write
    save_nifti(folder / "neg_seg.nii.gz", label, AFFINE, dtype=np.int16)
    return image, "neg_seg.nii.gz"


def _symlink_loop(folder: Path) -> tuple[str, str]:
    os.symlink("loop.nii.gz", folder / "loop.nii.gz")
    return "loop.nii.gz", ""


def _broken_link(folder: Path) -> tuple[str, str]:
    os.symlink("moved_away.nii.gz", folder / "linked.nii.gz")
    return "linked.nii.gz", ""


def _label_broken_link(folder: Path) -> tuple[str, str]:
    image, _ = _good(folder, "lbl")
    os.symlink("/archive/lbl_seg.nii.gz", folder / "lbl_link.nii.gz")
    return image, "lbl_link.nii.gz"


def _multi_page_tiff(folder: Path) -> tuple[str, str]:
    from PIL import Image

    pages = [Image.fromarray(np.full((16, 20), 40 * k, np.uint8)) for k in range(3)]
    pages[0].save(folder / "stack.tif", save_all=True, append_images=pages[1:])
    return "stack.tif", ""


def _label_colour(folder: Path) -> tuple[str, str]:
    from PIL import Image

    grey = np.arange(16 * 20, dtype=np.uint8).reshape(16, 20)
    Image.fromarray(grey).save(folder / "photo.png")
    colour = np.zeros((16, 20, 3), np.uint8)
    colour[4:8, 4:8] = (255, 0, 0)  # class 1 painted red
    Image.fromarray(colour).save(folder / "photo_mask.png")
    return "photo.png", "photo_mask.png"


BAD = {
    "multi_page_tiff": (_multi_page_tiff, "stack.tif", r"multi-page image \(3 pages\): store each page as its own file"),
    "label_colour": (
        _label_colour, "photo_mask.png", r"colour label image: store class indices as a greyscale or palette PNG$"
    ),
    "truncated": (_truncated, "truncated.nii.gz", r"truncated or corrupt file"),
    "not_an_image": (_not_an_image, "notes.nii.gz", r"not an image"),
    "four_d": (_four_d, "fmri.nii.gz", r"4D image \(shape \(8, 8, 4, 3\)\): only 2D images and 3D volumes"),
    "non_finite": (_non_finite, "nan.nii.gz", r"2 non-finite voxel values \(NaN/Inf\)"),
    "constant": (_constant, "blank.nii.gz", r"constant image \(every voxel is -1000\)"),
    "label_shape": (_label_shape, "shape_wrong.nii.gz", r"label shape \(12, 10, 5\) differs from image shape \(12, 10, 4\)"),
    "label_affine": (_label_affine, "moved_wrong.nii.gz", r"label affine differs from image affine"),
    "label_float": (_label_float, "soft_prob.nii.gz", r"non-integer label values \(e.g. 0.5\)"),
    "missing": (_missing, "does_not_exist.nii.gz", r"file not found \(manifest.tsv row \d+\)"),
    # every digit: 2.0000002 used to print as "2"
    "label_almost_integer": (
        _label_almost_integer, "almost_seg.nii.gz", r"non-integer label values \(e\.g\. 2\.0000002\); labels must be integers$"
    ),
    "label_negative": (
        _label_negative,
        "neg_seg.nii.gz",
        r"negative label values \(e\.g\. -1\); labels must be 0 \(background\) or positive integers: remap the label file$",
    ),
    # a loop or a broken link used to read as "file not found"
    "symlink_loop": (
        _symlink_loop,
        "loop.nii.gz",
        r"symbolic link loop \(the link points to loop\.nii\.gz, which leads back to itself\) \(manifest\.tsv row \d+\)$",
    ),
    "broken_link": (
        _broken_link,
        "linked.nii.gz",
        r"broken symbolic link \(its target moved_away\.nii\.gz does not exist\) \(manifest\.tsv row \d+\)$",
    ),
    "label_broken_link": (
        _label_broken_link,
        "lbl_link.nii.gz",
        r"label file: broken symbolic link \(its target /archive/lbl_seg\.nii\.gz does not exist\) \(manifest\.tsv row \d+\)$",
    ),
}


def _manifest(folder: Path, rows: list[tuple[str, str]], case_ids: list[str] | None = None) -> Path:
    lines = ["case_id\timage\tlabel\tmodality" if case_ids else "image\tlabel\tmodality"]
    for k, (image, label) in enumerate(rows):
        prefix = f"{case_ids[k]}\t" if case_ids else ""
        lines.append(f"{prefix}{image}\t{label}\tCT")
    path = folder / "manifest.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _settings(manifest: Path, mode: str) -> str:
    return json.dumps({"name": "bad", "format": "manifest", "path": str(manifest), "on_bad_input": mode})


def _run(tmp_path: Path, manifest: Path, mode: str) -> int:
    return main(
        ["ingest", "--settings", _settings(manifest, mode), "--qc", str(tmp_path / "qc" / "bad.tsv"),
         "--cases", str(tmp_path / "cases" / "bad.json")]
    )


@pytest.mark.parametrize("kind", sorted(BAD))
def test_fail_mode_exits_2_with_one_line(tmp_path, capsys, kind):
    make, bad_file, reason = BAD[kind]
    data = tmp_path / "data"
    data.mkdir()
    manifest = _manifest(data, [_good(data), make(data)])
    assert _run(tmp_path, manifest, "fail") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    last = err[-1]
    assert last.startswith(f"medclust ingest: error: {data / bad_file}: ")
    assert pytest.importorskip("re").search(reason, last), last
    assert not (tmp_path / "cases" / "bad.json").exists() and not (tmp_path / "qc" / "bad.tsv").exists()


def test_skip_mode_records_every_bad_case_and_keeps_the_good_one(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = [_good(data)] + [BAD[k][0](data) for k in sorted(BAD)]
    manifest = _manifest(data, rows)
    records = ingest_dataset(json.loads(_settings(manifest, "skip")), tmp_path / "qc.tsv", tmp_path / "cases.json")
    assert [r.status for r in records].count("ok") == 1
    with open(tmp_path / "qc.tsv", encoding="utf-8") as handle:
        table = list(csv.DictReader(handle, delimiter="\t"))
    assert list(table[0])[:4] == ["case_id", "path", "status", "reason"]
    assert table[0]["status"] == "ok" and table[0]["reason"] == ""
    import re

    for kind, row in zip(sorted(BAD), table[1:]):
        assert row["status"] == "skipped", kind
        assert re.search(BAD[kind][2], row["reason"]), (kind, row["reason"])
    cases = json.loads((tmp_path / "cases.json").read_text(encoding="utf-8"))
    assert cases["dataset"] == "bad" and [c["case_id"] for c in cases["cases"]] == ["good"]
    assert set(cases["cases"][0]) >= {"case_id", "image", "label", "modality", "class_label", "split", "simulated"}


def test_duplicate_case_ids(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a").mkdir()
    (data / "b").mkdir()
    first, second = _good(data / "a", "scan"), _good(data / "b", "scan")
    manifest = _manifest(data, [(f"a/{first[0]}", ""), (f"b/{second[0]}", "")])
    records = ingest_dataset(json.loads(_settings(manifest, "skip")), tmp_path / "qc.tsv", tmp_path / "cases.json")
    assert [r.status for r in records] == ["ok", "skipped"]
    assert records[1].reason == f"duplicate case id 'scan' (also {data / 'a' / 'scan.nii.gz'})"
    with pytest.raises(BadInputError, match="duplicate case id 'scan'"):
        ingest_dataset(json.loads(_settings(manifest, "fail")), tmp_path / "qc2.tsv", tmp_path / "cases2.json")


def test_empty_dataset_and_all_cases_bad_are_errors_in_skip_mode(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here", encoding="utf-8")
    settings = json.dumps({"name": "e", "format": "images", "path": str(empty), "on_bad_input": "skip"})
    code = main(["ingest", "--settings", settings, "--qc", str(tmp_path / "e.tsv"), "--cases", str(tmp_path / "e.json")])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"medclust ingest: error: {empty}: no cases found (format images)"
    header_only = tmp_path / "m.csv"
    header_only.write_text("image,label\n", encoding="utf-8")
    with pytest.raises(BadInputError, match="no cases found"):
        ingest_dataset({"name": "m", "format": "manifest", "path": str(header_only)}, tmp_path / "q.tsv", tmp_path / "c.json")
    data = tmp_path / "data"
    data.mkdir()
    manifest = _manifest(data, [_constant(data), _missing(data)])
    with pytest.raises(BadInputError, match=r"no usable cases: all 2 failed QC \(first: .*blank.nii.gz: constant image"):
        ingest_dataset(json.loads(_settings(manifest, "skip")), tmp_path / "q.tsv", tmp_path / "c.json")
    assert not (tmp_path / "c.json").exists()


def test_cli_subprocess_exit_code_and_verbose_traceback(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    manifest = _manifest(data, [_truncated(data)])
    command = [sys.executable, "-m", "medclust.cli"]
    args = ["ingest", "--settings", _settings(manifest, "fail"), "--qc", str(tmp_path / "q.tsv"), "--cases", str(tmp_path / "c.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    quiet = subprocess.run(command + args, capture_output=True, encoding="utf-8", errors="replace", env=env, timeout=120)
    assert quiet.returncode == 2
    assert "Traceback" not in quiet.stderr
    assert quiet.stderr.strip().splitlines()[-1].startswith(f"medclust ingest: error: {data / 'truncated.nii.gz'}: truncated")
    loud = subprocess.run(command + ["--verbose"] + args, capture_output=True, encoding="utf-8", errors="replace", env=env, timeout=120)
    assert loud.returncode != 0 and "Traceback" in loud.stderr and "BadInputError" in loud.stderr


def test_preprocess_of_a_bad_standalone_image_is_one_line(tmp_path, capsys):
    path = save_nifti(tmp_path / "flat.nii.gz", np.zeros((8, 8, 3), np.float32), AFFINE)
    code = main(["preprocess", "--image", str(path), "--modality", "CT", "--out", str(tmp_path / "flat.h5")])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"medclust preprocess: error: {path}: constant image (every voxel is 0)"
    assert not (tmp_path / "flat.h5").exists()


class _RunsCode:
    """What a hostile encoder.pt carries: unpickling it would call os.system."""

    def __reduce__(self):
        return (os.system, ("echo this should never run",))


def test_weights_files_that_cannot_be_loaded_are_one_line(tmp_path):
    import torch

    from medclust.models.heads import load_encoder_weights

    good = {"w": torch.zeros(3)}
    torch.save(good, tmp_path / "good.pt")
    torch.save({"w": torch.zeros(3), "payload": _RunsCode()}, tmp_path / "encoder.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    encoder = torch.nn.Conv2d(1, 2, 3)
    expected = {
        "encoder.pt": "refused to load encoder weights: it would import posix.system, and loading such a file can run "
        "arbitrary code (use weights written by medclust or torch.save of a plain state dict)",
        "truncated.pt": "cannot load encoder weights: truncated or not a PyTorch file (PytorchStreamReader failed reading "
        "zip archive: failed finding central directory)",
        "empty.pt": "encoder weights: empty file (0 bytes)",
        "nowhere.pt": "encoder weights: file not found",
    }
    for name, reason in expected.items():
        with pytest.raises(BadInputError) as caught:
            load_encoder_weights(encoder, tmp_path / name)
        assert str(caught.value) == f"{tmp_path / name}: {reason}"


def test_a_reason_is_always_one_line():
    """Library messages can hold newlines and tabs; the QC table is a TSV and the CLI prints one line."""
    err = BadInputError("scan.nii.gz", "cannot read image:\n  ITK ERROR:\tbad\r\nheader ")
    assert err.reason == "cannot read image: ITK ERROR: bad header"
    assert str(err) == "scan.nii.gz: cannot read image: ITK ERROR: bad header"
