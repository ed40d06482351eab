"""Augmented views for contrastive clustering, built from MONAI array transforms.

Views are channel-first 2D arrays ``(C, H, W)``. A 2D item (X-ray or slice) has ``C = 1``; a
volume view passes its slices as channels ``(S, H, W)``, so every spatial transform (crop, flip,
affine) is drawn once and applied identically to all its slices — a 3D-consistent view. The two
views of a volume each cover their own z window (:func:`select_view_pair`; the windows overlap
and share one sampling grid, so the slices both views kept pair up as extra 2D items), see their
z positions scaled and jittered (:func:`augment_z`) and drop their own random subset of slices
(:func:`drop_slices`). Their extent, slice count, centre and kept slices differ; their slice
spacing does not fully: both read the one grid (that is what pairs the overlap's slices), each
then scaled by at most ``1 + z_scale``. So a view's spacing is a weak cue to its partner (a
reviewer's check found it picks the partner well above chance among simulated CT/MR geometries,
though a slice attention trained on positions alone did not learn to use it); a wider
``z_scale`` weakens it.

Flips mirror the anatomy, so they act only along the axes a dataset declares safe
(``flip_axes``; none by default: a mirrored chest has its heart on the right), mapped from
anatomical names to a stored slice's array axes by :func:`in_plane_flip_axes`.

Every view is seeded explicitly (:func:`seed_transform_`), so an item's augmentation depends
only on ``(seed, epoch, position)``, never on worker scheduling; that is what makes a resumed
run replay exactly the views of the run it replaces.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
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

__all__ = [
    "ANATOMICAL_AXES",
    "AugmentSettings",
    "UnitRangeCompose",
    "augment_z",
    "drop_slices",
    "in_plane_flip_axes",
    "seed_transform_",
    "select_view_pair",
    "view_transform",
]

#: anatomical axis name -> RAS axis of the stored volume (the store is RAS-oriented)
ANATOMICAL_AXES = {"left_right": 0, "anterior_posterior": 1, "superior_inferior": 2}


@dataclass(frozen=True)
class AugmentSettings:
    """Augmentation strengths (config ``pretrain.augment``).

    Attributes:
        crop_scale: range of the crop side as a fraction of the image side (then resized back).
        flip_prob: probability of a flip along each axis a dataset declares safe (``flip_axes``).
        flip_axes: dataset name -> anatomical axes (:data:`ANATOMICAL_AXES` names) along which its
            images may be mirrored; a dataset that is not listed is never flipped.
        affine_prob: probability of a random rotation/scaling.
        rotate_deg: max in-plane rotation in degrees.
        scale_range: max relative zoom of the affine.
        intensity_prob: probability of a random intensity scaling.
        intensity_scale: max relative intensity scaling.
        contrast_prob: probability of a random gamma (contrast) change.
        gamma: gamma range.
        noise_prob: probability of additive Gaussian noise.
        noise_std: max noise standard deviation, as a fraction of the view's intensity range.
        z_crop: range of the fraction of a volume's slices each view's z window covers.
        z_overlap: the two views' windows overlap by at least this fraction of the shorter one
            (the overlap's slices pair up as 2D items).
        z_scale: each view scales its slice positions about their mean by a factor drawn
            log-uniformly from ``[1 / (1 + z_scale), 1 + z_scale]`` (a zoom along z).
        z_jitter: each slice position moves by up to this fraction of the view's slice spacing
            (below 0.5 the slices keep their order).
        slice_drop: probability that a view drops each slice of the window (independently per
            view, at least two kept), so the two views of a volume see different slice subsets.
    """

    crop_scale: tuple[float, float] = (0.5, 1.0)
    flip_prob: float = 0.5
    flip_axes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
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
    z_overlap: float = 0.5
    z_scale: float = 0.2
    z_jitter: float = 0.2
    slice_drop: float = 0.25

    def __post_init__(self) -> None:
        for dataset, axes in self.flip_axes.items():
            bad = sorted(set(axes) - set(ANATOMICAL_AXES))
            if bad:
                raise MedclustError(f"pretrain.augment.flip_axes.{dataset}: unknown axes {bad}; use {', '.join(ANATOMICAL_AXES)}")
        if not 0 < self.z_overlap <= 1 or self.z_scale < 0 or not 0 <= self.z_jitter < 0.5:
            raise MedclustError(
                f"pretrain.augment: z_overlap {self.z_overlap} must be in (0, 1], z_scale {self.z_scale} >= 0 and "
                f"z_jitter {self.z_jitter} in [0, 0.5)"
            )
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
        if isinstance(settings.get("flip_axes"), Mapping):
            settings["flip_axes"] = {str(k): tuple(v) for k, v in settings["flip_axes"].items()}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()})

    def flips_for(self, dataset: str, slice_axis: int) -> tuple[int, ...]:
        """Spatial axes of a stored slice of ``dataset`` that may be flipped (see :func:`in_plane_flip_axes`)."""
        if self.flip_prob <= 0:
            return ()
        return in_plane_flip_axes(self.flip_axes.get(dataset, ()), slice_axis)


def in_plane_flip_axes(names: Sequence[str], slice_axis: int) -> tuple[int, ...]:
    """Array axes of a stored slice ``(H, W)`` that mirror the named anatomical axes.

    The store holds RAS-oriented volumes as slices along ``slice_axis``; a slice's two array
    axes are the other two RAS axes in order (axial, ``slice_axis`` 2: H = x = left-right,
    W = y = anterior-posterior). A 2D image is stored with ``slice_axis`` 2 and its columns on
    H, so for a frontal radiograph H is left-right and W superior-inferior. An axis along
    ``slice_axis`` is not in the slice plane and is ignored.

    Args:
        names: :data:`ANATOMICAL_AXES` names.
        slice_axis: the store's slice axis (0, 1 or 2).

    Returns:
        Sorted spatial axes (0 = H, 1 = W) for ``RandFlip``.
    """
    in_plane = [a for a in range(3) if a != slice_axis]
    return tuple(sorted({in_plane.index(ANATOMICAL_AXES[n]) for n in names if ANATOMICAL_AXES[n] in in_plane}))


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


def view_transform(size: Sequence[int], settings: AugmentSettings, flip_axes: Sequence[int] = ()) -> Compose:
    """The random view pipeline for channel-first ``(C, H, W)`` images.

    Random-resized crop (``RandScaleCrop`` + ``Resize``), flips (each of ``flip_axes`` with
    probability ``flip_prob``, independently), rotation/zoom
    (``RandAffine``), intensity scaling, gamma, Gaussian noise. Spatial transforms act on all
    channels alike. It runs in the view's own [0, 1] range (:class:`UnitRangeCompose`), so a
    z-scored CT is augmented like a [0, 1] one.

    Args:
        size: output ``(H, W)``.
        settings: strengths.
        flip_axes: spatial axes (0 = H, 1 = W) that may be mirrored (``AugmentSettings.flips_for``).

    Returns:
        A MONAI ``Compose`` (seed it per view with :func:`seed_transform_`).
    """
    s = settings
    return UnitRangeCompose(
        [
            RandScaleCrop(roi_scale=s.crop_scale[0], max_roi_scale=s.crop_scale[1], random_size=True),
            Resize(spatial_size=tuple(int(v) for v in size), mode="bilinear", anti_aliasing=False),
            *[RandFlip(prob=s.flip_prob, spatial_axis=int(axis)) for axis in flip_axes],
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


def select_view_pair(num_slices: int, s_max: int, settings: AugmentSettings, rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
    """Slice indices of the two views of one volume sample: two overlapping z windows.

    Each view's window length is drawn from ``z_crop`` on its own; the second window is placed
    so that the two overlap by at least ``z_overlap`` of the shorter one. Both windows are read
    on one evenly spaced grid with a random phase (spacing: the longer window over ``s_max``),
    so the grid slices in the overlap are shared — those pair up as 2D items — while each view
    has its own extent, slice count and centre.

    Args:
        num_slices: slices in the volume.
        s_max: most slices a view may hold.
        settings: ``z_crop`` and ``z_overlap``.
        rng: generator.

    Returns:
        Increasing slice indices of view 1 and of view 2 (each between 1 and ``s_max`` long).
    """
    n = int(num_slices)
    lengths = [int(np.clip(round(rng.uniform(*settings.z_crop) * n), 1, n)) for _ in range(2)]
    overlap = max(1, math.ceil(settings.z_overlap * min(lengths)))
    first = int(rng.randint(0, n - lengths[0] + 1))
    lo, hi = max(0, first + overlap - lengths[1]), min(n - lengths[1], first + lengths[0] - overlap)
    starts = [first, int(rng.randint(lo, hi + 1))]
    if rng.uniform() < 0.5:  # which view's window was placed first must not be visible
        starts, lengths = starts[::-1], lengths[::-1]
    stride = max(1.0, max(lengths) / s_max)
    grid = np.unique((rng.uniform(0, stride) + np.arange(math.ceil(n / stride) + 1) * stride).astype(np.int64))
    grid = grid[grid < n] if stride > 1 else np.arange(n)
    views = []
    for start, length in zip(starts, lengths):
        idx = grid[(grid >= start) & (grid < start + length)][:s_max]
        if len(idx) < min(2, length):  # a window much shorter than the grid spacing: its own spacing
            idx = np.unique(np.round(np.linspace(start, start + length - 1, min(length, s_max))).astype(np.int64))
        views.append(idx)
    return views[0], views[1]


def augment_z(z_mm: np.ndarray, settings: AugmentSettings, rng: np.random.RandomState) -> np.ndarray:
    """One view's slice positions, scaled about their mean and jittered (``z_scale``, ``z_jitter``).

    Args:
        z_mm: (k,) increasing positions of the view's slices in mm.
        settings: strengths.
        rng: generator.

    Returns:
        (k,) float32 positions in mm.
    """
    z = np.asarray(z_mm, dtype=np.float64)
    scale = math.exp(rng.uniform(-1.0, 1.0) * math.log1p(settings.z_scale))
    spacing = float(np.median(np.abs(np.diff(z)))) if len(z) > 1 else 0.0
    jitter = rng.uniform(-1.0, 1.0, size=len(z)) * settings.z_jitter * spacing
    centre = z.mean() if len(z) else 0.0
    return (centre + (z - centre) * scale + jitter * scale).astype(np.float32)


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
