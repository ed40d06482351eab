"""Real faults for tests/test_faults.py: a small full-able disk, commands that fail mid-run.

``small_disk`` mounts a tmpfs of a given size (root, as in CI, or password-less sudo). Where no
mount is possible it falls back to an injected ``ENOSPC``: Python's ``open`` is wrapped so that
writes under the folder fail once ``size`` bytes were written. Every medclust write of an output,
a checkpoint or a log goes through a Python file object, so both ways exercise the same code.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _mount_tmpfs(folder: Path, size: int) -> bool:
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)]
    for prefix in ([], ["sudo", "-n"]):
        if prefix and shutil.which("sudo") is None:
            continue
        if os.geteuid() != 0 and not prefix:
            continue
        try:
            done = subprocess.run(prefix + mount, capture_output=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            continue
        if done.returncode == 0:
            return True
    return False


def _umount(folder: Path) -> None:
    for prefix in ([], ["sudo", "-n"]):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            if subprocess.run(prefix + ["umount", "-l", str(folder)], capture_output=True, timeout=30).returncode == 0:
                return


class _Quota:
    def __init__(self, folder: Path, size: int) -> None:
        self.folder, self.left = str(folder.resolve()), size

    def covers(self, file: Any) -> bool:
        return isinstance(file, (str, os.PathLike)) and os.path.abspath(os.fspath(file)).startswith(self.folder)


class _FullFile:
    """A file object whose writes fail with ENOSPC once the quota is spent (the rest is the real file's)."""

    def __init__(self, inner: Any, quota: _Quota) -> None:
        self._inner, self._quota = inner, quota

    def write(self, data: Any) -> int:
        n = len(data.encode("utf-8")) if isinstance(data, str) else memoryview(data).nbytes
        if n > self._quota.left:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._quota.left -= n
        return self._inner.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __enter__(self) -> _FullFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._inner.close()

    def close(self) -> None:
        self._inner.close()


@contextlib.contextmanager
def injected_enospc(folder: Path, size: int) -> Iterator[None]:
    """Writes through Python's ``open`` under ``folder`` fail with ENOSPC after ``size`` bytes."""
    quota = _Quota(folder, size)
    real_open = builtins.open

    def full_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = real_open(file, mode, *args, **kwargs)
        if quota.covers(file) and any(c in mode for c in "wax+"):
            return _FullFile(handle, quota)
        return handle

    builtins.open, io.open = full_open, full_open
    try:
        yield
    finally:
        builtins.open, io.open = real_open, real_open


@dataclass
class SmallDisk:
    """A folder that runs out of space after ``size`` bytes.

    Attributes:
        path: the folder.
        size: its capacity in bytes.
        real: a real tmpfs (else writes from this process fail by injection; see ``python_prefix``).
    """

    path: Path
    size: int
    real: bool

    def python_prefix(self) -> list[str]:
        """How to start ``medclust`` in a subprocess so that it meets this full disk."""
        if self.real:
            return [sys.executable, "-m", "medclust.cli"]
        code = (
            "import sys; from pathlib import Path; from fault_helpers import injected_enospc; from medclust.cli import main\n"
            f"with injected_enospc(Path({str(self.path)!r}), {self.size}):\n    code = main(sys.argv[1:])\nsys.exit(code)"
        )
        return [sys.executable, "-c", code]

    def env(self) -> dict[str, str]:
        """Environment for that subprocess (finds this helper module when injecting)."""
        tests = str(Path(__file__).resolve().parent)
        return {**ENV, "PYTHONPATH": os.pathsep.join(p for p in (tests, ENV.get("PYTHONPATH", "")) if p)}


@contextlib.contextmanager
def small_disk(folder: Path, size: int) -> Iterator[SmallDisk]:
    """A tmpfs of ``size`` bytes mounted at ``folder`` (or the injected fallback, active in the block)."""
    folder.mkdir(parents=True, exist_ok=True)
    if _mount_tmpfs(folder, size):
        try:
            yield SmallDisk(folder, size, real=True)
        finally:
            _umount(folder)
    else:
        with injected_enospc(folder, size):
            yield SmallDisk(folder, size, real=False)


@dataclass
class Finished:
    """A command that ran to its end: exit status, stderr, and how long it took after its error."""

    returncode: int
    stderr: str
    seconds_after_error: float | None


def run_until_exit(cmd: Sequence[str], env: dict[str, str], cwd: Path | None = None, timeout: float = 300) -> Finished:
    """Run ``cmd``, stream its stderr, and time the exit from the first ``error:`` line on.

    A process still alive ``timeout`` seconds after its start is killed (the test then fails on
    the returned status, -9, instead of hanging).
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, encoding="utf-8", errors="replace", env=env, cwd=cwd)
    error_at, lines = None, []
    killer = _kill_after(proc, timeout)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if error_at is None and "error:" in line:
                error_at = time.monotonic()
        proc.wait()
    finally:
        killer.cancel()
    return Finished(proc.returncode, "".join(lines), None if error_at is None else time.monotonic() - error_at)


def _kill_after(proc: subprocess.Popen, seconds: float) -> threading.Timer:
    timer = threading.Timer(seconds, lambda: proc.poll() is None and proc.kill())
    timer.daemon = True
    timer.start()
    return timer


def last_line(text: str) -> str:
    """The last non-empty line of a stream with progress bars (``\\r``-separated updates)."""
    lines = [part.strip() for line in text.splitlines() for part in line.split("\r") if part.strip()]
    return lines[-1] if lines else ""
