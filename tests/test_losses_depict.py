"""DEPICT: the target distribution and the loss by hand, invariances, the refresh window, and learning."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from synthetic_clusters import TinyEncoder, embedding_nmi, make_clusters, train_objective
from torch import nn

from medclust.errors import MedclustError
from medclust.evaluate.clustering import normalized_mutual_info
from medclust.losses.depict import DEPICTLoss, depict_loss, depict_loss_terms, depict_target

# f = column sums = (2.4, 0.6): sqrt(f) is 2:1, so p_ik ∝ (q_i1 / 2, q_i2 / 1) for the paper's form
Q = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3]])


def test_depict_target_by_hand():
    # paper: (0.45, 0.1)/0.55, (0.4, 0.2)/0.6, (0.35, 0.3)/0.65
    paper = torch.tensor([[9 / 11, 2 / 11], [2 / 3, 1 / 3], [7 / 13, 6 / 13]])
    torch.testing.assert_close(depict_target(Q), paper)
    # released code (DEC): q^2 / f normalised = the paper's target squared: (0.2025, 0.01)/0.2125, ...
    dec = torch.tensor([[81 / 85, 4 / 85], [0.8, 0.2], [49 / 85, 36 / 85]])
    torch.testing.assert_close(depict_target(Q, power=2.0), dec)
    # frequencies given explicitly, at any scale, override the batch's
    torch.testing.assert_close(depict_target(Q, torch.tensor([1.0, 1.0])), Q)
    torch.testing.assert_close(depict_target(Q, torch.tensor([0.8, 0.2])), paper)
    assert depict_target(Q.requires_grad_()).requires_grad is False


def test_depict_loss_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.25, 0.25]]))
    target = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.25, 0.25]])
    recon, images = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    terms = depict_loss_terms(logits, target, recon, images, recon_weight=0.5)
    kl = math.log(2) / 2  # row 1: log(1 / 0.5) (0 log 0 = 0); row 2: P = Q
    f = [0.75, 0.125, 0.125]
    prior = sum(fk * math.log(3 * fk) for fk in f)  # KL(f || uniform)
    assert terms["kl"].item() == pytest.approx(kl, abs=1e-6)
    assert terms["prior"].item() == pytest.approx(prior, abs=1e-6)
    assert terms["recon"].item() == pytest.approx(1.0)
    assert terms["total"].item() == pytest.approx(kl + prior + 0.5, abs=1e-6)
    assert depict_loss(logits, target, recon, images, 0.5).item() == pytest.approx(kl + prior + 0.5, abs=1e-6)
    # a balanced target predicted exactly costs nothing
    assert depict_loss(torch.zeros(4, 2), torch.full((4, 2), 0.5)).item() == pytest.approx(0.0, abs=1e-7)


def test_depict_module_maps_views_and_only_the_noisy_view_gets_gradient():
    torch.manual_seed(0)
    noisy, clean = torch.randn(6, 4, requires_grad=True), torch.randn(6, 4, requires_grad=True)
    loss = DEPICTLoss()(noisy, clean)
    expected = depict_loss(noisy, depict_target(F.softmax(clean, 1), power=2.0))
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert noisy.grad.abs().sum() > 0 and clean.grad is None
    paper = DEPICTLoss(target_power=1.0)(noisy, clean)
    torch.testing.assert_close(paper, depict_loss(noisy, depict_target(F.softmax(clean, 1))))


def test_depict_loss_is_invariant_to_the_order_of_the_batch():
    torch.manual_seed(0)
    noisy, clean = torch.randn(8, 3), torch.randn(8, 3)
    recon, images = torch.randn(8, 1, 4, 4), torch.randn(8, 1, 4, 4)
    perm = torch.randperm(8)
    loss_fn = DEPICTLoss(recon_weight=0.3)
    a = loss_fn(noisy, clean, recon, images)
    b = loss_fn(noisy[perm], clean[perm], recon[perm], images[perm])
    torch.testing.assert_close(a, b)
    # but it does depend on which clean item goes with which noisy one
    assert not torch.allclose(a, loss_fn(noisy, clean[perm], recon, images))


def test_depict_gradient_descends_the_loss():
    torch.manual_seed(0)
    logits = torch.randn(8, 3, requires_grad=True)
    recon = torch.randn(8, 5, requires_grad=True)
    target, images = F.softmax(torch.randn(8, 3), 1), torch.randn(8, 5)
    loss = depict_loss(logits, target, recon, images)
    g_logits, g_recon = torch.autograd.grad(loss, [logits, recon])
    assert g_logits.norm() > 1e-3 and g_recon.norm() > 1e-3
    with torch.no_grad():
        stepped = depict_loss(logits - 0.1 * g_logits, target, recon - 0.1 * g_recon, images)
    assert stepped < loss - 1e-3


def test_depict_target_update_holds_the_frequency_between_refreshes():
    torch.manual_seed(0)
    loss_fn = DEPICTLoss(target_update=2, num_clusters=3)
    assert {"frequency", "freq_sum", "freq_count", "steps"} <= set(loss_fn.state_dict())
    batches = [torch.randn(5, 3) for _ in range(3)]
    q = [F.softmax(b, 1) for b in batches]
    # before the first refresh: this batch's frequencies
    torch.testing.assert_close(loss_fn.targets(batches[0]), depict_target(q[0], power=2.0))
    loss_fn.targets(batches[1])  # second step: refresh with the mean over both batches
    held = (q[0].sum(0) + q[1].sum(0)) / 10
    torch.testing.assert_close(loss_fn.frequency, held)
    p = loss_fn.targets(batches[2])
    torch.testing.assert_close(p, depict_target(q[2], held, power=2.0))
    assert not torch.allclose(p, depict_target(q[2], power=2.0))
    # evaluation does not advance the window
    loss_fn.eval()
    steps = int(loss_fn.steps)
    loss_fn.targets(batches[0])
    assert int(loss_fn.steps) == steps


def test_depict_rejects_bad_arguments():
    with pytest.raises(MedclustError, match="same shape"):
        depict_loss(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(MedclustError, match="both recon and images"):
        depict_loss(torch.zeros(4, 3), torch.full((4, 3), 1 / 3), recon=torch.zeros(4, 2))
    with pytest.raises(MedclustError, match="num_clusters"):
        DEPICTLoss(target_update=5)
    with pytest.raises(MedclustError, match="num_clusters=3"):
        DEPICTLoss(target_update=2, num_clusters=3)(torch.zeros(4, 2), torch.zeros(4, 2))
    with pytest.raises(MedclustError, match="power"):
        depict_target(Q, power=0.0)


def _train_depict(target_power: float, seed: int = 0) -> dict[str, float]:
    """30 steps of DEPICT on the synthetic clusters: noisy view -> clean items, denoising decoder."""
    x, labels = make_clusters(seed=seed)
    encoder = TinyEncoder(x.shape[1], 8, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(100 + seed)
        head = nn.Linear(8, 3)
        decoder = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, x.shape[1]))  # vectors: an MLP decoder

    def assignments() -> np.ndarray:
        with torch.no_grad():
            return head(encoder(x)).argmax(1).numpy()

    out = {"head_before": normalized_mutual_info(labels, assignments()), "kmeans_before": embedding_nmi(encoder, x, labels)}
    loss_fn = DEPICTLoss(recon_weight=1.0, target_power=target_power)

    def step(x1, x2, clean):
        noisy = encoder(x1)  # DEPICT: loss on the corrupted pathway, target and reconstruction from the clean one
        return loss_fn(head(noisy), head(encoder(clean)), decoder(noisy), clean)

    params = [*encoder.parameters(), *head.parameters(), *decoder.parameters()]
    train_objective(step, params, x, steps=30, lr=3e-2, seed=seed)
    with torch.no_grad():
        out["confidence"] = F.softmax(head(encoder(x)), 1).max(1).values.mean().item()
    out["head_after"] = normalized_mutual_info(labels, assignments())
    out["kmeans_after"] = embedding_nmi(encoder, x, labels)
    return out


def test_depict_learns_the_clusters_in_30_steps():
    r = _train_depict(target_power=2.0)
    # untrained: neither the head's argmax nor k-means on the embedding sees the clusters
    assert r["head_before"] < 0.2 and r["kmeans_before"] < 0.2, r
    assert r["head_after"] > 0.8, r
    assert r["confidence"] > 0.8, r


def test_depict_paper_target_alone_does_not_sharpen():
    # why DEPICTLoss defaults to the released code's target: from a random start the paper's
    # square-root target keeps the posteriors near uniform (1/3 for K = 3)
    r = _train_depict(target_power=1.0)
    assert r["confidence"] < 0.45 and r["head_after"] < 0.5, r
