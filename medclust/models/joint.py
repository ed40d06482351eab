"""The joint 2D/3D model: slice encoder + slice attention + heads + prototypes.

Building blocks only: the pretraining recipe decides how batches are built and which
objectives run. A typical joint step::

    emb = model.embed_slices(images)                        # (N, D), all 2D items of the batch
    z1, z2 = model.project_2d(emb_view1), model.project_2d(emb_view2)
    s1, s2 = model.prototypes_2d(z1), model.prototypes_2d(z2) # intra (2D) objective
    tokens = ...reshape slice embeddings of each volume to (B, S, D) with z_mm, valid
    mask = model.sample_mask(valid)
    out, vol = model.embed_volume(tokens, z_mm, valid, mask)  # inter (3D) objective on vol
    pred = model.predict_masked(out)                          # masked objective vs tokens.detach()
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from medclust.errors import MedclustError
from medclust.models.encoder import SliceEncoder
from medclust.models.prototypes import Prototypes
from medclust.models.slice_attention import SliceAttention

__all__ = ["JointModel", "ProjectionHead", "masked_mean"]


class ProjectionHead(nn.Module):
    """Two-layer MLP head (Linear - LayerNorm - GELU - Linear).

    LayerNorm rather than SwAV's BatchNorm because the volume branch sees batches of one or
    two volumes per device, where batch statistics are meaningless.

    Args:
        in_dim: input size.
        hidden_dim: hidden size.
        out_dim: output size.
        normalize: L2-normalise the output (for clustering heads).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, normalize: bool = True) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim)
        )
        self.normalize = normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (..., in_dim). Returns: (..., out_dim), unit norm if ``normalize``."""
        y = self.net(x)
        return F.normalize(y, dim=-1) if self.normalize else y


def masked_mean(tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over the real slices of each volume.

    Args:
        tokens: (B, S, D).
        valid: (B, S) bool.

    Returns:
        (B, D); zero for a volume without real slices.
    """
    w = valid.to(tokens.dtype)[..., None]
    return (tokens.masked_fill(~valid.bool()[..., None], 0.0) * w).sum(1) / w.sum(1).clamp_min(1.0)


