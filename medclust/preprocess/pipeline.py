"""Preprocess one case into the slice store: orient, resample, normalise, crop/pad, slice.

Volumes (CT, MR):

1. read the image (and label) in its on-disk dtype and memory order (:mod:`medclust.io.readers`;
   NIfTI and uncompressed DICOM series unscaled: their slope/intercept is applied per slab in
   step 2, never as a float64 copy of the whole volume);
2. anti-alias: where the target spacing is at least twice the voxel size, average blocks of
   ``floor(target / spacing)`` voxels (``antialias``; a 512x512 CT at 0.7 mm going to 3.75 mm
   would otherwise alias badly). This is also the one pass over the full-size data, done in
   slabs so the float copy never exists for the whole volume;
3. normalise intensities on that (small) volume: CT ``ScaleIntensityRange`` over
   ``ct_window`` HU -> [0, 1] (clipped; ``ct_normalization: window``) or, with
   ``ct_normalization: nnunet``, over the dataset's fingerprint clip range (the 0.5/99.5
   percentiles of its training foreground, :mod:`medclust.preprocess.intensity`), mapped to
   z-scores ``(clip(hu) - mean) / std`` after resampling; MR and XR the ``*_percentiles``
   range -> [0, 1] (clipped, as ``ScaleIntensityRangePercentiles``; the percentile values are
   recorded);
4. the output grid comes from MONAI's ``Orientation("RAS")``, ``Spacing(spacing)`` and
   ``ResizeWithPadOrCrop`` (in-plane ``size``, all slices kept) applied lazily to the original
   image's geometry, and the image is resampled onto it once with ``SpatialResample``
   (bilinear; outside the field of view the bottom of the window/range, like air); the label
   map is resampled from its full-resolution grid onto the same grid with nearest neighbour
   (a direct index lookup, equivalent to ``SpatialResample(mode="nearest")``);
5. slices: ``np.moveaxis(volume_xyz, slice_axis, 0)``; ``store_affine`` is the affine of that
   output grid, so ``store_affine @ (x, y, z, 1)`` is the RAS world position of a stored voxel.

2D radiographs (XR, S = 1) are not reoriented (a radiograph has no RAS frame; MONAI's 2D
axis order, column then row, is kept). They are resampled to the isotropic spacing at which the
whole image just fits ``size`` (keeping the aspect ratio: ``s = max(nx * sx / size[0],
ny * sy / size[1])``) and centre-padded to ``size``; ``target_spacing`` records ``s``.
Pixel spacing comes from the DICOM header (``PixelSpacing``/``ImagerPixelSpacing``) or the
NIfTI affine, 1 mm for PNG/JPEG. ``slice_axis`` is 2 for them whatever the config says. A
one-slice CT or MR (a NIfTI X x Y x 1; a CT/MR DICOM file, which the reader places in the patient
frame) is a volume with S = 1 here, oriented and resampled like the model's volumes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from medclust.errors import BadInputError, MedclustError
from medclust.io.readers import ImageData, load_image, place_label
from medclust.io.slice_store import write_case
from medclust.io.sources import CaseEntry, normalise_modality
from medclust.preprocess.intensity import IntensityFingerprint, load_fingerprint
from medclust.preprocess.antialias import antialias_factors, block_affine, block_mean
from medclust.preprocess.resample import nearest_lookup, resample

log = logging.getLogger(__name__)

_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
CT_NORMALIZATIONS = ("window", "nnunet")


@dataclass(frozen=True)
class PreprocessSettings:
    """The ``preprocess`` block of the config (defaults come from the config schema).

    Attributes:
        spacing: target voxel size in mm along RAS x, y, z (volumes).
        size: in-plane size (pixels) after centre crop/pad, along the two non-slice axes in order.
        slice_axis: RAS axis along which slices are taken (2 = axial).
        ct_window: HU range mapped to [0, 1] for CT (``ct_normalization: window``).
        ct_normalization: ``window`` (``ct_window`` -> [0, 1]) or ``nnunet`` (clip to the
            dataset's foreground percentiles, z-score with its mean/std; needs the fingerprint).
        mr_percentiles: percentile range mapped to [0, 1] for MR.
        xr_percentiles: percentile range mapped to [0, 1] for X-ray images.
        dtype: storage type of the image (float16 or float32).
        antialias: block-average before downsampling by 2x or more.
    """

    spacing: tuple[float, float, float]
    size: tuple[int, int]
    slice_axis: int
    ct_window: tuple[float, float]
    ct_normalization: str
    mr_percentiles: tuple[float, float]
    xr_percentiles: tuple[float, float]
    dtype: str
    antialias: bool

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None = None) -> PreprocessSettings:
        """Settings from a (partial) ``preprocess`` block; missing keys take the schema defaults.

        Raises:
            MedclustError: an unknown key or a value of the wrong shape.
        """
        from medclust.config import load_schema

        values = dict(values or {})
        schema = load_schema()["properties"]["preprocess"]["properties"]
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise MedclustError(f"preprocess settings: unknown key(s) {', '.join(unknown)}")
        merged = {name: values.get(name, schema[name].get("default")) for name in known}
        try:
            settings = cls(
                spacing=tuple(float(v) for v in merged["spacing"]),  # type: ignore[arg-type]
                size=tuple(int(v) for v in merged["size"]),  # type: ignore[arg-type]
                slice_axis=int(merged["slice_axis"]),
                ct_window=tuple(float(v) for v in merged["ct_window"]),  # type: ignore[arg-type]
                ct_normalization=str(merged["ct_normalization"]),
                mr_percentiles=tuple(float(v) for v in merged["mr_percentiles"]),  # type: ignore[arg-type]
                xr_percentiles=tuple(float(v) for v in merged["xr_percentiles"]),  # type: ignore[arg-type]
                dtype=str(merged["dtype"]),
                antialias=bool(merged["antialias"]),
            )
        except (TypeError, ValueError) as err:
            raise MedclustError(f"preprocess settings: {err}") from err
        if len(settings.spacing) != 3 or min(settings.spacing) <= 0:
            raise MedclustError(f"preprocess.spacing must be 3 positive numbers, got {settings.spacing}")
        if len(settings.size) != 2 or min(settings.size) < 1:
            raise MedclustError(f"preprocess.size must be 2 positive integers, got {settings.size}")
        if settings.slice_axis not in (0, 1, 2):
            raise MedclustError(f"preprocess.slice_axis must be 0, 1 or 2, got {settings.slice_axis}")
        if settings.ct_normalization not in CT_NORMALIZATIONS:
            raise MedclustError(
                f"preprocess.ct_normalization must be one of {', '.join(CT_NORMALIZATIONS)}, got {settings.ct_normalization!r}"
            )
        if settings.dtype not in ("float16", "float32"):
            raise MedclustError(f"preprocess.dtype must be float16 or float32, got {settings.dtype}")
        return settings

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}


@dataclass
class PreprocessedCase:
    """The result of :func:`preprocess_image`.

    Attributes:
        image: ``(S, H, W)`` float32 in [0, 1] (CT in nnunet mode: z-scores in
            ``normalisation["output_range"]``).
        label: ``(S, H, W)`` integer label map or None.
        store_affine: 4x4 affine of the stored volume (x, y, z order, before slicing).
        target_spacing: spacing of the stored grid in mm (x, y, z).
        slice_axis: axis of the stored volume that became axis 0.
        z_positions_mm: position of each slice along the slice direction (mm).
        normalisation: what intensity mapping was applied.
    """

    image: np.ndarray
    label: np.ndarray | None
    store_affine: np.ndarray
    target_spacing: list[float]
    slice_axis: int
    z_positions_mm: list[float]
    normalisation: dict[str, Any]


# --- geometry helpers -------------------------------------------------------------------------


def _as_volume(data: ImageData) -> tuple[np.ndarray, np.ndarray]:
    """Native array as 3D (2D images get a trailing z axis) and its affine."""
    array = data.array if data.array.ndim == 3 else data.array[..., None]
    return array, np.asarray(data.affine, dtype=np.float64)


def _c_order(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """A C-contiguous view of ``array`` (no copy for C- or Fortran-ordered input) + its affine.

    NIfTI data are Fortran-ordered, DICOM-via-SimpleITK arrays are transposed C arrays: both
    are C-contiguous once the axes are reversed, which only permutes the affine's columns.
    The flag says whether the axes were reversed.
    """
    if array.flags.c_contiguous:
        return array, affine, False
    if array.flags.f_contiguous:
        perm = np.eye(4)[:, [2, 1, 0, 3]]
        return array.T, affine @ perm, True
    return np.ascontiguousarray(array), affine, False


def _integer_labels(array: np.ndarray) -> np.ndarray:
    """Label values as integers (float label files hold integral values; QC checked)."""
    if array.dtype.kind in "iu":
        return array
    return np.rint(array).astype(np.int32)


def _target_grid(
    shape: tuple[int, ...], affine: np.ndarray, pixdim: tuple[float, float, float], size_xyz: list[int], reorient: bool
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Output grid (affine, shape) of Orientation(RAS) -> Spacing -> ResizeWithPadOrCrop.

    The MONAI transforms run lazily on a zero-stride stand-in with the image's shape and
    affine, so nothing is resampled here; the result is the grid the eager chain would produce.
    """
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Orientation, ResizeWithPadOrCrop, Spacing

    stand_in = MetaTensor(torch.zeros(1).expand(1, *shape), affine=torch.as_tensor(affine, dtype=torch.float64))
    if reorient:
        stand_in = Orientation(axcodes="RAS", labels=_RAS_LABELS, lazy=True)(stand_in)
    stand_in = Spacing(pixdim=pixdim, lazy=True)(stand_in)
    stand_in = ResizeWithPadOrCrop(spatial_size=size_xyz, lazy=True)(stand_in)
    grid_affine = np.asarray(stand_in.peek_pending_affine(), dtype=np.float64)
    grid_shape = tuple(int(s) for s in stand_in.peek_pending_shape())
    return grid_affine, grid_shape  # type: ignore[return-value]


def _normalise(
    values: Any, modality: str, settings: PreprocessSettings, intensity: IntensityFingerprint | None = None
) -> tuple[Any, dict[str, Any], tuple[float, float]]:
    """Map intensities to [0, 1] (clipped) by modality.

    Returns:
        The tensor, a record of the mapping, and ``(scale, offset)`` that take the resampled
        [0, 1] values to the stored ones (``(1, 0)``, except for CT in nnunet mode, where
        ``u * (hi - lo) / std + (lo - mean) / std`` is ``(clip(hu) - mean) / std``). Resampling
        in [0, 1] first keeps the zero padding outside the field of view at the bottom of the
        range, i.e. air, in both modes.

    Raises:
        MedclustError: CT in nnunet mode without a fingerprint.
    """
    from monai.transforms import ScaleIntensityRange
    from monai.transforms.utils_pytorch_numpy_unification import percentile

    post = (1.0, 0.0)
    if modality == "CT" and settings.ct_normalization == "nnunet":
        if intensity is None:
            raise MedclustError(
                "preprocess.ct_normalization is nnunet but no intensity fingerprint was given "
                "(medclust fingerprint writes results/slices/{dataset}/intensity.json; pass it with --intensity)"
            )
        lo, hi = intensity.clip_hu
        record: dict[str, Any] = intensity.record()
        post = ((hi - lo) / intensity.std, (lo - intensity.mean) / intensity.std)
    elif modality == "CT":
        lo, hi = settings.ct_window
        record = {"method": "ct_window", "window_hu": [lo, hi]}
    else:
        q = settings.mr_percentiles if modality == "MR" else settings.xr_percentiles
        # on the NumPy view: np.percentile selects (O(n)); below 1e6 values MONAI would use
        # torch.quantile, a full sort (~80 ms for a brain template at 2 mm)
        lo, hi = (float(v) for v in percentile(np.asarray(values), list(q)))
        record = {"method": "percentiles", "percentiles": list(q), "values": [lo, hi]}
    if not hi > lo:  # QC rejects constant images; guard the division for near-constant ones
        hi = lo + 1.0
    record.setdefault("output_range", [0.0, 1.0])
    record["clip"] = True
    scaled = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True, dtype=None)(values)
    return scaled, record, post


