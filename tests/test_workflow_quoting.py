"""Paths with spaces: every path a shell rule passes ({log}, {input}, {output}) is quoted, so a
`results_dir` or working folder with a space in its name works (it used to break data.smk's
fetch_demo and simulate_radiographs logs)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from data_helpers import phantom_ct, save_nifti

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _snakemake(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["snakemake", "-s", str(REPO / "Snakefile"), *args],
        cwd=cwd, capture_output=True, encoding="utf-8", errors="replace", env=ENV, timeout=timeout,
    )


def test_every_path_placeholder_in_a_shell_rule_is_quoted():
    unquoted = []
    for rules in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        for number, line in enumerate(rules.read_text(encoding="utf-8").splitlines(), start=1):
            for match in re.finditer(r"\{(log|input|output)(\.\w+)?(:\w+)?\}", line):
                if match.group(3) != ":q":
                    unquoted.append(f"{rules.name}:{number}: {match.group(0)}")
    assert not unquoted, unquoted


def test_dry_run_with_spaces_in_results_and_resources(tmp_path):
    work = tmp_path / "a folder"
    work.mkdir()
    shutil.copy(REPO / "config.yaml", work / "config.yaml")
    done = _snakemake(["-n", "-p", "--nolock", "data", "--config", "results_dir=my results", "resources_dir=my resources"], work)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = (done.stdout + done.stderr).splitlines()
    commands = [line.split("Shell command: ", 1)[1] for line in lines if "Shell command: medclust" in line]
    rules = {m for c in commands for m in re.findall(r"medclust ([\w-]+)", c)}
    assert {"fetch-demo", "ingest", "index", "simulate-drr"} <= rules, rules
    for command in commands:
        words = shlex.split(command)
        assert "my" not in words, command  # a path split at its space
        log = words[words.index(">") + 1]
        assert log.startswith("my results/logs/") and log.endswith(".log"), command


@pytest.mark.slow
def test_real_run_in_a_folder_with_spaces(tmp_path):
    """ingest and the simulated-radiograph rule run for real under 'my results' in 'a folder'."""
    work = tmp_path / "a folder"
    save_nifti(work / "data" / "ct.nii.gz", phantom_ct((24, 20, 8)), np.diag([2.0, 2.0, 3.0, 1.0]))
    (work / "data" / "list.tsv").write_text("image\tmodality\nct.nii.gz\tCT\n", encoding="utf-8")
    (work / "config.yaml").write_text(
        "results_dir: my results\n"
        "datasets:\n"
        "  tiny: {format: manifest, path: data/list.tsv}\n"
        "  tiny_drr: {format: drr, source: tiny}\n",
        encoding="utf-8",
    )
    done = _snakemake(["--cores", "1", "my results/drr/tiny_drr/manifest.tsv"], work)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = work / "my results"
    assert (results / "logs" / "simulate_radiographs" / "tiny_drr.log").is_file()
    assert (results / "logs" / "ingest" / "tiny.log").is_file()
    assert len((results / "drr" / "tiny_drr" / "manifest.tsv").read_text(encoding="utf-8").splitlines()) > 1
    assert not (work / "my").exists()  # nothing written to a path cut at the space
