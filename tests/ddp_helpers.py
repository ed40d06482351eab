"""Tasks for the two-process tests, and the script torchrun starts (``python ddp_helpers.py OUT STORES``).

Each rank trains (1) a small SwAV task without batch norm — its loss over a sharded batch must
equal the single-process loss over the whole batch, Sinkhorn being global — and (2) the real
joint pretraining task, whose parameters must end identical on both ranks.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from medclust.losses import SwAVLoss
from medclust.models import Prototypes, normalize_prototypes_
from medclust.train import Trainer, TrainerConfig, derive_seed

GLOBAL_BATCH = 8


class TinySwAVTask:
    """Two noisy views of fixed random images -> conv/GroupNorm encoder -> SwAV (no queue)."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(7)
        self.images = torch.rand(32, 1, 12, 12, generator=gen)
        self.swav = SwAVLoss(temperature=0.1, epsilon=0.05, sinkhorn_iterations=3)

    def build_model(self) -> nn.Module:
        return nn.ModuleDict(
            {
                "enc": nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 8)),
                "protos": Prototypes(8, 5),
            }
        )

    def batches(self, epoch: int, rank: int, world_size: int):
        gen = torch.Generator().manual_seed(derive_seed(0, epoch))
        order = torch.randperm(len(self.images), generator=gen)
        noise = torch.randn(2, len(self.images), 1, 12, 12, generator=gen) * 0.1
        per_rank = GLOBAL_BATCH // world_size
        for start in range(0, len(order), GLOBAL_BATCH):
            idx = order[start : start + GLOBAL_BATCH][rank * per_rank : (rank + 1) * per_rank]
            yield {"v1": self.images[idx] + noise[0, idx], "v2": self.images[idx] + noise[1, idx]}

    def training_step(self, model: nn.Module, batch, step: int):
        z1 = F.normalize(model["enc"](batch["v1"]), dim=1)
        z2 = F.normalize(model["enc"](batch["v2"]), dim=1)
        return {"loss": self.swav(model["protos"](z1), model["protos"](z2))}

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        normalize_prototypes_(model)


def toy_config(**kw) -> TrainerConfig:
    base = {"max_steps": 8, "lr": 0.01, "warmup_steps": 2, "checkpoint_every": 4, "log_every": 1, "progress": False, "tensorboard": False, "seed": 5}
    base.update(kw)
    return TrainerConfig(**base)


def main(out: Path, stores: dict[str, str]) -> None:
    from pretrain_helpers import tiny_settings

    from medclust.data import collect_cases
    from medclust.train.recipes import PretrainTask, resolve_settings

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    toy = Trainer(toy_config(), out / "toy", out / "toy" / "checkpoint").fit(TinySwAVTask())
    torch.save(toy.state_dict(), out / f"toy_rank{rank}.pt")

    settings = resolve_settings(tiny_settings(steps=3, batch_size_2d=12, batch_size_3d=2))  # 4 items + 2 volumes
    cfg = TrainerConfig.from_dict({**settings, "progress": False, "tensorboard": False})
    joint = Trainer(cfg, out / "joint", out / "joint" / "checkpoint").fit(PretrainTask("joint", settings, collect_cases(stores)))
    torch.save(joint.state_dict(), out / f"joint_rank{rank}.pt")


if __name__ == "__main__":
    limit = int(os.environ.get("DDP_TEST_TIMEOUT", "240"))
    faulthandler.dump_traceback_later(limit - 5 * int(os.environ.get("RANK", 0)), exit=True)  # never hang CI
    main(Path(sys.argv[1]), json.loads(sys.argv[2]))
