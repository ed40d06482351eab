"""The stored values of a checked, uncompressed DICOM series, read with NumPy in one pass.

SimpleITK (GDCM) reads every transfer syntax, but for the common uncompressed little-endian
16-bit monochrome series it costs more than reading the files twice over: it re-parses every
header and builds an int32 volume with the rescale applied (~0.3 s for a 133-slice CT). Here,
after :func:`medclust.io.dicom_series.scan_series` has checked every header (and noted where
each file's pixel data start), each file is read once: its bytes are hashed in the order of
:func:`medclust.preprocess.pipeline.source_sha256` (so the folder's checksum comes with the
read) and its pixel data are copied into an int16/uint16 volume. The rescale slope/intercept,
the same for every slice, is returned for the caller to apply (preprocessing does, per slab in
float32): ``stored * slope + intercept`` is what GDCM gives. A series this does not cover
(compressed, big-endian, not 16 bits stored in 16, colour, multi-frame, per-slice rescale)
gets None, and the caller reads it with SimpleITK.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from medclust.io.dicom_series import SeriesLayout

__all__ = ["UNCOMPRESSED_LITTLE_ENDIAN", "read_stored_values"]

UNCOMPRESSED_LITTLE_ENDIAN = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")


def _rescale(pixels: dict[str, Any]) -> tuple[float, float] | None:
    try:
        slope = 1.0 if pixels["slope"] in (None, "") else float(pixels["slope"])
        intercept = 0.0 if pixels["intercept"] in (None, "") else float(pixels["intercept"])
    except (TypeError, ValueError):
        return None
    return slope, intercept


def _covered(layout: SeriesLayout) -> tuple[np.dtype, tuple[float, float]] | None:
    """The stored dtype and the common rescale, if NumPy can read the series as stored."""
    headers = layout.headers or []
    if len(headers) != len(layout.files) or not headers:
        return None
    scales, kinds = set(), set()
    for h in headers:
        p = h.pixels
        if (
            p is None or p["syntax"] not in UNCOMPRESSED_LITTLE_ENDIAN or p["samples"] != 1 or h.frames != 1
            or p["bits_allocated"] != 16 or p["bits_stored"] != 16 or p["photometric"] != "MONOCHROME2"
            or p["length"] < 2 * h.rows * h.columns
        ):
            return None
        scales.add(_rescale(p))
        kinds.add(p["signed"])
    if len(scales) != 1 or None in scales or len(kinds) != 1:
        return None
    return np.dtype("<i2" if kinds.pop() else "<u2"), scales.pop()  # type: ignore[return-value]


def read_stored_values(layout: SeriesLayout) -> tuple[np.ndarray, dict[str, Any]] | None:
    """The series' stored values as an (x, y, z) array, with ``sha256`` and ``intensity_scale``.

    Args:
        layout: a regular series checked by :func:`~medclust.io.dicom_series.scan_series`.

    Returns:
        ``(array, meta)``: the values as stored (a view of a C-ordered (z, row, column) volume,
        like SimpleITK's), ``meta["sha256"]`` of the folder and, unless slope 1 and intercept
        0, ``meta["intensity_scale"] = [slope, intercept]``; None if the series is not covered.
    """
    covered = _covered(layout)
    if covered is None:
        return None
    dtype, (slope, intercept) = covered
    rows, columns = layout.rows, layout.columns
    volume = np.empty((len(layout.files), rows, columns), dtype=dtype)
    where = {os.path.abspath(f): (k, h) for k, (f, h) in enumerate(zip(layout.files, layout.headers or []))}
    folder = Path(layout.folder)
    digest = hashlib.sha256()
    filled = 0
    for path in sorted(f for f in folder.rglob("*") if f.is_file()):
        data = path.read_bytes()
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        digest.update(data)
        slot = where.get(os.path.abspath(path))
        if slot is not None:
            k, header = slot
            offset = header.pixels["offset"]  # type: ignore[index]
            if offset + 2 * rows * columns > len(data):  # changed since the scan: let SimpleITK report it
                return None
            volume[k] = np.frombuffer(data, dtype=dtype, count=rows * columns, offset=offset).reshape(rows, columns)
            filled += 1
    if filled != len(layout.files):
        return None
    meta: dict[str, Any] = {"sha256": digest.hexdigest()}
    if (slope, intercept) != (1.0, 0.0):
        meta["intensity_scale"] = [slope, intercept]
    return volume.T, meta
