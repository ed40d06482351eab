"""Training: the one :class:`Trainer` (checkpoints, resume, signals, DDP, AMP, logging) and recipes.

Recipes (``medclust.train.recipes``) turn config sections into :class:`TrainTask` objects; the
trainer runs any task the same way.
"""

from medclust.train.checkpoint import CheckpointStore, load_weights
from medclust.train.distributed import DistContext, init_distributed
from medclust.train.optim import LARS, build_optimizer, default_param_groups
from medclust.train.schedule import build_scheduler, warmup_cosine_factor
from medclust.train.seeding import derive_seed, loader_generator, rng_state, seed_everything, set_rng_state, worker_init_fn
from medclust.train.signals import SignalFlag, TrainingInterrupted
from medclust.train.task import TrainTask
from medclust.train.trainer import Trainer, move_to_device
from medclust.train.trainer_config import TrainerConfig

__all__ = [
    "LARS",
    "CheckpointStore",
    "DistContext",
    "SignalFlag",
    "TrainTask",
    "Trainer",
    "TrainerConfig",
    "TrainingInterrupted",
    "build_optimizer",
    "build_scheduler",
    "default_param_groups",
    "derive_seed",
    "init_distributed",
    "load_weights",
    "loader_generator",
    "move_to_device",
    "rng_state",
    "seed_everything",
    "set_rng_state",
    "warmup_cosine_factor",
    "worker_init_fn",
]
