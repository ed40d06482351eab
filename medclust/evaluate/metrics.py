"""Downstream metrics, computed with MONAI: Dice and HD95 per class, ROC AUC, FROC.

Conventions (shared by ``medclust evaluate`` and the study; the README quotes them):

- **Segmentation** is scored per class on label maps of the same grid (the original image grid),
  every foreground class kept separately — never collapsed to a binary mask.

  * Dice: ``monai.metrics.compute_dice``. A class absent from both the prediction and the ground
    truth has no Dice (NaN, omitted from every mean); a class present in only one of them scores 0.
  * HD95: ``monai.metrics.compute_hausdorff_distance(percentile=95)`` (symmetric, 95th percentile
    of the surface distances) with the voxel spacing of the original grid, so it is in mm.
    Absent from both: NaN (omitted). Present in only one of them: the distance is undefined, and
    it is scored as the diagonal of the evaluated region in mm (the worst possible value), so
    that missing a structure never looks better than finding it badly.
  * Both are computed on the bounding box of ``pred == c or gt == c`` (plus a margin): Dice and
    surface distances do not change under a crop that contains both masks, and the crop keeps a
    512x512x133 volume with many classes cheap.

- **Classification**: ``monai.metrics.compute_roc_auc`` one-vs-rest per class (``average="none"``);
  the macro AUC is the mean over the classes whose AUC is defined (a class with only positives
  or only negatives among the targets has none: NaN, omitted). Multi-label targets are a 0/1
  matrix; single-label targets are one-hot encoded.

- **Detection**: free-response ROC. A detection (a point in world mm) hits a ground-truth nodule
  if its distance to the nodule centre is at most ``max(radius, min_hit_radius_mm)``; the radius
  comes from the nodule's diameter and the floor keeps tiny nodules findable. A detection inside
  several nodules goes to the nearest centre. Per nodule, the highest-scoring hit is its true
  positive; further hits on a found nodule are neither TP nor FP (the CAMELYON/LUNA convention
  that ``monai.metrics.froc.compute_fp_tp_probs_nd`` implements); detections that hit nothing are
  false positives. Lesions smaller than ``min_diameter_mm`` (default 3 mm, as LUNA16) are
  *irrelevant findings*: they are not targets (not in the sensitivity's denominator), and a
  detection that hits no target but hits one of them is neither a TP nor an FP. A lesion flagged
  ``small`` (the LIDC "< 3 mm" category) is below its ``diameter_mm``, which is then an upper
  bound; a lesion without a diameter (0) has an unknown size and stays a target. The curve and the average sensitivity come from MONAI's
  ``compute_froc_curve_data`` / ``compute_froc_score`` at 1/8, 1/4, 1/2, 1, 2, 4, 8 FP per scan.
  Scores are replaced by their dense rank (1..K) first: FROC depends only on the order of the
  scores, and MONAI's curve skips the lowest distinct score as a threshold, which is 0 only
  when a nodule was missed — a 0 sentinel makes every real score a threshold.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

FROC_FP_RATES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
"""False positives per scan at which FROC sensitivity is reported (LUNA16)."""


def _fp_rate_name(rate: float) -> str:
    """``0.125 -> '1/8'``-style names for metric keys: ``froc_sens@0.125fp``."""
    return f"{rate:g}"


# --- segmentation -----------------------------------------------------------------------------


def _bbox(mask: np.ndarray, margin: int = 1) -> tuple[slice, ...]:
    """The bounding box of ``mask`` grown by ``margin`` voxels, clipped to the array."""
    slices = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other))
        slices.append(slice(max(int(hit[0]) - margin, 0), min(int(hit[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(slices)


def segmentation_scores(
    pred: np.ndarray,
    gt: np.ndarray,
    classes: Sequence[int],
    spacing: Sequence[float],
    roi: np.ndarray | None = None,
) -> dict[int, dict[str, float]]:
    """Dice and HD95 of every class between two label maps on one grid.

    Args:
        pred: predicted integer label map (X, Y[, Z]).
        gt: ground-truth integer label map, same shape.
        classes: foreground label values to score (background 0 is not scored).
        spacing: voxel size in mm per axis, so that HD95 is in mm.
        roi: optional boolean mask of the evaluated region (e.g. the test slab); voxels outside
            are ignored in both maps.

    Returns:
        ``{class: {"dice": float, "hd95": float}}``; NaN where the class is absent from both maps
        (see the module docstring for the other conventions).
    """
    # torch and MONAI load on first use: the study table and the report figures import this
    # module for the summaries alone, and importing MONAI costs ~7 s per process
    import torch
    from monai.metrics import compute_dice, compute_hausdorff_distance

    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not match a {pred.ndim}D label map")
    if roi is not None:
        if roi.shape != gt.shape:
            raise ValueError(f"ROI shape {roi.shape} differs from ground truth shape {gt.shape}")
        if roi.any():
            # everything outside the ROI's box is ignored anyway; cropping first keeps the
            # per-class work proportional to the scored region (a test slab, not the volume)
            region = _bbox(roi, margin=0)
            pred, gt, roi = pred[region], gt[region], roi[region]
        pred = np.where(roi, pred, 0)
        gt = np.where(roi, gt, 0)
        extent = np.array(pred.shape) if roi.any() else np.zeros(pred.ndim)
    else:
        extent = np.array(pred.shape)
    worst = float(np.linalg.norm(extent * np.asarray(spacing, dtype=float)))
    scores: dict[int, dict[str, float]] = {}
    for cls in classes:
        p, g = pred == cls, gt == cls
        has_p, has_g = bool(p.any()), bool(g.any())
        if not has_p and not has_g:
            scores[int(cls)] = {"dice": math.nan, "hd95": math.nan}
            continue
        box = _bbox(p | g)
        # MONAI layout: (batch, channel, *spatial), one channel per class scored.
        pt = torch.from_numpy(np.ascontiguousarray(p[box]))[None, None].float()
        gtt = torch.from_numpy(np.ascontiguousarray(g[box]))[None, None].float()
        dice = float(compute_dice(pt, gtt, include_background=True, ignore_empty=False)[0, 0])
        if has_p and has_g:
            with warnings.catch_warnings():
                # MONAI's own internal call uses a deprecated argument; not ours to fix.
                warnings.simplefilter("ignore", FutureWarning)
                hd = float(
                    compute_hausdorff_distance(
                        pt, gtt, include_background=True, percentile=95, spacing=[float(s) for s in spacing]
                    )[0, 0]
                )
        else:
            hd = worst
        scores[int(cls)] = {"dice": dice, "hd95": hd}
    return scores


# --- classification ---------------------------------------------------------------------------


def roc_auc_per_class(probs: np.ndarray, targets: np.ndarray) -> list[float]:
    """One-vs-rest ROC AUC of every class with ``monai.metrics.compute_roc_auc``.

    Args:
        probs: (N, C) predicted probabilities (or any scores).
        targets: (N, C) 0/1 matrix (multi-label, or one-hot single-label) or (N,) integer class
            indices in ``[0, C)``.

    Returns:
        C AUC values; NaN for a class whose targets are all 0 or all 1.
    """
    import torch  # on first use, see segmentation_scores
    from monai.metrics import compute_roc_auc

    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"probs must be (N, C), got shape {probs.shape}")
    targets = np.asarray(targets)
    if targets.ndim == 1:
        onehot = np.zeros_like(probs)
        onehot[np.arange(len(targets)), targets.astype(int)] = 1
        targets = onehot
    if targets.shape != probs.shape:
        raise ValueError(f"targets shape {targets.shape} differs from probs shape {probs.shape}")
    targets = targets.astype(np.float64)
    with warnings.catch_warnings():
        # A class without both positives and negatives is expected in small test sets: NaN.
        warnings.simplefilter("ignore", UserWarning)
        # One column at a time: MONAI reads a (N, 1) input as a binary problem and returns one
        # float instead of a per-class list, so a one-class task must not take the (N, C) path.
        return [
            float(compute_roc_auc(torch.from_numpy(probs[:, c]), torch.from_numpy(targets[:, c])))
            for c in range(probs.shape[1])
        ]


def macro_mean(values: Sequence[float]) -> float:
    """Mean over the finite values (NaN if there is none)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


