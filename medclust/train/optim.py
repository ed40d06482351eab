"""Optimisers: AdamW, and SGD with a LARS trust ratio (the SwAV / DeepCluster-v2 recipe)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from medclust.errors import MedclustError

__all__ = ["LARS", "build_optimizer", "default_param_groups"]


class LARS(Optimizer):
    """SGD with momentum whose per-tensor step is scaled by a LARS trust ratio.

    The trust ratio ``eta * ||w|| / (||g|| + weight_decay * ||w|| + eps)`` (apex ``LARC`` with
    ``clip=False``, as SwAV uses it) keeps every layer's relative update size comparable, which
    is what lets large-batch contrastive training use one learning rate. Groups marked
    ``lars_exclude=True`` (biases, normalisation weights) get neither weight decay nor the ratio.

    Args:
        params: parameters or parameter groups.
        lr: base learning rate.
        momentum: SGD momentum.
        weight_decay: L2 penalty added to the gradient before the trust ratio.
        eta: trust coefficient.
        eps: guards the division.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
        eps: float = 1e-8,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise MedclustError(f"LARS: invalid settings lr={lr}, momentum={momentum}, weight_decay={weight_decay}, eta={eta}")
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "eta": eta, "eps": eps, "lars_exclude": False}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # noqa: D102 - torch.optim.Optimizer.step
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd, eta, eps, mom = group["weight_decay"], group["eta"], group["eps"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if not group["lars_exclude"]:
                    p_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(grad)
                    trust = eta * p_norm / (g_norm + wd * p_norm + eps)
                    # a zero weight or gradient norm (fresh bias-like tensors) gets the plain step
                    trust = torch.where((p_norm > 0) & (g_norm > 0), trust, torch.ones_like(trust))
                    grad = grad.add(p, alpha=wd) if wd else grad.clone()
                    grad.mul_(trust)
                if mom:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = grad.detach().clone()
                    else:
                        buf.mul_(mom).add_(grad)
                    grad = buf
                p.add_(grad, alpha=-group["lr"])
        return loss


def default_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: weights with decay; biases and normalisation parameters (ndim <= 1) without.

    The second group is also excluded from the LARS trust ratio, the usual practice for both.
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lars_exclude": True})
    return [g for g in groups if g["params"]]


def build_optimizer(
    groups: list[dict[str, Any]],
    name: str,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
    lars_eta: float = 0.001,
) -> Optimizer:
    """Build ``adamw`` or ``sgd_lars`` over parameter groups (group keys override the defaults).

    Args:
        groups: parameter groups as from :func:`default_param_groups` or a task's ``param_groups``.
        name: ``adamw`` or ``sgd_lars``.
        lr: base learning rate (before warm-up/cosine scaling).
        weight_decay: default weight decay of groups that do not set their own.
        momentum: SGD momentum (``sgd_lars``).
        betas: Adam betas (``adamw``).
        lars_eta: LARS trust coefficient (``sgd_lars``).

    Returns:
        The optimiser.

    Raises:
        MedclustError: unknown optimiser name.
    """
    if name == "adamw":
        # LARS-only keys would be rejected by AdamW's group validation in the future; drop them
        clean = [{k: v for k, v in g.items() if k != "lars_exclude"} for g in groups]
        return torch.optim.AdamW(clean, lr=lr, weight_decay=weight_decay, betas=betas)
    if name == "sgd_lars":
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, eta=lars_eta)
    raise MedclustError(f"optimizer: unknown optimiser {name!r}; choose adamw or sgd_lars")
