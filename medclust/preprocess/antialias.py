"""Anti-aliasing before resampling: average blocks of source voxels that fit in one output voxel.

Downsampling a fine volume to the slice store's coarser grid by trilinear sampling alone reads
only the 8 source voxels around each sampling point, whatever the output voxel covers, and
aliases fine structure. :func:`antialias_factors` says
how many source voxels fit along each axis, :func:`block_mean` averages those blocks (in slabs,
one reused float32 buffer) and :func:`block_affine` gives the averaged grid's affine, which the
resampling (:mod:`medclust.preprocess.resample`) then maps onto the store grid.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

__all__ = ["antialias_factors", "block_affine", "block_mean"]

# float32 voxels converted at a time while anti-aliasing: one reused 8 MB buffer stays in cache;
# a fresh 64 MB tensor per slab spent more time in page faults than in the pooling
_SLAB_VOXELS = 1 << 21


def _native(array: np.ndarray) -> np.ndarray:
    """Native byte order and a dtype torch understands (uint16/uint32 -> float32)."""
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    if array.dtype.kind == "b" or array.dtype in (np.uint16, np.uint32, np.uint64, np.int8):
        array = array.astype(np.float32)
    return array


def block_mean(array: np.ndarray, factors: tuple[int, int, int], scale: Any = None) -> Any:
    """Average ``factors``-sized blocks (last partial block over its valid voxels), in slabs.

    Args:
        array: the volume in its stored dtype.
        factors: block size per axis.
        scale: ``(slope, intercept)`` applied to the float32 values before averaging (NIfTI
            read unscaled), or None.

    Returns:
        A float32 torch tensor ``(ceil(n / k) ...)``; for all-ones factors just the float copy.
    """
    import torch
    import torch.nn.functional as F

    with warnings.catch_warnings():
        # Read-only views (SimpleITK buffers, in-memory NIfTI) are only ever read here.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        source = torch.from_numpy(_native(array))
    slope, inter = (float(scale[0]), float(scale[1])) if scale is not None else (1.0, 0.0)

    def to_float(values: Any, buffer: Any = None) -> Any:
        if scale is None:
            return values.to(torch.float32) if buffer is None else buffer.copy_(values)
        out = values.to(torch.float32, copy=True) if buffer is None else buffer.copy_(values)
        if slope != 1.0:
            out.mul_(slope)
        if inter != 0.0:
            out.add_(inter)
        return out

    if factors == (1, 1, 1):
        return to_float(source)
    k0 = factors[0]
    plane = int(np.prod(array.shape[1:]))
    step = max(k0, (_SLAB_VOXELS // max(plane, 1)) // k0 * k0)
    out_shape = [math.ceil(n / k) for n, k in zip(array.shape, factors)]
    out = torch.empty(out_shape, dtype=torch.float32)
    buffer = torch.empty((min(step, array.shape[0]), *array.shape[1:]), dtype=torch.float32)
    for start in range(0, array.shape[0], step):
        slab = to_float(source[start : start + step], buffer[: min(step, array.shape[0] - start)])
        # a last slab thinner than the block: its one block averages the planes it has
        kernel = (min(k0, slab.shape[0]), *factors[1:])
        pooled = F.avg_pool3d(slab[None, None], kernel_size=kernel, stride=kernel, ceil_mode=True)[0, 0]
        out[start // k0 : start // k0 + pooled.shape[0]] = pooled
    return out


def block_affine(affine: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Affine of the block-averaged grid: voxel j is the centre of source voxels k*j .. k*j+k-1."""
    scale = np.eye(4)
    for axis, k in enumerate(factors):
        scale[axis, axis] = k
        scale[axis, 3] = (k - 1) / 2.0
    return affine @ scale


def antialias_factors(affine: np.ndarray, grid_affine: np.ndarray) -> tuple[int, int, int]:
    """Per source axis, how many voxels fit in one output voxel along it (floor, >= 1)."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    grid_spacing = np.linalg.norm(grid_affine[:3, :3], axis=0)
    cosines = np.abs((affine[:3, :3] / spacing).T @ (grid_affine[:3, :3] / grid_spacing))
    target = grid_spacing[np.argmax(cosines, axis=1)]
    return tuple(max(1, int(math.floor(t / s + 1e-6))) for t, s in zip(target, spacing))  # type: ignore[return-value]
