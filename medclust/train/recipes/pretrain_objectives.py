"""The 2D objectives of the pretraining methods, as the pretraining task calls them.

Each objective wraps one loss of :mod:`medclust.losses` (a pure function plus a thin module)
with what the method needs from the shared model: which head produces its features, which extra
trainable heads it adds (built into :class:`~medclust.models.JointModel` ``extra``) and, for the
generative members, the images themselves. The task hands every objective the same thing:

- ``emb``: (2n, D) slice embeddings, rows ``[0, n)`` view 1 and ``[n, 2n)`` view 2 of the same
  n 2D items (slices and radiographs; in a joint step also the volume slices both views kept);
- ``images``: (2m, 1, h, w), both views of the first m of those items (the independently drawn
  2D items, m <= n; None unless the objective ``needs_images``): their embeddings are
  ``emb[:m]`` and ``emb[n:n + m]`` (:func:`split_views`).

An objective returns ``{"loss_intra": ...}`` and may add its terms (``loss_recon``, ...), which
go to ``metrics.csv`` beside the total. Stateful parts (queues, replay buffers) are buffers of
the objective, so the task's checkpoint carries them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from medclust.errors import MedclustError
from medclust.losses import DEPICTLoss, GEDILoss, LNSCCLoss, NNCLRLoss, NTXentLoss, SwAVLoss, cluster_energy
from medclust.models import JointModel, ProjectionHead
from medclust.models.decoder import ConvDecoder

__all__ = ["DEPICTObjective", "GEDIObjective", "LNSCCObjective", "NNCLRObjective", "Objective2D", "SimCLRObjective", "SwAVObjective", "build_objective", "split_views"]


class Objective2D(nn.Module):
    """A method's 2D objective (base class).

    Args:
        settings: resolved ``pretrain`` settings.
    """

    #: whether :meth:`forward` reads ``images`` (the task then keeps them at hand)
    needs_images: bool = False

    def __init__(self, settings: Mapping[str, Any]) -> None:
        super().__init__()
        self.s = dict(settings)

    def heads(self) -> dict[str, nn.Module]:
        """Extra trainable modules the objective adds to the model (built after the encoder)."""
        return {}

    def forward(self, jm: JointModel, emb: Tensor, n: int, images: Tensor | None = None) -> dict[str, Tensor]:
        """The objective on two views of n items (see the module docstring). Returns ``loss_intra`` and terms."""
        raise NotImplementedError


class SwAVObjective(Objective2D):
    """SwAV swapped prediction on the 2D prototypes (``joint``, ``swav2d``)."""

    def __init__(self, settings: Mapping[str, Any]) -> None:
        super().__init__(settings)
        s = self.s
        self.loss = SwAVLoss(s["temperature"], s["epsilon"], s["sinkhorn_iterations"], queue_length=s["queue_length"], feature_dim=s["proj_dim"])

    def forward(self, jm: JointModel, emb: Tensor, n: int, images: Tensor | None = None) -> dict[str, Tensor]:
        z = jm.project_2d(emb)
        scores = jm.prototypes_2d(z)
        return {"loss_intra": self.loss(scores[:n], scores[n:], z[:n], z[n:], jm.prototypes_2d)}


class SimCLRObjective(Objective2D):
    """SimCLR's NT-Xent between the two views' projections (``head_2d``, the projection head)."""

    def __init__(self, settings: Mapping[str, Any]) -> None:
        super().__init__(settings)
        self.loss = NTXentLoss(self.s["simclr"]["temperature"])

    def forward(self, jm: JointModel, emb: Tensor, n: int, images: Tensor | None = None) -> dict[str, Tensor]:
        z = jm.project_2d(emb)
        return {"loss_intra": self.loss(z[:n], z[n:])}


class NNCLRObjective(Objective2D):
    """NNCLR: the projection's nearest neighbour in a support queue is the positive of the other view's prediction.

    The prediction head (``extra["predictor"]``, an MLP as in the paper) maps the projection
    ``head_2d`` to the predictions; the queue holds view-1 projections (a buffer: checkpointed).
    """

    def __init__(self, settings: Mapping[str, Any]) -> None:
        super().__init__(settings)
        o = self.s["nnclr"]
        self.loss = NNCLRLoss(o["temperature"], queue_length=o["queue_length"], feature_dim=self.s["proj_dim"])

    def heads(self) -> dict[str, nn.Module]:
        proj = self.s["proj_dim"]
        return {"predictor": ProjectionHead(proj, self.s["nnclr"]["predictor_hidden"], proj, normalize=True)}

    def forward(self, jm: JointModel, emb: Tensor, n: int, images: Tensor | None = None) -> dict[str, Tensor]:
        z = jm.project_2d(emb)
        p = jm.extra["predictor"](z)
        return {"loss_intra": self.loss(z[:n], z[n:], p[:n], p[n:])}


class DEPICTObjective(Objective2D):
    """DEPICT: each view's softmax clustering head is trained toward the other view's target, plus reconstruction.

    The clustering head is the 2D prototypes (cosine scores / ``temperature``); a view is the
    noisy pathway of the other (its clean pathway; :class:`~medclust.losses.DEPICTLoss`), both
    directions in one call, so the cluster frequencies come from the whole two-view batch. The
    decoder (``extra["decoder"]``, pretraining only: the encoder is what is exported)
    reconstructs each 2D item's view from its slice embedding.
    """

    needs_images = True

    def __init__(self, settings: Mapping[str, Any]) -> None:
        super().__init__(settings)
        o = self.s["depict"]
        self.loss = DEPICTLoss(o["recon_weight"], o["target_update"], o["target_power"], num_clusters=self.s["k_2d"])

    def heads(self) -> dict[str, nn.Module]:
        return {"decoder": ConvDecoder(self.s["d_model"], tuple(self.s["view_size"]))}

    def forward(self, jm: JointModel, emb: Tensor, n: int, images: Tensor | None = None) -> dict[str, Tensor]:
        assert images is not None  # needs_images
        logits = jm.prototypes_2d(jm.project_2d(emb)) / self.s["temperature"]
        swapped = torch.cat([logits[n:], logits[:n]])
        m = images.shape[0] // 2
        recon = jm.extra["decoder"](torch.cat(split_views(emb, n, m)))
        loss = self.loss(logits, swapped, recon, images)
        terms = self.loss.last_terms
        return {"loss_intra": loss, "loss_kl": terms["kl"], "loss_recon": terms["recon"]}


class LNSCCObjective(Objective2D):
    """LNSCC: soft contrastive loss over a locally normalised kNN graph of the batch, plus its cluster terms.

    Embeddings are the projections ``head_2d``; the cluster logits are the 2D prototype scores
    / ``temperature`` (the clustering head), weighted by ``cluster_weight`` and ``balance_weight``.
    """

    def __init__(self, settings: Mapping[str, Any]) -> None:
        super().__init__(settings)
        o = self.s["lnscc"]
        self.loss = LNSCCLoss(o["k"], o["min_dist"], o["negative_rate"], o["negative_force"], o["cluster_weight"], o["balance_weight"])

    def forward(self, jm: JointModel, emb: Tensor, n: int, images: Tensor | None = None) -> dict[str, Tensor]:
        z = jm.project_2d(emb)
        logits = jm.prototypes_2d(z) / self.s["temperature"]
        return {"loss_intra": self.loss(z[:n], z[n:], logits[:n], logits[n:])}


class GEDIObjective(Objective2D):
    """GEDI: the discriminative cluster terms on the two views plus the energy-based model of the images.

    Cluster logits are the 2D prototype scores / ``temperature`` (GEDI's projector output at
    temperature 0.1); the energy ``-logsumexp`` of the logits is trained by contrastive divergence
    against SGLD samples started from a replay buffer (a buffer of the objective: checkpointed).
    The chains run with the encoder in eval mode, so the samples do not move its BatchNorm
    statistics; the energies of real images and samples are then taken as in training (JEM).
    """

    needs_images = True

    def __init__(self, settings: Mapping[str, Any]) -> None:
        super().__init__(settings)
        o = self.s["gedi"]
        self.loss = GEDILoss(
            o["beta"], o["gen_weight"], o["sgld_steps"], o["sgld_step_size"], o["sgld_noise"], o["buffer_size"], o["reinit_prob"],
            o["energy_reg"], sample_shape=(1, *self.s["view_size"]),
        )

    def forward(self, jm: JointModel, emb: Tensor, n: int, images: Tensor | None = None) -> dict[str, Tensor]:
        assert images is not None  # needs_images
        t = self.s["temperature"]
        logits = jm.prototypes_2d(jm.project_2d(emb)) / t

        def energy(x: Tensor) -> Tensor:
            return cluster_energy(jm.prototypes_2d(jm.project_2d(jm.embed_slices(x))) / t)

        def sample_energy(x: Tensor) -> Tensor:
            was_training = jm.encoder.training
            jm.encoder.eval()
            try:
                return energy(x)
            finally:
                jm.encoder.train(was_training)

        m = images.shape[0] // 2
        loss = self.loss(logits[:n], logits[n:], images[:m], energy, sample_energy)
        terms = self.loss.last_terms
        out = {"loss_intra": loss, "loss_discriminative": terms["discriminative"]}
        if "generative" in terms:
            out["loss_energy"] = terms["generative"]
        return out


_OBJECTIVES: dict[str, type[Objective2D]] = {
    "swav": SwAVObjective,
    "simclr": SimCLRObjective,
    "nnclr": NNCLRObjective,
    "depict": DEPICTObjective,
    "lnscc": LNSCCObjective,
    "gedi": GEDIObjective,
}


def build_objective(name: str, settings: Mapping[str, Any]) -> Objective2D:
    """The objective called ``name`` (:data:`~.pretrain_methods.OBJECTIVES` values except deepcluster).

    Raises:
        MedclustError: an objective without a per-step implementation here.
    """
    if name not in _OBJECTIVES:
        raise MedclustError(f"pretrain: no 2D objective {name!r}; choose one of {', '.join(_OBJECTIVES)}")
    return _OBJECTIVES[name](settings)


def split_views(x: Tensor, n: int, m: int) -> tuple[Tensor, Tensor]:
    """Rows of the first m items of both views out of a (2n, ...) two-view tensor."""
    return x[:m], x[n : n + m]

