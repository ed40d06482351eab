"""DEPICT: relative-entropy clustering against a frequency-normalised target, regularised by reconstruction.

Ghasedi Dizaji, Herandi, Deng, Cai, Huang, "Deep Clustering via Joint Convolutional Autoencoder
Embedding and Relative Entropy Minimization", ICCV 2017 (arXiv 1704.06327). The paper's objective
for soft assignments ``Q`` (a softmax clustering head) and auxiliary targets ``P`` is::

    L = KL(P || Q) + KL(f || u),   f_k = 1/N sum_i p_ik,   u_k = 1/K          (balanced prior)

minimised alternately. With the network fixed, setting the derivative with respect to ``P`` to zero
gives the target of :func:`depict_target`, ``p_ik ∝ q_ik / (sum_i' q_i'k)^(1/2)`` (the frequency
``f`` appears in its own fixed point, hence the square root). With ``P`` fixed, the network minimises
``-1/N sum_i sum_k p_ik log q~_ik`` on the *noisy* (corrupted) pathway while ``P`` comes from the
*clean* pathway; the prior term is then constant. The joint model adds the autoencoder's
reconstruction losses (every layer of a denoising conv autoencoder in the paper) as a regulariser.

Our mapping (see :class:`DEPICTLoss`):

- *noisy pathway* = an augmented view (``logits``, with gradient); *clean pathway* = an
  un-augmented copy of the same items when the batch has one, else the other augmented view
  (``target_logits``, detached: ``P`` is a constant between recomputations, as in the alternating
  scheme);
- the loss is ``KL(P||Q~) + KL(f||u)``: the same gradient as the paper's cross-entropy form (the two
  differ by ``H(P)``, a constant for fixed ``P``), but a value that is the paper's objective and is
  0 exactly when the prediction equals a balanced target;
- reconstruction: the input image only, not every layer (the paper's per-layer terms need a
  mirrored encoder/decoder, which our exported ResNet encoder does not have):
  ``recon_weight * mean((recon - images)^2)`` with ``recon`` a decoder's output
  (:class:`~medclust.models.decoder.ConvDecoder`). DEPICT's decoder reads the noisy pathway and
  reconstructs the clean one (denoising); that needs the two to share their geometry. Views with
  different crops or flips reconstruct their own images instead.

The target's sharpness. The paper's target only rebalances clusters; it does not sharpen a
sample's posterior, and ``Q = P = uniform`` is a minimum of ``L``. The paper starts from
k-means pseudo-labels of a pretrained autoencoder. The released code (github.com/herandy/DEPICT,
``functions.py``, Theano) uses DEC's target ``q^2 / sum_i q`` instead (the square-root form is
commented out there), which is the paper's target squared and renormalised: ``target_power = 2``
here. From a random initialisation the paper's form (power 1) drifts to near-uniform posteriors
(tests/test_losses_depict.py: mean top probability ~0.37 for K = 3 after 30 steps, while power 2
reaches > 0.9), so :class:`DEPICTLoss` defaults to the released code's power 2. The released code
also refreshes ``P`` only once per epoch, from the whole dataset (see ``target_update``).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from medclust.errors import MedclustError
from medclust.losses.sinkhorn import is_distributed

__all__ = ["DEPICTLoss", "depict_loss", "depict_loss_terms", "depict_target"]


@torch.no_grad()
def depict_target(
    q: torch.Tensor, frequency: torch.Tensor | None = None, power: float = 1.0, eps: float = 1e-12
) -> torch.Tensor:
    """DEPICT's auxiliary target distribution (paper, the ``P`` update of the alternating scheme).

    ``p_ik ∝ (q_ik / f_k^(1/2))^power``, rows normalised, with ``f_k = sum_i q_ik`` the soft
    frequency of cluster k. Dividing by the frequency moves mass away from large clusters (the
    balanced prior ``KL(f||u)``); only ratios of ``f`` matter, so a sum and a mean give the same ``P``.
    ``power = 1`` is the paper's target; ``power = 2`` is ``q^2 / f`` normalised, DEC's target as the
    released DEPICT code uses it.

    Args:
        q: (N, K) soft assignments, rows summing to 1 (no gradient is kept).
        frequency: optional (K,) cluster frequencies to use instead of ``q.sum(0)`` (e.g. measured
            over more data than this batch); any positive scale.
        power: sharpening exponent (1 = paper, 2 = released code).
        eps: floor of the frequencies (an empty cluster would otherwise divide by zero).

    Returns:
        (N, K) float32 target, rows summing to 1.
    """
    if q.ndim != 2:
        raise MedclustError(f"depict_target: expected q of shape (N, K), got {tuple(q.shape)}")
    q = q.detach().float()
    f = q.sum(dim=0) if frequency is None else frequency.detach().float().to(q.device)
    if power <= 0:
        raise MedclustError(f"depict_target: power must be positive, got {power}")
    if f.shape != (q.shape[1],):
        raise MedclustError(f"depict_target: frequency must have shape ({q.shape[1]},), got {tuple(f.shape)}")
    p = (q / f.clamp_min(eps).sqrt()) ** power
    return p / p.sum(dim=1, keepdim=True).clamp_min(eps)


def depict_loss_terms(
    logits: torch.Tensor,
    target: torch.Tensor,
    recon: torch.Tensor | None = None,
    images: torch.Tensor | None = None,
    recon_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """The terms of :func:`depict_loss` (each a float32 scalar).

    Returns:
        ``{"kl": KL(P||Q) averaged over samples, "prior": KL(f||u) of the target (no gradient),
        "recon": mean squared reconstruction error (0 without ``recon``), "total": kl + prior +
        recon_weight * recon}``.
    """
    if logits.ndim != 2 or target.shape != logits.shape:
        raise MedclustError(
            f"depict_loss: expected logits and target of the same shape (N, K), got {tuple(logits.shape)} "
            f"and {tuple(target.shape)}"
        )
    if (recon is None) != (images is None):
        raise MedclustError("depict_loss: pass both recon and images, or neither")
    if recon_weight < 0:
        raise MedclustError(f"depict_loss: recon_weight must be >= 0, got {recon_weight}")
    p = target.detach().float()
    log_q = F.log_softmax(logits.float(), dim=1)
    kl = (torch.xlogy(p, p) - p * log_q).sum(dim=1).mean()
    f = p.mean(dim=0)
    prior = torch.xlogy(f, f).sum() + math.log(p.shape[1])
    if recon is not None:
        if recon.shape != images.shape:
            raise MedclustError(
                f"depict_loss: recon has shape {tuple(recon.shape)} but images {tuple(images.shape)}"
            )
        rec = F.mse_loss(recon.float(), images.float())
    else:
        rec = logits.new_zeros((), dtype=torch.float32)
    return {"kl": kl, "prior": prior, "recon": rec, "total": kl + prior + float(recon_weight) * rec}


def depict_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    recon: torch.Tensor | None = None,
    images: torch.Tensor | None = None,
    recon_weight: float = 1.0,
) -> torch.Tensor:
    """DEPICT loss for a fixed target: ``KL(P||Q) + KL(f||u) + recon_weight * MSE(recon, images)``.

    ``Q = softmax(logits)`` (noisy pathway, with gradient); ``P`` is constant. The prior term carries
    no gradient (``f`` is the mean of ``P``) but makes the value the paper's objective.

    Args:
        logits: (N, K) cluster logits of the noisy pathway.
        target: (N, K) target distribution, e.g. :func:`depict_target` of the clean pathway.
        recon: optional decoder output, same shape as ``images``.
        images: optional reconstruction targets.
        recon_weight: weight of the reconstruction term (the paper sums the two losses: 1.0).

    Returns:
        Scalar float32 loss.
    """
    return depict_loss_terms(logits, target, recon, images, recon_weight)["total"]


class DEPICTLoss(nn.Module):
    """DEPICT for two views: the noisy view (``logits``) is trained toward the target of the clean one.

    Each call is one round of the alternating scheme: ``P = depict_target(softmax(target_logits),
    power=target_power)`` with the current network (clean pathway, no gradient), then one gradient
    step on :func:`depict_loss` with ``P`` held fixed. ``P`` of a sample always comes from its own,
    current prediction (items do not recur between steps, so no per-item target can be stored);
    what ``target_update`` holds fixed is the cluster frequency that normalises it:

    - ``target_update=1`` (default): the frequencies of this batch (per-batch alternation);
    - ``target_update=n > 1``: the mean soft frequencies over the previous ``n`` training steps,
      refreshed every ``n`` steps (the paper and its code refresh ``P`` once per epoch from the
      whole dataset: ``n`` = steps per epoch comes closest). Until the first refresh, this batch's.

    Under ``torch.distributed`` the frequencies are summed over ranks, so every rank normalises by
    the global batch (as a single process would).

    Args:
        recon_weight: weight of the reconstruction term (paper: the two losses are summed, 1.0).
        target_update: steps between refreshes of the frequency normaliser (see above).
        target_power: sharpening of the target: 2 = the released code's (DEC's) target, the
            default; 1 = the paper's (collapses to uniform posteriors without a k-means start; see
            the module docstring).
        num_clusters: K; required when ``target_update > 1`` (sizes the checkpointed buffers).
        distributed: all-reduce the frequencies; None = when a process group is initialised.

    Attributes:
        last_terms: detached terms of the latest call (``kl``, ``prior``, ``recon``, ``total``).

    Example:
        >>> loss_fn = DEPICTLoss(recon_weight=1.0)
        >>> e_noisy, e_clean = encoder(x_augmented), encoder(x_clean)
        >>> loss = loss_fn(head(e_noisy), head(e_clean), decoder(e_noisy), x_clean)
    """

    def __init__(
        self,
        recon_weight: float = 1.0,
        target_update: int = 1,
        target_power: float = 2.0,
        num_clusters: int | None = None,
        distributed: bool | None = None,
    ) -> None:
        super().__init__()
        if recon_weight < 0:
            raise MedclustError(f"DEPICTLoss: recon_weight must be >= 0, got {recon_weight}")
        if target_power <= 0:
            raise MedclustError(f"DEPICTLoss: target_power must be positive, got {target_power}")
        if target_update < 1:
            raise MedclustError(f"DEPICTLoss: target_update must be >= 1, got {target_update}")
        if target_update > 1 and (num_clusters is None or num_clusters < 1):
            raise MedclustError("DEPICTLoss: target_update > 1 needs num_clusters (the number of clusters K)")
        self.recon_weight = float(recon_weight)
        self.target_update = int(target_update)
        self.target_power = float(target_power)
        self.distributed = distributed
        self.last_terms: dict[str, torch.Tensor] = {}
        if self.target_update > 1:
            k = int(num_clusters)
            self.register_buffer("frequency", torch.zeros(k))  # all zero = not measured yet
            self.register_buffer("freq_sum", torch.zeros(k))
            self.register_buffer("freq_count", torch.zeros(()))
            self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        else:
            self.frequency = self.freq_sum = self.freq_count = self.steps = None

    @torch.no_grad()
    def _batch_frequency(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Column sums of ``q`` and the number of rows, over all ranks when distributed."""
        sums = q.sum(dim=0)
        count = torch.tensor(float(q.shape[0]), device=q.device)
        if is_distributed() if self.distributed is None else self.distributed:
            dist.all_reduce(sums)
            dist.all_reduce(count)
        return sums, count

    @torch.no_grad()
    def targets(self, target_logits: torch.Tensor) -> torch.Tensor:
        """Target ``P`` of the clean pathway; in training mode also advances the refresh window.

        Args:
            target_logits: (N, K) cluster logits of the clean view.

        Returns:
            (N, K) float32 target, no gradient.
        """
        q = F.softmax(target_logits.detach().float(), dim=1)
        sums, count = self._batch_frequency(q)
        if self.frequency is None:
            return depict_target(q, sums, self.target_power)
        if sums.shape != self.frequency.shape:
            raise MedclustError(
                f"DEPICTLoss: built for num_clusters={self.frequency.numel()} but got logits with {sums.numel()} clusters"
            )
        held = self.frequency.to(q.device)
        p = depict_target(q, held if bool((held > 0).any()) else sums, self.target_power)
        if self.training:
            self.freq_sum += sums.to(self.freq_sum.device)
            self.freq_count += count.to(self.freq_count.device)
            self.steps += 1
            if int(self.steps) % self.target_update == 0:
                self.frequency.copy_(self.freq_sum / self.freq_count.clamp_min(1.0))
                self.freq_sum.zero_()
                self.freq_count.zero_()
        return p

    def forward(
        self,
        logits: torch.Tensor,
        target_logits: torch.Tensor,
        recon: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """DEPICT loss of a two-view batch.

        Args:
            logits: (N, K) cluster logits of the noisy view (with gradient).
            target_logits: (N, K) cluster logits of the clean view (detached here).
            recon: optional decoder output for ``images``.
            images: optional reconstruction targets (same shape as ``recon``).

        Returns:
            Scalar float32 loss.
        """
        if target_logits.shape != logits.shape:
            raise MedclustError(
                f"DEPICTLoss: logits {tuple(logits.shape)} and target_logits {tuple(target_logits.shape)} differ in shape"
            )
        terms = depict_loss_terms(logits, self.targets(target_logits), recon, images, self.recon_weight)
        self.last_terms = {k: v.detach() for k, v in terms.items()}
        return terms["total"]

    def extra_repr(self) -> str:
        return f"recon_weight={self.recon_weight}, target_update={self.target_update}, target_power={self.target_power}"
