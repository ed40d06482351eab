"""Pretraining data: 2D items (every slice and radiograph) and volumes (slice sequences).

- :func:`collect_cases` reads each slice store's ``index.json`` and ``splits.json`` and keeps the
  cases of the allowed splits (train/val; test cases are never used for pretraining).
- :class:`CaseArrays` serves slices of those cases, from memory or lazily from the HDF5 files.
- :func:`plan_epoch` fixes, for one epoch, which items and volumes make up every global batch
  and the seed of each view; each rank takes its contiguous share of every global batch, so
  the union over ranks is the single-process batch.
- :class:`PretrainBatches` turns a plan into collated batches (the unit a DataLoader worker
  builds): two augmented views of each 2D item and two views of each volume — each its own
  z window (overlapping the other's, on a shared grid) of at most ``s_max`` slices, with its
  own z scaling/jitter, augmentation and dropped slices — padded to ``s_max``, with a validity
  mask (dropped and padded slices False) and the slot pairing of the slices both views kept.

Everything random is derived from ``(seed, epoch, position in the epoch)``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import get_track_meta, set_track_meta
from torch.utils.data import Dataset

from medclust.data.augment import AugmentSettings, as_float_tensor, augment_z, drop_slices, seed_transform_, select_view_pair, view_transform
from medclust.errors import BadInputError, MedclustError
from medclust.io.slice_store import read_attrs, read_case

__all__ = [
    "PRETRAIN_SPLITS",
    "BatchPlan",
    "CaseArrays",
    "PretrainBatches",
    "PretrainCase",
    "collect_cases",
    "eval_volume_indices",
    "item_table",
    "plan_epoch",
    "resize_slices",
    "volume_table",
]

#: splits a pretraining run may draw from; ``test`` is deliberately absent
PRETRAIN_SPLITS = ("train", "val")


@dataclass(frozen=True)
class PretrainCase:
    """One stored case available to pretraining.

    Attributes:
        dataset: dataset name.
        case_id: case id.
        path: its ``{case}.h5`` file.
        modality: CT, MR or XR.
        num_slices: S (1 for a radiograph).
        split: train or val.
        simulated: True for simulated radiographs.
    """

    dataset: str
    case_id: str
    path: Path
    modality: str
    num_slices: int
    split: str
    simulated: bool = False


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise BadInputError(path, f"cannot read slice store metadata ({err})") from err


def collect_cases(
    stores: Mapping[str, str | os.PathLike[str]] | Sequence[str | os.PathLike[str]],
    splits: Sequence[str] = PRETRAIN_SPLITS,
) -> list[PretrainCase]:
    """Cases of the given splits from slice store folders.

    Args:
        stores: dataset name -> store folder (``results/slices/{dataset}``), or folders (the
            dataset name is then read from ``index.json``).
        splits: any of ``train``, ``val``.

    Returns:
        The cases, in store order then split order then splits.json order.

    Raises:
        MedclustError: a ``test`` split was requested, or a store is missing its files.
    """
    bad = sorted(set(splits) - set(PRETRAIN_SPLITS))
    if bad:
        raise MedclustError(f"pretrain.splits: {bad} not allowed; pretraining may only use {list(PRETRAIN_SPLITS)} cases")
    folders = list(stores.items()) if isinstance(stores, Mapping) else [(None, s) for s in stores]
    cases: list[PretrainCase] = []
    for name, folder in folders:
        folder = Path(folder)
        index = _read_json(folder / "index.json")
        split_table = _read_json(folder / "splits.json")
        dataset = name or index.get("dataset") or folder.name
        by_id = {str(entry["case_id"]): entry for entry in index.get("cases", [])}
        for split in splits:
            for case_id in split_table.get(split, []) or []:
                entry = by_id.get(str(case_id))
                if entry is None:
                    raise BadInputError(folder / "splits.json", f"case {case_id!r} of split {split} is not in index.json")
                cases.append(
                    PretrainCase(
                        dataset=str(dataset),
                        case_id=str(case_id),
                        path=folder / str(entry.get("file", f"{case_id}.h5")),
                        modality=str(entry.get("modality", "")),
                        num_slices=int(entry["num_slices"]),
                        split=split,
                        simulated=bool(entry.get("simulated", False)),
                    )
                )
    return cases


def _z_positions(case: PretrainCase, attrs: Mapping[str, Any]) -> np.ndarray:
    z = np.asarray(attrs.get("z_positions_mm", []), dtype=np.float32)
    if z.shape != (case.num_slices,):
        raise BadInputError(case.path, f"z_positions_mm has {z.size} entries for {case.num_slices} slices")
    return z


class CaseArrays:
    """Slice access for a list of cases, cached in memory or read per request.

    Args:
        cases: the cases.
        in_memory: load every image once (fast; the store is already downsampled) instead of
            reading the needed slices from HDF5 on every request.
    """

    def __init__(self, cases: Sequence[PretrainCase], in_memory: bool = True) -> None:
        self.cases = list(cases)
        self.in_memory = in_memory
        self._images: list[np.ndarray | None] = [None] * len(self.cases)
        self.z_mm: list[np.ndarray] = []
        self.slice_axis: list[int] = []
        self.shapes: list[tuple[int, int, int]] = []
        for i, case in enumerate(self.cases):
            if in_memory:
                loaded = read_case(case.path, load_label=False)
                image, attrs = np.asarray(loaded.image), loaded.attrs
                self._images[i] = image
                shape = tuple(image.shape)
            else:
                attrs = read_attrs(case.path)
                shape = (case.num_slices, 0, 0)
            if shape[0] != case.num_slices:
                raise BadInputError(case.path, f"holds {shape[0]} slices, index.json says {case.num_slices}")
            self.shapes.append(shape)  # type: ignore[arg-type]
            self.z_mm.append(_z_positions(case, attrs))
            self.slice_axis.append(int(attrs.get("slice_axis", 2)))

    def __len__(self) -> int:
        return len(self.cases)

    def slices(self, case_index: int, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """``(n, H, W)`` float32 slices (``indices`` increasing)."""
        image = self._images[case_index]
        idx = np.asarray(indices, dtype=np.int64)
        if image is not None:
            return image[idx].astype(np.float32)
        return np.asarray(read_case(self.cases[case_index].path, slices=idx.tolist(), load_label=False).image, dtype=np.float32)


@dataclass
class BatchPlan:
    """The content of one (rank-local) batch.

    Attributes:
        items: ``(item_id, seed)`` of each 2D item.
        volumes: ``(volume_id, seed)`` of each volume.
    """

    items: list[tuple[int, int]]
    volumes: list[tuple[int, int]]


def _stream(n: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` ids from successive random permutations of ``range(n)``."""
    if n == 0 or count == 0:
        return np.zeros(0, dtype=np.int64)
    reps = -(-count // n)
    return np.concatenate([rng.permutation(n) for _ in range(reps)])[:count]


def plan_epoch(
    num_items: int,
    num_volumes: int,
    batch_2d: int,
    batch_3d: int,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
) -> list[BatchPlan]:
    """Batches of one epoch for one rank.

    An epoch is one pass over the 2D items (``num_items // batch_2d`` global batches, at least
    one: a tiny dataset repeats items, with other augmentations). Volumes are drawn from their
    own successive permutations, ``batch_3d`` per global batch. Rank ``r`` of ``W`` takes
    positions ``[r*b/W, (r+1)*b/W)`` of every global batch.

    Args:
        num_items: 2D items available.
        num_volumes: volumes available (0 or ``batch_3d = 0``: no 3D part).
        batch_2d: global 2D batch size.
        batch_3d: global volume batch size.
        seed: run seed.
        epoch: epoch number.
        rank: this rank.
        world_size: number of ranks (must divide both batch sizes).

    Returns:
        This rank's batch plans, in order.
    """
    if batch_2d % world_size or batch_3d % world_size:
        raise MedclustError(
            f"pretrain: batch sizes (2D {batch_2d}, 3D {batch_3d}) must be divisible by the {world_size} ranks"
        )
    from medclust.train.seeding import derive_seed  # local: data must not import the trainer at module load

    steps = max(1, num_items // batch_2d) if num_items else 0
    rng = np.random.default_rng(derive_seed(seed, epoch, 0x2D))
    items = _stream(num_items, steps * batch_2d, rng)
    use_3d = num_volumes > 0 and batch_3d > 0
    vol_rng = np.random.default_rng(derive_seed(seed, epoch, 0x3D))
    vols = _stream(num_volumes, steps * batch_3d, vol_rng) if use_3d else np.zeros(0, dtype=np.int64)
    b2, b3 = batch_2d // world_size, batch_3d // world_size
    plans = []
    for s in range(steps):
        lo2 = s * batch_2d + rank * b2
        lo3 = s * batch_3d + rank * b3
        plans.append(
            BatchPlan(
                items=[(int(items[p]), derive_seed(seed, epoch, 2, p)) for p in range(lo2, lo2 + b2)],
                volumes=[(int(vols[p]), derive_seed(seed, epoch, 3, p)) for p in range(lo3, lo3 + b3)] if use_3d else [],
            )
        )
    return plans


def resize_slices(slices: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of ``(n, H, W)`` slices to ``(n, *size)`` (no-op when equal)."""
    if tuple(slices.shape[-2:]) == tuple(size):
        return slices
    return F.interpolate(slices[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def eval_volume_indices(num_slices: int, s_max: int) -> np.ndarray:
    """Evenly spaced slice indices covering a whole volume, at most ``s_max`` of them."""
    if num_slices <= s_max:
        return np.arange(num_slices)
    return np.round(np.linspace(0, num_slices - 1, s_max)).astype(np.int64)


class PretrainBatches(Dataset):
    """Map-style dataset whose items are whole batches (built inside DataLoader workers).

    Args:
        arrays: the cases' slices.
        plans: batch plans (one epoch of one rank, possibly with the consumed prefix removed).
        view_size: ``(H, W)`` of 2D views.
        volume_size: ``(H, W)`` of volume-view slices.
        s_max: most slices per volume view (views are padded to it).
        augment: augmentation strengths.
    """

    def __init__(
        self,
        arrays: CaseArrays,
        plans: Sequence[BatchPlan],
        view_size: Sequence[int],
        volume_size: Sequence[int],
        s_max: int,
        augment: AugmentSettings,
    ) -> None:
        self.arrays = arrays
        self.plans = list(plans)
        self.view_size = tuple(int(v) for v in view_size)
        self.volume_size = tuple(int(v) for v in volume_size)
        self.s_max = int(s_max)
        self.augment = augment
        self.items = item_table(arrays)
        self.volumes = volume_table(arrays)
        self._transforms: dict[tuple[tuple[int, int], tuple[int, ...]], Any] = {}

    def __len__(self) -> int:
        return len(self.plans)

    def _transform(self, size: tuple[int, int], case_index: int) -> Any:
        """The view pipeline for one case: its dataset decides which flips are anatomically safe."""
        case = self.arrays.cases[case_index]
        slice_axis = self.arrays.slice_axis[case_index] if hasattr(self.arrays, "slice_axis") else 2
        key = (size, self.augment.flips_for(case.dataset, slice_axis))
        if key not in self._transforms:
            self._transforms[key] = view_transform(size, self.augment, key[1])
        return self._transforms[key]

    def _item_views(self, item_id: int, seed: int) -> torch.Tensor:
        case_index, slice_index = self.items[item_id]
        image = as_float_tensor(self.arrays.slices(case_index, [slice_index]))  # (1, H, W)
        transform = self._transform(self.view_size, case_index)
        views = []
        for v in (1, 2):
            seed_transform_(transform, seed + v)
            views.append(torch.as_tensor(transform(image)))
        return torch.stack(views)  # (2, 1, h, w)

    def _volume_views(self, volume_id: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        case_index = self.volumes[volume_id]
        n = self.arrays.cases[case_index].num_slices
        h, w = self.volume_size
        out = torch.zeros(2, self.s_max, h, w)
        z = torch.zeros(2, self.s_max)
        valid = torch.zeros(2, self.s_max, dtype=torch.bool)
        window_rng = np.random.RandomState(seed % 2**32)
        views = select_view_pair(n, self.s_max, self.augment, window_rng)
        # one read for both views: the union of their slices, slices as channels
        union = np.union1d(*views)
        stack = as_float_tensor(self.arrays.slices(case_index, union))
        transform = self._transform(self.volume_size, case_index)
        for v, idx in enumerate(views):
            k = len(idx)
            rng = seed_transform_(transform, seed + 11 * (v + 1))
            out[v, :k] = torch.as_tensor(transform(stack[np.searchsorted(union, idx)]))
            z[v, :k] = torch.from_numpy(augment_z(self.arrays.z_mm[case_index][idx], self.augment, rng))
            valid[v, :k] = torch.from_numpy(drop_slices(k, self.augment.slice_drop, rng))
        # view 1's slot -> view 2's slot holding the same slice, where both views kept it
        pair = torch.full((self.s_max,), -1, dtype=torch.long)
        common, slot1, slot2 = np.intersect1d(views[0], views[1], assume_unique=True, return_indices=True)
        kept = valid[0, torch.from_numpy(slot1)] & valid[1, torch.from_numpy(slot2)]
        pair[torch.from_numpy(slot1)[kept]] = torch.from_numpy(slot2)[kept]
        return out, z, valid, pair

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        plan = self.plans[index]
        previous = get_track_meta()
        set_track_meta(False)  # plain tensors: MetaTensor bookkeeping costs more than the transforms
        try:
            batch: dict[str, torch.Tensor] = {}
            if plan.items:
                batch["views2d"] = torch.stack([self._item_views(i, s) for i, s in plan.items], dim=1)  # (2, n, 1, h, w)
                batch["index2d"] = torch.tensor([i for i, _ in plan.items], dtype=torch.long)
            if plan.volumes:
                vols = [self._volume_views(i, s) for i, s in plan.volumes]
                batch["volumes"] = torch.stack([v[0] for v in vols], dim=1)  # (2, b, S, h, w)
                batch["z_mm"] = torch.stack([v[1] for v in vols], dim=1)  # (2, b, S)
                batch["valid"] = torch.stack([v[2] for v in vols], dim=1)  # (2, b, S)
                batch["pair"] = torch.stack([v[3] for v in vols])  # (b, S): view-2 slot of view 1's slot, or -1
                batch["index3d"] = torch.tensor([i for i, _ in plan.volumes], dtype=torch.long)
        finally:
            set_track_meta(previous)
        return batch


def item_table(arrays: CaseArrays) -> list[tuple[int, int]]:
    """``(case_index, slice_index)`` of every 2D item: all slices of all cases."""
    return [(c, s) for c, case in enumerate(arrays.cases) for s in range(case.num_slices)]


def volume_table(arrays: CaseArrays, min_slices: int = 2) -> list[int]:
    """Indices of the cases that are volumes (at least ``min_slices`` slices)."""
    return [c for c, case in enumerate(arrays.cases) if case.num_slices >= min_slices]
