"""Several fine-tuning runs of one task in one process (:func:`run_finetune_cells`).

A fine-tuning job on a CPU spends ~5-8 s starting up (Python, torch, MONAI, the optimiser's
first import of ``torch._dynamo``, interpreter exit) for ~10-15 s of work at the demo settings.
``medclust finetune-many`` pays that once for several grid cells (the workflow's
``finetune.seeds_per_job``: seeds of one task x init x fraction). Each cell is exactly the run
``medclust finetune`` makes: the trainer seeds every random stream from the cell's seed, so the
outputs are the same, and each cell's output goes to its own log file, as if it were its own job.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from medclust.errors import MedclustError
from medclust.train.recipes.finetune import run_finetune

__all__ = ["FinetuneCell", "parse_cells", "run_finetune_cells"]

log = logging.getLogger("medclust.finetune")


class FinetuneCell:
    """One grid cell: init x label fraction x seed, its run folder and (optionally) its log file.

    Args:
        init: ``none`` or the pretraining method.
        fraction: label fraction in (0, 1].
        seed: run seed.
        out: the run folder.
        encoder: the pretrained ``encoder.pt`` (unless ``init`` is ``none``).
        log: file that receives the cell's stdout/stderr (its log as a job of its own).
    """

    def __init__(self, init: str, fraction: float, seed: int, out: str | os.PathLike[str],
                 encoder: str | os.PathLike[str] | None = None, log: str | os.PathLike[str] | None = None) -> None:
        self.init = str(init)
        self.fraction = float(fraction)
        self.seed = int(seed)
        self.out = Path(out)
        self.encoder = None if encoder in (None, "") else Path(encoder)  # type: ignore[arg-type]
        self.log = None if log in (None, "") else Path(log)  # type: ignore[arg-type]


def parse_cells(cells: Sequence[Mapping[str, Any]]) -> list[FinetuneCell]:
    """Cells from their JSON form (``[{"init", "fraction", "seed", "out", "encoder"?, "log"?}]``).

    Raises:
        MedclustError: an entry lacks a key, or two cells share a run folder.
    """
    out: list[FinetuneCell] = []
    for i, cell in enumerate(cells):
        missing = [k for k in ("init", "fraction", "seed", "out") if k not in cell]
        if missing:
            raise MedclustError(f"finetune cells: entry {i} lacks {', '.join(missing)}")
        out.append(FinetuneCell(cell["init"], cell["fraction"], cell["seed"], cell["out"], cell.get("encoder"), cell.get("log")))
    folders = [c.out.resolve() for c in out]
    if len(set(folders)) != len(folders):
        raise MedclustError("finetune cells: two cells share a run folder")
    return out


@contextlib.contextmanager
def _output_to(path: Path | None) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors 1 and 2) to ``path`` meanwhile.

    At the descriptor level, so that logging handlers, progress bars and warnings created before
    (all writing to ``sys.stderr``) land in the cell's log too.
    """
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with open(path, "wb") as fh:
            os.dup2(fh.fileno(), 1)
            os.dup2(fh.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def run_finetune_cells(
    settings: Mapping[str, Any],
    slices_dir: str | os.PathLike[str],
    cells: Sequence[FinetuneCell],
    train_slices_dir: str | os.PathLike[str] | None = None,
) -> list[Path]:
    """Run :func:`~medclust.train.recipes.finetune.run_finetune` for each cell, in order.

    The first error stops the batch (the cells after it are not started) and is raised after a
    line naming it is written to that cell's log. Training checkpoints are kept until every cell
    has finished: if a later cell fails, Snakemake removes the whole job's outputs, and the rerun
    finds the earlier cells' final checkpoints instead of training them again.

    Args:
        settings: the task's resolved settings (the same for every cell).
        slices_dir: slice store of the task's dataset.
        cells: the grid cells.
        train_slices_dir: slice store of the training dataset when it differs.

    Returns:
        The ``model.pt`` path of every cell.
    """
    written = []
    for i, cell in enumerate(cells):
        with _output_to(cell.log):
            try:
                written.append(run_finetune(
                    settings, slices_dir, cell.out, cell.init, cell.fraction, cell.seed,
                    encoder=cell.encoder, train_slices_dir=train_slices_dir, keep_checkpoint=True,
                ))
            except BaseException as err:
                message = " ".join(str(err).split())
                line = f"medclust finetune-many: {cell.out}: {type(err).__name__}: {message} (the batch stops here)\n"
                sys.stderr.flush()
                os.write(2, line.encode("utf-8", "replace"))  # file descriptor 2: the cell's log just now
                raise
        log.info("cell %d/%d done: %s", i + 1, len(cells), cell.out)
    if not bool(settings.get("keep_checkpoint", False)):
        for cell in cells:
            shutil.rmtree(cell.out / "checkpoint", ignore_errors=True)
    return written
