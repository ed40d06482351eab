"""SwAV, DeepCluster-v2, 3D agreement and masked-embedding objectives: values, state, and learning."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medclust.errors import MedclustError
from medclust.losses import (
    Agreement3DLoss,
    DeepClusterLoss,
    MaskedEmbeddingLoss,
    MemoryBank,
    SwAVLoss,
    agreement3d_loss,
    deepcluster_loss,
    masked_embedding_loss,
    sinkhorn,
    spherical_kmeans,
    swapped_prediction_loss,
    swav_loss,
)
from medclust.models import Prototypes, SliceAttention


def _blobs(n_per=16, k=4, dim=16, noise=0.3, seed=0):
    """k well-separated Gaussian clusters: (n_per*k, dim) points and their labels."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(k, dim, generator=g), dim=1) * 3
    labels = torch.arange(k).repeat_interleave(n_per)
    return centres[labels] + noise * torch.randn(len(labels), dim, generator=g), labels


# ---- SwAV -------------------------------------------------------------------------------------
def test_swav_loss_value_and_gradients():
    torch.manual_seed(0)
    s1, s2 = torch.randn(6, 5, requires_grad=True), torch.randn(6, 5, requires_grad=True)
    q1, q2 = sinkhorn(s1, 0.05, 3), sinkhorn(s2, 0.05, 3)
    t = 0.1
    manual = -0.5 * ((q2 * F.log_softmax(s1 / t, 1)).sum(1).mean() + (q1 * F.log_softmax(s2 / t, 1)).sum(1).mean())
    loss = swav_loss(s1, s2, q1, q2, t)
    torch.testing.assert_close(loss, manual)
    loss.backward()
    assert s1.grad.abs().sum() > 0 and s2.grad.abs().sum() > 0
    # multi-crop form: 3 views, codes from the first two
    s3 = torch.randn(6, 5)
    multi = swapped_prediction_loss([s1, s2, s3], [q1, q2], t)
    lp = [F.log_softmax(x / t, 1) for x in (s1, s2, s3)]
    terms = [-(q1 * lp[1]).sum(1).mean(), -(q1 * lp[2]).sum(1).mean(), -(q2 * lp[0]).sum(1).mean(), -(q2 * lp[2]).sum(1).mean()]
    torch.testing.assert_close(multi, torch.stack(terms).mean())
    with pytest.raises(MedclustError, match="temperature"):
        swav_loss(s1, s2, q1, q2, 0.0)


def test_swav_queue_used_only_when_full_and_checkpointed():
    torch.manual_seed(0)
    protos = Prototypes(8, 5)
    loss_fn = SwAVLoss(temperature=0.1, queue_length=12, feature_dim=8)
    assert {"queue", "queue_count"} <= set(loss_fn.state_dict())
    with pytest.raises(MedclustError, match="queue"):
        loss_fn(torch.randn(4, 5), torch.randn(4, 5))

    def batch(seed):
        g = torch.Generator().manual_seed(seed)
        z1, z2 = F.normalize(torch.randn(4, 8, generator=g), dim=1), F.normalize(torch.randn(4, 8, generator=g), dim=1)
        return protos(z1), protos(z2), z1, z2

    for step in range(3):
        s1, s2, z1, z2 = batch(step)
        assert not loss_fn.queue_full
        plain = swav_loss(s1, s2, sinkhorn(s1, 0.05, 3), sinkhorn(s2, 0.05, 3), 0.1)
        torch.testing.assert_close(loss_fn(s1, s2, z1, z2, protos), plain)  # partial queue: unused
    assert loss_fn.queue_full and int(loss_fn.queue_count) == 12
    torch.testing.assert_close(loss_fn.queue[0, :4], z1)  # newest first
    s1, s2, z1, z2 = batch(10)
    q_codes = loss_fn.codes(s1, 0, protos)
    expect = sinkhorn(torch.cat([s1, protos(loss_fn.queue[0])]), 0.05, 3)[:4]
    torch.testing.assert_close(q_codes, expect)
    assert not torch.allclose(q_codes, sinkhorn(s1, 0.05, 3))

    fresh = SwAVLoss(temperature=0.1, queue_length=12, feature_dim=8)
    fresh.load_state_dict(loss_fn.state_dict())
    assert fresh.queue_full
    torch.testing.assert_close(fresh(s1, s2, z1, z2, protos), loss_fn(s1, s2, z1, z2, protos))
    # eval mode does not update the queue
    fresh.eval()
    before = fresh.queue.clone()
    fresh(*batch(11), protos)
    torch.testing.assert_close(fresh.queue, before)
    fresh.reset_queue_()
    assert not fresh.queue_full


