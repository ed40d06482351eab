"""Downstream datasets: slice-store cases, task targets, 2.5D stacks (splits: :mod:`medclust.data.splits`).

Everything here works on slice-store cases held in memory (``(S, H, W)`` arrays, small at the
store's resolution) and is deterministic given explicit seeds:

- **Targets.** label groups (raw label values or names -> task classes), slice-level multi-label
  targets from masks, Gaussian centre heatmaps, simulated nodules.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medclust.errors import BadInputError, MedclustError

__all__ = [
    "SPLITS",
    "TaskCase",
    "context_stack",
    "crop_box",
    "gaussian_heatmap",
    "hu_to_unit",
    "load_cases",
    "read_store_json",
    "remap_labels",
    "resolve_label_groups",
    "slice_targets_from_mask",
    "simulate_nodules",
    "slice_centre_heatmap",
]

SPLITS = ("train", "val", "test")


# -- reading the slice store ---------------------------------------------------------------------


@dataclass
class TaskCase:
    """One slice-store case in memory, plus the task's targets for it.

    Attributes:
        case_id: the case id.
        path: the HDF5 file.
        image: (S, H, W) float32 in [0, 1].
        label: (S, H, W) int raw label values, or None.
        attrs: slice-store attrs.
        z_mm: (S,) slice positions along the slice axis.
        target: task targets set by the recipe (class map, slice targets, heatmap ...).
        extra: anything else a recipe attaches (simulated lesions, ignore masks ...).
    """

    case_id: str
    path: str
    image: np.ndarray
    label: np.ndarray | None
    attrs: dict[str, Any]
    z_mm: np.ndarray
    target: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_slices(self) -> int:
        return int(self.image.shape[0])

    @property
    def slice_spacing(self) -> float:
        """Distance between neighbouring slices in mm (1.0 for a single slice)."""
        if self.num_slices > 1:
            return float(np.median(np.abs(np.diff(self.z_mm))))
        spacing = self.attrs.get("target_spacing")
        axis = int(self.attrs.get("slice_axis", 2))
        if spacing is not None:
            values = json.loads(spacing) if isinstance(spacing, (str, bytes)) else spacing
            values = list(np.asarray(values, dtype=float).ravel())
            if len(values) > axis:
                return float(values[axis])
        return 1.0

    @property
    def pixel_spacing(self) -> tuple[float, float]:
        """In-plane spacing (rows, cols) in mm from ``store_affine``."""
        affine = np.asarray(_json_attr(self.attrs, "store_affine"), dtype=float)
        axis = int(self.attrs.get("slice_axis", 2))
        norms = np.linalg.norm(affine[:3, :3], axis=0)
        rest = [a for a in range(3) if a != axis]
        return float(norms[rest[0]]), float(norms[rest[1]])


def _json_attr(attrs: Mapping[str, Any], key: str) -> Any:
    value = attrs.get(key)
    if isinstance(value, (str, bytes)):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def read_store_json(slices_dir: str | os.PathLike[str], name: str) -> dict[str, Any]:
    """Read ``index.json`` or ``splits.json`` of a slice-store folder.

    Raises:
        BadInputError: missing or unreadable, naming the file.
    """
    path = Path(slices_dir) / name
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise BadInputError(path, "not found (run the data stage first)") from err
    except (OSError, ValueError) as err:
        raise BadInputError(path, f"cannot read: {err}") from err


def load_cases(slices_dir: str | os.PathLike[str], case_ids: Sequence[str] | None = None) -> list[TaskCase]:
    """Load cases of a slice store into memory (float32 images), in ``index.json`` order.

    Args:
        slices_dir: ``results/slices/{dataset}``.
        case_ids: only these (default: every case in the index).

    Returns:
        The cases.
    """
    from medclust.io.slice_store import read_case

    index = read_store_json(slices_dir, "index.json")
    wanted = None if case_ids is None else set(case_ids)
    cases = []
    for entry in index.get("cases", []):
        if wanted is not None and entry["case_id"] not in wanted:
            continue
        path = Path(slices_dir) / entry.get("file", f"{entry['case_id']}.h5")
        sc = read_case(path)
        image = np.asarray(sc.image, dtype=np.float32)
        label = None if sc.label is None else np.asarray(sc.label).astype(np.int64)
        attrs = dict(sc.attrs)
        z_mm = np.asarray(sc.z_mm, dtype=np.float64) if getattr(sc, "z_mm", None) is not None else np.arange(image.shape[0], dtype=float)
        cases.append(TaskCase(entry["case_id"], str(path), image, label, attrs, z_mm))
    if wanted is not None:
        missing = wanted - {c.case_id for c in cases}
        if missing:
            raise BadInputError(Path(slices_dir) / "index.json", f"cases not in the index: {sorted(missing)}")
    return cases


# -- label groups and targets ----------------------------------------------------------------------


def resolve_label_groups(
    groups: Mapping[str, Sequence[int | str]] | None,
    label_names: Mapping[int, str] | None = None,
    present: Iterable[int] = (),
) -> tuple[dict[int, int], dict[int, str]]:
    """Turn a task's ``label_groups`` into a raw-value -> class lookup and the class names.

    Args:
        groups: ordered ``{class name: [raw label value | label name | glob on names, ...]}``
            (or the same as a list of ``[name, members]`` pairs); classes are numbered 1, 2, ...
            in this order. ``None`` keeps the raw values as classes.
        label_names: raw value -> name of the dataset's labels (to resolve names and globs).
        present: raw label values found in the data (used for the class list when ``groups`` is None).

    Returns:
        ``(lut, classes)``: raw value -> class value (absent values map to 0 = background), and
        class value -> name (background not listed).

    Raises:
        MedclustError: a name/glob matches no label, or one raw value lands in two classes.
    """
    names = {int(k): str(v) for k, v in (label_names or {}).items()}
    if isinstance(groups, (list, tuple)):
        groups = {str(name): members for name, members in groups}  # ordered pairs (from the workflow)
    if not groups:
        values = sorted({int(v) for v in present} | {v for v in names if v != 0})
        values = [v for v in values if v != 0]
        return {v: v for v in values}, {v: names.get(v, f"class_{v}") for v in values}
    lut: dict[int, int] = {}
    classes: dict[int, str] = {}
    for cls, (name, members) in enumerate(groups.items(), start=1):
        classes[cls] = str(name)
        if isinstance(members, (str, int)):
            members = [members]
        for member in members:
            if isinstance(member, (int, np.integer)) or (isinstance(member, str) and member.isdigit()):
                matched = [int(member)]
            else:
                matched = [v for v, n in names.items() if fnmatch.fnmatchcase(n.lower(), str(member).lower())]
                if not matched:
                    raise MedclustError(f"label_groups.{name}: {member!r} matches no label name of the dataset")
            for value in matched:
                if value in lut and lut[value] != cls:
                    raise MedclustError(
                        f"label_groups: label {value} ({names.get(value, value)}) is in both "
                        f"{classes[lut[value]]!r} and {name!r}"
                    )
                lut[value] = cls
    return lut, classes


def remap_labels(label: np.ndarray, lut: Mapping[int, int]) -> np.ndarray:
    """Map raw label values to task classes (values not in ``lut`` -> 0)."""
    label = np.asarray(label)
    if label.size == 0:
        return label.astype(np.int64)
    top = max(int(label.max()), max(lut, default=0)) + 1
    table = np.zeros(top, dtype=np.int64)
    for raw, cls in lut.items():
        if 0 <= raw < top:
            table[raw] = cls
    return table[np.clip(label, 0, top - 1)]


def slice_targets_from_mask(classes_map: np.ndarray, num_classes: int, min_pixels: int = 1) -> np.ndarray:
    """Multi-label slice targets: does slice s contain class c (>= ``min_pixels`` pixels)?

    Args:
        classes_map: (S, H, W) task class values (1..num_classes; 0 = background).
        num_classes: C.
        min_pixels: pixels of a class needed on a slice to count as present.

    Returns:
        (S, C) float32 in {0, 1}; column c is class value c + 1.
    """
    flat = classes_map.reshape(classes_map.shape[0], -1)
    out = np.zeros((classes_map.shape[0], num_classes), dtype=np.float32)
    for c in range(num_classes):
        out[:, c] = ((flat == c + 1).sum(axis=1) >= min_pixels).astype(np.float32)
    return out


def hu_to_unit(hu: float | np.ndarray, window: Sequence[float]) -> float | np.ndarray:
    """Hounsfield units -> the store's [0, 1] CT scale for ``window`` = (low, high)."""
    low, high = float(window[0]), float(window[1])
    return np.clip((np.asarray(hu, dtype=float) - low) / (high - low), 0.0, 1.0)


