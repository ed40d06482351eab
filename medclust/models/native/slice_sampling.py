"""The slice attention's sampling as one compiled CPU pass per direction (``slice_sampling.c``).

Computes what :func:`medclust.models.slice_geometry.interpolation_weights` followed by the
weighted gather of value rows computes, with the same gradients, but in one loop: no (M, 2P)
row and weight tensors, no sort of the sampled rows for the table's gradient (a scatter-add into
one zeroed copy per thread instead), and far fewer PyTorch op calls, whose fixed costs dominated
the operator at whole-CT scale (forward+backward of ``attend``: 61 instead of 280, views included). CPU float32 only; every other case keeps
the PyTorch path (:class:`~medclust.models.slice_attention.DeformableSliceAttention` decides).
"""

from __future__ import annotations

import ctypes
from functools import cache

import torch

from medclust.errors import MedclustError
from medclust.models.native.build import load_library
from medclust.models.slice_geometry import SliceIndex

__all__ = ["native_sampling_available", "native_sampling_supports", "sample_slices_native"]

_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Set the C functions' signatures (ctypes would otherwise pass 64-bit ints as C ints)."""
    lib.slice_sample_forward.restype = _I64
    lib.slice_sample_forward.argtypes = [_P] * 9 + [_I64] * 5 + [_P] * 5 + [_INT]
    lib.slice_sample_backward.restype = None
    lib.slice_sample_backward.argtypes = [_P] * 7 + [_I64] * 3 + [_P] * 3 + [_INT]
    return lib


@cache
def _library() -> ctypes.CDLL | None:
    lib = load_library("slice_sampling")
    return None if lib is None else _declare(lib)


def native_sampling_available() -> bool:
    """Whether the compiled kernel is built and loaded (building it on first call)."""
    return _library() is not None


def native_sampling_supports(value: torch.Tensor) -> bool:
    """Whether the kernel handles these values (or the tokens they are projected from): CPU
    float32 outside autocast, rows that fit int32, and not being traced by torch.compile (a
    ctypes call is opaque to it)."""
    return (
        value.device.type == "cpu"
        and value.dtype == torch.float32
        and value.numel() < 2**31
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class _SliceSample(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table, positions, attn, index: SliceIndex, heads: int):
        lib = _library()
        b, s = index.z_sorted.shape
        queries, channels = table.shape
        points = positions.shape[-1]
        table, positions, attn = table.contiguous(), positions.contiguous(), attn.contiguous()
        z_sorted, order = index.z_sorted.contiguous(), index.order.contiguous()
        n_valid, z_min, z_max = index.n_valid.contiguous(), index.z_min.contiguous(), index.z_max.contiguous()
        step = index.step.contiguous()
        out = table.new_empty(queries, channels)
        lo_row = torch.empty(queries, points, dtype=torch.int32)
        hi_row = torch.empty_like(lo_row)
        weight = torch.empty(queries, points, dtype=torch.float32)
        dweight = torch.empty_like(weight)
        tensors = (table, positions, attn, z_sorted, order, n_valid, z_min, z_max, step)
        bad = lib.slice_sample_forward(
            *map(_ptr, tensors), b, s, heads, points, channels,
            *map(_ptr, (out, lo_row, hi_row, weight, dweight)), torch.get_num_threads(),
        )  # fmt: skip
        if bad:
            raise MedclustError(f"slice sampling: {bad} samples fell outside the value table (a corrupt slice index)")
        ctx.save_for_backward(table, lo_row, hi_row, weight, dweight, attn)
        ctx.points_shape = positions.shape
        return out

    @staticmethod
    def backward(ctx, grad):
        table, lo_row, hi_row, weight, dweight, attn = ctx.saved_tensors
        queries, channels = table.shape
        points = lo_row.shape[1]
        # one zeroed copy of the table's gradient per thread: at most 8 (each is the size of the
        # values), and none for fewer than 2048 queries a thread (summing copies would cost more)
        threads = max(1, min(torch.get_num_threads(), 8, queries // 2048))
        grad = grad.contiguous()  # a name holds the copy: a temporary's storage could be freed before the C call reads it
        need_table, need_positions, need_attn = ctx.needs_input_grad[:3]
        g_tables = table.new_zeros(threads, queries, channels) if need_table else None
        g_positions = torch.empty(queries, points) if need_positions else None
        g_attn = torch.empty(queries, points) if need_attn else None
        _library().slice_sample_backward(
            *map(_ptr, (table, lo_row, hi_row, weight, dweight, attn, grad)), queries, points, channels,
            *map(_ptr, (g_tables, g_positions, g_attn)), threads,
        )  # fmt: skip
        g_table = None if g_tables is None else (g_tables[0] if threads == 1 else g_tables.sum(0))
        g_positions = None if g_positions is None else g_positions.view(ctx.points_shape)
        g_attn = None if g_attn is None else g_attn.view(ctx.points_shape)
        return g_table, g_positions, g_attn, None, None


def sample_slices_native(
    table: torch.Tensor, positions: torch.Tensor, attn: torch.Tensor, index: SliceIndex, heads: int
) -> torch.Tensor:
    """Per query slice and head, the attention-weighted sum of values interpolated along z.

    ``out[m] = sum_p attn[m, p] * ((1 - w) * table[lo] + w * table[hi])`` where ``lo``/``hi``
    are the real slices either side of ``positions[m, p]`` (clamped to the volume) and ``w``
    the weight of the upper one, exactly as :func:`~medclust.models.slice_geometry.interpolation_weights`.

    Args:
        table: (B*S*H, C) float32 CPU values; row ``(b*S + slice)*H + head``.
        positions: (B, S, H, P) float32 sampling positions (index.z_rel frame, mm).
        attn: (B, S, H, P) float32 attention weights.
        index: the volumes' :class:`~medclust.models.slice_geometry.SliceIndex`.
        heads: H.

    Returns:
        (B*S*H, C); differentiable with respect to ``table``, ``positions`` and ``attn``.

    Raises:
        MedclustError: values that are not CPU float32 (see :func:`native_sampling_supports`),
            shapes other than the above (the C loops would read past a buffer), or no kernel
            (see :func:`native_sampling_available`).
    """
    if not native_sampling_supports(table):
        raise MedclustError(
            f"slice sampling: the compiled kernel takes CPU float32 values outside autocast and torch.compile, "
            f"got {table.dtype} on {table.device.type}"
        )
    b, s = index.z_sorted.shape
    if positions.ndim != 4 or tuple(positions.shape[:3]) != (b, s, heads) or attn.shape != positions.shape:
        raise MedclustError(
            f"slice sampling: positions {tuple(positions.shape)} and attn {tuple(attn.shape)} must both be "
            f"(B, S, H, P) = ({b}, {s}, {heads}, P)"
        )
    if table.ndim != 2 or table.shape[0] != b * s * heads:
        raise MedclustError(f"slice sampling: the value table {tuple(table.shape)} must have B*S*H = {b * s * heads} rows")
    if _library() is None:
        raise MedclustError("slice sampling: the compiled CPU kernel is not available (no C compiler, or MEDCLUST_NATIVE=0)")
    return _SliceSample.apply(table, positions.float(), attn.float(), index, heads)
