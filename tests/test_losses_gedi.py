"""GEDI: energies, SGLD, contrastive divergence and the discriminative terms by hand; invariances; learning."""

import math

import pytest
import torch
from synthetic_clusters import TinyEncoder, embedding_nmi, make_clusters, train_objective
from torch import nn

from medclust.errors import MedclustError
from medclust.evaluate.clustering import normalized_mutual_info
from medclust.losses.gedi import (
    GEDILoss,
    cluster_energy,
    energy_loss,
    gedi_discriminative_loss,
    gedi_invariance_loss,
    gedi_prior_loss,
    sgld_sample,
)

# softmax rows (0.5, 0.5) and (0.75, 0.25)
LOGITS_A = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
LOGITS_B = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])


def test_cluster_energy_by_hand():
    torch.testing.assert_close(cluster_energy(LOGITS_A), torch.tensor([-math.log(2.0), -math.log(4.0)]))


def test_sgld_step_without_noise_by_hand():
    # E(x) = -logsumexp(x) for x in R^2: dE/dx = -softmax(x), so one step is x + step * softmax(x)
    x0 = LOGITS_A.clone()
    out = sgld_sample(cluster_energy, x0, steps=1, step_size=0.5, noise=0.0)
    torch.testing.assert_close(out, x0 + 0.5 * torch.tensor([[0.5, 0.5], [0.75, 0.25]]))
    torch.testing.assert_close(x0, LOGITS_A)  # the start is not modified
    # two steps of a quadratic energy E = |x|^2: x <- x - 2 s x, twice
    two = sgld_sample(lambda x: (x**2).sum(1), torch.ones(3, 2), steps=2, step_size=0.1, noise=0.0)
    torch.testing.assert_close(two, torch.full((3, 2), 0.8**2))
    assert torch.equal(sgld_sample(cluster_energy, x0, 0, 1.0, 1.0), x0)


def test_sgld_keeps_no_graph_touches_no_parameter_and_seeds_its_noise():
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    x0 = torch.randn(5, 4)
    with torch.no_grad():  # autograd is switched on inside
        out = sgld_sample(lambda x: cluster_energy(net(x)), x0, 3, 1.0, 0.01)
    assert not out.requires_grad and out.grad_fn is None
    assert all(p.grad is None for p in net.parameters())
    assert not torch.allclose(out, x0)
    draws = [
        sgld_sample(lambda x: cluster_energy(net(x)), x0, 3, 1.0, 0.5, generator=torch.Generator().manual_seed(7))
        for _ in range(2)
    ]
    torch.testing.assert_close(draws[0], draws[1])
    # the noise has the requested spread: with a flat energy the samples are x0 + noise * N(0, 1) per step
    flat = sgld_sample(lambda x: 0.0 * x.sum(1), torch.zeros(4000, 1), 1, 1.0, 0.5, torch.Generator().manual_seed(0))
    assert flat.std().item() == pytest.approx(0.5, rel=0.05)
    with pytest.raises(MedclustError, match=r"\(5,\) energies"):
        sgld_sample(lambda x: net(x), x0, 1, 1.0, 0.0)


def test_energy_loss_by_hand():
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([0.0, -2.0])
    assert energy_loss(real, fake).item() == pytest.approx(2.0 - (-1.0))
    # regulariser: 0.5 * (mean(1, 9) + mean(0, 4)) = 0.5 * (5 + 2)
    assert energy_loss(real, fake, reg=0.5).item() == pytest.approx(3.0 + 3.5)
    with pytest.raises(MedclustError, match="energies"):
        energy_loss(real[:, None], fake)


