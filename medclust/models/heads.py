"""Downstream task networks on the pretrained 2D encoder: segmentation, classification, heatmaps.

Every network exposes the MONAI ``ResNetEncoder`` as ``.encoder`` so that a pretraining
``encoder.pt`` (``ResNetEncoder.state_dict()``) loads into it with ``strict=True``
(:func:`load_encoder_weights`). 2.5D inputs (``2k+1`` neighbouring slices as channels) change
only the first convolution; :func:`adapt_first_conv` turns the pretrained 1-channel kernel into a
``2k+1``-channel one by repeating it and dividing by ``2k+1``, so a stack of identical slices
gives exactly the pretrained response and the centre slice keeps the pretrained weighting on
average.

A frozen encoder (``freeze_encoder=True``) has no trainable parameters and stays in eval mode
even while the rest of the network trains, so its BatchNorm running statistics never move:
the pretrained representation is evaluated as-is (linear probe / decoder-only training).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import torch
from monai.networks.nets import FlexibleUNet
from monai.networks.nets.resnet import ResNetEncoder
from torch import nn

from medclust.errors import MedclustError
from medclust.io.weights import load_weights_file
from medclust.models.encoder import backbone_channels

HEATMAP_PRIOR = 0.01

__all__ = [
    "ClassificationNet",
    "SegmentationNet",
    "adapt_first_conv",
    "build_task_model",
    "heatmap_focal_loss",
    "HeatmapFocalLoss",
    "load_encoder_weights",
]


def adapt_first_conv(state: Mapping[str, torch.Tensor], in_channels: int) -> dict[str, torch.Tensor]:
    """Make a 1-channel encoder state dict fit an encoder with ``in_channels`` input channels.

    The first convolution kernel (the first tensor of rank >= 3 in the state dict, ``conv1.weight``
    for ResNets) of shape ``(O, c, ...)`` becomes ``(O, in_channels, ...)``: repeated across
    channels and scaled by ``c / in_channels``, so the response to ``in_channels`` copies of a
    slice equals the pretrained response to that slice. When ``c == in_channels`` the state is
    returned unchanged.

    Args:
        state: encoder ``state_dict`` (e.g. the pretraining ``encoder.pt``).
        in_channels: input channels of the target encoder.

    Returns:
        A new state dict (tensors not copied unless changed).

    Raises:
        MedclustError: no convolution kernel found, or ``in_channels`` not a multiple of ``c``.
    """
    out = dict(state)
    key = next((k for k, v in state.items() if k.endswith("weight") and v.ndim >= 3), None)
    if key is None:
        raise MedclustError("encoder weights: no convolution kernel found to adapt the input channels")
    weight = state[key]
    have = weight.shape[1]
    if have == in_channels:
        return out
    if in_channels % have:
        raise MedclustError(
            f"encoder weights: cannot adapt a {have}-channel first convolution ({key}) to {in_channels} channels"
        )
    reps = in_channels // have
    out[key] = weight.repeat(1, reps, *([1] * (weight.ndim - 2))) / reps
    return out


def load_encoder_weights(
    encoder: nn.Module, source: str | os.PathLike[str] | Mapping[str, torch.Tensor], strict: bool = True
) -> None:
    """Load pretrained encoder weights (``encoder.pt``) into ``encoder``, adapting the input channels.

    Args:
        encoder: the MONAI ``ResNetEncoder`` (e.g. ``FlexibleUNet(...).encoder``).
        source: path of a ``torch.save``-d state dict (loaded with ``weights_only=True``) or the state dict.
        strict: passed to ``load_state_dict``; every key must match.

    Raises:
        MedclustError: the file cannot be read or the weights do not fit, naming the file.
    """
    name = "encoder weights"
    if isinstance(source, Mapping):
        state = dict(source)
    else:
        name = str(source)
        state = load_weights_file(source, "encoder weights")
        if not isinstance(state, Mapping):
            raise MedclustError(f"{name}: expected a state dict, got {type(state).__name__}")
    first = next((v for v in encoder.state_dict().values() if v.ndim >= 3), None)
    if first is not None:
        try:
            state = adapt_first_conv(state, first.shape[1])
        except MedclustError as err:
            raise MedclustError(f"{name}: {err}") from err
    try:
        encoder.load_state_dict(state, strict=strict)
    except RuntimeError as err:
        raise MedclustError(f"{name}: does not fit the {type(encoder).__name__}: {str(err).splitlines()[0]}") from err


class _FreezableEncoder:
    """Mixin: ``freeze_encoder()`` and a ``train()`` that keeps a frozen encoder in eval mode."""

    encoder: nn.Module
    encoder_frozen: bool = False

    def freeze_encoder(self) -> None:
        """Stop gradients into the encoder and keep its BatchNorm statistics fixed."""
        self.encoder_frozen = True
        for param in self.encoder.parameters():
            param.requires_grad_(False)
        self.encoder.eval()

    def train(self, mode: bool = True):  # noqa: ANN201 - nn.Module signature
        nn.Module.train(self, mode)  # type: ignore[arg-type]
        if self.encoder_frozen:
            self.encoder.eval()
        return self


class SegmentationNet(_FreezableEncoder, FlexibleUNet):
    """MONAI ``FlexibleUNet`` (2D) whose encoder can be frozen; also the detection heatmap network.

    Args:
        in_channels: input channels (``2k+1`` for 2.5D).
        out_channels: classes including background (segmentation) or 1 (centre heatmap).
        backbone: MONAI ResNet encoder name, as in pretraining.
        decoder_channels: U-Net decoder widths (5 values, deep to shallow).
        freeze_encoder: train the decoder and head only.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        backbone: str = "resnet10",
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
        freeze_encoder: bool = False,
    ) -> None:
        backbone_channels(backbone)  # a readable error for unknown names
        FlexibleUNet.__init__(
            self,
            in_channels,
            out_channels,
            backbone=backbone,
            pretrained=False,
            decoder_channels=tuple(int(c) for c in decoder_channels),
            spatial_dims=2,
        )
        self.in_channels = int(in_channels)
        if freeze_encoder:
            self.freeze_encoder()


