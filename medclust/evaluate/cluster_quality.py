"""Clustering quality of a pretrained encoder against labels that need no annotation.

For every free label of the learning monitor's probe set (:mod:`medclust.data.probe_set`:
dataset, modality, body region, z bin, structures present) this scores two partitions of the
items with the metrics the clustering papers report (NMI, ARI, Hungarian-matched accuracy;
:mod:`medclust.evaluate.clustering`):

- ``embedding``: spherical k-means of the encoder's features with k = the label's classes;
- ``assignments``: the method's own clusters (argmax of its prototype scores), where it has a
  cluster head.

The multi-label ``structures`` target becomes one categorical label, the set of structures a
slice shows (e.g. ``heart+lung``), so that a partition can be scored against it. Items where a
label does not apply (a radiograph's z bin, a dataset without masks) are left out of that label's
scores, and the counts say how many were used.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from medclust.evaluate.clustering import clustering_scores, kmeans_labels
from medclust.evaluate.probes import ProbeTarget

__all__ = ["categorical_values", "cluster_quality", "probe_scores"]


def categorical_values(target: ProbeTarget) -> np.ndarray:
    """(N,) class names of a probe target; ``""`` where it does not apply.

    A multi-label target's class is the ``+``-joined set of its positive columns among those that
    apply to the item (columns are NaN where they do not: another dataset's structures), ``none``
    for a slice that shows none of them; an item to which no column applies gets ``""``.
    """
    if not target.multilabel:
        return np.asarray(target.values).astype(str)
    values = np.asarray(target.values, dtype=float)
    out = np.full(values.shape[0], "", dtype=object)
    for i, row in enumerate(values):
        applies = ~np.isnan(row)
        if not applies.any():
            continue
        present = [c for c, v, a in zip(target.columns or [], row, applies) if a and v > 0.5]
        out[i] = "+".join(present) or "none"
    return out.astype(str)


def _scores(labels: np.ndarray, partition: np.ndarray) -> dict[str, float | None]:
    scores = clustering_scores(labels, partition)
    return {k: (float(v) if np.isfinite(v) else None) for k, v in scores.items()}


def cluster_quality(
    features: torch.Tensor,
    targets: Sequence[ProbeTarget],
    assignments: np.ndarray | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """NMI / ARI / Hungarian accuracy of the embedding's k-means and of the own assignments, per label.

    Args:
        features: (N, F) features of the probe items.
        targets: the probe set's labels.
        assignments: (N,) the method's own cluster of each item, or None (no cluster head).
        seed: k-means seed.

    Returns:
        ``{label: {"items", "classes", "embedding": {"k", "nmi", "ari", "accuracy"},
        "assignments": {"clusters", "nmi", "ari", "accuracy"} | None}}``; a label with fewer than
        two classes among its items is reported with null scores.
    """
    out: dict[str, Any] = {}
    for target in targets:
        values = categorical_values(target)
        keep = values != ""
        labels = values[keep]
        classes = len(set(labels.tolist()))
        entry: dict[str, Any] = {"items": int(keep.sum()), "classes": classes, "embedding": None, "assignments": None}
        if classes >= 2:
            k_means = kmeans_labels(features[torch.from_numpy(keep)], classes, seed=seed)
            entry["embedding"] = {"k": classes, **_scores(labels, k_means)}
            if assignments is not None:
                own = np.asarray(assignments)[keep]
                entry["assignments"] = {"clusters": int(len(set(own.tolist()))), **_scores(labels, own)}
        out[target.name] = entry
    return out


def probe_scores(summary: Mapping[str, Any] | None) -> dict[str, Any]:
    """The kNN / linear probe scores (and random-init ones) of a monitor summary, per label."""
    if not summary:
        return {}
    keys = ("knn", "linear", "random_knn", "random_linear")
    return {label: {k: entry.get(k) for k in keys} for label, entry in summary.get("labels", {}).items()}
