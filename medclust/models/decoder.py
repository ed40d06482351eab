"""A small convolutional decoder from slice embeddings back to images (DEPICT's reconstruction term).

Used only during pretraining: the encoder half is what gets exported, the decoder is discarded.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
from monai.networks.blocks import Convolution
from torch import nn

from medclust.errors import MedclustError

__all__ = ["ConvDecoder"]

# DEPICT's autoencoder uses leaky ReLUs with slope 0.01 and no normalisation layers.
_ACT = ("leakyrelu", {"negative_slope": 0.01})


class ConvDecoder(nn.Module):
    """Maps (N, d_model) embeddings to (N, out_channels, h, w) images.

    A linear layer reshapes the embedding to ``channels[0]`` maps of size
    ``ceil(h / 2^n) x ceil(w / 2^n)`` (``n = len(channels) - 1``); ``n`` MONAI transposed convolutions
    (kernel 3, stride 2) each double the size while going from ``channels[i]`` to ``channels[i+1]``
    channels; a final 3x3 convolution (no activation) gives the image, centre-cropped to ``(h, w)``
    when ``h`` or ``w`` is not a multiple of ``2^n``. The output is linear because our images are
    intensity-normalised, not squashed to [-1, 1] as in DEPICT (whose decoder ends in tanh).

    Args:
        d_model: embedding size.
        out_size: ``(h, w)`` of the reconstructed image.
        channels: feature channels from the coarsest map to the finest; its length minus one is the
            number of upsampling steps. The default (three doublings) keeps the linear layer small:
            ``d_model * 32 * (h/8) * (w/8)`` weights, 0.26 M for d_model 128 at 64 x 64.
        out_channels: image channels.
        norm: MONAI normalisation of the upsampling blocks (None, as in DEPICT).

    Example:
        >>> dec = ConvDecoder(128, (64, 64))
        >>> dec(torch.randn(4, 128)).shape
        torch.Size([4, 1, 64, 64])
    """

    def __init__(
        self,
        d_model: int,
        out_size: Sequence[int] = (64, 64),
        channels: Sequence[int] = (32, 32, 16, 16),
        out_channels: int = 1,
        norm: tuple | str | None = None,
    ) -> None:
        super().__init__()
        out_size = tuple(int(s) for s in out_size)
        channels = tuple(int(c) for c in channels)
        if d_model < 1 or out_channels < 1:
            raise MedclustError(f"ConvDecoder: d_model and out_channels must be positive, got {d_model}, {out_channels}")
        if len(out_size) != 2 or min(out_size) < 1:
            raise MedclustError(f"ConvDecoder: out_size must be (h, w) with positive sizes, got {out_size}")
        if not channels or min(channels) < 1:
            raise MedclustError(f"ConvDecoder: channels must be a non-empty list of positive ints, got {channels}")
        self.d_model = int(d_model)
        self.out_size = out_size
        self.out_channels = int(out_channels)
        n_up = len(channels) - 1
        self.base_size = tuple(-(-s // 2**n_up) for s in out_size)  # ceil division
        self.channels = channels
        self.fc = nn.Sequential(
            nn.Linear(self.d_model, channels[0] * self.base_size[0] * self.base_size[1]), nn.LeakyReLU(0.01)
        )
        self.up = nn.Sequential(
            *(
                Convolution(2, c_in, c_out, strides=2, kernel_size=3, is_transposed=True, act=_ACT, norm=norm)
                for c_in, c_out in pairwise(channels)
            )
        )
        self.head = Convolution(2, channels[-1], self.out_channels, kernel_size=3, conv_only=True)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Reconstruct images.

        Args:
            embeddings: (N, d_model).

        Returns:
            (N, out_channels, h, w).
        """
        if embeddings.ndim != 2 or embeddings.shape[1] != self.d_model:
            raise MedclustError(
                f"ConvDecoder: expected embeddings of shape (N, {self.d_model}), got {tuple(embeddings.shape)}"
            )
        x = self.fc(embeddings).view(-1, self.channels[0], *self.base_size)
        x = self.head(self.up(x))
        (h, w), (hh, ww) = self.out_size, x.shape[-2:]
        top, left = (hh - h) // 2, (ww - w) // 2
        return x[..., top : top + h, left : left + w]

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, out_size={self.out_size}, base_size={self.base_size}"