# ---- DeepCluster-v2 ---------------------------------------------------------------------------
def test_spherical_kmeans_recovers_separated_clusters():
    x, labels = _blobs(n_per=20, k=4)
    cent, assign = spherical_kmeans(x, 4, iterations=10, seed=0)
    torch.testing.assert_close(cent.norm(dim=1), torch.ones(4))
    # each true cluster maps to one k-means cluster (purity 1); try a few seeds for init luck
    best = 0.0
    for seed in range(3):
        _, assign = spherical_kmeans(x, 4, iterations=10, seed=seed)
        purity = sum(torch.bincount(assign[labels == c], minlength=4).max().item() for c in range(4)) / len(x)
        best = max(best, purity)
    assert best == 1.0
    # fewer points than clusters: no crash, valid ids
    c2, a2 = spherical_kmeans(x[:3], 5, iterations=3)
    assert c2.shape == (5, 16) and a2.max() < 5 and torch.isfinite(c2).all()
    with pytest.raises(MedclustError, match="non-empty"):
        spherical_kmeans(torch.zeros(0, 4), 2)


def test_memory_bank_ring_buffer_and_cluster_table():
    bank = MemoryBank(size=5, dim=3)
    bank.add(torch.ones(3, 3), torch.tensor([10, 11, 12]))
    bank.add(2 * torch.ones(3, 3), torch.tensor([13, 14, 15]))  # wraps: overwrites row 0
    emb, idx = bank.filled()
    assert sorted(idx.tolist()) == [11, 12, 13, 14, 15]
    assert int(bank.ptr) == 1
    fresh = MemoryBank(5, 3)
    fresh.load_state_dict(bank.state_dict())
    torch.testing.assert_close(fresh.indices, bank.indices)
    _, table = fresh.cluster(2, num_items=20, iterations=3)
    assert table.shape == (20,)
    assert (table[[11, 12, 13, 14, 15]] >= 0).all() and (table[:11] == -1).all()
    with pytest.raises(MedclustError, match="num_items"):
        fresh.cluster(2, num_items=12)
    with pytest.raises(MedclustError, match="empty"):
        MemoryBank(4, 3).cluster(2, num_items=4)


def test_deepcluster_loss_value_and_ignored_items():
    torch.manual_seed(0)
    s = torch.randn(5, 4, requires_grad=True)
    a = torch.tensor([0, 3, -1, 1, 2])
    loss = deepcluster_loss(s, a, 0.1)
    keep = a >= 0
    torch.testing.assert_close(loss, F.cross_entropy(s[keep] / 0.1, a[keep]))
    torch.testing.assert_close(DeepClusterLoss(0.1)(s, a), loss)
    none = deepcluster_loss(s, torch.full((5,), -1), 0.1)
    assert none.item() == 0.0
    none.backward()
    assert torch.count_nonzero(s.grad) == 0


# ---- masked embedding -------------------------------------------------------------------------
def test_masked_loss_only_counts_masked_positions():
    torch.manual_seed(0)
    pred = torch.randn(2, 6, 8, requires_grad=True)
    target = torch.randn(2, 6, 8, requires_grad=True)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 1], mask[1, 4], mask[1, 5] = True, True, True
    loss = masked_embedding_loss(pred, target, mask)
    cos = F.cosine_similarity(pred[mask], target[mask], dim=-1)
    torch.testing.assert_close(loss, (1 - cos).mean())  # mean over the 3 masked, not over 12
    changed = pred.detach().clone()
    changed[~mask] = torch.randn_like(changed[~mask]) * 100
    changed[0, 0] = float("nan")
    torch.testing.assert_close(masked_embedding_loss(changed, target, mask), loss.detach())
    loss.backward()
    assert torch.count_nonzero(pred.grad[~mask]) == 0 and pred.grad[mask].abs().sum() > 0
    assert target.grad is None  # stop-gradient target
    mse = MaskedEmbeddingLoss("mse")(pred, target, mask)
    torch.testing.assert_close(mse, (2 - 2 * cos).mean())


