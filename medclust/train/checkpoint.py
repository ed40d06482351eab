"""Training checkpoints: one folder per step, committed by an atomic rename, newest kept.

Layout inside the checkpoint directory::

    step_00000200/trainer.pt   model, optimiser, scheduler, step counters, metrics history (rank 0)
    step_00000200/rank0.pt     RNG states and task state (queues, memory banks) of rank 0
    step_00000200/rank1.pt     ... of every other rank under torchrun

Every rank writes into a hidden ``.step_XXXXXXXX.tmp`` folder; rank 0 renames it once all files
are complete, so a crash or kill mid-save leaves the previous checkpoint as the latest (and the
next run removes the stale temporary folder); a full disk removes it at once and raises
:class:`~medclust.errors.DiskFullError`. Files hold only tensors and plain Python types and load
with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from medclust.errors import MedclustError
from medclust.io.atomic import disk_full_guard, fsync_file, torch_bytes
from medclust.train.distributed import DistContext, barrier

__all__ = ["CheckpointStore", "load_weights"]

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{8,})$")
SHARED_FILE = "trainer.pt"


def _save_file(obj: Any, path: Path) -> None:
    # serialised in memory and written by Python: a full disk is then an OSError with its errno,
    # not torch's "unexpected pos N vs M"
    path.write_bytes(torch_bytes(obj))
    fsync_file(path)  # the folder rename must not expose empty files after a node crash


def load_weights(path: str | os.PathLike[str]) -> Any:
    """``torch.load`` on CPU with ``weights_only=True`` (no arbitrary code from pickles)."""
    return torch.load(path, map_location="cpu", weights_only=True)


class CheckpointStore:
    """Save, find, load and prune the step checkpoints of one training run.

    Args:
        directory: the run's checkpoint folder (not a Snakemake output: it must survive a failed
            or pre-empted job so that the rerun can resume).
        keep: number of complete checkpoints to keep (the latest and ``keep - 1`` before it, in
            case the newest turns out unreadable).
    """

    def __init__(self, directory: str | os.PathLike[str], keep: int = 2) -> None:
        self.directory = Path(directory)
        self.keep = max(1, int(keep))

    def steps(self) -> list[tuple[int, Path]]:
        """Complete checkpoints as ``(step, folder)``, oldest first."""
        if not self.directory.is_dir():
            return []
        found = []
        for child in self.directory.iterdir():
            match = _STEP_DIR.match(child.name)
            if match and (child / SHARED_FILE).is_file():
                found.append((int(match.group(1)), child))
        return sorted(found)

    def latest(self) -> Path | None:
        """The newest complete checkpoint folder, or None."""
        steps = self.steps()
        return steps[-1][1] if steps else None

    def path_for(self, step: int) -> Path:
        """Folder name of the checkpoint after ``step`` optimiser steps."""
        return self.directory / f"step_{step:08d}"

    def save(self, step: int, shared: dict[str, Any] | None, rank_state: dict[str, Any], ctx: DistContext) -> Path:
        """Write a checkpoint (collective: every rank calls it at the same step).

        Args:
            step: optimiser steps completed.
            shared: rank 0's state common to all ranks (ignored on other ranks).
            rank_state: this rank's own state (RNG, task state).
            ctx: distributed context.

        Returns:
            The committed checkpoint folder.

        Raises:
            DiskFullError: the file system is full; the partial folder is removed and the
                previous checkpoint stays the latest.
        """
        final = self.path_for(step)
        if (final / SHARED_FILE).is_file():
            return final  # the same step was saved before (e.g. final checkpoint of a finished run)
        tmp = self.directory / f".{final.name}.tmp"
        try:
            with disk_full_guard(final):
                if ctx.is_main:
                    self.directory.mkdir(parents=True, exist_ok=True)
                    shutil.rmtree(tmp, ignore_errors=True)
                    tmp.mkdir()
                barrier(ctx)
                _save_file(rank_state, tmp / f"rank{ctx.rank}.pt")
                if ctx.is_main:
                    if shared is None:
                        raise MedclustError("checkpoint: rank 0 must provide the shared state")
                    _save_file(shared, tmp / SHARED_FILE)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # nothing partial; the previous checkpoint stays the latest
            raise
        barrier(ctx)
        if ctx.is_main:
            if final.exists():
                shutil.rmtree(final)  # an incomplete folder from an older layout; never a complete one
            os.replace(tmp, final)
            self.prune()
        barrier(ctx)
        return final

    def remove_stale(self) -> None:
        """Delete the temporary folders of saves that a kill interrupted (call before training)."""
        if self.directory.is_dir():
            for child in self.directory.glob(".step_*.tmp"):
                shutil.rmtree(child, ignore_errors=True)

    def prune(self) -> None:
        """Delete all but the newest ``keep`` checkpoints and stale temporary folders."""
        steps = self.steps()
        for _, folder in steps[: -self.keep]:
            shutil.rmtree(folder, ignore_errors=True)
        newest = steps[-1][0] if steps else -1
        for child in self.directory.glob(".step_*.tmp"):
            match = re.match(r"^\.step_(\d+)\.tmp$", child.name)
            if match and int(match.group(1)) <= newest:
                shutil.rmtree(child, ignore_errors=True)

    def load(self, rank: int) -> tuple[Path, dict[str, Any], dict[str, Any] | None] | None:
        """Load the newest readable checkpoint.

        Falls back to an older one (with a warning) if the newest cannot be read.

        Args:
            rank: this process's rank (selects ``rank{rank}.pt``).

        Returns:
            ``(folder, shared_state, rank_state or None)``, or None when there is no checkpoint.

        Raises:
            MedclustError: checkpoints exist but none can be read.
        """
        if rank == 0:
            self.remove_stale()  # no save is running when a run starts
        candidates = self.steps()
        if not candidates:
            return None
        errors = []
        for _, folder in reversed(candidates):
            try:
                shared = load_weights(folder / SHARED_FILE)
                rank_file = folder / f"rank{rank}.pt"
                rank_state = load_weights(rank_file) if rank_file.is_file() else None
            except Exception as err:  # noqa: BLE001 - any unreadable file means: try the previous one
                log.warning("checkpoint %s is unreadable (%s); trying an older one", folder, err)
                errors.append(f"{folder.name}: {err}")
                continue
            return folder, shared, rank_state
        raise MedclustError(f"{self.directory}: no readable checkpoint ({'; '.join(errors)})")
