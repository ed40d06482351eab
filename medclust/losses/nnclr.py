"""NNCLR: contrastive learning with nearest neighbours from a support set as positives.

Reference: D. Dwibedi, Y. Aytar, J. Tompson, P. Sermanet, A. Zisserman, "With a Little Help from
My Friends: Nearest-Neighbor Contrastive Learning of Visual Representations", ICCV 2021,
arXiv:2104.14548 (Section 3.2, Eq. 2, and the implementation details of Section 4).

For view-1 projection ``z_i`` the positive is its nearest neighbour (cosine) in a support set
``Q`` of past embeddings, compared with the *prediction* ``p_i^+`` of the other view; the
softmax runs over the other view's predictions of the batch (Eq. 2)::

    L_i = -log( exp(NN(z_i, Q) . p_i^+ / T) / sum_k exp(NN(z_i, Q) . p_k^+ / T) )

so the negatives of anchor ``NN(z_i, Q)`` are the predictions ``p_k^+`` of the other batch
items. The loss is symmetrised (view 2's neighbours against view 1's predictions) and
averaged. Neighbours carry no gradient (they come from the support set); all vectors are
L2-normalised. This is the direction of the paper's Eq. 2 and of its pseudocode
(``logits = nn @ p.T``, cross-entropy over each row).

Defaults from the paper: temperature 0.1, support set (queue) of 98,304 embeddings, updated
first-in first-out with the current batch's view-1 projections after every step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medclust.errors import MedclustError

__all__ = ["NNCLRLoss", "nearest_neighbours", "nnclr_loss"]


@torch.no_grad()
def nearest_neighbours(z: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """The row of ``support`` with the highest cosine similarity to each row of ``z``.

    Args:
        z: (B, F) queries.
        support: (M, F) support set, M >= 1.

    Returns:
        (B, F) the selected support rows, as stored (no gradient).
    """
    if z.ndim != 2 or support.ndim != 2 or z.shape[1] != support.shape[1] or support.shape[0] == 0:
        raise MedclustError(
            f"nearest_neighbours: expected z (B, F) and a non-empty support (M, F), got {tuple(z.shape)} and "
            f"{tuple(support.shape)}"
        )
    s = support.to(z.device)
    idx = (F.normalize(z.float(), dim=1) @ F.normalize(s.float(), dim=1).T).argmax(dim=1)
    return s[idx]


def _info_nce(anchors: torch.Tensor, candidates: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over rows of -log softmax(anchor_i . candidate_k / T)[k = i] (normalised vectors)."""
    logits = F.normalize(anchors.float(), dim=1) @ F.normalize(candidates.float(), dim=1).T / temperature
    return F.cross_entropy(logits, torch.arange(anchors.shape[0], device=logits.device))


def nnclr_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    p1: torch.Tensor,
    p2: torch.Tensor,
    support: torch.Tensor | None,
    temperature: float = 0.1,
) -> torch.Tensor:
    """Symmetric NNCLR loss of a two-view batch (Eq. 2 of the paper, both directions averaged).

    ``0.5 * [ InfoNCE(NN(z1, Q) -> p2) + InfoNCE(NN(z2, Q) -> p1) ]``.

    Args:
        z1: (B, F) projections of view 1 (queried in the support set).
        z2: (B, F) projections of view 2.
        p1: (B, F) predictor outputs of view 1.
        p2: (B, F) predictor outputs of view 2.
        support: (M, F) support set; None = each view's own batch, where every projection is its
            own nearest neighbour (then the loss is InfoNCE between a view's detached projection
            and the other view's prediction).
        temperature: softmax temperature (> 0).

    Returns:
        Scalar loss (float32); gradients reach ``p1`` and ``p2`` only.
    """
    if temperature <= 0:
        raise MedclustError(f"nnclr_loss: temperature must be positive, got {temperature}")
    shapes = {tuple(t.shape) for t in (z1, z2, p1, p2)}
    if len(shapes) != 1 or z1.ndim != 2:
        raise MedclustError(f"nnclr_loss: z1, z2, p1, p2 must all be (B, F) of one shape, got {sorted(shapes)}")
    if z1.shape[0] < 2:
        raise MedclustError(f"nnclr_loss: needs >= 2 items for negatives, got a batch of {z1.shape[0]}")
    with torch.autocast(device_type=z1.device.type, enabled=False):
        if support is None:
            nn1, nn2 = z1.detach(), z2.detach()
        else:
            nn1, nn2 = nearest_neighbours(z1, support), nearest_neighbours(z2, support)
        return 0.5 * (_info_nce(nn1, p2, temperature) + _info_nce(nn2, p1, temperature))


