"""Train/val/test splits of downstream cases and nested label fractions.

- ``cases``: the dataset's ``splits.json`` (case level); if it has no validation cases, a
  validation slab is cut from each training volume (with a gap) so model selection never touches
  the test cases. ``slabs``: for datasets with one (or few) volumes, every volume is cut along the
  slice axis into train/val/test slabs with a gap of at least ``gap_mm`` (and at least the 2.5D
  context) between slabs of different splits. The slab layout depends only on the volume and the
  slab settings, never on the run seed, so every run of a study is tested on the same slices.
- :func:`fraction_subset` draws one seeded permutation of the training items and keeps its first
  ``ceil(fraction * n)``: the 25 % subset is inside the 50 % subset, inside 100 %. The fraction
  holds for validation too (:func:`apply_label_fraction`): a run at fraction f selects its model
  with labels of that fraction only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medclust.data.downstream import SPLITS, TaskCase
from medclust.errors import MedclustError

__all__ = ["SplitPlan", "apply_label_fraction", "fraction_subset", "plan_splits", "slab_layout"]


# -- splits and label fractions -------------------------------------------------------------------


def slab_layout(
    num_slices: int,
    slice_spacing_mm: float,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    blocks: int = 2,
    gap_mm: float = 10.0,
    min_gap_slices: int = 0,
) -> np.ndarray:
    """Assign each slice of a volume to ``train``, ``val``, ``test`` or ``""`` (gap).

    The volume is cut into ``blocks`` equal runs of slices; each block holds, in order, a train,
    a val and a test slab (sized by the fractions) separated by gaps, and consecutive blocks are
    separated by a gap too. Spreading each split over several blocks keeps every split
    representative of the whole z range (a chest CT's liver is only in its lower part).

    Args:
        num_slices: S.
        slice_spacing_mm: distance between slices.
        val_fraction: share of non-gap slices for validation (0 allowed).
        test_fraction: share of non-gap slices for testing (0 allowed).
        blocks: number of train/val/test repetitions along z.
        gap_mm: minimum distance between slabs of different splits.
        min_gap_slices: minimum gap in slices (the 2.5D context, so no input stack crosses).

    Returns:
        (S,) array of strings.

    Raises:
        MedclustError: the volume is too short for the requested layout.
    """
    gap = max(int(math.ceil(gap_mm / max(slice_spacing_mm, 1e-6) - 1e-9)), int(min_gap_slices))
    parts = [(name, frac) for name, frac in (("train", 1.0 - val_fraction - test_fraction), ("val", val_fraction), ("test", test_fraction)) if frac > 0]
    layout = np.full(num_slices, "", dtype=object)
    bounds = np.linspace(0, num_slices, blocks + 1).round().astype(int)
    for b in range(blocks):
        start, stop = int(bounds[b]), int(bounds[b + 1])
        trailing = gap if b < blocks - 1 else 0
        usable = stop - start - gap * (len(parts) - 1) - trailing
        if usable < len(parts):
            raise MedclustError(
                f"slabs: {num_slices} slices of {slice_spacing_mm:g} mm are too few for {blocks} blocks of "
                f"{'/'.join(p for p, _ in parts)} slabs with {gap}-slice gaps; lower finetune.slabs.blocks or gap_mm"
            )
        sizes = [max(1, int(round(usable * frac))) for _, frac in parts]
        sizes[0] = usable - sum(sizes[1:])  # train takes the rounding remainder
        if sizes[0] < 1:
            raise MedclustError(f"slabs: no training slices left in block {b}; lower val/test fractions")
        pos = start
        for (name, _), size in zip(parts, sizes):
            layout[pos : pos + size] = name
            pos += size + gap
    return layout.astype(str)


def fraction_subset(items: Sequence[Any], fraction: float, seed: int) -> list[Any]:
    """A seeded, nested subset: ``ceil(fraction * n)`` items (at least 1).

    The same seed gives the same permutation for every fraction, so smaller fractions are
    prefixes of larger ones (0.25 ⊂ 0.5 ⊂ 1.0). The order of ``items`` must itself be
    deterministic (sorted ids / slice indices).

    Args:
        items: candidate training items.
        fraction: in (0, 1].
        seed: run seed.

    Returns:
        The chosen items, in the permutation's order.
    """
    if not 0 < fraction <= 1:
        raise MedclustError(f"finetune.fractions: {fraction} must be in (0, 1]")
    n = len(items)
    if n == 0:
        return []
    order = np.random.default_rng([int(seed), 0xF4AC]).permutation(n)
    keep = max(1, int(math.ceil(fraction * n - 1e-9)))
    return [items[i] for i in order[:keep]]


@dataclass
class SplitPlan:
    """Which cases/slices a run trains, validates and tests on.

    Attributes:
        train: ``{case_id: slice indices}`` with labels used for training (after the fraction).
        val: ``{case_id: slice indices}`` for model selection.
        test: ``{case_id: slice indices}`` predicted and scored (all slices for ``cases``).
        train_total: number of training items before the fraction.
        unit: ``cases`` or ``slices``: what the fraction subsampled.
        layout: ``{case_id: (S,) split name per slice}`` for slab-split volumes.
        val_total_slices: validation slices before the fraction (``val`` holds those of the
            fraction, see :func:`apply_label_fraction`).
    """

    train: dict[str, np.ndarray]
    val: dict[str, np.ndarray]
    test: dict[str, np.ndarray]
    train_total: int
    unit: str
    layout: dict[str, np.ndarray] = field(default_factory=dict)
    val_total_slices: int = 0

    @property
    def n_train(self) -> int:
        return len(self.train) if self.unit == "cases" else int(sum(len(v) for v in self.train.values()))


def plan_splits(
    cases: Sequence[TaskCase],
    splits: Mapping[str, Sequence[str]] | None,
    strategy: str,
    fraction: float,
    seed: int,
    slabs: Mapping[str, Any] | None = None,
    context_slices: int = 0,
    fraction_unit: str = "auto",
    min_cases: int = 8,
    val_fraction: float = 0.2,
    with_test: bool = True,
    usable_slices: Mapping[str, np.ndarray] | None = None,
    extents: Mapping[str, tuple[int, int]] | None = None,
) -> SplitPlan:
    """Split a dataset's cases/slices into train/val/test and apply the label fraction.

    Args:
        cases: the dataset's cases (slice counts and z positions are used).
        splits: ``splits.json`` content (``train``/``val``/``test`` case ids); ``cases`` strategy.
        strategy: ``cases`` or ``slabs``.
        fraction: label fraction of the training items.
        seed: run seed (fraction subset only; splits do not depend on it).
        slabs: slab settings (``blocks``, ``val_fraction``, ``test_fraction``, ``gap_mm``).
        context_slices: 2.5D context k (minimum gap between slabs).
        fraction_unit: ``cases``, ``slices`` or ``auto`` (cases if >= ``min_cases`` training cases).
        min_cases: see ``fraction_unit``.
        val_fraction: share of each training volume cut as a validation slab when ``splits``
            has no validation cases.
        with_test: False when the test cases come from another dataset (no test slabs/cases here).
        usable_slices: optional ``{case_id: bool (S,)}`` of slices that may be training/val items
            (e.g. slices with a label); all slices by default.
        extents: optional ``{case_id: (first, last)}`` slice range over which slabs are laid out
            (the labelled z extent, so that no slab is empty); slices outside are not used.

    Returns:
        The plan.
    """
    slabs = dict(slabs or {})
    by_id = {c.case_id: c for c in cases}

    def slices_of(case: TaskCase, mask: np.ndarray | None = None) -> np.ndarray:
        keep = np.ones(case.num_slices, dtype=bool) if mask is None else mask.copy()
        if usable_slices is not None and case.case_id in usable_slices:
            keep &= np.asarray(usable_slices[case.case_id], dtype=bool)
        return np.flatnonzero(keep)

    def layout_of(case: TaskCase, val_fraction: float, test_fraction: float) -> np.ndarray:
        lo, hi = (extents or {}).get(case.case_id, (0, case.num_slices - 1))
        lay = np.full(case.num_slices, "", dtype=object)
        lay[lo : hi + 1] = slab_layout(
            hi - lo + 1,
            case.slice_spacing,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            blocks=int(slabs.get("blocks", 2)),
            gap_mm=float(slabs.get("gap_mm", 10.0)),
            min_gap_slices=context_slices,
        )
        return lay.astype(str)

    train: dict[str, np.ndarray] = {}
    val: dict[str, np.ndarray] = {}
    test: dict[str, np.ndarray] = {}
    layout: dict[str, np.ndarray] = {}
    if strategy == "slabs":
        for case in sorted(cases, key=lambda c: c.case_id):
            lay = layout_of(
                case,
                float(slabs.get("val_fraction", 0.2)),
                float(slabs.get("test_fraction", 0.2)) if with_test else 0.0,
            )
            layout[case.case_id] = lay
            train[case.case_id] = slices_of(case, lay == "train")
            if (lay == "val").any():
                val[case.case_id] = slices_of(case, lay == "val")
            if (lay == "test").any():
                test[case.case_id] = np.flatnonzero(lay == "test")
        unit = "slices"
    elif strategy == "cases":
        if splits is None:
            raise MedclustError("finetune split 'cases' needs the dataset's splits.json")
        ids = {name: [c for c in splits.get(name, []) if c in by_id] for name in SPLITS}
        if not ids["train"]:
            raise MedclustError("finetune: splits.json has no training case with a slice store file")
        for cid in ids["train"]:
            train[cid] = slices_of(by_id[cid])
        for cid in ids["val"]:
            val[cid] = slices_of(by_id[cid])
        if with_test:
            for cid in ids["test"]:
                test[cid] = np.arange(by_id[cid].num_slices)
        if not val:
            # no validation cases: hold out a slab of every training volume instead (with a gap)
            for cid in list(train):
                case = by_id[cid]
                if case.num_slices < 3:
                    continue
                lay = layout_of(case, val_fraction, 0.0)
                layout[cid] = lay
                train[cid] = slices_of(case, lay == "train")
                val[cid] = slices_of(case, lay == "val")
        n_cases = len(train)
        unit = fraction_unit if fraction_unit != "auto" else ("cases" if n_cases >= min_cases else "slices")
    else:
        raise MedclustError(f"finetune split: unknown strategy {strategy!r}; choose cases or slabs")
    if strategy == "slabs" and fraction_unit == "cases":
        unit = "cases" if len(train) >= 2 else "slices"

    val_total = int(sum(len(v) for v in val.values()))
    train, val, total = apply_label_fraction(train, val, unit, fraction, seed)
    if not train:
        raise MedclustError("finetune: no training items after splitting")
    return SplitPlan(
        train=train, val=val, test=test, train_total=total, unit=unit, layout=layout, val_total_slices=val_total
    )


def _slice_subset(items: Mapping[str, np.ndarray], fraction: float, seed: int) -> dict[str, np.ndarray]:
    """The nested seeded ``fraction`` of all ``(case, slice)`` items, back as ``{case: slices}``."""
    flat = [(cid, int(s)) for cid in sorted(items) for s in items[cid]]
    picked: dict[str, list[int]] = {}
    for cid, s in fraction_subset(flat, fraction, seed):
        picked.setdefault(cid, []).append(s)
    return {cid: np.array(sorted(v), dtype=np.int64) for cid, v in sorted(picked.items())}


def apply_label_fraction(
    train: Mapping[str, np.ndarray], val: Mapping[str, np.ndarray], unit: str, fraction: float, seed: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]:
    """Keep the label fraction of the training items and of the validation items.

    A run at fraction f is given the labels of f of the data, for model selection as well as
    for training (the 25 % run must not pick its weights with labels the 100 % run has):

    - ``cases``: ``ceil(f * n)`` training cases. Validation slabs cut from training volumes are
      kept for the chosen volumes only; validation cases of their own get the same nested rule.
    - ``slices``: ``ceil(f * n)`` training slices and ``ceil(f * m)`` validation slices.

    Both are nested over fractions for a given seed (0.25 ⊂ 0.5 ⊂ 1.0), and at fraction 1
    nothing is dropped.

    Args:
        train: ``{case_id: slice indices}`` of all training items.
        val: ``{case_id: slice indices}`` of all validation items.
        unit: ``cases`` or ``slices``.
        fraction: in (0, 1].
        seed: run seed.

    Returns:
        ``(train, val, n_train_total)``: the kept items and the training items before the fraction
        (in ``unit``).
    """
    train = {k: np.asarray(v) for k, v in train.items() if len(v)}
    val = {k: np.asarray(v) for k, v in val.items() if len(v)}
    if unit == "cases":
        keys = sorted(train)
        chosen = set(fraction_subset(keys, fraction, seed))
        kept_val = {k: v for k, v in val.items() if k in chosen}
        own = sorted(k for k in val if k not in train)  # validation cases that are not training volumes
        kept_val.update({k: val[k] for k in fraction_subset(own, fraction, seed)})
        return {k: v for k, v in train.items() if k in chosen}, dict(sorted(kept_val.items())), len(keys)
    total = int(sum(len(v) for v in train.values()))
    return _slice_subset(train, fraction, seed), _slice_subset(val, fraction, seed), total
