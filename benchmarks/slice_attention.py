"""Deformable slice attention vs dense multi-head attention: time and memory per forward+backward.

All models are the same pre-norm transformer (2 layers, d_model=128, 4 heads, FFN x2, the same
z position encoding, final LayerNorm); only the attention differs:
  - ours:   medclust SliceAttention with its defaults (4 points per head here; fused sampling;
            values recomputed in backward from 1024 tokens B*S on, i.e. S >= 512 here),
  - ours-g: the same with plain gather sampling and nothing recomputed (the reference: it
            materialises the (B,S,H,2P,Dh) samples),
  - dense:  qkv projection + torch.nn.functional.scaled_dot_product_attention + out projection,
            PyTorch's default SDPA backend (flash kernels on CPU and recent GPUs: O(S) memory,
            O(S^2) time),
  - dense-math: the same forced onto SDPA's math backend, which materialises the (B,H,S,S)
            attention matrix (what any attention that returns/uses its weights costs),
  - floor:  the same block with the attention replaced by its value and output projections
            (no mixing across slices at all): layer norms, FFN and the projections every
            attention here needs. dense / floor bounds what any attention in this block can gain.
All run side by side in one process on the same inputs; ratios are other / ours. The dense
models run up to --dense-max (default 2048: at 8192 the math backend's S x S matrices alone take
B*H*S^2*4 bytes = 2 GiB each, several at once, and SDPA takes ~16x the 2048 time).

Memory, measured two ways (tracemalloc cannot see torch's allocator):
  - peak: the allocator-level peak of bytes live during forward+backward, above what was live
    before. On CUDA torch.cuda.max_memory_allocated; on CPU reconstructed from the allocator
    events torch.profiler records with profile_memory=True (every alloc/free, in time order;
    cumulative sum, max). RSS is not used: glibc keeps freed pages, so RSS only shows the
    process's historical high-water mark.
  - saved: bytes of the distinct tensor storages autograd keeps for backward
    (torch.autograd.graph.saved_tensors_hooks), i.e. the activation memory of training.
Time: median of forward+backward (after warm-up), without the profiler, the models interleaved
repeat by repeat. On CPU with one thread the clock is the thread's CPU time (time.thread_time:
all of torch's work runs on the calling thread then, and time the thread waits for a core that
other processes hold is not counted, which is what makes figures on a shared machine
comparable); --clock wall for wall time (always on CUDA).

The last line is machine-readable:
  time_ratio_2048=<dense SDPA / ours> mem_ratio_2048=<dense math peak / ours peak>
  time_exponent=<slope of log time vs log S for ours, least squares over S >= 512>

Run: python benchmarks/slice_attention.py [--sizes 32 128 512 2048 8192] [--batch 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F
from monai.networks.blocks import MLPBlock
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from medclust.models.slice_attention import (
    SliceAttention,
    SliceIndex,
    z_position_encoding,
)

DENSE = ("dense", "dense-math")


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


class NoMixing(nn.Module):
    """Stand-in for the attention: value then output projection, each slice on its own."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.value_proj, self.out_proj = attn.value_proj, attn.out_proj

    def forward(self, query: torch.Tensor, index: SliceIndex) -> torch.Tensor:
        return self.out_proj(self.value_proj(query))


def floor_model(d: int, heads: int, points: int, layers: int) -> SliceAttention:
    """SliceAttention with every attention replaced by :class:`NoMixing`."""
    m = SliceAttention(d, heads, points, layers)
    for layer in m.layers:
        layer.attn = NoMixing(layer.attn)
    return m


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _step(model: nn.Module, tokens: torch.Tensor, z: torch.Tensor, valid: torch.Tensor) -> None:
    out = model(tokens, z, valid)
    out.square().mean().backward()


