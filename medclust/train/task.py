"""What the trainer (:mod:`medclust.train.trainer`) needs from a task: the :class:`TrainTask` protocol."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

__all__ = ["TrainTask"]


@runtime_checkable
class TrainTask(Protocol):
    """What the trainer needs from a task.

    Optional hooks, used when present:

    - ``setup(context: DistContext)`` — called first, with rank/world size/device;
    - ``param_groups(model) -> list[dict]`` — optimiser groups (default: decay / no-decay);
    - ``on_epoch_start(model, epoch)`` — e.g. k-means of a memory bank (all ranks call it);
    - ``before_optimizer_step(model, optimizer, step)`` — after the gradients are reduced across ranks,
      clipped and checked: e.g. drop frozen parameters' gradients (``grad = None``: the optimiser
      skips them, moments and step count untouched) or reset optimiser state;
    - ``after_optimizer_step(model, step)`` — e.g. re-normalise prototypes;
    - ``state_dict() -> dict`` / ``load_state_dict(state)`` — per-rank extra state (queues,
      memory banks) saved in checkpoints; tensors and plain types only;
    - ``signature() -> dict`` — settings that identify the run (a checkpoint written under
      other settings is discarded instead of resumed);
    - ``batch_size(batch) -> int`` — items in a batch, for items/s (default: first tensor's length);
    - ``compile_model(model)`` — with ``compile: true``, compile the parts ``training_step`` calls
      (default: ``model.compile()``, which only speeds up ``model(...)`` calls);
    - ``batches`` may accept a keyword ``start``: the number of batches of that epoch already
      consumed, to skip them cheaply on resume (otherwise the trainer iterates past them).
    """

    def build_model(self) -> nn.Module:
        """A fresh model (the trainer seeds the RNG first and moves it to the device)."""
        ...

    def batches(self, epoch: int, rank: int, world_size: int) -> Iterable[Any]:
        """This rank's batches of one epoch, deterministic given the task's seed and ``epoch``."""
        ...

    def training_step(self, model: nn.Module, batch: Any, step: int) -> dict[str, Tensor]:
        """Forward pass and loss; the dict must hold ``"loss"`` (others are logged)."""
        ...
