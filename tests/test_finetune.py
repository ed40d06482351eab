"""Downstream fine-tuning: splits, label fractions, heads, 2.5D, frozen mode and the run folder format."""

from __future__ import annotations

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.networks.nets import FlexibleUNet
from monai.networks.nets.resnet import ResNetEncoder

from finetune_helpers import phantom, store_affine, write_store
from medclust.data.downstream import (
    TaskCase,
    context_stack,
    gaussian_heatmap,
    remap_labels,
    resolve_label_groups,
    simulate_nodules,
    slice_centre_heatmap,
    slice_targets_from_mask,
)
from medclust.data.splits import fraction_subset, plan_splits, slab_layout
from medclust.errors import MedclustError
from medclust.evaluate import evaluate_run
from medclust.evaluate.predict import group_peaks
from medclust.io.original_grid import store_index_to_world
from medclust.models.heads import adapt_first_conv, build_task_model, heatmap_focal_loss, load_encoder_weights
from medclust.train import Trainer, TrainerConfig
from medclust.train.recipes.finetune import FinetuneTask, prepare_task_data, run_finetune

TINY = {
    "steps": 3,
    "batch_size": 4,
    "lr": 1e-3,
    "warmup_steps": 0,
    "patch_size": [32, 32],
    "decoder_channels": [16, 16, 8, 8, 8],
    "eval_every": 2,
    "log_every": 1,
    "tensorboard": False,
    "progress": False,
    "backbone": "resnet10",
    "slabs": {"blocks": 2, "val_fraction": 0.2, "test_fraction": 0.2, "gap_mm": 4.0},
}


def _case(case_id: str, num_slices: int, spacing: float = 4.0) -> TaskCase:
    z = np.arange(num_slices) * spacing
    return TaskCase(case_id, "", np.zeros((num_slices, 4, 4), np.float32), None, {}, z)


# -- label fractions and splits ----------------------------------------------------------------


def test_fraction_subsets_are_nested_and_seeded():
    items = [f"case{i:02d}" for i in range(40)]
    quarter, half, full = (fraction_subset(items, f, seed=3) for f in (0.25, 0.5, 1.0))
    assert len(quarter) == 10 and len(half) == 20 and sorted(full) == items
    assert set(quarter) <= set(half) <= set(full)
    assert fraction_subset(items, 0.25, seed=3) == quarter  # deterministic
    assert fraction_subset(items, 0.25, seed=4) != quarter  # the seed matters
    assert len(fraction_subset(items[:3], 0.1, seed=0)) == 1  # never empty
    with pytest.raises(MedclustError, match="fractions"):
        fraction_subset(items, 0.0, seed=0)


def test_slab_layout_disjoint_with_gaps():
    layout = slab_layout(60, 5.0, val_fraction=0.2, test_fraction=0.2, blocks=2, gap_mm=10.0, min_gap_slices=1)
    assert set(layout) == {"train", "val", "test", ""}
    assert (layout == "test").sum() >= 8 and (layout == "val").sum() >= 8
    # every change of split passes through a gap of >= 2 slices (10 mm / 5 mm)
    named = [(i, s) for i, s in enumerate(layout) if s]
    for (i, a), (j, b) in zip(named, named[1:]):
        if a != b:
            assert j - i - 1 >= 2, (i, j, a, b)
    # each split appears in both halves of the volume (representative along z)
    for split in ("train", "val", "test"):
        where = np.flatnonzero(layout == split)
        assert where.min() < 30 <= where.max()
    np.testing.assert_array_equal(layout, slab_layout(60, 5.0, 0.2, 0.2, 2, 10.0, 1))
    with pytest.raises(MedclustError, match="too few"):
        slab_layout(8, 5.0, blocks=3, gap_mm=10.0)


def test_gap_covers_the_context():
    layout = slab_layout(80, 5.0, 0.2, 0.2, blocks=1, gap_mm=0.0, min_gap_slices=3)
    k = 3
    test = np.flatnonzero(layout == "test")
    train = set(np.flatnonzero(layout == "train"))
    for s in test:  # no test input stack reaches a training slice
        assert not set(range(s - k, s + k + 1)) & train