class JointModel(nn.Module):
    """Slice encoder, slice attention, projection/predictor heads and two prototype sets.

    Args:
        encoder: the 2D :class:`SliceEncoder` (its ``d_model`` must equal ``d_model``).
        attention: the :class:`SliceAttention` over slice tokens, or None for a 2D-only model
            (``swav2d``/``deepcluster2d``): then the volume head, predictor, mask token and
            volume prototypes are not built either, so DDP sees no unused parameters.
        d_model: slice token size D.
        proj_dim: size of the L2-normalised clustering embeddings (2D and volume).
        k_2d: number of 2D (intra) prototypes.
        k_3d: number of volume (inter) prototypes.
        mask_ratio: default fraction of real slices replaced by the mask token.
        hidden_dim: hidden size of the heads (default ``2 * d_model``).
        extra_heads: modules that only one 2D objective trains (e.g. NNCLR's predictor, DEPICT's
            decoder), kept in ``extra`` so that the optimiser, checkpoints and gradient
            all-reduce see them like every other parameter.

    Attributes:
        head_2d, head_3d: projection heads to ``proj_dim`` (unit norm).
        predictor: head from contextualised tokens to slice-embedding space (D, not normalised).
        mask_token: (D,) learned token.
        prototypes_2d, prototypes_3d: :class:`Prototypes`.
        extra: :class:`~torch.nn.ModuleDict` of ``extra_heads`` (empty by default).
    """

    def __init__(
        self,
        encoder: SliceEncoder,
        attention: SliceAttention | None,
        d_model: int = 128,
        proj_dim: int = 128,
        k_2d: int = 300,
        k_3d: int = 100,
        mask_ratio: float = 0.3,
        hidden_dim: int | None = None,
        extra_heads: Mapping[str, nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if getattr(encoder, "d_model", d_model) != d_model or (
            attention is not None and getattr(attention, "d_model", d_model) != d_model
        ):
            raise MedclustError(
                f"JointModel: d_model={d_model} but encoder.d_model={getattr(encoder, 'd_model', '?')}, "
                f"attention.d_model={getattr(attention, 'd_model', '?')}"
            )
        if not 0.0 <= mask_ratio < 1.0:
            raise MedclustError(f"JointModel: mask_ratio must be in [0, 1), got {mask_ratio}")
        hidden = hidden_dim or 2 * d_model
        self.d_model, self.proj_dim, self.mask_ratio = int(d_model), int(proj_dim), float(mask_ratio)
        self.encoder = encoder
        self.attention = attention
        self.head_2d = ProjectionHead(d_model, hidden, proj_dim, normalize=True)
        self.prototypes_2d = Prototypes(proj_dim, k_2d)
        self.head_3d: ProjectionHead | None = None
        self.predictor: ProjectionHead | None = None
        self.mask_token: nn.Parameter | None = None
        self.prototypes_3d: Prototypes | None = None
        if attention is not None:
            self.head_3d = ProjectionHead(d_model, hidden, proj_dim, normalize=True)
            self.predictor = ProjectionHead(d_model, hidden, d_model, normalize=False)
            self.mask_token = nn.Parameter(torch.zeros(d_model))
            nn.init.normal_(self.mask_token, std=0.02)
            self.prototypes_3d = Prototypes(proj_dim, k_3d)
        self.extra = nn.ModuleDict(dict(extra_heads or {}))

    @property
    def has_volume_branch(self) -> bool:
        """True when the model was built with slice attention (3D objectives available)."""
        return self.attention is not None

    def _require_volume_branch(self, what: str) -> None:
        if self.attention is None:
            raise MedclustError(f"JointModel.{what}: this model was built without slice attention (2D-only method)")

    # ---- 2D branch -------------------------------------------------------------------------
    def embed_slices(self, images: torch.Tensor) -> torch.Tensor:
        """Slice embeddings (the slice tokens of the 3D branch).

        Args:
            images: (N, 1, H, W).

        Returns:
            (N, D).
        """
        return self.encoder(images)

    def project_2d(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Args: embeddings (N, D). Returns: (N, proj_dim) unit-norm 2D clustering embeddings."""
        return self.head_2d(embeddings)

    def forward_2d(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images to 2D clustering embeddings and prototype scores.

        Args:
            images: (N, 1, H, W).

        Returns:
            ``(z, scores)``: (N, proj_dim) unit norm and (N, k_2d) cosine scores.
        """
        z = self.project_2d(self.embed_slices(images))
        return z, self.prototypes_2d(z)

    # ---- 3D branch -------------------------------------------------------------------------
    def sample_mask(
        self, valid: torch.Tensor, ratio: float | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Choose ``round(ratio * n_real)`` real slices per volume to mask.

        A volume with at least two real slices always keeps one unmasked and, if ``ratio > 0``,
        masks at least one, so the masked objective always has context and a target.

        Args:
            valid: (B, S) bool.
            ratio: fraction to mask (default ``self.mask_ratio``).
            generator: optional RNG for reproducible masks (on ``valid``'s device).

        Returns:
            (B, S) bool mask, True = masked; never True on padding.
        """
        ratio = self.mask_ratio if ratio is None else float(ratio)
        valid = valid.bool()
        n = valid.sum(1)
        k = torch.round(n.float() * ratio).long()
        if ratio > 0:
            k = torch.where(n >= 2, k.clamp(1), torch.zeros_like(k))
        k = torch.minimum(k, (n - 1).clamp_min(0))
        noise = torch.rand(valid.shape, device=valid.device, generator=generator)
        noise = noise.masked_fill(~valid, 2.0)  # padding sorts last, never chosen
        rank = noise.argsort(dim=1).argsort(dim=1)
        return (rank < k[:, None]) & valid

    def embed_volume(
        self,
        slice_tokens: torch.Tensor,
        z_mm: torch.Tensor,
        valid: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Contextualise slice tokens and pool them into a volume embedding.

        Args:
            slice_tokens: (B, S, D) slice embeddings (from :meth:`embed_slices`, padded).
            z_mm: (B, S) physical z of each slice in mm.
            valid: (B, S) bool, True = real slice.
            mask: optional (B, S) bool; True slices are replaced by the learned mask token
                before the attention (ignored on padding).

        Returns:
            ``(token_outputs, volume)``: (B, S, D) attention outputs (zero on padding) and
            (B, proj_dim) unit-norm volume embeddings = head_3d(mean of outputs over real slices).
        """
        self._require_volume_branch("embed_volume")
        valid = valid.bool()
        if mask is not None:
            m = (mask.bool() & valid)[..., None]
            slice_tokens = torch.where(m, self.mask_token.to(slice_tokens.dtype), slice_tokens)
        out = self.attention(slice_tokens, z_mm, valid)
        return out, self.head_3d(masked_mean(out, valid))

    def forward_3d(
        self,
        slice_tokens: torch.Tensor,
        z_mm: torch.Tensor,
        valid: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`embed_volume` plus volume prototype scores.

        Returns:
            ``(token_outputs (B,S,D), volume (B,proj_dim), scores (B,k_3d))``.
        """
        out, vol = self.embed_volume(slice_tokens, z_mm, valid, mask)
        return out, vol, self.prototypes_3d(vol)

    def predict_masked(self, token_outputs: torch.Tensor) -> torch.Tensor:
        """Predict slice embeddings from contextualised tokens (score only masked positions).

        Args:
            token_outputs: (B, S, D) from :meth:`embed_volume`.

        Returns:
            (B, S, D) predictions in slice-embedding space.
        """
        self._require_volume_branch("predict_masked")
        return self.predictor(token_outputs)

    # ---- prototypes ------------------------------------------------------------------------
    @torch.no_grad()
    def normalize_prototypes_(self) -> None:
        """Re-normalise both prototype sets (call after every optimiser step)."""
        self.prototypes_2d.normalize_()
        if self.prototypes_3d is not None:
            self.prototypes_3d.normalize_()

    def set_prototypes_frozen(self, frozen: bool) -> None:
        """Freeze both prototype sets (``True``: no gradient, the optimiser skips them) or unfreeze them."""
        self.prototypes_2d.set_frozen(frozen)
        if self.prototypes_3d is not None:
            self.prototypes_3d.set_frozen(frozen)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Slice embeddings, so the bare model works as a feature extractor: (N,1,H,W) -> (N, D)."""
        return self.embed_slices(images)