# --- detection --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Nodule:
    """A ground-truth lesion: centre in world mm and diameter in mm.

    ``small`` marks a lesion known to be smaller than ``diameter_mm`` (an upper bound, as for
    LIDC's "< 3 mm" nodules, which readers mark with a point).
    """

    case_id: str
    center_mm: tuple[float, float, float]
    diameter_mm: float
    small: bool = False


def below_min_diameter(nodule: Nodule, min_diameter_mm: float) -> bool:
    """Whether a lesion is below the FROC size threshold (an irrelevant finding, not a target).

    Args:
        nodule: the lesion; a diameter of 0 means unknown (kept as a target).
        min_diameter_mm: smallest diameter that is a target (0 keeps every lesion).

    Returns:
        True when the lesion is certainly smaller than ``min_diameter_mm``.
    """
    if nodule.small:
        return nodule.diameter_mm <= min_diameter_mm
    return 0.0 < nodule.diameter_mm < min_diameter_mm


def split_by_size(nodules: Sequence[Nodule], min_diameter_mm: float) -> tuple[list[Nodule], list[Nodule]]:
    """``(targets, irrelevant)``: the lesions FROC scores and those below ``min_diameter_mm``."""
    targets = [n for n in nodules if not below_min_diameter(n, min_diameter_mm)]
    irrelevant = [n for n in nodules if below_min_diameter(n, min_diameter_mm)]
    return targets, irrelevant


@dataclass(frozen=True)
class Detection:
    """A predicted lesion: a point in world mm with a confidence score."""

    case_id: str
    center_mm: tuple[float, float, float]
    score: float


