"""Clustering metrics of embeddings and assignments against labels: NMI, ARI, Hungarian accuracy.

All three compare two partitions of the same items through their contingency table
(``scipy.stats.contingency.crosstab``), so labels may be any hashable ids (ints, strings) and
only the grouping matters, never the id values. Conventions (those of scikit-learn, which we do
not depend on):

- **NMI** is ``MI / mean(H(true), H(pred))`` (the arithmetic-mean normalisation). Degenerate
  cases: two identical trivial partitions (both a single cluster) score 1.0; when exactly one
  side is a single cluster the mutual information is 0 and NMI is 0.0 (a constant prediction
  carries no information about the labels).
- **ARI** is Hubert and Arabie's adjusted Rand index (expected value 0 for random partitions,
  1 for identical ones, can be negative). Its denominator vanishes only when both partitions
  are the same trivial one (all items in one cluster, or every item alone), which scores 1.0.
- **Hungarian accuracy** matches predicted clusters to classes one-to-one so that the number of
  items on matched pairs is maximal (``scipy.optimize.linear_sum_assignment``) and divides it by
  the number of items. With more clusters than classes, the items of unmatched clusters count
  as errors (a perfect score needs as many clusters as classes); with fewer, some classes stay
  unmatched.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from scipy.special import xlogy
from scipy.stats.contingency import crosstab

from medclust.errors import MedclustError
from medclust.losses.deepcluster import spherical_kmeans

__all__ = [
    "adjusted_rand_index",
    "clustering_scores",
    "hungarian_accuracy",
    "kmeans_labels",
    "normalized_mutual_info",
]

LabelsLike = Sequence | np.ndarray | torch.Tensor


def _as_labels(labels: LabelsLike, name: str) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise MedclustError(f"clustering metrics: {name} must be one label per item (1-D), got shape {arr.shape}")
    return arr


def _contingency(labels_true: LabelsLike, labels_pred: LabelsLike) -> np.ndarray:
    """(classes, clusters) counts of items per (true label, predicted cluster) pair."""
    t, p = _as_labels(labels_true, "labels_true"), _as_labels(labels_pred, "labels_pred")
    if t.shape != p.shape:
        raise MedclustError(f"clustering metrics: {t.shape[0]} true labels but {p.shape[0]} predicted labels")
    if t.shape[0] == 0:
        raise MedclustError("clustering metrics: no items to score")
    return crosstab(t, p).count.astype(np.float64)


def _entropy(counts: np.ndarray) -> float:
    p = counts / counts.sum()
    return float(-xlogy(p, p).sum())


def normalized_mutual_info(labels_true: LabelsLike, labels_pred: LabelsLike) -> float:
    """Normalised mutual information with the arithmetic-mean normalisation.

    Args:
        labels_true: (N,) class of each item.
        labels_pred: (N,) cluster of each item.

    Returns:
        NMI in [0, 1]; 1.0 for the same partition under any relabelling (see the module doc for
        single-cluster partitions).
    """
    c = _contingency(labels_true, labels_pred)
    if c.shape[0] == 1 and c.shape[1] == 1:
        return 1.0
    n = c.sum()
    rows, cols = c.sum(axis=1, keepdims=True), c.sum(axis=0, keepdims=True)
    nz = c > 0
    mi = float((c[nz] / n * np.log(c[nz] * n / (rows @ cols)[nz])).sum())
    # one side a single cluster: mi = 0 and the denominator > 0, so NMI = 0
    denom = 0.5 * (_entropy(rows.ravel()) + _entropy(cols.ravel()))
    return float(min(max(mi / denom, 0.0), 1.0))


def adjusted_rand_index(labels_true: LabelsLike, labels_pred: LabelsLike) -> float:
    """Adjusted Rand index (Hubert & Arabie, 1985) of two partitions.

    ``ARI = (I - E) / (M - E)`` with ``I = sum_ij C(n_ij, 2)``, ``a = sum_i C(a_i, 2)``,
    ``b = sum_j C(b_j, 2)``, ``E = a b / C(n, 2)`` and ``M = (a + b) / 2``.

    Args:
        labels_true: (N,) class of each item.
        labels_pred: (N,) cluster of each item.

    Returns:
        ARI in [-1, 1]; ~0 for independent partitions, 1.0 for identical ones.
    """
    c = _contingency(labels_true, labels_pred)
    n = c.sum()

    def pairs(x: np.ndarray) -> float:
        return float((x * (x - 1) / 2).sum())

    index, a, b = pairs(c), pairs(c.sum(axis=1)), pairs(c.sum(axis=0))
    total = n * (n - 1) / 2
    expected = a * b / total if total > 0 else 0.0
    maximum = (a + b) / 2
    if maximum == expected:  # only when both are the same trivial partition (see module doc)
        return 1.0
    return float((index - expected) / (maximum - expected))


def hungarian_accuracy(labels_true: LabelsLike, labels_pred: LabelsLike) -> float:
    """Accuracy under the best one-to-one matching of predicted clusters to classes.

    Args:
        labels_true: (N,) class of each item.
        labels_pred: (N,) cluster of each item; the number of clusters may differ from the
            number of classes (unmatched clusters count as errors).

    Returns:
        Fraction of items whose cluster is matched to their class, in [0, 1].
    """
    c = _contingency(labels_true, labels_pred)
    rows, cols = linear_sum_assignment(c, maximize=True)
    return float(c[rows, cols].sum() / c.sum())


def clustering_scores(labels_true: LabelsLike, labels_pred: LabelsLike) -> dict[str, float]:
    """NMI, ARI and Hungarian accuracy of one clustering.

    Returns:
        ``{"nmi": ..., "ari": ..., "accuracy": ...}``.
    """
    return {
        "nmi": normalized_mutual_info(labels_true, labels_pred),
        "ari": adjusted_rand_index(labels_true, labels_pred),
        "accuracy": hungarian_accuracy(labels_true, labels_pred),
    }


@torch.no_grad()
def kmeans_labels(
    embeddings: torch.Tensor, k: int, seed: int = 0, iterations: int = 30, restarts: int = 5
) -> np.ndarray:
    """Cluster ids of embeddings by spherical k-means (cosine) on the L2-normalised rows.

    Lloyd's algorithm can stop in a poor local optimum from an unlucky initial draw, which
    would make a metric of the embeddings depend on the draw; the best of ``restarts``
    draws (seeds ``seed, seed + 1, ...``) by the k-means objective (total cosine of every item
    to its centroid) is kept, so the result is a deterministic function of ``seed``.

    Args:
        embeddings: (N, D) embeddings.
        k: number of clusters.
        seed: seed of the first initial draw.
        iterations: Lloyd iterations per draw.
        restarts: initial draws tried.

    Returns:
        (N,) int64 cluster ids in ``[0, k)``.
    """
    if embeddings.ndim != 2 or embeddings.shape[0] == 0:
        raise MedclustError(f"kmeans_labels: expected embeddings (N, D), got {tuple(embeddings.shape)}")
    x = F.normalize(embeddings.detach().float().cpu(), dim=1)
    best, best_score = None, -float("inf")
    for r in range(max(int(restarts), 1)):
        centroids, assign = spherical_kmeans(x, k, iterations=iterations, seed=seed + r, distributed=False)
        score = float((x * centroids[assign]).sum())
        if score > best_score:
            best, best_score = assign, score
    return best.numpy().astype(np.int64)
