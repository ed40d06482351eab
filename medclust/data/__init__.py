"""Datasets, samplers and augmentations: pretraining items/volumes here; downstream in ``downstream``."""

from medclust.data.augment import AugmentSettings, augment_z, in_plane_flip_axes, seed_transform_, select_view_pair, view_transform
from medclust.data.pretrain_datasets import (
    PRETRAIN_SPLITS,
    BatchPlan,
    CaseArrays,
    PretrainBatches,
    PretrainCase,
    collect_cases,
    eval_volume_indices,
    item_table,
    plan_epoch,
    resize_slices,
    volume_table,
)

__all__ = [
    "PRETRAIN_SPLITS",
    "AugmentSettings",
    "BatchPlan",
    "CaseArrays",
    "PretrainBatches",
    "PretrainCase",
    "augment_z",
    "collect_cases",
    "eval_volume_indices",
    "in_plane_flip_axes",
    "item_table",
    "plan_epoch",
    "resize_slices",
    "seed_transform_",
    "select_view_pair",
    "view_transform",
    "volume_table",
]
