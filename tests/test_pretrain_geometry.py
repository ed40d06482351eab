"""The two views of a volume: own overlapping z windows, so slice geometry alone cannot match them."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from medclust.data import AugmentSettings, BatchPlan, PretrainBatches, select_view_pair
from medclust.models import JointModel, SliceAttention

# geometry only (the schema's z_crop, z_overlap, z_scale, z_jitter, slice_drop); no image augmentation
GEOMETRY_ONLY = AugmentSettings(crop_scale=(1.0, 1.0), affine_prob=0.0, intensity_prob=0.0, contrast_prob=0.0, noise_prob=0.0)


class _BlankVolumes:
    """Stand-in for CaseArrays: volumes of varied slice count, spacing and origin, no content."""

    def __init__(self, count: int, rng: np.random.Generator) -> None:
        self.cases, self.z_mm, self.slice_axis = [], [], []
        for _ in range(count):
            n = int(rng.integers(20, 200))
            spacing = float(rng.choice([1.0, 2.0, 2.5, 3.0, 5.0]))
            self.cases.append(SimpleNamespace(num_slices=n, dataset="ct"))
            self.z_mm.append((np.arange(n) * spacing + rng.uniform(-300, 300)).astype(np.float32))
            self.slice_axis.append(2)

    def slices(self, case_index: int, indices: np.ndarray) -> np.ndarray:
        return np.zeros((len(indices), 4, 4), np.float32)


VOLUMES, REPEATS, S_MAX = 128, 8, 16


@pytest.fixture(scope="module")
def view_geometry() -> list[dict[str, torch.Tensor]]:
    """Batches of two views of 128 volumes, 8 times: z positions, kept slices and pairs as the pipeline draws them."""
    rng = np.random.default_rng(0)
    with pytest.MonkeyPatch.context() as patch:
        # the images are not used below: skip their (slow, content-only) augmentation
        patch.setattr(PretrainBatches, "_transform", lambda self, size, case: (lambda image: image), raising=False)
        return [
            PretrainBatches(_BlankVolumes(VOLUMES, rng), [BatchPlan(items=[], volumes=[(v, 1000 * r + v) for v in range(VOLUMES)])], (4, 4), (4, 4), S_MAX, GEOMETRY_ONLY)[0]  # type: ignore[arg-type]
            for r in range(REPEATS)
        ]


@pytest.mark.parametrize("d_model", [64, 256])
def test_views_with_unrelated_content_do_not_find_each_other(view_geometry: list[dict[str, torch.Tensor]], d_model: int) -> None:
    """Only the data pipeline's slice geometry links the two views: retrieval must stay near chance."""
    hits = 0
    for r, batch in enumerate(view_geometry):
        torch.manual_seed(r)
        model = JointModel(nn.Identity(), SliceAttention(d_model, heads=4, points=4, layers=2), d_model=d_model, proj_dim=32, k_2d=4, k_3d=4)  # type: ignore[arg-type]
        # independent random slice content per view, at the slice encoder's token norm at init (0.3-0.7)
        tokens = torch.randn(2, VOLUMES, S_MAX, d_model)
        tokens = tokens / tokens.norm(dim=-1, keepdim=True) * torch.empty(2, VOLUMES, S_MAX, 1).uniform_(0.3, 0.7)
        with torch.no_grad():
            emb = [model.embed_volume(tokens[v], batch["z_mm"][v], batch["valid"][v])[1] for v in (0, 1)]
        hits += int(((emb[0] @ emb[1].T).argmax(1) == torch.arange(VOLUMES)).sum())
    top1, chance = hits / (REPEATS * VOLUMES), 1 / VOLUMES
    assert top1 <= 2 * chance, f"view-to-view top-1 {top1:.4f} vs chance {chance:.4f}"


def test_each_view_has_its_own_window_overlapping_the_other() -> None:
    rng = np.random.RandomState(0)
    settings = AugmentSettings()
    same, pairs = 0, []
    for _ in range(300):
        n = int(rng.randint(3, 150))
        a, b = select_view_pair(n, 8, settings, rng)
        for idx in (a, b):
            assert 1 <= len(idx) <= 8 and (np.diff(idx) > 0).all() and idx[0] >= 0 and idx[-1] < n
        common = np.intersect1d(a, b)
        assert len(common) >= 1  # the overlap holds slices of both views
        pairs.append(len(common) / min(len(a), len(b)))
        same += int(np.array_equal(a, b))
    assert same < 0.2 * 300  # mostly different windows (identical only for short volumes, all slices)
    assert np.mean(pairs) >= 0.5


def test_batch_pairs_slots_holding_the_same_slice() -> None:
    rng = np.random.default_rng(1)
    arrays = _BlankVolumes(12, rng)
    # content = slice index, so a slot's image tells which slice it holds
    arrays.slices = lambda c, idx: np.broadcast_to(np.asarray(idx, np.float32)[:, None, None] / 200, (len(idx), 4, 4)).copy()  # type: ignore[method-assign]
    plan = BatchPlan(items=[], volumes=[(v, 7 * v) for v in range(12)])
    batch = PretrainBatches(arrays, [plan], (4, 4), (4, 4), 8, GEOMETRY_ONLY)[0]  # type: ignore[arg-type]
    pair, valid, vols, z = batch["pair"], batch["valid"], batch["volumes"], batch["z_mm"]
    assert pair.shape == (12, 8) and (pair >= 0).sum() > 0
    for row, slot in zip(*(pair >= 0).nonzero(as_tuple=True)):
        other = pair[row, slot]
        assert valid[0, row, slot] and valid[1, row, other]
        assert torch.allclose(vols[0, row, slot], vols[1, row, other])
    assert not torch.equal(z[0], z[1])  # own windows, own z scaling and jitter
