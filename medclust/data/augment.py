"""Augmented views for contrastive clustering, built from MONAI array transforms.

Views are channel-first 2D arrays ``(C, H, W)``. A 2D item (X-ray or slice) has ``C = 1``; a
volume view passes its slices as channels ``(S, H, W)``, so every spatial transform (crop, flip,
affine) is drawn once and applied identically to all its slices — a 3D-consistent view. The two
views of a volume share one z window but each drops its own random subset of slices
(:func:`drop_slices`), so they differ in slice subset, crop, spatial and intensity augmentation,
while the slices both views kept pair up as extra 2D items.

Every view is seeded explicitly (:func:`seed_transform_`), so an item's augmentation depends
only on ``(seed, epoch, position)``, never on worker scheduling; that is what makes a resumed
run replay exactly the views of the run it replaces.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    Compose,
    RandAdjustContrast,
    RandAffine,
    RandFlip,
    RandGaussianNoise,
    RandScaleCrop,
    RandScaleIntensity,
    Randomizable,
    Resize,
)

from medclust.errors import MedclustError

__all__ = ["AugmentSettings", "UnitRangeCompose", "drop_slices", "seed_transform_", "select_view_slices", "view_transform"]


@dataclass(frozen=True)
class AugmentSettings:
    """Augmentation strengths (config ``pretrain.augment``).

    Attributes:
        crop_scale: range of the crop side as a fraction of the image side (then resized back).
        flip_prob: probability of a left-right flip.
        affine_prob: probability of a random rotation/scaling.
        rotate_deg: max in-plane rotation in degrees.
        scale_range: max relative zoom of the affine.
        intensity_prob: probability of a random intensity scaling.
        intensity_scale: max relative intensity scaling.
        contrast_prob: probability of a random gamma (contrast) change.
        gamma: gamma range.
        noise_prob: probability of additive Gaussian noise.
        noise_std: max noise standard deviation, as a fraction of the view's intensity range.
        z_crop: range of the fraction of a volume's slices a volume sample covers (one z window
            per sample, shared by its two views so that their slices pair up as 2D items).
        slice_drop: probability that a view drops each slice of the window (independently per
            view, at least two kept), so the two views of a volume see different slice subsets.
    """

    crop_scale: tuple[float, float] = (0.5, 1.0)
    flip_prob: float = 0.5
    affine_prob: float = 0.5
    rotate_deg: float = 15.0
    scale_range: float = 0.1
    intensity_prob: float = 0.8
    intensity_scale: float = 0.2
    contrast_prob: float = 0.8
    gamma: tuple[float, float] = (0.7, 1.5)
    noise_prob: float = 0.3
    noise_std: float = 0.03
    z_crop: tuple[float, float] = (0.5, 1.0)
    slice_drop: float = 0.25

    def __post_init__(self) -> None:
        lo, hi = self.crop_scale
        zlo, zhi = self.z_crop
        if not (0 < lo <= hi <= 1) or not (0 < zlo <= zhi <= 1):
            raise MedclustError(f"pretrain.augment: crop_scale {self.crop_scale} and z_crop {self.z_crop} must satisfy 0 < min <= max <= 1")
        if not 0 <= self.slice_drop < 1:
            raise MedclustError(f"pretrain.augment.slice_drop: {self.slice_drop} must be in [0, 1)")
        if self.gamma[0] <= 0 or self.gamma[0] > self.gamma[1]:
            raise MedclustError(f"pretrain.augment.gamma: invalid range {self.gamma}")

    @classmethod
    def from_dict(cls, settings: Mapping[str, Any] | None) -> AugmentSettings:
        """Build from a config dict (lists become tuples; unknown keys are an error)."""
        settings = dict(settings or {})
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise MedclustError(f"pretrain.augment: unknown keys {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()})


class UnitRangeCompose(Compose):
    """A ``Compose`` that runs on its input mapped to [0, 1] by the input's own min and max and
    maps the result back.

    The view pipeline's constants assume a [0, 1] image whose minimum is the background: zero
    padding of rotations, intensity scaling about 0, noise std as a fraction of the range. A CT
    normalised like nnU-Net (z-scores, air near -1.5) would otherwise get soft-tissue-grey
    padding and relatively 5x weaker noise; a [0, 1] store whose view spans [0, 1] is unchanged.
    """

    def __call__(self, input_: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: D102
        lo = input_.min()
        span = (input_.max() - lo).clamp_min(1e-6) if isinstance(input_, torch.Tensor) else max(input_.max() - lo, 1e-6)
        return super().__call__((input_ - lo) / span, *args, **kwargs) * span + lo


def view_transform(size: Sequence[int], settings: AugmentSettings) -> Compose:
    """The random view pipeline for channel-first ``(C, H, W)`` images.

    Random-resized crop (``RandScaleCrop`` + ``Resize``), left-right flip, rotation/zoom
    (``RandAffine``), intensity scaling, gamma, Gaussian noise. Spatial transforms act on all
    channels alike. It runs in the view's own [0, 1] range (:class:`UnitRangeCompose`), so a
    z-scored CT is augmented like a [0, 1] one.

    Args:
        size: output ``(H, W)``.
        settings: strengths.

    Returns:
        A MONAI ``Compose`` (seed it per view with :func:`seed_transform_`).
    """
    s = settings
    return UnitRangeCompose(
        [
            RandScaleCrop(roi_scale=s.crop_scale[0], max_roi_scale=s.crop_scale[1], random_size=True),
            Resize(spatial_size=tuple(int(v) for v in size), mode="bilinear", anti_aliasing=False),
            # axis 0 of a slice is RAS x: a left-right mirror
            RandFlip(prob=s.flip_prob, spatial_axis=0),
            RandAffine(
                prob=s.affine_prob,
                rotate_range=math.radians(s.rotate_deg),
                scale_range=s.scale_range,
                padding_mode="zeros",
                cache_grid=False,
            ),
            RandScaleIntensity(factors=s.intensity_scale, prob=s.intensity_prob),
            RandAdjustContrast(prob=s.contrast_prob, gamma=s.gamma),
            RandGaussianNoise(prob=s.noise_prob, mean=0.0, std=s.noise_std),
        ]
    )


def seed_transform_(transform: Compose, seed: int) -> np.random.RandomState:
    """Give every randomizable transform in ``transform`` one fresh generator seeded by ``seed``.

    Each transform gets it through its own ``set_random_state``, which also reaches the
    generators it keeps inside (``RandAffine`` draws its rotation and zoom from a nested
    ``RandAffineGrid``; setting ``t.R`` alone left those on MONAI's shared class-level
    generator, so views depended on worker scheduling and every worker replayed one sequence).
    ``Compose.set_random_state(seed)`` would build one ``RandomState`` per sub-transform (about
    2.5 ms a view, a third of the transform itself); one shared generator keeps per-view seeding
    cheap while the draws stay a fixed function of ``seed``.

    Returns:
        The generator (also usable for the caller's own draws).
    """
    rng = np.random.RandomState(seed % 2**32)
    stack: list[Any] = [transform]
    while stack:
        t = stack.pop()
        if isinstance(t, Compose):
            # Compose's own set_random_state would re-seed its children with new generators
            Randomizable.set_random_state(t, state=rng)
            stack.extend(t.transforms)
        elif isinstance(t, Randomizable):
            t.set_random_state(state=rng)
    return rng


def select_view_slices(num_slices: int, s_max: int, z_crop: tuple[float, float], rng: np.random.RandomState) -> np.ndarray:
    """Slice indices of one volume sample: a random z window, evenly subsampled to <= ``s_max``.

    Args:
        num_slices: slices in the volume.
        s_max: most slices a view may hold.
        z_crop: range of the window length as a fraction of the volume.
        rng: generator.

    Returns:
        Increasing slice indices (length between 1 and ``s_max``).
    """
    frac = rng.uniform(z_crop[0], z_crop[1])
    length = int(np.clip(round(frac * num_slices), 1, num_slices))
    start = int(rng.randint(0, num_slices - length + 1))
    if length <= s_max:
        return np.arange(start, start + length)
    # even coverage of the window with a random phase
    step = length / s_max
    offsets = (np.arange(s_max) + rng.uniform(0, 1)) * step
    return start + np.minimum(offsets.astype(np.int64), length - 1)


def drop_slices(count: int, drop: float, rng: np.random.RandomState, keep_min: int = 2) -> np.ndarray:
    """Which of ``count`` slices a view keeps: each dropped with probability ``drop``.

    Returns:
        (count,) bool; at least ``min(keep_min, count)`` True (random ones restored if needed).
    """
    keep = rng.uniform(size=count) >= drop
    short = min(keep_min, count) - int(keep.sum())
    if short > 0:
        keep[rng.choice(np.flatnonzero(~keep), size=short, replace=False)] = True
    return keep


def as_float_tensor(array: np.ndarray) -> torch.Tensor:
    """float32 tensor view of a store array (float16 in the store)."""
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
