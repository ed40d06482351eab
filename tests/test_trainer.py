"""The generic Trainer: optimisation, exact resume after SIGTERM, non-finite loss, checkpoints."""

from __future__ import annotations

import csv
import logging
import os
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medclust.errors import MedclustError
from medclust.train import (
    LARS,
    CheckpointStore,
    Trainer,
    TrainerConfig,
    TrainingInterrupted,
    derive_seed,
    load_weights,
    rng_state,
    set_rng_state,
    warmup_cosine_factor,
)


class ToyTask:
    """Regression with dropout and a random 'queue', so resume must restore RNG and task state."""

    def __init__(self, seed: int = 0, n: int = 48, batch: int = 8, kill_at: int | None = None, nan_at: int | None = None, signum: int = signal.SIGTERM) -> None:
        gen = torch.Generator().manual_seed(123)
        self.x = torch.randn(n, 6, generator=gen)
        self.y = self.x @ torch.randn(6, 1, generator=gen) + 0.05 * torch.randn(n, 1, generator=gen)
        self.seed, self.batch = seed, batch
        self.kill_at, self.nan_at, self.signum = kill_at, nan_at, signum
        self.queue = torch.zeros(4)
        self.epochs_started: list[int] = []

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))

    def batches(self, epoch: int, rank: int, world_size: int):
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(derive_seed(self.seed, epoch)))
        per_rank = self.batch // world_size
        for start in range(0, len(order) - self.batch + 1, self.batch):
            idx = order[start : start + self.batch][rank * per_rank : (rank + 1) * per_rank]
            yield {"x": self.x[idx], "y": self.y[idx]}

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        self.epochs_started.append(epoch)

    def training_step(self, model: nn.Module, batch, step: int):
        if self.kill_at is not None and step == self.kill_at:
            os.kill(os.getpid(), self.signum)
        loss = nn.functional.mse_loss(model(batch["x"]), batch["y"]) + 0.0 * self.queue.sum()
        self.queue = torch.roll(self.queue, 1) + torch.rand(4)  # consumes the global RNG, like masking does
        if self.nan_at is not None and step >= self.nan_at:
            loss = loss * float("nan")
        return {"loss": loss, "loss_aux": loss.detach() * 2}

    def state_dict(self):
        return {"queue": self.queue.clone()}

    def load_state_dict(self, state) -> None:
        self.queue = state["queue"].clone()


def _cfg(**kw) -> TrainerConfig:
    base = {"max_steps": 30, "lr": 0.01, "warmup_steps": 3, "checkpoint_every": 7, "log_every": 1, "progress": False, "tensorboard": False, "seed": 3}
    base.update(kw)
    return TrainerConfig(**base)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_loss_decreases_and_logs(tmp_path: Path) -> None:
    trainer = Trainer(_cfg(max_steps=60, lr=0.03, log_every=5, tensorboard=True), tmp_path / "out", tmp_path / "ckpt")
    model = trainer.fit(ToyTask())
    rows = _read_csv(tmp_path / "out" / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(5, 61, 5))
    assert set(rows[0]) >= {"step", "loss", "loss_aux", "lr", "items_per_s"}
    assert float(rows[-1]["loss"]) < 0.5 * float(rows[0]["loss"])
    assert next(model.parameters()).device.type == "cpu"
    assert any((tmp_path / "out" / "tensorboard").iterdir())
    # final checkpoint at max_steps, every file weights_only-loadable
    latest = CheckpointStore(tmp_path / "ckpt").latest()
    assert latest is not None and latest.name == "step_00000060"
    for f in latest.iterdir():
        load_weights(f)


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGUSR1, 138)])
def test_resume_after_signal_matches_uninterrupted(tmp_path: Path, caplog: pytest.LogCaptureFixture, signum: int, code: int) -> None:
    ref = Trainer(_cfg(), tmp_path / "ref", tmp_path / "ref_ckpt").fit(ToyTask())

    task = ToyTask(kill_at=12, signum=signum)
    first = Trainer(_cfg(), tmp_path / "run", tmp_path / "run_ckpt")
    with pytest.raises(TrainingInterrupted) as info:
        first.fit(task)
    assert info.value.exit_code == code and info.value.step == 13
    assert signal.getsignal(signal.SIGTERM) is signal.default_int_handler or signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert CheckpointStore(tmp_path / "run_ckpt").latest().name == "step_00000013"

    # a fresh process would start with other global RNG states: scramble them
    torch.manual_seed(999), np.random.seed(999), random.seed(999)
    caplog.set_level(logging.INFO, logger="medclust.train")
    resumed_task = ToyTask()
    resumed = Trainer(_cfg(), tmp_path / "run", tmp_path / "run_ckpt").fit(resumed_task)
    assert "resuming from step 13" in caplog.text
    for (name, a), (_, b) in zip(ref.state_dict().items(), resumed.state_dict().items()):
        assert torch.allclose(a, b, rtol=0, atol=1e-7), name
    ref_rows = _read_csv(tmp_path / "ref" / "metrics.csv")
    run_rows = _read_csv(tmp_path / "run" / "metrics.csv")
    assert [r["step"] for r in run_rows] == [r["step"] for r in ref_rows]
    assert [r["loss"] for r in run_rows] == [r["loss"] for r in ref_rows]
    # epochs are started once each, never again for a resumed partial epoch
    assert resumed_task.epochs_started == sorted(set(resumed_task.epochs_started))


