"""Inter (3D) objective: swapped clustering agreement between two views of each volume.

The same SwAV machinery as the 2D objective, applied to volume embeddings with their own
prototypes (``JointModel.prototypes_3d``). Volume batches are small (a few volumes per
device), so a queue is usually needed for meaningful equal-partition codes.
"""

from __future__ import annotations

import torch

from medclust.losses.sinkhorn import sinkhorn
from medclust.losses.swav import SwAVLoss, swav_loss

__all__ = ["Agreement3DLoss", "agreement3d_loss"]


def agreement3d_loss(
    scores_v1: torch.Tensor,
    scores_v2: torch.Tensor,
    temperature: float = 0.1,
    epsilon: float = 0.05,
    iterations: int = 3,
    distributed: bool | None = None,
) -> torch.Tensor:
    """Swapped prediction between two views of the same volumes, codes computed here.

    Args:
        scores_v1: (B, K3) volume-prototype scores of view 1.
        scores_v2: (B, K3) scores of view 2 (same volumes, same order).
        temperature: softmax temperature.
        epsilon: Sinkhorn entropy regularisation.
        iterations: Sinkhorn iterations.
        distributed: see :func:`~medclust.losses.sinkhorn.sinkhorn`.

    Returns:
        Scalar loss.
    """
    q1 = sinkhorn(scores_v1, epsilon, iterations, distributed)
    q2 = sinkhorn(scores_v2, epsilon, iterations, distributed)
    return swav_loss(scores_v1, scores_v2, q1, q2, temperature)


class Agreement3DLoss(SwAVLoss):
    """:class:`~medclust.losses.swav.SwAVLoss` for volume embeddings (own queue, own settings).

    Call as ``loss_fn(scores_v1, scores_v2, vol_v1, vol_v2, model.prototypes_3d)``; see
    :class:`~medclust.losses.swav.SwAVLoss` for the arguments.
    """
