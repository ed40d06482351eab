"""Pretraining views: seeded augmentation (any worker count, any resume point), flips only where a dataset declares them safe."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pretrain_helpers import make_stores, tiny_settings
from torch.utils.data import DataLoader

from medclust.data import AugmentSettings, BatchPlan, CaseArrays, PretrainBatches, collect_cases, in_plane_flip_axes, item_table
from medclust.train.distributed import DistContext
from medclust.train.recipes import PretrainTask, resolve_settings
from medclust.train.seeding import worker_init_fn

DEFAULT_AUGMENT = tiny_settings(augment={})  # the schema's augmentation: affine_prob 0.5 and all the rest


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_stores(tmp_path_factory.mktemp("stores"))


def _epoch(task: PretrainTask, epoch: int = 0) -> list[dict[str, torch.Tensor]]:
    return list(task.batches(epoch, 0, 1))


def _assert_same(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), key


def test_default_augmentation_is_a_function_of_the_seed_only(stores: dict[str, Path]) -> None:
    settings = resolve_settings(DEFAULT_AUGMENT)
    assert settings["augment"]["affine_prob"] > 0  # the default really rotates and zooms
    cases = collect_cases(stores)
    first = PretrainTask("joint", settings, cases)
    first.setup(DistContext())
    reference = _epoch(first)
    # anything drawn from the global generators in between must not change the views
    np.random.seed(99), torch.manual_seed(99), np.random.rand(17)
    second = PretrainTask("joint", settings, cases)
    second.setup(DistContext())
    _assert_same(reference, _epoch(second))
    _assert_same(reference, _epoch(first))  # and the same object replays its epoch


def test_worker_count_does_not_change_the_batches(stores: dict[str, Path]) -> None:
    cases = collect_cases(stores)
    epochs = {}
    for workers in (0, 2):
        task = PretrainTask("joint", resolve_settings({**DEFAULT_AUGMENT, "num_workers": workers}), cases)
        task.setup(DistContext())
        epochs[workers] = [_epoch(task, e) for e in (0, 1)]
    for e in (0, 1):
        _assert_same(epochs[0][e], epochs[2][e])


def test_workers_and_epochs_draw_their_own_affine_transforms(stores: dict[str, Path]) -> None:
    # only the random affine is on: one image, four batches (two per worker) in each of two epochs
    augment = AugmentSettings(crop_scale=(1.0, 1.0), flip_prob=0.0, affine_prob=1.0, intensity_prob=0.0, contrast_prob=0.0, noise_prob=0.0)
    arrays = CaseArrays(collect_cases(stores))
    views = []
    for epoch in (0, 1):
        plans = [BatchPlan(items=[(0, 1000 * epoch + 10 * b)], volumes=[]) for b in range(4)]
        dataset = PretrainBatches(arrays, plans, (16, 16), (16, 16), 4, augment)
        loader = DataLoader(dataset, batch_size=None, num_workers=2, worker_init_fn=worker_init_fn)
        views += [batch["views2d"][0, 0] for batch in loader]
    flat = torch.stack(views).flatten(1)
    distinct = {tuple(np.round(v.numpy(), 5)) for v in flat}
    assert len(distinct) == len(views) == 8


@pytest.mark.parametrize(
    "slice_axis, expected",
    [
        (2, {"left_right": (0,), "anterior_posterior": (1,), "superior_inferior": ()}),  # axial: H = x, W = y
        (1, {"left_right": (0,), "anterior_posterior": (), "superior_inferior": (1,)}),  # coronal: H = x, W = z
        (0, {"left_right": (), "anterior_posterior": (0,), "superior_inferior": (1,)}),  # sagittal: H = y, W = z
    ],
)
def test_anatomical_flip_axes_map_to_the_stored_slice_axes(slice_axis: int, expected: dict[str, tuple[int, ...]]) -> None:
    for name, axes in expected.items():
        assert in_plane_flip_axes([name], slice_axis) == axes
    assert in_plane_flip_axes(list(expected), slice_axis) == tuple(sorted(a for v in expected.values() for a in v))


def test_flips_only_along_axes_a_dataset_declares_safe(stores: dict[str, Path]) -> None:
    assert resolve_settings({})["augment"]["flip_axes"] == {}  # default: nothing is mirrored
    arrays = CaseArrays(collect_cases(stores))
    items = [(i, 7 * i) for i, (c, _) in enumerate(item_table(arrays)) if arrays.cases[c].dataset in ("ct", "xr")]
    plan = [BatchPlan(items=items, volumes=[])]
    still = {"crop_scale": (1.0, 1.0), "affine_prob": 0.0, "intensity_prob": 0.0, "contrast_prob": 0.0, "noise_prob": 0.0}
    images = torch.stack([torch.from_numpy(arrays.slices(c, [s])) for c, s in (item_table(arrays)[i] for i, _ in items)])

    never = PretrainBatches(arrays, plan, (16, 16), (16, 16), 4, AugmentSettings(flip_prob=1.0, **still))[0]["views2d"]
    assert torch.allclose(never[0], images, atol=1e-6) and torch.allclose(never[1], images, atol=1e-6)

    declared = AugmentSettings(flip_prob=1.0, flip_axes={"ct": ("left_right",)}, **still)
    views = PretrainBatches(arrays, plan, (16, 16), (16, 16), 4, declared)[0]["views2d"]
    is_ct = torch.tensor([arrays.cases[item_table(arrays)[i][0]].dataset == "ct" for i, _ in items])
    # axial CT slices: H is RAS x, so left_right mirrors H; the undeclared X-rays stay as they are
    assert torch.allclose(views[0][is_ct], images[is_ct].flip(-2), atol=1e-6)
    assert torch.allclose(views[0][~is_ct], images[~is_ct], atol=1e-6)
