"""Deformable slice attention vs dense multi-head attention: time and memory per forward+backward.

Two levels, side by side in one run: whole blocks (the issue's definition: every model pays the
same layer norms, projections and FFN) and the attention operator alone.

Block level. All models are the same pre-norm transformer (2 layers, d_model=128, 4 heads,
FFN x2, the same z position encoding, final LayerNorm); only the attention differs:
  - ours:   medclust SliceAttention with its defaults (4 points per head here; on the CPU the
            compiled sampling kernel, medclust.models.native; values recomputed in backward from
            1024 tokens B*S on, i.e. S >= 512 here),
  - ours-bag: the same on its PyTorch path (impl="bag": what a GPU, autocast or torch.compile
            runs, and the CPU without a C compiler),
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
Operator level (--op-sizes, default 512 2048 8192): one layer's attention operator alone, from
its query/value tensors to the result before the output projection, on the same numbers:
  - ours:   DeformableSliceAttention.attend of the block model's first layer (the code path its
            forward runs; ours-bag: the same weights on the PyTorch path): offset and weight
            prediction from the query, the z interpolation,
            the gather of value rows and the weighted sum over points and heads. Not in it: the
            value and output projections, the slice index (sorted z; built once per forward and
            shared by all layers, like dense's key mask; its time is printed), and recomputation
            (which re-runs the value projection, so it is not part of the operator),
  - dense / dense-math: F.scaled_dot_product_attention(q, k, v, attn_mask=key padding mask) on
            (B, heads, S, head_dim) tensors, default and math backend; ours gets q and v as its
            (B, S, D) query and value (the same numbers, heads side by side).
  Inputs require grad (forward+backward reaches them); the padding (--padding) and the mask rule
  are the block level's (no mask when every slice is real).
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

The last line is machine-readable (the first three keys at block level, as the issue defines them):
  time_ratio_2048=<dense SDPA / ours> mem_ratio_2048=<dense math peak / ours peak>
  time_exponent=<slope of log time vs log S for ours, least squares over S >= 512>
  op_time_ratio_2048=<dense SDPA op / ours op> op_mem_ratio_2048=<dense math op peak / ours op peak>
  block_floor_cap_2048=<dense block / floor block: the most any attention can gain at block level>

Run: python benchmarks/slice_attention.py [--sizes 32 128 512 2048 8192] [--op-sizes 512 2048 8192]
     [--batch 2] [--threads 1] [--padding 0.0]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
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

from medclust.models.slice_attention import DeformableSliceAttention, SliceAttention
from medclust.models.slice_geometry import SliceIndex, build_slice_index, z_position_encoding

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


class AttendOp(nn.Module):
    """ours at operator level: ``attn.attend(query, value, index)``.

    The inputs are held as parameters so that ``zero_grad`` clears their gradients as well.
    """

    def __init__(self, attn: DeformableSliceAttention, query: torch.Tensor, value: torch.Tensor, index: SliceIndex) -> None:
        super().__init__()
        self.attn, self.index = attn, index
        self.query, self.value = nn.Parameter(query), nn.Parameter(value)

    def forward(self) -> torch.Tensor:
        return self.attn.attend(self.query, self.value, self.index)


class SDPAOp(nn.Module):
    """dense at operator level: ``scaled_dot_product_attention`` on (B, H, S, Dh) leaves."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None, math: bool = False) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Parameter(q), nn.Parameter(k), nn.Parameter(v)
        self.key_mask, self.math = key_mask, math

    def forward(self) -> torch.Tensor:
        with sdpa_kernel(SDPBackend.MATH) if self.math else contextlib.nullcontext():
            return F.scaled_dot_product_attention(self.q, self.k, self.v, attn_mask=self.key_mask)