def test_gedi_discriminative_terms_by_hand():
    # prior: batch-mean posterior (0.625, 0.375)
    assert gedi_prior_loss(LOGITS_A).item() == pytest.approx(-(math.log(0.625) + math.log(0.375)), abs=1e-6)
    # invariance of A against B: row 1 scores (0.75, 0.25) against log(0.5, 0.5), row 2 (0.5, 0.5) against log(0.75, 0.25)
    inv_ab = (math.log(2.0) - 0.5 * (math.log(0.75) + math.log(0.25))) / 2
    assert gedi_invariance_loss(LOGITS_A, LOGITS_B).item() == pytest.approx(inv_ab, abs=1e-6)
    # an asymmetric pair: C is uniform for both items, so scoring C costs log 2 whatever the target
    c = torch.zeros(2, 2)
    inv_ca = math.log(2.0)
    assert gedi_invariance_loss(c, LOGITS_A).item() == pytest.approx(inv_ca, abs=1e-6)
    inv_ac = (math.log(2.0) - 0.5 * (math.log(0.75) + math.log(0.25))) / 2
    assert gedi_invariance_loss(LOGITS_A, c).item() == pytest.approx(inv_ac, abs=1e-6)
    prior_a, prior_c = gedi_prior_loss(LOGITS_A).item(), 2 * math.log(2.0)
    sym = 0.5 * 0.5 * (prior_a + prior_c) + 0.5 * 2.0 * 0.5 * (inv_ac + inv_ca)
    assert gedi_discriminative_loss(LOGITS_A, c, beta=2.0).item() == pytest.approx(sym, abs=1e-6)
    one_way = 0.5 * prior_a + 0.5 * 2.0 * inv_ac
    assert gedi_discriminative_loss(LOGITS_A, c, beta=2.0, symmetric=False).item() == pytest.approx(one_way, abs=1e-6)


def test_gedi_prior_penalises_collapse():
    balanced = torch.tensor([[9.0, 0.0, 0.0], [0.0, 9.0, 0.0], [0.0, 0.0, 9.0]])
    collapsed = torch.tensor([[9.0, 0.0, 0.0]] * 3)
    assert gedi_prior_loss(balanced).item() == pytest.approx(3 * math.log(3.0), abs=1e-3)  # the minimum, K log K
    assert gedi_prior_loss(collapsed).item() > 3 * math.log(3.0) + 10
    # invariance alone would prefer the collapsed, agreeing views; the discriminative loss does not
    assert gedi_invariance_loss(collapsed, collapsed) < gedi_invariance_loss(balanced, balanced) + 1e-3
    assert gedi_discriminative_loss(collapsed, collapsed) > gedi_discriminative_loss(balanced, balanced)


def test_gedi_losses_are_invariant_to_the_order_of_the_batch():
    torch.manual_seed(0)
    l1, l2 = torch.randn(8, 4), torch.randn(8, 4)
    perm = torch.randperm(8)
    torch.testing.assert_close(gedi_discriminative_loss(l1, l2), gedi_discriminative_loss(l1[perm], l2[perm]))
    assert not torch.allclose(gedi_discriminative_loss(l1, l2), gedi_discriminative_loss(l1, l2[perm]))
    er, ef = torch.randn(8), torch.randn(8)
    torch.testing.assert_close(energy_loss(er, ef, 0.1), energy_loss(er[perm], ef, 0.1))


def test_gedi_gradients_reach_logits_and_the_energy_model():
    torch.manual_seed(0)
    l1, l2 = torch.randn(8, 3, requires_grad=True), torch.randn(8, 3, requires_grad=True)
    loss = gedi_discriminative_loss(l1, l2, beta=1.0)
    g1, g2 = torch.autograd.grad(loss, [l1, l2])
    assert g1.norm() > 1e-3 and g2.norm() > 1e-3  # both views keep their gradient
    with torch.no_grad():
        assert gedi_discriminative_loss(l1 - 0.5 * g1, l2 - 0.5 * g2, beta=1.0) < loss - 1e-3
    # the energy term moves the parameters that define the energy
    net = nn.Linear(4, 3)
    x = torch.randn(8, 4)
    energy_fn = lambda v: cluster_energy(net(v))  # noqa: E731
    logits = net(x)
    total = GEDILoss(gen_weight=1.0, buffer_size=0)(logits, logits, x, energy_fn)
    disc_only = GEDILoss(gen_weight=0.0)(net(x), net(x), x, energy_fn)
    g_total = torch.autograd.grad(total, net.weight)[0]
    g_disc = torch.autograd.grad(disc_only, net.weight)[0]
    assert (g_total - g_disc).norm() > 1e-3


