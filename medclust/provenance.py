"""What produced an output folder: resolved settings, package versions, git commit, inputs.

nnU-Net-style: every run leaves enough beside its outputs to reproduce it.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
from collections.abc import Iterable, Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from medclust.io.atomic import staged_path, write_json_atomic

_PACKAGES = ("medclust", "torch", "monai", "numpy", "nibabel", "SimpleITK", "pydicom", "h5py", "snakemake")


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Return the hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    """Versions of the packages whose behaviour determines medclust's outputs."""
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def git_commit(start: str | os.PathLike[str] | None = None) -> str | None:
    """The commit of the git checkout containing ``start`` (default: the package), if any."""
    where = Path(start) if start is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def write_provenance(
    out_dir: str | os.PathLike[str],
    settings: Mapping[str, Any],
    inputs: Iterable[str | os.PathLike[str]] = (),
    name: str = "provenance.json",
) -> Path:
    """Write ``provenance.json`` (settings, versions, commit, input checksums) into ``out_dir``.

    Args:
        out_dir: the output folder of a run.
        settings: the resolved settings the run used.
        inputs: files whose sha256 identifies the run's inputs (large folders: pass index files).
        name: file name inside ``out_dir``.

    Returns:
        The path written.
    """
    record = {
        "settings": dict(settings),
        "versions": package_versions(),
        "git_commit": git_commit(),
        "command": sys.argv,
        "host": platform.node(),
        # staged_path: an input written earlier in the same publish_together block is still pending
        "inputs": {str(p): sha256_file(staged_path(p)) for p in inputs if staged_path(p).is_file()},
    }
    path = Path(out_dir) / name
    write_json_atomic(path, record)
    return path
