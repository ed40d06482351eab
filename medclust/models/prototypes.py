"""Cluster prototypes: a bias-free linear layer whose rows live on the unit sphere."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from medclust.errors import MedclustError

__all__ = ["Prototypes", "iter_prototypes", "normalize_prototypes_", "set_prototypes_frozen", "cancel_prototype_gradients_"]


class Prototypes(nn.Module):
    """K learnable prototypes; ``forward`` returns cosine scores of L2-normalised features.

    Freezing (SwAV freezes prototypes for the first steps so that codes do not collapse onto a
    few randomly good prototypes) is done in the forward pass: while frozen the scores use a
    detached weight, so the weight gets no gradient at all (``grad is None`` after backward, after
    the trainer's all-reduce — a parameter without a gradient on every rank keeps ``None`` — and
    after clipping, which it does not enter). The optimiser then skips the rows entirely, as
    SwAV's ``p.grad = None`` does: AdamW's step count and moments stay untouched. A zero gradient
    instead would advance the step count with empty moments, and the bias correction would make
    the first updates after unfreezing several times too large.

    Args:
        dim: feature dimension.
        k: number of prototypes.

    Example:
        >>> protos = Prototypes(128, 300)
        >>> protos(F.normalize(torch.randn(8, 128), dim=1)).shape
        torch.Size([8, 300])
    """

    def __init__(self, dim: int, k: int) -> None:
        super().__init__()
        if dim < 1 or k < 1:
            raise MedclustError(f"Prototypes: dim and k must be positive, got dim={dim}, k={k}")
        self.dim = int(dim)
        self.k = int(k)
        self.layer = nn.Linear(self.dim, self.k, bias=False)
        self.frozen = False
        self.normalize_()

    @property
    def weight(self) -> torch.Tensor:
        """(k, dim) prototype matrix."""
        return self.layer.weight

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Scores of features against every prototype.

        Args:
            features: (N, dim), expected L2-normalised (then scores are cosines in [-1, 1]).

        Returns:
            (N, k) scores; divide by a temperature in the loss.
        """
        w = self.layer.weight
        if self.frozen:
            w = w.detach()  # no gradient at all, not a zero one: see the class docstring
        return F.linear(features, w)

    @torch.no_grad()
    def normalize_(self) -> None:
        """Re-project every prototype onto the unit sphere (call after each optimiser step)."""
        w = self.layer.weight
        w.copy_(F.normalize(w.float(), dim=1).to(w.dtype))

    def set_frozen(self, frozen: bool) -> None:
        """Freeze (no gradient) or unfreeze the prototypes for the next forward passes."""
        self.frozen = bool(frozen)

    def cancel_gradients_(self) -> None:
        """Drop the accumulated gradient (``grad = None``), for trainers with a pre-step hook.

        With ``grad = None`` optimisers skip the parameter entirely (no weight decay, no momentum).
        """
        self.layer.weight.grad = None

    @torch.no_grad()
    def load_centroids_(self, centroids: torch.Tensor) -> None:
        """Set the prototypes to (normalised) k-means centroids, as DeepCluster-v2 does each epoch.

        Args:
            centroids: (k, dim).
        """
        if tuple(centroids.shape) != (self.k, self.dim):
            raise MedclustError(
                f"Prototypes.load_centroids_: expected centroids of shape {(self.k, self.dim)}, got {tuple(centroids.shape)}"
            )
        w = self.layer.weight
        w.copy_(F.normalize(centroids.float(), dim=1).to(device=w.device, dtype=w.dtype))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, k={self.k}, frozen={self.frozen}"


def iter_prototypes(model: nn.Module) -> Iterator[Prototypes]:
    """Every :class:`Prototypes` module inside ``model`` (DDP/compile wrappers included)."""
    for m in model.modules():
        if isinstance(m, Prototypes):
            yield m


def normalize_prototypes_(model: nn.Module) -> None:
    """Re-normalise every prototype set in ``model`` (call in ``after_optimizer_step``)."""
    for p in iter_prototypes(model):
        p.normalize_()


def set_prototypes_frozen(model: nn.Module, step: int, freeze_steps: int) -> bool:
    """Freeze all prototype sets in ``model`` while ``step < freeze_steps``.

    Call at the top of ``training_step`` (before the forward pass).

    Args:
        model: a module containing :class:`Prototypes`.
        step: the current optimiser step (0-based).
        freeze_steps: number of initial steps during which prototypes get no gradient.

    Returns:
        True when the prototypes are frozen for this step.
    """
    frozen = step < freeze_steps
    for p in iter_prototypes(model):
        p.set_frozen(frozen)
    return frozen


def cancel_prototype_gradients_(model: nn.Module, step: int, freeze_steps: int) -> bool:
    """SwAV's original mechanism: set prototype grads to None while ``step < freeze_steps``.

    Only for trainers that can run code between ``backward()`` and ``optimizer.step()``;
    otherwise use :func:`set_prototypes_frozen`.

    Returns:
        True when the gradients were cancelled.
    """
    if step >= freeze_steps:
        return False
    for p in iter_prototypes(model):
        p.cancel_gradients_()
    return True
