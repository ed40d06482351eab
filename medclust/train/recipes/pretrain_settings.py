"""Pretraining settings: the method names, schema defaults and validation, and the model they build."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import jsonschema
from torch import nn

from medclust.config import load_schema
from medclust.errors import MedclustError
from medclust.models import JointModel, SliceAttention, SliceEncoder
from medclust.train.recipes.pretrain_methods import METHODS

__all__ = ["METHODS", "METRIC_COLUMNS", "RUNTIME_KEYS", "THREE_D_KEYS", "build_joint_model", "resolve_settings"]

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
