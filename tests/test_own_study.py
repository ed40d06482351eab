"""Own-study configs (README "Own data in 3 steps"): a study given with --configfile runs exactly
the datasets, pretraining methods and tasks it lists, with every other key from the schema
defaults; the plain `snakemake` still runs the demo (config.yaml); layering on the demo is explicit.

Dry runs only (no ingest): a few seconds each. Every run's working directory holds a copy of the
demo config.yaml, as the repository root does, so a study that inherited it would show it.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_helpers import (  # noqa: E402
    phantom_ct,
    phantom_label,
    radiograph_pixels,
    write_dicom_series,
    write_msd,
    write_radiograph_dicom,
)

from medclust.config import load_config, validate_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "config" / "template.yaml"
JOB_HEAD = re.compile(r"^(?:local)?(?:rule|checkpoint) (\w+):$")


def read_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


DEMO = read_yaml(REPO / "config.yaml")
DEMO_DATASETS = set(DEMO["datasets"])
DEMO_TASKS = set(DEMO["finetune"]["tasks"])
DEMO_ITEMS = {entry["demo"] for entry in DEMO["datasets"].values() if entry.get("demo")}


def dry_run(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """`snakemake -n -p` of the repository's Snakefile in `workdir`; stdout holds stderr too."""
    exe = shutil.which("snakemake") or "snakemake"
    return subprocess.run(
        [exe, "-s", str(REPO / "Snakefile"), "--directory", str(workdir), "-n", "-p", "--nolock",
         "--cores", "1", *args],
        cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, encoding="utf-8",
        errors="replace", timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def jobs_of(output: str) -> list[dict]:
    """Every job of a dry run: rule name, wildcards and shell command."""
    jobs: list[dict] = []
    for line in output.splitlines():
        head = JOB_HEAD.match(line)
        if head:
            jobs.append({"rule": head.group(1), "wildcards": {}, "shell": ""})
        elif jobs and line.startswith("    wildcards: "):
            pairs = line.removeprefix("    wildcards: ").split(", ")
            jobs[-1]["wildcards"] = dict(pair.split("=", 1) for pair in pairs)
        elif jobs and line.startswith("Shell command: "):
            jobs[-1]["shell"] = line.removeprefix("Shell command: ")
    return jobs


def wildcard_values(jobs: list[dict], rule: str, name: str) -> set[str]:
    return {job["wildcards"][name] for job in jobs if job["rule"] == rule}


def settings_of(job: dict) -> dict:
    """The JSON after `--settings` in a job's shell command."""
    words = shlex.split(job["shell"])
    return json.loads(words[words.index("--settings") + 1])


def write_own_data(root: Path) -> dict[str, Path]:
    """Tiny own data of each kind the template lists; returns {format: its `path`}."""
    affine = np.diag([3.0, 3.0, 5.0, 1.0])
    hu = phantom_ct((24, 20, 8))
    msd = write_msd(root / "msd", {"a": (hu, phantom_label(hu)), "b": (hu, phantom_label(hu))}, affine)
    import SimpleITK as sitk

    manifest_dir = root / "nrrd"
    manifest_dir.mkdir(parents=True)
    sitk.WriteImage(sitk.GetImageFromArray(np.ascontiguousarray(hu.T)), str(manifest_dir / "case1.nrrd"))
    manifest = manifest_dir / "cases.tsv"
    manifest.write_text("image\tmodality\ncase1.nrrd\tCT\n", encoding="utf-8")
    dicom = write_dicom_series(root / "dicom" / "series1", hu)
    write_radiograph_dicom(root / "cxr" / "cxr1.dcm", radiograph_pixels())
    return {"msd": msd, "manifest": manifest, "dicom": dicom.parent, "images": root / "cxr"}


@pytest.fixture(scope="module")
def own_study(tmp_path_factory) -> tuple[Path, Path]:
    """A working directory with the demo config.yaml and my_study.yaml: the template pointed at
    synthetic data. Returns (workdir, my_study.yaml)."""
    root = tmp_path_factory.mktemp("own_study")
    shutil.copy(REPO / "config.yaml", root / "config.yaml")
    paths = write_own_data(root / "data")
    study = read_yaml(TEMPLATE)
    for entry in study["datasets"].values():
        entry["path"] = str(paths[entry["format"]])
    return root, write_yaml(root / "my_study.yaml", study)


def test_template_validates_and_names_each_kind_of_data():
    """The template is a valid study of one's own data: every format a lab has, tasks on its own
    datasets, inits among its methods; resolved the same way by medclust and by Snakemake."""
    from snakemake.utils import validate

    raw = read_yaml(TEMPLATE)
    resolved = load_config(TEMPLATE)
    via_snakemake = copy.deepcopy(raw)
    validate(via_snakemake, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))
    assert via_snakemake == resolved
    formats = {entry["format"] for entry in raw["datasets"].values()}
    assert {"msd", "manifest", "dicom", "images"} <= formats
    assert not set(raw["datasets"]) & DEMO_DATASETS and not any("demo" in e for e in raw["datasets"].values())
    tasks = raw["finetune"]["tasks"]
    assert tasks and all(task["dataset"] in raw["datasets"] for task in tasks.values())
    assert set(raw["finetune"]["inits"]) <= set(raw["pretrain"]["methods"]) | {"none"}
    assert len(set(raw["finetune"]["inits"])) >= 2, "a study compares random init with pretraining"


