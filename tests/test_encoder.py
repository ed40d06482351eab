"""SliceEncoder: shapes, pooled per-stage embedding, and the FlexibleUNet-compatible backbone export."""

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import FlexibleUNet
from monai.networks.nets.resnet import ResNetEncoder

from medclust.errors import MedclustError
from medclust.models import JointModel, Prototypes, SliceAttention, SliceEncoder, backbone_channels


def test_forward_shape_and_stage_normalisation():
    torch.manual_seed(0)
    enc = SliceEncoder("resnet10", d_model=32)
    x = torch.randn(3, 1, 32, 32)
    stages = enc.stage_features(x)
    assert [s.shape[1] for s in stages] == list(backbone_channels("resnet10")) == [64, 64, 128, 256, 512]
    for s in stages:
        torch.testing.assert_close(s.norm(dim=1), torch.ones(3))
    out = enc(x)
    assert out.shape == (3, 32)
    torch.testing.assert_close(out, enc.proj(torch.cat(stages, 1)))


def test_export_backbone_loads_strict_into_resnet_encoder_and_flexible_unet():
    torch.manual_seed(0)
    enc = SliceEncoder("resnet10", d_model=16)
    state = enc.export_backbone_state()
    assert all(v.device.type == "cpu" for v in state.values())
    assert not any(k.startswith("proj") for k in state)

    fresh = ResNetEncoder("resnet10", pretrained=False, spatial_dims=2, in_channels=1)
    fresh.load_state_dict(state, strict=True)
    unet = FlexibleUNet(1, 3, backbone="resnet10", pretrained=False, spatial_dims=2)
    unet.encoder.load_state_dict(state, strict=True)

    # the weights really transferred: same features from both
    enc.eval(), fresh.eval(), unet.eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        for a, b, c in zip(enc.backbone(x), fresh(x), unet.encoder(x)):
            torch.testing.assert_close(a, b)
            torch.testing.assert_close(a, c)


def test_export_is_a_copy():
    enc = SliceEncoder("resnet10", d_model=8)
    state = enc.export_backbone_state()
    key = next(k for k in state if k.endswith("weight"))
    state[key].zero_()
    assert enc.backbone.state_dict()[key].abs().sum() > 0


def test_bad_backbone_and_bad_input():
    with pytest.raises(MedclustError, match="resnet7"):
        SliceEncoder("resnet7")
    enc = SliceEncoder("resnet10", d_model=8)
    with pytest.raises(MedclustError, match=r"\(N, 1, H, W\)"):
        enc(torch.randn(2, 3, 16, 16))


def test_prototypes_normalise_freeze_and_centroids():
    torch.manual_seed(0)
    p = Prototypes(8, 5)
    torch.testing.assert_close(p.weight.norm(dim=1), torch.ones(5))
    with torch.no_grad():
        p.weight.mul_(3.0)
    p.normalize_()
    torch.testing.assert_close(p.weight.norm(dim=1), torch.ones(5))

    z = F.normalize(torch.randn(4, 8), dim=1).requires_grad_()
    p.set_frozen(True)
    p(z).sum().backward()
    assert p.weight.grad is None  # missing, not zero: the optimiser must skip it (SwAV's grad = None)
    assert z.grad is not None and z.grad.abs().sum() > 0  # the features still learn against frozen rows
    p.set_frozen(False)
    p(z).sum().backward()
    assert p.weight.grad.abs().sum() > 0
    p.cancel_gradients_()
    assert p.weight.grad is None

    c = torch.randn(5, 8) * 4
    p.load_centroids_(c)
    torch.testing.assert_close(p.weight, F.normalize(c, dim=1))
    with pytest.raises(MedclustError, match="shape"):
        p.load_centroids_(torch.randn(4, 8))


def test_joint_model_building_blocks():
    torch.manual_seed(0)
    d = 16
    model = JointModel(SliceEncoder("resnet10", d), SliceAttention(d, heads=2, points=2, layers=1), d_model=d,
                       proj_dim=8, k_2d=6, k_3d=4, mask_ratio=0.5)
    imgs = torch.randn(6, 1, 32, 32)
    emb = model.embed_slices(imgs)
    assert emb.shape == (6, d)
    z, s = model.forward_2d(imgs)
    assert z.shape == (6, 8) and s.shape == (6, 6)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(6))

    tokens = torch.randn(2, 5, d)
    zmm = torch.arange(5.0).repeat(2, 1) * 3.0
    valid = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    mask = model.sample_mask(valid, generator=torch.Generator().manual_seed(0))
    assert not (mask & ~valid).any()
    assert mask.sum(1).tolist() == [2, 2]  # round(0.5 * 5) = 2 (banker's), round(1.5) = 2
    assert ((valid & ~mask).sum(1) >= 1).all()
    out, vol, scores = model.forward_3d(tokens, zmm, valid, mask)
    assert out.shape == (2, 5, d) and vol.shape == (2, 8) and scores.shape == (2, 4)
    torch.testing.assert_close(vol.norm(dim=1), torch.ones(2))
    assert model.predict_masked(out).shape == (2, 5, d)

    # the mask token replaces masked inputs: masking changes outputs, and gets a gradient
    out_nomask, _ = model.embed_volume(tokens, zmm, valid)
    assert not torch.allclose(out, out_nomask)
    model.predict_masked(out).pow(2).sum().backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0

    # one real slice: nothing to mask; ratio 0: nothing masked
    one = torch.tensor([[True, False, False]])
    assert model.sample_mask(one).sum() == 0
    assert model.sample_mask(valid, ratio=0.0).sum() == 0

    with pytest.raises(MedclustError, match="d_model"):
        JointModel(SliceEncoder("resnet10", 8), SliceAttention(16), d_model=16)


def test_joint_model_2d_only_has_no_volume_parameters():
    torch.manual_seed(0)
    model = JointModel(SliceEncoder("resnet10", 8), None, d_model=8, proj_dim=4, k_2d=3)
    assert not model.has_volume_branch and model.prototypes_3d is None
    _, scores = model.forward_2d(torch.randn(2, 1, 32, 32))
    scores.sum().backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert unused == []  # every parameter is used by the 2D objective (DDP without find_unused)
    model.normalize_prototypes_()
    model.set_prototypes_frozen(True)
    with pytest.raises(MedclustError, match="without slice attention"):
        model.embed_volume(torch.randn(1, 2, 8), torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool))
