"""Resampling a volume onto the slice-store grid: trilinear for images, nearest for label maps.

:func:`resample` is MONAI ``SpatialResample`` (bilinear, zeros outside). :func:`nearest_lookup`
maps label maps by direct index lookup. Voxel centres are at integer indices in both.

A separable version of the trilinear step for axis-aligned grids (three 1D passes, 44 -> 12 ms
for the demo CT) was tried and dropped: it agrees with ``grid_sample`` to float32 rounding only,
which moves ~0.5 % of the stored float16 values by one step, and models trained on such stores
differ enough to move class boundaries; the stores of the demo CTs stay bit-identical instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["nearest_lookup", "resample"]


def resample(
    values: Any, affine: np.ndarray, dst_affine: np.ndarray, dst_shape: tuple[int, int, int], mode: str
) -> np.ndarray:
    """``values`` (on the grid of ``affine``) resampled onto ``dst_affine``/``dst_shape``, float32."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    if isinstance(values, MetaTensor):  # keep only the data: the affine is given explicitly
        values = values.as_tensor()
    src = MetaTensor(values[None], affine=torch.as_tensor(affine, dtype=torch.float64))
    out = SpatialResample(mode=mode, padding_mode="zeros", dtype=torch.float32)(
        src, dst_affine=torch.as_tensor(dst_affine, dtype=torch.float64), spatial_size=dst_shape
    )
    return np.asarray(out.detach().cpu().numpy()[0])


def nearest_lookup(
    values: np.ndarray, affine: np.ndarray, dst_affine: np.ndarray, dst_shape: tuple[int, int, int]
) -> np.ndarray:
    """Nearest-neighbour resampling of a label map by direct index lookup (0 outside).

    Gives what MONAI ``SpatialResample(mode="nearest")`` gives (voxel centres at integer
    indices, ties rounded half to even like ``grid_sample``) without its float32 copy of the
    whole label map and its sampling grid: labels keep their integer type, and an axis-aligned
    transform (the usual case: flips, permutation, scaling) is one ``np.ix_`` gather.
    """
    xform = np.linalg.solve(affine, dst_affine)  # output voxel -> source voxel
    linear, offset = xform[:3, :3], xform[:3, 3]
    src_shape = np.asarray(values.shape)
    nonzero = np.abs(linear) > 1e-9 * np.abs(linear).max()
    if (nonzero.sum(axis=0) == 1).all() and (nonzero.sum(axis=1) == 1).all():
        src_axis = nonzero.argmax(axis=0)  # the source axis each output axis runs along
        index, valid = [], []
        for j in range(3):
            a = src_axis[j]
            pos = np.rint(linear[a, j] * np.arange(dst_shape[j]) + offset[a]).astype(np.int64)
            valid.append((pos >= 0) & (pos < src_shape[a]))
            index.append(np.clip(pos, 0, src_shape[a] - 1))
        order = np.argsort(src_axis)  # output axes in source-axis order, for np.ix_
        gathered = np.transpose(values[np.ix_(*[index[j] for j in order])], np.argsort(order))
        inside = valid[0][:, None, None] & valid[1][None, :, None] & valid[2][None, None, :]
        return np.where(inside, gathered, 0).astype(values.dtype, copy=False)
    out = np.zeros(dst_shape, dtype=values.dtype)
    plane = np.indices(dst_shape[1:]).reshape(2, -1)
    for i in range(dst_shape[0]):  # one output slab at a time bounds the index arrays' memory
        points = np.rint(linear @ np.vstack([np.full(plane.shape[1], i), plane]) + offset[:, None]).astype(np.int64)
        ok = np.all((points >= 0) & (points < src_shape[:, None]), axis=0)
        flat = np.zeros(plane.shape[1], dtype=values.dtype)
        flat[ok] = values[points[0, ok], points[1, ok], points[2, ok]]
        out[i] = flat.reshape(dst_shape[1:])
    return out
