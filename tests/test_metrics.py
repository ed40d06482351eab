"""Metrics against hand-computed answers, and `medclust evaluate` on synthetic run folders."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medclust.cli import main
from medclust.evaluate import evaluate_run
from medclust.evaluate.metrics import (
    Detection,
    Nodule,
    froc,
    froc_from_scans,
    match_detections,
    roc_auc_per_class,
    segmentation_scores,
    split_by_size,
)


def _cube(shape, lo, hi, value=1):
    out = np.zeros(shape, dtype=np.int16)
    out[tuple(slice(a, b) for a, b in zip(lo, hi))] = value
    return out


# --- segmentation -----------------------------------------------------------------------------


def test_dice_hd95_hand_computed_multiclass():
    shape = (6, 6, 6)
    gt = _cube(shape, (1, 1, 1), (3, 3, 3), 1)  # class 1: 2x2x2 cube
    pred = _cube(shape, (2, 1, 1), (4, 3, 3), 1)  # shifted by one voxel along x
    gt[4:6, 4:6, 4:6] = 2  # class 2 only in the ground truth (missed)
    gt[0, 5, 0] = 4  # class 4: one voxel, predicted exactly
    pred[0, 5, 0] = 4
    spacing = (2.0, 1.0, 1.0)
    scores = segmentation_scores(pred, gt, [1, 2, 3, 4], spacing)
    # |A∩B| = 4 voxels, |A| = |B| = 8 -> 2*4/16.
    assert scores[1]["dice"] == pytest.approx(0.5)
    # Every voxel of a 2x2x2 cube is on its surface; half the surface points are 0 away, half one
    # voxel along x = 2 mm: the 95th percentile is 2 mm (1 mm if spacing were ignored).
    assert scores[1]["hd95"] == pytest.approx(2.0)
    # Missed class: Dice 0, HD95 = the worst possible distance, the grid diagonal in mm.
    assert scores[2]["dice"] == 0.0
    assert scores[2]["hd95"] == pytest.approx(math.sqrt(12**2 + 6**2 + 6**2))
    # Absent from both: no score (omitted from means), never a binary collapse.
    assert math.isnan(scores[3]["dice"]) and math.isnan(scores[3]["hd95"])
    assert scores[4]["dice"] == pytest.approx(1.0) and scores[4]["hd95"] == pytest.approx(0.0)


def test_segmentation_roi_ignores_voxels_outside():
    gt = _cube((4, 4, 6), (0, 0, 0), (4, 4, 6), 1)
    pred = gt.copy()
    pred[:, :, 3:] = 0  # wrong, but only outside the evaluated slab
    roi = np.zeros(gt.shape, bool)
    roi[:, :, :3] = True
    assert segmentation_scores(pred, gt, [1], (1, 1, 1), roi=roi)[1]["dice"] == pytest.approx(1.0)
    # Without the ROI: 2 * 48 / (48 + 96).
    assert segmentation_scores(pred, gt, [1], (1, 1, 1))[1]["dice"] == pytest.approx(2 / 3)


def test_segmentation_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        segmentation_scores(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)), [1], (1, 1, 1))


# --- classification ---------------------------------------------------------------------------


def test_auc_tiny_set_and_undefined_class():
    probs = np.array([[0.1, 0.2], [0.4, 0.1], [0.35, 0.3], [0.8, 0.9]])
    targets = np.array([[0, 0], [0, 0], [1, 0], [1, 0]])
    aucs = roc_auc_per_class(probs, targets)
    # Positives {0.35, 0.8} vs negatives {0.1, 0.4}: 3 of 4 pairs ordered -> 0.75.
    assert aucs[0] == pytest.approx(0.75)
    assert math.isnan(aucs[1])  # no positive of class 1: undefined, not 0.5


def test_auc_one_output_class():
    # (N, 1): MONAI alone reads this as a binary problem and returns a bare float
    aucs = roc_auc_per_class(np.array([[0.1], [0.4], [0.35], [0.8]]), np.array([[0], [0], [1], [1]]))
    assert aucs == [pytest.approx(0.75)]
    assert math.isnan(roc_auc_per_class(np.array([[0.1], [0.4]]), np.array([[1], [1]]))[0])


def test_evaluate_one_class_classification_run(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({
        "task": "lungs", "type": "classification", "init": "none", "fraction": 1.0, "seed": 0,
        "multilabel": True, "classes": {"0": "lungs"}, "predictions": "predictions.csv", "test_cases": [],
    }), encoding="utf-8")  # fmt: skip
    with open(tmp_path / "predictions.csv", "w", encoding="utf-8") as f:
        f.write("case_id,slice_index,z_mm,target_0,prob_0\n")
        for i, (t, p) in enumerate([(0, 0.1), (0, 0.4), (1, 0.35), (1, 0.8)]):
            f.write(f"c0,{i},{i * 4.0},{t},{p}\n")
    metrics = evaluate_run(tmp_path)["metrics"]
    assert metrics["auc_lungs"] == pytest.approx(0.75) and metrics["auc_macro"] == pytest.approx(0.75)
    assert metrics["accuracy"] == pytest.approx(0.75)  # 0.35 < 0.5 is the one miss


def test_auc_single_label_indices_one_vs_rest():
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1]])
    aucs = roc_auc_per_class(probs, np.array([0, 1, 2, 0]))
    assert aucs == pytest.approx([1.0, 1.0, 1.0])


# --- detection --------------------------------------------------------------------------------


def test_match_detections_hit_rule():
    nodules = [Nodule("a", (0, 0, 0), 20.0), Nodule("a", (50, 0, 0), 2.0)]
    dets = [
        Detection("a", (9, 0, 0), 0.9),  # inside nodule 0 (radius 10)
        Detection("a", (0, 5, 0), 0.5),  # second hit on nodule 0: neither TP nor FP
        Detection("a", (54, 0, 0), 0.4),  # nodule 1 radius 1 mm, floor 5 mm: a hit
        Detection("a", (100, 0, 0), 0.3),  # nothing: FP
    ]
    fp, tp = match_detections(dets, nodules, min_hit_radius_mm=5.0)
    assert fp.tolist() == [0.3]
    assert tp.tolist() == [0.9, 0.4]
    fp, tp = match_detections(dets, nodules, min_hit_radius_mm=0.0)
    assert sorted(fp.tolist()) == [0.3, 0.4] and tp.tolist() == [0.9, 0.0]


def test_lesions_below_min_diameter_are_neither_targets_nor_false_positives():
    big = Nodule("a", (0, 0, 0), 10.0)
    tiny = Nodule("a", (40, 0, 0), 2.0)  # measured, below 3 mm
    point = Nodule("a", (0, 40, 0), 3.0, small=True)  # LIDC "< 3 mm": 3 is an upper bound
    unknown = Nodule("a", (0, 0, 40), 0.0)  # no diameter: size unknown, stays a target
    border = Nodule("a", (0, 0, 80), 3.0)  # exactly 3 mm, measured: a target
    targets, irrelevant = split_by_size([big, tiny, point, unknown, border], 3.0)
    assert targets == [big, unknown, border] and irrelevant == [tiny, point]
    assert split_by_size([big, tiny, point], 0.0) == ([big, tiny, point], [])
    dets = [
        Detection("a", (1, 0, 0), 0.9),  # the big nodule: TP
        Detection("a", (41, 0, 0), 0.8),  # the 2 mm nodule: ignored
        Detection("a", (0, 41, 0), 0.7),  # the point-marked nodule: ignored
        Detection("a", (90, 90, 0), 0.1),  # nothing: FP
    ]
    fp, tp = match_detections(dets, [big], 5.0, irrelevant=[tiny, point])
    assert fp.tolist() == [0.1] and tp.tolist() == [0.9]
    assert froc(fp, tp, num_scans=1)["froc_avg"] == pytest.approx(1.0)
    # a detection that reaches a target and an irrelevant finding belongs to the target
    fp, tp = match_detections([Detection("a", (4, 0, 0), 0.6)], [big], 5.0, irrelevant=[Nodule("a", (8, 0, 0), 1.0)])
    assert fp.size == 0 and tp.tolist() == [0.6]


# LIDC-IDRI-0001's nodules.tsv (resources/demo/lidc_dicom, derived from the readers' 069.xml):
# one nodule of ~33 mm and three that every reader marked as < 3 mm.
LIDC_0001_NODULES = [
    {"nodule_id": 1, "case_id": "LIDC-IDRI-0001", "x_mm": -56.37, "y_mm": -86.36, "z_mm": -115.81, "diameter_mm": 32.76, "small": False},
    {"nodule_id": 2, "case_id": "LIDC-IDRI-0001", "x_mm": 33.81, "y_mm": 54.75, "z_mm": -150.0, "diameter_mm": 3.0, "small": True},
    {"nodule_id": 3, "case_id": "LIDC-IDRI-0001", "x_mm": -109.62, "y_mm": -50.96, "z_mm": -175.0, "diameter_mm": 3.0, "small": True},
    {"nodule_id": 4, "case_id": "LIDC-IDRI-0001", "x_mm": -117.59, "y_mm": -19.78, "z_mm": -175.0, "diameter_mm": 3.0, "small": True},
]


@pytest.mark.parametrize("min_diameter", [3.0, 0.0])
def test_evaluate_lidc_0001_froc_scores_only_nodules_of_3_mm_and_more(tmp_path, min_diameter):
    (tmp_path / "run.json").write_text(json.dumps({
        "task": "lidc", "type": "detection", "init": "none", "fraction": 1.0, "seed": 0, "classes": {"0": "nodule"},
        "predictions": "detections.csv",
        "detection": {"min_hit_radius_mm": 5.0, "min_diameter_mm": min_diameter, "fp_rates": [0.125, 0.25, 0.5, 1, 2, 4, 8]},
        "test_cases": [{"case_id": "LIDC-IDRI-0001", "lesions": LIDC_0001_NODULES}],
    }), encoding="utf-8")  # fmt: skip
    with open(tmp_path / "detections.csv", "w", encoding="utf-8") as f:
        f.write("case_id,x_mm,y_mm,z_mm,score,diameter_mm,n_slices\n")
        for n, score in zip(LIDC_0001_NODULES, (0.9, 0.6, 0.5, 0.4)):  # the big one and every small one found
            f.write(f"LIDC-IDRI-0001,{n['x_mm'] + 2},{n['y_mm']},{n['z_mm']},{score},8,2\n")
        f.write("LIDC-IDRI-0001,100,100,0,0.7,8,2\n")  # one false positive
    record = evaluate_run(tmp_path)
    (row,) = csv.DictReader(open(tmp_path / "per_case.csv", encoding="utf-8"))
    if min_diameter == 3.0:
        # one target, found above the only FP; the small nodules' detections count nowhere
        assert record["min_diameter_mm"] == 3.0 and record["metrics"]["n_lesions"] == 1
        assert (row["n_lesions"], row["n_small_lesions"], row["n_ignored_detections"]) == ("1", "3", "3")
        assert row["fp_scores"] == "0.7" and row["tp_scores"] == "0.9"
        assert record["metrics"]["froc_avg"] == pytest.approx(1.0)
    else:
        # every reader mark a target: the small ones are found only below the FP's score
        assert record["metrics"]["n_lesions"] == 4 and row["n_ignored_detections"] == "0"
        assert record["metrics"]["froc_sens@0.125fp"] == pytest.approx(0.25)


def test_froc_toy_known_sensitivities():
    # 2 scans, 4 nodules: TP scores 0.9, 0.6, 0.3 and one missed; FPs 0.8, 0.5, 0.2, 0.1.
    # Operating points (FP/scan, sensitivity) at decreasing thresholds:
    # (0, 1/4) (0.5, 1/4) (0.5, 2/4) (1, 2/4) (1, 3/4) (1.5, 3/4) (2, 3/4).
    out = froc([0.8, 0.5, 0.2, 0.1], [0.9, 0.6, 0.3, 0.0], num_scans=2)
    expected = {0.125: 0.25, 0.25: 0.25, 0.5: 0.5, 1: 0.75, 2: 0.75, 4: 0.75, 8: 0.75}
    for rate, sens in expected.items():
        assert out[f"froc_sens@{rate:g}fp"] == pytest.approx(sens)
    assert out["froc_avg"] == pytest.approx(np.mean(list(expected.values())))


def test_froc_lowest_score_counts_and_is_rank_based():
    # All found with no FP: sensitivity 1 everywhere (MONAI alone would skip the lowest score).
    assert froc([], [0.2, 0.1], num_scans=1)["froc_avg"] == pytest.approx(1.0)
    a = froc([0.8, 0.5], [0.9, 0.3, 0.0], num_scans=1)
    b = froc([8.0, 5.0], [9.0, 3.0, 0.0], num_scans=1)  # monotone rescaling: same FROC
    assert a == pytest.approx(b)
    assert math.isnan(froc_from_scans({})["froc_avg"])


# --- medclust evaluate on run folders ---------------------------------------------------------


def _nifti(path: Path, data: np.ndarray, spacing=(2.0, 1.0, 1.0)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([*spacing, 1.0])), str(path))
    return str(path)


def _seg_run(tmp_path: Path) -> Path:
    run = tmp_path / "finetune" / "organs" / "none" / "0.5" / "0"
    raw = np.zeros((6, 6, 6), np.int16)
    raw[1:3, 1:3, 1:3] = 12  # raw 12 -> class 1
    raw[4:6, 4:6, 4:6] = 51  # raw 51 -> class 2
    raw[0, 0, 0] = 99  # unmapped raw value -> background
    label = _nifti(tmp_path / "data" / "label.nii.gz", raw)
    image = _nifti(tmp_path / "data" / "image.nii.gz", raw.astype(np.float32))
    pred = np.zeros_like(raw)
    pred[2:4, 1:3, 1:3] = 1
    _nifti(run / "predictions" / "c0.nii.gz", pred)
    roi = np.ones_like(raw, dtype=np.uint8)
    _nifti(run / "roi" / "c0.nii.gz", roi)
    spec = {
        "format_version": 1, "task": "organs", "type": "segmentation", "dataset": "ct", "init": "none",
        "fraction": 0.5, "seed": 0, "mode": "full", "trained_on": "real labels",
        "classes": {"1": "Lungs", "2": "heart"}, "background": 0, "predictions": "predictions/",
        "test_cases": [{"case_id": "c0", "image": image, "label": label, "label_map": {"12": 1, "51": 2},
                        "prediction": "predictions/c0.nii.gz", "roi": "roi/c0.nii.gz"}],
    }  # fmt: skip
    (run / "run.json").write_text(json.dumps(spec), encoding="utf-8")
    return run


def test_evaluate_segmentation_run(tmp_path):
    run = _seg_run(tmp_path)
    assert main(["evaluate", "--run", str(run)]) == 0
    record = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    m = record["metrics"]
    assert record["primary_metric"] == "dice_mean" and record["simulated"] is False
    assert m["dice_lungs"] == pytest.approx(0.5) and m["hd95_lungs"] == pytest.approx(2.0)
    assert m["dice_heart"] == 0.0
    assert m["dice_mean"] == pytest.approx(0.25)
    rows = list(csv.DictReader(open(run / "per_case.csv", encoding="utf-8")))
    assert rows[0]["case_id"] == "c0" and float(rows[0]["dice_lungs"]) == pytest.approx(0.5)
    assert (run / "evaluate_provenance.json").exists()


def test_evaluate_rejects_prediction_on_wrong_grid(tmp_path, capsys):
    run = _seg_run(tmp_path)
    _nifti(run / "predictions" / "c0.nii.gz", np.zeros((6, 6, 5), np.int16))
    assert main(["evaluate", "--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert "c0.nii.gz" in err and "grid" in err
    assert not (run / "metrics.json").exists()


def test_evaluate_classification_and_detection_runs(tmp_path):
    cls = tmp_path / "cls"
    cls.mkdir()
    (cls / "run.json").write_text(json.dumps({
        "task": "xr", "type": "classification", "init": "joint", "fraction": 1.0, "seed": 1,
        "multilabel": True, "classes": {"0": "nodule", "1": "effusion"}, "predictions": "predictions.csv",
        "trained_on": "simulated radiographs", "test_cases": [],
    }), encoding="utf-8")  # fmt: skip
    with open(cls / "predictions.csv", "w", encoding="utf-8") as f:
        f.write("case_id,slice_index,z_mm,target_0,target_1,prob_0,prob_1\n")
        for i, (t0, t1, p0, p1) in enumerate([(0, 1, 0.1, 0.9), (0, 0, 0.4, 0.2), (1, 1, 0.35, 0.7), (1, 0, 0.8, 0.3)]):
            f.write(f"c{i},-1,,{t0},{t1},{p0},{p1}\n")
    rec = evaluate_run(cls)
    assert rec["metrics"]["auc_nodule"] == pytest.approx(0.75)
    assert rec["metrics"]["auc_effusion"] == pytest.approx(1.0)
    assert rec["metrics"]["auc_macro"] == pytest.approx(0.875)
    assert rec["simulated"] is True

    det = tmp_path / "det"
    det.mkdir()
    (det / "run.json").write_text(json.dumps({
        "task": "nod", "type": "detection", "init": "none", "fraction": 1.0, "seed": 0, "classes": {"0": "nodule"},
        "predictions": "detections.csv", "trained_on": "simulated nodules",
        "detection": {"min_hit_radius_mm": 5.0, "fp_rates": [0.125, 0.25, 0.5, 1, 2, 4, 8]},
        "test_cases": [
            {"case_id": "s0", "lesions": [{"x_mm": 0, "y_mm": 0, "z_mm": 0, "diameter_mm": 8},
                                          {"x_mm": 40, "y_mm": 0, "z_mm": 0, "diameter_mm": 8}]},
            {"case_id": "s1", "lesions": [{"x_mm": 0, "y_mm": 0, "z_mm": 0, "diameter_mm": 8},
                                          {"x_mm": 0, "y_mm": 40, "z_mm": 0, "diameter_mm": 8}]},
        ],
    }), encoding="utf-8")  # fmt: skip
    with open(det / "detections.csv", "w", encoding="utf-8") as f:
        f.write("case_id,x_mm,y_mm,z_mm,score,diameter_mm,n_slices\n")
        f.write("s0,1,0,0,0.9,8,2\ns0,90,0,0,0.8,8,2\ns0,40,2,0,0.6,8,2\ns1,0,0,90,0.5,8,2\n")
        f.write("s1,0,1,0,0.3,8,2\ns1,70,0,0,0.2,8,2\ns1,0,0,-90,0.1,8,2\n")
    rec = evaluate_run(det)
    # Same toy set as test_froc_toy_known_sensitivities, split over two scans.
    assert rec["metrics"]["froc_avg"] == pytest.approx(4 / 7)
    assert rec["primary_metric"] == "froc_avg" and rec["simulated"] is True
    rows = {r["case_id"]: r for r in csv.DictReader(open(det / "per_case.csv", encoding="utf-8"))}
    assert rows["s0"]["n_hits"] == "2" and rows["s1"]["tp_scores"] == "0.3;0"