def test_plan_slabs_nested_fractions_and_fixed_test():
    cases = [_case("vol", 70)]
    plans = {f: plan_splits(cases, None, "slabs", f, seed=1, slabs=TINY["slabs"], context_slices=1) for f in (0.25, 0.5, 1.0)}
    for plan in plans.values():
        assert plan.unit == "slices"
        train, val, test = (set(p["vol"].tolist()) for p in (plan.train, plan.val, plan.test))
        assert not train & val and not train & test and not val & test
    t25, t50, t100 = (set(plans[f].train["vol"].tolist()) for f in (0.25, 0.5, 1.0))
    assert t25 <= t50 <= t100 and len(t25) < len(t50) < len(t100)
    # validation follows the fraction: nested shares of the same validation slabs
    v25, v50, v100 = (set(plans[f].val["vol"].tolist()) for f in (0.25, 0.5, 1.0))
    assert v25 <= v50 <= v100 and len(v25) == math.ceil(0.25 * len(v100)) and len(v50) == math.ceil(0.5 * len(v100))
    assert all(p.val_total_slices == len(v100) for p in plans.values())
    other_seed = plan_splits(cases, None, "slabs", 0.25, seed=2, slabs=TINY["slabs"], context_slices=1)
    np.testing.assert_array_equal(other_seed.test["vol"], plans[0.25].test["vol"])  # test never depends on the seed
    full_other_seed = plan_splits(cases, None, "slabs", 1.0, seed=2, slabs=TINY["slabs"], context_slices=1)
    np.testing.assert_array_equal(full_other_seed.val["vol"], plans[1.0].val["vol"])  # nor do the validation slabs


def test_slabs_cover_only_the_labelled_extent():
    cases = [_case("vol", 60)]
    plan = plan_splits(cases, None, "slabs", 1.0, seed=0, slabs=TINY["slabs"], extents={"vol": (10, 49)})
    used = np.concatenate([plan.train["vol"], plan.val["vol"], plan.test["vol"]])
    assert used.min() >= 10 and used.max() <= 49
    assert set(plan.layout["vol"][:10]) == {""} and set(plan.layout["vol"][50:]) == {""}


def test_plan_cases_disjoint_and_case_fractions():
    cases = [_case(f"c{i:02d}", 10) for i in range(14)]
    ids = [c.case_id for c in cases]
    splits = {"train": ids[:10], "val": ids[10:12], "test": ids[12:]}
    plan = plan_splits(cases, splits, "cases", 0.5, seed=0, min_cases=8)
    assert plan.unit == "cases" and len(plan.train) == 5 and plan.train_total == 10
    assert set(plan.train) <= set(splits["train"])
    assert set(plan.test) == set(splits["test"])
    assert len(plan.val) == 1 and set(plan.val) <= set(splits["val"])  # half of the validation cases
    full = plan_splits(cases, splits, "cases", 1.0, seed=0, min_cases=8)
    assert set(plan.train) <= set(full.train) and set(full.val) == set(splits["val"])


def test_validation_slabs_come_only_from_the_fraction_volumes():
    # no validation cases: slabs are cut from training volumes, and a 25 % run may only use
    # those of its own 25 % of volumes for model selection
    cases = [_case(f"c{i:02d}", 20) for i in range(12)]
    ids = [c.case_id for c in cases]
    splits = {"train": ids[:10], "val": [], "test": ids[10:]}
    plans = {f: plan_splits(cases, splits, "cases", f, seed=3, min_cases=8, slabs={"gap_mm": 4.0}) for f in (0.25, 1.0)}
    quarter, full = plans[0.25], plans[1.0]
    assert quarter.unit == "cases" and len(quarter.train) == 3
    assert set(quarter.val) == set(quarter.train)  # validation labels only from the given volumes
    assert set(full.val) == set(ids[:10])
    for cid in quarter.val:
        np.testing.assert_array_equal(quarter.val[cid], full.val[cid])  # the same slab of a chosen volume
        assert not set(quarter.val[cid].tolist()) & set(quarter.train[cid].tolist())
    assert quarter.val_total_slices == sum(len(v) for v in full.val.values())


def test_plan_cases_without_val_cuts_a_validation_slab():
    cases = [_case("train_vol", 40), _case("test_vol", 30)]
    splits = {"train": ["train_vol"], "val": [], "test": ["test_vol"]}
    plan = plan_splits(cases, splits, "cases", 1.0, seed=0, slabs={"gap_mm": 8.0}, context_slices=1)
    assert plan.unit == "slices"  # one training case: the fraction is over slices
    train, val = set(plan.train["train_vol"].tolist()), set(plan.val["train_vol"].tolist())
    assert train and val and not train & val
    assert min(abs(a - b) for a in train for b in val) > 2  # the gap
    assert list(plan.test) == ["test_vol"] and len(plan.test["test_vol"]) == 30
    assert "test_vol" not in plan.train and "test_vol" not in plan.val


# -- targets ---------------------------------------------------------------------------------------


