"""The HDF5 slice store: one file per case, ``results/slices/{dataset}/{case}.h5``.

Layout (design §3):

- ``image``: float16/float32 ``(S, H, W)`` in [0, 1]; a 2D image has ``S = 1``. Chunked one
  slice per chunk so that samplers can read single slices cheaply.
- ``label`` (optional): uint8 (values < 256) or int16 ``(S, H, W)`` on the same grid.
- attrs: ``case_id``, ``dataset``, ``modality``, ``simulated``, ``source_path``,
  ``source_sha256``, ``label_path`` ("" if none), ``original_shape``, ``original_spacing``,
  ``original_affine`` (4x4), ``store_affine`` (4x4, voxel (x, y, z) of the stored volume ->
  RAS mm), ``target_spacing``, ``slice_axis``, ``z_positions_mm`` (length S), ``normalisation``
  (JSON string), ``class_label`` (if any), ``medclust_version``.

Slices are ``np.moveaxis(volume_xyz, slice_axis, 0)``;
:func:`medclust.io.original_grid.store_to_original` undoes that and resamples a stored-grid array
(e.g. a predicted label map) onto the original image grid.
Writes are atomic (the file is built in memory, written to a temporary file and renamed): a killed
writer never leaves ``{case}.h5``, and a full disk is one line naming it (:class:`~medclust.errors.DiskFullError`).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from medclust.errors import BadInputError, MedclustError
from medclust.io.atomic import write_bytes_atomic

REQUIRED_ATTRS = (
    "case_id",
    "dataset",
    "modality",
    "simulated",
    "source_path",
    "source_sha256",
    "label_path",
    "original_shape",
    "original_spacing",
    "original_affine",
    "store_affine",
    "target_spacing",
    "slice_axis",
    "z_positions_mm",
    "normalisation",
    "medclust_version",
)


@dataclass
class SliceCase:
    """One case read from the slice store.

    Attributes:
        image: ``(S, H, W)`` float array in [0, 1].
        label: ``(S, H, W)`` integer array, or None.
        attrs: the file's attributes as plain Python values (lists, str, int, float, bool).
    """

    image: np.ndarray
    label: np.ndarray | None = None
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def z_mm(self) -> np.ndarray:
        """Physical position (mm) of each returned slice along the slice axis, shape (S,)."""
        return np.asarray(self.attrs["z_positions_mm"], dtype=np.float64)

    @property
    def case_id(self) -> str:
        return str(self.attrs["case_id"])

    @property
    def modality(self) -> str:
        return str(self.attrs["modality"])

    @property
    def num_slices(self) -> int:
        return int(self.image.shape[0])

    @property
    def store_affine(self) -> np.ndarray:
        return np.asarray(self.attrs["store_affine"], dtype=np.float64)

    @property
    def normalisation(self) -> dict[str, Any]:
        """The intensity normalisation that was applied (parsed from its JSON attr)."""
        return json.loads(self.attrs["normalisation"])


def _to_attr(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (dict, list, tuple)) and not _is_numeric_sequence(value):
        return json.dumps(value)
    if isinstance(value, (list, tuple, np.ndarray)):
        return np.asarray(value, dtype=np.float64 if np.asarray(value).dtype.kind == "f" else None)
    return value


def _is_numeric_sequence(value: Any) -> bool:
    if isinstance(value, dict):
        return False
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError):
        return False
    return arr.dtype.kind in "biuf"


def _from_attr(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def label_dtype(label: np.ndarray) -> np.dtype:
    """uint8 when every value fits in 0..255, else int16.

    Raises:
        MedclustError: values outside the int16 range.
    """
    if label.size == 0:
        return np.dtype(np.uint8)
    lo, hi = int(label.min()), int(label.max())
    if lo >= 0 and hi <= 255:
        return np.dtype(np.uint8)
    if lo >= np.iinfo(np.int16).min and hi <= np.iinfo(np.int16).max:
        return np.dtype(np.int16)
    raise MedclustError(f"label values {lo}..{hi} do not fit in int16")


def write_case(
    path: str | os.PathLike[str],
    image: np.ndarray,
    attrs: Mapping[str, Any],
    label: np.ndarray | None = None,
    dtype: str | np.dtype = "float16",
) -> Path:
    """Write one case atomically.

    Args:
        path: the final ``{case}.h5`` path.
        image: ``(S, H, W)`` intensities in [0, 1].
        attrs: attributes (see the module docstring); None becomes "", dicts become JSON.
        label: optional ``(S, H, W)`` integer label map on the same grid.
        dtype: storage type of ``image`` (float16 or float32).

    Returns:
        ``path``.

    Raises:
        MedclustError: wrong shapes or a missing required attribute.
        DiskFullError: the file system is full (nothing is left at ``path``).
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise MedclustError(f"{path}: image must be (S, H, W), got shape {image.shape}")
    if label is not None and tuple(label.shape) != tuple(image.shape):
        raise MedclustError(f"{path}: label shape {label.shape} != image shape {image.shape}")
    missing = [k for k in REQUIRED_ATTRS if k not in attrs]
    if missing:
        raise MedclustError(f"{path}: missing slice-store attributes: {', '.join(missing)}")
    s, h, w = image.shape
    # built in memory, then written with plain file I/O: HDF5 reports a full disk as a long
    # traceback of its own (and more from h5py's destructors); Python raises one OSError
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as handle:
        handle.create_dataset("image", data=image.astype(dtype, copy=False), chunks=(1, h, w))
        if label is not None:
            handle.create_dataset("label", data=label.astype(label_dtype(label), copy=False), chunks=(1, h, w))
        _write_attrs(handle, attrs)
    write_bytes_atomic(path, buffer.getbuffer())
    return Path(path)


def _write_attrs(handle: h5py.File, attrs: Mapping[str, Any]) -> None:
    for key, value in attrs.items():
        handle.attrs[key] = _to_attr(value)


def read_attrs(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Only the attributes of a stored case (no pixel data read)."""
    try:
        with h5py.File(path, "r") as handle:
            return {k: _from_attr(v) for k, v in handle.attrs.items()}
    except OSError as err:
        raise BadInputError(path, f"cannot open slice store file ({err})") from err


def read_case(
    path: str | os.PathLike[str],
    slices: slice | Sequence[int] | None = None,
    load_label: bool = True,
) -> SliceCase:
    """Read a stored case (all slices, or a subset).

    Args:
        path: a ``{case}.h5`` file.
        slices: a slice or increasing indices to read (default: all); ``z_mm`` follows them.
        load_label: read the label map if present.

    Returns:
        The case; ``image`` as stored (float16/float32).

    Raises:
        BadInputError: the file cannot be opened.
    """
    index: Any = slice(None) if slices is None else (slices if isinstance(slices, slice) else list(slices))
    try:
        with h5py.File(path, "r") as handle:
            attrs = {k: _from_attr(v) for k, v in handle.attrs.items()}
            image = handle["image"][index]
            label = handle["label"][index] if load_label and "label" in handle else None
    except OSError as err:
        raise BadInputError(path, f"cannot open slice store file ({err})") from err
    if slices is not None:
        z = np.asarray(attrs.get("z_positions_mm", []), dtype=np.float64)
        if z.size:
            attrs["z_positions_mm"] = z[index].tolist()
    return SliceCase(image=image, label=label, attrs=attrs)


__all__ = ["REQUIRED_ATTRS", "SliceCase", "label_dtype", "read_attrs", "read_case", "write_case"]