# --- the pipeline -----------------------------------------------------------------------------


def preprocess_image(
    image: ImageData,
    modality: str,
    settings: PreprocessSettings,
    label: ImageData | None = None,
    intensity: IntensityFingerprint | None = None,
) -> PreprocessedCase:
    """Preprocess one loaded image (and its label map) into slice-store arrays.

    Args:
        image: the image as read by :func:`medclust.io.readers.load_image`.
        modality: CT, MR or XR.
        settings: the resolved ``preprocess`` settings.
        label: label map on the same grid as ``image``, if any.
        intensity: the dataset's CT fingerprint (needed for CT when ``ct_normalization`` is nnunet).

    Returns:
        Slices, label slices, the stored grid's affine and the metadata of the transform.

    Raises:
        BadInputError: the label grid differs from the image grid.
        MedclustError: CT in nnunet mode without ``intensity``.
    """
    import torch

    modality = normalise_modality(modality) or "CT"
    volume, affine = _as_volume(image)
    # a one-slice CT/MR (a NIfTI X x Y x 1, a CT slice file) is a thin volume, oriented like the
    # model's volumes; only radiographs take the 2D path (no RAS frame, fit to size)
    is_2d = image.is_2d and modality == "XR"
    if label is not None:
        lab_volume, lab_affine = _as_volume(label)
        if lab_volume.shape != volume.shape or not np.allclose(lab_affine, affine, atol=1e-3 * max(image.spacing)):
            raise BadInputError(label.path, f"label grid {lab_volume.shape} differs from image grid {volume.shape}")

    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if is_2d:
        fit = max(volume.shape[0] * spacing[0] / settings.size[0], volume.shape[1] * spacing[1] / settings.size[1])
        pixdim = (fit, fit, float(spacing[2]))
        size_xyz = [settings.size[0], settings.size[1], -1]
        slice_axis = 2
    else:
        pixdim = settings.spacing
        slice_axis = settings.slice_axis
        size_xyz = list(settings.size)
        size_xyz.insert(slice_axis, -1)

    grid_affine, grid_shape = _target_grid(volume.shape, affine, pixdim, size_xyz, reorient=not is_2d)

    data, data_affine, reversed_axes = _c_order(volume, affine)
    factors = antialias_factors(data_affine, grid_affine) if settings.antialias else (1, 1, 1)
    # an axis shorter than its block is one block: centred on its own voxels, not on the block's
    # (a one-slice CT at 1 mm going to 2.5 mm would otherwise move half a voxel off its slice)
    factors = tuple(min(k, n) for k, n in zip(factors, data.shape))
    with torch.inference_mode():
        reduced = block_mean(data, factors, image.meta.get("intensity_scale"))
        reduced_affine = block_affine(data_affine, factors)
        reduced, normalisation, (scale, offset) = _normalise(reduced, modality, settings, intensity)
        out = resample(reduced, reduced_affine, grid_affine, grid_shape, mode="bilinear")
        out = np.clip(out, 0.0, 1.0, out=out)
        if (scale, offset) != (1.0, 0.0):
            out = np.multiply(out, np.float32(scale), out=out)
            out = np.add(out, np.float32(offset), out=out)
        out_label = None
        if label is not None:
            lab_volume, lab_affine = _as_volume(label)
            out_label = nearest_lookup(_integer_labels(lab_volume), lab_affine, grid_affine, grid_shape)
    # Block size per axis of the original (x, y, z) grid.
    normalisation["antialias_block"] = list(factors[::-1] if reversed_axes else factors)

    slices = np.moveaxis(out, slice_axis, 0)
    label_slices = np.moveaxis(out_label, slice_axis, 0) if out_label is not None else None
    direction = grid_affine[:3, slice_axis]
    unit = direction / np.linalg.norm(direction)
    z_positions = [float(unit @ (grid_affine[:3, 3] + direction * k)) for k in range(slices.shape[0])]
    target_spacing = [float(v) for v in np.linalg.norm(grid_affine[:3, :3], axis=0)]
    return PreprocessedCase(
        image=np.ascontiguousarray(slices),
        label=np.ascontiguousarray(label_slices) if label_slices is not None else None,
        store_affine=grid_affine,
        target_spacing=target_spacing,
        slice_axis=slice_axis,
        z_positions_mm=z_positions,
        normalisation=normalisation,
    )


