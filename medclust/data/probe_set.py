"""The learning monitor's probe set: pretraining images with labels that cost no annotation.

The probe set holds slices and radiographs of the pretraining cases (the ``train`` and ``val``
splits; never ``test``) with the labels that come free with the data:

- ``dataset`` and ``modality`` (from the slice store),
- ``body_region`` (config ``datasets.<name>.body_region``; datasets without one are left out),
- ``z_bin``: the slice's relative position in its volume, in ``z_bins`` equal bins (volumes only),
- ``structures``: multi-label "which label groups does this slice show" (at least
  ``min_pixels`` pixels), from the masks of datasets with ``datasets.<name>.probe_structures``.

Training-split images are used on purpose: the demo has one volume per dataset and no validation
volumes, so probing validation items alone would measure nothing, and the probe uses none of the
labels pretraining could have seen (pretraining uses no labels at all). What keeps a probe honest
is the cross-validation in :mod:`medclust.evaluate.probes`: near-copies (neighbouring slices)
are never fitted and scored together.

The number of items is bounded: at most ``max_slices_per_case`` evenly spaced slices per case,
and fewer per case when the total would exceed ``max_items``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from medclust.data.downstream import remap_labels, resolve_label_groups, slice_targets_from_mask
from medclust.data.pretrain_datasets import PretrainCase, eval_volume_indices, resize_slices
from medclust.errors import BadInputError, MedclustError
from medclust.evaluate.probes import ProbeTarget

__all__ = ["PROBE_LABELS", "PROBE_METRICS", "ProbeSet", "build_probe_set", "slices_per_case"]

#: the labels the monitor can probe, in report order
PROBE_LABELS = ("dataset", "modality", "body_region", "z_bin", "structures")
#: what each label's probe score is (single-label: balanced accuracy; multi-label: macro AUC)
PROBE_METRICS = {label: ("macro ROC AUC" if label == "structures" else "balanced accuracy") for label in PROBE_LABELS}


@dataclass
class ProbeSet:
    """Images to embed and who they are.

    Attributes:
        images: (N, H, W) float32, resized to the embedding size.
        dataset: (N,) dataset names.
        case: (N,) case keys ``dataset/case_id`` (unique across datasets).
        split: (N,) the case's split (train or val).
        z_mm: (N,) slice positions (0 for 2D images).
        targets: the labels to probe.
    """

    images: torch.Tensor
    dataset: np.ndarray
    case: np.ndarray
    split: np.ndarray
    z_mm: np.ndarray
    targets: list[ProbeTarget] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def describe(self) -> dict[str, Any]:
        """Items and cases per dataset and split (for provenance)."""
        out: dict[str, Any] = {}
        for d in dict.fromkeys(self.dataset.tolist()):
            sel = self.dataset == d
            out[d] = {
                "items": int(sel.sum()),
                "cases": len(set(self.case[sel].tolist())),
                "splits": sorted(set(self.split[sel].tolist())),
            }
        return out


def slices_per_case(num_slices: Sequence[int], max_slices_per_case: int, max_items: int) -> list[int]:
    """How many evenly spaced slices each case contributes (at least 1, at most its slices).

    Args:
        num_slices: slices of each case.
        max_slices_per_case: cap per case (0 = none).
        max_items: cap on the total; per-case caps shrink proportionally to meet it.

    Returns:
        A count per case.
    """
    caps = [min(n, max_slices_per_case) if max_slices_per_case > 0 else n for n in num_slices]
    total = sum(caps)
    if max_items > 0 and total > max_items:
        scale = max_items / total
        caps = [max(1, math.floor(c * scale)) for c in caps]
    return caps


def _z_bins(z_all: np.ndarray, z_sel: np.ndarray, bins: int) -> np.ndarray:
    """Bin of each selected slice by its relative position within the whole volume."""
    low, high = float(z_all.min()), float(z_all.max())
    rel = (z_sel - low) / max(high - low, 1e-9)
    return np.minimum((rel * bins).astype(np.int64), bins - 1)


def build_probe_set(
    cases: Sequence[PretrainCase],
    size: Sequence[int],
    *,
    max_items: int = 1024,
    max_slices_per_case: int = 64,
    z_bins: int = 4,
    min_pixels: int = 20,
    body_region: Mapping[str, str | None] | None = None,
    structures: Mapping[str, Mapping[str, Sequence[int | str]] | None] | None = None,
    label_names: Mapping[str, Mapping[int, str]] | None = None,
    labels: Sequence[str] = PROBE_LABELS,
) -> ProbeSet:
    """Read the probe items of ``cases`` and derive their free labels.

    Args:
        cases: the pretraining cases (train/val).
        size: ``(H, W)`` the images are resized to (the embedding size).
        max_items: bound on the number of items (0 = none).
        max_slices_per_case: evenly spaced slices per case at most (0 = all).
        z_bins: number of relative z-position bins.
        min_pixels: pixels of a label group on a slice for it to count as present.
        body_region: dataset -> body region (missing/None: the dataset is not in that probe).
        structures: dataset -> ordered label groups ``{name: [value | label name | glob]}``.
        label_names: dataset -> label value -> name (to resolve names and globs).
        labels: which labels to derive (a subset of :data:`PROBE_LABELS`).

    Returns:
        The probe set.

    Raises:
        MedclustError: an unknown label, or label groups that match no label of the dataset.
        BadInputError: a store file cannot be read.
    """
    from medclust.io.slice_store import read_case

    unknown = sorted(set(labels) - set(PROBE_LABELS))
    if unknown:
        raise MedclustError(f"pretrain.probe.labels: unknown {unknown}; choose from {list(PROBE_LABELS)}")
    body_region = dict(body_region or {})
    structures = {d: g for d, g in (structures or {}).items() if g}
    label_names = dict(label_names or {})
    columns = [f"{d}:{g}" for d in dict.fromkeys(c.dataset for c in cases) if d in structures for g in structures[d]]
    column_of = {name: j for j, name in enumerate(columns)}
    counts = slices_per_case([c.num_slices for c in cases], max_slices_per_case, max_items)

    images, rows = [], []
    struct_rows: list[np.ndarray] = []
    for case, count in zip(cases, counts):
        want_label = "structures" in labels and case.dataset in structures
        stored = read_case(case.path, load_label=want_label)
        z_all = np.asarray(stored.attrs.get("z_positions_mm", [0.0] * case.num_slices), dtype=np.float64)
        if z_all.shape[0] != case.num_slices:
            raise BadInputError(case.path, f"z_positions_mm has {z_all.shape[0]} entries for {case.num_slices} slices")
        idx = eval_volume_indices(case.num_slices, count)
        images.append(resize_slices(torch.from_numpy(np.asarray(stored.image[idx], dtype=np.float32)), size))
        bins = _z_bins(z_all, z_all[idx], z_bins) if case.num_slices > 1 else np.full(len(idx), -1)
        for k, i in enumerate(idx):
            rows.append((case.dataset, f"{case.dataset}/{case.case_id}", case.modality, case.split, float(z_all[i]), int(bins[k])))
        block = np.full((len(idx), len(columns)), np.nan)
        if want_label and stored.label is not None:
            groups = structures[case.dataset]
            label = np.asarray(stored.label[idx]).astype(np.int64)
            try:
                lut, _ = resolve_label_groups(groups, label_names.get(case.dataset), np.unique(label).tolist())
            except MedclustError as err:
                raise MedclustError(f"datasets.{case.dataset}.probe_structures: {err}") from err
            present = slice_targets_from_mask(remap_labels(label, lut), len(groups), min_pixels)
            for g, name in enumerate(groups):
                block[:, column_of[f"{case.dataset}:{name}"]] = present[:, g]
        struct_rows.append(block)

    dataset, case_key, modality, split, z_mm, z_bin = (np.asarray(col) for col in zip(*rows)) if rows else [np.zeros(0)] * 6
    dataset, case_key, modality, split = (a.astype(str) for a in (dataset, case_key, modality, split))
    targets: list[ProbeTarget] = []
    for name in labels:
        if name == "dataset":
            targets.append(ProbeTarget("dataset", dataset.copy()))
        elif name == "modality":
            targets.append(ProbeTarget("modality", modality.copy()))
        elif name == "body_region":
            targets.append(ProbeTarget("body_region", np.asarray([body_region.get(d) or "" for d in dataset.tolist()], dtype=str)))
        elif name == "z_bin":
            bins_str = np.asarray([str(b) if b >= 0 else "" for b in np.asarray(z_bin, dtype=np.int64).tolist()], dtype=str)
            targets.append(ProbeTarget("z_bin", bins_str, within_dataset=True))
        elif name == "structures" and columns:
            targets.append(ProbeTarget("structures", np.concatenate(struct_rows), columns=columns, within_dataset=True))
    return ProbeSet(
        images=torch.cat(images) if images else torch.zeros(0, *size),
        dataset=dataset,
        case=case_key,
        split=split,
        z_mm=np.asarray(z_mm, dtype=np.float64),
        targets=targets,
    )
