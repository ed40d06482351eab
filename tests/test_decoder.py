"""ConvDecoder: output shapes (cropped to any size), input checks, and that it learns to reconstruct."""

import pytest
import torch
from torch import nn

from medclust.errors import MedclustError
from medclust.models.decoder import ConvDecoder


@pytest.mark.parametrize(
    "out_size, channels, base",
    [((64, 64), (32, 32, 16, 16), (8, 8)), ((30, 45), (8, 4), (15, 23)), ((7, 5), (4,), (7, 5))],
)
def test_decoder_shapes(out_size, channels, base):
    dec = ConvDecoder(16, out_size, channels)
    assert dec.base_size == base
    out = dec(torch.randn(3, 16))
    assert out.shape == (3, 1, *out_size)
    assert ConvDecoder(16, out_size, channels, out_channels=2)(torch.randn(1, 16)).shape == (1, 2, *out_size)


def test_decoder_is_built_from_monai_transposed_convolutions():
    dec = ConvDecoder(16, (32, 32), (8, 8, 4))
    ups = [m for m in dec.up.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert len(ups) == 2 and all(m.stride == (2, 2) for m in ups)


def test_decoder_rejects_bad_input():
    dec = ConvDecoder(16, (8, 8))
    with pytest.raises(MedclustError, match=r"\(N, 16\)"):
        dec(torch.randn(2, 15))
    with pytest.raises(MedclustError, match="out_size"):
        ConvDecoder(16, (8,))
    with pytest.raises(MedclustError, match="channels"):
        ConvDecoder(16, (8, 8), ())


def test_decoder_learns_to_reconstruct_a_tiny_batch():
    torch.manual_seed(0)
    emb = torch.randn(4, 16)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    # four distinct smooth images: blobs at different places
    centres = [(-0.5, -0.5), (0.5, 0.5), (-0.5, 0.5), (0.5, -0.5)]
    images = torch.stack([torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.1) for cy, cx in centres])[:, None]
    dec = ConvDecoder(16, (16, 16), (16, 8, 8))
    opt = torch.optim.Adam(dec.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = nn.functional.mse_loss(dec(emb), images)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], (losses[0], losses[-1])
