"""Prototypes in pretraining: SwAV-exact freezing, per-objective freeze start, DeepCluster state reset, 2D-only models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from pretrain_helpers import make_stores, tiny_settings
from torch import nn

from medclust.data import collect_cases
from medclust.train import Trainer, TrainerConfig
from medclust.train.recipes import PretrainTask, build_joint_model, resolve_settings
from medclust.train.seeding import seed_everything


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_stores(tmp_path_factory.mktemp("stores"))


def _fit(tmp_path: Path, task: PretrainTask, settings: dict[str, Any]) -> nn.Module:
    cfg = TrainerConfig.from_dict({**settings, "progress": False, "tensorboard": False})
    return Trainer(cfg, tmp_path / "run", tmp_path / "run" / "checkpoint").fit(task)


class _Recorder(PretrainTask):
    """Records one prototype set's weight and final gradient before, and its weight after, each update."""

    which = "prototypes_2d"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.before: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.after: dict[int, torch.Tensor] = {}

    def _weight(self, model: nn.Module) -> torch.Tensor:
        return getattr(model, self.which).weight

    def before_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        hook = getattr(super(), "before_optimizer_step", None)
        if hook is not None:
            hook(model, optimizer, step)
        w = self._weight(model)
        self.before[step] = (w.detach().clone(), None if w.grad is None else w.grad.detach().clone())

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        self.after[step] = self._weight(model).detach().clone()  # the optimiser's update, before re-normalising
        super().after_optimizer_step(model, step)


def _fresh_adamw_update(weight: torch.Tensor, grad: torch.Tensor, settings: dict[str, Any]) -> torch.Tensor:
    """The weight after one step of an AdamW that has never stepped this parameter."""
    p = nn.Parameter(weight.clone())
    p.grad = grad.clone()
    torch.optim.AdamW([p], lr=settings["lr"], weight_decay=settings["weight_decay"]).step()
    return p.detach()


CONSTANT_LR = {"warmup_steps": 0, "min_lr_ratio": 1.0}


def test_first_update_after_unfreezing_is_that_of_a_fresh_optimiser(stores: dict[str, Path], tmp_path: Path) -> None:
    freeze = 3
    settings = resolve_settings(tiny_settings(steps=freeze + 1, freeze_prototypes_steps=freeze, **CONSTANT_LR))
    task = _Recorder("swav2d", settings, collect_cases(stores))
    _fit(tmp_path, task, settings)
    for step in range(freeze):  # frozen: no gradient reaches the optimiser, the rows do not move
        assert task.before[step][1] is None
        assert torch.equal(task.after[step], task.before[step][0])
    weight, grad = task.before[freeze]
    assert grad is not None and grad.abs().sum() > 0
    expected = _fresh_adamw_update(weight, grad, settings)
    assert torch.allclose(task.after[freeze], expected, rtol=0, atol=1e-7)


def test_volume_prototypes_freeze_from_the_step_the_3d_objective_starts(stores: dict[str, Path], tmp_path: Path) -> None:
    warmup, freeze = 3, 2  # warmup_2d_steps >= freeze_prototypes_steps: counted from step 0 they never froze
    settings = resolve_settings(tiny_settings(steps=warmup + freeze + 1, warmup_2d_steps=warmup, freeze_prototypes_steps=freeze, **CONSTANT_LR))
    task = _Recorder("joint", settings, collect_cases(stores))
    task.which = "prototypes_3d"
    _fit(tmp_path, task, settings)
    for step in range(warmup + freeze):
        assert task.before[step][1] is None, step
        assert torch.equal(task.after[step], task.before[step][0]), step
    weight, grad = task.before[warmup + freeze]
    assert grad is not None
    assert torch.allclose(task.after[warmup + freeze], _fresh_adamw_update(weight, grad, settings), rtol=0, atol=1e-7)


def test_deepcluster_restarts_prototype_moments_at_each_reclustering(stores: dict[str, Path], tmp_path: Path) -> None:
    # 39 items, batch 20: one step per epoch, so every step starts from freshly loaded centroids
    settings = resolve_settings(tiny_settings(steps=3, batch_size_2d=20, freeze_prototypes_steps=0, **CONSTANT_LR))
    task = _Recorder("deepcluster2d", settings, collect_cases(stores))
    _fit(tmp_path, task, settings)
    for step in (1, 2):
        weight, grad = task.before[step]
        assert not torch.allclose(weight, task.after[step - 1])  # new centroids were loaded
        assert torch.allclose(task.after[step], _fresh_adamw_update(weight, grad, settings), rtol=0, atol=1e-7), step


@pytest.mark.parametrize("method", ["swav2d", "deepcluster2d", "none"])
def test_2d_methods_build_no_volume_branch_and_the_same_encoder(method: str, stores: dict[str, Path]) -> None:
    settings = resolve_settings(tiny_settings())
    task = PretrainTask(method, settings, collect_cases(stores))
    seed_everything(0)
    model = task.build_model()
    assert model.attention is None and model.prototypes_3d is None and model.head_3d is None
    assert not any(name.startswith(("attention.", "head_3d.", "predictor.", "prototypes_3d.", "mask_token")) for name, _ in model.named_parameters())
    seed_everything(0)
    joint = build_joint_model(settings)
    assert joint.attention is not None
    for (name, a), b in zip(model.encoder.state_dict().items(), joint.encoder.state_dict().values()):
        assert torch.equal(a, b), name  # the seeded encoder (what `none` exports) is unchanged
