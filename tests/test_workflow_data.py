"""The data-stage rules through the Snakemake CLI: dry runs of the default config (no demo data
needed), lint, and a real `snakemake --cores 2 data` on synthetic datasets plus one real demo
radiograph fetched by the workflow's own fetch_demo rule."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
from data_helpers import (
    phantom_ct,
    phantom_label,
    radiograph_pixels,
    save_nifti,
    write_dicom_series,
    write_msd,
    write_radiograph_dicom,
)

from medclust.io.slice_store import REQUIRED_ATTRS, read_case

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "Snakefile"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
DATA_RULES = ("ingest", "preprocess", "index")


def _snakemake(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["snakemake", "-s", str(SNAKEFILE), *args], cwd=cwd, capture_output=True, encoding="utf-8", errors="replace", env=ENV, timeout=timeout
    )


def test_dry_run_of_the_default_config_needs_no_demo_data(tmp_path):
    """`snakemake -n data` with the shipped config.yaml in a folder with no resources/results."""
    shutil.copy(REPO / "config.yaml", tmp_path / "config.yaml")
    done = _snakemake(["-n", "--nolock", "data"], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout + done.stderr
    for rule in ("fetch_demo", "ingest", "index", "simulate_radiographs"):
        assert re.search(rf"^{rule}\s+\d+", out, re.M), f"{rule} missing from the dry-run job table"
    assert "checkpoint" in out  # preprocess jobs appear once ingest has run
    assert not (tmp_path / "results").exists() and not (tmp_path / "resources").exists()


def test_dry_run_of_the_default_target_in_the_repository():
    done = _snakemake(["-n", "--nolock"], REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_lint_is_clean():
    done = _snakemake(["--lint"], REPO, timeout=300)
    out = done.stdout + done.stderr
    for rule in DATA_RULES:  # the data rules first, so a failure says whose rule it is
        assert not re.search(rf"Lints for rule {rule}\b", out), out
    assert done.returncode == 0 and "Lints for" not in out, out


def _synthetic_study(root: Path) -> None:
    ct = phantom_ct((40, 36, 10))
    affine = np.diag([-1.5, -1.5, 3.0, 1.0])  # stored LPS, as many CTs are
    write_msd(root / "data" / "msd", {"ct_a": (ct, phantom_label(ct))}, affine)
    mr = np.random.default_rng(0).gamma(2.0, 100.0, (30, 30, 12)).astype(np.float32)
    save_nifti(root / "data" / "mixed" / "m1.nii.gz", mr, np.diag([2.0, 2.0, 2.0, 1.0]))
    broken = mr.copy()
    broken[1, 2, 3] = np.nan
    save_nifti(root / "data" / "mixed" / "bad.nii.gz", broken, np.diag([2.0, 2.0, 2.0, 1.0]))
    write_dicom_series(root / "data" / "dicom" / "pat1", phantom_ct((32, 32, 6)))
    # one manifest mixing an MR NIfTI and a CT DICOM series folder (path relative to the manifest)
    (root / "data" / "mixed" / "list.csv").write_text(
        "image,modality,split\nm1.nii.gz,MR,train\n../dicom/pat1,CT,test\nbad.nii.gz,MR,\n",
        encoding="utf-8",
    )
    write_radiograph_dicom(root / "data" / "xr" / "cr1.dcm", radiograph_pixels(120, 100))
    (root / "config.yaml").write_text(
        "results_dir: results\n"
        "resources_dir: resources\n"
        "seed: 1\n"
        "on_bad_input: skip\n"
        "preprocess: {spacing: [3.0, 3.0, 4.0], size: [32, 32]}\n"
        "datasets:\n"
        "  synth_ct: {format: msd, path: data/msd}\n"
        "  synth_mixed: {format: manifest, path: data/mixed/list.csv, preprocess: {spacing: [4.0, 4.0, 4.0]}}\n"
        "  synth_xr: {format: images, path: data/xr}\n"
        "  demo_xray: {format: images, demo: chest_xray, path: resources/demo/chest_xray, modality: XR, assume_pixel_spacing: [0.2, 0.2]}\n",
        encoding="utf-8",
    )
    # Reuse the repository's wheel cache when it has the pinned wheel (no network then);
    # otherwise fetch_demo downloads it with pip.
    cached = REPO / "resources" / "wheels" / "pydicom_data-1.0.0-py3-none-any.whl"
    if cached.is_file():
        (root / "resources" / "wheels").mkdir(parents=True)
        (root / "resources" / "wheels" / cached.name).symlink_to(cached)


@pytest.mark.slow
def test_data_stage_runs_for_real(tmp_path):
    _synthetic_study(tmp_path)
    done = _snakemake(["--cores", "2", "data"], tmp_path, timeout=900)
    logs = "\n".join(p.read_text(encoding="utf-8")[-1500:] for p in (tmp_path / "results" / "logs").rglob("*.log")) if done.returncode else ""
    assert done.returncode == 0, done.stderr[-4000:] + logs
    results = tmp_path / "results"

    # QC: the NaN volume is recorded and skipped, the run went on
    with open(results / "qc" / "synth_mixed.tsv", encoding="utf-8") as handle:
        qc = {row["case_id"]: row for row in csv.DictReader(handle, delimiter="\t")}
    assert qc["bad"]["status"] == "skipped" and "non-finite" in qc["bad"]["reason"]
    assert qc["m1"]["status"] == "ok"

    expected = {
        "synth_ct": {"ct_a": None},
        "synth_mixed": {"m1": None, "pat1": None},
        "synth_xr": {"cr1": (1, 32, 32)},
        "demo_xray": {"RG1_UNCR": (1, 32, 32)},
    }
    for dataset, cases in expected.items():
        index = json.loads((results / "slices" / dataset / "index.json").read_text(encoding="utf-8"))
        splits = json.loads((results / "slices" / dataset / "splits.json").read_text(encoding="utf-8"))
        assert [c["case_id"] for c in index["cases"]] == sorted(cases)
        assert sorted(splits["train"] + splits["val"] + splits["test"]) == sorted(cases) and splits["seed"] == 1
        assert (results / "slices" / dataset / "provenance.json").is_file()
        for case_id in cases:
            path = results / "slices" / dataset / f"{case_id}.h5"
            with h5py.File(path) as handle:
                assert set(REQUIRED_ATTRS) <= set(handle.attrs)
                assert handle["image"].dtype == np.float16
            case = read_case(path)
            assert case.image.shape[1:] == (32, 32) and case.image.shape[0] == len(case.z_mm)
            assert 0.0 <= float(case.image.min()) and float(case.image.max()) <= 1.0
            assert case.attrs["dataset"] == dataset and case.attrs["case_id"] == case_id
            if cases[case_id] is not None:
                assert case.image.shape == cases[case_id]
    assert json.loads((results / "slices" / "synth_mixed" / "splits.json").read_text(encoding="utf-8"))["test"] == ["pat1"]

    ct = read_case(results / "slices" / "synth_ct" / "ct_a.h5")
    assert ct.image.shape == (8, 32, 32)  # 10 slices of 3 mm resampled to 4 mm
    assert ct.label is not None and set(np.unique(ct.label)) == {0, 1, 2}
    assert np.diff(ct.z_mm) == pytest.approx([4.0] * 7)
    assert ct.store_affine[0, 0] > 0 and ct.store_affine[1, 1] > 0  # LPS input stored RAS
    mr = read_case(results / "slices" / "synth_mixed" / "m1.h5")
    assert mr.modality == "MR" and mr.image.shape == (6, 32, 32) and mr.attrs["target_spacing"] == [4.0, 4.0, 4.0]
    dicom = read_case(results / "slices" / "synth_mixed" / "pat1.h5")
    assert dicom.modality == "CT" and dicom.attrs["source_path"] == "data/dicom/pat1"
    assert dicom.image.shape == (4, 32, 32)  # 6 slices x 2.5 mm -> 4 mm
    xray = read_case(results / "slices" / "demo_xray" / "RG1_UNCR.h5")
    assert xray.modality == "XR" and xray.attrs["simulated"] is False and xray.label is None
    assert xray.attrs["original_shape"] == [1841, 1955]  # real PA chest radiograph, (columns, rows)
    assert float(xray.image.max()) > 0.9 and float(xray.image.mean()) > 0.3
    assert json.loads((tmp_path / "resources" / "demo" / "chest_xray" / "sources.json").read_text(encoding="utf-8"))

    # atomic outputs: nothing half-written left behind; every job logged
    assert not list(results.rglob("*.tmp"))
    assert len(list((results / "logs" / "preprocess").rglob("*.log"))) == 5

    again = _snakemake(["-n", "data"], tmp_path)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
