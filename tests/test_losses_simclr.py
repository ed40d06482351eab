"""SimCLR NT-Xent: a hand-computed value, invariances, gradients, and learning hidden clusters."""

import math

import pytest
import torch
from synthetic_clusters import TinyEncoder, embedding_nmi, make_clusters, train_objective

from medclust.errors import MedclustError
from medclust.losses.simclr import NTXentLoss, nt_xent_loss


def test_nt_xent_of_two_pairs_by_hand():
    # view 1: a1 = (1, 0), b1 = (0, 1); view 2: a2 ~ (1, 1), b2 ~ (1, -1) (scaled by 3: the
    # loss normalises). Cosines with c = 1/sqrt(2): a1.b1 = 0, a1.a2 = a1.b2 = b1.a2 = c,
    # b1.b2 = -c, a2.b2 = 0. Each anchor: -log(exp(pos/T) / sum over the 3 others of exp(cos/T)).
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = 3 * torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    t, c = 0.5, 1 / math.sqrt(2)
    e = math.exp
    l_a1 = -math.log(e(c / t) / (e(0) + e(c / t) + e(c / t)))  # others: b1 (0), a2 (c, pos), b2 (c)
    l_b1 = -math.log(e(-c / t) / (e(0) + e(c / t) + e(-c / t)))  # others: a1 (0), a2 (c), b2 (-c, pos)
    l_a2 = -math.log(e(c / t) / (e(c / t) + e(c / t) + e(0)))  # others: a1 (c, pos), b1 (c), b2 (0)
    l_b2 = -math.log(e(-c / t) / (e(c / t) + e(-c / t) + e(0)))  # others: a1 (c), b1 (-c, pos), a2 (0)
    expect = (l_a1 + l_b1 + l_a2 + l_b2) / 4
    assert nt_xent_loss(z1, z2, t).item() == pytest.approx(expect, rel=1e-6)
    assert NTXentLoss(t)(z1, z2).item() == pytest.approx(expect, rel=1e-6)
    assert nt_xent_loss(z1, z2).dtype == torch.float32


def test_nt_xent_invariances():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    loss = nt_xent_loss(z1, z2)
    perm = torch.randperm(8, generator=g)
    torch.testing.assert_close(nt_xent_loss(z1[perm], z2[perm]), loss)  # batch order
    torch.testing.assert_close(nt_xent_loss(z2, z1), loss)  # view order
    scale = torch.rand(8, 1, generator=g) * 10 + 0.1
    torch.testing.assert_close(nt_xent_loss(z1 * scale, 0.01 * z2), loss)  # feature scale
    # matching rows matter: pairing each view-1 row with another item's view 2 changes the loss
    assert not torch.allclose(nt_xent_loss(z1, z2[perm]), loss)


def test_nt_xent_gradients_and_errors():
    g = torch.Generator().manual_seed(1)
    z1 = torch.randn(6, 4, generator=g, requires_grad=True)
    z2 = torch.randn(6, 4, generator=g, requires_grad=True)
    nt_xent_loss(z1, z2).backward()
    assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0
    assert torch.isfinite(z1.grad).all()
    # perfectly aligned, well-separated views: lower loss than random ones
    aligned = torch.cat([torch.eye(3), -torch.eye(3)])  # 6 distinct directions, identical views
    assert nt_xent_loss(aligned, aligned) < nt_xent_loss(z1, z2)
    with pytest.raises(MedclustError, match="temperature"):
        NTXentLoss(0.0)
    with pytest.raises(MedclustError, match="temperature"):
        nt_xent_loss(z1, z2, -1.0)
    with pytest.raises(MedclustError, match=">= 2 items"):
        nt_xent_loss(torch.randn(1, 4), torch.randn(1, 4))
    with pytest.raises(MedclustError, match="same shape"):
        nt_xent_loss(torch.randn(3, 4), torch.randn(2, 4))


def test_simclr_learns_hidden_clusters_in_30_steps():
    x, labels = make_clusters()
    enc, loss_fn = TinyEncoder(x.shape[1], 16), NTXentLoss()
    before = embedding_nmi(enc, x, labels)
    losses = train_objective(lambda x1, x2, _: loss_fn(enc(x1), enc(x2)), enc.parameters(), x, steps=30)
    after = embedding_nmi(enc, x, labels)
    assert before < 0.2 and after > 0.8, (before, after)
    assert losses[-1] < losses[0]
