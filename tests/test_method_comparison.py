"""Method comparison (report): every pretraining method side by side, from its clustering.json and
the study tables; the methods-study config and the workflow rule that draws it.

Fixtures in tests/fixtures/method_comparison/: three clustering.json files (joint with a cluster
head, simclr without one and with null scores and a missing label, none) and two study tables
(organs: fractions 0.1 and 0.5, joint *helps* at 0.1, simclr not in its grid; drr_labels:
simulated, simclr with 2 seeds and no interval). The dry runs start two Snakemake processes at once
(each spends ~10 s importing Snakemake here).
"""

from __future__ import annotations

import copy
import csv
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from PIL import Image

from medclust.cli import main
from medclust.errors import MedclustError
from medclust.evaluate.study import read_study_table
from medclust.report.method_comparison import (
    MISSING,
    comparison_html,
    comparison_table,
    headline,
    load_comparison,
)

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "method_comparison"
CLUSTERING = [FIXTURES / "pretrain" / m / "clustering.json" for m in ("none", "simclr", "joint")]
STUDY = [FIXTURES / "study" / "organs.csv", FIXTURES / "study" / "drr_labels.csv"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _by_method(rows: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    return {row["method"]: row for row in rows}


def test_table_copies_numbers_and_verdicts_from_its_sources():
    rows = _by_method(comparison_table(CLUSTERING, STUDY, ["joint", "simclr", "none"]))
    joint, simclr, none = rows["joint"], rows["simclr"], rows["none"]
    # smallest label fraction (0.1, not 0.5), primary metric (dice, not the hd95 row that "hurts")
    assert joint["organs/dice_mean @ 0.1"] == "0.52 [0.481234, 0.558766]"
    assert joint["organs/verdict vs none"] == "helps"
    assert joint["organs/difference vs none"] == "+0.110 [+0.050, +0.170]"
    assert not any("hd95" in column for column in joint)
    assert none["organs/dice_mean @ 0.1"] == "0.41 [0.360316, 0.459684]"
    assert none["organs/verdict vs none"] == "reference"
    # a method outside a task's grid
    assert simclr["organs/dice_mean @ 0.1"] == simclr["organs/verdict vs none"] == MISSING
    # no interval: said, and the verdict word copied whole
    assert simclr["drr_labels/auc_macro @ 0.25"] == "0.801 (no interval)"
    assert simclr["drr_labels/verdict vs none"] == "inconclusive (too few seeds or cases)"
    assert joint["drr_labels/verdict vs none"] == "no detectable difference"
    # clustering.json: values, counts, nulls, no cluster head, a label not reported
    assert joint["dataset/embedding NMI"] == "0.610" and joint["dataset/assignments clusters"] == "17"
    assert joint["dataset/items"] == "89" and joint["z_bin/assignments ARI"] == MISSING
    assert simclr["dataset/embedding NMI"] == "0.580" and simclr["dataset/embedding ARI"] == MISSING
    assert simclr["dataset/assignments NMI"] == none["dataset/assignments NMI"] == MISSING
    assert simclr["body_region/embedding NMI"] == MISSING  # embedding null (one class)
    assert simclr["structures/embedding NMI"] == simclr["structures/kNN probe"] == MISSING
    assert simclr["modality/linear probe"] == MISSING and simclr["modality/kNN probe"] == "0.800"
    assert joint["structures/linear probe"] == "0.770"
    assert list(joint) == list(simclr) == list(none)  # one set of columns


def test_rows_follow_the_config_order_with_none_last():
    assert [r["method"] for r in comparison_table(CLUSTERING, STUDY, ["none", "simclr", "joint"])] == [
        "simclr", "joint", "none"]  # fmt: skip
    assert [r["method"] for r in comparison_table(CLUSTERING, STUDY)] == ["simclr", "joint", "none"]
    # a method with a file but not in the list goes after the listed ones, before none
    assert [r["method"] for r in comparison_table(CLUSTERING, STUDY, ["joint"])] == ["joint", "simclr", "none"]
    with pytest.raises(MedclustError, match="no clustering.json given for gedi"):
        comparison_table(CLUSTERING, STUDY, ["joint", "gedi", "simclr", "none"])
    with pytest.raises(MedclustError, match="two clustering.json files for method joint"):
        comparison_table(CLUSTERING + CLUSTERING[-1:], STUDY)


def test_headline_calls_only_helps_verdicts_help():
    lines = headline(load_comparison(CLUSTERING, STUDY))
    assert "helps: joint on organs." in lines
    helps = [line for line in lines if line.startswith("helps")]
    # joint's positive difference on drr_labels is not a gain: its verdict is no detectable difference
    assert helps == ["helps: joint on organs."]
    assert "no detectable difference: joint on drr_labels." in lines
    assert "inconclusive (too few seeds or cases): simclr on drr_labels." in lines
    assert any("not evidence that one method is better" in line for line in lines)
    # without a helps verdict the headline says so, and names nobody as helping
    tables = [read_study_table(path) for path in STUDY]
    for row in tables[0]:
        if row["verdict"] == "helps":
            row["verdict"] = "no detectable difference"
    lines = headline(load_comparison(CLUSTERING, tables))
    assert "No comparison has the verdict helps: no method was shown to help on any task." in lines
    assert not any(line.startswith("helps") for line in lines)


def test_cli_writes_the_table_page_and_figure(tmp_path, capsys):
    out = {ext: tmp_path / "report" / f"method_comparison.{ext}" for ext in ("csv", "html", "png")}
    args = ["method-comparison", "--clustering", *map(str, CLUSTERING), "--study", *map(str, STUDY),
            "--methods", "joint", "simclr", "none", "--out-csv", str(out["csv"]),
            "--out-html", str(out["html"]), "--out-png", str(out["png"])]  # fmt: skip
    assert main(args) == 0
    with open(out["csv"], newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["method"] for r in rows] == ["joint", "simclr", "none"]
    assert rows[0]["organs/dice_mean @ 0.1"] == "0.52 [0.481234, 0.558766]" and rows[1]["organs/verdict vs none"] == MISSING
    page = out["html"].read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.count("<table") == 2 and "<script" not in page
    assert "0.52 [0.481234, 0.558766]" in page and "drr_labels (SIMULATED)" in page
    assert 'background:#d9f2d9;">helps</td>' in page  # the verdict table's shading
    data = out["png"].read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000
    with Image.open(out["png"]) as image:
        assert min(image.size) > 200
    # a file that is not a pretraining run's clustering.json: one line, exit 2
    bad = tmp_path / "bad.json"
    bad.write_text('{"labels": {}}', encoding="utf-8")
    capsys.readouterr()
    assert main(["method-comparison", "--clustering", str(bad), "--out-csv", str(tmp_path / "x.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"medclust method-comparison: error: {bad}: not a clustering.json of a pretraining run (no `method` name)"
    assert not (tmp_path / "x.csv").exists()


def test_html_page_without_study_tables_says_so():
    page = comparison_html(load_comparison(CLUSTERING, []))
    assert "No study table" in page and page.count("<table") == 1 and "0.610" in page


# --- config/methods_study.yaml and the workflow -------------------------------------------------


def _read_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


METHODS = _read_yaml(REPO / "config" / "methods_study.yaml")["pretrain"]["methods"]


def test_methods_study_lists_the_whole_family_and_the_cpu_overlay_merges_key_by_key():
    """Snakemake's own merge (update_config) and schema check, as `--configfile a b c` does them."""
    from snakemake.utils import update_config, validate

    schema = REPO / "workflow" / "schemas" / "config.schema.yaml"
    enum = _read_yaml(schema)["properties"]["pretrain"]["properties"]["methods"]["items"]["enum"]
    assert sorted(METHODS) == sorted(enum) and len(METHODS) == 14 and METHODS[-1] == "none"
    demo = _read_yaml(REPO / "config.yaml")
    config = copy.deepcopy(demo)
    for name in ("methods_study.yaml", "methods_study_cpu.yaml"):
        update_config(config, _read_yaml(REPO / "config" / name))
    validate(config, str(schema))
    assert config["pretrain"]["methods"] == METHODS and sorted(config["finetune"]["inits"]) == sorted(METHODS)
    assert config["pretrain"]["steps"] == 30 < demo["pretrain"]["steps"]
    assert config["finetune"]["steps"] == 16 < demo["finetune"]["steps"]
    # everything else is the demo's
    assert config["pretrain"]["backbone"] == demo["pretrain"]["backbone"]
    assert set(config["finetune"]["tasks"]) == set(demo["finetune"]["tasks"]) and set(config["datasets"]) == set(demo["datasets"])
    assert config["finetune"]["tasks"]["drr_lung_heart"]["steps"] == demo["finetune"]["tasks"]["drr_lung_heart"]["steps"]


def _dry_run_jobs(output: str) -> tuple[dict[str, int], list[str], list[str]]:
    """(job counts per rule, every pretrain_method's method, shell commands) of `snakemake -n -p`."""
    counts = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", output, re.MULTILINE)}
    methods, rule = [], None
    for line in output.splitlines():
        head = re.match(r"^(?:local)?(?:rule|checkpoint) (\w+):$", line)
        if head:
            rule = head.group(1)
        elif rule == "pretrain_method" and line.startswith("    wildcards: method="):
            methods.append(line.split("=", 1)[1])
    return counts, methods, re.findall(r"^Shell command: (.*)$", output, re.MULTILINE)


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """`snakemake -n -p` of the methods study and of the demo, started together."""
    root = tmp_path_factory.mktemp("methods_study")
    (root / "out.yaml").write_text(f"results_dir: {root / 'res'}\n", encoding="utf-8")
    exe = shutil.which("snakemake") or "snakemake"
    configs = {
        "methods": ["config.yaml", "config/methods_study.yaml", str(root / "out.yaml")],
        "demo": ["config.yaml", str(root / "out.yaml")],
    }
    procs = {
        name: subprocess.Popen(
            [exe, "-n", "-p", "--nolock", "--cores", "1", "--configfile", *files],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, encoding="utf-8", errors="replace",
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        for name, files in configs.items()
    }
    done = {}
    for name, proc in procs.items():
        stdout, _ = proc.communicate(timeout=240)
        done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout)
    return done


def test_methods_study_dry_run_pretrains_every_method_and_compares_them(dry_runs):
    done = dry_runs["methods"]
    assert done.returncode == 0, done.stdout[-3000:]
    counts, methods, shells = _dry_run_jobs(done.stdout)
    assert sorted(methods) == sorted(METHODS) and counts["pretrain_method"] == 14
    assert counts["method_comparison"] == 1
    # every method an init of the demo's 5 tasks, its 3 seeds in one job (finetune.seeds_per_job: 3)
    assert sum(n for rule, n in counts.items() if rule.startswith("finetune_seeds")) == 14 * 5
    command = next(s for s in shells if s.startswith("medclust method-comparison "))
    assert re.search(r"--methods (.*?) --out-csv", command).group(1).split() == METHODS
    clustering = re.search(r"--clustering (.*?) --study", command).group(1).split()
    assert clustering == [f"{Path(c).parents[1]}/{m}/clustering.json" for c, m in zip(clustering, METHODS)]
    assert len(re.search(r"--study (.*?) --methods", command).group(1).split()) == 5


def test_demo_dry_run_has_no_method_comparison(dry_runs):
    """Two methods (joint vs random init): the demo's jobs are unchanged."""
    done = dry_runs["demo"]
    assert done.returncode == 0, done.stdout[-3000:]
    counts, methods, _ = _dry_run_jobs(done.stdout)
    assert sorted(methods) == ["joint", "none"]
    assert "method_comparison" not in counts and "method-comparison" not in done.stdout
