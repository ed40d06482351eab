"""Clustering metrics (NMI, ARI, Hungarian accuracy) and k-means labels: known answers and edge cases."""

import math

import numpy as np
import pytest
import torch

from medclust.errors import MedclustError
from medclust.evaluate.clustering import (
    adjusted_rand_index,
    clustering_scores,
    hungarian_accuracy,
    kmeans_labels,
    normalized_mutual_info,
)


def test_permuted_perfect_clustering_scores_one():
    true = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2])
    pred = np.array([5, 5, 3, 3, 3, 9, 9, 9, 9])  # same partition, other ids
    assert clustering_scores(true, pred) == {"nmi": 1.0, "ari": 1.0, "accuracy": 1.0}
    # string ids and torch tensors are labels too
    assert normalized_mutual_info(["a", "a", "b"], torch.tensor([1, 1, 0])) == pytest.approx(1.0)


def test_hand_computed_nmi_and_ari():
    true = [0, 0, 0, 1, 1, 1]
    pred = [0, 0, 1, 1, 2, 2]
    # contingency rows (true) x cols (pred): [[2, 1, 0], [0, 1, 2]], n = 6.
    # NMI: p(true) = (1/2, 1/2), p(pred) = (1/3, 1/3, 1/3).
    #   MI = 2 * (2/6) * log((2/6) / (1/2 * 1/3)) + 2 * (1/6) * log((1/6) / (1/6)) = (2/3) log 2
    #   H(true) = log 2, H(pred) = log 3, NMI = MI / ((log 2 + log 3) / 2) = (4/3) log 2 / log 6
    expect_nmi = (4 / 3) * math.log(2) / math.log(6)  # 0.5158...
    # ARI: I = C(2,2) + C(2,2) = 2, a = 2 C(3,2) = 6, b = 3 C(2,2) = 3, C(6,2) = 15,
    #   E = a b / 15 = 1.2, M = (a + b) / 2 = 4.5, ARI = (2 - 1.2) / (4.5 - 1.2) = 0.8 / 3.3
    expect_ari = 0.8 / 3.3  # 0.2424...
    assert normalized_mutual_info(true, pred) == pytest.approx(expect_nmi, abs=1e-12)
    assert adjusted_rand_index(true, pred) == pytest.approx(expect_ari, abs=1e-12)
    # NMI and ARI are symmetric in their arguments
    assert normalized_mutual_info(pred, true) == pytest.approx(expect_nmi, abs=1e-12)
    assert adjusted_rand_index(pred, true) == pytest.approx(expect_ari, abs=1e-12)
    # Hungarian: match pred 0 -> class 0 (2 items), pred 2 -> class 1 (2 items): 4 / 6
    assert hungarian_accuracy(true, pred) == pytest.approx(4 / 6)


def test_random_labels_score_near_zero():
    rng = np.random.default_rng(0)
    true, pred = rng.integers(0, 3, 3000), rng.integers(0, 3, 3000)
    assert abs(normalized_mutual_info(true, pred)) < 0.02
    assert abs(adjusted_rand_index(true, pred)) < 0.02
    assert abs(hungarian_accuracy(true, pred) - 1 / 3) < 0.05


def test_hungarian_with_more_or_fewer_clusters_than_classes():
    true = [0, 0, 0, 0, 1, 1, 1, 1]
    # 3 clusters for 2 classes: class 0 is split in two, only one half can be matched
    more = [0, 0, 1, 1, 2, 2, 2, 2]
    assert hungarian_accuracy(true, more) == pytest.approx(6 / 8)
    # over-segmentation is not the same partition
    assert normalized_mutual_info(true, more) < 1.0
    # 1 cluster for 2 classes: one class matched
    assert hungarian_accuracy(true, [7] * 8) == pytest.approx(0.5)
    # the matching is one-to-one: two clusters cannot both map to class 1
    assert hungarian_accuracy([0, 1, 1, 1], [0, 1, 1, 2]) == pytest.approx(3 / 4)
    assert hungarian_accuracy([0, 1, 1, 1], [1, 0, 0, 2]) == pytest.approx(3 / 4)


def test_degenerate_partitions():
    # both a single cluster: the same partition
    assert normalized_mutual_info([0, 0, 0], [4, 4, 4]) == 1.0
    assert adjusted_rand_index([0, 0, 0], [4, 4, 4]) == 1.0
    # a constant prediction of non-constant labels carries no information
    assert normalized_mutual_info([0, 0, 1, 1], [0, 0, 0, 0]) == 0.0
    assert adjusted_rand_index([0, 0, 1, 1], [0, 0, 0, 0]) == 0.0
    # every item alone on both sides: identical partitions
    assert adjusted_rand_index([0, 1, 2, 3], [3, 2, 1, 0]) == 1.0
    assert normalized_mutual_info([0, 1, 2, 3], [3, 2, 1, 0]) == pytest.approx(1.0)
    assert clustering_scores([1], [0]) == {"nmi": 1.0, "ari": 1.0, "accuracy": 1.0}


def test_bad_inputs_raise_one_line_errors():
    with pytest.raises(MedclustError, match="3 true labels but 2 predicted"):
        clustering_scores([0, 1, 1], [0, 1])
    with pytest.raises(MedclustError, match="no items"):
        normalized_mutual_info([], [])
    with pytest.raises(MedclustError, match="1-D"):
        adjusted_rand_index(np.zeros((2, 2)), np.zeros((2, 2)))


def test_kmeans_labels_recovers_directions_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(3, 8) * 5
    labels = np.repeat(np.arange(3), 20)
    x = centres[labels] + 0.3 * torch.randn(60, 8, generator=g)
    # scale per row: spherical k-means looks at directions only
    x = x * torch.rand(60, 1, generator=g).add(0.5) * 10
    pred = kmeans_labels(x, 3, seed=0)
    assert pred.shape == (60,) and pred.dtype == np.int64 and set(pred.tolist()) <= {0, 1, 2}
    assert clustering_scores(labels, pred)["nmi"] == pytest.approx(1.0)
    np.testing.assert_array_equal(kmeans_labels(x, 3, seed=0), pred)
    # scale-free: only directions count, also in choosing the best restart (structureless data,
    # where restarts end in different optima; norms spread over four orders of magnitude)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, 4, generator=g)
    scales = torch.rand(60, 1, generator=g).pow(4) * 100 + 0.01
    assert normalized_mutual_info(kmeans_labels(x, 4), kmeans_labels(x * scales, 4)) == pytest.approx(1.0)
    with pytest.raises(MedclustError, match="embeddings"):
        kmeans_labels(torch.zeros(5), 2)
