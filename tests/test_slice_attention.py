"""SliceAttention: padding invariance, order sensitivity, physical positions, gradients, sizes."""

import pytest
import torch

from medclust.errors import MedclustError
from medclust.models import SliceAttention
from medclust.models.slice_attention import weighted_rows
from medclust.models.slice_geometry import _count_at_or_before, build_slice_index, interpolation_weights

D = 32


def _model(**kw) -> SliceAttention:
    torch.manual_seed(0)
    m = SliceAttention(D, heads=4, points=3, layers=2, init_span_mm=8.0, **kw)
    # non-trivial offsets and attention weights (they start input-independent)
    with torch.no_grad():
        for layer in m.layers:
            layer.attn.offset_proj.weight.normal_(std=2.0)
            layer.attn.weight_proj.weight.normal_(std=0.5)
    return m.eval()


def _volume(s: int, spacing: float = 2.5, b: int = 1, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(b, s, D, generator=g)
    z = (torch.arange(s, dtype=torch.float32) * spacing - 40.0).repeat(b, 1)
    valid = torch.ones(b, s, dtype=torch.bool)
    return tokens, z, valid


def test_interpolation_between_valid_neighbours_non_uniform():
    z = torch.tensor([[0.0, 1.0, 4.0, 99.0, 10.0]])
    valid = torch.tensor([[True, True, True, False, True]])
    idx = build_slice_index(z, valid)
    # centred on the mean of real z (3.75): real z_rel = -3.75, -2.75, 0.25, 6.25; padding ignored
    pos = torch.tensor([[-3.75, -3.25, 0.25 + 3.0, 6.25, 100.0, -100.0]])
    lo, hi, w = interpolation_weights(idx, pos)
    assert lo.tolist() == [[0, 0, 2, 4, 4, 0]]
    assert hi.tolist()[0][1:4] == [1, 4, 4]
    torch.testing.assert_close(w[0, 1], torch.tensor(0.5))
    torch.testing.assert_close(w[0, 2], torch.tensor(0.5))  # 3 mm into the 6 mm gap 4 -> 10
    torch.testing.assert_close(w[0, 3:], torch.zeros(3))  # at / beyond the ends: clamped
    assert 3 not in lo.tolist()[0] + hi.tolist()[0]


def test_near_uniform_volumes_locate_samples_like_the_binary_search():
    g = torch.Generator().manual_seed(3)
    s = 64
    # volumes in shuffled slice order: 2.5 mm with each slice up to 0.08 of a step off its grid
    # point (the fitted grid's drift stays under a quarter step), 0.7 mm with its first 20 slices
    # padded, one real slice, none
    k = torch.arange(s, dtype=torch.float32)
    jitter = (torch.rand(s, generator=g) - 0.5) * 0.16 * 2.5
    perm = torch.randperm(s, generator=g)
    z = torch.stack([k * 2.5 + jitter, k * 0.7 + 300.0, k, k])[:, perm]
    valid = torch.ones(4, s, dtype=torch.bool)
    valid[1] = perm >= 20
    valid[2] = perm == 0
    valid[3] = False
    idx = build_slice_index(z, valid)
    assert idx.near_uniform
    span = (idx.z_max - idx.z_min)[:, None]
    pos = idx.z_min[:, None] - 5.0 + (span + 10.0) * torch.rand(4, 5000, generator=g)
    pos[:, :s] = idx.z_sorted.nan_to_num(posinf=0.0)  # exactly at slices too
    clamped = torch.minimum(torch.maximum(pos, idx.z_min[:, None]), idx.z_max[:, None])
    assert torch.equal(_count_at_or_before(idx, clamped), torch.searchsorted(idx.z_sorted, clamped, right=True))
    fast = interpolation_weights(idx, pos)
    slow = interpolation_weights(idx._replace(near_uniform=False), pos)
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)
    # a NaN position (a broken offset) stays NaN on both paths, whatever slices it points at
    nan = torch.full((4, 1), float("nan"))
    assert interpolation_weights(idx, nan)[2].isnan().all()
    assert interpolation_weights(idx._replace(near_uniform=False), nan)[2].isnan().all()
    # off the CPU (here the meta device, as a stand-in for a GPU) no host sync: the binary search
    assert not build_slice_index(z.to("meta"), valid.to("meta")).near_uniform
    # a drift of half a step or an irregular gap: the binary search
    wide = k * 2.5
    wide[10] += 1.3
    assert not build_slice_index(wide[None], torch.ones(1, s, dtype=torch.bool)).near_uniform
    gap = torch.cat([k[:32] * 2.5, k[32:] * 2.5 + 10.0])
    assert not build_slice_index(gap[None], torch.ones(1, s, dtype=torch.bool)).near_uniform