def test_label_groups_by_value_name_and_glob():
    names = {1: "lung_upper_lobe_left", 2: "lung_lower_lobe_left", 3: "heart", 4: "liver", 9: "rib_left_1"}
    lut, classes = resolve_label_groups({"lungs": ["lung_*"], "heart": ["heart"], "other": [4, "rib_*"]}, names)
    assert classes == {1: "lungs", 2: "heart", 3: "other"}
    assert lut == {1: 1, 2: 1, 3: 2, 4: 3, 9: 3}
    label = np.array([[0, 1, 2, 3, 4, 9, 7]])
    np.testing.assert_array_equal(remap_labels(label, lut), [[0, 1, 1, 2, 3, 3, 0]])
    # ordered pairs (as the workflow passes them) give the same numbering
    assert resolve_label_groups([["lungs", ["lung_*"]], ["heart", ["heart"]], ["other", [4, "rib_*"]]], names) == (lut, classes)
    with pytest.raises(MedclustError, match="matches no label"):
        resolve_label_groups({"x": ["kidney*"]}, names)
    with pytest.raises(MedclustError, match="in both"):
        resolve_label_groups({"a": [1], "b": ["lung_upper*"]}, names)
    # no groups: every raw value is a class (multi-class kept, never collapsed)
    lut, classes = resolve_label_groups(None, {}, present=[0, 2, 5])
    assert lut == {2: 2, 5: 5} and classes == {2: "class_2", 5: "class_5"}


def test_slice_targets_and_context_stack():
    classes_map = np.zeros((3, 8, 8), np.int64)
    classes_map[0, :2, :2] = 1  # 4 pixels of class 1
    classes_map[1, :5, :5] = 2
    targets = slice_targets_from_mask(classes_map, 2, min_pixels=5)
    np.testing.assert_array_equal(targets, [[0, 0], [0, 1], [0, 0]])
    image = np.arange(5, dtype=np.float32)[:, None, None] * np.ones((5, 2, 2), np.float32)
    stack = context_stack(image, [0, 4], k=1)
    assert stack.shape == (2, 3, 2, 2)
    np.testing.assert_array_equal(stack[:, :, 0, 0], [[0, 0, 1], [3, 4, 4]])  # edges repeat


# -- models ----------------------------------------------------------------------------------------


def test_2p5d_first_conv_keeps_the_pretrained_response():
    torch.manual_seed(0)
    enc1 = ResNetEncoder("resnet10", pretrained=False, spatial_dims=2, in_channels=1).eval()
    model = build_task_model("segmentation", in_channels=3, num_outputs=3, decoder_channels=(16, 16, 8, 8, 8), encoder_weights=enc1.state_dict()).eval()
    assert model.encoder.conv1.weight.shape[1] == 3
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        ref = enc1(x)
        got = model.encoder(x.repeat(1, 3, 1, 1))
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    adapted = adapt_first_conv(enc1.state_dict(), 5)
    assert adapted["conv1.weight"].shape[1] == 5
    torch.testing.assert_close(adapted["conv1.weight"].sum(1), enc1.state_dict()["conv1.weight"].sum(1))


def test_encoder_pt_loads_strict_into_flexibleunet(tmp_path):
    enc = ResNetEncoder("resnet10", pretrained=False, spatial_dims=2, in_channels=1)
    path = tmp_path / "encoder.pt"
    torch.save(enc.state_dict(), path)
    unet = FlexibleUNet(1, 3, backbone="resnet10", pretrained=False, spatial_dims=2)
    load_encoder_weights(unet.encoder, path)
    for k, v in enc.state_dict().items():
        torch.testing.assert_close(unet.encoder.state_dict()[k], v)
    other = ResNetEncoder("resnet18", pretrained=False, spatial_dims=2, in_channels=1)
    with pytest.raises(MedclustError, match="encoder.pt"):
        load_encoder_weights(other, path)  # strict: a different backbone is an error, not a silent partial load


def test_heatmap_focal_loss_prefers_the_right_peak():
    target = torch.from_numpy(gaussian_heatmap((1, 16, 16), np.array([[0, 8, 8]]), np.array([[1, 2, 2]]))[:, None])
    good = torch.logit(target.clamp(0.01, 0.99))
    bad = torch.logit(torch.roll(target, 5, dims=-1).clamp(0.01, 0.99))
    assert heatmap_focal_loss(good, target) < heatmap_focal_loss(bad, target)
    assert target.max() == 1.0


# -- detection helpers ------------------------------------------------------------------------------


