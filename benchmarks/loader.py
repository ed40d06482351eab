"""Pretraining loader throughput per DataLoader worker, and the workers a GPU step needs.

Builds batches exactly as pretraining does (``PretrainBatches`` over ``plan_epoch`` plans, the
recipe's augmentation, whole batches built inside the workers) at the GPU recipe's settings
(``config/pretrain_gpu.yaml``: 96x96 views and volume slices, ``batch_size_2d`` 256 of which
``batch_size_3d`` 8 volumes x ``s_max`` 16 slices, so 128 independent 2D items + 8 volumes per
step, two views of each), from HDF5 slice stores of the real demo data:

- ``results/slices/{chest_ct,brain_mni,chest_xray,chest_drr}`` when the demo workflow has
  written them (``--stores`` to name others), otherwise the demo cases in ``resources/demo``
  (``medclust fetch-demo``) preprocessed with the demo config into a temporary folder
  (chest_ct, brain_mni, chest_xray; chest_drr needs the radiograph simulation and is left out).

Measured:

- ``num_workers 0``: batches built in this process, one torch thread: one worker's throughput
  without the inter-process transfer. Reported per wall second and per CPU second of the
  building thread (the CPU figure does not count time lost to other processes on a shared
  machine; on an idle core both agree).
- ``num_workers 1`` and ``2`` through ``torch.utils.data.DataLoader`` as the trainer builds it
  (the first batch, worker start-up, is not timed; 2 workers are only meaningful with 2 free cores).

Items are the trainer's unit (2D items + volumes of a batch); images are the 2D images that the
encoder sees (two views of every 2D item and of every volume slice).

The encoder side: forward+backward FLOPs of the recipe's encoder (``resnet18``, 1 channel,
96x96; ``torch.utils.flop_counter.FlopCounterMode`` on CPU) per image, times the images of a
step, give the step rate of an H100 at 40 % of its dense bf16 peak (989 TFLOP/s); the slice
attention, projection heads and Sinkhorn add well under 1 % to it. From that rate (or from
``--step-rate``, e.g. measured by ``benchmarks/gpu_check.sh``), the workers needed per GPU and
per 8-GPU node follow.

The last line is machine-readable::

    items_per_s_per_worker=<x> workers_per_gpu=<n> workers_per_node=<8n> step_rate=<steps/s used>

Run from the repository root::

    python benchmarks/loader.py [--batches 4] [--workers 0 1 2] [--step-rate STEPS_PER_S] [--fresh]
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
DEMO_STORES = ["chest_ct", "brain_mni", "chest_xray", "chest_drr"]
BUILD_FROM_DEMO = ["chest_ct", "brain_mni", "chest_xray"]
H100_BF16_DENSE_FLOPS = 989e12


def gpu_recipe() -> dict[str, Any]:
    """The ``pretrain`` block of ``config/pretrain_gpu.yaml``."""
    with open(REPO / "config" / "pretrain_gpu.yaml", encoding="utf-8") as f:
        return dict(yaml.safe_load(f)["pretrain"])


def build_demo_stores(root: Path) -> list[Path]:
    """Preprocess the demo cases of ``BUILD_FROM_DEMO`` with the demo config into ``root``."""
    from medclust.config import load_config
    from medclust.io.sources import discover
    from medclust.preprocess.index import write_index_and_splits
    from medclust.preprocess.pipeline import preprocess_case

    config = load_config(REPO / "config.yaml")
    folders = []
    for name in BUILD_FROM_DEMO:
        entry = config["datasets"][name]
        settings = dict(entry, name=name, path=str(REPO / entry["path"]))
        if not Path(settings["path"]).exists():
            raise SystemExit(f"loader benchmark: {settings['path']} not found; run `medclust fetch-demo` first")
        prep = dict(config["preprocess"], **entry.get("preprocess", {}))
        cases = [c for c in discover(settings) if c.error is None]
        assume = entry.get("assume_pixel_spacing")  # as ingest applies it (the demo radiograph's header has none)
        for case in cases:
            if assume is not None:
                case.assume_spacing = (float(assume[0]), float(assume[1]))
        folder = root / name
        folder.mkdir(parents=True)
        for case in cases:
            preprocess_case(case, prep, folder / f"{case.case_id}.h5", name)
        write_index_and_splits(name, cases, folder, folder / "index.json", folder / "splits.json", config["seed"], config.get("splits"))
        folders.append(folder)
    return folders


def encoder_flops_per_image(backbone: str, d_model: int, size: tuple[int, int], n: int = 4) -> float:
    """Forward+backward FLOPs of the slice encoder per 1-channel image (counted on ``n`` images)."""
    from torch.utils.flop_counter import FlopCounterMode

    from medclust.models.encoder import SliceEncoder

    encoder = SliceEncoder(backbone, d_model=d_model).train()
    images = torch.randn(n, 1, *size)
    with FlopCounterMode(display=False) as counter:
        encoder(images).square().mean().backward()
    return counter.get_total_flops() / n


def _items(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(items, encoder images) of one batch: 2D items + volumes; both views of items and slices."""
    n2d = int(batch["views2d"].shape[1]) if "views2d" in batch else 0
    vols = int(batch["volumes"].shape[1]) if "volumes" in batch else 0
    slices = int(batch["volumes"].shape[1] * batch["volumes"].shape[2]) if "volumes" in batch else 0
    return n2d + vols, 2 * (n2d + slices)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stores", nargs="*", default=None, help="slice store folders (default: demo stores, see above)")
    ap.add_argument("--fresh", action="store_true", help="preprocess resources/demo into a temporary folder even if results/slices exists")
    ap.add_argument("--batches", type=int, default=4, help="timed batches per setting")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--in-memory", choices=["recipe", "yes", "no"], default="recipe",
                    help="cache the stores in memory (the recipe's cache_in_memory) or read slices from HDF5 per batch")
    ap.add_argument("--step-rate", type=float, default=None,
                    help="encoder steps/s to feed (default: the rate implied at 40%% of an H100's bf16 peak)")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    args = ap.parse_args()
    os.chdir(REPO)
    torch.set_num_threads(1)  # what a DataLoader worker gets

    from torch.utils.data import DataLoader

    from medclust.data.pretrain_datasets import (
        PretrainBatches,
        collect_cases,
        plan_epoch,
    )
    from medclust.train.recipes import PretrainTask, resolve_settings
    from medclust.train.seeding import loader_generator, worker_init_fn

    t_start = time.perf_counter()
    load0 = os.getloadavg()
    tmp = None
    if args.stores:
        stores = [Path(s) for s in args.stores]
        source = "given stores"
    elif not args.fresh and all((REPO / "results" / "slices" / d / "index.json").is_file() for d in DEMO_STORES):
        stores = [REPO / "results" / "slices" / d for d in DEMO_STORES]
        source = "results/slices (demo workflow)"
    else:
        tmp = tempfile.TemporaryDirectory(prefix="medclust_loader_")
        stores = build_demo_stores(Path(tmp.name))
        source = f"resources/demo preprocessed into a temporary folder ({time.perf_counter() - t_start:.0f} s)"
    recipe = gpu_recipe()
    recipe["num_workers"] = 0
    if args.in_memory != "recipe":
        recipe["cache_in_memory"] = args.in_memory == "yes"
    settings = resolve_settings(recipe)
    cases = collect_cases(stores)
    task = PretrainTask("joint", settings, cases)
    if not task.uses_3d:
        raise SystemExit("loader benchmark: the stores hold no volume; the GPU recipe's batches need some")
    plans = []
    epoch = 0
    need = args.batches + 2 * max(args.workers) + 2
    while len(plans) < need:
        plans += plan_epoch(task.num_items, task.num_volumes, task.batch_2d, task.batch_3d, task.seed, epoch)
        epoch += 1
    dataset = PretrainBatches(task.arrays, plans, settings["view_size"], settings["volume_size"], settings["s_max"], task.augment)
    items, images = _items(dataset[0])  # also warms up the transforms
    print(f"stores: {source}: {len(cases)} cases, {task.num_items} 2D items, {task.num_volumes} volumes; "
          f"cache_in_memory={settings['cache_in_memory']}")
    print(f"GPU recipe batch: {task.batch_2d} 2D items + {task.batch_3d} volumes x {settings['s_max']} slices = {items} items, "
          f"{images} encoder images of {settings['view_size'][0]}x{settings['view_size'][1]} per step; "
          f"load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}", flush=True)

    results: dict[int, dict[str, float]] = {}
    for workers in args.workers:
        if workers == 0:
            wall0, cpu0 = time.perf_counter(), time.thread_time()
            for i in range(1, 1 + args.batches):
                dataset[i]
            wall, cpu = time.perf_counter() - wall0, time.thread_time() - cpu0
            results[0] = {"wall": wall, "cpu": cpu, "batches": args.batches}
        else:
            loader = DataLoader(
                dataset, batch_size=None, shuffle=False, num_workers=workers, worker_init_fn=worker_init_fn,
                generator=loader_generator(task.seed, 0), prefetch_factor=2, persistent_workers=False,
            )
            it = iter(loader)
            next(it)  # worker start-up and first batch: not timed
            n = args.batches * workers
            wall0 = time.perf_counter()
            for _ in range(n):
                next(it)
            results[workers] = {"wall": time.perf_counter() - wall0, "batches": n}
            del it, loader
        r = results[workers]
        print(f"  num_workers={workers}: {r['batches']} batches in {r['wall']:.1f} s", flush=True)

    print(f"\n{'workers':>8} | {'batches/s':>9} | {'items/s':>8} | {'images/s':>9} | {'items/s per worker':>18}")
    print("-" * 64)
    for workers, r in results.items():
        bps = r["batches"] / r["wall"]
        per = bps * items / max(workers, 1)
        print(f"{workers:>8} | {bps:>9.2f} | {bps * items:>8.1f} | {bps * images:>9.1f} | {per:>18.1f}")
    r0 = results.get(0)
    if r0 is not None:
        per_worker = r0["batches"] / r0["wall"] * items
        print(f"num_workers=0 per CPU second of the building thread: {r0['batches'] / r0['cpu'] * items:.1f} items/s "
              f"({r0['cpu'] / r0['batches']:.2f} CPU s per batch, {r0['wall'] / r0['batches']:.2f} wall s)")
    else:
        w = min(results)
        per_worker = results[w]["batches"] / results[w]["wall"] * items / w

    flops_image = encoder_flops_per_image(settings["backbone"], settings["d_model"], tuple(settings["view_size"]))
    flops_step = flops_image * images
    h100_rate = 0.4 * H100_BF16_DENSE_FLOPS / flops_step
    rate = args.step_rate if args.step_rate else h100_rate
    need_items = rate * items
    per_gpu = math.ceil(need_items / per_worker)
    print(f"\nencoder {settings['backbone']} at {settings['view_size'][0]}x{settings['view_size'][1]}: "
          f"{flops_image / 1e9:.3f} GFLOP per image forward+backward (FlopCounterMode), {flops_step / 1e12:.3f} TFLOP per step "
          f"({images} images)")
    print(f"at 40% of an H100's dense bf16 peak (989 TFLOP/s): {h100_rate:.0f} steps/s = {h100_rate * items:.0f} items/s per GPU")
    print(f"feeding {rate:.1f} steps/s ({'--step-rate' if args.step_rate else 'the H100 estimate'}) takes "
          f"{need_items:.0f} items/s = {per_gpu} workers of {per_worker:.1f} items/s per GPU, "
          f"{per_gpu * args.gpus_per_node} per {args.gpus_per_node}-GPU node; the recipe's num_workers "
          f"{gpu_recipe()['num_workers']} feed {gpu_recipe()['num_workers'] * per_worker / items:.2f} steps/s")
    load1 = os.getloadavg()
    print(f"load average at the end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}; {time.perf_counter() - t_start:.0f} s")
    if tmp is not None:
        tmp.cleanup()
    print(f"items_per_s_per_worker={per_worker:.1f} workers_per_gpu={per_gpu} "
          f"workers_per_node={per_gpu * args.gpus_per_node} step_rate={rate:.1f}")


if __name__ == "__main__":
    main()
