"""Simulated radiographs (digitally reconstructed radiographs, DRRs) from CT volumes.

A parallel-beam X-ray image is the line integral of linear attenuation along each ray:
``-ln(I / I0) = integral of mu ds`` (Beer-Lambert), with ``mu = mu_water * (1 + HU / 1000)``
clipped at 0, so bone is bright and air is 0, as on a log-transformed detector image. The
organ labels are projected along the same rays: each detector pixel takes the structure with
the longest path length through it.

Geometry (RAS patient coordinates, rotation about the superior axis ``z``): at ``angle_deg = 0``
the rays run posterior -> anterior (a PA view) and the image is laid out as a PA chest film is
displayed: row 0 is superior, column 0 is the patient's right. At 90 degrees the rays run right
-> left (a left-lateral view, anterior on the left of the image); 180 is AP, 270 right-lateral.
One resampling per view: the rotation and the resampling to ``pixel_spacing`` isotropic are
composed into one in-plane sampling grid shared by every axial slice (bilinear with
``torch.nn.functional.grid_sample`` for attenuation, a direct nearest-voxel gather for labels),
then the projection is resampled along z with ``scipy.ndimage.affine_transform``.

A DRR is not a radiograph: no scatter, no beam hardening, no detector response, parallel
instead of cone beam; :mod:`medclust.preprocess.drr_dataset`, which writes a dataset of them,
marks everything it writes as simulated.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy import ndimage

from medclust.errors import MedclustError


def hu_to_attenuation(hu: np.ndarray, mu_water: float) -> np.ndarray:
    """Linear attenuation (1/mm) from Hounsfield units: ``mu_water * (1 + HU/1000)``, >= 0."""
    mu = np.asarray(hu, dtype=np.float32) * np.float32(mu_water / 1000.0) + np.float32(mu_water)
    return np.maximum(mu, 0.0, out=mu)


def _detector_frame(angle_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """(u, d): in-plane detector column direction and ray direction, as RAS (x, y) unit vectors."""
    theta = math.radians(angle_deg)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    u = rot @ np.array([-1.0, 0.0])  # PA display: columns run from the patient's right to left
    d = rot @ np.array([0.0, 1.0])  # PA: posterior -> anterior
    # Snap cos/sin round-off so that 90-degree views sample exactly on the voxel grid.
    return np.round(u, 12), np.round(d, 12)


def drr_shape(
    volume_shape: Sequence[int], spacing_mm: Sequence[float], angle_deg: float, pixel_spacing: float
) -> tuple[int, int, int]:
    """(rows, columns, samples along each ray) of the DRR of a volume at one angle."""
    span = np.array([(n - 1) * s for n, s in zip(volume_shape, spacing_mm)], dtype=np.float64)
    u, d = _detector_frame(angle_deg)
    width = abs(u[0]) * span[0] + abs(u[1]) * span[1]
    depth = abs(d[0]) * span[0] + abs(d[1]) * span[1]
    return tuple(int(math.floor(x / pixel_spacing + 1e-6)) + 1 for x in (span[2], width, depth))  # type: ignore[return-value]


def _compact_codes(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes 1..m for the m structures present (0 = none), and the structure id of each code.

    Keeps the per-ray histograms small (89 structures present of 118 possible ids).
    """
    flat = labels.reshape(-1)
    if np.issubdtype(labels.dtype, np.integer) and flat.size and flat.min() >= 0 and flat.max() < 1 << 16:
        present = np.bincount(flat) > 0  # O(N), much faster than np.unique's sort on a CT
        present[0] = False
        structures = np.flatnonzero(present)
        lut = np.zeros(len(present), dtype=np.int32)
        lut[structures] = np.arange(1, len(structures) + 1)
        codes = lut[labels]
    else:
        values, inverse = np.unique(labels, return_inverse=True)
        structures = values[values != 0]
        codes = (np.cumsum(values != 0) * (values != 0))[inverse.reshape(labels.shape)]
    return codes.astype(np.uint8 if len(structures) < 256 else np.int32), structures