def test_simulated_nodules_stay_in_the_organ_and_away_from_lesions():
    image = np.full((20, 32, 32), 0.1, np.float32)
    organ = np.zeros_like(image, bool)
    organ[:, 4:28, 4:28] = True
    avoid = np.array([[10.0, 16.0, 16.0]])
    rng = np.random.default_rng(0)
    out, centres, diam = simulate_nodules(image, organ, (4.0, 2.0, 2.0), rng, 4, (4.0, 8.0), (0.5, 0.5), avoid=avoid, avoid_mm=12.0)
    assert len(centres) == 4 and out.max() > 0.4
    assert (out[~organ] == 0.1).all()  # nothing outside the organ changed
    assert np.min(np.linalg.norm((centres - avoid) * [4.0, 2.0, 2.0], axis=1)) >= 12.0
    again = simulate_nodules(image, organ, (4.0, 2.0, 2.0), np.random.default_rng(0), 4, (4.0, 8.0), (0.5, 0.5), avoid=avoid, avoid_mm=12.0)
    np.testing.assert_array_equal(again[1], centres)


def test_simulated_nodules_lie_entirely_inside_the_allowed_slab():
    image = np.full((40, 32, 32), 0.1, np.float32)
    organ = np.zeros_like(image, bool)
    organ[:, 4:28, 4:28] = True
    allowed = np.zeros(40, bool)
    allowed[10:20] = True  # a 40 mm slab; the nodules are 10-14 mm across
    for seed in range(4):  # centres drawn near the slab's ends for several of these seeds
        out, centres, _ = simulate_nodules(image, organ, (4.0, 2.0, 2.0), np.random.default_rng(seed), 3, (10.0, 14.0),
                                           (0.5, 0.5), avoid_mm=4.0, allowed_slices=allowed)  # fmt: skip
        changed = np.flatnonzero((out != image).any(axis=(1, 2)))
        assert len(centres) == 3 and changed.size
        assert allowed[changed].all(), (seed, changed)  # extent, not only the centre, inside the slab


def test_slice_centre_heatmap_marks_every_visible_slice():
    heat = slice_centre_heatmap((12, 32, 32), np.array([[5.2, 10.0, 20.0]]), np.array([20.0]), (4.0, 2.0, 2.0))
    peaks = heat.reshape(12, -1).max(axis=1)
    assert set(np.flatnonzero(peaks == 1.0)) == {3, 4, 5, 6, 7}  # within 0.8 * 10 mm of z = 20.8 mm
    assert heat[5, 10, 20] == 1.0 and peaks[0] == 0.0


def test_peak_grouping_gives_world_positions():
    attrs = {"store_affine": store_affine(spacing=(2.0, 2.0, 4.0)).tolist(), "slice_axis": 2}
    centres = np.array([[5.0, 10.0, 20.0], [12.0, 25.0, 6.0]])
    heat = gaussian_heatmap((20, 32, 32), centres, np.array([[1.0, 1.5, 1.5], [1.0, 1.5, 1.5]]))
    heat[12] *= 0.8  # the second object is weaker
    dets = group_peaks(heat, attrs, (4.0, 2.0, 2.0), min_score=0.2)
    assert len(dets) == 2
    assert dets[0].score == pytest.approx(1.0) and dets[1].score == pytest.approx(0.8)
    np.testing.assert_allclose(dets[0].index, centres[0], atol=0.3)
    np.testing.assert_allclose(dets[0].world, store_index_to_world(attrs, centres[:1])[0], atol=1.0)
    assert dets[0].n_slices >= 2


# -- full runs ----------------------------------------------------------------------------------------


@pytest.fixture
def chest_store(tmp_path):
    img, lab = phantom(40, seed=1)
    return write_store(tmp_path / "slices", "vol", [{"case_id": "v0", "image": img, "label": lab, "original_shape": [32, 32, 40]}])


def _seg_settings(**extra):
    return {**TINY, "task": "organs", "type": "segmentation", "dataset": "vol", "split": "slabs", "context_slices": 1,
            "label_groups": [["disc", [3]], ["square", [7]]], **extra}


