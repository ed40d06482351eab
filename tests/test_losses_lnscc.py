"""LNSCC: the locally normalised graph, hand-computed values, invariances, gradients, learning hidden clusters."""

import math

import pytest
import torch
from synthetic_clusters import TinyEncoder, embedding_nmi, make_clusters, train_objective
from torch import nn

from medclust.errors import MedclustError
from medclust.evaluate.clustering import normalized_mutual_info
from medclust.losses.lnscc import (
    LNSCCLoss,
    cluster_assignment_loss,
    fuzzy_knn_graph,
    lnscc_loss,
    locally_normalized_weights,
    similarity_curve_params,
    soft_contrastive_loss,
    target_distribution,
)


def test_similarity_curve_matches_umap_for_min_dist_0_1():
    a, b = similarity_curve_params(0.1, 1.0)
    assert a == pytest.approx(1.577, abs=2e-3) and b == pytest.approx(0.895, abs=2e-3)  # UMAP's fit
    with pytest.raises(MedclustError, match="min_dist"):
        similarity_curve_params(1.5, 1.0)


def test_local_normalisation_by_hand():
    # points on a line at 0, 1, 2, 3; k = 3. Point 0 sees distances 1, 2, 3: rho = 1, excesses
    # 0, 1, 2, weights 1, u, u^2 with u = exp(-1/sigma) and 1 + u + u^2 = log2(3), so
    # u = (-1 + sqrt(1 + 4 (log2(3) - 1))) / 2 = 0.4138...; point 3 is the mirror image.
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    w, sigma = locally_normalized_weights(torch.cdist(x, x), 3)
    u = (-1 + math.sqrt(1 + 4 * (math.log2(3) - 1))) / 2
    torch.testing.assert_close(w[0], torch.tensor([0.0, 1.0, u, u * u]), atol=1e-5, rtol=0)
    torch.testing.assert_close(w[3], torch.tensor([u * u, u, 1.0, 0.0]), atol=1e-5, rtol=0)
    assert sigma[0].item() == pytest.approx(-1 / math.log(u), rel=1e-4)
    # density-free: scaling the whole configuration leaves the weights unchanged
    torch.testing.assert_close(locally_normalized_weights(torch.cdist(7 * x, 7 * x), 3)[0], w)
    # fuzzy union of the two directions: w_ij + w_ji - w_ij w_ji (irregular spacing, so that
    # both directions of the pair 0-2 are fractional)
    y = torch.tensor([[0.0], [1.0], [2.5], [4.5], [7.0]])
    wy, _ = locally_normalized_weights(torch.cdist(y, y), 3)
    assert 0.05 < wy[0, 2] < 0.95 and 0.05 < wy[2, 0] < 0.95
    g = fuzzy_knn_graph(y, k=3)
    torch.testing.assert_close(g, g.T)
    assert g[0, 2].item() == pytest.approx((wy[0, 2] + wy[2, 0] - wy[0, 2] * wy[2, 0]).item(), abs=1e-6)
    assert torch.all(g.diagonal() == 0) and not g.requires_grad
    # a near-tie neighbour is nearly as close as the nearest: sigma has a floor of 1e-3 times the
    # mean neighbour distance (UMAP's), instead of collapsing to 0 and dropping it
    t = torch.tensor([[0.0], [1.0], [-1.0001], [5.0]])
    wt, _ = locally_normalized_weights(torch.cdist(t, t), 3)
    assert wt[0, 2].item() == pytest.approx(math.exp(-1e-4 / (1e-3 * (1 + 1.0001 + 5) / 3)), rel=1e-3)
    with pytest.raises(MedclustError, match="k <= N - 1"):
        locally_normalized_weights(torch.cdist(x, x), 4)


def test_lnscc_loss_of_three_items_by_hand():
    # item means (views averaged) 0.1, 1.1, 5.2 with k = 1: nearest neighbours 0->1, 1->0, 2->1,
    # so after the fuzzy union items 0-1 and 1-2 are connected (weight 1), items 0-2 are not;
    # the two views of an item are connected. Over the 6 view-points, the 8 ordered pairs between
    # items 0 and 2 repel; the other 22 ordered pairs attract.
    z1 = torch.tensor([[0.0], [1.0], [5.0]])
    z2 = torch.tensor([[0.2], [1.2], [5.4]])
    a, b = similarity_curve_params(0.1, 1.0)
    points = [(0, 0.0), (1, 1.0), (2, 5.0), (0, 0.2), (1, 1.2), (2, 5.4)]  # (item, coordinate)
    attract, repel = [], []
    for i, (item_i, xi) in enumerate(points):
        for j, (item_j, xj) in enumerate(points):
            if i == j:
                continue
            q = 1 / (1 + a * abs(xi - xj) ** (2 * b))
            if {item_i, item_j} == {0, 2}:
                repel.append(-math.log(1 - q / (1 + q)))  # -log sigmoid(-log q)
            else:
                attract.append(-math.log(q / (1 + q)))  # -log sigmoid(log q)
    assert (len(attract), len(repel)) == (22, 8)
    r = 10.0
    expect = (sum(attract) / 22 + r * sum(repel) / 8) / (1 + r)
    assert lnscc_loss(z1, z2, k=1).item() == pytest.approx(expect, rel=1e-5)
    assert LNSCCLoss(k=1)(z1, z2).item() == pytest.approx(expect, rel=1e-5)
    softer = (sum(attract) / 22 + r * 0.5 * sum(repel) / 8) / (1 + r)  # negative_force scales repulsion
    assert lnscc_loss(z1, z2, k=1, negative_force=0.5).item() == pytest.approx(softer, rel=1e-5)