class ClassificationNet(_FreezableEncoder, nn.Module):
    """Pooled encoder features -> a linear or small MLP head (image, slice or bag-of-slices level).

    Features are the global-average-pooled maps of every encoder stage, concatenated (the same
    pooling as the pretraining ``SliceEncoder``, without its L2 normalisation so a linear head
    can use the magnitudes). A 5-D input ``(B, N, C, H, W)`` is a bag of ``N`` slices per item:
    its slice features are averaged before the head (case-level labels on volumes).

    Args:
        in_channels: input channels (``2k+1`` for 2.5D).
        num_classes: output logits.
        backbone: MONAI ResNet encoder name.
        head: ``linear`` or ``mlp`` (one hidden layer of ``hidden`` units, ReLU, dropout).
        hidden: MLP width.
        dropout: dropout before the output layer.
        freeze_encoder: linear probe / head-only training.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        backbone: str = "resnet10",
        head: str = "linear",
        hidden: int = 256,
        dropout: float = 0.0,
        freeze_encoder: bool = False,
    ) -> None:
        nn.Module.__init__(self)
        self.in_channels = int(in_channels)
        self.encoder = ResNetEncoder(backbone, pretrained=False, spatial_dims=2, in_channels=in_channels)
        features = sum(backbone_channels(backbone))
        if head == "linear":
            self.head: nn.Module = nn.Sequential(nn.Dropout(dropout), nn.Linear(features, num_classes))
        elif head == "mlp":
            self.head = nn.Sequential(
                nn.Linear(features, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
            )
        else:
            raise MedclustError(f"finetune head: unknown head {head!r}; choose linear or mlp")
        if freeze_encoder:
            self.freeze_encoder()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Concatenated pooled stage features ``(N, sum(C_i))`` of images ``(N, C, H, W)``."""
        return torch.cat([f.mean(dim=(2, 3)) for f in self.encoder(images)], dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` of images ``(B, C, H, W)`` or slice bags ``(B, N, C, H, W)``."""
        if images.ndim == 5:
            b, n = images.shape[:2]
            feats = self.features(images.flatten(0, 1)).view(b, n, -1).mean(dim=1)
        else:
            feats = self.features(images)
        return self.head(feats)


def build_task_model(
    task_type: str,
    in_channels: int,
    num_outputs: int,
    backbone: str = "resnet10",
    decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
    head: str = "linear",
    hidden: int = 256,
    dropout: float = 0.0,
    freeze_encoder: bool = False,
    encoder_weights: str | os.PathLike[str] | Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """The network of a downstream task, optionally initialised from a pretrained encoder.

    Args:
        task_type: ``segmentation`` (FlexibleUNet, ``num_outputs`` = classes incl. background),
            ``detection`` (FlexibleUNet with one centre-heatmap channel) or ``classification``.
        in_channels: input channels (``2k+1``).
        num_outputs: segmentation classes incl. background, or classification logits
            (ignored for detection).
        backbone: MONAI ResNet encoder name (must match the pretraining backbone).
        decoder_channels: U-Net decoder widths (segmentation, detection).
        head: classification head, ``linear`` or ``mlp``.
        hidden: MLP width.
        dropout: classification head dropout.
        freeze_encoder: encoder not trained (frozen mode).
        encoder_weights: ``encoder.pt`` path or state dict; ``None`` = random init.

    Returns:
        The model, on CPU.
    """
    if task_type in ("segmentation", "detection"):
        model: nn.Module = SegmentationNet(
            in_channels,
            num_outputs if task_type == "segmentation" else 1,
            backbone=backbone,
            decoder_channels=decoder_channels,
        )
        if task_type == "detection":
            # CenterNet prior: start at p = 0.01 everywhere, else the first steps are spent
            # pushing down a 0.5 heatmap (a focal loss hundreds of times its converged value)
            conv = [m for m in model.segmentation_head.modules() if isinstance(m, nn.Conv2d)][-1]
            nn.init.constant_(conv.bias, -math.log((1 - HEATMAP_PRIOR) / HEATMAP_PRIOR))
    elif task_type == "classification":
        model = ClassificationNet(in_channels, num_outputs, backbone=backbone, head=head, hidden=hidden, dropout=dropout)
    else:
        raise MedclustError(f"finetune task type: unknown {task_type!r}; choose segmentation, classification or detection")
    if encoder_weights is not None:
        load_encoder_weights(model.encoder, encoder_weights, strict=True)
    if freeze_encoder:
        model.freeze_encoder()  # type: ignore[operator]
    return model


def heatmap_focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 2.0,
    beta: float = 4.0,
    ignore: torch.Tensor | None = None,
) -> torch.Tensor:
    """Penalty-reduced focal loss on Gaussian centre heatmaps (CenterNet, Zhou et al. 2019).

    Pixels where ``target == 1`` are object centres; every other pixel is a negative whose
    penalty shrinks by ``(1 - target) ** beta`` near a centre, so the blob around a centre is
    not punished as hard as background. Normalised by the number of centres (at least 1).

    Args:
        logits: (N, 1, H, W) raw heatmap.
        target: (N, 1, H, W) in [0, 1], exactly 1 at centres.
        alpha: focusing exponent.
        beta: penalty reduction exponent.
        ignore: optional bool mask, True = pixel excluded from the loss.

    Returns:
        Scalar loss.
    """
    prob = torch.sigmoid(logits.float()).clamp(1e-4, 1 - 1e-4)
    target = target.float()
    pos = target.ge(1.0 - 1e-6).float()
    neg = 1.0 - pos
    if ignore is not None:
        keep = (~ignore).float()
        pos, neg = pos * keep, neg * keep
    pos_loss = -(torch.log(prob) * (1 - prob) ** alpha * pos).sum()
    neg_loss = -(torch.log(1 - prob) * prob**alpha * (1 - target) ** beta * neg).sum()
    return (pos_loss + neg_loss) / pos.sum().clamp(min=1.0)


class HeatmapFocalLoss(nn.Module):
    """Module form of :func:`heatmap_focal_loss`."""

    def __init__(self, alpha: float = 2.0, beta: float = 4.0) -> None:
        super().__init__()
        self.alpha, self.beta = alpha, beta

    def forward(self, logits: torch.Tensor, target: torch.Tensor, ignore: torch.Tensor | None = None) -> torch.Tensor:
        return heatmap_focal_loss(logits, target, self.alpha, self.beta, ignore)
