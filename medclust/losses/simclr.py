"""SimCLR's NT-Xent contrastive loss (normalised temperature-scaled cross-entropy).

Reference: T. Chen, S. Kornblith, M. Norouzi, G. Hinton, "A Simple Framework for Contrastive
Learning of Visual Representations", ICML 2020, arXiv:2002.05709 (Algorithm 1, Eq. 1).

Defaults: temperature 0.1, the default of the authors' public code (google-research/simclr,
``tf2/run.py`` flag ``temperature``) and the best value of the paper's temperature ablation
for large batches; features are L2-normalised inside (the code's ``hidden_norm=True``).
The paper averages over the 2N anchors (Algorithm 1); the public code sums the two views'
means, which is the same loss times 2 — we follow the paper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medclust.errors import MedclustError

__all__ = ["NTXentLoss", "nt_xent_loss"]


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """NT-Xent over a two-view batch: a 2N-way softmax per anchor, the other view as positive.

    With ``u = normalize(cat(z1, z2))`` and ``s_ij = u_i . u_j / T``, the anchor ``i`` scores
    ``l_i = -log( exp(s_{i,p(i)}) / sum_{j != i} exp(s_ij) )`` where ``p(i)`` is the other view
    of the same item; its own similarity is left out of the denominator. The loss is the mean
    of ``l_i`` over the 2N anchors, so it is symmetric in the views and does not depend on the
    scale of the features.

    Args:
        z1: (N, F) features of view 1 (projection-head outputs), N >= 2.
        z2: (N, F) features of view 2, row ``b`` the same item as ``z1[b]``.
        temperature: softmax temperature (> 0).

    Returns:
        Scalar loss (float32).
    """
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise MedclustError(
            f"nt_xent_loss: expected two (N, F) views of the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    if z1.shape[0] < 2:
        raise MedclustError(f"nt_xent_loss: needs >= 2 items for negatives, got a batch of {z1.shape[0]}")
    if temperature <= 0:
        raise MedclustError(f"nt_xent_loss: temperature must be positive, got {temperature}")
    n = z1.shape[0]
    with torch.autocast(device_type=z1.device.type, enabled=False):
        u = F.normalize(torch.cat([z1, z2]).float(), dim=1)
        logits = u @ u.T / temperature
        # an item is trivially most similar to itself: drop s_ii from every denominator
        logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=u.device), float("-inf"))
        positives = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(u.device)
        return F.cross_entropy(logits, positives)


class NTXentLoss(nn.Module):
    """Module wrapper of :func:`nt_xent_loss` (stateless).

    Args:
        temperature: softmax temperature (SimCLR code default: 0.1).

    Example:
        >>> loss_fn = NTXentLoss()
        >>> loss = loss_fn(head(encoder(view1)), head(encoder(view2)))
    """

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        if temperature <= 0:
            raise MedclustError(f"NTXentLoss: temperature must be positive, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """Args: z1, z2 (N, F) the two views' features. Returns: scalar float32 loss."""
        return nt_xent_loss(z1, z2, self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
