"""Compile a C source shipped with the package into a shared library, once per machine, and load it.

The CPU kernels need no PyTorch headers: plain C11 with OpenMP (serial where the compiler has no
OpenMP, e.g. Apple's clang), called through ctypes on tensors' data pointers, so a build takes
0.25-0.34 s here and needs only a C compiler (the one Python's own source packages build with).
Libraries are cached under ``$MEDCLUST_CACHE_DIR`` (default ``$XDG_CACHE_HOME/medclust`` or
``~/.cache/medclust``), named by a hash of the source, the flags, the compiler and the machine
type, and written to a temporary name then renamed, so parallel jobs on a shared home folder
never load a half-written file. Without a compiler (or if the build fails) :func:`load_library`
warns once and returns None, and callers keep their PyTorch path; ``MEDCLUST_NATIVE=0`` chooses
that path without a warning.
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
CFLAGS = ("-O3", "-std=c11", "-fPIC", "-shared")
OPENMP = "-fopenmp"


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


def _compile(cc: str, flags: tuple[str, ...], source: Path, target: Path) -> None:
    """Compile to a temporary name beside ``target`` and rename: never a half-written library."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{source.stem}-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        res = subprocess.run([cc, *flags, str(source), "-o", tmp], capture_output=True, encoding="utf-8", errors="replace", timeout=300)
        if res.returncode != 0:
            lines = (res.stderr or res.stdout).strip().splitlines() or [f"exit status {res.returncode}"]
            raise OSError(f"{cc} failed: {next((x for x in lines if 'error' in x), lines[-1]).strip()}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build(source: Path, cc: str, target_dir: Path) -> Path:
    """The library built from ``source`` with OpenMP, or serial where the compiler has no OpenMP
    (Apple's clang), from the cache when the same build is there."""
    code, compiler = source.read_bytes(), _compiler_id(cc)
    failure: OSError | None = None
    for flags in ((*CFLAGS, OPENMP), CFLAGS):
        # the machine type too: a shared home may serve x86-64 and arm64 nodes
        stamp = "\n".join([*flags, compiler, platform.machine()])
        target = target_dir / f"{source.stem}-{hashlib.sha256(code + stamp.encode()).hexdigest()[:16]}.so"
        if target.is_file():
            return target
        try:
            _compile(cc, flags, source, target)
            return target
        except OSError as e:
            failure = e
    assert failure is not None
    raise failure


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