class DrrRenderer:
    """A CT volume prepared for DRRs at any number of angles (attenuation and label codes once).

    The rays lie in axial planes, so each axial slice is rotated and resampled in-plane
    (bilinear; every slice on the same grid of ray samples, so ``grid_sample`` resamples a
    chunk of slices at once) and summed along the ray; the resulting
    (slices, columns) projection is then resampled along z to the pixel spacing (linear). This
    equals trilinear resampling of the volume followed by projection (summation commutes with
    interpolation along z) at a third of the cost; for labels, nearest-neighbour along z picks
    the projection of the nearest slice, again the same as projecting the resampled volume.

    Args:
        hu_volume_ras: (X, Y, Z) CT in Hounsfield units, axes along RAS (index increases toward
            patient right, anterior, superior), e.g. after MONAI ``Orientation("RAS")``.
        spacing_mm: voxel size (sx, sy, sz) in mm.
        mu_water: attenuation of water in 1/mm.
        labels: optional integer structure map on the same grid (0 = no structure).
        threads: threads that resample the slices (torch's for attenuation, a pool over runs
            of slices for labels); the same result for any number.
    """

    def __init__(
        self,
        hu_volume_ras: np.ndarray,
        spacing_mm: Sequence[float],
        mu_water: float = 0.02,
        labels: np.ndarray | None = None,
        threads: int = 1,
    ) -> None:
        volume = np.asarray(hu_volume_ras)
        if volume.ndim != 3:
            raise MedclustError(f"render_drr: need a 3D volume, got shape {volume.shape}")
        if len(spacing_mm) != 3 or min(spacing_mm) <= 0:
            raise MedclustError(f"render_drr: bad voxel spacing {tuple(spacing_mm)}")
        if labels is not None and np.shape(labels) != volume.shape:
            raise MedclustError(f"render_drr: label shape {np.shape(labels)} differs from image shape {volume.shape}")
        self.threads = max(1, int(threads))
        self.shape = volume.shape
        self.spacing = tuple(float(s) for s in spacing_mm)
        # Slice-major copies: every axial slice contiguous, whatever the caller's memory order.
        self.mu = np.ascontiguousarray(np.moveaxis(hu_to_attenuation(volume, mu_water), 2, 0))
        self.codes = self.structures = None
        if labels is not None:
            self.codes, self.structures = _compact_codes(np.ascontiguousarray(np.moveaxis(np.asarray(labels), 2, 0)))

    def _over_slices(self, work: Callable[[range], None], nz: int) -> None:
        """Run ``work`` over the axial slices, split into contiguous runs across ``threads``
        (each slice's result is the same either way)."""
        threads = max(1, min(self.threads, nz))
        if threads == 1:
            work(range(nz))
            return
        bounds = np.linspace(0, nz, threads + 1).astype(int)
        with ThreadPoolExecutor(threads) as pool:
            for future in [pool.submit(work, range(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]:
                future.result()

    def render(self, angle_deg: float = 0.0, pixel_spacing: float = 1.0) -> tuple[np.ndarray, np.ndarray | None]:
        """One DRR; see :func:`render_drr` for the arguments and the result."""
        if pixel_spacing <= 0:
            raise MedclustError(f"render_drr: bad pixel spacing {pixel_spacing}")
        sx, sy, sz = self.spacing
        ps = float(pixel_spacing)
        nx, ny, nz = self.shape
        rows, cols, depth = drr_shape(self.shape, self.spacing, angle_deg, ps)
        u, d = _detector_frame(angle_deg)

        # In-plane map: output (column c, ray step b) -> input voxel (i, j) of one axial slice.
        centre = np.array([(nx - 1) * sx / 2.0, (ny - 1) * sy / 2.0])
        mid_c, mid_b = (cols - 1) / 2.0, (depth - 1) / 2.0
        plane = np.array([[ps * u[0] / sx, ps * d[0] / sx], [ps * u[1] / sy, ps * d[1] / sy]])
        plane_offset = np.array(
            [
                (centre[0] - ps * (mid_c * u[0] + mid_b * d[0])) / sx,
                (centre[1] - ps * (mid_c * u[1] + mid_b * d[1])) / sy,
            ]
        )
        sample_i, sample_j, inside = _ray_samples(plane, plane_offset, cols, depth, (nx, ny))
        projection = (_project_bilinear(self.mu, sample_i, sample_j, inside, self.threads) * ps).astype(np.float32)

        # Along z: output row r (row 0 superior) -> input slice index.
        z_map = np.array([[-ps / sz, 0.0], [0.0, 1.0]])
        z_offset = np.array([((nz - 1) * sz / 2.0 + ps * (rows - 1) / 2.0) / sz, 0.0])
        image = ndimage.affine_transform(
            projection, z_map, z_offset, output_shape=(rows, cols), order=1, mode="constant", cval=0.0
        ).astype(np.float32, copy=False)
        if self.codes is None:
            return image, None

        structures = self.structures
        n_codes = len(structures) + 1
        ray_base = np.repeat(np.arange(cols, dtype=np.int64) * n_codes, depth)
        nearest, outside = _nearest_samples(sample_i, sample_j, inside, ny)
        per_slice = np.zeros((nz, cols), dtype=np.int32)
        codes = self.codes.reshape(nz, -1)

        def pick(ks: range) -> None:
            for k in ks:
                slice_codes = codes[k].take(nearest)
                slice_codes[outside] = 0
                # Path length per (ray, structure) in one bincount instead of one pass per structure.
                counts = np.bincount(ray_base + slice_codes, minlength=cols * n_codes).reshape(cols, n_codes)
                counts[:, 0] = 0
                best = counts.argmax(axis=1)
                per_slice[k] = np.where(counts[np.arange(cols), best] > 0, best, 0)

        self._over_slices(pick, nz)
        picked = ndimage.affine_transform(per_slice, z_map, z_offset, output_shape=(rows, cols), order=0, mode="constant", cval=0)
        lookup = np.concatenate([[0], structures])
        label_dtype = np.uint8 if structures.size == 0 or (structures.min() >= 0 and structures.max() < 256) else np.int32
        return image, lookup[picked].astype(label_dtype)


def _ray_samples(
    plane: np.ndarray, offset: np.ndarray, cols: int, depth: int, shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Slice coordinates (i, j) of every ray sample, (cols, depth) each, and where they fall inside.

    The coordinates are ``offset + plane @ (c, b)`` in float64, and a sample is inside when
    ``0 <= i <= n - 1`` on both axes: SciPy's ``affine_transform`` with ``mode="constant"``
    (no interpolation with the constant beyond the edges), which the views were defined with.
    """
    c = np.arange(cols, dtype=np.float64)[:, None]
    b = np.arange(depth, dtype=np.float64)[None, :]
    # offset first, then the products, in SciPy's order: a sample half-way between two voxels
    # then rounds to the same one
    sample_i = offset[0] + plane[0, 0] * c + plane[0, 1] * b
    sample_j = offset[1] + plane[1, 0] * c + plane[1, 1] * b
    inside = (sample_i >= 0) & (sample_i <= shape[0] - 1) & (sample_j >= 0) & (sample_j <= shape[1] - 1)
    return sample_i, sample_j, inside


def _nearest_samples(
    sample_i: np.ndarray, sample_j: np.ndarray, inside: np.ndarray, n_j: int
) -> tuple[np.ndarray, np.ndarray]:
    """Flat index (into a C-ordered slice with ``n_j`` columns) of each sample's nearest voxel,
    and the flat positions of the samples outside (their index is 0: set them to 0 after the
    gather). Nearest as SciPy's order-0 ``affine_transform`` rounds: ``floor(x + 0.5)``."""
    nearest = np.floor(sample_i + 0.5).astype(np.int64) * n_j + np.floor(sample_j + 0.5).astype(np.int64)
    nearest = nearest.ravel()
    outside = np.flatnonzero(~inside.ravel())
    nearest[outside] = 0
    return nearest, outside


def _project_bilinear(
    slices: np.ndarray, sample_i: np.ndarray, sample_j: np.ndarray, inside: np.ndarray, threads: int, chunk: int = 8
) -> np.ndarray:
    """Sum along each ray of the bilinearly sampled slices: ``(nz, cols)`` float64.

    One ``torch.nn.functional.grid_sample`` per ``chunk`` slices, all on the same sampling grid
    (the rays are the same in every axial slice), in float64 with each sample rounded to
    float32 and summed in float64, as the per-slice ``scipy.ndimage.affine_transform`` into a
    float32 buffer that this replaces did: the demo's views are the same but for 1 float32 ulp
    in 0.03 % of the pixels of the four axis-aligned views (the bilinear weights are rounded in
    another order), in a quarter to a third of the time. Samples outside the slice are set to 0
    (``grid_sample`` would blend those within a voxel of the edge with the edge voxels).
    """
    import torch

    n_i, n_j = slices.shape[1:]
    # align_corners=True: -1 and 1 are the centres of the first and last voxels
    grid_x = sample_j / max((n_j - 1) / 2.0, 0.5) - 1.0
    grid_y = sample_i / max((n_i - 1) / 2.0, 0.5) - 1.0
    grid = torch.from_numpy(np.stack([grid_x, grid_y], axis=-1)[None])
    keep = torch.from_numpy(inside)
    projection = np.empty(slices.shape[:1] + sample_i.shape[:1], dtype=np.float64)
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        with torch.inference_mode():
            for start in range(0, len(slices), chunk):
                block = torch.from_numpy(slices[start : start + chunk]).to(torch.float64)[None]
                sampled = torch.nn.functional.grid_sample(
                    block, grid, mode="bilinear", padding_mode="zeros", align_corners=True
                )[0]
                sampled = torch.where(keep, sampled, 0.0).to(torch.float32)
                projection[start : start + chunk] = sampled.numpy().sum(axis=2, dtype=np.float64)
    finally:
        torch.set_num_threads(previous)
    return projection


def render_drr(
    hu_volume_ras: np.ndarray,
    spacing_mm: Sequence[float],
    angle_deg: float = 0.0,
    mu_water: float = 0.02,
    pixel_spacing: float = 1.0,
    labels: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Render one parallel-beam DRR (and its projected label map) from a CT volume.

    For several angles of one volume, :class:`DrrRenderer` prepares the volume once.

    Args:
        hu_volume_ras: (X, Y, Z) CT in Hounsfield units, axes along RAS (index increases toward
            patient right, anterior, superior), e.g. after MONAI ``Orientation("RAS")``.
        spacing_mm: voxel size (sx, sy, sz) in mm.
        angle_deg: rotation about the superior axis; 0 = PA, 90 = left lateral, 180 = AP.
        mu_water: attenuation of water in 1/mm.
        pixel_spacing: detector pixel size in mm; rays are sampled every ``pixel_spacing`` mm.
        labels: optional integer structure map on the same grid (0 = no structure).

    Returns:
        ``(image, label)``: ``image`` is float32 (rows, columns), the line integral of
        attenuation (``-ln(I/I0)``, dimensionless), row 0 superior, laid out as displayed;
        ``label`` holds per pixel the structure with the longest path length along the ray (0
        where none is crossed; ties go to the smaller id), same shape, or None.
    """
    return DrrRenderer(hu_volume_ras, spacing_mm, mu_water, labels).render(angle_deg, pixel_spacing)