def test_own_study_runs_exactly_what_it_lists(own_study):
    workdir, study_file = own_study
    out = dry_run(workdir, "--configfile", str(study_file))
    assert out.returncode == 0, out.stdout[-3000:]
    jobs = jobs_of(out.stdout)
    study = read_yaml(study_file)
    resolved = load_config(study_file)

    assert wildcard_values(jobs, "ingest", "dataset") == set(study["datasets"])
    assert wildcard_values(jobs, "index", "dataset") == set(study["datasets"])
    assert wildcard_values(jobs, "pretrain_method", "method") == set(study["pretrain"]["methods"])
    assert wildcard_values(jobs, "finetune_run", "task") == set(study["finetune"]["tasks"])
    assert not {job["rule"] for job in jobs} & {"fetch_demo", "simulate_radiographs"}
    # the grid the study leaves out is the schema's, not the demo's
    ft = resolved["finetune"]
    grid = {(w["init"], float(w["fraction"]), int(w["seed"])) for w in
            (job["wildcards"] for job in jobs if job["rule"] == "finetune_run")}
    assert grid == {(i, float(f), s) for i in ft["inits"] for f in ft["fractions"] for s in ft["seeds"]}
    assert (ft["fractions"], ft["seeds"]) != (DEMO["finetune"]["fractions"], DEMO["finetune"]["seeds"])
    run = settings_of(next(job for job in jobs if job["rule"] == "finetune_run"))
    for key in ("steps", "batch_size", "lr", "decoder_channels"):
        assert run[key] == ft[key], key
    pretrain = settings_of(next(job for job in jobs if job["rule"] == "pretrain_method"))
    for key in ("steps", "backbone", "d_model", "k_2d"):
        assert pretrain[key] == resolved["pretrain"][key], key
    for name in DEMO_DATASETS | DEMO_TASKS | DEMO_ITEMS:
        assert not re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", out.stdout), f"demo {name!r} in the run"
    assert "resources/demo" not in out.stdout


def test_plain_run_is_the_demo(own_study):
    """No --configfile: the working directory's config.yaml (the demo) is the study."""
    workdir, _ = own_study
    out = dry_run(workdir)
    assert out.returncode == 0, out.stdout[-3000:]
    jobs = jobs_of(out.stdout)
    assert wildcard_values(jobs, "ingest", "dataset") == DEMO_DATASETS
    assert wildcard_values(jobs, "fetch_demo", "item") == DEMO_ITEMS
    assert wildcard_values(jobs, "pretrain_method", "method") == set(DEMO["pretrain"]["methods"])
    # the demo runs a task x init's seeds in one job (finetune.seeds_per_job: 3)
    assert wildcard_values(jobs, "finetune_seeds", "task") == DEMO_TASKS
    assert "my_ct" not in out.stdout


