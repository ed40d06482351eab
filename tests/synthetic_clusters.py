"""Synthetic clustered data, two-view augmentation, a tiny encoder and a training loop for objective tests.

Not a test module: objective tests import it (``from synthetic_clusters import ...``).

The data are meant to make "the objective learned the clusters" a claim that can fail: the
clusters differ only in the first ``informative`` dimensions, and the remaining dimensions are
high-variance noise (nuisance) that the augmentation re-draws largely independently in each view.
An untrained encoder sees mostly nuisance, so k-means on its embeddings scores a low NMI; an
objective that makes the two views agree has to learn to ignore the nuisance dimensions, which
is what exposes the clusters. Typical use::

    x, labels = make_clusters()
    enc, loss_fn = TinyEncoder(x.shape[1], 16), NTXentLoss()
    before = embedding_nmi(enc, x, labels)
    train_objective(lambda x1, x2, x: loss_fn(enc(x1), enc(x2)), enc.parameters(), x)
    assert embedding_nmi(enc, x, labels) > 0.8 > before
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

from medclust.evaluate.clustering import kmeans_labels, normalized_mutual_info

INFORMATIVE = 2  # dimensions that carry the cluster identity (the first ones)
# spread of each other dimension (cluster centres are 3 apart): 14 such dims swamp the 2 informative ones
NUISANCE_STD = 1.5


def make_clusters(
    n_per_cluster: int = 64,
    clusters: int = 3,
    dim: int = 16,
    seed: int = 0,
    informative: int = INFORMATIVE,
    spread: float = 0.4,
    nuisance_std: float = NUISANCE_STD,
) -> tuple[torch.Tensor, np.ndarray]:
    """Gaussian clusters separated in a few dimensions, buried in high-variance nuisance dimensions.

    Cluster centres sit evenly on a circle of radius ``sqrt(3)`` in the first two informative
    dimensions (3 apart for 3 clusters; further informative dimensions get random centre offsets
    of the same size), items scatter around them with std ``spread``; all other dimensions are
    N(0, nuisance_std^2), independent of the cluster.

    Args:
        n_per_cluster: items per cluster.
        clusters: number of clusters.
        dim: feature dimension (> informative).
        seed: seed of the draw.
        informative: dimensions that carry the cluster identity.
        spread: within-cluster std in the informative dimensions.
        nuisance_std: std of the nuisance dimensions.

    Returns:
        ``(x (N, dim) float32, labels (N,) int64)`` with ``N = n_per_cluster * clusters``, items
        ordered by cluster.
    """
    if not 2 <= informative < dim:
        raise ValueError(f"need 2 <= informative < dim, got informative={informative}, dim={dim}")
    g = torch.Generator().manual_seed(seed)
    angles = torch.arange(clusters, dtype=torch.float32) * (2 * math.pi / clusters)
    centres = torch.zeros(clusters, informative)
    centres[:, 0], centres[:, 1] = torch.cos(angles), torch.sin(angles)
    if informative > 2:
        centres[:, 2:] = torch.randn(clusters, informative - 2, generator=g) / math.sqrt(informative - 2)
    centres *= math.sqrt(3.0)
    labels = np.repeat(np.arange(clusters), n_per_cluster).astype(np.int64)
    x = torch.empty(len(labels), dim)
    x[:, :informative] = centres[torch.from_numpy(labels)] + spread * torch.randn(len(labels), informative, generator=g)
    x[:, informative:] = nuisance_std * torch.randn(len(labels), dim - informative, generator=g)
    return x, labels


def two_views(
    x: torch.Tensor,
    noise: float = 0.1,
    generator: torch.Generator | None = None,
    informative: int = INFORMATIVE,
    nuisance_noise: float = NUISANCE_STD,
    scale: float = 0.2,
    dropout: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independently augmented views of a batch.

    Each view: Gaussian noise of std ``noise`` on every feature plus std ``nuisance_noise`` on
    the nuisance features (the analogue of intensity/contrast augmentation of an image: the
    nuisance is what the views must learn to disagree on), a random per-feature scaling in
    ``[1 - scale, 1 + scale]``, and feature dropout with probability ``dropout``.

    Args:
        x: (N, D) clean items.
        noise: additive noise std on every feature.
        generator: random source (None = the global one).
        informative: leading features left without nuisance noise.
        nuisance_noise: additive noise std on the other features.
        scale: half-width of the random per-feature scaling.
        dropout: probability that a feature is zeroed in a view.

    Returns:
        ``(x1, x2)``, each (N, D).
    """

    def view() -> torch.Tensor:
        sd = torch.full((x.shape[1],), float(noise))
        sd[informative:] = math.hypot(noise, nuisance_noise)
        v = x + sd * torch.randn(x.shape, generator=generator)
        v = v * (1 + scale * (2 * torch.rand(x.shape, generator=generator) - 1))
        return v * (torch.rand(x.shape, generator=generator) >= dropout)

    return view(), view()


class TinyEncoder(nn.Sequential):
    """A two-layer MLP ``Linear -> ReLU -> Linear`` with a deterministic initialisation.

    Args:
        dim: input features.
        out: output features.
        hidden: hidden width.
        seed: seed of the initial weights (independent of the global RNG).
    """

    def __init__(self, dim: int, out: int, hidden: int = 64, seed: int = 0) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            super().__init__(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, out))


def train_objective(
    step_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    params: Iterable[torch.Tensor],
    x: torch.Tensor,
    steps: int = 30,
    lr: float = 1e-2,
    seed: int = 0,
    **view_kwargs,
) -> list[float]:
    """Adam on ``step_fn(x1, x2, x)`` for ``steps`` full-batch steps with fresh views each step.

    Args:
        step_fn: maps the two augmented views and the clean batch to a scalar loss (the clean
            batch is there for objectives that also need the raw inputs).
        params: parameters to optimise (encoder, heads, prototypes, ...).
        x: (N, D) the clean items.
        steps: optimisation steps.
        lr: Adam learning rate.
        seed: seed of the augmentation draws (and of the global RNG, for objectives that
            sample internally).
        **view_kwargs: passed to :func:`two_views`.

    Returns:
        The loss of every step.
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(list(params), lr=lr)
    losses = []
    for _ in range(steps):
        x1, x2 = two_views(x, generator=g, **view_kwargs)
        loss = step_fn(x1, x2, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def embedding_nmi(encoder: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, labels: np.ndarray) -> float:
    """NMI of spherical k-means (k = number of classes) on ``encoder(x)`` against the labels."""
    was_training = getattr(encoder, "training", False)
    if isinstance(encoder, nn.Module):
        encoder.eval()
    z = encoder(x)
    if isinstance(encoder, nn.Module):
        encoder.train(was_training)
    return normalized_mutual_info(labels, kmeans_labels(z, len(np.unique(labels)), seed=0))
