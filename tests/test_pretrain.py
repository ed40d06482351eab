"""Pretraining: data pipeline, the three objectives learning, exact resume, outputs, CLI."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.networks.nets import FlexibleUNet
from pretrain_helpers import SIZE, make_stores, tiny_settings

from medclust.data import collect_cases, plan_epoch
from medclust.errors import MedclustError
from medclust.train import Trainer, TrainerConfig, TrainingInterrupted
from medclust.train.distributed import DistContext
from medclust.train.recipes import THREE_D_KEYS, PretrainTask, resolve_settings, run_pretraining


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_stores(tmp_path_factory.mktemp("stores"))


def _trainer(tmp_path: Path, settings: dict, name: str = "run") -> Trainer:
    cfg = TrainerConfig.from_dict({**settings, "progress": False, "tensorboard": False})
    return Trainer(cfg, tmp_path / name, tmp_path / name / "checkpoint")


def test_cases_come_from_train_and_val_never_test(stores: dict[str, Path]) -> None:
    cases = collect_cases(stores)
    ids = {c.case_id for c in cases}
    assert ids == {"ct_a", "ct_b", "ct_c", "ct_v", "xr_1", "xr_2", "xr_3"}
    assert {c.dataset for c in cases} == {"ct", "xr"}
    with pytest.raises(MedclustError, match="test"):
        collect_cases(stores, ("train", "test"))


def test_rank_shards_together_form_the_single_process_batch() -> None:
    single = plan_epoch(30, 4, 8, 2, seed=0, epoch=1)
    shards = [plan_epoch(30, 4, 8, 2, seed=0, epoch=1, rank=r, world_size=2) for r in (0, 1)]
    assert len(single) == 30 // 8 == len(shards[0]) == len(shards[1])
    for whole, a, b in zip(single, *shards):
        assert a.items + b.items == whole.items and a.volumes + b.volumes == whole.volumes
    assert [p.items for p in plan_epoch(30, 4, 8, 2, seed=0, epoch=2)] != [p.items for p in single]
    with pytest.raises(MedclustError, match="divisible"):
        plan_epoch(30, 4, 8, 1, seed=0, epoch=0, rank=0, world_size=2)


def test_batches_are_deterministic_two_view_and_padded(stores: dict[str, Path]) -> None:
    task = PretrainTask("joint", resolve_settings(tiny_settings()), collect_cases(stores))
    task.setup(DistContext())
    first, again = list(task.batches(0, 0, 1)), list(task.batches(0, 0, 1))
    for a, b in zip(first, again):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    batch = first[0]
    # batch_size_2d 10 = 6 items drawn on their own + the s_max 4 slices of batch_size_3d 1 volume
    assert batch["views2d"].shape == (2, 6, 1, SIZE, SIZE)
    assert not torch.equal(batch["views2d"][0], batch["views2d"][1])
    assert batch["volumes"].shape == (2, 1, 4, SIZE, SIZE) and batch["valid"].shape == (2, 1, 4)
    assert not torch.equal(batch["z_mm"][0], batch["z_mm"][1])  # each view its own z window, scale and jitter
    assert batch["pair"].shape == (1, 4) and int(batch["pair"].max()) < 4
    assert int(batch["valid"].sum(-1).min()) >= 2
    assert not torch.equal(batch["volumes"][0], batch["volumes"][1])
    # resume skips consumed batches without building them
    skipped = list(task.batches(0, 0, 1, start=1))
    assert torch.equal(skipped[0]["views2d"], first[1]["views2d"])
    assert not torch.equal(list(task.batches(1, 0, 1))[0]["views2d"], batch["views2d"])


# DeepCluster re-clusters every epoch and its loss jumps with the new targets; with one step per
# epoch (20 of the 39 items) it re-clusters every step, and the loss still has to come down
@pytest.mark.parametrize(
    "method, extra",
    [
        ("joint", {}),
        ("swav2d", {}),
        ("deepcluster2d", {"batch_size_2d": 20, "lr": 3e-3, "freeze_prototypes_steps": 0}),
        ("simclr", {}),
        ("nnclr", {"nnclr": {"queue_length": 16, "predictor_hidden": 32}}),
        ("joint-simclr", {}),
        ("depict", {}),
        ("joint-depict", {}),
        ("lnscc", {}),
        ("joint-lnscc", {}),
        ("gedi", {"gedi": {"sgld_steps": 2, "buffer_size": 16}}),
        ("joint-gedi", {"gedi": {"sgld_steps": 2, "buffer_size": 16}}),
    ],
)
def test_objectives_decrease(stores: dict[str, Path], tmp_path: Path, method: str, extra: dict) -> None:
    settings = resolve_settings(tiny_settings(steps=24, **extra))
    trainer = _trainer(tmp_path, settings)
    trainer.fit(PretrainTask(method, settings, collect_cases(stores)))
    rows = trainer.history
    assert len(rows) == 24
    # DEPICT's KL term is self-training toward a target that sharpens with the prediction, so its
    # total need not fall in 24 steps; its reconstruction must
    loss = [r["loss_recon" if "depict" in method else "loss"] for r in rows]
    assert np.mean(loss[-6:]) < np.mean(loss[:6]), loss
    if method == "joint":
        assert {"loss_intra", "loss_inter", "loss_mask"} <= rows[-1].keys()
        assert np.mean([r["loss_mask"] for r in rows[-6:]]) < np.mean([r["loss_mask"] for r in rows[:6]])
    if method in ("joint", "swav2d", "deepcluster2d"):
        # below the uniform-prediction level ln(K): the prediction has learned something
        assert min(r["loss_intra"] for r in rows[-6:]) < math.log(settings["k_2d"])


def test_staged_schedule_adds_3d_objectives_after_2d_warmup(stores: dict[str, Path], tmp_path: Path) -> None:
    settings = resolve_settings(tiny_settings(steps=4, warmup_2d_steps=2))
    trainer = _trainer(tmp_path, settings)
    trainer.fit(PretrainTask("joint", settings, collect_cases(stores)))
    assert [sorted(r) for r in trainer.history[:2]] == [["items_per_s", "loss", "loss_intra", "lr", "step"]] * 2
    assert all({"loss_inter", "loss_mask"} <= r.keys() for r in trainer.history[2:])
    with open(tmp_path / "run" / "metrics.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert rows[0]["loss_inter"] == "" and float(rows[-1]["loss_inter"]) > 0


class _KillAt(PretrainTask):
    """Sends itself SIGTERM inside one step (the trainer must finish it, save and stop)."""

    kill_at = -1

    def training_step(self, model, batch, step):  # type: ignore[no-untyped-def]
        if step == self.kill_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().training_step(model, batch, step)


# default augmentation (random affine included); 39 items / batch 7: 5 steps per epoch, so step 3
# is mid-epoch and step 5 the epoch boundary, where k-means must run on the restored bank
@pytest.mark.parametrize(
    "method, kill_at, extra",
    [
        ("joint", 2, {"queue_length": 16, "queue_length_3d": 4}),
        ("joint", 2, {"num_workers": 2}),
        ("deepcluster2d", 4, {}),
        ("nnclr", 3, {"nnclr": {"queue_length": 8, "predictor_hidden": 16}}),  # the support queue is state
        ("depict", 3, {"depict": {"target_update": 2}}),  # the held cluster frequencies are state
        ("gedi", 3, {"gedi": {"sgld_steps": 2, "buffer_size": 16}}),  # the SGLD replay buffer is state
    ],
)
def test_interrupted_and_resumed_run_equals_uninterrupted(stores: dict[str, Path], tmp_path: Path, method: str, kill_at: int, extra: dict) -> None:
    settings = resolve_settings(tiny_settings(steps=6, batch_size_2d=7, augment={}, **extra))
    assert settings["augment"]["affine_prob"] > 0
    cases = collect_cases(stores)
    reference = _trainer(tmp_path, settings, "ref").fit(PretrainTask(method, settings, cases))

    task = _KillAt(method, settings, cases)
    task.kill_at = kill_at
    with pytest.raises(TrainingInterrupted) as info:
        _trainer(tmp_path, settings).fit(task)
    assert info.value.step == kill_at + 1 and info.value.exit_code == 143
    torch.manual_seed(1234), np.random.seed(1234)  # a new process would not share the old RNG state
    resumed_trainer = _trainer(tmp_path, settings)
    resumed = resumed_trainer.fit(PretrainTask(method, settings, cases))
    assert resumed_trainer.start_step == kill_at + 1
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name  # bit for bit


def test_outputs_and_encoder_loads_into_flexible_unet(stores: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "joint"
    encoder_path = run_pretraining("joint", tiny_settings(steps=3), stores, out)
    assert encoder_path == out / "encoder.pt"
    for name in ("encoder.pt", "slice_encoder.pt", "metrics.csv", "embeddings.npz", "provenance.json"):
        assert (out / name).is_file(), name
    assert (out / "checkpoint" / "step_00000003" / "trainer.pt").is_file()

    with open(out / "metrics.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert {"loss", "loss_intra", "loss_inter", "loss_mask", "lr", "items_per_s"} <= rows[0].keys()

    net = FlexibleUNet(1, 3, backbone="resnet10", pretrained=False, spatial_dims=2)
    net.encoder.load_state_dict(torch.load(encoder_path, weights_only=True), strict=True)
    full = torch.load(out / "slice_encoder.pt", weights_only=True)
    assert full["backbone"] == "resnet10" and any(k.startswith("proj.") for k in full["state_dict"])

    with np.load(out / "embeddings.npz", allow_pickle=False) as npz:
        data = {k: npz[k] for k in npz.files}
    meta = json.loads(str(data["meta"]))
    assert meta["cases_embedded"] == {"ct": "val", "xr": "train (no validation cases)"}
    # ct_v (9 slices, val) and the three X-rays (no val split: train used instead)
    assert data["slice_embeddings"].shape == (12, 32)
    assert sorted(set(data["slice_case"])) == ["ct_v", "xr_1", "xr_2", "xr_3"]
    assert set(data["slice_modality"]) == {"CT", "XR"}
    assert ((data["slice_cluster"] >= 0) & (data["slice_cluster"] < 6)).all()
    assert data["volume_embeddings"].shape == (1, 32) and list(data["volume_case"]) == ["ct_v"]
    assert 0 <= int(data["volume_cluster"][0]) < 3
    prov = json.loads((out / "provenance.json").read_text(encoding="utf-8"))
    assert prov["settings"]["method"] == "joint" and prov["settings"]["steps"] == 3
    assert all(c["split"] != "test" for c in prov["settings"]["cases"])


def test_random_init_writes_everything_and_ignores_3d_settings(stores: dict[str, Path], tmp_path: Path) -> None:
    # heads=3 does not divide d_model=32: would fail if the 2D-only method built the joint 3D branch from it
    run_pretraining("none", tiny_settings(heads=3), stores, tmp_path / "none")
    assert (tmp_path / "none" / "metrics.csv").read_text(encoding="utf-8").startswith("step,loss,")
    with np.load(tmp_path / "none" / "embeddings.npz", allow_pickle=False) as npz:
        assert (npz["volume_cluster"] == -1).all() and npz["slice_embeddings"].shape[0] == 12
    again = tmp_path / "again"
    run_pretraining("none", tiny_settings(), stores, again)
    a = torch.load(tmp_path / "none" / "encoder.pt", weights_only=True)
    b = torch.load(again / "encoder.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)  # seeded


def test_snakemake_3d_key_list_matches_recipe(repo_root: str) -> None:
    text = Path(repo_root, "workflow", "rules", "common.smk").read_text(encoding="utf-8")
    block = re.search(r"PRETRAIN_3D_KEYS = \((.*?)\)", text, re.S)
    assert block is not None
    assert tuple(re.findall(r'"([a-z0-9_]+)"', block.group(1))) == THREE_D_KEYS
    schema_keys = resolve_settings({}).keys()
    assert set(THREE_D_KEYS) <= set(schema_keys)


def test_unknown_method_and_missing_data_fail_clearly(stores: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(MedclustError, match="unknown method 'swav'"):
        run_pretraining("swav", tiny_settings(), stores, tmp_path / "x")
    with pytest.raises(MedclustError, match="'stpes' was unexpected"):
        run_pretraining("swav2d", tiny_settings(stpes=3), stores, tmp_path / "x")
    with pytest.raises(MedclustError, match="index.json"):
        run_pretraining("swav2d", tiny_settings(), [tmp_path / "nowhere"], tmp_path / "y")


@pytest.mark.slow
def test_cli_sigterm_exits_143_and_rerun_resumes(stores: dict[str, Path], tmp_path: Path) -> None:
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps(tiny_settings(steps=6, checkpoint_every=1, log_every=2)), encoding="utf-8")
    out = tmp_path / "pretrain" / "joint"
    cmd = [sys.executable, "-m", "medclust.cli", "pretrain", "--method", "joint", "--settings", f"@{settings}",
           "--stores", str(stores["ct"]), str(stores["xr"]), "--out", str(out), "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, encoding="utf-8", errors="replace", env=env)
    deadline = time.time() + 120
    while not (out / "checkpoint" / "step_00000001").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "received SIGTERM: checkpoint saved at step" in err
    assert not (out / "encoder.pt").exists()

    done = subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace", env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    step = int(re.search(r"resuming from step (\d+)", done.stderr).group(1))
    assert 1 <= step < 6
    for name in ("encoder.pt", "metrics.csv", "embeddings.npz", "provenance.json"):
        assert (out / name).is_file()
    with open(out / "metrics.csv", encoding="utf-8") as handle:
        assert [int(r["step"]) for r in csv.DictReader(handle)] == [2, 4, 6]


def test_queues_that_would_hold_stale_copies_of_the_data_are_flagged(stores: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    cases = collect_cases(stores)  # 39 2D items, 4 training volumes
    caplog.set_level(logging.WARNING, logger="medclust.pretrain")
    PretrainTask("joint", resolve_settings(tiny_settings(queue_length=8, queue_length_3d=2)), cases)
    assert caplog.text == ""
    PretrainTask("joint", resolve_settings(tiny_settings(queue_length=16, queue_length_3d=4)), cases)
    assert "queue_length=16 is 41% of the 39 2D items" in caplog.text
    assert "queue_length_3d=4 holds several copies of each of the 4 volumes" in caplog.text


def test_more_volume_prototypes_than_volumes_per_assignment_is_flagged(stores: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    cases = collect_cases(stores)  # 4 training volumes
    caplog.set_level(logging.WARNING, logger="medclust.pretrain")
    PretrainTask("joint", resolve_settings(tiny_settings(k_3d=3, batch_size_3d=2, queue_length_3d=1)), cases)
    assert "k_3d" not in caplog.text
    PretrainTask("joint", resolve_settings(tiny_settings(k_3d=4, batch_size_3d=2)), cases)
    assert ("k_3d=4 volume prototypes for 2 distinct volumes per assignment (batch_size_3d 2 + queue_length_3d 0, "
            "4 training volumes): equal partition spreads each volume over >= 2.0 prototypes, so the volume loss "
            "cannot fall below ln(2.0) = 0.693; use k_3d <= 2") in caplog.text  # fmt: skip
    caplog.clear()
    PretrainTask("swav2d", resolve_settings(tiny_settings(k_3d=4, batch_size_3d=2)), cases)  # no 3D objective
    assert "k_3d" not in caplog.text
