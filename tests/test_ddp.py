"""Two-process data parallelism on CPU (gloo) under torchrun, against a single process."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_helpers import TinySwAVTask, toy_config
from pretrain_helpers import make_stores

from medclust.train import Trainer

HERE = Path(__file__).resolve().parent


def _losses(path: Path) -> list[float]:
    with open(path, encoding="utf-8") as handle:
        return [float(r["loss"]) for r in csv.DictReader(handle)]


@pytest.mark.slow
def test_two_ranks_match_one_process_and_each_other(tmp_path: Path) -> None:
    stores = {k: str(v) for k, v in make_stores(tmp_path / "stores").items()}
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "ddp_helpers.py"), str(out), json.dumps(stores)]
    done = subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace", env=env, timeout=300)
    (tmp_path / "torchrun.log").write_text(done.stdout + done.stderr, encoding="utf-8")
    assert done.returncode == 0, f"torchrun failed, see {tmp_path / 'torchrun.log'}:\n" + done.stderr[-3000:]

    # every parameter and buffer identical on both ranks (gradients averaged, buffers broadcast)
    for name in ("toy", "joint"):
        r0 = torch.load(out / f"{name}_rank0.pt", weights_only=True)
        r1 = torch.load(out / f"{name}_rank1.pt", weights_only=True)
        for key in r0:
            assert torch.equal(r0[key], r1[key]), f"{name}: {key} differs between ranks"

    # the same global batches in one process: same loss at every step, same weights at the end
    single = Trainer(toy_config(), tmp_path / "single", tmp_path / "single" / "checkpoint").fit(TinySwAVTask())
    ddp_loss, single_loss = _losses(out / "toy" / "metrics.csv"), _losses(tmp_path / "single" / "metrics.csv")
    assert len(ddp_loss) == len(single_loss) == 8
    assert ddp_loss == pytest.approx(single_loss, rel=1e-4, abs=1e-5)
    r0 = torch.load(out / "toy_rank0.pt", weights_only=True)
    for key, value in single.state_dict().items():
        assert torch.allclose(r0[key], value, atol=1e-5), key
    # only rank 0 wrote outputs; checkpoints hold one RNG/task file per rank
    assert sorted(p.name for p in (out / "toy" / "checkpoint" / "step_00000008").iterdir()) == ["rank0.pt", "rank1.pt", "trainer.pt"]