def test_segmentation_run_writes_the_documented_folder(tmp_path, chest_store):
    enc = ResNetEncoder("resnet10", pretrained=False, spatial_dims=2, in_channels=1)
    encoder_pt = tmp_path / "encoder.pt"
    torch.save(enc.state_dict(), encoder_pt)
    out = tmp_path / "run"
    run_finetune(_seg_settings(), chest_store, out, "joint", 0.5, 0, encoder=encoder_pt)
    for name in ("model.pt", "run.json", "metrics.csv", "val.csv", "provenance.json", "metrics.json", "per_case.csv"):
        assert (out / name).is_file(), name
    assert not (out / "checkpoint").exists()
    scored = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert (scored["task"], scored["init"], scored["fraction"], scored["seed"]) == ("organs", "joint", 0.5, 0)
    assert scored["primary_metric"] == "dice_mean" and set(scored["class_keys"].values()) == {"disc", "square"}
    # the in-process scores are what re-scoring the folder by hand gives
    assert json.dumps(evaluate_run(out)["metrics"], sort_keys=True) == json.dumps(scored["metrics"], sort_keys=True)
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    for key in ("task", "type", "dataset", "init", "fraction", "seed", "classes", "test_cases", "predictions", "mode", "trained_on", "selection"):
        assert key in run, key
    assert run["classes"] == {"1": "disc", "2": "square"} and run["init"] == "joint" and run["fraction"] == 0.5
    assert run["encoder"] == str(encoder_pt) and run["fraction_unit"] == "slices"
    (case,) = run["test_cases"]
    assert case["label_map"] == {"3": 1, "7": 2} and case["roi"] == "roi/v0.nii.gz" and case["roi_z_mm"]
    pred = nib.load(out / case["prediction"])
    roi = nib.load(out / case["roi"])
    assert pred.shape == (32, 32, 40) == roi.shape
    np.testing.assert_allclose(pred.affine, store_affine(), atol=1e-5)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2}
    roi_z = store_index_to_world({"store_affine": store_affine().tolist(), "slice_axis": 2},
                                 [[s, 0, 0] for s in np.flatnonzero(np.asarray(roi.dataobj).any(axis=(0, 1)))])[:, 2]
    assert len(roi_z)
    for lo, hi in run["slabs"]["v0"]["train"] + run["slabs"]["v0"]["val"]:
        assert not ((roi_z >= lo) & (roi_z <= hi)).any()  # the test region never overlaps train/val slabs
    assert sorted(case["roi_z_mm"]) == sorted(run["slabs"]["v0"]["test"])
    sd = torch.load(out / "model.pt", weights_only=True)
    assert sd["encoder.conv1.weight"].shape[1] == 3  # 2.5D input
    val_rows = list(csv.DictReader(open(out / "val.csv", encoding="utf-8")))
    assert [int(r["step"]) for r in val_rows] == [2, 3]
    assert run["selection"]["best_step"] in (2, 3)


def test_runs_are_deterministic_by_seed(tmp_path, chest_store):
    outs = []
    for name in ("a", "b"):
        run_finetune(_seg_settings(steps=2), chest_store, tmp_path / name, "none", 0.25, 7)
        outs.append(torch.load(tmp_path / name / "model.pt", weights_only=True))
    for k in outs[0]:
        torch.testing.assert_close(outs[0][k], outs[1][k])
    a = json.loads((tmp_path / "a" / "run.json").read_text(encoding="utf-8"))
    assert a["n_train_items"] == math.ceil(0.25 * a["n_train_items_total"])
    # model selection with the fraction's validation labels only, counted in run.json and metrics.json
    val = a["validation"]
    assert val["rule"] == "label fraction" and val["n_val_slices"] == a["n_val_slices"]
    assert val["n_val_slices"] == math.ceil(0.25 * val["n_val_slices_total"]) < val["n_val_slices_total"]
    assert json.loads((tmp_path / "a" / "metrics.json").read_text(encoding="utf-8"))["validation"] == val


def test_frozen_mode_keeps_the_encoder(tmp_path, chest_store):
    enc = ResNetEncoder("resnet10", pretrained=False, spatial_dims=2, in_channels=1)
    torch.save(enc.state_dict(), tmp_path / "encoder.pt")
    settings = _seg_settings(mode="frozen", context_slices=0, steps=3)
    data = prepare_task_data(settings, chest_store, 1.0, 0)
    task = FinetuneTask(data, tmp_path / "encoder.pt")
    before = {k: v.clone() for k, v in task.build_model().state_dict().items()}
    model = Trainer(TrainerConfig.from_dict(settings), tmp_path / "t", tmp_path / "t" / "ckpt").fit(task)
    after = model.state_dict()
    for k, v in before.items():
        if k.startswith("encoder."):
            torch.testing.assert_close(after[k], v, msg=k)  # weights and BatchNorm statistics
    assert any(not torch.equal(after[k], before[k]) for k in before if k.startswith("decoder."))
    assert not any(p.requires_grad for p in model.encoder.parameters())


