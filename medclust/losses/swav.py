"""SwAV swapped prediction (intra / 2D objective), with an optional feature queue."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medclust.errors import MedclustError
from medclust.losses.sinkhorn import sinkhorn

__all__ = ["SwAVLoss", "swav_loss", "swapped_prediction_loss"]


def swapped_prediction_loss(
    scores: Sequence[torch.Tensor], codes: Sequence[torch.Tensor], temperature: float = 0.1
) -> torch.Tensor:
    """Multi-view swapped prediction: each view predicts the codes of every *other* view.

    ``codes[i]`` belongs to view ``i`` (SwAV computes codes only for the first, large crops);
    the loss averages ``-sum_k codes_i * log softmax(scores_v / T)`` over samples, over
    views ``v != i`` and over the code views.

    Args:
        scores: per view (B, K) prototype scores (with gradient).
        codes: per code view (B, K) targets (no gradient), ``len(codes) <= len(scores)``.
        temperature: softmax temperature.

    Returns:
        Scalar loss (float32).
    """
    if not codes or len(codes) > len(scores) or len(scores) < 2:
        raise MedclustError(
            f"swapped_prediction_loss: need >= 2 views and 1..n_views code sets, got {len(scores)} views, {len(codes)} codes"
        )
    if temperature <= 0:
        raise MedclustError(f"swapped_prediction_loss: temperature must be positive, got {temperature}")
    log_p = [F.log_softmax(s.float() / temperature, dim=1) for s in scores]
    total, terms = 0.0, 0
    for i, q in enumerate(codes):
        q = q.detach().float()
        for v, lp in enumerate(log_p):
            if v == i:
                continue
            total = total - (q * lp).sum(dim=1).mean()
            terms += 1
    return total / terms


def swav_loss(
    scores_v1: torch.Tensor,
    scores_v2: torch.Tensor,
    codes_v1: torch.Tensor,
    codes_v2: torch.Tensor,
    temperature: float = 0.1,
) -> torch.Tensor:
    """Two-view SwAV loss: view 1 predicts the codes of view 2 and vice versa.

    ``L = -1/2 * mean_b [ sum_k q2 log p1 + sum_k q1 log p2 ]`` with ``p = softmax(scores/T)``.

    Args:
        scores_v1: (B, K) prototype scores of view 1.
        scores_v2: (B, K) prototype scores of view 2.
        codes_v1: (B, K) Sinkhorn codes of view 1 (treated as constants).
        codes_v2: (B, K) Sinkhorn codes of view 2.
        temperature: softmax temperature (SwAV: 0.1).

    Returns:
        Scalar loss.
    """
    return swapped_prediction_loss([scores_v1, scores_v2], [codes_v1, codes_v2], temperature)


class SwAVLoss(nn.Module):
    """SwAV loss with Sinkhorn codes and an optional per-view queue of past features.

    With small batches the equal-partition constraint is too strong (B samples cannot fill K
    clusters), so SwAV appends the scores of recent features to the Sinkhorn problem. The queue
    is used only once it is full (earlier, a partially zero queue would bias the codes) and is
    stored in buffers, so ``state_dict()`` checkpoints it. Each rank keeps its own queue.

    Args:
        temperature: softmax temperature.
        epsilon: Sinkhorn entropy regularisation.
        sinkhorn_iterations: Sinkhorn iterations.
        queue_length: features kept per view (0 = no queue).
        feature_dim: size of the queued features (required with a queue).
        num_views: views whose codes are computed (and queued).
        distributed: see :func:`~medclust.losses.sinkhorn.sinkhorn`.

    Example:
        >>> loss_fn = SwAVLoss(queue_length=256, feature_dim=128)
        >>> z1, z2 = model.project_2d(e1), model.project_2d(e2)
        >>> loss = loss_fn(model.prototypes_2d(z1), model.prototypes_2d(z2), z1, z2, model.prototypes_2d)
    """

    def __init__(
        self,
        temperature: float = 0.1,
        epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        queue_length: int = 0,
        feature_dim: int = 0,
        num_views: int = 2,
        distributed: bool | None = None,
    ) -> None:
        super().__init__()
        if queue_length > 0 and feature_dim <= 0:
            raise MedclustError("SwAVLoss: queue_length > 0 needs feature_dim > 0")
        self.temperature = float(temperature)
        self.epsilon = float(epsilon)
        self.sinkhorn_iterations = int(sinkhorn_iterations)
        self.queue_length = int(queue_length)
        self.num_views = int(num_views)
        self.distributed = distributed
        if self.queue_length > 0:
            self.register_buffer("queue", torch.zeros(self.num_views, self.queue_length, int(feature_dim)))
            self.register_buffer("queue_count", torch.zeros((), dtype=torch.long))
        else:
            self.queue = None
            self.queue_count = None

    @property
    def queue_full(self) -> bool:
        """True once the queue holds ``queue_length`` features per view."""
        return self.queue is not None and int(self.queue_count) >= self.queue_length

    @torch.no_grad()
    def reset_queue_(self) -> None:
        """Empty the queue (e.g. when the recipe changes the data or the prototypes radically)."""
        if self.queue is not None:
            self.queue.zero_()
            self.queue_count.zero_()

    @torch.no_grad()
    def codes(
        self,
        scores: torch.Tensor,
        view: int = 0,
        prototypes: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Sinkhorn codes of one view, with the queued features appended once the queue is full.

        Args:
            scores: (B, K) prototype scores.
            view: which view's queue to use.
            prototypes: maps queued features to scores (needed when the queue is used).

        Returns:
            (B, K) codes, rows summing to 1.
        """
        b = scores.shape[0]
        if self.queue_full and prototypes is not None:
            q_scores = prototypes(self.queue[view].to(scores.device, scores.dtype))
            return sinkhorn(
                torch.cat([scores.detach(), q_scores.detach().to(scores.dtype)]),
                self.epsilon,
                self.sinkhorn_iterations,
                self.distributed,
            )[:b]
        return sinkhorn(scores, self.epsilon, self.sinkhorn_iterations, self.distributed)

    @torch.no_grad()
    def enqueue_(self, features: Sequence[torch.Tensor]) -> None:
        """Push the current batch's features (one tensor per view) into the queue, oldest out."""
        if self.queue is None:
            return
        for v, f in enumerate(features[: self.num_views]):
            f = f.detach().to(self.queue.device, self.queue.dtype)[-self.queue_length :]
            n = f.shape[0]
            self.queue[v] = torch.cat([f, self.queue[v, : self.queue_length - n]])
        n = min(features[0].shape[0], self.queue_length)
        self.queue_count.fill_(min(int(self.queue_count) + n, self.queue_length))

    def forward(
        self,
        scores_v1: torch.Tensor,
        scores_v2: torch.Tensor,
        features_v1: torch.Tensor | None = None,
        features_v2: torch.Tensor | None = None,
        prototypes: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """SwAV loss of a two-view batch; updates the queue in training mode.

        Args:
            scores_v1: (B, K) prototype scores of view 1 (with gradient).
            scores_v2: (B, K) prototype scores of view 2.
            features_v1: (B, F) normalised features of view 1 (queued; needed with a queue).
            features_v2: (B, F) features of view 2.
            prototypes: the :class:`~medclust.models.Prototypes` that produced the scores
                (scores the queue; needed with a queue).

        Returns:
            Scalar loss.
        """
        if self.queue is not None and (features_v1 is None or features_v2 is None or prototypes is None):
            raise MedclustError("SwAVLoss: with a queue, pass features_v1, features_v2 and prototypes")
        q1 = self.codes(scores_v1, 0, prototypes)
        q2 = self.codes(scores_v2, 1 if self.num_views > 1 else 0, prototypes)
        loss = swav_loss(scores_v1, scores_v2, q1, q2, self.temperature)
        if self.training and self.queue is not None:
            self.enqueue_([features_v1, features_v2])
        return loss

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, epsilon={self.epsilon}, iterations={self.sinkhorn_iterations}, "
            f"queue_length={self.queue_length}"
        )
