"""Masked slice-embedding prediction (the 3D branch's masked objective).

Unlike the paper's public code, the loss is averaged over the masked positions only and the
targets are the stop-gradient slice embeddings themselves (no random, untrained projection).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medclust.errors import MedclustError

__all__ = ["MaskedEmbeddingLoss", "masked_embedding_loss"]

_KINDS = ("cosine", "mse")


def masked_embedding_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, kind: str = "cosine"
) -> torch.Tensor:
    """Distance between predicted and (stop-gradient) target embeddings at masked positions.

    Only masked positions are selected before any arithmetic, so unmasked predictions get an
    exactly zero gradient and cannot affect the value (not even when they are inf/NaN).

    Args:
        pred: (B, S, D) predictions.
        target: (B, S, D) targets; detached here.
        mask: (B, S) bool, True = masked (scored) position; must exclude padding.
        kind: ``"cosine"`` (1 - cosine similarity) or ``"mse"`` (squared distance of the
            L2-normalised vectors, = 2 - 2 cos; scale-free like cosine).

    Returns:
        Scalar float32 mean over masked positions; 0 (with a zero gradient) when none is masked.
    """
    if kind not in _KINDS:
        raise MedclustError(f"masked_embedding_loss: kind must be one of {_KINDS}, got {kind!r}")
    if pred.shape != target.shape or tuple(mask.shape) != tuple(pred.shape[:-1]):
        raise MedclustError(
            f"masked_embedding_loss: shapes pred {tuple(pred.shape)}, target {tuple(target.shape)}, "
            f"mask {tuple(mask.shape)} do not match (B, S, D) / (B, S)"
        )
    mask = mask.bool()
    p = pred[mask].float()
    if p.shape[0] == 0:
        return p.sum()  # 0.0, still attached to the graph, no NaN from 0/0
    t = target.detach()[mask].float()
    p, t = F.normalize(p, dim=-1), F.normalize(t, dim=-1)
    if kind == "cosine":
        per = 1.0 - (p * t).sum(-1)
    else:
        per = (p - t).pow(2).sum(-1)
    return per.mean()


class MaskedEmbeddingLoss(nn.Module):
    """Module wrapper of :func:`masked_embedding_loss`.

    Args:
        kind: ``"cosine"`` or ``"mse"``.
    """

    def __init__(self, kind: str = "cosine") -> None:
        super().__init__()
        if kind not in _KINDS:
            raise MedclustError(f"MaskedEmbeddingLoss: kind must be one of {_KINDS}, got {kind!r}")
        self.kind = kind

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Args: pred, target (B, S, D); mask (B, S) bool. Returns: scalar loss."""
        return masked_embedding_loss(pred, target, mask, self.kind)
