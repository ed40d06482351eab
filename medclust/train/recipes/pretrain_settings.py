"""Pretraining settings: the method names, schema defaults and validation, and the model they build."""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import jsonschema
from torch import nn

from medclust.config import load_schema
from medclust.errors import MedclustError
from medclust.models import JointModel, SliceAttention, SliceEncoder
from medclust.train.recipes.pretrain_methods import METHODS

__all__ = [
    "METHODS", "METRIC_COLUMNS", "RUNTIME_KEYS", "THREE_D_KEYS", "build_joint_model", "resolve_settings",
    "warn_on_assignment_sizes",
]

log = logging.getLogger("medclust.pretrain")

#: settings only the joint methods read; other methods run with their schema defaults, so that
#: tuning the 3D branch does not invalidate (re-trigger) the 2D baselines (the Snakemake rule
#: leaves them out of those methods' params: PRETRAIN_3D_KEYS in workflow/rules/common.smk)
THREE_D_KEYS = (
    "w_intra", "w_inter", "w_mask", "warmup_2d_steps", "heads", "points", "layers", "k_3d",
    "mask_ratio", "mask_loss", "s_max", "batch_size_3d", "volume_size", "queue_length_3d", "volume_slices_in_2d",
)
# keys that change how fast a run goes or what it logs, not what it learns
RUNTIME_KEYS = (
    "num_workers", "checkpoint_every", "keep_checkpoints", "log_every", "compile", "progress", "tensorboard", "methods",
    "probe_every", "probe",  # the learning monitor only watches (its random state is its own)
)
# accepted besides the schema's keys: the global seed and trainer switches that are not config keys
_NON_CONFIG_KEYS = ("seed", "progress", "tensorboard", "deterministic", "max_steps")
METRIC_COLUMNS = ("step", "loss", "loss_intra", "loss_inter", "loss_mask", "lr", "items_per_s")


def _pretrain_schema() -> dict[str, Any]:
    return load_schema()["properties"]["pretrain"]


def _defaults(schema: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, sub in schema.get("properties", {}).items():
        if "default" in sub:
            value = copy.deepcopy(sub["default"])
            if isinstance(value, dict) and sub.get("type") == "object":
                value = {**_defaults(sub), **value}
            out[key] = value
    return out


def resolve_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The ``pretrain`` settings with every schema default filled in (plus ``seed``, default 0).

    Args:
        settings: a (possibly partial) ``pretrain`` section; may hold the global ``seed``.

    Returns:
        A new dict.
    """
    schema = _pretrain_schema()
    resolved = _defaults(schema)
    for key, value in settings.items():
        if isinstance(value, Mapping) and isinstance(resolved.get(key), dict):
            resolved[key] = {**resolved[key], **value}
        else:
            resolved[key] = copy.deepcopy(value)
    resolved.setdefault("seed", 0)
    # the CLI may be called without Snakemake's schema validation: check here (trainer-only
    # switches such as `progress` are not config keys)
    checked = {k: v for k, v in resolved.items() if k not in _NON_CONFIG_KEYS}
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(checked), key=lambda e: list(e.absolute_path))
    if errors:
        where = ".".join(str(p) for p in errors[0].absolute_path) or "<section>"
        raise MedclustError(f"pretrain settings: key '{where}': {errors[0].message}")
    return resolved


def build_joint_model(
    s: Mapping[str, Any], volume_branch: bool = True, extra_heads: Callable[[], Mapping[str, nn.Module]] | None = None
) -> JointModel:
    """Encoder + slice attention + heads + prototypes from resolved settings.

    Args:
        s: resolved settings.
        volume_branch: build the slice attention, volume head, predictor, mask token and volume
            prototypes (False for the 2D-only methods, which never use them).
        extra_heads: builds a 2D objective's own modules (called after the encoder, so that the
            encoder's seeded initialisation is the same for every method).
    """
    encoder = SliceEncoder(s["backbone"], d_model=s["d_model"])
    attention = SliceAttention(s["d_model"], heads=s["heads"], points=s["points"], layers=s["layers"]) if volume_branch else None
    extra = extra_heads() if extra_heads is not None else None
    return JointModel(
        encoder, attention, d_model=s["d_model"], proj_dim=s["proj_dim"], k_2d=s["k_2d"], k_3d=s["k_3d"], mask_ratio=s["mask_ratio"], extra_heads=extra
    )


def warn_on_assignment_sizes(settings: Mapping[str, Any], num_items: int, num_volumes: int, batch_3d: int) -> None:
    """Warn where the data cannot fill a cluster assignment (equal partition) with other samples.

    A queue stands in for the rest of the dataset in the equal-partition problem. When it
    holds a large share of a small dataset it is mostly stale views of the very items being
    clustered, and a common drift of the features is then rewarded (the batch takes the
    clusters the stale queue leaves free): on the demo (167 2D items, queue 128) the loss
    rose from 3.5 to 6.4 after step 10 and the volume loss swung between 0.5 and 6.6. A
    volume queue longer than the number of volumes holds several copies of each, and
    equal partition then splits one volume across prototypes anew at every step. With more
    volume prototypes than distinct volumes in one assignment (batch + queue), equal
    partition spreads each volume over at least ``k_3d / n`` of them, so the volume loss
    cannot fall below ``ln(k_3d / n)`` and stops teaching once it gets there (the demo, 2
    volumes and 4 prototypes: ln 2 = 0.693 by step ~45).

    Args:
        settings: the resolved ``pretrain`` settings.
        num_items: 2D items of the pretraining data.
        num_volumes: volumes, 0 when the method trains no 3D objective.
        batch_3d: volumes per step (0 without a 3D objective).
    """
    queue_2d, queue_3d = int(settings["queue_length"]), int(settings["queue_length_3d"]) if num_volumes else 0
    if queue_2d and queue_2d * 4 > num_items:
        log.warning(
            "pretrain: queue_length=%d is %.0f%% of the %d 2D items: the queue would mostly hold stale views of the items "
            "being clustered; use a queue well below a quarter of the dataset, or 0",
            queue_2d, 100 * queue_2d / num_items, num_items,
        )
    if not num_volumes:
        return
    per_assignment = min(batch_3d + queue_3d, num_volumes)
    k_3d = int(settings["k_3d"])
    if k_3d > per_assignment:
        log.warning(
            "pretrain: k_3d=%d volume prototypes for %d distinct volumes per assignment (batch_size_3d %d + "
            "queue_length_3d %d, %d training volumes): equal partition spreads each volume over >= %.1f prototypes, "
            "so the volume loss cannot fall below ln(%.1f) = %.3f; use k_3d <= %d, or more volumes per step",
            k_3d, per_assignment, batch_3d, queue_3d, num_volumes, k_3d / per_assignment,
            k_3d / per_assignment, math.log(k_3d / per_assignment), per_assignment,
        )
    if queue_3d and queue_3d >= num_volumes:
        log.warning(
            "pretrain: queue_length_3d=%d holds several copies of each of the %d volumes (equal partition then splits "
            "a volume across prototypes); use fewer entries than volumes, or 0",
            queue_3d, num_volumes,
        )
