"""Deformable slice attention vs dense multi-head attention: time and memory per forward+backward.

Both models are the same pre-norm transformer (2 layers, d_model=128, 4 heads, FFN x2, the
same z position encoding, final LayerNorm); only the attention differs:
  - ours:   medclust SliceAttention (4 points per head, fused sampling with F.embedding_bag),
  - ours-g: the same with plain gather sampling (materialises the (B,S,H,2P,Dh) samples),
  - dense:  qkv projection + torch.nn.functional.scaled_dot_product_attention + out projection,
            PyTorch's default SDPA backend (flash kernels on CPU and recent GPUs: O(S) memory,
            O(S^2) time),
  - dense-math: the same forced onto SDPA's math backend, which materialises the (B,H,S,S)
            attention matrix (what any attention that returns/uses its weights costs).
All run side by side in one process on the same inputs; ratios are dense / ours.

Memory, measured two ways (tracemalloc cannot see torch's allocator):
  - peak: the allocator-level peak of bytes live during forward+backward, above what was live
    before. On CUDA torch.cuda.max_memory_allocated; on CPU reconstructed from the allocator
    events torch.profiler records with profile_memory=True (every alloc/free, in time order;
    cumulative sum, max). RSS is not used: glibc keeps freed pages, so RSS only shows the
    process's historical high-water mark.
  - saved: bytes of the distinct tensor storages autograd keeps for backward
    (torch.autograd.graph.saved_tensors_hooks), i.e. the activation memory of training.
Time: median wall time of forward+backward (after warm-up), without the profiler, the models
interleaved repeat by repeat.

Run: python benchmarks/slice_attention.py [--sizes 32 128 512 2048] [--batch 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F
from monai.networks.blocks import MLPBlock
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from medclust.models.slice_attention import SliceAttention, z_position_encoding


class DenseLayer(nn.Module):
    """Pre-norm transformer layer with full softmax attention over slices (SDPA)."""

    def __init__(self, d_model: int, heads: int, ffn_mult: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv, self.out = nn.Linear(d_model, 3 * d_model), nn.Linear(d_model, d_model)
        self.ffn = MLPBlock(d_model, ffn_mult * d_model, 0.0, act="GELU")

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        x = x + self.out(a.transpose(1, 2).reshape(b, s, d))
        return x + self.ffn(self.norm2(x))


class DenseSliceTransformer(nn.Module):
    """The dense counterpart of SliceAttention (same width, depth, FFN and position encoding)."""

    def __init__(self, d_model: int = 128, heads: int = 4, layers: int = 2, ffn_mult: int = 2, math: bool = False) -> None:
        super().__init__()
        self.d_model = d_model
        self.math = math
        self.layers = nn.ModuleList(DenseLayer(d_model, heads, ffn_mult) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tokens: torch.Tensor, z_mm: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        z = z_mm - (z_mm * valid).sum(1, keepdim=True) / valid.sum(1, keepdim=True)
        x = tokens + z_position_encoding(z, self.d_model)
        # the flash kernels need no mask when every slice is real; otherwise a key-padding mask
        key_mask = None if bool(valid.all()) else valid[:, None, None, :]
        with sdpa_kernel(SDPBackend.MATH) if self.math else contextlib.nullcontext():
            for layer in self.layers:
                x = layer(x, key_mask)
        return self.norm(x)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _step(model: nn.Module, tokens: torch.Tensor, z: torch.Tensor, valid: torch.Tensor) -> None:
    out = model(tokens, z, valid)
    out.square().mean().backward()


def time_ms(models: dict[str, nn.Module], inputs, device, repeats: int) -> dict[str, float]:
    """Median forward+backward ms per model; models interleaved per repeat (round robin) so
    that load changes on a shared machine hit every model alike."""
    for m in models.values():
        for _ in range(2):
            _step(m, *inputs)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(repeats):
        for k, m in models.items():
            m.zero_grad(set_to_none=True)
            _sync(device)
            t0 = time.perf_counter()
            _step(m, *inputs)
            _sync(device)
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def saved_bytes(model, inputs) -> int:
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(*inputs)
    out.square().mean().backward()
    return sum(storages.values())


def peak_bytes(model, inputs, device) -> int:
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _step(model, *inputs)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _step(model, *inputs)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
    cur = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 128, 512, 2048])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--points", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1 = least noise on a shared machine)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    d, h = args.d_model, args.heads
    models = {
        "ours": SliceAttention(d, h, args.points, args.layers, impl="bag"),
        "ours-g": SliceAttention(d, h, args.points, args.layers, impl="gather"),
        "dense": DenseSliceTransformer(d, h, args.layers),
        "dense-math": DenseSliceTransformer(d, h, args.layers, math=True),
    }
    models = {k: m.to(device).train() for k, m in models.items()}
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    print(f"device={device} threads={args.threads} B={args.batch} d_model={d} heads={h} points={args.points} "
          f"layers={args.layers}; params " + ", ".join(f"{k}={v}" for k, v in params.items()), flush=True)
    mb = 1024.0**2
    rows = []
    for s in args.sizes:
        g = torch.Generator().manual_seed(s)
        tokens = torch.randn(args.batch, s, d, generator=g).to(device)
        z = (torch.arange(s, dtype=torch.float32) * 1.25).repeat(args.batch, 1).to(device)
        valid = torch.ones(args.batch, s, dtype=torch.bool, device=device)
        inputs = (tokens, z, valid)
        reps = args.repeats if s <= 512 else max(2, args.repeats // 2)
        t = time_ms(models, inputs, device, reps)
        p = {k: peak_bytes(m, inputs, device) / mb for k, m in models.items()}
        sv = {k: saved_bytes(m, inputs) / mb for k, m in models.items()}
        rows.append((s, t, p, sv))
        print(f"  S={s}: done", flush=True)
    names = list(models)
    for title, idx, unit in (("forward+backward time", 1, "ms"), ("peak memory above baseline", 2, "MiB"),
                             ("saved-for-backward tensors", 3, "MiB")):
        print(f"\n{title} ({unit}); ratio = other / ours")
        head = f"{'S':>6} | " + " ".join(f"{n:>10}" for n in names) + " | " + " ".join(
            f"{n + '/ours':>15}" for n in names[1:])
        print(head)
        print("-" * len(head))
        for row in rows:
            vals = row[idx]
            print(f"{row[0]:>6} | " + " ".join(f"{vals[n]:>10.1f}" for n in names) + " | " + " ".join(
                f"{vals[n] / vals['ours']:>14.2f}x" for n in names[1:]))
    print("\nper-S growth of ours (x per 4x S): " + ", ".join(
        f"{rows[i][0]}->{rows[i + 1][0]}: time {rows[i + 1][1]['ours'] / rows[i][1]['ours']:.2f}x, "
        f"peak {rows[i + 1][2]['ours'] / rows[i][2]['ours']:.2f}x" for i in range(len(rows) - 1)))

if __name__ == "__main__":
    main()
