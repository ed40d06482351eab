"""Training log: a live ``metrics.csv``, the final ``metrics.csv`` and TensorBoard scalars.

While training, rows are appended to a live ``metrics.csv`` beside the checkpoints (not a
Snakemake output: a job killed mid-training leaves no output behind, so a plain rerun redoes it
without ``--rerun-incomplete``). :meth:`MetricsLogger.write_final` writes the run's
``metrics.csv`` atomically once training has finished. The rows logged so far also travel inside
every checkpoint, so a resumed run rewrites the live file from them.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from pathlib import Path
from typing import Any

from medclust.io.atomic import atomic_path, disk_full_guard

__all__ = ["MetricsLogger"]

log = logging.getLogger(__name__)


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return value


class MetricsLogger:
    """Append rows to the live ``metrics.csv`` and scalars to TensorBoard (rank 0 only).

    Args:
        out_dir: the run's output folder (final ``metrics.csv``, ``tensorboard/``).
        enabled: False on non-zero ranks (nothing is written, history is still kept).
        history: rows restored from a checkpoint; rows after ``resume_step`` are dropped.
        resume_step: the step training resumes from (TensorBoard events after it are purged).
        tensorboard: also write TensorBoard event files under ``out_dir/tensorboard``.
        live_dir: folder of the live ``metrics.csv`` (default ``out_dir``), e.g. the checkpoint
            folder.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        enabled: bool = True,
        history: list[dict[str, Any]] | None = None,
        resume_step: int = 0,
        tensorboard: bool = True,
        live_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.path = Path(live_dir if live_dir is not None else out_dir) / "metrics.csv"
        self.final_path = Path(out_dir) / "metrics.csv"
        self.enabled = enabled
        self.rows: list[dict[str, Any]] = [dict(r) for r in (history or []) if int(r["step"]) <= resume_step]
        self.columns: list[str] = []
        for row in self.rows:
            self._extend_columns(row)
        self._writer = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._rewrite()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a declared dependency; a broken install only loses TB
                log.warning("tensorboard is not importable: metrics go to metrics.csv only")
            else:
                self._writer = SummaryWriter(str(Path(out_dir) / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    def _extend_columns(self, row: dict[str, Any]) -> bool:
        new = [k for k in row if k not in self.columns]
        self.columns.extend(new)
        if "step" in self.columns and self.columns[0] != "step":
            self.columns.remove("step")
            self.columns.insert(0, "step")
        return bool(new)

    def _rewrite(self, path: Path | None = None) -> None:
        final = path is not None
        with atomic_path(path or self.path, immediate=not final) as tmp:
            with open(tmp, "w", newline="", encoding="utf-8") as handle:
                if self.columns:
                    writer = csv.DictWriter(handle, fieldnames=self.columns, restval="")
                    writer.writeheader()
                    writer.writerows({k: _fmt(v) for k, v in r.items()} for r in self.rows)

    def log(self, step: int, values: dict[str, float], group: str = "train") -> None:
        """Record ``values`` at ``step``: a new row, or merged into the last row if it has this step.

        Args:
            step: the optimiser step.
            values: column -> value.
            group: TensorBoard tag prefix (``group/column``); ``""`` = the column name as it is.
        """
        values = {k: float(v) for k, v in values.items()}
        merge = bool(self.rows) and int(self.rows[-1]["step"]) == int(step)
        if merge:
            # e.g. the learning monitor's probe scores join the loss row of the same step
            self.rows[-1].update(values)
            row = self.rows[-1]
        else:
            row = {"step": int(step), **values}
            self.rows.append(row)
        grew = self._extend_columns(row)
        if not self.enabled:
            return
        if grew or merge:
            self._rewrite()  # a new column (e.g. a loss that starts after warm-up) or a changed row
        else:
            with disk_full_guard(self.path), open(self.path, "a", newline="", encoding="utf-8") as handle:
                csv.DictWriter(handle, fieldnames=self.columns, restval="").writerow({k: _fmt(v) for k, v in row.items()})
        if self._writer is not None:
            for key, value in values.items():
                self._writer.add_scalar(f"{group}/{key}" if group else key, value, step)

    def write_final(self) -> None:
        """Write every row to ``out_dir/metrics.csv`` atomically (rank 0; at the end of training)."""
        if self.enabled:
            self._rewrite(self.final_path)

    def close(self) -> None:
        """Flush and close TensorBoard."""
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None
