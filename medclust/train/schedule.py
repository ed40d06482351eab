"""Learning-rate schedule: linear warm-up, then cosine decay to a floor."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["build_scheduler", "warmup_cosine_factor"]


def warmup_cosine_factor(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based).

    Linear from ``1/(warmup_steps+1)`` to 1 over ``warmup_steps`` steps (never exactly zero, so
    the first step moves), then a half cosine from 1 down to ``min_lr_ratio`` at ``total_steps``.

    Args:
        step: optimiser steps already taken.
        total_steps: length of the run.
        warmup_steps: steps of linear warm-up.
        min_lr_ratio: final learning rate as a fraction of the base rate.

    Returns:
        The factor in ``[min_lr_ratio, 1]``.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class _WarmupCosine:
    """A callable with plain attributes: ``LambdaLR`` checkpoints its ``__dict__`` (``weights_only``-safe)."""

    def __init__(self, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> None:
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio

    def __call__(self, step: int) -> float:
        return warmup_cosine_factor(step, self.total_steps, self.warmup_steps, self.min_lr_ratio)


def build_scheduler(optimizer: Optimizer, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0) -> LambdaLR:
    """A per-step ``LambdaLR`` applying :func:`warmup_cosine_factor` to every parameter group.

    Each group keeps its own base rate (``initial_lr``), so groups with scaled rates stay scaled.
    """
    fn = _WarmupCosine(total_steps, warmup_steps, min_lr_ratio)
    return LambdaLR(optimizer, lr_lambda=[fn] * len(optimizer.param_groups))
