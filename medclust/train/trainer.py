"""The one trainer: pretraining and fine-tuning both run through :class:`Trainer`.

A task (:class:`TrainTask`) says what to train — model, batches, loss — and the trainer owns how:
device, data parallelism under ``torchrun``, bf16 autocast on CUDA, gradient clipping, warm-up +
cosine learning rate, AdamW or SGD+LARS, checkpoints (every N steps, on SIGTERM/SIGUSR1, at the
end), exact resume, non-finite loss detection, progress bar, ``metrics.csv`` and TensorBoard.

Exact resume works because everything random is either restored from the checkpoint (global
RNGs, task state such as queues and memory banks) or derived from ``(seed, epoch, ...)`` by the
task (data order, augmentation): a run interrupted at any step boundary and resumed ends with
the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import itertools
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from medclust.errors import MedclustError
from medclust.train.checkpoint import CheckpointStore
from medclust.train.distributed import (
    DistContext,
    all_gather_objects,
    all_reduce_gradients,
    all_reduce_tensor,
    barrier,
    broadcast_module,
    init_distributed,
)
from medclust.train.metrics_logger import MetricsLogger
from medclust.train.optim import build_optimizer, default_param_groups
from medclust.train.schedule import build_scheduler
from medclust.train.seeding import derive_seed, rng_state, seed_everything, set_rng_state
from medclust.train.signals import SignalFlag, TrainingInterrupted
from medclust.train.task import TrainTask
from medclust.train.trainer_config import TrainerConfig

__all__ = ["TrainTask", "Trainer", "TrainerConfig", "move_to_device"]

log = logging.getLogger("medclust.train")


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a nested batch (dicts, lists, tuples, objects with ``.to``)."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return type(batch)({k: move_to_device(v, device) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(move_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return dataclasses.replace(batch, **{f.name: move_to_device(getattr(batch, f.name), device) for f in dataclasses.fields(batch) if f.init})
    if hasattr(batch, "to") and callable(batch.to):
        return batch.to(device)
    return batch


def _count_items(batch: Any) -> int:
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    elif dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        batch = [getattr(batch, f.name) for f in dataclasses.fields(batch)]
    if isinstance(batch, (list, tuple)):
        for value in batch:
            n = _count_items(value)
            if n:
                return n
    return 0


def _close_batches(batches: Iterator[Any] | None) -> None:
    """Shut down a batch iterator: a DataLoader's worker processes, or close a generator."""
    shutdown = getattr(batches, "_shutdown_workers", None)  # torch's multi-process loader iterator
    if callable(shutdown):
        shutdown()
    elif hasattr(batches, "close") and callable(batches.close):
        batches.close()


