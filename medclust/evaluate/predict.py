"""Inference of downstream models on whole stored volumes, slice by slice, and 3D detection grouping.

Slices are fed in batches as ``2k+1``-channel stacks (:func:`medclust.data.downstream.context_stack`)
over the full stored plane; the networks are fully convolutional, so training on crops and
inferring on whole slices is the usual 2D U-Net practice. (MONAI's ``SliceInferer`` slices a
1-channel volume, it cannot build the neighbouring-slice channels of 2.5D inputs.)

Detection: every slice's centre heatmap gives local maxima (peaks); peaks on nearby slices that
lie close in-plane are one object, grouped greedily from the strongest peak down. Its score is
the strongest peak's, its position the score-weighted mean of the group's peaks, converted to RAS
world mm with the store's affine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medclust.data.downstream import context_stack
from medclust.io.original_grid import store_index_to_world

__all__ = [
    "Detection",
    "find_peaks",
    "group_peaks",
    "pad_to_multiple",
    "predict_logits",
    "predict_segmentation",
    "predict_slices",
]


def pad_to_multiple(x: torch.Tensor, multiple: int = 32) -> torch.Tensor:
    """Zero-pad the last two dims up to a multiple of ``multiple`` (bottom/right).

    A FlexibleUNet's five stride-2 stages need sizes divisible by 32 for the skip connections
    to line up; outputs are cropped back by the caller.
    """
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x
    return F.pad(x, (0, pw, 0, ph))


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def predict_logits(
    model: nn.Module, image: np.ndarray, indices: Sequence[int] | np.ndarray, context_slices: int = 0, batch_size: int = 16
) -> torch.Tensor:
    """Raw model outputs for the given slices of a stored volume.

    Args:
        model: a dense (``(N, C, H, W)`` -> ``(N, K, H, W)``) or classification model.
        image: (S, H, W) stored volume.
        indices: slices to run.
        context_slices: k of the 2.5D stacks.
        batch_size: slices per forward pass.

    Returns:
        Outputs stacked along dim 0, on CPU, float32.
    """
    was_training = model.training
    model.eval()
    device = _device_of(model)
    outs = []
    idx = np.asarray(indices, dtype=np.int64)
    try:
        for start in range(0, len(idx), batch_size):
            stack = torch.from_numpy(context_stack(image, idx[start : start + batch_size], context_slices)).to(device)
            h, w = stack.shape[-2:]
            out = model(pad_to_multiple(stack))
            if out.ndim == 4:
                out = out[..., :h, :w]
            outs.append(out.float().cpu())
    finally:
        model.train(was_training)
    if not outs:
        return torch.zeros(0)
    return torch.cat(outs)


def predict_segmentation(
    model: nn.Module, image: np.ndarray, indices: Sequence[int] | np.ndarray | None = None, context_slices: int = 0, batch_size: int = 16
) -> np.ndarray:
    """Label map (argmax) of a stored volume; slices not in ``indices`` stay 0 (background).

    Returns:
        (S, H, W) int16.
    """
    out = np.zeros(image.shape, dtype=np.int16)
    idx = np.arange(image.shape[0]) if indices is None else np.asarray(indices, dtype=np.int64)
    if len(idx):
        logits = predict_logits(model, image, idx, context_slices, batch_size)
        out[idx] = logits.argmax(dim=1).numpy().astype(np.int16)
    return out


def predict_slices(
    model: nn.Module, image: np.ndarray, indices: Sequence[int] | np.ndarray, context_slices: int = 0, batch_size: int = 16, multilabel: bool = True
) -> np.ndarray:
    """Per-slice class probabilities (sigmoid for multi-label, softmax otherwise), (N, C)."""
    logits = predict_logits(model, image, indices, context_slices, batch_size)
    probs = torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=1)
    return probs.numpy()


def find_peaks(heat: np.ndarray, min_score: float = 0.1, max_peaks: int = 20, window: int = 3) -> np.ndarray:
    """Local maxima of one slice's heatmap.

    Args:
        heat: (H, W) scores in [0, 1].
        min_score: lowest peak kept.
        max_peaks: strongest peaks kept.
        window: max-pool window of the non-maximum suppression.

    Returns:
        (N, 3) rows ``(row, col, score)``, strongest first.
    """
    t = torch.as_tensor(heat, dtype=torch.float32)[None, None]
    pooled = F.max_pool2d(t, window, stride=1, padding=window // 2)
    keep = (t == pooled) & (t >= min_score) & (t > 0)  # a flat zero plane has no peaks
    rows, cols = torch.nonzero(keep[0, 0], as_tuple=True)
    scores = t[0, 0, rows, cols]
    order = torch.argsort(scores, descending=True)[:max_peaks]
    return torch.stack([rows[order].float(), cols[order].float(), scores[order]], dim=1).numpy().astype(np.float64)


@dataclass
class Detection:
    """One 3D detection in store coordinates and world mm.

    Attributes:
        index: (slice, row, col) float position in the stored volume.
        world: (x, y, z) RAS mm.
        score: strongest peak score.
        diameter_mm: rough size (in-plane spread of the group, at least the slice extent).
        n_slices: slices spanned.
    """

    index: np.ndarray
    world: np.ndarray
    score: float
    diameter_mm: float
    n_slices: int


def group_peaks(
    heat: np.ndarray,
    attrs: Mapping[str, Any],
    spacing: Sequence[float],
    min_score: float = 0.1,
    max_peaks_per_slice: int = 20,
    max_distance_mm: float = 10.0,
    max_slice_gap_mm: float = 15.0,
    max_detections: int = 100,
) -> list[Detection]:
    """Peaks of every slice of a heatmap volume grouped into 3D detections.

    Args:
        heat: (S, H, W) scores in [0, 1] (store layout).
        attrs: the case's slice-store attrs (``store_affine``, ``slice_axis``).
        spacing: (slice, row, col) voxel size in mm.
        min_score: lowest peak used.
        max_peaks_per_slice: strongest peaks per slice.
        max_distance_mm: in-plane distance within which a peak joins a group's strongest peak.
        max_slice_gap_mm: distance along the slice axis within which it joins.
        max_detections: strongest groups returned.

    Returns:
        Detections, strongest first.
    """
    spacing = np.asarray(spacing, dtype=float)
    peaks = []
    for s in range(heat.shape[0]):
        for row, col, score in find_peaks(heat[s], min_score, max_peaks_per_slice):
            peaks.append((float(score), s, row, col))
    peaks.sort(key=lambda p: -p[0])
    groups: list[list[tuple[float, int, float, float]]] = []
    for peak in peaks:
        score, s, row, col = peak
        home = next(
            (
                g
                for g in groups
                if abs(s - g[0][1]) * spacing[0] <= max_slice_gap_mm
                and np.hypot((row - g[0][2]) * spacing[1], (col - g[0][3]) * spacing[2]) <= max_distance_mm
            ),
            None,
        )
        if home is None:
            groups.append([peak])
        elif all(p[1] != s for p in home):
            home.append(peak)
        # else: a weaker second peak of the same object on the same slice, suppressed
    detections = []
    for group in groups[:max_detections]:
        arr = np.array([[p[1], p[2], p[3]] for p in group], dtype=float)
        w = np.array([p[0] for p in group])
        centre = (arr * w[:, None]).sum(0) / max(float(w.sum()), 1e-12)
        slices = sorted({int(p[1]) for p in group})
        extent_z = (slices[-1] - slices[0] + 1) * spacing[0]
        detections.append(
            Detection(
                index=centre,
                world=store_index_to_world(attrs, centre[None])[0],
                score=float(group[0][0]),
                diameter_mm=float(max(extent_z, spacing[1:].mean())),
                n_slices=len(slices),
            )
        )
    return detections
