"""Effective rank (RankMe) of embeddings: known answers, invariances, per-dataset centring."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medclust.evaluate.collapse import dataset_ranks, effective_rank


def test_known_ranks() -> None:
    g = torch.Generator().manual_seed(0)
    # items spread along exactly k orthogonal directions with equal singular values: rank k
    for k in (1, 3, 7):
        basis = torch.linalg.qr(torch.randn(32, k, generator=g))[0]  # (32, k) orthonormal columns
        signs = torch.linalg.qr(torch.randn(40, k, generator=g))[0]  # (40, k) orthonormal columns
        x = signs @ basis.T * 5.0  # singular values all 5
        assert effective_rank(x, center=False) == pytest.approx(k, rel=1e-4)
    # unequal spread: exp(entropy) of the normalised singular values
    x = torch.diag(torch.tensor([3.0, 1.0, 0.0]))
    p = np.array([0.75, 0.25])
    assert effective_rank(x, center=False) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-5)


def test_invariances_and_degenerate_input() -> None:
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(1))
    r = effective_rank(x)
    assert 1.0 < r <= 16
    assert effective_rank(x * 7.0) == pytest.approx(r, rel=1e-6)  # scale
    assert effective_rank(x[torch.randperm(50)]) == pytest.approx(r, rel=1e-6)  # item order
    assert effective_rank(x + 100.0) == pytest.approx(r, rel=1e-6)  # centred: an offset is not spread
    assert effective_rank(x + 100.0, center=False) < 1.5  # uncentred, the offset dominates
    assert math.isnan(effective_rank(x[:1])) and math.isnan(effective_rank(torch.ones(5, 3)))


def test_dataset_ranks_measure_the_spread_within_each_dataset() -> None:
    g = torch.Generator().manual_seed(2)
    # dataset a: 20 items spread in 8 dimensions; dataset b: 20 items on a line; both far apart
    a = torch.zeros(20, 16)
    a[:, :8] = torch.randn(20, 8, generator=g)
    b = torch.zeros(20, 16)
    b[:, 8] = torch.randn(20, generator=g)
    x = torch.cat([a + 50.0, b - 50.0])
    names = np.array(["a"] * 20 + ["b"] * 20)
    ranks = dataset_ranks(x, names)
    assert list(ranks) == ["a", "b"]
    assert ranks["a"] > 5.0 and ranks["b"] == pytest.approx(1.0, abs=1e-3)
    assert effective_rank(x) < 2.0  # pooled, the dataset offset hides a's spread
    assert "c" not in dataset_ranks(torch.cat([x, torch.randn(3, 16)]), np.concatenate([names, ["c"] * 3]))
