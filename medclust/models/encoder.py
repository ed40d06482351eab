"""The 2D slice encoder: a MONAI ResNet backbone (the FlexibleUNet encoder) plus a pooled embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets.resnet import ResNetEncoder
from torch import nn

from medclust.errors import MedclustError

__all__ = ["SliceEncoder", "backbone_channels"]


def backbone_channels(backbone: str) -> tuple[int, ...]:
    """Channels of the five feature maps a MONAI ``ResNetEncoder`` returns.

    Args:
        backbone: one of ``ResNetEncoder.backbone_names`` (``resnet10`` ... ``resnet200``).

    Returns:
        The channel count of each of the 5 stages, shallow to deep.

    Raises:
        MedclustError: the name is not a MONAI ResNet encoder.
    """
    names = ResNetEncoder.backbone_names
    if backbone not in names:
        raise MedclustError(f"backbone: unknown ResNet encoder {backbone!r}; choose one of {', '.join(names)}")
    return tuple(ResNetEncoder.num_channels_per_output()[names.index(backbone)])


class SliceEncoder(nn.Module):
    """Embeds 2D images (X-rays or CT/MR slices) into ``d_model`` vectors.

    The backbone is exactly the module MONAI's ``FlexibleUNet`` builds as its encoder, so the
    pretrained weights (:meth:`export_backbone_state`) drop into a segmentation network with
    ``strict=True``. The embedding pools every stage, not just the last, because the shallow
    stages carry the texture/intensity cues a U-Net decoder later relies on; each stage is
    L2-normalised first so the 512-channel stage cannot drown the 64-channel ones.

    Args:
        backbone: MONAI ResNet encoder name (``resnet10``, ``resnet18``, ``resnet34``, ``resnet50``, ...).
        d_model: size of the slice embedding.
        in_channels: image channels (1 for CT/MR/X-ray; more for 2.5D stacks).

    Example:
        >>> enc = SliceEncoder("resnet10", d_model=128)
        >>> enc(torch.randn(4, 1, 64, 64)).shape
        torch.Size([4, 128])
    """

    def __init__(self, backbone: str = "resnet10", d_model: int = 128, in_channels: int = 1) -> None:
        super().__init__()
        self.backbone_name = backbone
        self.d_model = int(d_model)
        self.in_channels = int(in_channels)
        self.feature_channels = backbone_channels(backbone)
        self.backbone = ResNetEncoder(backbone, pretrained=False, spatial_dims=2, in_channels=in_channels)
        self.proj = nn.Linear(sum(self.feature_channels), self.d_model)

    def stage_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Global-average-pooled, L2-normalised features of each backbone stage.

        Args:
            images: (N, in_channels, H, W).

        Returns:
            Five tensors (N, C_i), each row of unit norm.
        """
        if images.ndim != 4 or images.shape[1] != self.in_channels:
            raise MedclustError(
                f"SliceEncoder: expected images of shape (N, {self.in_channels}, H, W), got {tuple(images.shape)}"
            )
        feats = self.backbone(images)
        return [F.normalize(f.mean(dim=(2, 3)), dim=1) for f in feats]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Slice embeddings.

        Args:
            images: (N, in_channels, H, W) float.

        Returns:
            (N, d_model) embeddings (not normalised; projection heads normalise).
        """
        return self.proj(torch.cat(self.stage_features(images), dim=1))

    def export_backbone_state(self) -> dict[str, torch.Tensor]:
        """The plain backbone ``state_dict`` (CPU copies), the ``encoder.pt`` format.

        Loads with ``strict=True`` into ``ResNetEncoder(backbone, pretrained=False, spatial_dims=2,
        in_channels=...)`` and into ``FlexibleUNet(in_channels, C, backbone=backbone, pretrained=False,
        spatial_dims=2).encoder``.

        Returns:
            Parameter and buffer name -> detached CPU tensor.
        """
        return {k: v.detach().to("cpu", copy=True) for k, v in self.backbone.state_dict().items()}
