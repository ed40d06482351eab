"""Data-parallel training across processes started by ``torchrun`` (env:// rendezvous).

The trainer averages gradients itself (bucketed all-reduce after ``backward``) instead of
wrapping the model in ``DistributedDataParallel``: a task's ``training_step`` may then call any
sub-module of the plain model (an encoder here, a head there) and skip parts of it on some
steps (staged schedules) without DDP's forward-hook and unused-parameter constraints. The update
is the same as DDP's: every rank applies the mean gradient of the global batch. Buffers (batch
norm running statistics) are broadcast from rank 0 before each step, as DDP does by default.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistContext",
    "all_gather_objects",
    "all_reduce_gradients",
    "all_reduce_tensor",
    "barrier",
    "broadcast_module",
    "init_distributed",
    "shutdown_distributed",
]

log = logging.getLogger(__name__)

_BUCKET_BYTES = 25 * 1024 * 1024


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job.

    Attributes:
        rank: global rank (0 when not distributed).
        world_size: number of processes.
        local_rank: rank on this node (selects the GPU).
        device: the device this process trains on.
        owns_group: True when :func:`init_distributed` created the process group (it is
            destroyed at process exit, or by :func:`shutdown_distributed`).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """True on the process that writes outputs (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when gradients must be averaged across processes."""
        return self.world_size > 1


def _pick_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def init_distributed(timeout_minutes: float = 30.0) -> DistContext:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1).

    Uses the ``env://`` rendezvous (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``),
    NCCL on GPUs and gloo on CPU. A process group that already exists is reused (and left to
    its owner to destroy).

    Args:
        timeout_minutes: collective timeout.

    Returns:
        The context of this process; single-process when ``WORLD_SIZE`` is unset or 1.
    """
    if dist.is_available() and dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, _pick_device(local_rank), False)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext(device=_pick_device(0))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _pick_device(local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        timeout=datetime.timedelta(minutes=timeout_minutes),
        **({"device_id": device} if device.type == "cuda" else {}),
    )
    ctx = DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, True)
    # kept for the life of the process: re-creating the default group on torchrun's store (a
    # second Trainer.fit in one process) races with the previous group's rendezvous keys
    atexit.register(_destroy_at_exit)
    log.info("distributed: rank %d of %d on %s (%s)", ctx.rank, ctx.world_size, device, backend)
    return ctx


def _destroy_at_exit() -> None:
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - interpreter shutdown: nothing left to report to
            pass


def shutdown_distributed(ctx: DistContext) -> None:
    """Destroy the process group if ``ctx`` created it (after a final barrier).

    The trainer does not call this (the group lives until the process exits, so several
    ``fit`` calls can share it); call it to release the group earlier.
    """
    if ctx.owns_group and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op when not distributed)."""
    if ctx.distributed:
        dist.barrier()


@torch.no_grad()
def broadcast_module(module: nn.Module, ctx: DistContext, buffers_only: bool = False) -> None:
    """Copy rank 0's parameters (unless ``buffers_only``) and buffers to every rank."""
    if not ctx.distributed:
        return
    tensors = [b for b in module.buffers()]
    if not buffers_only:
        tensors = [p.data for p in module.parameters()] + tensors
    for tensor in tensors:
        dist.broadcast(tensor, src=0)


def _buckets(tensors: Sequence[torch.Tensor], limit: int) -> Iterable[list[torch.Tensor]]:
    bucket: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and (size + nbytes > limit or t.dtype != bucket[0].dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += nbytes
    if bucket:
        yield bucket


@torch.no_grad()
def all_reduce_gradients(params: Sequence[nn.Parameter], ctx: DistContext) -> None:
    """Replace each gradient by its mean over ranks, as DDP would.

    A parameter that got no gradient on some rank (``grad is None``) counts as a zero gradient
    there; one that got none on every rank keeps ``grad = None`` so the optimiser skips it, as
    it would in a single process.

    Args:
        params: the parameters being optimised, in the same order on every rank.
        ctx: the distributed context.
    """
    if not ctx.distributed:
        return
    params = [p for p in params if p.requires_grad]
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=ctx.device)
    dist.all_reduce(has_grad, op=dist.ReduceOp.MAX)
    grads = []
    for p, flag in zip(params, has_grad.tolist()):
        if flag:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
    for bucket in _buckets(grads, _BUCKET_BYTES):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat)
        flat /= ctx.world_size
        offset = 0
        for g in bucket:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n


def all_gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` when not distributed."""
    if not ctx.distributed:
        return [obj]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def all_reduce_tensor(tensor: torch.Tensor, ctx: DistContext, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (``sum`` or ``max``) of a small tensor; returns it."""
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor
