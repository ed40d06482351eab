"""Training-step cost of the joint objective against 2D SwAV, and Sinkhorn's share of it.

Same encoder, same data, same ``batch_size_2d`` (2D images per view per step), measured side by
side (variants interleaved round by round, median over rounds) in one process:

- ``swav2d``           : batch_size_2d 2D items, SwAV only;
- ``joint``            : the recipe's default: batch_size_3d volumes whose slices (s_max per view)
                         are part of the 2D batch (reused as 2D items), plus slice attention,
                         volume clustering and masked prediction;
- ``joint_2d_stage``   : the joint batch during the staged 2D warm-up (volume slices used as 2D
                         items only): the same images as ``joint`` without the 3D objectives;
- ``joint_extra_vols`` : ``volume_slices_in_2d: false``: batch_size_2d 2D items *plus* the
                         volume slices encoded on top (what the 3D branch costs without reuse).

A step is forward + backward + optimiser step + prototype re-normalisation; batches are built
beforehand, so data loading is not timed. Sinkhorn time is measured by wrapping the Sinkhorn
function the losses call.

    python benchmarks/pretrain_step.py                     # demo stores if present, else synthetic
    python benchmarks/pretrain_step.py --device cuda --backbone resnet18 --view-size 96 \\
        --batch-2d 256 --batch-3d 8 --s-max 16              # GPU scale
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import medclust.losses.agreement3d as agreement_module
import medclust.losses.swav as swav_module
from medclust.data import collect_cases
from medclust.io.slice_store import write_case
from medclust.train.distributed import DistContext
from medclust.train.recipes import PretrainTask, resolve_settings

DEMO = ["chest_ct", "brain_mni", "chest_xray", "chest_drr"]


def synthetic_stores(root: Path, size: int) -> list[Path]:
    """Two CT-like volumes of 60 slices and 6 radiographs, in the slice-store format."""
    import json

    rng = np.random.default_rng(0)
    folders = []
    for name, modality, cases in (("vol", "CT", {"v1": 60, "v2": 60, "v3": 48}), ("xr", "XR", {f"x{i}": 1 for i in range(6)})):
        folder = root / name
        folder.mkdir(parents=True)
        index = []
        for case_id, n in cases.items():
            image = rng.uniform(0, 1, (n, size, size)).astype(np.float32)
            attrs = {
                "case_id": case_id, "dataset": name, "modality": modality, "simulated": False, "source_path": "-",
                "source_sha256": "-", "label_path": "", "original_shape": [size, size, n], "original_spacing": [1, 1, 1],
                "original_affine": np.eye(4), "store_affine": np.eye(4), "target_spacing": [1, 1, 2.5], "slice_axis": 2,
                "z_positions_mm": (np.arange(n) * 2.5).tolist(), "normalisation": "{}", "medclust_version": "bench",
            }
            write_case(folder / f"{case_id}.h5", image, attrs)
            index.append({"case_id": case_id, "file": f"{case_id}.h5", "modality": modality, "num_slices": n})
        (folder / "index.json").write_text(json.dumps({"dataset": name, "cases": index}), encoding="utf-8")
        (folder / "splits.json").write_text(json.dumps({"dataset": name, "train": list(cases), "val": [], "test": []}), encoding="utf-8")
        folders.append(folder)
    return folders


class SinkhornTimer:
    """Wraps the Sinkhorn function used by the SwAV and agreement losses; accumulates seconds."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = 0.0
        self._original = swav_module.sinkhorn

    def __enter__(self) -> SinkhornTimer:
        original = self._original

        def timed(*args: Any, **kwargs: Any) -> torch.Tensor:
            _sync(self.device)
            start = time.perf_counter()
            out = original(*args, **kwargs)
            _sync(self.device)
            self.seconds += time.perf_counter() - start
            return out

        swav_module.sinkhorn = timed
        agreement_module.sinkhorn = timed
        return self

    def __exit__(self, *exc: object) -> None:
        swav_module.sinkhorn = self._original
        agreement_module.sinkhorn = self._original


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(method: str, settings: dict[str, Any], cases: list[Any], device: torch.device, n_batches: int) -> dict[str, Any]:
    task = PretrainTask(method, settings, cases)
    task.setup(DistContext(device=device))
    torch.manual_seed(0)
    model = task.build_model().to(device)
    batches = []
    for batch in task.batches(0, 0, 1):
        batches.append({k: v.to(device) for k, v in batch.items()})
        if len(batches) == n_batches:
            break
    params = [p for p in model.parameters() if p.requires_grad]
    return {"task": task, "model": model, "opt": torch.optim.AdamW(params, lr=1e-4), "batches": batches, "step": 0}


