"""Recipes: config sections turned into :class:`~medclust.train.TrainTask` objects and run."""

from medclust.train.recipes.pretrain import (
    METHODS,
    THREE_D_KEYS,
    PretrainTask,
    build_joint_model,
    export_embeddings,
    resolve_settings,
    run_pretraining,
)

__all__ = [
    "METHODS",
    "THREE_D_KEYS",
    "PretrainTask",
    "build_joint_model",
    "export_embeddings",
    "resolve_settings",
    "run_pretraining",
]
