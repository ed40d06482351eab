"""DeepCluster-v2: spherical k-means on a memory bank of embeddings, then cross-entropy to the clusters.

Typical use (per epoch): during epoch e, ``bank.add(z.detach(), item_indices)`` every step;
at the start of epoch e+1, ``centroids, assign = bank.cluster(k, num_items=len(dataset))``,
``model.prototypes_2d.load_centroids_(centroids)``, and each step's loss is
``deepcluster_loss(model.prototypes_2d(z), assign[item_indices], temperature)``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from medclust.errors import MedclustError
from medclust.losses.sinkhorn import is_distributed

__all__ = ["DeepClusterLoss", "MemoryBank", "deepcluster_loss", "spherical_kmeans"]


def _assign(features: torch.Tensor, centroids: torch.Tensor, chunk: int) -> torch.Tensor:
    """Nearest centroid by cosine, chunked so (N, k) is never materialised at once."""
    out = torch.empty(features.shape[0], dtype=torch.long, device=features.device)
    for start in range(0, features.shape[0], chunk):
        out[start : start + chunk] = (features[start : start + chunk] @ centroids.T).argmax(dim=1)
    return out


@torch.no_grad()
def spherical_kmeans(
    features: torch.Tensor,
    k: int,
    iterations: int = 10,
    seed: int = 0,
    init: torch.Tensor | None = None,
    distributed: bool | None = None,
    chunk_size: int = 16384,
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means on the unit sphere (cosine similarity), as DeepCluster-v2 runs it.

    Under ``torch.distributed`` every rank passes its own features; the initial centroids
    are drawn on rank 0 and broadcast, and centroid sums and counts are all-reduced, so all
    ranks end with the same centroids. Empty clusters keep their previous centroid.

    Args:
        features: (N, D) local features (normalised here), N >= 1.
        k: number of clusters.
        iterations: Lloyd iterations.
        seed: seed of the initial draw (deterministic, independent of the global RNG).
        init: optional (k, D) initial centroids (then ``seed`` is unused).
        distributed: all-reduce across ranks; None = when a process group is initialised.
        chunk_size: rows scored at once.

    Returns:
        ``(centroids (k, D) unit norm, assignments (N,) long)`` for the local features,
        assignments computed with the final centroids.
    """
    if features.ndim != 2 or features.shape[0] == 0:
        raise MedclustError(f"spherical_kmeans: expected non-empty features (N, D), got {tuple(features.shape)}")
    if k < 1:
        raise MedclustError(f"spherical_kmeans: k must be positive, got {k}")
    distributed = is_distributed() if distributed is None else distributed
    with torch.autocast(device_type=features.device.type, enabled=False):
        x = F.normalize(features.float(), dim=1)
        n, d = x.shape
        if init is not None:
            if tuple(init.shape) != (k, d):
                raise MedclustError(f"spherical_kmeans: init must be ({k}, {d}), got {tuple(init.shape)}")
            centroids = F.normalize(init.float().to(x.device), dim=1)
        else:
            g = torch.Generator(device="cpu").manual_seed(int(seed))
            # with fewer points than clusters, repeat points; duplicates end up as empty clusters
            idx = torch.randperm(n, generator=g)[:k] if n >= k else torch.randint(n, (k,), generator=g)
            centroids = x[idx.to(x.device)].clone()
        if distributed:
            dist.broadcast(centroids, src=0)
        for _ in range(iterations):
            assign = _assign(x, centroids, chunk_size)
            sums = torch.zeros(k, d, device=x.device).index_add_(0, assign, x)
            counts = torch.bincount(assign, minlength=k).float()
            if distributed:
                dist.all_reduce(sums)
                dist.all_reduce(counts)
            nonempty = counts > 0
            centroids = torch.where(nonempty[:, None], F.normalize(sums, dim=1), centroids)
        return centroids, _assign(x, centroids, chunk_size)


