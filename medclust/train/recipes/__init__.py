"""Recipes: config sections turned into :class:`~medclust.train.TrainTask` objects and run.

The pretraining names below are loaded on first use (PEP 562), so that a fine-tuning process,
which imports ``medclust.train.recipes.finetune``, does not also import the pretraining recipe,
its losses and its monitor (~0.2 s of every fine-tuning job's start-up).
"""

from medclust._lazy import lazy_exports

__all__ = [
    "METHODS",
    "THREE_D_KEYS",
    "PretrainTask",
    "build_joint_model",
    "export_embeddings",
    "resolve_settings",
    "run_pretraining",
]
__getattr__, __dir__ = lazy_exports(__name__, dict.fromkeys(__all__, "pretrain"))