def time_ms(models: dict[str, nn.Module], inputs, device, repeats: int, clock) -> dict[str, float]:
    """Median forward+backward ms per model; models interleaved per repeat (round robin) so
    that load changes on a shared machine hit every model alike."""
    for m in models.values():
        for _ in range(2):
            m.zero_grad(set_to_none=True)
            _step(m, *inputs)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(repeats):
        for k, m in models.items():
            m.zero_grad(set_to_none=True)
            _sync(device)
            t0 = clock()
            _step(m, *inputs)
            _sync(device)
            times[k].append((clock() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def saved_bytes(model, inputs) -> int:
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
        return t

    model.zero_grad(set_to_none=True)
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


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y against log x."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def _table(title: str, unit: str, sizes: list[int], vals: dict[int, dict[str, float]], names: list[str]) -> None:
    print(f"\n{title} ({unit}); ratio = other / ours; '-' = not run")
    others = [n for n in names if n != "ours"]
    head = f"{'S':>6} | " + " ".join(f"{n:>10}" for n in names) + " | " + " ".join(f"{n + '/ours':>15}" for n in others)
    print(head)
    print("-" * len(head))
    for s in sizes:
        v = vals[s]
        cells = " ".join(f"{v[n]:>10.1f}" if n in v else f"{'-':>10}" for n in names)
        ratios = " ".join(f"{v[n] / v['ours']:>14.2f}x" if n in v else f"{'-':>15}" for n in others)
        print(f"{s:>6} | {cells} | {ratios}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 128, 512, 2048, 8192])
    ap.add_argument("--dense-max", type=int, default=2048, help="largest S for the dense models (see the docstring)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--points", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1 = least noise on a shared machine)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per model and S (median)")
    ap.add_argument("--clock", choices=["auto", "cpu", "wall"], default="auto",
                    help="auto: thread CPU time on CPU with one thread, else wall time")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    use_cpu_clock = args.clock == "cpu" or (args.clock == "auto" and device.type == "cpu" and args.threads == 1)
    clock = time.thread_time if use_cpu_clock and device.type == "cpu" else time.perf_counter
    torch.manual_seed(0)
    d, h, p, n_layers = args.d_model, args.heads, args.points, args.layers
    models = {
        "ours": SliceAttention(d, h, p, n_layers),
        "ours-g": SliceAttention(d, h, p, n_layers, impl="gather", recompute_min_tokens=None),
        "dense": DenseSliceTransformer(d, h, n_layers),
        "dense-math": DenseSliceTransformer(d, h, n_layers, math=True),
        "floor": floor_model(d, h, p, n_layers),
    }
    models = {k: m.to(device).train() for k, m in models.items()}
    params = {k: sum(q.numel() for q in m.parameters()) for k, m in models.items()}
    load0 = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"device={device} threads={args.threads} clock={'thread CPU time' if clock is time.thread_time else 'wall'} "
          f"B={args.batch} d_model={d} heads={h} points={p} layers={n_layers}; load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}; "
          "params " + ", ".join(f"{k}={v}" for k, v in params.items()), flush=True)
    mb = 1024.0**2
    times: dict[int, dict[str, float]] = {}
    peaks: dict[int, dict[str, float]] = {}
    saved: dict[int, dict[str, float]] = {}
    t_start = time.perf_counter()
    for s in args.sizes:
        g = torch.Generator().manual_seed(s)
        tokens = torch.randn(args.batch, s, d, generator=g).to(device)
        z = (torch.arange(s, dtype=torch.float32) * 1.25).repeat(args.batch, 1).to(device)
        valid = torch.ones(args.batch, s, dtype=torch.bool, device=device)
        inputs = (tokens, z, valid)
        run = {k: m for k, m in models.items() if k not in DENSE or s <= args.dense_max}
        times[s] = time_ms(run, inputs, device, args.repeats, clock)
        peaks[s] = {k: peak_bytes(m, inputs, device) / mb for k, m in run.items()}
        saved[s] = {k: saved_bytes(m, inputs) / mb for k, m in run.items()}
        print(f"  S={s}: ours {times[s]['ours']:.1f} ms ({time.perf_counter() - t_start:.0f} s so far)", flush=True)
    names = list(models)
    _table("forward+backward time", "ms", args.sizes, times, names)
    _table("peak memory above baseline", "MiB", args.sizes, peaks, names)
    _table("saved-for-backward tensors", "MiB", args.sizes, saved, names)
    sizes = args.sizes
    print("\ngrowth of ours per step in S: " + ", ".join(
        f"{a}->{b} ({b / a:.0f}x S): time {times[b]['ours'] / times[a]['ours']:.2f}x, peak {peaks[b]['ours'] / peaks[a]['ours']:.2f}x"
        for a, b in itertools.pairwise(sizes)))
    big = [s for s in sizes if s >= 512]
    exponent = slope(big, [times[s]["ours"] for s in big]) if len(big) >= 2 else float("nan")
    floor_exp = slope(big, [times[s]["floor"] for s in big]) if len(big) >= 2 else float("nan")
    print(f"time exponent over S >= 512 (slope of log time vs log S): ours {exponent:.2f}, floor {floor_exp:.2f}")
    ref = 2048 if 2048 in times and "dense" in times[2048] else max((s for s in sizes if "dense" in times[s]), default=None)
    load1 = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"load average at the end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}; {time.perf_counter() - t_start:.0f} s")
    if ref is None:
        print("time_ratio_2048=nan mem_ratio_2048=nan time_exponent=" + f"{exponent:.2f}")
        return
    t, pk = times[ref], peaks[ref]
    print(f"at S={ref}: the block without any attention (floor) takes {t['floor']:.1f} ms, so no attention in this "
          f"block can be more than dense/floor = {t['dense'] / t['floor']:.1f}x faster than dense SDPA; ours spends "
          f"{t['ours'] - t['floor']:.1f} ms on attention, dense SDPA {t['dense'] - t['floor']:.1f} ms "
          f"({(t['dense'] - t['floor']) / max(t['ours'] - t['floor'], 1e-9):.1f}x)")
    print(f"time_ratio_{ref}={t['dense'] / t['ours']:.2f} mem_ratio_{ref}={pk['dense-math'] / pk['ours']:.2f} "
          f"time_exponent={exponent:.2f}")


if __name__ == "__main__":
    main()
