"""The package of another git revision, for benchmarks that time it side by side with this one."""

from __future__ import annotations

import subprocess
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def baseline_source(rev: str, dest: Path) -> Path:
    """The ``medclust`` package of git revision ``rev``, unpacked under ``dest`` (put it first on PYTHONPATH)."""
    archive = dest / "src.tar"
    subprocess.run(["git", "archive", "--format=tar", "-o", str(archive), rev, "medclust"], cwd=REPO, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest / "src", filter="data")
    return dest / "src"
