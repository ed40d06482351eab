"""Dimensional collapse of an embedding: how many directions its items actually spread along.

A self-supervised objective can be satisfied by a few coarse cues (which dataset an image comes
from, how much of the view the body fills) while every other direction of the feature space
shrinks. kNN and linear probes then fall below a random initialisation even though the loss
falls: the encoder has not stopped learning, it has collapsed. :func:`effective_rank` is RankMe
(Garrido et al., "RankMe: Assessing the downstream performance of pretrained self-supervised
representations by their rank", ICML 2023): ``exp`` of the entropy of the normalised singular
values, between 1 (every item on one line) and ``min(N, D)``.

:func:`dataset_ranks` measures it *within* each dataset, around the dataset's mean: across
datasets one direction (the dataset) always dominates and says nothing about whether the slices
of one volume are told apart.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["dataset_ranks", "effective_rank"]

#: RankMe's epsilon: keeps log(0) out of the entropy
_EPS = 1e-7


def effective_rank(features: torch.Tensor | np.ndarray, center: bool = True) -> float:
    """RankMe effective rank of ``(N, D)`` features (float64 SVD).

    Args:
        features: one row per item.
        center: subtract the mean row first (the spread of the items, not their offset).

    Returns:
        ``exp(-sum p_k log p_k)`` with ``p_k = s_k / sum(s) + eps`` over the singular values
        ``s_k``; NaN for fewer than 2 items or features that do not vary.
    """
    x = torch.as_tensor(features).detach().to("cpu", torch.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        return float("nan")
    if center:
        x = x - x.mean(dim=0, keepdim=True)
    s = torch.linalg.svdvals(x)
    total = float(s.sum())
    if not np.isfinite(total) or total <= 0.0:
        return float("nan")
    p = s / total + _EPS
    return float(torch.exp(-(p * torch.log(p)).sum()))


def dataset_ranks(
    features: torch.Tensor | np.ndarray, dataset: Sequence[str] | np.ndarray, min_items: int = 8
) -> dict[str, float]:
    """Effective rank of each dataset's items, centred on the dataset's mean.

    Args:
        features: ``(N, D)`` features.
        dataset: ``(N,)`` dataset name of each item.
        min_items: datasets with fewer items are left out (a rank of 3 points says little).

    Returns:
        Dataset name -> effective rank, in sorted name order.
    """
    names = np.asarray(dataset)
    x = torch.as_tensor(features)
    out = {}
    for name in sorted(set(names.tolist())):
        rows = np.flatnonzero(names == name)
        if rows.size >= min_items:
            out[str(name)] = effective_rank(x[torch.from_numpy(rows)])
    return out
