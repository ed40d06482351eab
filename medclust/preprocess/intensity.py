"""CT intensity fingerprint: nnU-Net's CT normalisation, computed once per dataset.

nnU-Net normalises CT with statistics of the *labelled foreground of the training cases*: clip
to their 0.5 and 99.5 percentiles, then subtract their mean and divide by their standard
deviation. The same four numbers are used for every case of the dataset (training and test)
and travel with the model, so a new scan is normalised exactly like the training data. A fixed
HU window ([-1000, 1000] -> [0, 1]) instead leaves soft tissues (fat, muscle, blood, liver,
heart: -100..100 HU) within ~0.1 of each other and separated by ~0.01.

The fingerprint (``results/slices/{dataset}/intensity.json``, :func:`write_fingerprint`):

- **training cases**: the cases the seeded case-level split (:func:`medclust.preprocess.index.
  make_splits`, same ``seed`` and ``splits`` settings as ``splits.json``) puts in train or val,
  i.e. every case except the test cases, of modality CT. The split is recomputed from the case
  list here because preprocessing (which needs the fingerprint) runs before ``splits.json``
  exists. A dataset split into slabs at fine-tuning time (a single volume, all of it in
  ``train`` here) contributes its whole volume, including the slabs a task later tests on: the
  four numbers depend on the test slabs' labelled voxels, and a single-volume dataset has no
  other choice.
- **foreground**: voxels with a label value > 0 in the training CT cases that have a label map
  (``foreground: labels``). A dataset with no labelled training CT case (or only empty label
  maps) uses the body instead (``foreground: body``): voxels above -500 HU with the holes of
  each axial slice filled, so the lungs and airways inside the chest count and the air around
  the patient does not. A dataset with no CT training case at all (e.g. CT only among its
  fixed test cases), or no body either, falls back to the fixed ``ct_window``: its
  ``intensity.json`` says ``method: ct_window`` and why, and its CT cases record the same.
- **sampling**: at most ``max_voxels`` foreground voxels in all (spread evenly over the cases,
  seeded); below that, every voxel.

Datasets of the same scans (the demo's DICOM series ``lidc_dicom`` is the CT of ``chest_ct``)
share one fingerprint through the dataset key ``intensity_from``: the detection task trains on
one and tests on the other, so their inputs must be normalised alike.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medclust.errors import BadInputError, MedclustError
from medclust.io.sources import CaseEntry, normalise_modality

log = logging.getLogger(__name__)

FOREGROUND_PERCENTILES = (0.5, 99.5)
BODY_THRESHOLD_HU = -500.0
MAX_VOXELS = 10_000_000  # nnU-Net keeps 1e8; 1e7 pins the percentiles to well under 1 HU
FINGERPRINT_VERSION = 1


class _EmptyForeground(MedclustError):
    """No foreground voxel in any usable case (the caller falls back to the window)."""


@dataclass(frozen=True)
class IntensityFingerprint:
    """nnU-Net CT normalisation parameters of one dataset.

    Attributes:
        dataset: the dataset whose training cases gave the statistics.
        foreground: ``labels`` (label > 0) or ``body`` (no labelled training case).
        clip_hu: the ``FOREGROUND_PERCENTILES`` of the foreground voxels (HU).
        mean: mean of the foreground voxels (HU, before clipping, as nnU-Net).
        std: their standard deviation (HU).
        cases: training case ids the voxels came from.
    """

    dataset: str
    foreground: str
    clip_hu: tuple[float, float]
    mean: float
    std: float
    cases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        lo, hi = self.clip_hu
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise MedclustError(f"intensity fingerprint of {self.dataset}: clip range {self.clip_hu} is empty")
        if not (math.isfinite(self.std) and self.std > 0):
            raise MedclustError(f"intensity fingerprint of {self.dataset}: foreground std {self.std} is not positive")

    @property
    def output_range(self) -> tuple[float, float]:
        """The z-scores of the clip range: the smallest and largest stored value."""
        return ((self.clip_hu[0] - self.mean) / self.std, (self.clip_hu[1] - self.mean) / self.std)

    def record(self) -> dict[str, Any]:
        """The ``normalisation`` attribute a CT case preprocessed with this fingerprint gets."""
        return {
            "method": "nnunet",
            "clip_hu": [float(v) for v in self.clip_hu],
            "mean": float(self.mean),
            "std": float(self.std),
            "fingerprint_dataset": self.dataset,
            "foreground": self.foreground,
            "output_range": [float(v) for v in self.output_range],
            "clip": True,
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str = "intensity fingerprint") -> IntensityFingerprint:
        """Parse an ``intensity.json`` record (or a ``normalisation`` attribute of method nnunet).

        Raises:
            MedclustError: the record holds no fingerprint or misses a value.
        """
        if values.get("method") != "nnunet":
            reason = values.get("reason") or f"method {values.get('method')!r} is not nnunet"
            raise MedclustError(f"{where}: no CT intensity fingerprint ({reason})")
        try:
            return cls(
                dataset=str(values.get("dataset", values.get("fingerprint_dataset", ""))),
                foreground=str(values["foreground"]),
                clip_hu=(float(values["clip_hu"][0]), float(values["clip_hu"][1])),
                mean=float(values["mean"]),
                std=float(values["std"]),
                cases=tuple(str(c) for c in values.get("cases", ())),
            )
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise MedclustError(f"{where}: malformed intensity fingerprint ({err!r})") from err


def hu_to_store(hu: float | np.ndarray, normalisation: Mapping[str, Any], window: Sequence[float] | None = None) -> np.ndarray:
    """Hounsfield units -> the values a CT slice store holds, for its ``normalisation`` attribute.

    Args:
        hu: HU value(s).
        normalisation: the case's ``normalisation`` record (parsed JSON).
        window: HU window for a record without one (stores written before the record said so).

    Returns:
        nnunet: ``(clip(hu, clip_hu) - mean) / std``; ct_window: ``clip((hu - lo) / (hi - lo), 0, 1)``.

    Raises:
        MedclustError: the record is not a CT normalisation and no window is given.
    """
    values = np.asarray(hu, dtype=float)
    method = normalisation.get("method")
    if method == "nnunet":
        lo, hi = (float(v) for v in normalisation["clip_hu"])
        return (np.clip(values, lo, hi) - float(normalisation["mean"])) / float(normalisation["std"])
    if method == "ct_window":
        window = normalisation["window_hu"]
    if window is None:
        raise MedclustError(f"cannot map HU to store values: normalisation {dict(normalisation)} is not a CT normalisation")
    lo, hi = float(window[0]), float(window[1])
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0)


def store_value_range(normalisation: Mapping[str, Any]) -> tuple[float, float]:
    """Smallest and largest value a slice store with this ``normalisation`` holds ([0, 1] unless z-scored)."""
    lo, hi = normalisation.get("output_range", (0.0, 1.0))
    return float(lo), float(hi)


# --- computing the fingerprint ----------------------------------------------------------------


def _slice_axis_of(affine: np.ndarray) -> int:
    """The array axis closest to RAS z (superior): the axial slices lie across it."""
    directions = np.asarray(affine, dtype=float)[:3, :3]
    cosines = np.abs(directions[2]) / np.maximum(np.linalg.norm(directions, axis=0), 1e-12)
    return int(np.argmax(cosines))


def body_mask(volume: np.ndarray, affine: np.ndarray, threshold_hu: float = BODY_THRESHOLD_HU) -> np.ndarray:
    """The body of a CT: voxels above ``threshold_hu``, each axial slice's holes filled.

    Filling per slice (not in 3D) is what brings the lungs in: in 3D they connect to the air
    outside through the airways.

    Args:
        volume: 3D HU array (file index order).
        affine: its voxel -> RAS affine (tells which axis is axial).
        threshold_hu: tissue threshold.

    Returns:
        Boolean mask of ``volume``'s shape.
    """
    from scipy import ndimage

    tissue = np.asarray(volume) > threshold_hu
    axis = _slice_axis_of(affine) if tissue.ndim == 3 else None
    if axis is None:
        return ndimage.binary_fill_holes(tissue)
    moved = np.moveaxis(tissue, axis, 0)
    filled = np.stack([ndimage.binary_fill_holes(plane) for plane in moved])
    return np.moveaxis(filled, 0, axis)


def training_cases(
    dataset: str, cases: Sequence[CaseEntry], seed: int, splits_settings: Mapping[str, Any] | None = None
) -> tuple[list[CaseEntry], list[str]]:
    """The cases whose voxels the fingerprint may use: all but the test cases of the seeded split.

    Args:
        dataset: dataset name.
        cases: the QC-passed case list (``results/cases/{dataset}.json``).
        seed: the config ``seed`` (the one ``splits.json`` is drawn with).
        splits_settings: the config ``splits`` block (schema defaults for missing keys).

    Returns:
        (training and validation cases, test case ids).
    """
    from medclust.config import load_schema
    from medclust.preprocess.index import make_splits

    defaults = {k: v.get("default") for k, v in load_schema()["properties"]["splits"]["properties"].items()}
    settings = {**defaults, **dict(splits_settings or {})}
    splits = make_splits(dataset, cases, seed, float(settings["val_fraction"]), float(settings["test_fraction"]))
    keep = set(splits["train"]) | set(splits["val"])
    return [c for c in cases if c.case_id in keep], list(splits["test"])


def _sample(values: np.ndarray, budget: int, rng: np.random.Generator) -> np.ndarray:
    if values.size <= budget:
        return values
    return values[np.sort(rng.choice(values.size, size=budget, replace=False))]


def _foreground_samples(
    dataset: str, cases: Sequence[CaseEntry], foreground: str, seed: int, max_voxels: int
) -> tuple[np.ndarray, list[CaseEntry], str, int] | None:
    """Foreground voxel values (HU, float64) of ``cases``, sampled; None when there are none."""
    from medclust.io.readers import load_image

    rng = np.random.default_rng(seed)
    budget = max(1, max_voxels // len(cases))
    samples: list[np.ndarray] = []
    used: list[CaseEntry] = []
    total = 0
    for case in cases:
        # read as preprocessing reads it
        image = load_image(
            case.image, case.series_uid, resample_gaps=case.resample_gaps, assume_spacing=case.assume_spacing
        )
        array = np.asarray(image.array)
        if foreground == "labels":
            label = np.asarray(load_image(case.label, label=True).array)  # type: ignore[arg-type]
            if label.shape != array.shape:
                raise BadInputError(case.label, f"label shape {label.shape} differs from image shape {array.shape}")
            mask = label > 0
        else:
            mask = body_mask(array, image.affine)
        values = array[mask].astype(np.float64)
        log.info("%s: %s %s foreground voxels in %s", dataset, f"{values.size:,}", foreground, case.case_id)
        if values.size:
            total += values.size
            samples.append(_sample(values, budget, rng))
            used.append(case)
    if not used:
        return None
    return np.concatenate(samples), used, foreground, total


def compute_fingerprint(
    dataset: str,
    cases: Sequence[CaseEntry],
    seed: int = 0,
    max_voxels: int = MAX_VOXELS,
) -> tuple[IntensityFingerprint, dict[str, Any]]:
    """nnU-Net CT statistics over the foreground of ``cases`` (already restricted to training cases).

    Args:
        dataset: dataset name (recorded).
        cases: the training cases; non-CT cases are skipped.
        seed: seeds the voxel sample when there are more than ``max_voxels``.
        max_voxels: most foreground voxels kept over all cases.

    Returns:
        The fingerprint and a dict of descriptive extras (median, min, max, voxel counts).

    Raises:
        MedclustError: no CT case, or an empty foreground (labels and body).
        BadInputError: an image or label cannot be read.
    """
    ct = [c for c in cases if normalise_modality(c.modality) == "CT"]
    if not ct:
        raise _EmptyForeground(f"dataset {dataset}: no CT training case to compute the intensity fingerprint from")
    labelled = [c for c in ct if c.label]
    found = _foreground_samples(dataset, labelled, "labels", seed, max_voxels) if labelled else None
    if found is None:
        found = _foreground_samples(dataset, ct, "body", seed, max_voxels)
    if found is None:
        raise _EmptyForeground(f"dataset {dataset}: neither labels nor body foreground in its CT training cases")
    pooled, used, foreground, total = found
    lo, hi = (float(v) for v in np.percentile(pooled, FOREGROUND_PERCENTILES))
    fingerprint = IntensityFingerprint(
        dataset=dataset,
        foreground=foreground,
        clip_hu=(lo, hi),
        mean=float(pooled.mean()),
        std=float(pooled.std()),
        cases=tuple(c.case_id for c in used),
    )
    extras = {
        "median": float(np.median(pooled)),
        "min": float(pooled.min()),
        "max": float(pooled.max()),
        "n_foreground_voxels": int(total),
        "n_sampled": int(pooled.size),
    }
    return fingerprint, extras


def write_fingerprint(
    dataset: str,
    cases_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    seed: int = 0,
    splits_settings: Mapping[str, Any] | None = None,
    max_voxels: int = MAX_VOXELS,
) -> dict[str, Any]:
    """Compute a dataset's fingerprint from its case list and write ``intensity.json`` atomically.

    A dataset without CT training cases (or without any foreground in them) gets
    ``{"method": "ct_window", "reason": ...}``: its CT cases, if any, get the fixed window.

    Args:
        dataset: dataset name.
        cases_path: ``results/cases/{dataset}.json``.
        out_path: ``results/slices/{dataset}/intensity.json``.
        seed: the config ``seed``.
        splits_settings: the config ``splits`` block.
        max_voxels: most foreground voxels kept.

    Returns:
        The record written.
    """
    from medclust import __version__
    from medclust.io.atomic import write_json_atomic
    from medclust.preprocess.ingest import read_cases
    from medclust.provenance import git_commit, package_versions, sha256_file

    _, entries = read_cases(cases_path)
    train, test = training_cases(dataset, entries, seed, splits_settings)
    provenance = {
        "medclust_version": __version__,
        "versions": package_versions(),
        "git_commit": git_commit(),
        "command": sys.argv,
        "inputs": {str(cases_path): sha256_file(cases_path)},
    }
    common = {
        "format_version": FINGERPRINT_VERSION,
        "dataset": dataset,
        "percentiles": list(FOREGROUND_PERCENTILES),
        "seed": int(seed),
        "splits": dict(splits_settings or {}),
        "excluded_test_cases": sorted(test),
    }
    try:
        fingerprint, extras = compute_fingerprint(dataset, train, seed, max_voxels)
    except _EmptyForeground as err:
        log.warning("%s; its CT cases get the fixed ct_window", err)
        record = {**common, "method": "ct_window", "reason": str(err), "provenance": provenance}
    else:
        record = {
            **common,
            "method": "nnunet",
            "foreground": fingerprint.foreground,
            "clip_hu": list(fingerprint.clip_hu),
            "mean": fingerprint.mean,
            "std": fingerprint.std,
            **extras,
            "output_range": list(fingerprint.output_range),
            "cases": list(fingerprint.cases),
            "provenance": provenance,
        }
        log.info(
            "%s: clip [%.1f, %.1f] HU, mean %.1f, std %.1f over %d %s voxels of %d case(s) -> %s",
            dataset, *fingerprint.clip_hu, fingerprint.mean, fingerprint.std, extras["n_sampled"],
            fingerprint.foreground, len(fingerprint.cases), out_path,
        )
    write_json_atomic(out_path, record)
    return record


def load_fingerprint(path: str | os.PathLike[str]) -> tuple[IntensityFingerprint | None, str | None]:
    """Read ``intensity.json``.

    Returns:
        ``(fingerprint, None)``, or ``(None, reason)`` when the file says the dataset falls
        back to the fixed window (``method: ct_window``).

    Raises:
        BadInputError: the file is missing, unreadable or malformed.
    """
    import json

    try:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise BadInputError(path, f"cannot read the intensity fingerprint ({err})") from err
    if isinstance(values, dict) and values.get("method") == "ct_window":
        return None, str(values.get("reason", "no CT training foreground"))
    if not isinstance(values, dict):
        raise BadInputError(path, "intensity fingerprint is not a JSON object")
    try:
        return IntensityFingerprint.from_dict(values, where="intensity fingerprint"), None
    except MedclustError as err:
        raise BadInputError(path, str(err)) from err


__all__ = [
    "BODY_THRESHOLD_HU",
    "FOREGROUND_PERCENTILES",
    "IntensityFingerprint",
    "body_mask",
    "compute_fingerprint",
    "hu_to_store",
    "load_fingerprint",
    "store_value_range",
    "training_cases",
    "write_fingerprint",
]
