"""The trainer's settings (:class:`TrainerConfig`): optimisation, precision, checkpoints, logging."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from medclust.errors import MedclustError

__all__ = ["TrainerConfig"]

_OPTIMIZERS = ("adamw", "sgd_lars")
# settings that change the optimisation trajectory: a checkpoint written under other values
# belongs to another run and must not be resumed
_SIGNATURE_FIELDS = (
    "max_steps", "lr", "weight_decay", "optimizer", "momentum", "lars_eta", "warmup_steps",
    "min_lr_ratio", "grad_clip", "amp", "seed", "deterministic",
)


@dataclass
class TrainerConfig:
    """How to optimise (the same for every task).

    Attributes:
        max_steps: optimiser steps in the whole run (0: build the model, train nothing).
        lr: base learning rate (reached after warm-up; groups may scale it).
        weight_decay: decoupled (AdamW) or L2 (LARS) weight decay; not applied to biases/norms.
        optimizer: ``adamw`` or ``sgd_lars`` (SGD + momentum with a LARS trust ratio).
        momentum: SGD momentum (``sgd_lars``).
        lars_eta: LARS trust coefficient (``sgd_lars``).
        warmup_steps: linear warm-up steps before the cosine decay.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        grad_clip: max global gradient norm, or None for no clipping.
        checkpoint_every: save a checkpoint every this many steps (and on signals, and at the end).
        keep_checkpoints: complete checkpoints kept on disk.
        log_every: steps averaged into one metrics row.
        amp: bf16 autocast on CUDA (ignored on CPU, where bf16 is slow and fp32 is exact).
        compile: ``torch.compile`` the model in place (or what the task's ``compile_model`` picks).
        seed: run seed (model initialisation, per-rank random streams).
        deterministic: request deterministic torch algorithms (slower on GPU).
        progress: show a tqdm progress bar on stderr (rank 0).
        tensorboard: write TensorBoard event files in ``out_dir/tensorboard``.
    """

    max_steps: int = 100
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    momentum: float = 0.9
    lars_eta: float = 0.001
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    amp: bool = True
    compile: bool = False
    seed: int = 0
    deterministic: bool = False
    progress: bool = True
    tensorboard: bool = True

    def __post_init__(self) -> None:
        problems = []
        if self.max_steps < 0:
            problems.append(f"max_steps={self.max_steps} must be >= 0")
        if not self.lr > 0:
            problems.append(f"lr={self.lr} must be > 0")
        if self.weight_decay < 0:
            problems.append(f"weight_decay={self.weight_decay} must be >= 0")
        if self.optimizer not in _OPTIMIZERS:
            problems.append(f"optimizer={self.optimizer!r} must be one of {', '.join(_OPTIMIZERS)}")
        if self.warmup_steps < 0:
            problems.append(f"warmup_steps={self.warmup_steps} must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if self.grad_clip is not None and not self.grad_clip > 0:
            problems.append(f"grad_clip={self.grad_clip} must be > 0 or null")
        if self.checkpoint_every < 1 or self.log_every < 1 or self.keep_checkpoints < 1:
            problems.append("checkpoint_every, log_every and keep_checkpoints must be >= 1")
        if problems:
            raise MedclustError("trainer settings: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, settings: Mapping[str, Any]) -> TrainerConfig:
        """Pick the trainer's keys out of a (larger) settings dict; ``steps`` means ``max_steps``.

        Unknown keys are ignored so a whole config section (model sizes, data options) can be
        passed; schema validation has already rejected typos.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        picked = {k: v for k, v in settings.items() if k in names}
        if "steps" in settings and "max_steps" not in settings:
            picked["max_steps"] = settings["steps"]
        return cls(**picked)

    def signature(self) -> dict[str, Any]:
        """The settings that determine the optimisation trajectory."""
        return {k: getattr(self, k) for k in _SIGNATURE_FIELDS}
