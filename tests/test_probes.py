"""Learning-monitor probes: kNN / linear scores, the z-gap protocol, counts, the probe set, the figure."""

from __future__ import annotations

import math

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import check_grad

import medclust.evaluate.probes as probes
from medclust.data.pretrain_datasets import collect_cases
from medclust.data.probe_set import build_probe_set, slices_per_case
from medclust.evaluate.probes import ProbeSettings, ProbeTarget, fit_exclusion, linear_scores, probe_units, run_probe, unit_folds
from medclust.io.slice_store import write_case
from medclust.report import plot_probe_curves


def _cases(n_cases: int, n_slices: int, spacing: float = 5.0) -> tuple[np.ndarray, np.ndarray]:
    case = np.repeat([f"d/c{i}" for i in range(n_cases)], n_slices)
    z = np.tile(np.arange(n_slices) * spacing, n_cases)
    return case, z


def test_separable_embeddings_score_one_and_random_ones_chance() -> None:
    rng = np.random.default_rng(0)
    case, z = _cases(8, 24)
    dataset = case.copy()
    labels = np.asarray(["a", "b", "c", "d"])[np.arange(len(case)) // 24 % 4]  # one class per case, two cases each
    centres = rng.normal(size=(4, 32)) * 4
    separable = centres[np.searchsorted(["a", "b", "c", "d"], labels)] + rng.normal(size=(len(case), 32))
    noise = rng.normal(size=(len(case), 32))
    s = ProbeSettings()
    good = run_probe(separable, ProbeTarget("x", labels), case, z, dataset, s)
    bad = run_probe(noise, ProbeTarget("x", labels), case, z, dataset, s)
    assert good.knn == pytest.approx(1.0) and good.linear == pytest.approx(1.0)
    assert good.chance == pytest.approx(0.25) and good.metric == "balanced_accuracy"
    assert abs(bad.knn - 0.25) < 0.12 and abs(bad.linear - 0.25) < 0.12

    # multi-label: two structure columns, present on alternate z blocks of every case
    present = np.stack([(z // 30) % 2, (z // 60) % 2], axis=1).astype(float)
    combo = (present @ [1, 2]).astype(int)
    signal = rng.normal(size=(4, 32))[combo] * 4 + rng.normal(size=(len(case), 32))
    target = ProbeTarget("structures", present, columns=["p", "q"], within_dataset=True)
    one_dataset = np.full(len(case), "d")
    good = run_probe(signal, target, case, z, one_dataset, s)
    bad = run_probe(noise, target, case, z, one_dataset, s)
    assert good.metric == "macro_auc" and good.knn > 0.97 and good.linear > 0.97
    assert abs(bad.knn - 0.5) < 0.1 and abs(bad.linear - 0.5) < 0.1


def test_no_item_is_fitted_near_a_scored_item_of_its_case(monkeypatch: pytest.MonkeyPatch) -> None:
    """Near-copies: features that only encode z make kNN perfect unless the z gap is respected."""
    rng = np.random.default_rng(1)
    case, z = _cases(2, 60, spacing=2.0)
    # labels change every 16 mm at random: independent of anything 20 mm away
    segment = (z // 16).astype(int) + 100 * (case == "d/c1")
    table = {s: rng.choice(["a", "b"]) for s in np.unique(segment)}
    labels = np.asarray([table[s] for s in segment])
    # smooth in z, different per case: a slice's nearest neighbour is the next slice of its case
    features = np.stack([np.cos(z / 40 + 3 * (case == "d/c1")), np.sin(z / 40 + 3 * (case == "d/c1")), np.zeros_like(z)], axis=1)
    features[:, 2] = np.arange(len(z)) * 1e-9  # the item index, read back by the spy; too small to move a cosine

    calls: list[tuple[np.ndarray, np.ndarray]] = []
    real_knn = probes.knn_scores

    def spy(fit_x, fit_y, query_x, k, temperature):  # type: ignore[no-untyped-def]
        calls.append((np.rint(fit_x[:, 2].numpy() * 1e9).astype(int), np.rint(query_x[:, 2].numpy() * 1e9).astype(int)))
        return real_knn(fit_x, fit_y, query_x, k, temperature)

    monkeypatch.setattr(probes, "knn_scores", spy)
    honest = run_probe(features, ProbeTarget("x", labels), case, z, case, ProbeSettings(gap_mm=20.0, block_mm=2.0, knn_k=3))
    assert calls and sum(len(q) for _, q in calls) == len(z)  # every item scored once
    for fit, query in calls:
        same_case = case[fit][:, None] == case[query][None, :]
        assert not (same_case & (np.abs(z[fit][:, None] - z[query][None, :]) < 20.0)).any()
    monkeypatch.setattr(probes, "knn_scores", real_knn)
    leaky = run_probe(features, ProbeTarget("x", labels), case, z, case, ProbeSettings(gap_mm=0.0, block_mm=2.0, knn_k=3))
    assert leaky.knn > 0.85, leaky  # fitting next to the scored slice inflates the score ...
    assert honest.knn < 0.65, honest  # ... which the gap removes (chance 0.5)


def test_units_folds_and_exclusion() -> None:
    case = np.asarray(["a"] * 6 + ["x1", "x2"])
    z = np.asarray([0, 5, 10, 15, 20, 25, 0, 0], dtype=float)
    units = probe_units(case, z, block_mm=10.0)
    assert units.tolist() == [0, 0, 1, 1, 2, 2, 3, 4]
    assert unit_folds(units, 3).tolist() == [0, 0, 1, 1, 2, 2, 0, 1]
    near = fit_exclusion(case, z, gap_mm=10.0)
    assert near[0].tolist() == [True, True, False, False, False, False, False, False]
    assert near[6].tolist() == [False] * 6 + [True, False]  # other cases are never excluded


def test_counts_and_dropped_classes_are_reported() -> None:
    rng = np.random.default_rng(2)
    case = np.asarray(["ct/a"] * 20 + ["ct/b"] * 20 + ["xr/1", "xr/2", "xr/3", "one/1"])
    z = np.concatenate([np.arange(20) * 5.0, np.arange(20) * 5.0, np.zeros(4)])
    dataset = np.asarray([c.split("/")[0] for c in case])
    result = run_probe(rng.normal(size=(len(case), 8)), ProbeTarget("dataset", dataset), case, z, dataset, ProbeSettings(block_mm=20.0))
    assert result.n_items == 43 and result.n_cases == 5 and result.n_units == 2 * 5 + 3
    assert result.classes == {"ct": 40, "xr": 3} and result.n_folds == 5
    assert "one" in result.dropped and "1 unit" in result.dropped["one"]


def test_linear_probe_gradient_and_row_space_fit_equal_the_full_fit() -> None:
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(12, 5)), np.eye(3)[rng.integers(0, 3, 12)]
    for multilabel in (False, True):
        yy = (rng.random((12, 3)) > 0.5).astype(float) if multilabel else y
        w = None if multilabel else rng.random(12) + 0.5
        err = check_grad(
            lambda p: probes._logistic_loss_grad(p, x, yy, w, multilabel, 0.1)[0],
            lambda p: probes._logistic_loss_grad(p, x, yy, w, multilabel, 0.1)[1],
            rng.normal(size=5 * 3 + 3),
        )
        assert err < 1e-5
    # 10 items, 40 features: fitted in the 10-dimensional row space, the same classifier as in 40-D
    fit_x, query_x = torch.randn(10, 40, dtype=torch.float64), torch.randn(4, 40, dtype=torch.float64)
    fit_y = torch.eye(2, dtype=torch.float64)[torch.tensor([0, 1] * 5)]
    reduced = linear_scores(fit_x, fit_y, query_x, False, 0.05, 500)
    mean, std = fit_x.mean(0), fit_x.std(0, unbiased=False)
    w, b = probes.fit_linear(((fit_x - mean) / std).numpy(), fit_y.numpy(), False, 0.05, 500)
    full = torch.softmax(torch.from_numpy(((query_x - mean) / std).numpy() @ w + b), 1)
    assert torch.allclose(reduced.double(), full, atol=1e-3)


def _labelled_store(root: Path) -> dict[str, Path]:
    """A CT dataset (two 12-slice volumes with labels 1/2 on known slices) and an XR dataset."""
    folder = root / "ct"
    folder.mkdir(parents=True)
    index, splits = [], {"dataset": "ct", "seed": 0, "train": ["v1"], "val": ["v2"], "test": ["v3"]}
    for case_id in ("v1", "v2", "v3"):
        image = np.random.default_rng(0).random((12, 16, 16)).astype(np.float32)
        label = np.zeros((12, 16, 16), np.int16)
        label[:6, :8] = 1  # "lung" on the first 6 slices (128 px)
        label[4:, 8:10] = 2  # "heart" on the last 8 slices (32 px)
        attrs = {
            "case_id": case_id, "dataset": "ct", "modality": "CT", "simulated": False, "source_path": "x", "source_sha256": "0" * 64,
            "label_path": "", "original_shape": [16, 16, 12], "original_spacing": [1, 1, 5], "original_affine": np.eye(4),
            "store_affine": np.eye(4), "target_spacing": [1, 1, 5], "slice_axis": 2, "z_positions_mm": (np.arange(12) * 5.0).tolist(),
            "normalisation": "{}", "medclust_version": "test",
        }
        write_case(folder / f"{case_id}.h5", image, attrs, label=label)
        index.append({"case_id": case_id, "file": f"{case_id}.h5", "modality": "CT", "num_slices": 12, "shape": [12, 16, 16], "label_classes": [0, 1, 2]})
    (folder / "index.json").write_text(json.dumps({"dataset": "ct", "cases": index}), encoding="utf-8")
    (folder / "splits.json").write_text(json.dumps(splits), encoding="utf-8")
    from pretrain_helpers import make_store

    xr = make_store(root, "xr", "XR", {"x1": (1, "train"), "x2": (1, "train")})
    return {"ct": folder, "xr": xr}


def test_probe_set_derives_free_labels_and_bounds_items(tmp_path: Path) -> None:
    stores = _labelled_store(tmp_path)
    cases = collect_cases(stores)
    ps = build_probe_set(
        cases, (8, 8), max_slices_per_case=0, z_bins=3, min_pixels=20,
        body_region={"ct": "chest"}, structures={"ct": {"lung": ["lung_*"], "heart": [2]}},
        label_names={"ct": {1: "lung_left", 2: "heart"}},
    )
    assert ps.images.shape == (26, 8, 8) and set(ps.split.tolist()) == {"train", "val"}  # v3 is test
    by = {t.name: t for t in ps.targets}
    assert by["body_region"].values.tolist() == ["chest"] * 24 + ["", ""]
    assert by["z_bin"].values[:12].tolist() == ["0"] * 4 + ["1"] * 4 + ["2"] * 4 and by["z_bin"].values[-1] == ""
    s = by["structures"]
    assert s.columns == ["ct:lung", "ct:heart"] and s.within_dataset
    assert s.values[:12, 0].tolist() == [1] * 6 + [0] * 6
    assert s.values[:12, 1].tolist() == [0] * 4 + [1] * 8  # 32 px >= min_pixels
    assert np.isnan(s.values[24:]).all()
    assert slices_per_case([12, 12, 1, 1], 0, 10) == [4, 4, 1, 1]
    small = build_probe_set(cases, (8, 8), max_items=10)
    assert len(small) == 10
    from medclust.errors import MedclustError

    with pytest.raises(MedclustError, match="probe_structures"):
        build_probe_set(cases, (8, 8), structures={"ct": {"kidney": ["kidney*"]}}, label_names={"ct": {1: "lung_left"}})


def test_probe_curves_figure(tmp_path: Path) -> None:
    curves = {
        "joint": {"step": [5, 10], "loss": [2.0, 1.0], "probe/structures/knn": [0.7, 0.8], "probe/structures/linear": [0.6, 0.9],
                  "probe_random/structures/knn": [0.6, 0.6], "probe_random/structures/linear": [0.65, 0.65]},
        "swav2d": {"step": [5, 10], "probe/structures/knn": [0.62, 0.7], "probe_random/structures/knn": [0.6, 0.6]},
    }
    out = plot_probe_curves(curves, tmp_path / "probes.png")
    assert out.stat().st_size > 5000
    empty = plot_probe_curves({"joint": {"step": [1], "loss": [1.0]}}, tmp_path / "none.png")
    assert empty.is_file()
    # effective ranks get a panel per dataset beside the probes' (NaN-only datasets none)
    from medclust.report.probe_plots import probe_figure, rank_datasets

    curves["joint"].update({"rank/ct": [12.0, 3.5], "rank_random/ct": [19.0, 19.0], "rank/xr": [math.nan, math.nan]})
    assert rank_datasets(curves) == ["ct"]
    titles = [ax.get_title() for ax in probe_figure(curves).axes if ax.get_title()]
    assert titles == ["structures (macro ROC AUC)", "effective rank, ct features"]
    rank_axis = probe_figure(curves).axes[1]
    assert [line.get_ydata()[0] for line in rank_axis.lines] == [19.0, 12.0]  # random init, then joint
    assert [ax.get_title() for ax in probe_figure({"joint": {"step": [5], "rank/ct": [3.0]}}).axes] == ["effective rank, ct features"]
    assert probe_figure({"joint": {"step": [1], "loss": [1.0]}}) is None