def test_classification_slice_labels_run(tmp_path, chest_store):
    settings = {**TINY, "task": "slices", "type": "classification", "dataset": "vol", "split": "slabs",
                "target": "slice_structures", "min_pixels": 5, "label_groups": {"disc": [3], "square": [7]}, "head": "mlp", "hidden": 16}
    out = tmp_path / "cls"
    run_finetune(settings, chest_store, out, "none", 1.0, 0)
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert run["multilabel"] is True and run["classes"] == {"0": "disc", "1": "square"} and run["predictions"] == "predictions.csv"
    rows = list(csv.DictReader(open(out / "predictions.csv", encoding="utf-8")))
    assert list(rows[0]) == ["case_id", "slice_index", "z_mm", "target_0", "target_1", "prob_0", "prob_1"]
    plan_test = [int(r["slice_index"]) for r in rows]
    assert len(plan_test) == run["test_cases"][0]["n_items"] > 0
    assert all(0 <= float(r["prob_0"]) <= 1 for r in rows)
    # targets are the mask-derived labels: the square is only in the upper half of the volume
    assert all(int(r["target_1"]) == int(int(r["slice_index"]) >= 20) for r in rows)


def test_classification_with_one_output_class_is_scored(tmp_path, chest_store):
    settings = {**TINY, "task": "square", "type": "classification", "dataset": "vol", "split": "slabs",
                "target": "slice_structures", "min_pixels": 5, "label_groups": {"square": [7]}}
    out = tmp_path / "one"
    run_finetune(settings, chest_store, out, "none", 1.0, 0)
    scored = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert scored["classes"] == {"0": "square"} and scored["n_rows"] > 0
    # test slabs in both halves: slices with and without the square, so the AUC is defined
    assert 0.0 <= scored["metrics"]["auc_square"] <= 1.0
    assert scored["metrics"]["auc_macro"] == scored["metrics"]["auc_square"]


def test_classification_case_labels_run(tmp_path):
    cases = []
    for i in range(10):
        img, _ = phantom(6, seed=i)
        label = "bright" if i % 2 else "dark"
        cases.append({"case_id": f"c{i}", "image": np.clip(img + (0.3 if i % 2 else 0), 0, 1), "class_label": label})
    splits = {"train": [f"c{i}" for i in range(6)], "val": ["c6", "c7"], "test": ["c8", "c9"]}
    store = write_store(tmp_path / "slices", "cls", cases, splits)
    settings = {**TINY, "task": "brightness", "type": "classification", "dataset": "cls", "split": "cases", "target": "class_label", "bag_size": 2}
    run_finetune(settings, store, tmp_path / "run", "none", 1.0, 0)
    run = json.loads((tmp_path / "run" / "run.json").read_text(encoding="utf-8"))
    assert run["multilabel"] is False and run["level"] == "case" and run["classes"] == {"0": "bright", "1": "dark"}
    rows = list(csv.DictReader(open(tmp_path / "run" / "predictions.csv", encoding="utf-8")))
    assert [r["case_id"] for r in rows] == ["c8", "c9"] and {r["slice_index"] for r in rows} == {"-1"}
    assert [int(r["target"]) for r in rows] == [1, 0]
    assert all(abs(float(r["prob_0"]) + float(r["prob_1"]) - 1) < 1e-4 for r in rows)


def test_detection_run_trained_on_simulated_nodules(tmp_path):
    img, lab = phantom(30, seed=2)
    lungs = np.where(lab == 3, 1, 0)
    lungs[:, 6:26, 6:26] = 1  # a big "lung" to place nodules in
    train_store = write_store(tmp_path / "slices", "train_ct", [{"case_id": "ct", "image": img, "label": lungs}])
    test_img, _ = phantom(20, seed=3)
    test_img[8:11, 14:18, 14:18] = 0.6
    test_store = write_store(tmp_path / "slices", "test_ct", [{"case_id": "scan", "image": test_img}])
    table = tmp_path / "lesions.tsv"
    world = store_index_to_world({"store_affine": store_affine().tolist(), "slice_axis": 2}, [[9.0, 15.5, 15.5]])[0]
    table.write_text("x_mm\ty_mm\tz_mm\tdiameter_mm\n" + "\t".join(f"{v:.2f}" for v in world) + "\t8.0\n", encoding="utf-8")
    settings = {**TINY, "task": "nodules", "type": "detection", "dataset": "test_ct", "train_dataset": "train_ct",
                "lesion_table": str(table), "split": "slabs", "train_targets": "simulated", "min_score": 0.0,
                "simulate": {"organ": [1], "count": 3, "diameter_mm": [6.0, 10.0], "hu": [0.0, 100.0], "avoid_mm": 8.0}}
    out = tmp_path / "det"
    run_finetune(settings, test_store, out, "none", 1.0, 0, train_slices_dir=train_store)
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert run["trained_on"] == "simulated nodules" and run["train_dataset"] == "train_ct" and run["dataset"] == "test_ct"
    assert run["test_cases"][0]["case_id"] == "scan" and len(run["test_cases"][0]["lesions"]) == 1
    assert run["detection"]["n_scans"] == 1 and run["predictions"] == "detections.csv"
    assert "scan" not in run["train_cases"] + run["val_cases"]
    rows = list(csv.DictReader(open(out / "detections.csv", encoding="utf-8")))
    assert rows and list(rows[0]) == ["case_id", "x_mm", "y_mm", "z_mm", "score", "diameter_mm", "n_slices"]
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)