def volumes(s: int, batch: int, d: int, padding: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens, z (1.25 mm spacing) and valid of ``batch`` volumes of S slots; the last volume's
    last ``padding`` fraction of slots is padding."""
    g = torch.Generator().manual_seed(s)
    tokens = torch.randn(batch, s, d, generator=g).to(device)
    z = (torch.arange(s, dtype=torch.float32) * 1.25).repeat(batch, 1).to(device)
    valid = torch.ones(batch, s, dtype=torch.bool, device=device)
    valid[-1, s - int(padding * s) :] = False
    return tokens, z, valid


def op_models(attn: DeformableSliceAttention, s: int, batch: int, padding: float, device: torch.device) -> dict[str, nn.Module]:
    """The operator-level models for S slots, on the same q, k, v numbers and padding."""
    h, dh = attn.heads, attn.head_dim
    _, z, valid = volumes(s, batch, h * dh, padding, device)
    g = torch.Generator().manual_seed(s + 1)
    q, k, v = (torch.randn(batch, h, s, dh, generator=g).to(device) for _ in range(3))
    key_mask = None if bool(valid.all()) else valid[:, None, None, :]

    def heads_last(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).reshape(batch, s, h * dh)

    bag = copy.deepcopy(attn)
    bag.impl = "bag"
    index = build_slice_index(z, valid)
    return {
        "ours": AttendOp(attn, heads_last(q), heads_last(v), index),
        "ours-bag": AttendOp(bag, heads_last(q), heads_last(v), index),
        "dense": SDPAOp(q, k, v, key_mask),
        "dense-math": SDPAOp(q.clone(), k.clone(), v.clone(), key_mask, math=True),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _step(model: nn.Module, *inputs: torch.Tensor) -> None:
    out = model(*inputs)
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


def _ref(vals: dict[int, dict[str, float]]) -> int | None:
    """S of the final line's ratios: 2048, else the largest S the dense models ran at."""
    if 2048 in vals and "dense" in vals[2048]:
        return 2048
    return max((s for s in vals if "dense" in vals[s]), default=None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 128, 512, 2048, 8192])
    ap.add_argument("--op-sizes", type=int, nargs="*", default=[512, 2048, 8192], help="S for the operator level (none: skip it)")
    ap.add_argument("--dense-max", type=int, default=2048, help="largest S for the dense models (see the docstring)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--points", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--padding", type=float, default=0.0,
                    help="fraction of the last volume's slots that are padding (0: every slice real, dense gets no mask)")
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
        "ours-bag": SliceAttention(d, h, p, n_layers, impl="bag"),
        "ours-g": SliceAttention(d, h, p, n_layers, impl="gather", recompute_min_tokens=None),
        "dense": DenseSliceTransformer(d, h, n_layers),
        "dense-math": DenseSliceTransformer(d, h, n_layers, math=True),
        "floor": floor_model(d, h, p, n_layers),
    }
    models["ours-bag"].load_state_dict(models["ours"].state_dict())
    models = {k: m.to(device).train() for k, m in models.items()}
    params = {k: sum(q.numel() for q in m.parameters()) for k, m in models.items()}
    load0 = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"device={device} threads={args.threads} clock={'thread CPU time' if clock is time.thread_time else 'wall'} "
          f"B={args.batch} d_model={d} heads={h} points={p} layers={n_layers} padding={args.padding:g}; load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}; "
          "params " + ", ".join(f"{k}={v}" for k, v in params.items()), flush=True)
    mb = 1024.0**2
    times: dict[int, dict[str, float]] = {}
    peaks: dict[int, dict[str, float]] = {}
    saved: dict[int, dict[str, float]] = {}
    t_start = time.perf_counter()
    for s in args.sizes:
        inputs = volumes(s, args.batch, d, args.padding, device)
        run = {k: m for k, m in models.items() if k not in DENSE or s <= args.dense_max}
        times[s] = time_ms(run, inputs, device, args.repeats, clock)
        peaks[s] = {k: peak_bytes(m, inputs, device) / mb for k, m in run.items()}
        saved[s] = {k: saved_bytes(m, inputs) / mb for k, m in run.items()}
        print(f"  S={s}: ours {times[s]['ours']:.1f} ms ({time.perf_counter() - t_start:.0f} s so far)", flush=True)
    # operator level: the first layer's attention of the block model above, alone
    attn = models["ours"].layers[0].attn
    op_times: dict[int, dict[str, float]] = {}
    op_peaks: dict[int, dict[str, float]] = {}
    op_saved: dict[int, dict[str, float]] = {}
    index_ms: dict[int, float] = {}
    for s in args.op_sizes:
        ops = {k: m for k, m in op_models(attn, s, args.batch, args.padding, device).items() if k not in DENSE or s <= args.dense_max}
        op_times[s] = time_ms(ops, (), device, args.repeats, clock)
        op_peaks[s] = {k: peak_bytes(m, (), device) / mb for k, m in ops.items()}
        op_saved[s] = {k: saved_bytes(m, ()) / mb for k, m in ops.items()}
        _, z, valid = volumes(s, args.batch, d, args.padding, device)
        spent = []
        for _ in range(args.repeats):
            _sync(device)
            t0 = clock()
            build_slice_index(z, valid)
            _sync(device)
            spent.append((clock() - t0) * 1e3)
        index_ms[s] = statistics.median(spent)
        print(f"  op S={s}: ours {op_times[s]['ours']:.2f} ms ({time.perf_counter() - t_start:.0f} s so far)", flush=True)
    names = list(models)
    print("\n=== block level: 2 layers with layer norms, projections and FFN (the issue's comparison) ===")
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
    op_ref = _ref(op_times)
    op_keys = "op_time_ratio_2048=nan op_mem_ratio_2048=nan"
    if args.op_sizes:
        op_names = ["ours", "ours-bag", *DENSE]
        print("\n=== operator level: one layer's attention alone, from q/k/v (ours: query/value) to the result "
              "before the output projection ===")
        _table("forward+backward time", "ms", args.op_sizes, op_times, op_names)
        _table("peak memory above baseline", "MiB", args.op_sizes, op_peaks, op_names)
        _table("saved-for-backward tensors", "MiB", args.op_sizes, op_saved, op_names)
        print("slice index (build_slice_index: once per forward, shared by all layers; not in ours op), ms: "
              + ", ".join(f"S={s} {index_ms[s]:.2f}" for s in args.op_sizes))
        op_big = [s for s in args.op_sizes if s >= 512]
        if len(op_big) >= 2:
            print(f"op time exponent over S >= 512: ours {slope(op_big, [op_times[s]['ours'] for s in op_big]):.2f}")
        if op_ref is not None:
            ot, op_pk = op_times[op_ref], op_peaks[op_ref]
            op_keys = (f"op_time_ratio_{op_ref}={ot['dense'] / ot['ours']:.2f} "
                       f"op_mem_ratio_{op_ref}={op_pk['dense-math'] / op_pk['ours']:.2f}")
    ref = _ref(times)
    load1 = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"load average at the end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}; {time.perf_counter() - t_start:.0f} s")
    if ref is None:
        print(f"time_ratio_2048=nan mem_ratio_2048=nan time_exponent={exponent:.2f} {op_keys} block_floor_cap_2048=nan")
        return
    t, pk = times[ref], peaks[ref]
    print(f"at S={ref}: the block without any attention (floor) takes {t['floor']:.1f} ms, so no attention in this "
          f"block can be more than dense/floor = {t['dense'] / t['floor']:.1f}x faster than dense SDPA; ours spends "
          f"{t['ours'] - t['floor']:.1f} ms on attention, dense SDPA {t['dense'] - t['floor']:.1f} ms "
          f"({(t['dense'] - t['floor']) / max(t['ours'] - t['floor'], 1e-9):.1f}x)")
    print(f"time_ratio_{ref}={t['dense'] / t['ours']:.2f} mem_ratio_{ref}={pk['dense-math'] / pk['ours']:.2f} "
          f"time_exponent={exponent:.2f} {op_keys} block_floor_cap_{ref}={t['dense'] / t['floor']:.2f}")


if __name__ == "__main__":
    main()