def _scalar(value: Any, device: torch.device) -> Tensor:
    """A detached float32 0-d tensor on ``device`` (metrics may be tensors or plain numbers)."""
    if isinstance(value, Tensor):
        return value.detach().float().reshape(()).to(device)
    return torch.tensor(float(value), device=device)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Trainer:
    """Train a :class:`TrainTask` with checkpoints, resume, signals, DDP and logging.

    Args:
        config: optimisation settings.
        out_dir: where ``tensorboard/`` and, once training has finished, ``metrics.csv`` go
            (rank 0 writes; the live ``metrics.csv`` is in ``checkpoint_dir``).
        checkpoint_dir: where step checkpoints go; a later run with the same settings resumes
            from the newest one.

    Example:
        >>> trainer = Trainer(TrainerConfig(max_steps=100, lr=1e-3), Path("out"), Path("out/checkpoint"))
        >>> model = trainer.fit(task)  # doctest: +SKIP
    """

    def __init__(self, config: TrainerConfig, out_dir: str | Path, checkpoint_dir: str | Path) -> None:
        self.config = config
        self.out_dir = Path(out_dir)
        self.checkpoint_dir = Path(checkpoint_dir)
        self.store = CheckpointStore(self.checkpoint_dir, keep=config.keep_checkpoints)
        self.context: DistContext = DistContext()
        self.step = 0
        self.start_step = 0
        self.last_checkpoint: Path | None = None
        self.history: list[dict[str, Any]] = []

    # -- helpers -------------------------------------------------------------------------------

    def _signature(self, task: Any) -> str:
        task_sig = task.signature() if hasattr(task, "signature") else None
        return _hash({"trainer": self.config.signature(), "task": task_sig})

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.config.amp and self.context.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _batch_iter(self, task: Any, epoch: int, skip: int) -> Iterator[Any]:
        ctx = self.context
        if skip and "start" in inspect.signature(task.batches).parameters:
            return iter(task.batches(epoch, ctx.rank, ctx.world_size, start=skip))
        it = iter(task.batches(epoch, ctx.rank, ctx.world_size))
        if skip:
            for _ in itertools.islice(it, skip):
                pass
        return it

    def _save(self, task: Any, model: nn.Module, optimizer: Any, scheduler: Any, epoch: int, batch_in_epoch: int, signature: str, logger: MetricsLogger) -> Path:
        shared = None
        if self.context.is_main:
            shared = {
                "format": 1,
                "step": self.step,
                "epoch": epoch,
                "batch_in_epoch": batch_in_epoch,
                "world_size": self.context.world_size,
                "signature": signature,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "metrics": logger.rows,
            }
        rank_state = {"rng": rng_state(), "task": task.state_dict() if hasattr(task, "state_dict") else None}
        path = self.store.save(self.step, shared, rank_state, self.context)
        self.last_checkpoint = path
        log.debug("checkpoint saved at step %d: %s", self.step, path)
        return path

    def _resume(self, task: Any, model: nn.Module, optimizer: Any, scheduler: Any, signature: str) -> tuple[int, int, dict[str, Any] | None, list[dict[str, Any]]]:
        ctx = self.context
        loaded = self.store.load(ctx.rank)
        if loaded is not None and loaded[1].get("signature") != signature:
            if ctx.is_main:
                log.warning(
                    "checkpoints in %s were written with other settings; discarding them and starting afresh",
                    self.checkpoint_dir,
                )
            all_gather_objects(None, ctx)  # every rank has read them before rank 0 deletes
            if ctx.is_main:
                for _, folder in self.store.steps():
                    shutil.rmtree(folder, ignore_errors=True)
            all_gather_objects(None, ctx)
            loaded = None
        steps_seen = all_gather_objects(None if loaded is None else int(loaded[1]["step"]), ctx)
        if len(set(steps_seen)) > 1:
            raise MedclustError(f"{self.checkpoint_dir}: ranks found different latest checkpoints {steps_seen}")
        if loaded is None:
            if ctx.is_main:
                log.info("starting at step 0")
            return 0, 0, None, []
        folder, shared, rank_state = loaded
        model.load_state_dict(shared["model"])
        optimizer.load_state_dict(shared["optimizer"])
        scheduler.load_state_dict(shared["scheduler"])
        self.step = int(shared["step"])
        self.last_checkpoint = folder
        pending_rng = None
        if rank_state is not None and int(shared.get("world_size", 1)) == ctx.world_size:
            if hasattr(task, "load_state_dict") and rank_state.get("task") is not None:
                task.load_state_dict(rank_state["task"])
            pending_rng = rank_state["rng"]
        else:
            log.warning(
                "checkpoint %s was written by %s ranks, this run has %d: task state and random streams restart",
                folder, shared.get("world_size"), ctx.world_size,
            )
        if ctx.is_main:
            log.info("resuming from step %d (%s)", self.step, folder)
        return int(shared["epoch"]), int(shared["batch_in_epoch"]), pending_rng, list(shared.get("metrics", []))

    # -- the loop ------------------------------------------------------------------------------

    def fit(self, task: TrainTask, monitor: Callable[[nn.Module, int], Mapping[str, float] | None] | None = None) -> nn.Module:
        """Train ``task`` to ``max_steps`` (resuming if a checkpoint exists).

        Args:
            task: the task.
            monitor: called on rank 0 after every step as ``monitor(model, step)``; the values it
                returns (if any) join that step's ``metrics.csv`` row and go to TensorBoard under
                their own names (e.g. the learning monitor's ``probe/<label>/<knn|linear>``). It
                must leave the model as it found it; its time is not counted in ``items_per_s``.

        Returns:
            The trained model, unwrapped and on CPU (identical on every rank).

        Raises:
            TrainingInterrupted: SIGTERM/SIGUSR1 arrived; a checkpoint was saved.
            MedclustError: non-finite loss or gradient (the last good checkpoint is kept), a task
                that yields no batches, unreadable checkpoints.
        """
        self.context = init_distributed()
        return self._fit(task, monitor)

    def _fit(self, task: Any, monitor: Callable[[nn.Module, int], Mapping[str, float] | None] | None = None) -> nn.Module:
        cfg, ctx = self.config, self.context
        if hasattr(task, "setup"):
            task.setup(ctx)
        seed_everything(cfg.seed, cfg.deterministic)
        model = task.build_model().to(ctx.device)
        broadcast_module(model, ctx)
        groups = task.param_groups(model) if hasattr(task, "param_groups") else default_param_groups(model, cfg.weight_decay)
        optimizer = build_optimizer(groups, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum, lars_eta=cfg.lars_eta)
        scheduler = build_scheduler(optimizer, cfg.max_steps, cfg.warmup_steps, cfg.min_lr_ratio)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        signature = self._signature(task)

        self.step = 0
        epoch, batch_in_epoch, pending_rng, history = self._resume(task, model, optimizer, scheduler, signature)
        self.start_step = self.step
        if pending_rng is None:
            # distinct random streams per rank (dropout, masking); the data order is the task's
            torch.manual_seed(derive_seed(cfg.seed, self.step, ctx.rank, 0x5EED))
        # the live log sits beside the checkpoints: out_dir/metrics.csv is written once, at the end
        logger = MetricsLogger(
            self.out_dir, enabled=ctx.is_main, history=history, resume_step=self.step, tensorboard=cfg.tensorboard, live_dir=self.checkpoint_dir
        )
        if cfg.compile:
            # in place (same module, same state_dict keys); tasks that call sub-modules choose what to compile
            if hasattr(task, "compile_model"):
                task.compile_model(model)
            else:
                model.compile()
        model.train()

        window: dict[str, float] = {}
        window_counts: dict[str, int] = {}
        window_items = 0
        window_start = time.perf_counter()
        saved_at = self.step if self.last_checkpoint is not None else -1
        progress = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            desc="train",
            file=sys.stderr,
            disable=not (cfg.progress and ctx.is_main) or self.step >= cfg.max_steps,
            dynamic_ncols=True,
            mininterval=0.5 if sys.stderr.isatty() else 30.0,
        )
        batch_iter: Iterator[Any] | None = None
        try:
            with SignalFlag() as signals:
                while self.step < cfg.max_steps:
                    if batch_in_epoch == 0 and hasattr(task, "on_epoch_start"):
                        task.on_epoch_start(model, epoch)
                    batch_iter = self._batch_iter(task, epoch, batch_in_epoch)
                    if pending_rng is not None:
                        set_rng_state(pending_rng)  # after skipping: the resumed stream starts here
                        pending_rng = None
                    started_epoch_at = batch_in_epoch
                    for batch in batch_iter:
                        items = task.batch_size(batch) if hasattr(task, "batch_size") else _count_items(batch)
                        batch = move_to_device(batch, ctx.device)
                        if ctx.distributed:
                            broadcast_module(model, ctx, buffers_only=True)
                        optimizer.zero_grad(set_to_none=True)
                        with self._autocast():
                            out = task.training_step(model, batch, self.step)
                        if "loss" not in out:
                            raise MedclustError(f"training_step at step {self.step} returned no 'loss' (keys: {sorted(out)})")
                        loss = out["loss"]
                        names = ["loss"] + [k for k in out if k != "loss"]
                        # one collective per step: metric means across ranks + the signal flag
                        packed = torch.stack(
                            [_scalar(out[k], ctx.device) for k in names] + [_scalar(float(signals.received or 0), ctx.device)]
                        )
                        all_reduce_tensor(packed, ctx)
                        values = (packed[:-1] / ctx.world_size).tolist()
                        signal_sum = packed[-1].item()
                        if not all(math.isfinite(v) for v in values):
                            self._non_finite("loss", dict(zip(names, values)))
                        loss.backward()
                        all_reduce_gradients(params, ctx)
                        if cfg.grad_clip is not None:
                            norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                        else:  # unclipped, a NaN/inf gradient must still stop the run before it reaches the weights
                            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
                        if not torch.isfinite(norm):
                            self._non_finite("gradient norm", {"grad_norm": float(norm)})
                        if hasattr(task, "before_optimizer_step"):
                            task.before_optimizer_step(model, optimizer, self.step)
                        optimizer.step()
                        scheduler.step()
                        if hasattr(task, "after_optimizer_step"):
                            task.after_optimizer_step(model, self.step)
                        self.step += 1
                        batch_in_epoch += 1
                        progress.update(1)

                        for k, v in zip(names, values):
                            window[k] = window.get(k, 0.0) + v
                            window_counts[k] = window_counts.get(k, 0) + 1  # a term may start mid-window (staged schedule)
                        window_items += items * ctx.world_size
                        if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                            elapsed = max(time.perf_counter() - window_start, 1e-9)
                            row = {k: v / window_counts[k] for k, v in window.items()}
                            row["lr"] = optimizer.param_groups[0]["lr"]
                            row["items_per_s"] = window_items / elapsed
                            logger.log(self.step, row)
                            progress.set_postfix(loss=f"{row['loss']:.4f}", items_s=f"{row['items_per_s']:.1f}", refresh=False)
                            window, window_counts, window_items, window_start = {}, {}, 0, time.perf_counter()
                        if monitor is not None and ctx.is_main:
                            probe_started = time.perf_counter()
                            probed = monitor(model, self.step)
                            if probed:
                                logger.log(self.step, dict(probed), group="")
                            window_start += time.perf_counter() - probe_started

                        if signal_sum > 0:
                            # the signal this rank got, else the one another rank got (SIGTERM if ambiguous)
                            signum = signals.received or (int(signal_sum) if int(signal_sum) in (10, 12, 15) else 15)
                            path = self._save(task, model, optimizer, scheduler, epoch, batch_in_epoch, signature, logger)
                            log.warning("signal %d: checkpoint saved at step %d (%s)", signum, self.step, path)
                            raise TrainingInterrupted(signum, self.step, path)
                        if self.step % cfg.checkpoint_every == 0:
                            self._save(task, model, optimizer, scheduler, epoch, batch_in_epoch, signature, logger)
                            saved_at = self.step
                        if self.step >= cfg.max_steps:
                            break
                    else:
                        if batch_in_epoch == started_epoch_at == 0:
                            raise MedclustError(f"the training task yielded no batches for epoch {epoch} (rank {ctx.rank})")
                        epoch += 1
                        batch_in_epoch = 0
                        continue
                    break  # max_steps reached inside the epoch
            if ctx.distributed:
                broadcast_module(model, ctx, buffers_only=True)  # end with rank 0's running statistics everywhere
            if cfg.max_steps > 0 and saved_at != self.step:
                # a rerun after a crash in post-processing (export) must not train again
                self._save(task, model, optimizer, scheduler, epoch, batch_in_epoch, signature, logger)
            logger.write_final()
        finally:
            _close_batches(batch_iter)  # on an error, stop loader workers now (not at interpreter exit)
            progress.close()
            logger.close()
        self.history = logger.rows
        if self.step > self.start_step and ctx.is_main:
            log.info("finished %d steps (loss %.4f)", self.step, logger.rows[-1]["loss"] if logger.rows else float("nan"))
        barrier(ctx)
        return model.cpu()

    def _non_finite(self, what: str, values: dict[str, float]) -> None:
        shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
        kept = f"the last good checkpoint is kept: {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint was written yet"
        raise MedclustError(
            f"non-finite {what} at step {self.step} ({shown}); nothing was saved for this step and {kept}; "
            "lower the learning rate, enable grad_clip or check the inputs"
        )
