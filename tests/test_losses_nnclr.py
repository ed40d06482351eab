"""NNCLR: neighbour selection, a hand-computed value, invariances, the support queue, learning hidden clusters."""

import math

import pytest
import torch
from synthetic_clusters import TinyEncoder, embedding_nmi, make_clusters, train_objective

from medclust.errors import MedclustError
from medclust.losses.nnclr import NNCLRLoss, nearest_neighbours, nnclr_loss

SUPPORT = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])


def test_nearest_neighbour_is_by_cosine_in_a_3_point_support_set():
    z = torch.tensor([[2.0, 0.1], [0.1, 3.0], [-5.0, -1.0]])
    torch.testing.assert_close(nearest_neighbours(z, SUPPORT), SUPPORT[[0, 1, 2]])
    # cosine, not Euclidean: (3, 4) is closer in angle to (0, 10) (0.8 vs 0.6) but nearer to (1, 0)
    support = torch.tensor([[1.0, 0.0], [0.0, 10.0]])
    torch.testing.assert_close(nearest_neighbours(torch.tensor([[3.0, 4.0]]), support), support[[1]])
    with pytest.raises(MedclustError, match="non-empty support"):
        nearest_neighbours(z, torch.zeros(0, 2))


def test_nnclr_loss_of_two_items_by_hand():
    # NN(z1) = (S0, S1) = ((1,0), (0,1)); NN(z2) = (S2, S1) = ((-1,0), (0,1))
    z1 = torch.tensor([[2.0, 0.1], [0.1, 3.0]])
    z2 = torch.tensor([[-1.0, 0.2], [0.3, 1.0]])
    p1 = torch.tensor([[1.0, 0.0], [2.0, 2.0]])  # normalised: (1,0), (c,c)
    p2 = torch.tensor([[1.0, 1.0], [0.0, 5.0]])  # normalised: (c,c), (0,1)
    t, c, e, log = 0.5, 1 / math.sqrt(2), math.exp, math.log
    # NN(z1_i) against p2_k, row-wise softmax over k (Eq. 2): cosines row 0 (c, 0), row 1 (c, 1)
    a = (-log(e(c / t) / (e(c / t) + e(0))) - log(e(1 / t) / (e(c / t) + e(1 / t)))) / 2
    # NN(z2_i) against p1_k: row 0 (-1, -c), row 1 (0, c)
    b = (-log(e(-1 / t) / (e(-1 / t) + e(-c / t))) - log(e(c / t) / (e(0) + e(c / t)))) / 2
    assert nnclr_loss(z1, z2, p1, p2, SUPPORT, t).item() == pytest.approx((a + b) / 2, rel=1e-6)
    # without a support set each projection is its own neighbour
    own = nnclr_loss(z1, z2, p1, p2, None, t)
    torch.testing.assert_close(own, nnclr_loss(z1, z2, p1, p2, torch.cat([z1, z2]), t))


def test_nnclr_loss_invariances_and_gradients():
    g = torch.Generator().manual_seed(0)
    z1, z2, p1, p2 = (torch.randn(6, 4, generator=g) for _ in range(4))
    support = torch.randn(10, 4, generator=g)
    loss = nnclr_loss(z1, z2, p1, p2, support)
    perm = torch.randperm(6, generator=g)
    torch.testing.assert_close(nnclr_loss(z1[perm], z2[perm], p1[perm], p2[perm], support), loss)  # batch order
    torch.testing.assert_close(nnclr_loss(z1, z2, p1, p2, support[torch.randperm(10, generator=g)]), loss)
    torch.testing.assert_close(nnclr_loss(z2, z1, p2, p1, support), loss)  # symmetric in the views
    torch.testing.assert_close(nnclr_loss(3 * z1, 0.1 * z2, 7 * p1, p2, 5 * support), loss)  # scale-free
    assert not torch.allclose(nnclr_loss(z1, z2, p1, p2[perm], support), loss)  # pairing matters
    p1, p2, z1 = p1.requires_grad_(), p2.requires_grad_(), z1.requires_grad_()
    nnclr_loss(z1, z2, p1, p2, support).backward()
    assert p1.grad.abs().sum() > 0 and p2.grad.abs().sum() > 0
    assert z1.grad is None  # neighbours are looked up, not differentiated
    nnclr_loss(z1, z2, p1, p2, None).backward()  # also when the batch is its own support
    assert z1.grad is None
    with pytest.raises(MedclustError, match="temperature"):
        nnclr_loss(z1, z2, p1, p2, support, 0.0)
    with pytest.raises(MedclustError, match="one shape"):
        nnclr_loss(z1, z2[:3], p1, p2, support)
    with pytest.raises(MedclustError, match=">= 2 items"):
        nnclr_loss(z1[:1], z2[:1], p1[:1], p2[:1], support)