def run_steps(v: dict[str, Any], count: int, device: torch.device, amp: bool) -> float:
    """Seconds per step over ``count`` steps (steps past the prototype freeze, all objectives on)."""
    task, model, opt = v["task"], v["model"], v["opt"]
    _sync(device)
    start = time.perf_counter()
    for _ in range(count):
        batch = v["batches"][v["step"] % len(v["batches"])]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            out = task.training_step(model, batch, 10_000 + v["step"])
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        task.after_optimizer_step(model, v["step"])
        v["step"] += 1
    _sync(device)
    return (time.perf_counter() - start) / count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stores", nargs="*", default=None, help="slice store folders (default: demo stores, else synthetic)")
    parser.add_argument("--backbone", default="resnet10")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--view-size", type=int, default=64)
    parser.add_argument("--batch-2d", type=int, default=32)
    parser.add_argument("--batch-3d", type=int, default=2)
    parser.add_argument("--s-max", type=int, default=8)
    parser.add_argument("--k-2d", type=int, default=30)
    parser.add_argument("--queue", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-amp", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    tmp = None
    if args.stores:
        stores = [Path(s) for s in args.stores]
    elif all((Path("results/slices") / d / "index.json").is_file() for d in DEMO):
        stores = [Path("results/slices") / d for d in DEMO]
    else:
        tmp = tempfile.TemporaryDirectory()
        stores = synthetic_stores(Path(tmp.name), args.view_size)
    cases = collect_cases(stores)
    base = resolve_settings({
        "backbone": args.backbone, "d_model": args.d_model, "proj_dim": 32, "heads": 4, "points": 4, "layers": 2,
        "k_2d": args.k_2d, "k_3d": 4, "queue_length": args.queue, "queue_length_3d": 16, "s_max": args.s_max,
        "batch_size_2d": args.batch_2d, "batch_size_3d": args.batch_3d, "view_size": [args.view_size] * 2,
        "volume_size": [args.view_size] * 2, "num_workers": 0, "seed": 0,
    })
    variants = {
        "swav2d": build("swav2d", base, cases, device, 4),
        "joint": build("joint", base, cases, device, 4),
        "joint_2d_stage": build("joint", {**base, "warmup_2d_steps": 10**9}, cases, device, 4),
        "joint_extra_vols": build("joint", {**base, "volume_slices_in_2d": False}, cases, device, 4),
    }
    images = {}
    for name, v in variants.items():
        b = v["batches"][0]
        n2d = 2 * b["views2d"].shape[1]
        n3d = int(b["valid"].sum()) if "valid" in b else 0
        images[name] = (n2d, n3d)
        run_steps(v, 2, device, not args.no_amp)  # warm-up (allocations, queue fill)

    times: dict[str, list[float]] = {k: [] for k in variants}
    sink: dict[str, list[float]] = {k: [] for k in variants}
    order = list(variants)
    for r in range(args.rounds):
        # rotate the order each round so that no variant always follows the same one
        for name in order[r % len(order) :] + order[: r % len(order)]:
            v = variants[name]
            with SinkhornTimer(device) as timer:
                dt = run_steps(v, args.steps, device, not args.no_amp)
            times[name].append(dt)
            sink[name].append(timer.seconds / args.steps)

    print(f"device {device}, threads {args.threads}, backbone {args.backbone}, view {args.view_size}px, "
          f"batch_size_2d {args.batch_2d}, batch_size_3d {args.batch_3d}, s_max {args.s_max}, k_2d {args.k_2d}, queue {args.queue}")
    print(f"stores: {', '.join(str(s) for s in stores)}")
    print(f"{'variant':<18}{'2D imgs':>9}{'vol slices':>12}{'step ms':>10}{'sinkhorn ms':>13}{'sinkhorn %':>12}")
    ref = statistics.median(times["swav2d"])
    for name in variants:
        t, s = statistics.median(times[name]), statistics.median(sink[name])
        print(f"{name:<18}{images[name][0]:>9}{images[name][1]:>12}{1000 * t:>10.1f}{1000 * s:>13.2f}{100 * s / t:>11.1f}%")
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"ratio joint / swav2d step time (same batch_size_2d): {med['joint'] / ref:.3f}")
    print(f"ratio joint / joint_2d_stage (same images, 3D objectives on vs off): {med['joint'] / med['joint_2d_stage']:.3f}")
    print(f"ratio joint_extra_vols / swav2d (volume slices encoded on top, no reuse): {med['joint_extra_vols'] / ref:.3f}")
    print(f"sinkhorn share of the joint step: {100 * statistics.median(sink['joint']) / med['joint']:.2f}%")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
