"""Fine-tuning outputs: a trained model's test predictions on the original grid, per task type.

Segmentation label maps (NIfTI on each test case's original grid), classification probabilities
(``predictions.csv``), detections in RAS mm (``detections.csv``) and the validation curve
(``val.csv``). Used by :func:`medclust.train.recipes.finetune.run_finetune`.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medclust.data.downstream import TaskCase, context_stack
from medclust.evaluate.predict import (
    group_peaks,
    predict_logits,
    predict_segmentation,
    predict_slices,
)
from medclust.io.atomic import write_text_atomic
from medclust.io.original_grid import (
    store_to_original,
    world_to_store_index,
    write_label_nifti,
)
from medclust.train.recipes.finetune_data import TaskData, _spacing, lesions_of

log = logging.getLogger("medclust.finetune")


@torch.no_grad()
def _case_probs(model: nn.Module, case: TaskCase, idx: np.ndarray, k: int, bs: int, bag: int) -> np.ndarray:
    """Case-level class probabilities: the model's bag pooling over all ``idx`` slices."""
    was = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        stack = torch.from_numpy(context_stack(case.image, idx, k)).to(device)
        feats = torch.cat([model.features(stack[i : i + bs]) for i in range(0, len(stack), bs)]).mean(0, keepdim=True)  # type: ignore[operator]
        logits = model.head(feats)  # type: ignore[operator]
    finally:
        model.train(was)
    return torch.softmax(logits.float(), dim=1)[0].cpu().numpy()


# -- the run --------------------------------------------------------------------------------------


def _write_segmentation(model: nn.Module, data: TaskData, out: Path, s: Mapping[str, Any]) -> list[dict[str, Any]]:
    from medclust.io.original_grid import slice_roi_on_original

    plan = data.plan
    assert plan is not None
    k = int(s.get("context_slices", 0))
    bs = int(s.get("predict_batch_size", 16))
    lut_json = None if all(r == c for r, c in data.lut.items()) else {str(r): c for r, c in sorted(data.lut.items())}
    entries = []
    for cid in sorted(plan.test):
        case = data.case(cid, train=data.same_dataset)
        idx = plan.test[cid]
        pred = predict_segmentation(model, case.image, idx, k, bs)
        original = store_to_original(pred, case.attrs)
        affine = np.asarray(case.attrs["original_affine"], dtype=float)
        pred_rel = f"predictions/{cid}.nii.gz"
        write_label_nifti(out / pred_rel, original, affine)
        roi_rel = None
        z_ranges = None
        if len(idx) < case.num_slices:
            mask = np.zeros(case.num_slices, bool)
            mask[idx] = True
            roi_rel = f"roi/{cid}.nii.gz"
            write_label_nifti(out / roi_rel, slice_roi_on_original(mask, case.attrs).astype(np.uint8), affine, dtype=np.uint8)
            z_ranges = _z_ranges(case.z_mm, mask)
        entries.append(
            {
                "case_id": cid,
                "image": case.attrs.get("source_path"),
                "label": case.attrs.get("label_path") or None,
                "label_map": lut_json,
                "prediction": pred_rel,
                "roi": roi_rel,
                "roi_z_mm": z_ranges,
            }
        )
    return entries