# -- 2.5D stacks and crops ------------------------------------------------------------------------


def context_stack(image: np.ndarray, indices: Sequence[int] | np.ndarray, k: int) -> np.ndarray:
    """Slices ``i-k .. i+k`` of ``image`` as channels for every ``i`` in ``indices``.

    Slices beyond the volume repeat the edge slice (a 2D image, S = 1, repeats itself).

    Args:
        image: (S, H, W).
        indices: centre slices.
        k: context on each side (0 = plain 2D).

    Returns:
        (N, 2k+1, H, W) float32.
    """
    idx = np.asarray(indices, dtype=np.int64)[:, None] + np.arange(-k, k + 1)[None, :]
    idx = np.clip(idx, 0, image.shape[0] - 1)
    return np.ascontiguousarray(image[idx], dtype=np.float32)


def crop_box(
    shape: Sequence[int], size: Sequence[int] | None, rng: np.random.Generator, must_contain: tuple[float, float] | None = None
) -> tuple[slice, slice]:
    """A random in-plane crop window of ``size`` (the whole plane when ``size`` is None or larger).

    Args:
        shape: (H, W).
        size: (h, w) or None.
        rng: generator.
        must_contain: optional (row, col) the window must include (positive-centred crops).

    Returns:
        (row slice, col slice).
    """
    out = []
    for axis in range(2):
        full = int(shape[axis])
        want = full if size is None else min(int(size[axis]), full)
        lo, hi = 0, full - want
        if must_contain is not None:
            c = int(round(must_contain[axis]))
            lo, hi = max(lo, c - want + 2), min(hi, c - 1)
            if lo > hi:
                lo = hi = int(np.clip(c - want // 2, 0, full - want))
        start = int(rng.integers(lo, hi + 1)) if hi > lo else lo
        out.append(slice(start, start + want))
    return out[0], out[1]


# -- detection targets ----------------------------------------------------------------------------


def gaussian_heatmap(
    shape: Sequence[int], centres: np.ndarray, sigmas: np.ndarray
) -> np.ndarray:
    """3D centre heatmap in store layout: max over objects of anisotropic Gaussians.

    The centre voxel (rounded) of every object is exactly 1 (a positive of the focal loss);
    the Gaussian falls off along the slice axis too, so neighbouring slices of an object get
    lower peaks that the per-slice peak grouping then merges.

    Args:
        shape: (S, H, W).
        centres: (N, 3) float ``(slice, row, col)`` indices.
        sigmas: (N, 3) Gaussian sigma in voxels per axis.

    Returns:
        (S, H, W) float32 in [0, 1].
    """
    heat = np.zeros(tuple(int(s) for s in shape), dtype=np.float32)
    for centre, sigma in zip(np.atleast_2d(centres), np.atleast_2d(sigmas)):
        c = np.round(centre).astype(int)
        radius = np.ceil(3 * np.asarray(sigma)).astype(int)
        lo = np.maximum(c - radius, 0)
        hi = np.minimum(c + radius + 1, heat.shape)
        if np.any(lo >= hi):
            continue
        grids = np.meshgrid(*[np.arange(lo[a], hi[a]) for a in range(3)], indexing="ij")
        g = np.exp(-sum((grids[a] - c[a]) ** 2 / (2.0 * float(sigma[a]) ** 2) for a in range(3)))
        region = tuple(slice(lo[a], hi[a]) for a in range(3))
        heat[region] = np.maximum(heat[region], g.astype(np.float32))
    return heat


def slice_centre_heatmap(
    shape: Sequence[int],
    centres: np.ndarray,
    diameters_mm: np.ndarray,
    spacing: Sequence[float],
    min_sigma_mm: float = 4.0,
    visible: float = 0.8,
) -> np.ndarray:
    """Per-slice (2D CenterNet) centre heatmaps of 3D objects, in store layout.

    Every slice that cuts an object within ``visible`` of its radius from the centre gets a 2D
    Gaussian with its peak exactly 1 at the object's in-plane centre (a positive of the focal
    loss on that slice), sigma = max(``min_sigma_mm``, cross-section radius / 2). Each slice of a
    nodule is thus a training positive; the per-slice peaks are grouped back into one 3D
    detection at inference (:func:`medclust.evaluate.predict.group_peaks`).

    Args:
        shape: (S, H, W).
        centres: (N, 3) float ``(slice, row, col)`` indices.
        diameters_mm: (N,) object diameters.
        spacing: (slice, row, col) voxel size in mm.
        min_sigma_mm: smallest Gaussian sigma.
        visible: slices within ``visible * radius`` of the centre are positives.

    Returns:
        (S, H, W) float32 in [0, 1].
    """
    heat = np.zeros(tuple(int(n) for n in shape), dtype=np.float32)
    sz, sr, sc = (float(v) for v in spacing)
    rows, cols = np.arange(heat.shape[1])[:, None], np.arange(heat.shape[2])[None, :]
    for centre, diameter in zip(np.atleast_2d(centres), np.atleast_1d(diameters_mm)):
        radius = float(diameter) / 2.0
        reach = int(np.floor(visible * radius / sz))
        c_s = int(round(float(centre[0])))
        r0, c0 = int(round(float(centre[1]))), int(round(float(centre[2])))
        for s in range(c_s - reach, c_s + reach + 1):
            if not 0 <= s < heat.shape[0]:
                continue
            dz = abs(float(centre[0]) - s) * sz
            cross = math.sqrt(max(radius**2 - dz**2, 0.0))
            sigma = max(min_sigma_mm, cross / 2.0)
            g = np.exp(-(((rows - r0) * sr) ** 2 + ((cols - c0) * sc) ** 2) / (2 * sigma**2))
            heat[s] = np.maximum(heat[s], g.astype(np.float32))
    return heat


def simulate_nodules(
    image: np.ndarray,
    organ_mask: np.ndarray,
    spacing: Sequence[float],
    rng: np.random.Generator,
    count: int,
    diameter_mm: Sequence[float] = (5.0, 20.0),
    intensity: Sequence[float] = (0.45, 0.55),
    avoid: np.ndarray | None = None,
    avoid_mm: float = 20.0,
    allowed_slices: np.ndarray | None = None,
    margin_mm: float = 3.0,
    noise: float = 0.02,
    value_range: Sequence[float] = (0.0, 1.0),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Insert ellipsoidal nodule-like blobs into a volume (store layout), inside an organ mask.

    Centres are drawn at random inside ``organ_mask`` (eroded by the nodule radius + margin so
    the nodule sits in the organ), at least ``avoid_mm`` from every point of ``avoid`` (e.g. the
    real lesions, which must stay unseen) and from each other. Each nodule has a random
    diameter, a mild random elongation, a soft (partial-volume) edge and a little texture noise.

    Args:
        image: (S, H, W) float in ``value_range``; not modified.
        organ_mask: (S, H, W) bool where nodules may be placed (e.g. lungs).
        spacing: (slice, row, col) voxel size in mm.
        rng: generator (fixes positions and shapes).
        count: number of nodules wanted (fewer when there is no room).
        diameter_mm: (min, max) diameter.
        intensity: (min, max) store intensity of nodule tissue (see :func:`medclust.preprocess.intensity.hu_to_store`).
        avoid: (M, 3) store indices (slice, row, col) to stay away from.
        avoid_mm: distance kept from ``avoid`` points and between nodules.
        allowed_slices: optional (S,) bool: each whole nodule, soft edge included, lies on these
            slices (a split's slabs), so none reaches across a gap into another split's slab.
        margin_mm: extra distance from the organ boundary.
        noise: std of the texture noise inside nodules.
        value_range: the store's value range (its ``normalisation["output_range"]``: [0, 1],
            or the z-scores of the clip range of a CT normalised like nnU-Net); the result is
            clipped to it.

    Returns:
        ``(new_image, centres (N, 3), diameters_mm (N,))``.
    """
    from scipy import ndimage

    spacing = np.asarray(spacing, dtype=float)
    out = np.array(image, dtype=np.float32, copy=True)
    mask = np.asarray(organ_mask, dtype=bool)
    allowed = np.ones(mask.shape[0], bool) if allowed_slices is None else np.asarray(allowed_slices, dtype=bool)
    mask = mask & allowed[:, None, None]
    # slices from each slice to the nearest slice a nodule must not touch (inf: none)
    banned = np.flatnonzero(~allowed)
    slices = np.arange(mask.shape[0])
    room = np.abs(slices[:, None] - banned[None, :]).min(axis=1) if banned.size else np.full(mask.shape[0], np.inf)
    in_plane = max(float(spacing[1:].mean()), 1e-6)
    centres: list[np.ndarray] = []
    diameters: list[float] = []
    if not mask.any() or count <= 0:
        return out, np.zeros((0, 3)), np.zeros(0)
    dist_in = ndimage.distance_transform_edt(np.asarray(organ_mask, dtype=bool), sampling=spacing)
    avoid_pts = np.zeros((0, 3)) if avoid is None else np.atleast_2d(np.asarray(avoid, dtype=float)).reshape(-1, 3)
    tries = 0
    while len(centres) < count and tries < count * 200:
        tries += 1
        diameter = float(rng.uniform(*diameter_mm))
        radius = diameter / 2.0
        # the soft edge reaches rho < 1 + 0.5 px / radius and radii go up to 1.2 radius: centres
        # whose slab leaves that much room along z, so the whole nodule stays inside
        reach = int(np.floor((1.2 * radius + 0.6 * in_plane) / float(spacing[0])))
        ok = mask & (dist_in >= radius + margin_mm) & (room > reach)[:, None, None]
        candidates = np.flatnonzero(ok)
        if candidates.size == 0:
            continue
        centre = np.array(np.unravel_index(int(candidates[rng.integers(candidates.size)]), mask.shape), dtype=float)
        others = np.concatenate([avoid_pts, np.array(centres).reshape(-1, 3)])
        if len(others) and np.min(np.linalg.norm((others - centre) * spacing, axis=1)) < max(avoid_mm, radius * 2):
            continue
        radii = radius * rng.uniform(0.8, 1.2, size=3)
        lo = np.maximum(np.floor(centre - radii / spacing - 2).astype(int), 0)
        hi = np.minimum(np.ceil(centre + radii / spacing + 3).astype(int), out.shape)
        grids = np.meshgrid(*[np.arange(lo[a], hi[a]) for a in range(3)], indexing="ij")
        # signed distance (mm, approximately) inside the ellipsoid, for a 1-voxel soft edge
        rho = np.sqrt(sum(((grids[a] - centre[a]) * spacing[a] / radii[a]) ** 2 for a in range(3)))
        weight = np.clip((1.0 - rho) * radius / max(float(spacing[1:].mean()), 1e-6) + 0.5, 0.0, 1.0)
        touched = lo[0] + np.flatnonzero(weight.reshape(weight.shape[0], -1).max(axis=1) > 0)
        if not allowed[touched].all():  # guards the bound above
            continue
        value = float(rng.uniform(*intensity))
        tissue = value + noise * rng.standard_normal(weight.shape)
        region = tuple(slice(lo[a], hi[a]) for a in range(3))
        out[region] = (1 - weight) * out[region] + weight * tissue
        centres.append(centre)
        diameters.append(diameter)
    return np.clip(out, *value_range), np.array(centres).reshape(-1, 3), np.array(diameters)
