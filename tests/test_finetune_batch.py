"""`medclust finetune-many`: several fine-tuning runs in one process, each as its own job would be."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from finetune_helpers import phantom, write_store

from medclust.cli import main
from medclust.errors import MedclustError
from medclust.train.recipes.finetune_batch import parse_cells

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {
    "task": "organs", "type": "segmentation", "dataset": "vol", "split": "slabs", "context_slices": 1,
    "label_groups": [["disc", [3]], ["square", [7]]], "steps": 2, "batch_size": 4, "lr": 1e-3, "warmup_steps": 0,
    "patch_size": [32, 32], "decoder_channels": [16, 16, 8, 8, 8], "eval_every": 1, "log_every": 1,
    "tensorboard": False, "progress": False, "backbone": "resnet10",
    "slabs": {"blocks": 2, "val_fraction": 0.2, "test_fraction": 0.2, "gap_mm": 4.0},
}


@pytest.fixture
def store(tmp_path):
    img, lab = phantom(40, seed=1)
    return write_store(tmp_path / "slices", "vol", [{"case_id": "v0", "image": img, "label": lab, "original_shape": [32, 32, 40]}])


@pytest.fixture
def process_stderr(capfd):
    """stderr and logging as in a `medclust` process (pytest otherwise captures both above fd 2)."""
    logger = logging.getLogger("medclust")
    level = logger.level
    with capfd.disabled():
        handler = logging.StreamHandler(sys.stderr)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        try:
            yield
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)


def _many(store, cells) -> int:
    return main(["finetune-many", "--settings", json.dumps(SETTINGS), "--slices", str(store), "--cells", json.dumps({"cells": cells})])


def _single(store, out, seed) -> int:
    return main(["finetune", "--settings", json.dumps(SETTINGS), "--slices", str(store), "--init", "none",
                 "--fraction", "0.5", "--seed", str(seed), "--out", str(out)])


def test_each_cell_is_the_run_finetune_makes(tmp_path, store, process_stderr):
    # seed 3 runs second in the batch, after seed 5: what ran before it must not matter
    cells = [{"init": "none", "fraction": 0.5, "seed": s, "out": str(tmp_path / "many" / str(s)),
              "log": str(tmp_path / "logs" / f"{s}.log")} for s in (5, 3)]
    assert _many(store, cells) == 0
    assert _single(store, tmp_path / "single", 3) == 0
    many, single = tmp_path / "many" / "3", tmp_path / "single"
    a, b = (torch.load(d / "model.pt", weights_only=True) for d in (many, single))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    metrics = [json.loads((d / "metrics.json").read_text(encoding="utf-8")) for d in (many, single)]
    assert metrics[0]["metrics"] == metrics[1]["metrics"] and metrics[0]["seed"] == 3
    for name in ("run.json", "per_case.csv", "model.json", "val.csv", "provenance.json"):
        assert (many / name).is_file(), name
    # each cell's output in its own log, as from a job of its own; checkpoints gone once all finished
    for seed in (5, 3):
        text = (tmp_path / "logs" / f"{seed}.log").read_text(encoding="utf-8")
        assert f"wrote {tmp_path / 'many' / str(seed)}" in text
        assert f"wrote {tmp_path / 'many' / str(8 - seed)}" not in text
        assert not (tmp_path / "many" / str(seed) / "checkpoint").exists()


def test_a_failing_cell_stops_the_batch_and_keeps_the_finished_checkpoints(tmp_path, store, process_stderr):
    good = {"init": "none", "fraction": 0.5, "seed": 0, "out": str(tmp_path / "run0"), "log": str(tmp_path / "0.log")}
    bad = {"init": "joint", "fraction": 0.5, "seed": 1, "out": str(tmp_path / "run1"), "log": str(tmp_path / "1.log"),
           "encoder": str(tmp_path / "missing" / "encoder.pt")}
    after = {"init": "none", "fraction": 0.5, "seed": 2, "out": str(tmp_path / "run2"), "log": str(tmp_path / "2.log")}
    assert _many(store, [good, bad, after]) == 2  # bad input: exit 2, as `medclust finetune` would
    assert "encoder weights not found" in (tmp_path / "1.log").read_text(encoding="utf-8")
    assert not (tmp_path / "run2").exists() and not (tmp_path / "2.log").exists()
    # Snakemake deletes a failed job's outputs; the finished cell's final checkpoint stays, so
    # the rerun does not train it again
    assert (tmp_path / "run0" / "model.pt").is_file() and (tmp_path / "run0" / "checkpoint").is_dir()
    for name in ("model.pt", "model.json", "run.json", "metrics.json", "per_case.csv"):
        (tmp_path / "run0" / name).unlink()
    assert _many(store, [good, after]) == 0
    assert "resuming from step 2" in (tmp_path / "0.log").read_text(encoding="utf-8")
    assert (tmp_path / "run0" / "model.pt").is_file() and not (tmp_path / "run0" / "checkpoint").exists()
    assert not (tmp_path / "run2" / "checkpoint").exists()


def test_cells_must_name_their_run_and_differ():
    with pytest.raises(MedclustError, match="entry 0 lacks seed, out"):
        parse_cells([{"init": "none", "fraction": 1.0}])
    with pytest.raises(MedclustError, match="share a run folder"):
        parse_cells([{"init": "none", "fraction": 1.0, "seed": s, "out": "runs/a"} for s in (0, 1)])


@pytest.mark.slow
def test_workflow_groups_consecutive_seeds_into_one_job(tmp_path):
    """seeds_per_job: 2 with seeds [0, 1, 2]: seeds 0-1 of each init in one finetune_seeds job, the
    lone seed 2 in finetune_run, and so is a run outside the grid (fraction 0.5); the same run
    settings either way (no re-run when it changes)."""
    import re
    import shlex
    import subprocess

    sys.path.insert(0, str(REPO / "tests"))
    import tiny_study

    finetune = dict(tiny_study.CONFIG["finetune"], seeds=[0, 1, 2], seeds_per_job=2)
    config = tiny_study.write_study(tmp_path, cases=2, finetune=finetune)
    out = subprocess.run(
        ["snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path), "--configfile", str(config),
         "-n", "-p", "finetune", "results/finetune/body/none/0.5/0/model.pt"], cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    commands = [shlex.split(c) for c in re.findall(r"^Shell command: exec (medclust finetune.*?) > ", out.stdout, re.MULTILINE)]
    many = [c for c in commands if c[1] == "finetune-many"]
    single = [c for c in commands if c[1] == "finetune"]
    assert len(many) == 2 and len(single) == 3, [c[:2] for c in commands]
    option = lambda cmd, name: cmd[cmd.index(name) + 1]
    assert sorted((option(c, "--fraction"), option(c, "--seed")) for c in single) == [("0.5", "0"), ("1.0", "2"), ("1.0", "2")]
    for cmd in many:
        cells = json.loads(option(cmd, "--cells"))["cells"]
        init = cells[0]["init"]
        assert [c["seed"] for c in cells] == [0, 1] and {c["init"] for c in cells} == {init}
        assert [c["out"] for c in cells] == [f"results/finetune/body/{init}/1.0/{s}" for s in (0, 1)]
        assert [c["log"] for c in cells] == [f"results/logs/finetune/body/{init}/1.0/{s}.log" for s in (0, 1)]
        assert ("encoder" in cells[0]) == (init != "none")
    settings = {option(c, "--settings") for c in many + single}
    assert len(settings) == 1 and "seeds_per_job" not in json.loads(settings.pop())