class NNCLRLoss(nn.Module):
    """NNCLR loss with its support set: a FIFO queue of past view-1 projections in buffers.

    The queue is a ring buffer of L2-normalised, detached projections; ``state_dict()``
    checkpoints it (``queue``, ``queue_ptr``, ``queue_count``). Until it holds
    ``queue_length`` embeddings the support set is the batch itself (each projection is its
    own neighbour, see :func:`nnclr_loss`): a partly filled queue would hand the first steps
    neighbours from a handful of stale, untrained embeddings. The queue is updated in training
    mode only, after the loss is computed (the paper: neighbours come from earlier batches).

    Args:
        temperature: softmax temperature (paper: 0.1).
        queue_length: support-set size (paper: 98,304; keep it well below the number of
            training items of a small dataset, or it holds stale copies of every item).
        feature_dim: size of the projections.

    Example:
        >>> loss_fn = NNCLRLoss(queue_length=8192, feature_dim=128)
        >>> z1, z2 = projector(encoder(v1)), projector(encoder(v2))
        >>> loss = loss_fn(z1, z2, predictor(z1), predictor(z2))
    """

    def __init__(self, temperature: float = 0.1, queue_length: int = 98_304, feature_dim: int = 256) -> None:
        super().__init__()
        if temperature <= 0:
            raise MedclustError(f"NNCLRLoss: temperature must be positive, got {temperature}")
        if queue_length < 1 or feature_dim < 1:
            raise MedclustError(
                f"NNCLRLoss: queue_length and feature_dim must be positive, got {queue_length} and {feature_dim}"
            )
        self.temperature = float(temperature)
        self.queue_length = int(queue_length)
        self.feature_dim = int(feature_dim)
        self.register_buffer("queue", torch.zeros(self.queue_length, self.feature_dim))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_count", torch.zeros((), dtype=torch.long))

    @property
    def queue_full(self) -> bool:
        """True once the support set holds ``queue_length`` embeddings."""
        return int(self.queue_count) >= self.queue_length

    def support(self) -> torch.Tensor | None:
        """The support set in use: the queue once full, else None (the batch itself)."""
        return self.queue if self.queue_full else None

    @torch.no_grad()
    def reset_queue_(self) -> None:
        """Empty the support set."""
        self.queue.zero_()
        self.queue_ptr.zero_()
        self.queue_count.zero_()

    @torch.no_grad()
    def enqueue_(self, z: torch.Tensor) -> None:
        """Add a batch of projections (normalised, detached), overwriting the oldest ones."""
        if z.ndim != 2 or z.shape[1] != self.feature_dim:
            raise MedclustError(
                f"NNCLRLoss.enqueue_: expected (B, {self.feature_dim}) projections, got {tuple(z.shape)}"
            )
        z = F.normalize(z.detach().float(), dim=1)[-self.queue_length :].to(self.queue.device)
        rows = (int(self.queue_ptr) + torch.arange(z.shape[0], device=z.device)) % self.queue_length
        self.queue[rows] = z
        self.queue_ptr.fill_((int(self.queue_ptr) + z.shape[0]) % self.queue_length)
        self.queue_count.fill_(min(int(self.queue_count) + z.shape[0], self.queue_length))

    def forward(self, z1: torch.Tensor, z2: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
        """NNCLR loss of a two-view batch; in training mode, then enqueues ``z1``.

        Args:
            z1: (B, F) projections of view 1.
            z2: (B, F) projections of view 2.
            p1: (B, F) predictor outputs of view 1.
            p2: (B, F) predictor outputs of view 2.

        Returns:
            Scalar float32 loss.
        """
        if z1.ndim != 2 or z1.shape[1] != self.feature_dim:
            raise MedclustError(f"NNCLRLoss: expected (B, {self.feature_dim}) projections, got {tuple(z1.shape)}")
        loss = nnclr_loss(z1, z2, p1, p2, self.support(), self.temperature)
        if self.training:
            self.enqueue_(z1)
        return loss

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, queue_length={self.queue_length}, feature_dim={self.feature_dim}"