def test_fresh_run_logs_start_and_finished_run_does_not_retrain(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="medclust.train")
    first = Trainer(_cfg(max_steps=10), tmp_path / "o", tmp_path / "c").fit(ToyTask())
    assert "starting at step 0" in caplog.text
    caplog.clear()
    again = Trainer(_cfg(max_steps=10), tmp_path / "o", tmp_path / "c")
    second = again.fit(ToyTask())
    assert "resuming from step 10" in caplog.text and again.start_step == 10
    for a, b in zip(first.parameters(), second.parameters()):
        assert torch.equal(a, b)


def test_changed_settings_discard_old_checkpoints(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    Trainer(_cfg(max_steps=8), tmp_path / "o", tmp_path / "c").fit(ToyTask())
    caplog.set_level(logging.INFO, logger="medclust.train")
    trainer = Trainer(_cfg(max_steps=8, lr=0.02), tmp_path / "o", tmp_path / "c")
    trainer.fit(ToyTask())
    assert "starting at step 0" in caplog.text and trainer.start_step == 0


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    trainer = Trainer(_cfg(checkpoint_every=5), tmp_path / "o", tmp_path / "c")
    with pytest.raises(MedclustError, match=r"non-finite loss at step 8 .*step_00000005"):
        trainer.fit(ToyTask(nan_at=8))
    store = CheckpointStore(tmp_path / "c")
    assert [s for s, _ in store.steps()] == [5]
    state = load_weights(store.latest() / "trainer.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values())


class _NaNGradTask(ToyTask):
    """Finite loss, infinite gradient from step ``bad_at`` on (d sqrt(x)/dx at x = 0)."""

    bad_at = 4

    def training_step(self, model: nn.Module, batch, step: int):
        out = super().training_step(model, batch, step)
        if step >= self.bad_at:
            out["loss"] = out["loss"] + torch.sqrt(0.0 * next(model.parameters()).sum())
        return out


@pytest.mark.parametrize("grad_clip", [None, 1.0])
def test_non_finite_gradient_stops_with_or_without_clipping(tmp_path: Path, grad_clip: float | None) -> None:
    trainer = Trainer(_cfg(grad_clip=grad_clip, checkpoint_every=3), tmp_path / "o", tmp_path / "c")
    with pytest.raises(MedclustError, match=r"non-finite gradient norm at step 4 .*step_00000003"):
        trainer.fit(_NaNGradTask())
    state = load_weights(CheckpointStore(tmp_path / "c").latest() / "trainer.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values())


class _HookTask(ToyTask):
    """Records what ``before_optimizer_step`` sees: the final (reduced, clipped) gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, float, bool]] = []

    def before_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        norm = float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]))
        self.seen.append((step, norm, isinstance(optimizer, torch.optim.AdamW)))
        first = next(model.parameters())
        if step % 2:
            first.grad = None  # odd steps: this parameter is skipped, as frozen prototypes are


def test_before_optimizer_step_hook_sees_clipped_gradients_and_can_drop_them(tmp_path: Path) -> None:
    task = _HookTask()
    trainer = Trainer(_cfg(max_steps=6, grad_clip=1e-3), tmp_path / "o", tmp_path / "c")
    trainer.fit(task)
    assert [s for s, _, _ in task.seen] == list(range(6)) and all(adamw for _, _, adamw in task.seen)
    assert max(norm for _, norm, _ in task.seen) <= 1e-3 * (1 + 1e-4)  # after clipping
    # the parameter whose gradient the hook dropped took only the 3 even steps (AdamW counts them)
    state = load_weights(CheckpointStore(tmp_path / "c").latest() / "trainer.pt")["optimizer"]["state"]
    assert int(state[0]["step"]) == 3 and int(state[1]["step"]) == 6


def test_zero_steps_builds_seeded_model(tmp_path: Path) -> None:
    a = Trainer(_cfg(max_steps=0), tmp_path / "a", tmp_path / "a" / "c").fit(ToyTask())
    b = Trainer(_cfg(max_steps=0), tmp_path / "b", tmp_path / "b" / "c").fit(ToyTask())
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert CheckpointStore(tmp_path / "a" / "c").latest() is None


def test_config_from_dict_and_validation() -> None:
    cfg = TrainerConfig.from_dict({"steps": 5, "lr": 0.1, "optimizer": "sgd_lars", "backbone": "resnet10"})
    assert cfg.max_steps == 5 and cfg.optimizer == "sgd_lars"
    with pytest.raises(MedclustError, match="optimizer"):
        TrainerConfig(optimizer="adam")
    with pytest.raises(MedclustError, match="grad_clip"):
        TrainerConfig(grad_clip=0)


def test_warmup_cosine_schedule() -> None:
    f = [warmup_cosine_factor(s, total_steps=20, warmup_steps=4, min_lr_ratio=0.1) for s in range(21)]
    assert f[0] == pytest.approx(1 / 5) and f[3] == pytest.approx(4 / 5)
    assert f[4] == pytest.approx(1.0) and f[20] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[4:], f[5:]))


def test_lars_trust_ratio_and_excluded_group() -> None:
    w = nn.Parameter(torch.full((4, 4), 2.0))
    b = nn.Parameter(torch.ones(4))
    opt = LARS([{"params": [w]}, {"params": [b], "lars_exclude": True, "weight_decay": 0.0}], lr=1.0, momentum=0.0, weight_decay=0.0, eta=0.01)
    w.grad = torch.full((4, 4), 100.0)
    b.grad = torch.full((4,), 0.5)
    opt.step()
    # ||w|| = 8, ||g|| = 400 -> trust 0.01 * 8 / 400; step = lr * trust * g = 0.02
    assert torch.allclose(w, torch.full((4, 4), 2.0 - 0.02))
    assert torch.allclose(b, torch.full((4,), 0.5))


def test_rng_state_roundtrip_is_weights_only_safe(tmp_path: Path) -> None:
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]
