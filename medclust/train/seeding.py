"""Deterministic seeding: global RNGs, derived per-item seeds, DataLoader workers, RNG snapshots.

A run must be reproducible given its seed, and a resumed run must continue the exact random
stream of the run it replaces. Three pieces make that work:

- :func:`seed_everything` seeds ``random``, NumPy, torch (all devices) and MONAI once;
- :func:`derive_seed` turns ``(seed, epoch, index, ...)`` into an independent 32-bit seed, so a
  data item's augmentation depends only on those numbers (not on which worker drew it, how many
  workers there are, or how many batches were skipped on resume);
- :func:`rng_state` / :func:`set_rng_state` snapshot the global generators as tensors and plain
  types, so checkpoints load with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import threading
from types import FrameType
from typing import Any

import numpy as np
import torch
from monai.utils import set_determinism

__all__ = ["derive_seed", "loader_generator", "rng_state", "seed_everything", "set_rng_state", "shield_worker_from_preemption", "worker_init_fn"]


def derive_seed(*parts: int) -> int:
    """A 32-bit seed determined by ``parts`` (e.g. ``(seed, epoch, item_index)``).

    Uses NumPy's ``SeedSequence`` hashing, so nearby inputs give statistically independent seeds.

    Args:
        parts: non-negative integers.

    Returns:
        An integer in ``[0, 2**32)``.
    """
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed ``random``, NumPy, torch (CPU and CUDA) and MONAI's global state.

    Args:
        seed: the run's seed.
        deterministic: also ask torch for deterministic algorithms (slower on GPU; CPU kernels
            used here are deterministic already).
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    set_determinism(seed=seed % 2**32, use_deterministic_algorithms=deterministic or None)
    torch.manual_seed(seed)
    # set_determinism also forces deterministic cuDNN kernels; only keep that when asked for.
    # cudnn.benchmark stays off: encoder batch sizes vary (real slices per step), so autotuning
    # would re-run on most steps
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = False


def loader_generator(seed: int, epoch: int = 0) -> torch.Generator:
    """A torch generator for a DataLoader's shuffling and worker base seed, fixed by (seed, epoch).

    Passing it keeps the DataLoader from drawing from the global torch RNG, which would make the
    model's random stream depend on how many epochs (or resumed partial epochs) preceded it.
    """
    gen = torch.Generator()
    gen.manual_seed(derive_seed(seed, epoch, 0x10ADE7))
    return gen


def worker_init_fn(worker_id: int) -> None:
    """Seed ``random`` and NumPy in a DataLoader worker and set its signal policy.

    torch seeds each worker with ``base_seed + worker_id`` (base seed from the loader's
    generator) but leaves ``random`` and NumPy alone; without this, forked workers share them.
    Signals: see :func:`shield_worker_from_preemption`.
    """
    shield_worker_from_preemption()
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(derive_seed(seed, worker_id))


def shield_worker_from_preemption() -> None:
    """In a loader worker: survive a job-wide SIGTERM/SIGUSR1, but obey SIGTERM from the parent.

    SLURM signals every process of a job. A worker dying on that SIGTERM would make torch raise
    in the main process (its SIGCHLD handler) before the trainer can finish the step and save a
    checkpoint, so job-wide SIGTERM and SIGUSR1 are ignored here. The main process's own
    SIGTERM, though, is how ``multiprocessing`` stops workers that are still running when it
    exits (e.g. after an error): a worker ignoring that one keeps the interpreter waiting in
    ``join()`` forever. A thread therefore takes SIGTERM with ``sigwaitinfo`` (which tells who
    sent it) and exits the worker only when the sender is the parent.
    """
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    parents = {os.getppid()} | ({parent.pid} if parent is not None and parent.pid else set())
    if not hasattr(signal, "sigwaitinfo"):  # not Linux: no sender information, keep the old policy
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return
    # not SIG_IGN: an ignored signal is discarded and never reaches sigwaitinfo; a no-op handler
    # covers a thread that does not block it
    signal.signal(signal.SIGTERM, _ignore_signal)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_exit_on_parent_sigterm, args=(frozenset(parents),), name="medclust-sigterm", daemon=True).start()


def _ignore_signal(signum: int, frame: FrameType | None) -> None:  # noqa: ARG001 - signal API
    pass


def _exit_on_parent_sigterm(parents: frozenset[int]) -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid in parents:
            os._exit(128 + signal.SIGTERM)  # what a SIGTERM death reports; nothing to flush in a worker


def rng_state() -> dict[str, Any]:
    """Snapshot of every global generator as tensors and plain types (``weights_only``-safe)."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": int(py_version), "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore generators from :func:`rng_state` (keys that are absent are left alone)."""
    if "python" in state:
        py = state["python"]
        random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    if "numpy" in state:
        npy = state["numpy"]
        keys = npy["keys"].numpy().astype(np.uint32)
        np.random.set_state((npy["name"], keys, npy["pos"], npy["has_gauss"], npy["gauss"]))
    if "torch" in state:
        torch.set_rng_state(state["torch"].to(torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.to(torch.uint8) for s in cuda_states])
