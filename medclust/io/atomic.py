"""Write-then-rename helpers: a reader never sees a half-written output.

Every output goes to a hidden temporary file beside it (``.{name}.XXXXXXXX.tmp``) and is renamed
onto its final name only when complete (and flushed to disk). Three guarantees follow:

- a failed or killed write, or a crashed node, never leaves the final file half-written (a kill
  leaves the hidden temporary file, which the next write of the same file removes:
  :func:`remove_stale_temps`);
- a full disk or quota raises :class:`~medclust.errors.DiskFullError` (one line naming the file)
  instead of a library traceback, with the temporary file removed;
- inside :func:`publish_together`, the renames of several outputs are held back and done in one
  go at the end, so a job killed while writing its outputs leaves none of them (Snakemake then
  sees a missing output, not an incomplete one, and a plain rerun redoes the job).
"""

from __future__ import annotations

import contextlib
import contextvars
import csv
import errno
import glob
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from medclust.errors import DiskFullError

__all__ = [
    "atomic_path",
    "disk_full_guard",
    "fsync_file",
    "is_disk_full",
    "publish_together",
    "remove_stale_temps",
    "save_torch_atomic",
    "staged_path",
    "torch_bytes",
    "write_bytes_atomic",
    "write_csv_atomic",
    "write_json_atomic",
    "write_text_atomic",
]

_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "errno = 28,", "errno = 122,")
# a library that reports a failed write without its errno (torch.save to a path: "unexpected pos
# 576 vs 534") on a file system with less than this left is taken to have hit the full disk
_NEARLY_FULL_BYTES = 1 << 20

# final path -> its complete temporary file, while a publish_together block is open
_PENDING: contextvars.ContextVar[dict[Path, Path] | None] = contextvars.ContextVar("medclust_pending_outputs", default=None)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush ``path``'s data to disk, so that a rename after it never exposes an empty file after a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_pattern(final: Path) -> str:
    # mkstemp(prefix=f".{name}.", suffix=".tmp") inserts 8 characters
    return str(final.parent / f".{glob.escape(final.name)}.{'?' * 8}.tmp")


def remove_stale_temps(path: str | os.PathLike[str]) -> list[Path]:
    """Remove the hidden temporary files that killed writes of ``path`` left behind.

    Only one job writes a given output at a time (Snakemake's lock and one job per output), so
    a temporary file of ``path`` that exists before a new write starts belongs to a dead writer.

    Args:
        path: a final output path.

    Returns:
        The files removed.
    """
    final = Path(path)
    pending = _PENDING.get() or {}
    keep = set(pending.values())
    removed = []
    for name in glob.glob(_temp_pattern(final)):
        stale = Path(name)
        if stale not in keep and stale.is_file():
            stale.unlink(missing_ok=True)
            removed.append(stale)
    return removed


def is_disk_full(err: BaseException, folder: str | os.PathLike[str] | None = None) -> bool:
    """Whether ``err`` means "the file system or quota is full".

    True for ``ENOSPC``/``EDQUOT`` errors, for libraries that put the system message in their
    own exception's text (h5py, HDF5), and for a ``RuntimeError`` of a write (torch's zip
    writer) when ``folder``'s file system has under 1 MiB left.

    Args:
        err: the exception a write raised.
        folder: where the write went (for the free-space check).
    """
    if isinstance(err, OSError) and err.errno in _DISK_FULL_ERRNOS:
        return True
    if isinstance(err, (OSError, RuntimeError)):
        text = str(err)
        if any(t in text for t in _DISK_FULL_TEXT):
            return True
        if folder is not None and isinstance(err, RuntimeError):
            with contextlib.suppress(OSError):
                return shutil.disk_usage(folder).free < _NEARLY_FULL_BYTES
    return False


def _is_quota(err: BaseException) -> bool:
    return (isinstance(err, OSError) and err.errno == errno.EDQUOT) or "quota" in str(err).lower()


@contextlib.contextmanager
def disk_full_guard(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn a full-disk error raised in the block into a one-line :class:`DiskFullError` for ``path``.

    For writes that are not atomic outputs (a live log, a checkpoint folder); the caller
    removes what it wrote.

    Args:
        path: the file or folder being written (named in the message).
    """
    try:
        yield
    except DiskFullError:
        raise
    except (OSError, RuntimeError) as err:
        where = Path(path)
        if is_disk_full(err, where if where.is_dir() else where.parent):
            raise DiskFullError(path, quota=_is_quota(err)) from err
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], immediate: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    The temporary file lives in the same folder so that the final ``os.replace`` is atomic on
    POSIX file systems. If the body raises, ``path`` is untouched and the temporary file is
    removed; after a kill, the hidden ``.{name}.XXXXXXXX.tmp`` is left and the next write of
    ``path`` removes it. Inside :func:`publish_together` the rename waits for the block's end.

    Args:
        path: the final file name.
        immediate: rename at once even inside :func:`publish_together` (a live log that is
            not an output and must be readable while the block runs).

    Yields:
        The temporary path to write to.

    Raises:
        DiskFullError: the file system or quota is full (the temporary file is removed).
    """
    final = Path(path)
    pending = None if immediate else _PENDING.get()
    tmp: Path | None = None
    try:
        with disk_full_guard(final):
            final.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(final)
            fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
            os.close(fd)
            tmp = Path(tmp_name)
            yield tmp
            # mkstemp creates 0600; outputs must be as readable as any other file (SLURM jobs, other users)
            if tmp.is_file():
                tmp.chmod(0o666 & ~_current_umask())
                fsync_file(tmp)
            if pending is None:
                os.replace(tmp, final)
            else:
                previous = pending.pop(final, None)
                if previous is not None:
                    previous.unlink(missing_ok=True)
                pending[final] = tmp
                tmp = None  # published (or removed) by publish_together
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def publish_together() -> Iterator[None]:
    """Hold back the renames of every :func:`atomic_path` write in the block until it ends.

    A job that writes several outputs one after the other leaves some of them behind if it is
    killed in between, and Snakemake then refuses to rerun it without ``--rerun-incomplete``.
    In this block each output is written completely to its temporary file; the renames happen
    together when the block exits without error (milliseconds), and on an error every
    temporary file is removed, so no output appears. A file written in the block cannot be read
    back before the block ends (:func:`staged_path` says where it is meanwhile).

    Blocks nest: an inner block's outputs are published with the outer block's. As a decorator
    (``@publish_together()``) it covers a whole function.
    """
    if _PENDING.get() is not None:
        yield
        return
    pending: dict[Path, Path] = {}
    token = _PENDING.set(pending)
    try:
        yield
    except BaseException:
        for tmp in pending.values():
            tmp.unlink(missing_ok=True)
        raise
    finally:
        _PENDING.reset(token)
    for final, tmp in list(pending.items()):
        os.replace(tmp, final)
        del pending[final]


def staged_path(path: str | os.PathLike[str]) -> Path:
    """The file holding ``path``'s current content.

    Inside :func:`publish_together`, a file written in the block is still its pending temporary
    file; otherwise (and for files not written in the block) it is ``path`` itself.
    """
    final = Path(path)
    return (_PENDING.get() or {}).get(final, final)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def save_torch_atomic(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj)`` to ``path`` atomically.

    Serialised in memory, then written with plain file I/O: torch writing a file itself reports a
    full disk as ``unexpected pos N vs M``; Python raises an ``OSError`` with its errno.
    """
    write_bytes_atomic(path, torch_bytes(obj))


def torch_bytes(obj: Any) -> memoryview:
    """``torch.save(obj)`` into memory (see :func:`save_torch_atomic` for why)."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer()


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
