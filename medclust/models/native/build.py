"""Compile a C source shipped with the package into a shared library, once per machine, and load it.

The CPU kernels need no PyTorch headers: plain C11 with OpenMP, called through ctypes on tensors'
data pointers, so a build takes a fraction of a second and needs only a C compiler (the one
Python's own source packages build with). Libraries are cached under ``$MEDCLUST_CACHE_DIR``
(default ``$XDG_CACHE_HOME/medclust`` or ``~/.cache/medclust``), named by a hash of the source,
the flags, the compiler and the machine type, and written to a temporary name then renamed, so
parallel jobs on a shared home folder never load a half-written file. Without a compiler (or if
the build fails) :func:`load_library` warns once and returns None, and callers keep their
PyTorch path; ``MEDCLUST_NATIVE=0`` chooses that path without a warning.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from functools import cache
from pathlib import Path

__all__ = ["cache_dir", "load_library", "native_enabled"]

SOURCE_DIR = Path(__file__).resolve().parent
# no -march=native: a cache on a cluster's shared home serves nodes of different CPU generations
CFLAGS = ("-O3", "-std=c11", "-fPIC", "-shared", "-fopenmp")


def native_enabled() -> bool:
    """False when the user switched the compiled kernels off (``MEDCLUST_NATIVE=0``)."""
    return os.environ.get("MEDCLUST_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    """Where compiled libraries are kept."""
    if os.environ.get("MEDCLUST_CACHE_DIR"):
        return Path(os.environ["MEDCLUST_CACHE_DIR"]) / "native"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "medclust" / "native"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _compiler_id(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, encoding="utf-8", errors="replace", timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return cc


def _build(source: Path, cc: str, target_dir: Path) -> Path:
    """Compile ``source`` into ``target_dir`` (atomically) unless the same build is there."""
    # the machine type too: a shared home may serve x86-64 and arm64 nodes
    stamp = "\n".join([*CFLAGS, _compiler_id(cc), platform.machine()])
    key = hashlib.sha256(source.read_bytes() + stamp.encode()).hexdigest()[:16]
    target = target_dir / f"{source.stem}-{key}.so"
    if target.is_file():
        return target
    target_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{source.stem}-", suffix=".so", dir=target_dir)
    os.close(fd)
    try:
        res = subprocess.run([cc, *CFLAGS, str(source), "-o", tmp], capture_output=True, encoding="utf-8", errors="replace", timeout=300)
        if res.returncode != 0:
            raise OSError(f"{cc} failed: {(res.stderr or res.stdout).strip().splitlines()[-1:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@cache
def load_library(name: str) -> ctypes.CDLL | None:
    """The compiled ``native/<name>.c``, or None (one warning says why) when it cannot be built.

    Args:
        name: stem of a C source in this folder, e.g. ``"slice_sampling"``.

    Returns:
        The loaded library; its functions still need their ctypes signatures set.
    """
    if not native_enabled():
        return None
    cc = _compiler()
    if cc is None:
        warnings.warn(f"medclust: no C compiler found; {name} uses its slower PyTorch path", RuntimeWarning, stacklevel=2)
        return None
    try:
        return ctypes.CDLL(str(_build(SOURCE_DIR / f"{name}.c", cc, cache_dir())))
    except (OSError, subprocess.SubprocessError) as e:
        warnings.warn(f"medclust: could not build {name}.c ({e}); it uses its slower PyTorch path", RuntimeWarning, stacklevel=2)
        return None