def test_masked_loss_without_masked_positions_is_zero_not_nan():
    pred = torch.randn(2, 4, 8, requires_grad=True)
    loss = masked_embedding_loss(pred, torch.randn(2, 4, 8), torch.zeros(2, 4, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(pred.grad).all() and torch.count_nonzero(pred.grad) == 0
    with pytest.raises(MedclustError, match="kind"):
        masked_embedding_loss(pred, pred, torch.zeros(2, 4, dtype=torch.bool), kind="l1")
    with pytest.raises(MedclustError, match="shapes"):
        masked_embedding_loss(pred, pred, torch.zeros(2, 5, dtype=torch.bool))


# ---- agreement3d ------------------------------------------------------------------------------
def test_agreement3d_is_swav_on_volume_scores():
    torch.manual_seed(0)
    s1, s2 = torch.randn(3, 7), torch.randn(3, 7)
    expect = swav_loss(s1, s2, sinkhorn(s1, 0.05, 3), sinkhorn(s2, 0.05, 3), 0.1)
    torch.testing.assert_close(agreement3d_loss(s1, s2, 0.1, 0.05, 3), expect)
    torch.testing.assert_close(Agreement3DLoss(0.1, 0.05, 3)(s1, s2), expect)


# ---- each objective trains a tiny model -------------------------------------------------------
def _decreased(losses, n=5):
    first, last = sum(losses[:n]) / n, sum(losses[-n:]) / n
    return last < first, (first, last)


def test_swav_trains():
    torch.manual_seed(0)
    x, _ = _blobs(n_per=16, k=4)
    net, protos = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16)), Prototypes(16, 8)
    opt = torch.optim.Adam([*net.parameters(), *protos.parameters()], lr=1e-2)
    loss_fn, losses = SwAVLoss(temperature=0.1, epsilon=0.05), []
    for _ in range(40):
        z1 = F.normalize(net(x + 0.3 * torch.randn_like(x)), dim=1)
        z2 = F.normalize(net(x + 0.3 * torch.randn_like(x)), dim=1)
        loss = loss_fn(protos(z1), protos(z2))
        opt.zero_grad()
        loss.backward()
        opt.step()
        protos.normalize_()
        losses.append(loss.item())
    ok, vals = _decreased(losses)
    assert ok, vals


def test_deepcluster_trains():
    torch.manual_seed(0)
    x, _ = _blobs(n_per=16, k=4)
    net, protos = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16)), Prototypes(16, 4)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    bank, loss_fn, losses = MemoryBank(len(x), 16), DeepClusterLoss(0.1), []
    idx = torch.arange(len(x))
    with torch.no_grad():
        bank.add(F.normalize(net(x), dim=1), idx)
    for epoch in range(4):
        cent, table = bank.cluster(4, num_items=len(x), iterations=10, seed=epoch)
        protos.load_centroids_(cent)
        for _ in range(8):
            z = F.normalize(net(x + 0.3 * torch.randn_like(x)), dim=1)
            loss = loss_fn(protos(z), table[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            bank.add(z.detach(), idx)
            losses.append(loss.item())
    ok, vals = _decreased(losses)
    assert ok, vals


def _volumes(b=4, s=10, d=16, seed=0):
    """Volumes whose slice tokens vary smoothly along z; volume identity = its base pattern."""
    g = torch.Generator().manual_seed(seed)
    base, slope = torch.randn(b, 1, d, generator=g), torch.randn(b, 1, d, generator=g)
    z = torch.arange(s, dtype=torch.float32)[None].repeat(b, 1) * 2.0
    tokens = base + slope * torch.sin(z[..., None] / 6.0)
    return tokens, z, torch.ones(b, s, dtype=torch.bool)


def test_agreement3d_trains():
    torch.manual_seed(0)
    tokens, z, valid = _volumes()
    att = SliceAttention(16, heads=2, points=2, layers=1)
    head, protos = nn.Linear(16, 16), Prototypes(16, 6)
    params = [*att.parameters(), *head.parameters(), *protos.parameters()]
    opt = torch.optim.Adam(params, lr=5e-3)
    loss_fn, losses = Agreement3DLoss(temperature=0.1, queue_length=8, feature_dim=16), []

    def view():
        keep = torch.rand(valid.shape) > 0.3  # a slice subset
        keep[:, 0] = True
        t = tokens + 0.2 * torch.randn_like(tokens)
        out = att(t, z, keep)
        pooled = (out * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)
        return F.normalize(head(pooled), dim=1)

    for _ in range(30):
        v1, v2 = view(), view()
        loss = loss_fn(protos(v1), protos(v2), v1, v2, protos)
        opt.zero_grad()
        loss.backward()
        opt.step()
        protos.normalize_()
        losses.append(loss.item())
    ok, vals = _decreased(losses)
    assert ok, vals


def test_masked_embedding_trains():
    torch.manual_seed(0)
    tokens, z, valid = _volumes(b=4, s=12)
    att = SliceAttention(16, heads=2, points=2, layers=1, init_span_mm=4.0)
    pred_head, mask_token = nn.Linear(16, 16), nn.Parameter(torch.zeros(16))
    opt = torch.optim.Adam([*att.parameters(), *pred_head.parameters(), mask_token], lr=5e-3)
    loss_fn, losses = MaskedEmbeddingLoss(), []
    for _ in range(30):
        mask = torch.rand(valid.shape) < 0.3
        mask[:, 0] = False
        inp = torch.where(mask[..., None], mask_token, tokens)
        loss = loss_fn(pred_head(att(inp, z, valid)), tokens, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    ok, vals = _decreased(losses)
    assert ok, vals
