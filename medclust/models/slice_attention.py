"""Deformable attention across the slice axis of a volume, positioned by physical z (mm).

Each query slice predicts, per head, P offsets in millimetres around its own z position and
reads the value tokens there by linear interpolation between the two neighbouring *real*
slices (positions may be non-uniform; padded slices are never read). Memory is O(S * H * P)
and so is time, up to a sort of the slices by z per forward (and, on the PyTorch path, of the
sampled rows per backward); there is no S x S matrix anywhere, so whole CT volumes (thousands
of slices) fit. On the CPU the sampling runs in a compiled kernel (:mod:`medclust.models.native`).

This is the method's "inter-slice" attention as described in the paper; its public code ran
the attention along the feature axis and only for 64-slice volumes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.blocks import MLPBlock
from torch import nn
from torch.utils.checkpoint import checkpoint

from medclust.errors import MedclustError
from medclust.models.native import native_sampling_available, native_sampling_supports, sample_slices_native
from medclust.models.slice_geometry import SliceIndex, build_slice_index, interpolation_weights, z_position_encoding

__all__ = ["IMPLS", "DeformableSliceAttention", "SliceAttention", "SliceAttentionLayer", "weighted_rows"]

IMPLS = ("auto", "native", "bag", "gather")


class _WeightedRows(torch.autograd.Function):
    """``out[m] = sum_k coeff[m, k] * table[rows[m, k]]`` with a cheaper backward for the table.

    The forward is ``F.embedding_bag`` (fused gather + weighted sum; the (M, K, C) samples are
    never materialised). embedding_bag's own backward for the table takes ~20x its forward on
    CPU; here the table's gradient is itself a bag sum, over the transposed index (which samples
    read each table row: one argsort of ``rows``), about half the time. The weights' gradient is
    a dot product per sample. Only traceable tensor ops, so torch.compile can trace it whole.
    """

    @staticmethod
    def forward(ctx, table: torch.Tensor, rows: torch.Tensor, coeff: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(table, rows, coeff)
        return F.embedding_bag(rows, table, per_sample_weights=coeff, mode="sum")

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None]:
        table, rows, coeff = ctx.saved_tensors
        grad = grad.contiguous()
        g_table = g_coeff = None
        if ctx.needs_input_grad[0]:
            flat = rows.reshape(-1)
            # int16 keys where the table allows (B*S*H <= 32768: every training view, and at 4
            # heads up to 8192 slices per batch): CPU sorts them ~2x faster than int32 (1.1 vs
            # 2.4 ms for 131K rows)
            perm = torch.argsort(flat.to(torch.int16) if table.shape[0] <= 1 << 15 else flat)
            # samples per table row; index_add_ rather than bincount: a static output shape,
            # which torch.compile traces without a graph break
            counts = torch.zeros(table.shape[0], dtype=torch.int64, device=rows.device)
            counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.int64))
            g_table = F.embedding_bag(
                torch.div(perm, rows.shape[1], rounding_mode="floor"),
                grad,
                counts.cumsum(0) - counts,
                per_sample_weights=coeff.reshape(-1)[perm],
                mode="sum",
            )
        if ctx.needs_input_grad[2]:
            # one dot product per sample, in chunks of 256K gathered values (1 MiB in float32: the
            # gathered rows stay in cache; 4x larger chunks were ~20% slower on CPU)
            g_coeff = torch.empty_like(coeff)
            chunk = max(1, (1 << 18) // (rows.shape[1] * table.shape[1]))
            for i in range(0, rows.shape[0], chunk):
                samples = F.embedding(rows[i : i + chunk], table)  # (c, K, C)
                torch.bmm(samples, grad[i : i + chunk, :, None], out=g_coeff[i : i + chunk, :, None])
        return g_table, None, g_coeff


def weighted_rows(table: torch.Tensor, rows: torch.Tensor, coeff: torch.Tensor) -> torch.Tensor:
    """Weighted sums of table rows: ``out[m] = sum_k coeff[m, k] * table[rows[m, k]]``.

    Args:
        table: (N, C) float.
        rows: (M, K) int32 or int64 row indices into ``table``.
        coeff: (M, K) weights, same dtype as ``table``.

    Returns:
        (M, C); differentiable with respect to ``table`` and ``coeff``.
    """
    return _WeightedRows.apply(table, rows, coeff)


class DeformableSliceAttention(nn.Module):
    """One multi-head deformable attention over the slice axis.

    For query slice s, head h reads ``sum_p softmax_p(a_hp) * V_h(z_s + dz_hp)`` where the
    offsets ``dz_hp`` (mm, bounded by ``max_offset_mm`` with a tanh) and the logits ``a_hp``
    are linear functions of the query token and ``V_h(z)`` interpolates linearly between
    the two neighbouring real slices.

    Args:
        d_model: token size; must be divisible by ``heads``.
        heads: number of heads H.
        points: sampling points per head P.
        max_offset_mm: bound on |offset|.
        init_span_mm: initial offsets spread head h's points evenly over
            ``+-init_span_mm * (h + 1) / H`` so heads start at different ranges.
        impl: how values are sampled. ``"auto"`` (default): the compiled CPU kernel
            (:mod:`medclust.models.native`: interpolation, gather and weighted sum in one pass
            each way) for CPU float32 tokens when it builds, else ``"bag"``. ``"native"``: that
            kernel or an error. ``"bag"``: PyTorch ops, the fused gather+weighted sum
            :func:`weighted_rows` (never materialises the (B, S, H, 2P, D/H) samples; the path
            for GPUs, autocast and torch.compile). ``"gather"``: plain indexing (reference).
        recompute_min_tokens: when training on at least this many tokens (B * S), recompute the
            value projection and the sampled values in backward instead of keeping them: two
            (B, S, D) activations per layer less, for the forward of the value and output
            projections and of the sampling once more; outputs and gradients are the same.
            Below it (short views) the memory saved is small and the extra work is not; None:
            never recompute, 0: always.
    """

    def __init__(
        self,
        d_model: int,
        heads: int = 4,
        points: int = 4,
        max_offset_mm: float = 100.0,
        init_span_mm: float = 20.0,
        impl: str = "auto",
        recompute_min_tokens: int | None = 1024,
    ) -> None:
        super().__init__()
        if d_model % heads:
            raise MedclustError(f"SliceAttention: d_model={d_model} is not divisible by heads={heads}")
        if impl not in IMPLS:
            raise MedclustError(f"SliceAttention: impl must be one of {', '.join(map(repr, IMPLS))}, got {impl!r}")
        if max_offset_mm <= 0:
            raise MedclustError(f"SliceAttention: max_offset_mm must be positive, got {max_offset_mm}")
        self.d_model, self.heads, self.points = d_model, heads, points
        self.head_dim = d_model // heads
        self.max_offset_mm = float(max_offset_mm)
        self.impl = impl
        self.recompute_min_tokens = recompute_min_tokens
        self.offset_proj = nn.Linear(d_model, heads * points)
        self.weight_proj = nn.Linear(d_model, heads * points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self._reset_parameters(init_span_mm)

    def _reset_parameters(self, init_span_mm: float) -> None:
        # as in Deformable DETR: offsets start as a fixed spread (zero weight, bias = spread),
        # attention starts uniform over the points
        nn.init.zeros_(self.offset_proj.weight)
        span = torch.arange(1, self.heads + 1, dtype=torch.float32)[:, None] * (init_span_mm / self.heads)
        grid = torch.linspace(-1.0, 1.0, self.points)[None, :] if self.points > 1 else torch.zeros(1, 1)
        init = (span * grid).clamp(-0.95 * self.max_offset_mm, 0.95 * self.max_offset_mm)
        with torch.no_grad():
            self.offset_proj.bias.copy_((self.max_offset_mm * torch.atanh(init / self.max_offset_mm)).flatten())
        nn.init.zeros_(self.weight_proj.weight)
        nn.init.zeros_(self.weight_proj.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def offsets_and_weights(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-query offsets (mm) and attention weights.

        Args:
            query: (B, S, D).

        Returns:
            offsets (B, S, H, P) float32 mm, weights (B, S, H, P) float32 summing to 1 over P.
        """
        b, s, _ = query.shape
        # one GEMM for both small projections of the same tokens (a 2*H*P-wide output uses the
        # matrix unit poorly; two of them pay that twice, forward and backward)
        weight = torch.cat([self.offset_proj.weight, self.weight_proj.weight])
        bias = torch.cat([self.offset_proj.bias, self.weight_proj.bias])
        raw, logits = F.linear(query, weight, bias).float().view(b, s, 2, self.heads, self.points).unbind(2)
        offsets = self.max_offset_mm * torch.tanh(raw / self.max_offset_mm)
        # softmax over P along a middle dimension: CPU kernels vectorise across the last one,
        # which makes this 1.5-2x faster than over a last dimension of only P values
        return offsets, logits.transpose(-1, -2).softmax(dim=-2).transpose(-1, -2)

    def sampling_positions(self, query: torch.Tensor, index: SliceIndex) -> tuple[torch.Tensor, torch.Tensor]:
        """Where each query's heads read (mm, in ``index.z_rel``'s frame) and with what weight.

        Args:
            query: (B, S, D) normalised tokens.
            index: from :func:`build_slice_index` for the same volumes.

        Returns:
            positions (B, S, H, P) float32 and attention weights (B, S, H, P) summing to 1 over P.
        """
        offsets, attn = self.offsets_and_weights(query)
        return index.z_rel[:, :, None, None] + offsets, attn

    def sampling_rows(self, query: torch.Tensor, index: SliceIndex) -> tuple[torch.Tensor, torch.Tensor]:
        """The PyTorch path's sampling plan: rows of the value table and their weights.

        Args:
            query: (B, S, D) normalised tokens.
            index: from :func:`build_slice_index` for the same volumes.

        Returns:
            ``(rows, coeff)``, both (B*S*H, 2P): rows of the flattened (B*S*H, D/H) value table
            (int32 when they fit, else int64) and their float32 weights (attention weight times
            interpolation weight; each row of ``coeff`` sums to 1).
        """
        b, s, _ = query.shape
        h, p = self.heads, self.points
        positions, attn = self.sampling_positions(query, index)
        lo, hi, w = interpolation_weights(index, positions.reshape(b, s * h * p))
        lo, hi, w = lo.view(b, s, h, p), hi.view(b, s, h, p), w.view(b, s, h, p)
        # rows of the flattened (B*S*H, Dh) value table: ((b * S + slice) * H + head)
        base = (torch.arange(b, device=query.device) * s)[:, None, None, None]
        head = torch.arange(h, device=query.device)[None, None, :, None]
        rows = torch.cat([(base + lo) * h + head, (base + hi) * h + head], dim=-1).view(b * s * h, 2 * p)
        if b * s * h < 2**31:
            rows = rows.to(torch.int32)  # kept for backward: half the bytes of int64
        coeff = torch.cat([attn * (1.0 - w), attn * w], dim=-1).view(b * s * h, 2 * p)
        return rows, coeff

    def uses_native(self, query: torch.Tensor) -> bool:
        """Whether these tokens go through the compiled CPU kernel (see ``impl``).

        Raises:
            MedclustError: ``impl="native"`` but the kernel cannot take these tokens or is not built.
        """
        if self.impl == "native":
            if not native_sampling_supports(query):
                raise MedclustError(
                    f"SliceAttention: impl='native' takes CPU float32 tokens outside autocast and torch.compile, "
                    f"got {query.dtype} on {query.device.type}"
                )
            if not native_sampling_available():
                raise MedclustError("SliceAttention: impl='native' but the compiled kernel could not be built (see the warning)")
            return True
        return self.impl == "auto" and native_sampling_supports(query) and native_sampling_available()

    def plan(self, query: torch.Tensor, index: SliceIndex, native: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``sampling_positions`` for the compiled kernel, else ``sampling_rows``."""
        return self.sampling_positions(query, index) if native else self.sampling_rows(query, index)

    def sample_values(
        self, value: torch.Tensor, plan: tuple[torch.Tensor, torch.Tensor], index: SliceIndex, native: bool
    ) -> torch.Tensor:
        """Weighted sums of the values sampled along z: the gather and the sum over points.

        Args:
            value: (B, S, D) projected values (head h in channels ``h * D/H`` to ``(h + 1) * D/H``).
            plan: from :meth:`plan` for the same volumes and ``native``.
            index: from :func:`build_slice_index` for the same volumes.
            native: whether ``plan`` is for the compiled kernel.

        Returns:
            (B, S, D): per slice, the heads' results side by side (before the output projection).
        """
        b, s, d = value.shape
        table = value.reshape(b * s * self.heads, self.head_dim)
        if native:
            out = sample_slices_native(table, *plan, index, self.heads)
        else:
            rows, coeff = plan
            coeff = coeff.to(table.dtype)
            if self.impl == "gather":
                out = (table[rows.reshape(-1)].view(*rows.shape, self.head_dim) * coeff[..., None]).sum(1)
            else:
                out = weighted_rows(table, rows, coeff)
        return out.view(b, s, d)

    def _sample(self, query: torch.Tensor, plan: tuple[torch.Tensor, torch.Tensor], index: SliceIndex, native: bool) -> torch.Tensor:
        """Value projection, weighted sampling of the value rows, output projection."""
        return self.out_proj(self.sample_values(self.value_proj(query), plan, index, native))

    def attend(self, query: torch.Tensor, value: torch.Tensor, index: SliceIndex) -> torch.Tensor:
        """The attention operator alone, without the value and output projections.

        Offset and weight prediction from ``query``, the z interpolation, the gather of
        ``value`` rows and the weighted sum over points; the counterpart of
        ``scaled_dot_product_attention(q, k, v)`` (benchmarks/slice_attention.py compares the two).
        Never recomputes in backward (that covers the value projection, which is not part of it).

        Args:
            query: (B, S, D) normalised tokens.
            value: (B, S, D) projected values.
            index: from :func:`build_slice_index` for the same volumes.

        Returns:
            (B, S, D); ``out_proj(attend(query, value_proj(query), index))`` is :meth:`forward`.
        """
        native = self.uses_native(value)
        return self.sample_values(value, self.plan(query, index, native), index, native)

    def forward(self, query: torch.Tensor, index: SliceIndex) -> torch.Tensor:
        """Attend across slices.

        Args:
            query: (B, S, D) normalised tokens (queries and values).
            index: from :func:`build_slice_index` for the same volumes.

        Returns:
            (B, S, D).
        """
        b, s, _ = query.shape
        native = self.uses_native(query)
        plan = self.plan(query, index, native)
        if self.recompute_min_tokens is not None and b * s >= self.recompute_min_tokens and torch.is_grad_enabled():
            # the values and the sampled values are recomputed in backward instead of kept:
            # 2 of the ~7 (B, S, D) activations a layer would otherwise hold for it
            return checkpoint(self._sample, query, plan, index, native, use_reentrant=False)
        return self._sample(query, plan, index, native)


class SliceAttentionLayer(nn.Module):
    """Pre-norm transformer layer: deformable slice attention then a feed-forward block.

    Args:
        d_model: token size.
        heads: attention heads.
        points: sampling points per head.
        ffn_mult: feed-forward hidden size = ``ffn_mult * d_model``.
        dropout: dropout on both residual branches.
        max_offset_mm: bound on sampling offsets.
        init_span_mm: initial spread of the sampling offsets.
        impl: see :class:`DeformableSliceAttention`.
        recompute_min_tokens: see :class:`DeformableSliceAttention`.
    """

    def __init__(
        self,
        d_model: int,
        heads: int = 4,
        points: int = 4,
        ffn_mult: int = 2,
        dropout: float = 0.0,
        max_offset_mm: float = 100.0,
        init_span_mm: float = 20.0,
        impl: str = "auto",
        recompute_min_tokens: int | None = 1024,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = DeformableSliceAttention(d_model, heads, points, max_offset_mm, init_span_mm, impl, recompute_min_tokens)
        self.drop = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = MLPBlock(d_model, ffn_mult * d_model, dropout_rate=dropout, act="GELU")

    def forward(self, x: torch.Tensor, index: SliceIndex) -> torch.Tensor:
        """Args: x (B, S, D); index for the same volumes. Returns: (B, S, D)."""
        x = x + self.drop(self.attn(self.norm1(x), index))
        return x + self.ffn(self.norm2(x))


class SliceAttention(nn.Module):
    """Transformer across the slices of each volume, positioned by physical z in mm.

    Volumes with different slice counts and spacings share one model and one batch: pad to a
    common S and pass ``valid``. Padded slices are never sampled, so they cannot change any
    real slice's output; their own outputs are set to zero.

    Args:
        d_model: token size D.
        heads: attention heads H (D divisible by H).
        points: sampling points per head P.
        layers: number of transformer layers.
        ffn_mult: feed-forward hidden size multiple.
        dropout: residual dropout.
        max_offset_mm: bound on |sampling offset| in mm (a smooth tanh bound).
        init_span_mm: initial spread of offsets (head h spans ``+-init_span_mm * (h+1)/H``).
        pos_base: wavelength ratio of the sinusoidal z encoding.
        pos_scale: initial value of the learned scale of the z encoding. Slice tokens are
            layer-normalised (norm ~ sqrt(D)) before it is added; the encoding's norm is
            ``pos_scale * sqrt(D / 2)``. At full scale the encoding of a view's slice positions
            dominates its volume embedding, and two views with unrelated content but similar
            geometry would already match; small at first, position is what the model learns to use.
        impl: value sampling, see :class:`DeformableSliceAttention` (default ``"auto"``).
        recompute_min_tokens: from this many tokens (B * S) on, each layer recomputes its
            values in backward instead of keeping them (see :class:`DeformableSliceAttention`).

    Example:
        >>> att = SliceAttention(128, heads=4, points=4, layers=2)
        >>> z = torch.arange(40.0)[None] * 2.5            # 2.5 mm spacing
        >>> att(torch.randn(1, 40, 128), z, torch.ones(1, 40, dtype=torch.bool)).shape
        torch.Size([1, 40, 128])
    """

    def __init__(
        self,
        d_model: int,
        heads: int = 4,
        points: int = 4,
        layers: int = 2,
        ffn_mult: int = 2,
        dropout: float = 0.0,
        max_offset_mm: float = 100.0,
        init_span_mm: float = 20.0,
        pos_base: float = 10000.0,
        pos_scale: float = 0.05,
        impl: str = "auto",
        recompute_min_tokens: int | None = 1024,
    ) -> None:
        super().__init__()
        self.d_model = int(d_model)
        self.pos_base = float(pos_base)
        self.token_norm = nn.LayerNorm(d_model)
        self.pos_scale = nn.Parameter(torch.tensor(float(pos_scale)))
        self.layers = nn.ModuleList(
            SliceAttentionLayer(
                d_model, heads, points, ffn_mult, dropout, max_offset_mm, init_span_mm, impl, recompute_min_tokens
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tokens: torch.Tensor, z_mm: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Contextualise slice tokens.

        Args:
            tokens: (B, S, D) slice tokens.
            z_mm: (B, S) physical z of each slice in mm (padded entries ignored).
            valid: (B, S) bool, True = real slice; None = all real.

        Returns:
            (B, S, D); rows of padded slices are zero.
        """
        if tokens.ndim != 3 or tokens.shape[-1] != self.d_model:
            raise MedclustError(f"SliceAttention: expected tokens (B, S, {self.d_model}), got {tuple(tokens.shape)}")
        if tuple(z_mm.shape) != tuple(tokens.shape[:2]):
            raise MedclustError(f"SliceAttention: z_mm shape {tuple(z_mm.shape)} != tokens (B, S) {tuple(tokens.shape[:2])}")
        if valid is None:
            valid = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        elif tuple(valid.shape) != tuple(tokens.shape[:2]):
            raise MedclustError(f"SliceAttention: valid shape {tuple(valid.shape)} != tokens (B, S) {tuple(tokens.shape[:2])}")
        valid = valid.bool()
        index = build_slice_index(z_mm, valid)
        keep = valid[..., None]
        # zero the padding first: garbage (even NaN) there must not leak through 0 * NaN
        x = tokens.masked_fill(~keep, 0.0)
        x = self.token_norm(x) + self.pos_scale * z_position_encoding(index.z_rel, self.d_model, self.pos_base).to(x.dtype)
        for layer in self.layers:
            x = layer(x, index)
        return self.norm(x).masked_fill(~keep, 0.0)