def source_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file, or of a folder (DICOM series): over its sorted relative names and contents."""
    p = Path(path)
    digest = hashlib.sha256()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    for f in files:
        if p.is_dir():
            digest.update(str(f.relative_to(p)).encode() + b"\0")
        with open(f, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def preprocess_case(
    case: CaseEntry | Mapping[str, Any],
    settings: PreprocessSettings | Mapping[str, Any],
    out_path: str | os.PathLike[str],
    dataset: str,
    intensity: IntensityFingerprint | str | os.PathLike[str] | None = None,
) -> Path:
    """Load one case, preprocess it and write ``{case}.h5`` atomically.

    Args:
        case: an entry of ``results/cases/{dataset}.json``.
        settings: the dataset's resolved ``preprocess`` block.
        out_path: the ``.h5`` file to write.
        dataset: dataset name recorded in the file.
        intensity: the CT fingerprint (or its ``intensity.json``) of the dataset, or of the
            dataset named by its ``intensity_from``; read only for CT in nnunet mode.

    Returns:
        ``out_path``.

    Raises:
        BadInputError: the image, label or fingerprint cannot be read or does not match.
        MedclustError: a CT case in nnunet mode without a fingerprint.
    """
    from medclust import __version__

    entry = case if isinstance(case, CaseEntry) else CaseEntry.from_dict(case)
    prep = settings if isinstance(settings, PreprocessSettings) else PreprocessSettings.from_dict(settings)
    started = time.perf_counter()
    image = load_image(
        entry.image, entry.series_uid, resample_gaps=entry.resample_gaps, assume_spacing=entry.assume_spacing,
        unscaled=True,  # NIfTI slope/intercept applied per slab in float32 (preprocess_image)
    )
    label = place_label(load_image(entry.label, label=True), image) if entry.label else None
    loaded = time.perf_counter()
    modality = entry.modality or image.modality
    if modality is None:
        raise BadInputError(entry.image, "modality unknown: set `modality` for the dataset or in the manifest")
    fingerprint, fallback = None, None
    if normalise_modality(modality) == "CT" and prep.ct_normalization == "nnunet" and intensity is not None:
        if isinstance(intensity, IntensityFingerprint):
            fingerprint = intensity
        else:
            fingerprint, fallback = load_fingerprint(intensity)
        if fingerprint is None:  # the dataset has no CT training foreground: the fixed window
            prep = replace(prep, ct_normalization="window")
    result = preprocess_image(image, modality, prep, label, intensity=fingerprint)
    if fallback is not None:
        result.normalisation["fallback"] = fallback
    spatial_shape = list(image.array.shape)
    attrs: dict[str, Any] = {
        "case_id": entry.case_id,
        "dataset": dataset,
        "modality": modality,
        "simulated": bool(entry.simulated),
        "source_path": str(entry.image),
        "source_sha256": image.meta.get("sha256") or source_sha256(entry.image),
        "label_path": str(entry.label or ""),
        "label_sha256": (label.meta.get("sha256") or source_sha256(entry.label)) if label is not None else "",
        "original_shape": spatial_shape,
        "original_spacing": list(image.spacing),
        "original_affine": np.asarray(image.affine, dtype=np.float64),
        "store_affine": result.store_affine,
        "target_spacing": result.target_spacing,
        "slice_axis": result.slice_axis,
        "z_positions_mm": result.z_positions_mm,
        "normalisation": json.dumps(result.normalisation),
        "preprocess": json.dumps(prep.to_dict()),
        "medclust_version": __version__,
    }
    if "spacing_source" in image.meta:  # 2D files: where the pixel spacing came from
        attrs["spacing_source"] = image.meta["spacing_source"]
    if entry.class_label is not None:
        attrs["class_label"] = entry.class_label
    if entry.split is not None:
        attrs["split"] = entry.split
    write_case(out_path, result.image, attrs, label=result.label, dtype=prep.dtype)
    log.info(
        "%s: %s %s -> %s in %.2f s (load %.2f s)",
        entry.case_id,
        modality,
        "x".join(map(str, spatial_shape)),
        "x".join(map(str, result.image.shape)),
        time.perf_counter() - started,
        loaded - started,
    )
    return Path(out_path)


__all__ = ["CT_NORMALIZATIONS", "PreprocessSettings", "PreprocessedCase", "preprocess_case", "preprocess_image", "source_sha256"]