def test_gedi_module_value_and_replay_buffer():
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    energy_fn = lambda v: cluster_energy(net(v))  # noqa: E731
    x1, x2 = torch.randn(6, 4), torch.randn(6, 4)
    # no buffer, no noise: the negatives are 2 SGLD steps from a uniform draw over the batch's range
    loss_fn = GEDILoss(beta=0.5, gen_weight=0.3, sgld_steps=2, sgld_noise=0.0, buffer_size=0, energy_reg=0.2)
    torch.manual_seed(1)
    loss = loss_fn(net(x1), net(x2), x1, energy_fn)
    torch.manual_seed(1)
    fake = sgld_sample(energy_fn, x1.min() + (x1.max() - x1.min()) * torch.rand(6, 4), 2, 1.0, 0.0)
    expected = gedi_discriminative_loss(net(x1), net(x2), 0.5) + 0.3 * energy_loss(energy_fn(x1), energy_fn(fake), 0.2)
    torch.testing.assert_close(loss, expected)
    assert set(loss_fn.last_terms) == {"invariance", "prior", "discriminative", "energy_real", "energy_fake", "generative", "total"}
    # buffer: chains continue from their slots; not checkpointed; reset when the image shape changes
    loss_fn = GEDILoss(sgld_steps=2, buffer_size=10, reinit_prob=0.0)
    assert "buffer" not in loss_fn.state_dict()
    loss_fn(net(x1), net(x2), x1, energy_fn)
    assert loss_fn.buffer.shape == (10, 4)
    before = loss_fn.buffer.clone()
    x0, slots = loss_fn.initial_samples(x1)
    torch.testing.assert_close(x0, before[slots])
    loss_fn.eval()  # evaluation does not write the buffer
    loss_fn(net(x1), net(x2), x1, energy_fn)
    torch.testing.assert_close(loss_fn.buffer, before)
    loss_fn.initial_samples(torch.randn(6, 2, 2))
    assert loss_fn.buffer.shape == (10, 2, 2)


def test_gedi_rejects_bad_arguments():
    with pytest.raises(MedclustError, match="one shape"):
        gedi_invariance_loss(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(MedclustError, match="beta"):
        gedi_discriminative_loss(torch.zeros(4, 3), torch.zeros(4, 3), beta=-1.0)
    with pytest.raises(MedclustError, match="reinit_prob"):
        GEDILoss(reinit_prob=2.0)
    with pytest.raises(MedclustError, match=">= 0"):
        sgld_sample(cluster_energy, torch.zeros(2, 2), -1, 1.0, 0.0)


def _train_gedi(gen_weight: float, seed: int = 0, steps: int = 60) -> dict[str, float]:
    """GEDI on the synthetic clusters with the default SGLD, buffer and regulariser (beta 2 for K = 3)."""
    x, labels = make_clusters(seed=seed)
    encoder = TinyEncoder(x.shape[1], 16, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(100 + seed)
        head = nn.Linear(16, 3)

    def logits(v: torch.Tensor) -> torch.Tensor:
        return head(encoder(v)) / 0.5

    def energy_fn(v: torch.Tensor) -> torch.Tensor:
        return cluster_energy(logits(v))

    # energy of data versus uniform noise over the data's range, on fixed draws
    noise = x.min() + (x.max() - x.min()) * torch.rand(512, x.shape[1], generator=torch.Generator().manual_seed(123))

    def scores() -> dict[str, float]:
        with torch.no_grad():
            gap = (energy_fn(noise).mean() - energy_fn(x).mean()).item()
            nmi = normalized_mutual_info(labels, logits(x).argmax(1).numpy())
        return {"nmi": nmi, "kmeans": embedding_nmi(encoder, x, labels), "energy_gap": gap}

    out = {f"{k}_before": v for k, v in scores().items()}
    loss_fn = GEDILoss(beta=2.0, gen_weight=gen_weight)
    step = lambda x1, x2, clean: loss_fn(logits(x1), logits(x2), x1, energy_fn)  # noqa: E731
    train_objective(step, [*encoder.parameters(), *head.parameters()], x, steps=steps, lr=1e-2, seed=seed)
    out.update({f"{k}_after": v for k, v in scores().items()})
    return out


def test_gedi_learns_the_clusters_and_the_density():
    # 60 steps, not 30: with the generative term on, 30 steps reach NMI 0.16-0.75 over seeds 0-4
    r = _train_gedi(gen_weight=0.1)
    assert r["nmi_before"] < 0.2 and r["kmeans_before"] < 0.2, r
    assert r["nmi_after"] > 0.8, r
    # the energy learned that uniform noise is less likely than the data
    assert r["energy_gap_after"] > 0.5, r


def test_gedi_without_the_generative_term_does_not_learn_the_density():
    # the control for the energy gap above: the discriminative terms alone make noise *more* likely
    r = _train_gedi(gen_weight=0.0)
    assert r["nmi_after"] > 0.8, r
    assert r["energy_gap_after"] < 0.0, r