def test_cluster_term_by_hand():
    q = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    # f = column sums (1.4, 0.6); p ∝ q^2 / f, rows normalised
    r0 = [0.25 / 1.4, 0.25 / 0.6]
    r1 = [0.81 / 1.4, 0.01 / 0.6]
    p = torch.tensor([[v / sum(r0) for v in r0], [v / sum(r1) for v in r1]])
    torch.testing.assert_close(target_distribution(q), p)
    logits = q.log()
    kl = sum(p[i, c] * math.log(p[i, c] / q[i, c]) for i in range(2) for c in range(2)) / 2
    balance = ((0.7 - 0.5) ** 2 + (0.3 - 0.5) ** 2) / 2
    assert cluster_assignment_loss(logits, 0.1, 0.2).item() == pytest.approx(0.1 * kl + 0.2 * balance, rel=1e-5)
    # in lnscc_loss the term is added on both views' logits
    g = torch.Generator().manual_seed(0)
    z1, z2, l1, l2 = (
        torch.randn(5, 3, generator=g),
        torch.randn(5, 3, generator=g),
        torch.randn(5, 2),
        torch.randn(5, 2),
    )
    torch.testing.assert_close(
        lnscc_loss(z1, z2, l1, l2, k=2), lnscc_loss(z1, z2, k=2) + cluster_assignment_loss(torch.cat([l1, l2]))
    )


def test_lnscc_invariances_and_gradients():
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(12, 4, generator=g), torch.randn(12, 4, generator=g)
    l1, l2 = torch.randn(12, 3, generator=g), torch.randn(12, 3, generator=g)
    loss = lnscc_loss(z1, z2, l1, l2, k=4)
    perm = torch.randperm(12, generator=g)
    torch.testing.assert_close(lnscc_loss(z1[perm], z2[perm], l1[perm], l2[perm], k=4), loss)  # batch order
    torch.testing.assert_close(lnscc_loss(z2, z1, l2, l1, k=4), loss)  # view order
    rot, _ = torch.linalg.qr(torch.randn(4, 4, generator=g))
    shift = torch.randn(4, generator=g) * 5
    torch.testing.assert_close(lnscc_loss(z1 @ rot + shift, z2 @ rot + shift, l1, l2, k=4), loss)  # rigid motion
    # Euclidean similarities: the scale of the embedding matters (the network learns it)
    assert not torch.allclose(lnscc_loss(3 * z1, 3 * z2, l1, l2, k=4), loss)
    z1.requires_grad_(), z2.requires_grad_(), l1.requires_grad_()
    lnscc_loss(z1, z2, l1, l2, k=4).backward()
    assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0 and l1.grad.abs().sum() > 0
    # the graph is a constant of the step: the gradient is that of the loss with fixed weights
    w = fuzzy_knn_graph((z1 + z2).detach() / 2, 4).fill_diagonal_(1.0).repeat(2, 2)
    z = torch.cat([z1, z2]).detach().requires_grad_()
    soft_contrastive_loss(z, w, *similarity_curve_params(0.1, 1.0)).backward()
    torch.testing.assert_close(torch.cat([z1.grad, z2.grad]), z.grad)


def test_lnscc_errors():
    z = torch.randn(4, 3)
    with pytest.raises(MedclustError, match="same shape"):
        lnscc_loss(z, z[:3])
    with pytest.raises(MedclustError, match="both views or for neither"):
        lnscc_loss(z, z, torch.randn(4, 2))
    with pytest.raises(MedclustError, match=r"\(4, K\)"):
        lnscc_loss(z, z, torch.randn(3, 2), torch.randn(3, 2))
    with pytest.raises(MedclustError, match=">= 2 items"):
        lnscc_loss(z[:1], z[:1])
    with pytest.raises(MedclustError, match="k must be"):
        LNSCCLoss(k=0)


def test_lnscc_learns_hidden_clusters_in_30_steps():
    x, labels = make_clusters()
    enc = TinyEncoder(x.shape[1], 32)
    with torch.random.fork_rng():
        torch.manual_seed(7)
        head = nn.Linear(32, 3)
    loss_fn = LNSCCLoss()  # the authors' defaults: k = 30, negative rate 10, cluster weights 0.1

    def step(x1, x2, _):
        z1, z2 = enc(x1), enc(x2)
        return loss_fn(z1, z2, head(z1), head(z2))

    before = embedding_nmi(enc, x, labels)
    train_objective(step, [*enc.parameters(), *head.parameters()], x, steps=30, lr=3e-2)
    after = embedding_nmi(enc, x, labels)
    with torch.no_grad():
        assigned = normalized_mutual_info(labels, head(enc(x)).argmax(dim=1).numpy())
    assert before < 0.2 and after > 0.8 and assigned > 0.8, (before, after, assigned)