def test_init_requires_encoder(tmp_path, chest_store):
    with pytest.raises(MedclustError, match="encoder"):
        run_finetune(_seg_settings(), chest_store, tmp_path / "x", "joint", 1.0, 0)


def test_cli_finetune(tmp_path, chest_store):
    from medclust.cli import main

    settings = json.dumps(_seg_settings(steps=1, eval_every=1))
    out = tmp_path / "cli_run"
    assert main(["finetune", "--settings", settings, "--slices", str(chest_store), "--init", "none",
                 "--fraction", "1.0", "--seed", "0", "--out", str(out)]) == 0
    assert (out / "model.pt").is_file() and json.loads((out / "run.json").read_text(encoding="utf-8"))["selection"]["best_step"] == 1
    # a bad input is one line and exit 2, not a traceback
    assert main(["finetune", "--settings", settings, "--slices", str(tmp_path / "missing"), "--init", "none",
                 "--fraction", "1.0", "--seed", "0", "--out", str(tmp_path / "x")]) == 2


def test_detection_on_one_volume_with_slabs_and_real_lesions(tmp_path):
    img, _ = phantom(40, seed=4)
    attrs = {"store_affine": store_affine().tolist(), "slice_axis": 2}
    centres = np.array([[5.0, 10.0, 10.0], [20.0, 16.0, 16.0], [35.0, 20.0, 12.0]])
    for c in centres.astype(int):
        img[c[0] - 1 : c[0] + 2, c[1] - 2 : c[1] + 3, c[2] - 2 : c[2] + 3] = 0.7
    store = write_store(tmp_path / "slices", "ct", [{"case_id": "scan", "image": img}])
    world = store_index_to_world(attrs, centres)
    table = tmp_path / "lesions.csv"
    table.write_text("case_id,x_mm,y_mm,z_mm,diameter_mm\n" + "".join(f"scan,{x:.2f},{y:.2f},{z:.2f},8\n" for x, y, z in world), encoding="utf-8")
    settings = {**TINY, "task": "les", "type": "detection", "dataset": "ct", "lesion_table": str(table),
                "split": "slabs", "train_targets": "lesions", "min_score": 0.0,
                "slabs": {"blocks": 1, "val_fraction": 0.25, "test_fraction": 0.25, "gap_mm": 4.0}}
    data = prepare_task_data(settings, store, 1.0, 0)
    layout = data.plan.layout["scan"]
    assert list(layout[[5, 20, 35]]) == ["train", "val", "test"]
    heat = data.case("scan").target
    assert heat[5].max() == 1.0 and heat[20].max() == 1.0 and heat[35].max() == 0.0  # the test lesion is no target
    out = tmp_path / "run"
    run_finetune(settings, store, out, "none", 1.0, 0)
    (case,) = json.loads((out / "run.json").read_text(encoding="utf-8"))["test_cases"]
    assert len(case["lesions"]) == 1 and abs(case["lesions"][0]["z_mm"] - world[2, 2]) < 1e-6  # only the test-slab lesion
    assert case["roi_z_mm"]
    rows = list(csv.DictReader(open(out / "detections.csv", encoding="utf-8")))
    lo, hi = case["roi_z_mm"][0]
    assert rows and all(lo - 1e-6 <= float(r["z_mm"]) <= hi + 1e-6 for r in rows)