@pytest.mark.parametrize("impl", ["native", "bag", "gather"])
def test_padding_with_garbage_does_not_change_real_outputs(impl):
    m = _model(impl=impl)
    tokens, z, valid = _volume(7)
    ref = m(tokens, z, valid)
    pad = 5
    g_tokens = torch.cat([tokens, 1e3 * torch.randn(1, pad, D)], 1)
    g_tokens[0, -1] = float("nan")
    g_z = torch.cat([z, torch.tensor([[-1e4, 3.0, 7.7, float("nan"), 1e6]])], 1)
    g_valid = torch.cat([valid, torch.zeros(1, pad, dtype=torch.bool)], 1)
    out = m(g_tokens, g_z, g_valid)
    torch.testing.assert_close(out[:, :7], ref, atol=1e-5, rtol=0)
    assert torch.isfinite(out).all()
    # padding interleaved with real slices too
    perm = torch.tensor([0, 7, 1, 2, 8, 3, 4, 5, 9, 6, 10, 11])
    out2 = m(g_tokens[:, perm], g_z[:, perm], g_valid[:, perm])
    real = g_valid[0, perm]
    torch.testing.assert_close(out2[0, real], ref[0], atol=1e-5, rtol=0)


def test_batch_mixes_spacings_and_lengths_like_separate_calls():
    m = _model()
    t1, z1, _ = _volume(9, spacing=1.0, seed=1)
    t2, z2, _ = _volume(4, spacing=5.0, seed=2)
    o1 = m(t1, z1, torch.ones(1, 9, dtype=torch.bool))
    o2 = m(t2, z2, torch.ones(1, 4, dtype=torch.bool))
    tokens = torch.zeros(2, 9, D)
    tokens[0], tokens[1, :4] = t1[0], t2[0]
    z = torch.zeros(2, 9)
    z[0], z[1, :4] = z1[0], z2[0]
    valid = torch.zeros(2, 9, dtype=torch.bool)
    valid[0], valid[1, :4] = True, True
    out = m(tokens, z, valid)
    torch.testing.assert_close(out[0], o1[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1, :4], o2[0], atol=1e-5, rtol=0)
    assert out[1, 4:].abs().sum() == 0


def test_positions_are_physical_mm():
    m = _model()
    tokens, z, valid = _volume(8, spacing=2.0)
    ref = m(tokens, z, valid)
    # translating the volume (different scanner origin) changes nothing
    torch.testing.assert_close(m(tokens, z + 256.0, valid), ref, atol=1e-5, rtol=0)
    # same tokens at another spacing is another geometry: outputs differ
    assert not torch.allclose(m(tokens, z * 2.5, valid), ref, atol=1e-3)
    # reversed z order with tokens reversed accordingly is the same volume (equivariance)
    rev = torch.arange(7, -1, -1)
    torch.testing.assert_close(m(tokens[:, rev], z[:, rev], valid)[:, rev], ref, atol=1e-5, rtol=0)


def test_not_permutation_invariant():
    m = _model()
    tokens, z, valid = _volume(10)
    ref = m(tokens, z, valid)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(3))
    out = m(tokens[:, perm], z, valid)  # same positions, slices shuffled among them
    assert not torch.allclose(out, ref[:, perm], atol=1e-3)


def _outputs_and_grads(m, tokens, z, valid):
    m.zero_grad(set_to_none=True)
    tokens = tokens.clone().requires_grad_(True)
    out = m(tokens, z, valid)
    (out * torch.linspace(-1.0, 1.0, out.numel()).view_as(out)).sum().backward()
    return out.detach(), tokens.grad, {n: p.grad for n, p in m.named_parameters()}


