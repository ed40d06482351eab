"""The dataset index (``index.json``) and its seeded case-level split (``splits.json``).

``index.json``: ``{"dataset", "cases": [{"case_id", "file", "modality", "num_slices", "shape",
"label_classes", "simulated", "class_label"}]}`` read from the slice store itself.

``splits.json``: ``{"dataset", "seed", "train", "val", "test"}`` lists of case ids. Rules:

- a manifest ``split`` column wins for its rows;
- cases of one ``group`` (a manifest column: patient, or the CT a radiograph was simulated
  from) always share a split, so views of one subject never straddle train and test; rows of
  a group without a fixed split follow the group's fixed one, and two different fixed splits
  within one group are an error (naming the group and the manifest);
- the other groups are shuffled with ``numpy.random.default_rng(seed)`` and cut by
  ``val_fraction``/``test_fraction`` (rounded; at least one each when the fraction is above 0);
- with fewer than 3 free groups everything free goes to train: one or two cases cannot make a
  meaningful held-out set, and downstream tasks then need a dataset with a manifest split.
  (The demo's single-CT datasets are in this case.)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from medclust.errors import BadInputError, MedclustError
from medclust.io.atomic import write_json_atomic
from medclust.io.sources import CaseEntry

log = logging.getLogger(__name__)


def index_entry(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``index.json`` record of one slice-store file.

    Raises:
        BadInputError: the file cannot be read.
    """
    try:
        with h5py.File(path, "r") as handle:
            attrs = handle.attrs
            shape = [int(s) for s in handle["image"].shape]
            classes: list[int] = []
            if "label" in handle:
                classes = [int(v) for v in np.unique(handle["label"][()])]
            class_label = attrs.get("class_label")
            if isinstance(class_label, bytes):
                class_label = class_label.decode()
            elif isinstance(class_label, np.generic):
                class_label = class_label.item()
            return {
                "case_id": str(attrs["case_id"]),
                "file": Path(path).name,
                "modality": str(attrs["modality"]),
                "num_slices": shape[0],
                "shape": shape,
                "label_classes": classes,
                "simulated": bool(attrs.get("simulated", False)),
                "class_label": class_label if class_label not in ("", None) else None,
            }
    except (OSError, KeyError) as err:
        raise BadInputError(path, f"cannot index slice store file ({err})") from err


def build_index(dataset: str, case_ids: Sequence[str], slices_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Index the ``{case}.h5`` files of ``case_ids`` in ``slices_dir``.

    Raises:
        BadInputError: a case has no slice-store file.
    """
    folder = Path(slices_dir)
    cases = []
    for case_id in case_ids:
        path = folder / f"{case_id}.h5"
        if not path.is_file():
            raise BadInputError(path, "slice store file missing (was preprocessing run?)")
        cases.append(index_entry(path))
    return {"dataset": dataset, "cases": cases}


def _round_share(n: int, fraction: float) -> int:
    if fraction <= 0:
        return 0
    return max(1, int(round(n * fraction)))


def make_splits(
    dataset: str,
    cases: Sequence[CaseEntry],
    seed: int,
    val_fraction: float,
    test_fraction: float,
    source: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Seeded case-level train/val/test split (see the module docstring for the rules).

    Args:
        dataset: dataset name.
        cases: the dataset's cases (``split`` and ``group`` are honoured).
        seed: the config ``seed``.
        val_fraction: share of free groups for validation.
        test_fraction: share of free groups for testing.
        source: the file the fixed splits come from (the manifest), named in errors.

    Returns:
        ``{"dataset", "seed", "train", "val", "test"}`` with sorted case ids.

    Raises:
        MedclustError: fractions that leave nothing for training.
        BadInputError: one group's cases carry different fixed splits (one patient would be in
            two splits).
    """
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise MedclustError(f"splits: val_fraction + test_fraction must be < 1 (got {val_fraction} + {test_fraction})")
    groups: dict[str, list[CaseEntry]] = {}
    for case in cases:
        groups.setdefault(case.group or case.case_id, []).append(case)
    assignment: dict[str, str] = {}
    free: list[str] = []
    for key, members in groups.items():
        fixed = {c.split for c in members if c.split}
        if len(fixed) > 1:
            which = ", ".join(f"{c.case_id}={c.split}" for c in members if c.split)
            raise BadInputError(
                source or dataset,
                f"group {key!r} has cases with different fixed splits ({which}); cases of one group must share a split",
            )
        if fixed:
            (group_split,) = fixed
            for c in members:
                assignment[c.case_id] = group_split
        else:
            free.append(key)
    free.sort()
    n = len(free)
    if n >= 3:
        n_test = _round_share(n, test_fraction)
        n_val = _round_share(n, val_fraction)
        while n_test + n_val > n - 1:  # keep at least one training group
            if n_val >= n_test and n_val > 0:
                n_val -= 1
            else:
                n_test -= 1
        order = [free[i] for i in np.random.default_rng(seed).permutation(n)]
        parts = {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
    else:
        parts = {"train": free, "val": [], "test": []}
    for split, keys in parts.items():
        for key in keys:
            for c in groups[key]:
                assignment[c.case_id] = split
    result: dict[str, Any] = {"dataset": dataset, "seed": int(seed)}
    for split in ("train", "val", "test"):
        result[split] = sorted(cid for cid, s in assignment.items() if s == split)
    return result


def write_index_and_splits(
    dataset: str,
    cases: Sequence[CaseEntry],
    slices_dir: str | os.PathLike[str],
    index_path: str | os.PathLike[str],
    splits_path: str | os.PathLike[str],
    seed: int,
    splits_settings: Mapping[str, Any] | None = None,
    source: str | os.PathLike[str] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write ``index.json`` and ``splits.json`` of a dataset (atomically).

    Args:
        dataset: dataset name.
        cases: the cases that passed QC (``results/cases/{dataset}.json``).
        slices_dir: ``results/slices/{dataset}``.
        index_path: where to write ``index.json``.
        splits_path: where to write ``splits.json``.
        seed: the config ``seed``.
        splits_settings: the config ``splits`` block (``val_fraction``, ``test_fraction``);
            missing keys take the schema defaults.
        source: the file fixed splits come from (the manifest), named in errors.

    Returns:
        The index and the splits.
    """
    from medclust.config import load_schema

    defaults = {k: v.get("default") for k, v in load_schema()["properties"]["splits"]["properties"].items()}
    settings = {**defaults, **dict(splits_settings or {})}
    index = build_index(dataset, [c.case_id for c in cases], slices_dir)
    splits = make_splits(
        dataset, cases, seed, float(settings["val_fraction"]), float(settings["test_fraction"]), source=source
    )
    write_json_atomic(index_path, index)
    write_json_atomic(splits_path, splits)
    log.info(
        "%s: %d cases indexed; split train %d / val %d / test %d",
        dataset, len(index["cases"]), len(splits["train"]), len(splits["val"]), len(splits["test"]),
    )
    return index, splits


__all__ = ["build_index", "index_entry", "make_splits", "write_index_and_splits"]
