"""Recipes: config sections turned into :class:`~medclust.train.TrainTask` objects and run.

The pretraining names below are loaded on first use (PEP 562), so that a fine-tuning process,
which imports ``medclust.train.recipes.finetune``, does not also import the pretraining recipe,
its losses and its monitor (~0.2 s of every fine-tuning job's start-up).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "METHODS",
    "THREE_D_KEYS",
    "PretrainTask",
    "build_joint_model",
    "export_embeddings",
    "resolve_settings",
    "run_pretraining",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("medclust.train.recipes.pretrain"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