def test_nnclr_queue_fallback_fifo_and_checkpoint():
    g = torch.Generator().manual_seed(1)
    loss_fn = NNCLRLoss(temperature=0.1, queue_length=5, feature_dim=3)
    assert {"queue", "queue_ptr", "queue_count"} <= set(loss_fn.state_dict())
    batches = [tuple(torch.randn(2, 3, generator=g) for _ in range(4)) for _ in range(4)]
    for z1, z2, p1, p2 in batches[:3]:  # 2 + 2 + 2 >= 5: full after the third batch
        assert not loss_fn.queue_full
        torch.testing.assert_close(loss_fn(z1, z2, p1, p2), nnclr_loss(z1, z2, p1, p2, None, 0.1))
    assert loss_fn.queue_full and int(loss_fn.queue_count) == 5
    # ring buffer of view-1 projections: slots 0,1 <- batch 0; 2,3 <- batch 1; 4,0 <- batch 2
    expect = torch.cat([batches[2][0][1:], batches[0][0][1:], batches[1][0], batches[2][0][:1]])
    torch.testing.assert_close(loss_fn.queue, torch.nn.functional.normalize(expect, dim=1))
    z1, z2, p1, p2 = batches[3]
    fresh = NNCLRLoss(temperature=0.1, queue_length=5, feature_dim=3)
    fresh.load_state_dict(loss_fn.state_dict())
    fresh.eval()
    before = fresh.queue.clone()
    torch.testing.assert_close(fresh(z1, z2, p1, p2), nnclr_loss(z1, z2, p1, p2, before, 0.1))
    torch.testing.assert_close(fresh.queue, before)  # eval mode: no update
    # a batch larger than the queue keeps its newest rows
    big = torch.randn(7, 3, generator=g)
    loss_fn.enqueue_(big)
    assert sorted(map(tuple, loss_fn.queue.tolist())) == sorted(
        map(tuple, torch.nn.functional.normalize(big[-5:], dim=1).tolist())
    )
    loss_fn.reset_queue_()
    assert not loss_fn.queue_full and loss_fn.support() is None
    with pytest.raises(MedclustError, match=r"\(B, 3\)"):
        loss_fn(torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4))


def test_nnclr_learns_hidden_clusters_in_30_steps():
    x, labels = make_clusters()
    enc, pred = TinyEncoder(x.shape[1], 32), TinyEncoder(32, 32, seed=100)
    loss_fn = NNCLRLoss(queue_length=3 * len(x), feature_dim=32)  # full after the third step

    def step(x1, x2, _):
        z1, z2 = enc(x1), enc(x2)
        return loss_fn(z1, z2, pred(z1), pred(z2))

    before = embedding_nmi(enc, x, labels)
    train_objective(step, [*enc.parameters(), *pred.parameters()], x, steps=30)
    after = embedding_nmi(enc, x, labels)
    assert loss_fn.queue_full
    assert before < 0.2 and after > 0.8, (before, after)
