"""Write-then-rename helpers: a reader never sees a half-written output."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    The temporary file lives in the same folder so that the final ``os.replace`` is atomic on
    POSIX file systems. If the body raises (or the process is killed), ``path`` is untouched and
    the temporary file is removed (or, after a kill, left with a ``.tmp`` suffix that no rule
    treats as an output).

    Args:
        path: the final file name.

    Yields:
        The temporary path to write to.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600; outputs must be as readable as any other file (SLURM jobs, other users)
        if tmp.is_file():
            tmp.chmod(0o666 & ~_current_umask())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_csv_atomic(
    path: str | os.PathLike[str],
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    cell: Callable[[Any], Any] = str,
) -> None:
    """Write ``rows`` as CSV with the given ``columns`` atomically.

    Args:
        path: the final file name.
        rows: one mapping per row; missing columns are written as empty fields.
        columns: the header, in order.
        cell: turns each value into its text (e.g. NaN to an empty field).
    """
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: cell(row.get(c, "")) for c in columns})
    write_text_atomic(path, buffer.getvalue())