def test_simulated_nodules_stay_in_train_and_val_slabs_and_validation_follows_the_fraction(tmp_path):
    img, _ = phantom(60, seed=7)
    organ = np.zeros(img.shape, np.int64)
    organ[:, 4:28, 4:28] = 1
    store = write_store(tmp_path / "slices", "ct", [{"case_id": "scan", "image": img, "label": organ}])
    world = store_index_to_world({"store_affine": store_affine().tolist(), "slice_axis": 2}, [[50.0, 16.0, 16.0]])[0]
    table = tmp_path / "lesions.csv"
    table.write_text("case_id,x_mm,y_mm,z_mm,diameter_mm\nscan," + ",".join(f"{v:.2f}" for v in world) + ",8\n", encoding="utf-8")
    settings = {**TINY, "task": "les", "type": "detection", "dataset": "ct", "lesion_table": str(table),
                "split": "slabs", "train_targets": "simulated",
                "slabs": {"blocks": 2, "val_fraction": 0.25, "test_fraction": 0.25, "gap_mm": 4.0},
                "simulate": {"organ": [1], "count": 8, "diameter_mm": [10.0, 14.0], "hu": [0.0, 100.0], "avoid_mm": 4.0}}
    full = prepare_task_data(settings, store, 1.0, 0)
    layout = full.plan.layout["scan"]
    changed = np.flatnonzero((full.case("scan").image != img).any(axis=(1, 2)))
    assert len(full.case("scan").extra["simulated_lesions"]) >= 4 and changed.size
    # every simulated voxel lies in a train or val slab: none in a gap or a test slab
    assert set(layout[changed]) <= {"train", "val"}, dict(zip(changed.tolist(), layout[changed]))
    quarter = prepare_task_data(settings, store, 0.25, 0)
    n_val = sum(len(v) for v in full.plan.val.values())
    assert sum(len(v) for v in quarter.plan.val.values()) == math.ceil(0.25 * n_val) < n_val
    assert set(quarter.plan.val["scan"].tolist()) <= set(full.plan.val["scan"].tolist())


def test_ignore_real_lesions_masks_a_ball_around_each_real_lesion(tmp_path):
    img, lab = phantom(30, seed=5)
    organ = np.zeros_like(lab)
    organ[:, 4:28, 4:28] = 1
    centre = np.array([[10.0, 16.0, 16.0]])
    store = write_store(tmp_path / "slices", "ct", [{"case_id": "scan", "image": img, "label": organ}])
    world = store_index_to_world({"store_affine": store_affine().tolist(), "slice_axis": 2}, centre)
    table = tmp_path / "lesions.csv"
    table.write_text("case_id,x_mm,y_mm,z_mm,diameter_mm\n" + "".join(f"scan,{x:.2f},{y:.2f},{z:.2f},8\n" for x, y, z in world), encoding="utf-8")
    settings = {**TINY, "task": "les", "type": "detection", "dataset": "ct", "lesion_table": str(table),
                "split": "slabs", "train_targets": "simulated", "min_score": 0.0,
                "slabs": {"blocks": 1, "val_fraction": 0.2, "test_fraction": 0.2, "gap_mm": 4.0},
                "simulate": {"organ": [1], "count": 2, "diameter_mm": [6.0, 8.0], "hu": [0.0, 100.0],
                             "avoid_mm": 8.0, "ignore_real_lesions": True}}
    data = prepare_task_data(settings, store, 1.0, 0)
    ignore = data.case("scan").extra["ignore"]
    assert ignore.shape == img.shape and ignore.dtype == bool
    assert ignore[10, 16, 16] and not ignore[25, 4, 4]  # a ball at the real lesion, nothing far away
    assert any("ignore_real_lesions" in note for note in data.notes)


def test_declared_outputs_appear_together_or_not_at_all(tmp_path, chest_store, monkeypatch):
    """A run that fails after scoring (as a kill would) leaves no declared output behind, so
    Snakemake reruns it without --rerun-incomplete; a run that finishes has all of them."""
    import medclust.predict.recipes as recipes

    settings = {**TINY, "task": "square", "type": "classification", "dataset": "vol", "split": "slabs",
                "target": "slice_structures", "min_pixels": 5, "label_groups": {"square": [7]}}
    declared = ["run.json", "metrics.json", "per_case.csv", "model.json", "model.pt"]

    def fail(*args, **kwargs):
        raise RuntimeError("killed while writing the package")

    monkeypatch.setattr(recipes, "write_finetune_package", fail)
    with pytest.raises(RuntimeError):
        run_finetune(settings, chest_store, tmp_path / "run", "none", 1.0, 0)
    assert [n for n in declared if (tmp_path / "run" / n).exists()] == []
    assert not list((tmp_path / "run").glob(".*.tmp"))
    monkeypatch.undo()
    run_finetune(settings, chest_store, tmp_path / "run", "none", 1.0, 0)
    assert [n for n in declared if (tmp_path / "run" / n).exists()] == declared
    run = json.loads((tmp_path / "run" / "run.json").read_text(encoding="utf-8"))
    provenance = json.loads((tmp_path / "run" / "evaluate_provenance.json").read_text(encoding="utf-8"))
    assert str(tmp_path / "run" / "run.json") in provenance["inputs"]  # hashed while still pending
    assert run["type"] == "classification"