def test_layering_on_the_demo_is_explicit(own_study):
    """`--configfile config.yaml extra.yaml` merges key by key (how config/gpu_study.yaml is used)."""
    workdir, _ = own_study
    write_yaml(workdir / "extra.yaml", {"finetune": {"seeds": [7]}})
    out = dry_run(workdir, "--configfile", "config.yaml", "extra.yaml")
    assert out.returncode == 0, out.stdout[-3000:]
    jobs = jobs_of(out.stdout)
    assert wildcard_values(jobs, "ingest", "dataset") == DEMO_DATASETS
    assert wildcard_values(jobs, "finetune_run", "task") == DEMO_TASKS
    assert wildcard_values(jobs, "finetune_run", "seed") == {"7"}
    assert wildcard_values(jobs, "finetune_run", "fraction") == {str(float(f)) for f in DEMO["finetune"]["fractions"]}


def test_overrides_alone_name_the_missing_datasets(own_study):
    """A file meant to be layered, given alone, stops with the fix instead of a KeyError."""
    workdir, _ = own_study
    write_yaml(workdir / "extra.yaml", {"finetune": {"seeds": [7]}})
    assert validate_config({"finetune": {"seeds": [7]}})["finetune"]["seeds"] == [7]
    out = dry_run(workdir, "--configfile", "extra.yaml")
    assert out.returncode != 0
    assert "config: no `datasets`" in out.stdout
    assert "--configfile config.yaml <your file>" in out.stdout
    assert "KeyError" not in out.stdout


def test_predict_only_config_needs_no_datasets(own_study, tmp_path):
    """A config with only a `predict` block (a shared model package on new scans) is a study too."""
    workdir, _ = own_study
    package = tmp_path / "package"
    package.mkdir()
    (package / "model.pt").write_bytes(b"")
    scan = tmp_path / "new_scan.nii.gz"
    scan.write_bytes(b"")
    jobs_file = write_yaml(tmp_path / "jobs.yaml", {"predict": {"new": {"model": str(package), "inputs": [str(scan)]}}})
    out = dry_run(workdir, "predict", "--configfile", str(jobs_file))
    assert out.returncode == 0, out.stdout[-3000:]
    assert [job["rule"] for job in jobs_of(out.stdout)].count("predict_job") == 1
    assert not wildcard_values(jobs_of(out.stdout), "ingest", "dataset")


def configfile_lists(text: str) -> list[list[str]]:
    """The words after `--configfile` in each `snakemake` command of a text (up to the next option,
    comment, closing backtick or a gap of 3+ spaces before a description)."""
    lists = []
    for line in text.replace("\\\n", " ").splitlines():
        for command in re.findall(r"snakemake [^`#]*", line):
            words = re.split(r"\s{3,}", command)[0].split()
            if "--configfile" in words:
                rest = words[words.index("--configfile") + 1:]
                lists.append(list(itertools.takewhile(lambda w: not w.startswith("-"), rest)))
    return lists


def test_documented_commands_give_targets_before_configfile():
    """`--configfile` takes every following word as a file: `... --configfile a.yaml pretrain`
    fails with "No such file or directory: 'pretrain'", so documented commands name targets first."""
    sources = [REPO / "README.md", REPO / "BENCHMARKS.md", REPO / "Snakefile", *sorted((REPO / "config").glob("*.yaml"))]
    seen = 0
    for path in sources:
        for files in configfile_lists(path.read_text(encoding="utf-8")):
            seen += 1
            assert files, f"{path.name}: --configfile without a file"
            bad = [w for w in files if not (w.rstrip(".,;:)\"").endswith((".yaml", ".yml")) or w in ("...", "<your", "file>"))]
            assert not bad, f"{path.name}: {bad} after --configfile would be read as config files"
    assert seen >= 5
