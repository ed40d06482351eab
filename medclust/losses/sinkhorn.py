"""Sinkhorn-Knopp equal-partition codes (SwAV), log-domain, float32, DDP-aware."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from medclust.errors import MedclustError

__all__ = ["Sinkhorn", "sinkhorn", "is_distributed"]


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(t: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    dist.all_reduce(t, op=op)
    return t


def _logsumexp_over_samples(log_q: torch.Tensor, distributed: bool) -> torch.Tensor:
    """log sum_b exp(log_q[b, k]) over the samples of all ranks: (B, K) -> (K,)."""
    if not distributed:
        return torch.logsumexp(log_q, dim=0)
    m = log_q.max(dim=0).values.clone()
    _all_reduce(m, dist.ReduceOp.MAX)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = _all_reduce(torch.exp(log_q - m).sum(dim=0))
    return torch.log(s) + m


@torch.no_grad()
def sinkhorn(
    scores: torch.Tensor,
    epsilon: float = 0.05,
    iterations: int = 3,
    distributed: bool | None = None,
    rescale: bool = True,
) -> torch.Tensor:
    """Soft cluster assignments with equal cluster sizes (SwAV's Sinkhorn-Knopp).

    Solves for Q maximising ``<Q, scores> + epsilon * H(Q)`` subject to every prototype
    receiving ``1/K`` of the mass and every sample ``1/B`` (B = global batch). Computed in
    the log domain in float32 (autocast disabled), so scores of +-1e4, all-equal rows and
    float16/bfloat16 inputs give finite codes; SwAV's ``exp(scores/eps)`` overflows there.

    Marginals: the last Sinkhorn step normalises samples, so before the final rescale every
    row sums to exactly ``1/B`` and every column to ``1/K`` up to the convergence of the
    ``iterations`` steps. The returned codes are rescaled by B: rows sum to 1.

    Under ``torch.distributed`` the per-prototype sums and B are all-reduced, so the
    partition is over the global batch (as SwAV does); each rank gets the codes of its rows.

    Args:
        scores: (B, K) prototype scores of the local samples (any float dtype).
        epsilon: entropy regularisation; smaller = sharper codes.
        iterations: Sinkhorn iterations (SwAV: 3).
        distributed: all-reduce across ranks; None = when a process group is initialised.
        rescale: multiply by the global B (rows sum to 1); False returns the transport plan.

    Returns:
        (B, K) float32 codes, no gradient.
    """
    if scores.ndim != 2:
        raise MedclustError(f"sinkhorn: expected scores of shape (B, K), got {tuple(scores.shape)}")
    if epsilon <= 0:
        raise MedclustError(f"sinkhorn: epsilon must be positive, got {epsilon}")
    distributed = is_distributed() if distributed is None else distributed
    with torch.autocast(device_type=scores.device.type, enabled=False):
        log_q = scores.detach().float() / epsilon
        b_local, k = log_q.shape
        b_total = torch.tensor(float(b_local), device=log_q.device)
        if distributed:
            _all_reduce(b_total)
        log_b, log_k = torch.log(b_total), math.log(k)
        # global normalisation first (only shifts; keeps exp() well inside float32 range)
        top = log_q.max().clone() if b_local else torch.tensor(-math.inf, device=log_q.device)
        if distributed:
            _all_reduce(top, dist.ReduceOp.MAX)
        log_q = log_q - torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        for _ in range(iterations):
            log_q = log_q - _logsumexp_over_samples(log_q, distributed)[None, :] - log_k  # columns -> 1/K
            log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - log_b  # rows -> 1/B
        if iterations == 0:
            log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - log_b
        if rescale:
            log_q = log_q + log_b
        return torch.exp(log_q)


class Sinkhorn(nn.Module):
    """Module wrapper of :func:`sinkhorn` (no parameters).

    Args:
        epsilon: entropy regularisation.
        iterations: Sinkhorn iterations.
        distributed: see :func:`sinkhorn`.
    """

    def __init__(self, epsilon: float = 0.05, iterations: int = 3, distributed: bool | None = None) -> None:
        super().__init__()
        self.epsilon, self.iterations, self.distributed = float(epsilon), int(iterations), distributed

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        """Args: scores (B, K). Returns: (B, K) codes, rows summing to 1."""
        return sinkhorn(scores, self.epsilon, self.iterations, self.distributed)