def _z_ranges(z_mm: np.ndarray, mask: np.ndarray) -> list[list[float]]:
    ranges = []
    start = None
    for i, m in enumerate(list(mask) + [False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            lo, hi = sorted((float(z_mm[start]), float(z_mm[i - 1])))
            ranges.append([round(lo, 3), round(hi, 3)])
            start = None
    return ranges


def _write_classification(model: nn.Module, data: TaskData, out: Path, s: Mapping[str, Any]) -> list[dict[str, Any]]:
    plan = data.plan
    assert plan is not None
    k = int(s.get("context_slices", 0))
    bs = int(s.get("predict_batch_size", 16))
    n = data.num_outputs
    head = ["case_id", "slice_index", "z_mm"]
    head += [f"target_{c}" for c in range(n)] if data.multilabel else ["target"]
    head += [f"prob_{c}" for c in range(n)]
    lines = [head]
    entries = []
    for cid in sorted(plan.test):
        case = data.case(cid, train=data.same_dataset)
        idx = np.asarray(plan.test[cid])
        if data.case_level:
            probs = _case_probs(model, case, idx, k, bs, int(s.get("bag_size", 8)))
            lines.append([cid, -1, ""] + [case.target] + [f"{p:.6f}" for p in probs])
            n_items = 1
        else:
            probs = predict_slices(model, case.image, idx, k, bs, multilabel=data.multilabel)
            for j, sl in enumerate(idx):
                targets = [int(t) for t in case.target[sl]]
                lines.append([cid, int(sl), f"{float(case.z_mm[sl]):.3f}"] + targets + [f"{p:.6f}" for p in probs[j]])
            n_items = len(idx)
        entries.append({"case_id": cid, "image": case.attrs.get("source_path"), "label": case.attrs.get("label_path") or None, "n_items": n_items})
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(lines)
    write_text_atomic(out / "predictions.csv", buf.getvalue())
    return entries


def _write_detection(model: nn.Module, data: TaskData, out: Path, s: Mapping[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    plan = data.plan
    assert plan is not None
    k = int(s.get("context_slices", 0))
    bs = int(s.get("predict_batch_size", 16))
    rows = [["case_id", "x_mm", "y_mm", "z_mm", "score", "diameter_mm", "n_slices"]]
    entries = []
    test_ids = sorted(plan.test)
    for cid in test_ids:
        case = data.case(cid, train=data.same_dataset)
        idx = np.asarray(plan.test[cid])
        heat = np.zeros(case.image.shape, np.float32)
        if len(idx):
            heat[idx] = torch.sigmoid(predict_logits(model, case.image, idx, k, bs))[:, 0].numpy()
        dets = group_peaks(
            heat,
            case.attrs,
            _spacing(case),
            min_score=float(s.get("min_score", 0.05)),
            max_distance_mm=float(s.get("group_distance_mm", 10.0)),
            max_slice_gap_mm=float(s.get("group_slice_gap_mm", 15.0)),
            max_detections=int(s.get("max_detections", 100)),
        )
        for d in dets:
            rows.append([cid, f"{d.world[0]:.2f}", f"{d.world[1]:.2f}", f"{d.world[2]:.2f}", f"{d.score:.6f}", f"{d.diameter_mm:.1f}", d.n_slices])
        lesions = lesions_of(data.lesion_table, cid, only_case=len(test_ids) == 1)
        entry: dict[str, Any] = {"case_id": cid, "image": case.attrs.get("source_path"), "lesions": lesions}
        layout = plan.layout.get(cid) if data.same_dataset else None
        if layout is not None:
            # slab split: only lesions centred in the test slabs are ground truth, only test slices predicted
            pts = np.array([[r["x_mm"], r["y_mm"], r["z_mm"]] for r in lesions]).reshape(-1, 3)
            sl = np.rint(world_to_store_index(case.attrs, pts)[:, 0]).astype(int) if len(pts) else np.zeros(0, int)
            inside = (sl >= 0) & (sl < case.num_slices)
            entry["lesions"] = [r for r, ok, s_ in zip(lesions, inside, sl) if ok and layout[s_] == "test"]
            entry["roi_z_mm"] = _z_ranges(case.z_mm, layout == "test")
        entries.append(entry)
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    write_text_atomic(out / "detections.csv", buf.getvalue())
    block = {
        "lesion_table": str(s.get("lesion_table")),
        "hit_rule": "distance",
        "min_hit_radius_mm": float(s.get("min_hit_radius_mm", 5.0)),
        # lesions below this size are irrelevant findings at scoring (LUNA16), see evaluate.metrics
        "min_diameter_mm": float(s.get("min_diameter_mm", 3.0)),
        "fp_rates": [float(v) for v in s.get("fp_rates", [0.125, 0.25, 0.5, 1, 2, 4, 8])],
        "n_scans": len(test_ids),
    }
    return entries, block


def _write_val_csv(path: Path, rows: Sequence[Mapping[str, float]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["step", "val_metric", "val_loss"])
    for r in rows:
        writer.writerow([r["step"], f"{r['val_metric']:.6f}", f"{r['val_loss']:.6f}"])
    write_text_atomic(path, buf.getvalue())