def assign_detections(
    detections: Sequence[Detection], nodules: Sequence[Nodule], min_hit_radius_mm: float = 5.0
) -> np.ndarray:
    """Index of the nodule each detection hits (nearest centre within its radius), -1 for none.

    Args:
        detections: one scan's detections.
        nodules: the scan's ground-truth nodules.
        min_hit_radius_mm: the hit radius is ``max(diameter / 2, min_hit_radius_mm)``.

    Returns:
        (len(detections),) int array.
    """
    if not detections or not nodules:
        return np.full(len(detections), -1, dtype=np.int64)
    points = np.array([d.center_mm for d in detections], dtype=np.float64)
    centres = np.array([n.center_mm for n in nodules], dtype=np.float64)
    radii = np.array([max(n.diameter_mm / 2.0, min_hit_radius_mm) for n in nodules])
    dist = np.linalg.norm(points[:, None, :] - centres[None, :, :], axis=-1)
    inside = dist <= radii[None, :]
    return np.where(inside.any(axis=1), np.where(inside, dist, np.inf).argmin(axis=1), -1).astype(np.int64)


def match_detections(
    detections: Sequence[Detection],
    nodules: Sequence[Nodule],
    min_hit_radius_mm: float = 5.0,
    irrelevant: Sequence[Nodule] = (),
) -> tuple[np.ndarray, np.ndarray]:
    """Split one scan's detections into FP scores and per-nodule TP scores.

    Args:
        detections: the scan's detections.
        nodules: the scan's target nodules (see :func:`split_by_size`).
        min_hit_radius_mm: the hit radius is ``max(diameter / 2, min_hit_radius_mm)``.
        irrelevant: lesions that are not targets (below the size threshold): a detection that
            hits no target but hits one of these is dropped, neither TP nor FP (LUNA16).

    Returns:
        ``(fp_scores, tp_scores)``: scores of the detections that hit nothing, and one score per
        target nodule (its best hit, 0 if missed) — the arrays MONAI's FROC functions take.
    """
    scores = np.array([d.score for d in detections], dtype=np.float64)
    hit = assign_detections(detections, nodules, min_hit_radius_mm)
    tp = np.zeros(len(nodules), dtype=np.float64)
    for j in range(len(nodules)):
        mine = scores[hit == j]
        if mine.size:
            tp[j] = mine.max()
    # targets first: a detection within reach of a target and an irrelevant finding is the target's
    ignored = assign_detections(detections, irrelevant, min_hit_radius_mm) >= 0
    return scores[(hit < 0) & ~ignored], tp


def froc(
    fp_scores: Sequence[float] | np.ndarray,
    tp_scores: Sequence[float] | np.ndarray,
    num_scans: int,
    fp_rates: Sequence[float] = FROC_FP_RATES,
) -> dict[str, float]:
    """FROC sensitivities with MONAI, pooled over scans.

    Args:
        fp_scores: scores of all false-positive detections of all scans.
        tp_scores: one entry per ground-truth nodule of all scans: the score of its best hit,
            or 0 if it was missed (real detection scores must then be > 0; they are ranked here).
        num_scans: number of scans evaluated (the FP-per-scan denominator).
        fp_rates: FP per scan at which to report sensitivity.

    Returns:
        ``{"froc_avg": mean sensitivity, "froc_sens@<r>fp": sensitivity at rate r, ...}``;
        all NaN when there is no nodule.
    """
    from monai.metrics.froc import compute_froc_curve_data, compute_froc_score  # see segmentation_scores

    fp = np.asarray(fp_scores, dtype=np.float64)
    tp = np.asarray(tp_scores, dtype=np.float64)
    out: dict[str, float] = {}
    if tp.size == 0 or num_scans <= 0:
        out["froc_avg"] = math.nan
        out.update({f"froc_sens@{_fp_rate_name(r)}fp": math.nan for r in fp_rates})
        return out
    found = tp > 0
    # Dense ranks from 1: order-preserving, strictly positive, so the sentinel 0 below is the
    # unique lowest "score" that MONAI's curve skips.
    distinct = np.unique(np.concatenate([fp, tp[found]]))
    fp_rank = np.searchsorted(distinct, fp) + 1.0
    tp_rank = np.where(found, np.searchsorted(distinct, tp) + 1.0, 0.0)
    fp_rank = np.concatenate([fp_rank, [0.0]])
    fps_per_scan, sensitivity = compute_froc_curve_data(fp_rank, tp_rank, int(tp.size), int(num_scans))
    for rate in fp_rates:
        out[f"froc_sens@{_fp_rate_name(rate)}fp"] = float(compute_froc_score(fps_per_scan, sensitivity, (rate,)))
    out["froc_avg"] = float(compute_froc_score(fps_per_scan, sensitivity, tuple(fp_rates)))
    return {"froc_avg": out.pop("froc_avg"), **out}


def froc_from_scans(
    per_scan: Mapping[str, tuple[np.ndarray, np.ndarray]], fp_rates: Sequence[float] = FROC_FP_RATES
) -> dict[str, float]:
    """:func:`froc` over scans given as ``{case_id: (fp_scores, tp_scores)}``."""
    fps = [np.asarray(v[0], dtype=np.float64) for v in per_scan.values()]
    tps = [np.asarray(v[1], dtype=np.float64) for v in per_scan.values()]
    return froc(
        np.concatenate(fps) if fps else np.zeros(0),
        np.concatenate(tps) if tps else np.zeros(0),
        len(per_scan),
        fp_rates,
    )
