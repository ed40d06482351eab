"""The whole workflow on a tiny synthetic study: data -> pretraining -> fine-tuning (scored in the
same job) -> study table -> figures -> `snakemake --report` HTML, run for real on this machine."""

from __future__ import annotations

import csv
import html
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import tiny_study  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = shutil.which("snakemake") or "snakemake"


def _snakemake(work: Path, config: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(work), "--configfile", str(config), *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(cmd, cwd=work, capture_output=True, text=True, encoding="utf-8", errors="replace", env=env)


def _logs(work: Path) -> str:
    return "\n".join(p.read_text(encoding="utf-8", errors="replace")[-1500:] for p in (work / "results" / "logs").rglob("*.log"))


@pytest.mark.timeout(900)
def test_tiny_study_end_to_end_with_report(tmp_path):
    work = tmp_path / "study"
    pretrain = dict(tiny_study.CONFIG["pretrain"], steps=6, checkpoint_every=3)
    finetune = dict(tiny_study.CONFIG["finetune"], inits=["none", "joint"], fractions=[0.5, 1.0], seeds=[0, 1])
    config = tiny_study.write_study(work, cases=4, pretrain=pretrain, finetune=finetune)

    done = _snakemake(work, config, "--cores", "2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + _logs(work)

    results = work / "results"
    # every run scored itself: metrics.json and per_case.csv beside model.pt, no separate job
    runs = sorted(results.glob("finetune/body/*/*/*/model.pt"))
    assert len(runs) == 2 * 2 * 2
    for model in runs:
        assert (model.parent / "metrics.json").is_file() and (model.parent / "per_case.csv").is_file()
    assert "rule evaluate" not in done.stderr

    with open(results / "study" / "body.csv", newline="", encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if r["primary"].lower() == "true"]
    cells = {(r["init"], float(r["fraction"])): r for r in rows}
    assert set(cells) == {(i, f) for i in ("none", "joint") for f in (0.5, 1.0)}
    for (init, _), row in cells.items():
        assert row["metric"] == "dice_mean" and int(row["n_seeds"]) == 2
        assert 0.0 <= float(row["mean"]) <= 1.0
        # 2 seeds and fewer than 5 test cases: the design supports no interval, and says why
        assert row["ci_low"] == row["ci_high"] == "" and row["ci_method"].startswith("none: 2 seeds < 3 and ")
        assert (row["diff_vs_ref"] == "") == (init == "none")  # paired difference for joint only
        assert row["verdict"] == ("" if init == "none" else "inconclusive (too few seeds or cases)")

    report = work / "report.html"
    done = _snakemake(work, config, "--report", str(report))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = html.unescape(report.read_text(encoding="utf-8"))
    # pretraining methods of the tiny study: joint only (no random-encoder map)
    for name in ("pretrain_loss.png", "joint.png", "body.png", "body_curves.png", "body_table.png", "body.csv",
                 "verdicts.html"):  # fmt: skip
        assert f'"{name}"' in text, f"report.html lacks {name}"
    # the opening page (workflow description) and the study captions carry the verdict table
    assert text.count("medclust-verdicts") >= 3, "verdict table missing from the opening page or captions"
    assert "inconclusive (too few seeds or cases)" in text and "none: 2 paired seeds < 3" in text
