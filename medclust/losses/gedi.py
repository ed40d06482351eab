"""GEDI: cluster-based self-supervised learning trained jointly with an energy-based model of the images.

Sansone and Manhaeve, "GEDI: GEnerative and DIscriminative Training for Self-Supervised Learning"
(arXiv 2212.13425) and its journal version "Unifying Self-Supervised Clustering and Energy-Based
Models" (arXiv 2401.00873, TMLR 2025). One network's cluster logits ``f(x)`` serve twice:

- *discriminative* terms on two augmented views (:func:`gedi_discriminative_loss`): invariance,
  the cross-entropy of view 1's cluster posterior against view 2's (``-sum_k softmax(f(x2))_k
  log softmax(f(x1))_k``), and the prior term ``-sum_k log mean_i softmax(f(x_i))_k`` (the
  cross-entropy of the uniform prior and the batch-mean posterior, times K), whose minimum is at
  equally used clusters: this is what prevents collapse onto one cluster;
- *generative* term (:func:`energy_loss`): the energy ``E(x) = -logsumexp_k f_k(x)``
  (:func:`cluster_energy`, JEM's energy of a classifier) trained by contrastive divergence,
  ``mean E(real) - mean E(negatives)``, with negatives drawn by stochastic gradient Langevin
  dynamics from the model (:func:`sgld_sample`), optionally continued from a replay buffer.

Defaults and their sources:

- discriminative weights ``0.5 * prior + 0.5 * beta * invariance`` with ``beta = 0.1``: the
  authors' implementation of GEDI's discriminative part (``gedi_nogen_loss_func`` in
  github.com/emsansone/CPLearn, ``solo/losses/gedi_nogen.py``, with ``beta: 0.1`` from its CIFAR
  config ``scripts/pretrain/cifar/gedi_nogen.yaml``). That code scores view 1 against view 2 only,
  without detaching view 2; we keep the gradient through both and, with ``symmetric=True``,
  average both directions (our two views come from one augmentation pipeline, so neither is
  privileged). It divides the projector output by a temperature of 0.1 before these terms: pass
  logits at that scale. The authors' 0.1 goes with K = 2048 outputs; the prior term sums over K,
  so fewer clusters want a larger ``beta`` (the K = 3 synthetic test uses 2).
- SGLD ``x <- x - step_size * dE/dx + noise * N(0, 1)`` with ``step_size = 1``, ``noise = 0.01``,
  replay buffer re-initialised with probability 0.05 per sample, fresh chains uniform over the data
  range: JEM (Grathwohl et al., "Your Classifier is Secretly an Energy Based Model", ICLR 2020),
  the recipe for training a classifier's ``-logsumexp`` as an energy, which is GEDI's energy. JEM runs 20 steps with a 10,000-sample buffer; we
  default to 5 steps and a 256-sample buffer so a CPU step stays cheap (raise both on a GPU). The
  GEDI repository itself (github.com/emsansone/GEDI) was not available to us, so its exact SGLD
  settings are not verified here.
- ``gen_weight = 0.1`` and ``energy_reg = 0.1``: ours, measured, not the papers'. JEM weighs the
  generative term 1 and regularises nothing (the GEDI code was not available to check). On the
  synthetic clusters of tests/test_losses_gedi.py (60 steps, seeds 0-4, NMI of the head's argmax):
  discriminative terms alone 0.98-1.00; plus the generative term at weight 0.1 with the energy
  regulariser 0.1: 1.00, 1.00, 1.00, 0.63, 0.98; at 0.1 without it: 0.52-0.90 (and in a
  1000-step run at lr 3e-3 the energies diverged to ~1e10); at weight 0.3: 0.13-0.52; at 1: 0.02-0.18. The
  regulariser is Du and Mordatch's (2019) ``E(real)^2 + E(fake)^2`` penalty.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from medclust.errors import MedclustError

__all__ = [
    "GEDILoss",
    "cluster_energy",
    "energy_loss",
    "gedi_discriminative_loss",
    "gedi_invariance_loss",
    "gedi_prior_loss",
    "sgld_sample",
]

EnergyFn = Callable[[torch.Tensor], torch.Tensor]


def cluster_energy(logits: torch.Tensor) -> torch.Tensor:
    """Energy of each sample from its cluster logits: ``E(x) = -logsumexp_k f_k(x)``.

    Args:
        logits: (N, K).

    Returns:
        (N,) float32 energies (low = likely under the model).
    """
    if logits.ndim != 2:
        raise MedclustError(f"cluster_energy: expected logits of shape (N, K), got {tuple(logits.shape)}")
    return -torch.logsumexp(logits.float(), dim=1)


def sgld_sample(
    energy_fn: EnergyFn,
    x0: torch.Tensor,
    steps: int,
    step_size: float,
    noise: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Stochastic gradient Langevin dynamics on the inputs, JEM's form with separate step and noise.

    ``x_{t+1} = x_t - step_size * dE/dx (x_t) + noise * eps_t``, ``eps_t ~ N(0, I)``. Only the
    inputs are differentiated (``torch.autograd.grad``), so no parameter receives a gradient, and
    no graph is kept: the result is a detached tensor. Runs with autograd on even when called
    under ``torch.no_grad``. BatchNorm layers in ``energy_fn`` (the ResNet slice encoder has them)
    update their running statistics on the samples in training mode: to avoid it, pass an
    ``energy_fn`` that evaluates the model in eval mode.

    Args:
        energy_fn: maps a batch shaped like ``x0`` to (N,) energies.
        x0: starting points (not modified).
        steps: Langevin steps (0 returns a copy of ``x0``).
        step_size: gradient step.
        noise: standard deviation of the added Gaussian noise.
        generator: random source of the noise (on ``x0``'s device); None = the global one.

    Returns:
        Samples shaped like ``x0``, detached.
    """
    if steps < 0 or step_size < 0 or noise < 0:
        raise MedclustError(
            f"sgld_sample: steps, step_size and noise must be >= 0, got {steps}, {step_size}, {noise}"
        )
    x = x0.detach().clone()
    with torch.enable_grad():
        for _ in range(int(steps)):
            x.requires_grad_(True)
            energy = energy_fn(x)
            if energy.ndim != 1 or energy.shape[0] != x.shape[0]:
                raise MedclustError(
                    f"sgld_sample: energy_fn must return ({x.shape[0]},) energies, got {tuple(energy.shape)}"
                )
            (grad,) = torch.autograd.grad(energy.sum(), x)
            x = x.detach() - step_size * grad
            if noise > 0:
                x = x + noise * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x.detach()


def energy_loss(energy_real: torch.Tensor, energy_fake: torch.Tensor, reg: float = 0.0) -> torch.Tensor:
    """Contrastive-divergence loss of an energy model: ``mean E(real) - mean E(fake)``.

    Its gradient is the maximum-likelihood gradient of ``-log p(x)`` with ``p ∝ exp(-E)`` when the
    fakes are samples of the model: it lowers the energy of data and raises that of samples.

    Args:
        energy_real: (N,) energies of data.
        energy_fake: (M,) energies of model samples (the samples themselves detached).
        reg: weight of ``mean E(real)^2 + mean E(fake)^2`` (Du and Mordatch, 2019), which keeps the
            energies from drifting (JEM uses none; :class:`GEDILoss` defaults to 0.1).

    Returns:
        Scalar float32 loss.
    """
    if energy_real.ndim != 1 or energy_fake.ndim != 1:
        raise MedclustError(
            f"energy_loss: expected (N,) energies, got {tuple(energy_real.shape)} and {tuple(energy_fake.shape)}"
        )
    er, ef = energy_real.float(), energy_fake.float()
    loss = er.mean() - ef.mean()
    if reg > 0:
        loss = loss + float(reg) * (er.pow(2).mean() + ef.pow(2).mean())
    return loss


def gedi_prior_loss(logits: torch.Tensor) -> torch.Tensor:
    """GEDI's prior (uniformity) term: ``-sum_k log mean_i softmax(logits)_ik``.

    Equals ``K * (KL(u || mean posterior) + log K)`` for the uniform prior ``u``: minimal
    (``K log K``) when every cluster receives the same mean probability.

    Args:
        logits: (N, K).

    Returns:
        Scalar float32.
    """
    if logits.ndim != 2:
        raise MedclustError(f"gedi_prior_loss: expected logits of shape (N, K), got {tuple(logits.shape)}")
    log_p = F.log_softmax(logits.float(), dim=1)
    # log of the batch-mean posterior, computed in the log domain (a rarely used cluster stays finite)
    log_mean = torch.logsumexp(log_p, dim=0) - torch.log(torch.tensor(float(logits.shape[0])))
    return -log_mean.sum()


def gedi_invariance_loss(logits1: torch.Tensor, logits2: torch.Tensor) -> torch.Tensor:
    """GEDI's invariance term: cross-entropy of view 1's posterior against view 2's.

    ``-mean_i sum_k softmax(logits2)_ik * log softmax(logits1)_ik``; both arguments keep their gradient.

    Args:
        logits1: (N, K) logits of view 1.
        logits2: (N, K) logits of view 2 (the same items).

    Returns:
        Scalar float32.
    """
    if logits1.ndim != 2 or logits1.shape != logits2.shape:
        raise MedclustError(
            f"gedi_invariance_loss: expected two (N, K) logits of one shape, got {tuple(logits1.shape)} and {tuple(logits2.shape)}"
        )
    return -(F.softmax(logits2.float(), dim=1) * F.log_softmax(logits1.float(), dim=1)).sum(dim=1).mean()


def gedi_discriminative_loss(
    logits1: torch.Tensor, logits2: torch.Tensor, beta: float = 0.1, symmetric: bool = True
) -> torch.Tensor:
    """GEDI's discriminative terms: ``0.5 * prior + 0.5 * beta * invariance``.

    Args:
        logits1: (N, K) cluster logits of view 1.
        logits2: (N, K) cluster logits of view 2.
        beta: weight of the invariance term relative to the prior term (authors' CIFAR config: 0.1).
        symmetric: average both directions (invariance of 1 against 2 and of 2 against 1, prior of
            both views); False = the authors' form (view 1 against view 2, prior of view 1).

    Returns:
        Scalar float32 loss.
    """
    return _discriminative_terms(logits1, logits2, beta, symmetric)["discriminative"]


def _discriminative_terms(
    logits1: torch.Tensor, logits2: torch.Tensor, beta: float, symmetric: bool
) -> dict[str, torch.Tensor]:
    if beta < 0:
        raise MedclustError(f"gedi_discriminative_loss: beta must be >= 0, got {beta}")
    if symmetric:
        inv = 0.5 * (gedi_invariance_loss(logits1, logits2) + gedi_invariance_loss(logits2, logits1))
        prior = 0.5 * (gedi_prior_loss(logits1) + gedi_prior_loss(logits2))
    else:
        inv, prior = gedi_invariance_loss(logits1, logits2), gedi_prior_loss(logits1)
    return {"invariance": inv, "prior": prior, "discriminative": 0.5 * prior + 0.5 * float(beta) * inv}


class GEDILoss(nn.Module):
    """GEDI: the discriminative terms on two views plus contrastive divergence on the energy.

    Each call: SGLD negatives start from a replay buffer (or fresh uniform noise over the range of
    this batch's images) and run ``sgld_steps`` steps on ``energy_fn``; the loss is
    ``gedi_discriminative_loss(logits1, logits2) + gen_weight * energy_loss(E(images), E(negatives))``.
    The buffer is per process. Given ``sample_shape`` it is a registered buffer (sized up front,
    filled with noise at the first call), so a checkpoint carries the chains and a resumed run
    continues them; without it the buffer is created at the first call, is not checkpointed and
    is reset when the image shape changes.

    Args:
        beta: invariance weight of the discriminative terms (see :func:`gedi_discriminative_loss`).
        gen_weight: weight of the energy (generative) term; 0 = discriminative only.
        sgld_steps: Langevin steps per call.
        sgld_step_size: Langevin gradient step.
        sgld_noise: Langevin noise std.
        buffer_size: replay buffer capacity in samples (0 = fresh noise every call).
        reinit_prob: probability that a chain drawn from the buffer restarts from noise.
        energy_reg: see :func:`energy_loss`.
        symmetric: see :func:`gedi_discriminative_loss`.
        sample_shape: shape of one image (e.g. ``(1, 64, 64)``): checkpoint the replay buffer.

    Attributes:
        last_terms: detached terms of the latest call (``invariance``, ``prior``,
            ``discriminative``, ``energy_real``, ``energy_fake``, ``generative``, ``total``).

    Example:
        >>> loss_fn = GEDILoss()
        >>> energy_fn = lambda x: cluster_energy(head(encoder(x)))
        >>> loss = loss_fn(head(encoder(x1)), head(encoder(x2)), x1, energy_fn)
    """

    def __init__(
        self,
        beta: float = 0.1,
        gen_weight: float = 0.1,
        sgld_steps: int = 5,
        sgld_step_size: float = 1.0,
        sgld_noise: float = 0.01,
        buffer_size: int = 256,
        reinit_prob: float = 0.05,
        energy_reg: float = 0.1,
        symmetric: bool = True,
        sample_shape: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        if beta < 0 or gen_weight < 0 or energy_reg < 0:
            raise MedclustError(
                f"GEDILoss: beta, gen_weight and energy_reg must be >= 0, got {beta}, {gen_weight}, {energy_reg}"
            )
        if sgld_steps < 0 or sgld_step_size < 0 or sgld_noise < 0 or buffer_size < 0:
            raise MedclustError("GEDILoss: sgld_steps, sgld_step_size, sgld_noise and buffer_size must be >= 0")
        if not 0.0 <= reinit_prob <= 1.0:
            raise MedclustError(f"GEDILoss: reinit_prob must be in [0, 1], got {reinit_prob}")
        self.beta = float(beta)
        self.gen_weight = float(gen_weight)
        self.sgld_steps = int(sgld_steps)
        self.sgld_step_size = float(sgld_step_size)
        self.sgld_noise = float(sgld_noise)
        self.buffer_size = int(buffer_size)
        self.reinit_prob = float(reinit_prob)
        self.energy_reg = float(energy_reg)
        self.symmetric = bool(symmetric)
        checkpointed = sample_shape is not None and self.buffer_size > 0
        # registered (checkpointed) when sample_shape fixes its size, else a plain attribute made at the first call
        self.register_buffer("buffer", torch.zeros(self.buffer_size, *sample_shape) if checkpointed else None)
        self.register_buffer("buffer_filled", torch.zeros((), dtype=torch.bool) if checkpointed else None)
        self.last_terms: dict[str, torch.Tensor] = {}

    @staticmethod
    def _noise_like(images: torch.Tensor, n: int) -> torch.Tensor:
        """``n`` samples uniform over [min, max] of ``images`` (JEM: U(-1, 1) for data in [-1, 1])."""
        lo, hi = images.detach().min(), images.detach().max()
        u = torch.rand((n, *images.shape[1:]), device=images.device, dtype=images.dtype)
        return lo + (hi - lo) * u

    @torch.no_grad()
    def initial_samples(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Starting points of this call's chains and, with a buffer, their buffer slots.

        Args:
            images: the real batch (N, ...), used for the shape and the noise range.

        Returns:
            ``(x0 shaped like images, slots (N,) long or None)``.
        """
        n = images.shape[0]
        if self.buffer_size == 0:
            return self._noise_like(images, n), None
        if self.buffer_filled is not None:  # a registered buffer: shape fixed, filled once
            if self.buffer.shape[1:] != images.shape[1:]:
                raise MedclustError(f"GEDILoss: images {tuple(images.shape[1:])} do not match sample_shape {tuple(self.buffer.shape[1:])}")
            if not bool(self.buffer_filled):
                self.buffer.copy_(self._noise_like(images, self.buffer_size).to(self.buffer))
                self.buffer_filled.fill_(True)
        elif (
            self.buffer is None
            or self.buffer.shape[1:] != images.shape[1:]
            or self.buffer.device != images.device
            or self.buffer.dtype != images.dtype
        ):
            self.buffer = self._noise_like(images, self.buffer_size)
        slots = torch.randint(self.buffer_size, (n,), device=images.device)
        x0 = self.buffer[slots].clone()
        restart = torch.rand(n, device=images.device) < self.reinit_prob
        if bool(restart.any()):
            x0[restart] = self._noise_like(images, int(restart.sum()))
        return x0, slots

    def forward(
        self,
        logits1: torch.Tensor,
        logits2: torch.Tensor,
        images: torch.Tensor,
        energy_fn: EnergyFn,
        sample_energy_fn: EnergyFn | None = None,
    ) -> torch.Tensor:
        """GEDI loss of a two-view batch.

        Args:
            logits1: (N, K) cluster logits of view 1.
            logits2: (N, K) cluster logits of view 2.
            images: (N, ...) real images for the energy term (e.g. view 1's), as ``energy_fn`` takes them.
            energy_fn: images -> (N,) energies with gradient to the parameters, e.g.
                ``lambda x: cluster_energy(head(encoder(x)))``.
            sample_energy_fn: energy used only inside SGLD (default ``energy_fn``); e.g. a closure
                over the module unwrapped from DistributedDataParallel (whose reducer expects one
                backward per forward), or one that runs BatchNorm in eval mode.

        Returns:
            Scalar float32 loss.
        """
        terms = _discriminative_terms(logits1, logits2, self.beta, self.symmetric)
        total = terms["discriminative"]
        if self.gen_weight > 0:
            x0, slots = self.initial_samples(images)
            fake = sgld_sample(
                sample_energy_fn or energy_fn, x0, self.sgld_steps, self.sgld_step_size, self.sgld_noise
            )
            if slots is not None and self.training:
                self.buffer[slots] = fake.to(self.buffer.dtype)
            e_real, e_fake = energy_fn(images), energy_fn(fake)
            gen = energy_loss(e_real, e_fake, self.energy_reg)
            terms.update(energy_real=e_real.float().mean(), energy_fake=e_fake.float().mean(), generative=gen)
            total = total + self.gen_weight * gen
        terms["total"] = total
        self.last_terms = {k: v.detach() for k, v in terms.items()}
        return total

    def extra_repr(self) -> str:
        return (
            f"beta={self.beta}, gen_weight={self.gen_weight}, sgld_steps={self.sgld_steps}, "
            f"sgld_step_size={self.sgld_step_size}, sgld_noise={self.sgld_noise}, buffer_size={self.buffer_size}"
        )
