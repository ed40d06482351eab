"""GPU check: joint pretraining at the GPU recipe (compile off and on) and one fine-tuning run.

The driver behind ``benchmarks/gpu_check.sh`` (which adds the CUDA gate and a time limit).
Three phases, each through the real trainer (``medclust.train.Trainer``) and recipes:

1. ``pretrain``: joint pretraining, ``config/pretrain_gpu.yaml`` settings (resnet18, 96x96
   views, 128 2D items + 8 volumes x 16 slices per step, d_model 256, 4 attention layers),
   bf16 autocast, ``compile: false``;
2. ``pretrain+compile``: the same with ``compile: true`` (torch.compile of the encoder and the
   slice attention; its compilation falls in the warm-up steps);
3. ``finetune``: one segmentation run (``run_finetune``: train, predict and score the test
   cases) at ``config/gpu_study.yaml``-like settings (resnet18, whole 96x96 slices, 5 context
   slices, full-width decoder, batch 32), bf16 autocast.

Data are synthetic slice stores written to a temporary folder (nothing to fetch, so it runs on
a fresh clone and on machines without network): uniform-noise CT-like volumes for pretraining
(``--volumes`` x ``--slices``, enough items for several steps per epoch) and the tests'
disc/square phantom volumes with labels for fine-tuning (``tests/finetune_helpers.py``).

Per phase it prints steps, wall time, items/s (the trainer's unit), the share of step time spent
waiting for data, GPU busy % (``nvidia-smi`` sampled every 200 ms in the background) and peak
GPU memory (``torch.cuda.max_memory_allocated``). Steady state = the steps after the first
``max(10, steps // 5)`` (warm-up, compilation). Data wait is measured without touching the
trainer: the task's ``batches`` is wrapped so that every ``next()`` on it is timed; a step's time
is the time from one batch request to the next, its wait the time that request took.

``--device cpu`` runs the same phases at a tiny scale (resnet10, 32x32, a few steps) as a smoke
test of every code path but nvidia-smi; without CUDA and without ``--device cpu`` the driver
says CUDA is missing and exits with status 3 (``--require-cuda``: status 2), never a silent skip.

The last line is machine-readable::

    pretrain_items_per_s=.. compiled_items_per_s=.. finetune_items_per_s=.. gpu_busy_pct=..
    compiled_gpu_busy_pct=.. peak_mem_gib=.. data_wait_share=.. compiled_data_wait_share=..

Run: python benchmarks/gpu_check.py [--steps 300] [--finetune-steps 300] [--compile both|on|off]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # finetune_helpers: the phantom stores of the tests


def fail(message: str, status: int) -> None:
    print(f"gpu_check: {message}", file=sys.stderr, flush=True)
    raise SystemExit(status)


# -- data -------------------------------------------------------------------------------------


def pretrain_stores(root: Path, volumes: int, slices: int, size: int) -> list[Path]:
    """One CT-like dataset of ``volumes`` noise volumes of ``slices`` slices, all training cases."""
    import numpy as np

    from medclust.io.slice_store import write_case

    rng = np.random.default_rng(0)
    folder = root / "synth_ct"
    folder.mkdir(parents=True)
    index = []
    for v in range(volumes):
        case_id = f"v{v:03d}"
        image = rng.uniform(0.0, 1.0, (slices, size, size)).astype(np.float16)
        attrs = {
            "case_id": case_id, "dataset": "synth_ct", "modality": "CT", "simulated": True, "source_path": "-",
            "source_sha256": "-", "label_path": "", "original_shape": [size, size, slices], "original_spacing": [3.75, 3.75, 5.0],
            "original_affine": np.diag([3.75, 3.75, 5.0, 1.0]), "store_affine": np.diag([3.75, 3.75, 5.0, 1.0]),
            "target_spacing": [3.75, 3.75, 5.0], "slice_axis": 2, "z_positions_mm": (np.arange(slices) * 5.0).tolist(),
            "normalisation": "{}", "medclust_version": "gpu_check",
        }
        write_case(folder / f"{case_id}.h5", image, attrs)
        index.append({"case_id": case_id, "file": f"{case_id}.h5", "modality": "CT", "num_slices": slices})
    (folder / "index.json").write_text(json.dumps({"dataset": "synth_ct", "cases": index}), encoding="utf-8")
    splits = {"dataset": "synth_ct", "train": [c["case_id"] for c in index], "val": [], "test": []}
    (folder / "splits.json").write_text(json.dumps(splits), encoding="utf-8")
    return [folder]


def finetune_store(root: Path, cases: int, slices: int, size: int) -> Path:
    """Phantom volumes with a disc (label 3) and a square (label 7), as the fine-tuning tests use."""
    from finetune_helpers import phantom, write_store

    entries = []
    for c in range(cases):
        image, label = phantom(slices, size=size, seed=c)
        entries.append({"case_id": f"p{c}", "image": image, "label": label, "original_shape": [size, size, slices]})
    return write_store(root / "slices", "phantom", entries)


# -- measurement ------------------------------------------------------------------------------


class BatchTimer:
    """Times every ``next()`` on the iterables a task's ``batches`` returns (the data wait)."""

    def __init__(self, count_items) -> None:
        self.count_items = count_items
        self.requested: list[float] = []
        self.returned: list[float] = []
        self.items: list[int] = []

    def wrap(self, iterable: Any) -> Iterator[Any]:
        it = iter(iterable)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.requested.append(t0)
            self.returned.append(time.perf_counter())
            self.items.append(self.count_items(batch))
            yield batch

    def summary(self, end: float, warm: int) -> dict[str, float]:
        """Steady-state figures: steps from ``warm`` on; the last step ends at ``end``."""
        n = len(self.requested)
        starts = self.requested[warm:]
        if not starts:
            return {"steps": n, "items_per_s": float("nan"), "wait_share": float("nan"), "t0": end}
        bounds = starts[1:] + [end]
        span = bounds[-1] - starts[0]
        wait = sum(r - q for q, r in zip(self.requested[warm:], self.returned[warm:]))
        return {"steps": n, "items_per_s": sum(self.items[warm:]) / span, "wait_share": wait / span, "t0": starts[0],
                "step_ms": 1e3 * span / len(starts)}