@pytest.mark.parametrize("s", [12, 400])
def test_bag_and_gather_agree_outputs_and_gradients(s):
    """The fused sampling (own backward, values recomputed) against plain indexing + autograd."""
    a = _model(impl="bag", recompute_min_tokens=0).train()
    b = _model(impl="gather", recompute_min_tokens=None).train()
    tokens, z, valid = _volume(s, b=2, spacing=0.7)
    valid[1, s * 3 // 4 :] = False
    valid[0, torch.randperm(s, generator=torch.Generator().manual_seed(5))[: s // 5]] = False
    out_a, gt_a, gp_a = _outputs_and_grads(a, tokens, z, valid)
    out_b, gt_b, gp_b = _outputs_and_grads(b, tokens, z, valid)
    # float32 sums in another order: differences of ~1e-5 of each tensor's scale
    torch.testing.assert_close(out_a, out_b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gt_a, gt_b, atol=1e-4 * float(gt_b.abs().max()), rtol=1e-3)
    for name, g in gp_b.items():
        torch.testing.assert_close(gp_a[name], g, atol=1e-4 * float(g.abs().max()), rtol=1e-3, msg=name)
    assert torch.count_nonzero(gt_a[~valid]) == 0


@pytest.mark.parametrize("row_dtype", [torch.int32, torch.int64])
def test_weighted_rows_gradients(row_dtype):
    """Own backward against finite differences: repeated rows, rows nobody reads, several bags per row."""
    g = torch.Generator().manual_seed(0)
    table = torch.randn(7, 3, dtype=torch.float64, generator=g, requires_grad=True)
    rows = torch.tensor([[0, 0, 2, 5], [5, 6, 6, 6], [2, 2, 2, 2], [6, 0, 5, 2], [1, 0, 0, 5]], dtype=row_dtype)
    coeff = torch.rand(5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    ref = (table[rows.long()] * coeff[..., None]).sum(1)
    torch.testing.assert_close(weighted_rows(table, rows, coeff), ref)
    assert torch.autograd.gradcheck(lambda t, c: weighted_rows(t, rows, c), (table, coeff))
    (gt,) = torch.autograd.grad(weighted_rows(table, rows, coeff).sum(), table)
    assert gt[[3, 4]].abs().sum() == 0  # never read: no gradient


@pytest.mark.parametrize("table_rows", [32768, 40000])
def test_weighted_rows_table_gradient_at_and_past_the_int16_sort(table_rows):
    """Up to 32768 table rows the backward sorts int16 keys; past it int32: rows above 32767 included."""
    g = torch.Generator().manual_seed(1)
    table = torch.randn(table_rows, 3, dtype=torch.float64, generator=g, requires_grad=True)
    rows = torch.randint(table_rows - 300, table_rows, (200, 4), generator=g)
    rows[:50] = torch.randint(0, 300, (50, 4), generator=g)
    coeff = torch.rand(200, 4, dtype=torch.float64, generator=g)
    weight = torch.randn(200, 3, dtype=torch.float64, generator=g)
    (got,) = torch.autograd.grad((weighted_rows(table, rows.to(torch.int32), coeff) * weight).sum(), table)
    (ref,) = torch.autograd.grad(((table[rows] * coeff[..., None]).sum(1) * weight).sum(), table)
    torch.testing.assert_close(got, ref)
    assert rows.max() >= 32767 and got[rows.max()].abs().sum() > 0  # the top of the int16 range is read


def test_recompute_keeps_less_for_backward_with_same_result():
    """Recomputing the values in backward is exact and drops two (B, S, D) activations per layer."""
    tokens, z, valid = _volume(64, b=2)
    weights = torch.linspace(-1.0, 1.0, tokens.numel()).view_as(tokens)
    saved, results = {}, {}
    for recompute in (True, False):
        # 2 x 64 = 128 tokens: recomputed from 128 tokens on, not from 129 on
        m = _model(recompute_min_tokens=128 if recompute else 129).train()
        storages: dict[int, int] = {}

        def pack(t, storages=storages):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        x = tokens.clone().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = m(x, z, valid)
        (out * weights).sum().backward()
        saved[recompute] = sum(storages.values())
        results[recompute] = (out.detach(), x.grad, [p.grad for p in m.parameters()])
    torch.testing.assert_close(results[True][0], results[False][0], atol=0, rtol=0)
    torch.testing.assert_close(results[True][1], results[False][1], atol=1e-6, rtol=1e-6)
    for a, b in zip(results[True][2], results[False][2]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    per_layer = 2 * tokens.numel() * 4  # value table + sampled values, float32
    assert saved[False] - saved[True] >= 2 * per_layer  # two layers


@pytest.mark.parametrize("impl", ["native", "bag", "gather"])
def test_attend_is_the_operator_inside_forward(impl):
    """forward is exactly out_proj(attend(query, value_proj(query))): outputs and all gradients."""
    attn = _model(impl=impl, recompute_min_tokens=None).layers[0].attn
    tokens, z, valid = _volume(24, b=2)
    valid[1, 17:] = False
    index = build_slice_index(z, valid)
    weights = torch.linspace(-1.0, 1.0, tokens.numel()).view_as(tokens)
    results = []
    for via_attend in (False, True):
        attn.zero_grad(set_to_none=True)
        query = tokens.clone().requires_grad_(True)
        out = attn.out_proj(attn.attend(query, attn.value_proj(query), index)) if via_attend else attn(query, index)
        (out * weights).sum().backward()
        results.append([out.detach(), query.grad, *(p.grad for p in attn.parameters())])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_attend_reads_each_heads_values_at_real_slices_with_weights_summing_to_one():
    attn = _model().layers[0].attn
    tokens, z, valid = _volume(24, b=2)
    valid[1, 17:] = False
    heads, dh = attn.heads, attn.head_dim
    # head h's channels hold h + 1 at every real slice, NaN at padding: any read of padding or
    # of another head's channels, or weights not summing to 1, shows
    value = torch.arange(1.0, heads + 1.0).repeat_interleave(dh).expand(2, 24, heads * dh).clone()
    value[~valid] = float("nan")
    value.requires_grad_(True)
    out = attn.attend(tokens, value, build_slice_index(z, valid))
    assert out.shape == (2, 24, heads * dh)
    torch.testing.assert_close(out, value.detach()[0, :1].expand_as(out), atol=1e-5, rtol=0)
    out.sum().backward()
    assert torch.count_nonzero(value.grad[~valid]) == 0
    # each query's H*P weights per channel sum to 1 over the slices: total gradient = number of queries
    torch.testing.assert_close(value.grad.sum((0, 1)), torch.full((heads * dh,), 2.0 * 24))


@pytest.mark.parametrize("default_init", [True, False])
def test_gradients_reach_offsets_and_attention_weights(default_init):
    torch.manual_seed(0)
    m = (SliceAttention(D, heads=4, points=3, layers=2) if default_init else _model()).train()
    tokens, z, valid = _volume(16, spacing=1.7, b=2)
    valid[1, 12:] = False
    tokens.requires_grad_(True)
    out = m(tokens, z, valid)
    (out * torch.randn_like(out)).sum().backward()
    for layer in m.layers:
        for proj in (layer.attn.offset_proj, layer.attn.weight_proj):
            assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    assert tokens.grad[valid].abs().sum() > 0
    assert torch.count_nonzero(tokens.grad[~valid]) == 0  # padding never read


def test_single_slice_long_volume_and_empty_row():
    m = _model()
    t, z, v = _volume(1)
    out = m(t, z, v)
    assert out.shape == (1, 1, D) and torch.isfinite(out).all()
    t, z, v = _volume(300, spacing=0.8)
    out = m(t, z, v)
    assert out.shape == (1, 300, D) and torch.isfinite(out).all()
    # a row with no real slice at all is finite (and zero)
    t, z, v = _volume(5, b=2)
    v[1] = False
    out = m(t, z, v)
    assert torch.isfinite(out).all() and out[1].abs().sum() == 0


def test_duplicate_positions_and_shape_errors():
    m = _model()
    t, _, v = _volume(4)
    out = m(t, torch.tensor([[0.0, 0.0, 2.0, 2.0]]), v)
    assert torch.isfinite(out).all()
    with pytest.raises(MedclustError, match="z_mm"):
        m(t, torch.zeros(1, 3), v)
    with pytest.raises(MedclustError, match="divisible"):
        SliceAttention(30, heads=4)