class MemoryBank(nn.Module):
    """Ring buffer of recent embeddings with the dataset index of each (state_dict-able).

    Args:
        size: rows kept (per rank); ~ the number of items a rank sees per epoch.
        dim: embedding size.

    Attributes:
        embeddings: (size, dim) float32 buffer.
        indices: (size,) long dataset indices, -1 = empty row.
        ptr: () long, next row to write.
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 1 or dim < 1:
            raise MedclustError(f"MemoryBank: size and dim must be positive, got size={size}, dim={dim}")
        self.size, self.dim = int(size), int(dim)
        self.register_buffer("embeddings", torch.zeros(self.size, self.dim))
        self.register_buffer("indices", torch.full((self.size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def reset_(self) -> None:
        """Empty the bank."""
        self.embeddings.zero_()
        self.indices.fill_(-1)
        self.ptr.zero_()

    @torch.no_grad()
    def add(self, embeddings: torch.Tensor, indices: torch.Tensor) -> None:
        """Store a batch (detached, float32), overwriting the oldest rows.

        Args:
            embeddings: (B, dim).
            indices: (B,) dataset index of each item.
        """
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dim or indices.shape != embeddings.shape[:1]:
            raise MedclustError(
                f"MemoryBank.add: expected embeddings (B, {self.dim}) and indices (B,), got "
                f"{tuple(embeddings.shape)} and {tuple(indices.shape)}"
            )
        e = embeddings.detach().float()[-self.size :].to(self.embeddings.device)
        i = indices.detach().long()[-self.size :].to(self.indices.device)
        rows = (int(self.ptr) + torch.arange(e.shape[0], device=e.device)) % self.size
        self.embeddings[rows] = e
        self.indices[rows] = i
        self.ptr.fill_((int(self.ptr) + e.shape[0]) % self.size)

    def filled(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored rows: ``(embeddings (M, dim), indices (M,))``."""
        keep = self.indices >= 0
        return self.embeddings[keep], self.indices[keep]

    @torch.no_grad()
    def cluster(
        self,
        k: int,
        num_items: int,
        iterations: int = 10,
        seed: int = 0,
        distributed: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Spherical k-means on the bank; assignments laid out by dataset index.

        Under ``torch.distributed`` the assignment table is combined over ranks (each rank
        knows the items it saw), so every rank gets the full table.

        Args:
            k: number of clusters.
            num_items: dataset size (length of the assignment table).
            iterations: k-means iterations.
            seed: k-means initialisation seed (vary per epoch).
            distributed: see :func:`spherical_kmeans`.

        Returns:
            ``(centroids (k, dim), assignments (num_items,) long)``; -1 for items not in any bank.
        """
        distributed = is_distributed() if distributed is None else distributed
        feats, idx = self.filled()
        if feats.shape[0] == 0:
            raise MedclustError("MemoryBank.cluster: the memory bank is empty; add embeddings during the epoch first")
        if int(idx.max()) >= num_items:
            raise MedclustError(f"MemoryBank.cluster: item index {int(idx.max())} >= num_items={num_items}")
        centroids, assign = spherical_kmeans(feats, k, iterations, seed, distributed=distributed)
        table = torch.full((num_items,), -1, dtype=torch.long, device=feats.device)
        table[idx] = assign
        if distributed:
            dist.all_reduce(table, op=dist.ReduceOp.MAX)
        return centroids, table


def deepcluster_loss(scores: torch.Tensor, assignments: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Cross-entropy of prototype scores against k-means cluster assignments.

    Args:
        scores: (B, K) prototype scores (cosines).
        assignments: (B,) long cluster ids; -1 = no assignment yet (ignored).
        temperature: softmax temperature.

    Returns:
        Scalar loss; 0 (attached to the graph) when no item has an assignment.
    """
    if temperature <= 0:
        raise MedclustError(f"deepcluster_loss: temperature must be positive, got {temperature}")
    keep = assignments >= 0
    s = scores[keep].float() / temperature
    if s.shape[0] == 0:
        return s.sum()
    return F.cross_entropy(s, assignments[keep].long())


class DeepClusterLoss(nn.Module):
    """Module wrapper of :func:`deepcluster_loss`.

    Args:
        temperature: softmax temperature (DeepCluster-v2: 0.1).
    """

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        self.temperature = float(temperature)

    def forward(self, scores: torch.Tensor, assignments: torch.Tensor) -> torch.Tensor:
        """Args: scores (B, K); assignments (B,) long. Returns: scalar loss."""
        return deepcluster_loss(scores, assignments, self.temperature)