class GpuSampler:
    """``nvidia-smi`` utilisation samples (every ``period_ms``) in a background process."""

    def __init__(self, period_ms: int = 200) -> None:
        self.samples: list[tuple[float, float, float]] = []
        self.proc: subprocess.Popen[str] | None = None
        self.note = ""
        exe = shutil.which("nvidia-smi")
        if exe is None:
            self.note = "nvidia-smi not found"
            return
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
        import torch

        target = visible or str(torch.cuda.current_device())
        cmd = [exe, "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits", "-i", target, "-lms", str(period_ms)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8")
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            parts = [p.strip() for p in line.split(",")]
            try:
                self.samples.append((time.perf_counter(), float(parts[0]), float(parts[1])))
            except (ValueError, IndexError):
                self.note = f"unparsed nvidia-smi line {line.strip()!r}"

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            if self.proc.returncode not in (0, -15, None) and not self.samples:
                self.note = f"nvidia-smi failed: {self.proc.stderr.read().strip() if self.proc.stderr else ''}"

    def busy(self, t0: float, t1: float) -> float:
        inside = [u for t, u, _ in self.samples if t0 <= t <= t1]
        return statistics.fmean(inside) if inside else float("nan")


def run_phase(name: str, fit, task_cls, count_items, device, steps: int) -> dict[str, Any]:
    """Run ``fit()`` with ``task_cls.batches`` timed; GPU sampled when on CUDA."""
    import torch

    timer = BatchTimer(count_items)
    original = task_cls.batches

    def timed_batches(self, *args, **kwargs):
        return timer.wrap(original(self, *args, **kwargs))

    sampler = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        sampler = GpuSampler()
    task_cls.batches = timed_batches
    started = time.perf_counter()
    try:
        fit()
    finally:
        task_cls.batches = original
        if device.type == "cuda":
            torch.cuda.synchronize()
        ended = time.perf_counter()
        if sampler is not None:
            sampler.stop()
    warm = max(10, steps // 5) if steps > 20 else min(1, max(steps - 1, 0))
    # the phase's last step ends when the trainer leaves its loop; the trainer then saves, and a
    # fine-tuning run predicts: those are not steps, so the step window closes at the last
    # batch request plus the median step (a bounded, honest estimate of the last step's length)
    req = timer.requested
    last = req[-1] + (statistics.median([b - a for a, b in itertools.pairwise(req)]) if len(req) > 1 else 0.0) if req else ended
    stats = timer.summary(min(last, ended), warm)
    stats.update(name=name, wall_s=ended - started, warm=warm)
    stats["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    stats["busy_pct"] = sampler.busy(stats["t0"], last) if sampler is not None else float("nan")
    stats["note"] = sampler.note if sampler is not None else "CPU: no GPU busy % or GPU memory"
    print(f"  {name}: {stats['steps']} steps in {stats['wall_s']:.1f} s (incl. start-up and saving); steady state "
          f"(after {warm} steps): {stats['items_per_s']:.1f} items/s, {stats.get('step_ms', float('nan')):.1f} ms/step, "
          f"data wait {100 * stats['wait_share']:.1f} % of step time, GPU busy {stats['busy_pct']:.0f} %, "
          f"peak GPU memory {stats['peak_gib']:.2f} GiB" + (f" ({stats['note']})" if stats["note"] else ""), flush=True)
    return stats


# -- phases -----------------------------------------------------------------------------------


def pretrain_settings(scale: str, steps: int, workers: int, compile_: bool) -> dict[str, Any]:
    import yaml

    from medclust.train.recipes import resolve_settings

    with open(REPO / "config" / "pretrain_gpu.yaml", encoding="utf-8") as f:
        s = dict(yaml.safe_load(f)["pretrain"])
    s.pop("methods", None)
    if scale == "tiny":
        s.update(backbone="resnet10", d_model=32, proj_dim=16, heads=2, layers=1, k_2d=16, k_3d=4, queue_length=0,
                 queue_length_3d=0, s_max=4, batch_size_2d=16, batch_size_3d=2, view_size=[32, 32], volume_size=[32, 32])
    s.update(steps=steps, num_workers=workers, compile=compile_, amp=True, freeze_prototypes_steps=min(s["freeze_prototypes_steps"], steps // 2),
             warmup_steps=min(s["warmup_steps"], steps // 2), checkpoint_every=max(steps, 1), log_every=max(1, min(20, steps)),
             progress=False, tensorboard=False, probe_every=0)
    # the recipe's feature queues assume a large dataset; a queue larger than the synthetic
    # pool only warns, and is used once full (after queue_length / batch steps): keep it
    return resolve_settings(s)


def finetune_settings(scale: str, steps: int) -> dict[str, Any]:
    gpu = {"backbone": "resnet18", "batch_size": 32, "patch_size": None, "context_slices": 2,
           "decoder_channels": [256, 128, 64, 32, 16], "val_max_slices": 64, "predict_batch_size": 64}
    tiny = {"backbone": "resnet10", "batch_size": 4, "patch_size": [32, 32], "context_slices": 1, "decoder_channels": [16, 16, 8, 8, 8]}
    return {
        **(tiny if scale == "tiny" else gpu),
        "task": "phantom_organs", "type": "segmentation", "dataset": "phantom", "split": "slabs",
        "label_groups": [["disc", [3]], ["square", [7]]],
        "slabs": {"blocks": 2, "val_fraction": 0.2, "test_fraction": 0.2, "gap_mm": 8.0},
        "steps": steps, "lr": 1e-3, "warmup_steps": min(10, steps // 2), "eval_every": max(steps, 1),
        "log_every": max(1, min(25, steps)), "checkpoint_every": max(steps, 1), "amp": True, "compile": False,
        "tensorboard": False, "progress": False,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    ap.add_argument("--require-cuda", action="store_true", help="exit with status 2 when CUDA is not available")
    ap.add_argument("--steps", type=int, default=None, help="pretraining steps per phase (default 300 on CUDA, 3 on CPU)")
    ap.add_argument("--finetune-steps", type=int, default=None, help="fine-tuning steps (default 300 on CUDA, 3 on CPU)")
    ap.add_argument("--compile", choices=["both", "on", "off"], default=None, help="default: both on CUDA, off on CPU")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the recipe's 12, at most CPUs - 2; 1 on CPU)")
    ap.add_argument("--volumes", type=int, default=None, help="synthetic pretraining volumes (default 48 on CUDA)")
    ap.add_argument("--slices", type=int, default=None, help="slices per synthetic volume (default 128 on CUDA)")
    ap.add_argument("--keep", default=None, help="keep the data and run folders here (default: a temporary folder)")
    args = ap.parse_args()

    t_start = time.perf_counter()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the trainer picks CUDA whenever it sees one
    import torch

    cuda = torch.cuda.is_available()
    if args.require_cuda and not cuda:
        fail(f"FAILED: --require-cuda but torch {torch.__version__} sees no CUDA device "
             f"(built for CUDA {torch.version.cuda}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')})", 2)
    if args.device == "cuda" and not cuda:
        fail("FAILED: --device cuda but CUDA is not available", 2)
    if args.device == "auto" and not cuda:
        fail("CUDA is not available: nothing measured (this is a GPU check; --device cpu runs it as a tiny CPU smoke test)", 3)
    device = torch.device("cuda" if args.device in ("auto", "cuda") else "cpu")
    scale = "gpu" if device.type == "cuda" else "tiny"
    steps = args.steps if args.steps is not None else (300 if scale == "gpu" else 3)
    ft_steps = args.finetune_steps if args.finetune_steps is not None else (300 if scale == "gpu" else 3)
    compile_modes = {"both": [False, True], "on": [True], "off": [False]}[args.compile or ("both" if scale == "gpu" else "off")]
    cpus = os.cpu_count() or 2
    workers = args.workers if args.workers is not None else (max(1, min(12, cpus - 2)) if scale == "gpu" else 1)
    volumes = args.volumes or (48 if scale == "gpu" else 4)
    slices = args.slices or (128 if scale == "gpu" else 12)
    size = 96 if scale == "gpu" else 32

    from medclust.data.pretrain_datasets import collect_cases
    from medclust.train import Trainer, TrainerConfig
    from medclust.train.recipes import PretrainTask
    from medclust.train.recipes.finetune import FinetuneTask, run_finetune

    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"gpu_check: {name}, torch {torch.__version__}, {cpus} CPUs, {workers} loader workers, scale {scale}; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="medclust_gpu_check_"))
    root.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    try:
        t0 = time.perf_counter()
        stores = pretrain_stores(root / "pretrain_data", volumes, slices, size)
        ft_store = finetune_store(root / "finetune_data", 4, 48 if scale == "gpu" else 24, size)
        print(f"  data: {volumes} x {slices} slices of {size}x{size} for pretraining, 4 phantom volumes for fine-tuning "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)
        cases = collect_cases(stores)
        for compiled in compile_modes:
            s = pretrain_settings(scale, steps, workers, compiled)
            task = PretrainTask("joint", s, cases)
            phase = "pretrain+compile" if compiled else "pretrain"
            out = root / phase
            trainer = Trainer(TrainerConfig.from_dict({**s, "max_steps": steps}), out, out / "checkpoint")
            results[phase] = run_phase(phase, lambda trainer=trainer, task=task: trainer.fit(task), PretrainTask,
                                       task.batch_size, device, steps)
        ft = finetune_settings(scale, ft_steps)
        results["finetune"] = run_phase(
            "finetune", lambda: run_finetune(ft, ft_store, root / "finetune", "none", 1.0, 0), FinetuneTask,
            lambda batch: int(batch["image"].shape[0]), device, ft_steps,
        )
        scored = json.loads((root / "finetune" / "metrics.json").read_text(encoding="utf-8"))
        metric = scored.get("primary_metric")
        print(f"  finetune test score ({metric}): {scored.get('metrics', {}).get(metric, float('nan')):.3f}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(f"gpu_check: done in {time.perf_counter() - t_start:.0f} s; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    def get(phase: str, key: str, scale_by: float = 1.0, fmt: str = ".1f") -> str:
        value = results.get(phase, {}).get(key, float("nan"))
        return format(value * scale_by, fmt)

    peak = max((r["peak_gib"] for r in results.values()), default=float("nan"))
    print(f"pretrain_items_per_s={get('pretrain', 'items_per_s')} compiled_items_per_s={get('pretrain+compile', 'items_per_s')} "
          f"finetune_items_per_s={get('finetune', 'items_per_s')} gpu_busy_pct={get('pretrain', 'busy_pct', fmt='.0f')} "
          f"compiled_gpu_busy_pct={get('pretrain+compile', 'busy_pct', fmt='.0f')} peak_mem_gib={peak:.2f} "
          f"data_wait_share={get('pretrain', 'wait_share', fmt='.3f')} compiled_data_wait_share={get('pretrain+compile', 'wait_share', fmt='.3f')}")


if __name__ == "__main__":
    main()
