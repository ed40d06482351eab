"""The learning monitor: probe the encoder during pretraining, next to its random initialisation.

Every ``probe_every`` steps and at the last step, :class:`LearningMonitor` embeds the probe set
(:mod:`medclust.data.probe_set`) with the current encoder (eval mode, no gradients, its own
random state saved and restored, so the training trajectory is exactly the one without the
monitor) and runs the cross-validated kNN and linear probes of :mod:`medclust.evaluate.probes`.
The same probes of the method's seeded random initialisation (the ``none`` method's encoder: the
model is rebuilt with the run's seed) are computed once and logged beside them:

- ``metrics.csv`` / TensorBoard: ``probe/<label>/<knn|linear>`` and ``probe_random/<label>/<knn|linear>``;
- ``metrics.csv`` / TensorBoard: ``rank/<dataset>`` and ``rank_random/<dataset>``, the effective
  rank of each dataset's probe features (:mod:`medclust.evaluate.collapse`): a rank that falls far
  below the random encoder's says the objective is being met by a few coarse cues (dimensional
  collapse), which is what a probe below random init usually means;
- ``provenance.json`` (:meth:`LearningMonitor.summary`): final scores, random-init scores, their
  gap, the final and random effective ranks, the protocol and how many items, cases and units
  each probe used.
"""

from __future__ import annotations

import copy
import csv
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medclust.data.pretrain_datasets import PretrainCase
from medclust.data.probe_set import ProbeSet, build_probe_set
from medclust.errors import MedclustError
from medclust.evaluate.cluster_quality import cluster_quality
from medclust.evaluate.collapse import dataset_ranks
from medclust.evaluate.probes import ProbeResult, ProbeSettings, run_probes
from medclust.io.atomic import atomic_path
from medclust.train.seeding import rng_state, seed_everything, set_rng_state

__all__ = ["FEATURES", "LearningMonitor", "build_monitor", "finish_monitor", "probe_row", "rank_row"]

log = logging.getLogger("medclust.monitor")

#: what is probed: ``backbone`` = the pooled, L2-normalised stage features of the exported
#: ResNet encoder (what fine-tuning receives); ``embedding`` = the SliceEncoder's d_model output
FEATURES = ("backbone", "embedding")


def probe_row(results: Mapping[str, ProbeResult], prefix: str = "probe") -> dict[str, float]:
    """``{prefix/<label>/knn: ..., prefix/<label>/linear: ...}`` for metrics.csv and TensorBoard."""
    row = {}
    for label, result in results.items():
        row[f"{prefix}/{label}/knn"] = float(result.knn)
        row[f"{prefix}/{label}/linear"] = float(result.linear)
    return row


def _finite_or_none(value: float | None) -> float | None:
    """JSON has no NaN: a value that could not be computed is null."""
    return float(value) if value is not None and np.isfinite(value) else None


def rank_row(ranks: Mapping[str, float], prefix: str = "rank") -> dict[str, float]:
    """``{prefix/<dataset>: effective rank}`` for metrics.csv and TensorBoard."""
    return {f"{prefix}/{name}": float(value) for name, value in ranks.items()}


class LearningMonitor:
    """Probe a model's encoder at fixed steps against the probes of its random initialisation.

    Args:
        probe_set: the items and their free labels.
        settings: probe protocol and classifier settings.
        every: probe every this many steps (0 = only at ``final_step``).
        final_step: the run's last step (always probed).
        random_model: builds the method's seeded random initialisation (called once, lazily; the
            global random state is restored afterwards).
        features: one of :data:`FEATURES`.
        bn_stats: ``probe_set`` (re-estimate BatchNorm statistics on the probe items) or ``running``.
        chunk: images per forward pass.
    """

    def __init__(
        self,
        probe_set: ProbeSet,
        settings: ProbeSettings,
        every: int,
        final_step: int,
        random_model: Callable[[], nn.Module],
        features: str = "backbone",
        bn_stats: str = "probe_set",
        chunk: int = 256,
    ) -> None:
        if features not in FEATURES:
            raise MedclustError(f"pretrain.probe.features: {features!r} is not one of {', '.join(FEATURES)}")
        if bn_stats not in ("probe_set", "running"):
            raise MedclustError(f"pretrain.probe.bn_stats: {bn_stats!r} is not one of probe_set, running")
        self.bn_stats = bn_stats
        self.probe_set = probe_set
        self.settings = settings
        self.every = int(every)
        self.final_step = int(final_step)
        self.random_model = random_model
        self.features = features
        self.chunk = int(chunk)
        self.seconds = 0.0
        self.calls = 0
        self._random: dict[str, ProbeResult] | None = None
        self._random_ranks: dict[str, float] = {}
        self.last: tuple[int, dict[str, ProbeResult]] | None = None
        #: effective rank per dataset of the features the last :meth:`probe` call embedded
        self.ranks: dict[str, float] = {}

    def _features(self, encoder: nn.Module, device: torch.device, kind: str) -> torch.Tensor:
        out = []
        n = len(self.probe_set)
        # equal-sized chunks: each counts the same in the cumulative BatchNorm statistics
        for idx in np.array_split(np.arange(n), max(1, -(-n // self.chunk))):
            x = self.probe_set.images[torch.from_numpy(idx), None].to(device)
            # stage_features bypasses a torch.compile'd forward (no recompilation for eval mode)
            f = torch.cat(encoder.stage_features(x), dim=1)
            out.append((f if kind == "backbone" else encoder.proj(f)).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, 0)

    @torch.no_grad()
    def embed(self, model: nn.Module, features: str | None = None) -> torch.Tensor:
        """(N, F) features of the probe set under ``model``'s encoder (float32, CPU), in eval mode.

        ``features`` (one of :data:`FEATURES`) overrides the monitor's own choice.

        With ``bn_stats="probe_set"`` a copy of the encoder normalises with the BatchNorm
        statistics of the probe items (estimated in a first pass when they take more than one
        chunk, equal weight per chunk), so that a trained and a
        random encoder are compared by their weights only: a random encoder's initial statistics
        (mean 0, variance 1) make its features nearly collinear, a baseline too weak to mean
        anything. ``"running"`` uses the encoder's own running statistics. The model itself is
        never changed.
        """
        kind = features or self.features
        encoder = getattr(model, "_orig_mod", model).encoder
        device = next(encoder.parameters()).device
        if self.bn_stats == "probe_set":
            encoder = copy.deepcopy(getattr(encoder, "_orig_mod", encoder))
            norms = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            for m in norms:
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the passes
            encoder.train()
            features = self._features(encoder, device, kind)
            if len(self.probe_set) <= self.chunk:
                return features  # one batch: train-mode BatchNorm normalised with the probe set's own statistics
            encoder.eval()
            return self._features(encoder, device, kind)
        was_training = encoder.training
        encoder.eval()
        try:
            return self._features(encoder, device, kind)
        finally:
            encoder.train(was_training)

    def _probe(self, model: nn.Module) -> tuple[dict[str, ProbeResult], dict[str, float]]:
        started = time.perf_counter()
        saved = rng_state()
        try:
            ps = self.probe_set
            features = self.embed(model)
            results = run_probes(features, ps.targets, ps.case, ps.z_mm, ps.dataset, self.settings)
            ranks = dataset_ranks(features, ps.dataset)
        finally:
            set_rng_state(saved)
        self.seconds += time.perf_counter() - started
        self.calls += 1
        return results, ranks

    def probe(self, model: nn.Module) -> dict[str, ProbeResult]:
        """Run every probe on ``model``'s encoder (random state untouched); its ranks go to :attr:`ranks`."""
        results, self.ranks = self._probe(model)
        return results

    @torch.no_grad()
    def clustering(self, model: nn.Module, own_assignments: bool, seed: int = 0) -> dict[str, Any]:
        """Clustering metrics of ``model`` on the probe set (:func:`~medclust.evaluate.cluster_quality.cluster_quality`).

        Args:
            model: the (joint) model.
            own_assignments: also score the model's own clusters, the argmax of its 2D
                prototype scores (methods with a cluster head).
            seed: k-means seed.
        """
        saved = rng_state()
        try:
            assignments = None
            if own_assignments:
                jm = getattr(model, "_orig_mod", model)
                device = next(jm.parameters()).device
                emb = self.embed(model, "embedding").to(device)
                assignments = jm.prototypes_2d(jm.project_2d(emb)).argmax(dim=1).cpu().numpy()
            return cluster_quality(self.embed(model), self.probe_set.targets, assignments, seed)
        finally:
            set_rng_state(saved)

    def random_results(self, device: torch.device | None = None) -> dict[str, ProbeResult]:
        """The probes of the seeded random initialisation (computed once)."""
        if self._random is None:
            started = time.perf_counter()
            saved = rng_state()
            try:
                model = self.random_model()
            finally:
                set_rng_state(saved)
            if device is not None:
                model = model.to(device)
            self.seconds += time.perf_counter() - started
            self._random, self._random_ranks = self._probe(model)
            del model
        return self._random

    def random_ranks(self) -> dict[str, float]:
        """Effective ranks of the random initialisation's features (after :meth:`random_results`)."""
        self.random_results()
        return dict(self._random_ranks)

    def set_random_results(self, results: dict[str, ProbeResult], ranks: Mapping[str, float] | None = None) -> None:
        """Use ``results`` (and ``ranks``) as the random init's (a run that trained nothing probed its own init)."""
        self._random = dict(results)
        self._random_ranks = dict(ranks or {})

    def due(self, step: int) -> bool:
        """Whether ``step`` is a probing step."""
        return step == self.final_step or (self.every > 0 and step > 0 and step % self.every == 0)

    def __call__(self, model: nn.Module, step: int) -> dict[str, float] | None:
        """The trainer's monitor hook: probe scores (and the random baseline) at probing steps."""
        if not self.due(step):
            return None
        device = next(getattr(model, "_orig_mod", model).parameters()).device
        random = self.random_results(device)
        results = self.probe(model)
        self.last = (step, results)
        log.info("step %d probes: %s", step, self.describe(results, random, self.ranks, self._random_ranks))
        return {
            **probe_row(results),
            **probe_row(random, "probe_random"),
            **rank_row(self.ranks),
            **rank_row(self._random_ranks, "rank_random"),
        }

    @staticmethod
    def describe(
        results: Mapping[str, ProbeResult],
        random: Mapping[str, ProbeResult],
        ranks: Mapping[str, float] | None = None,
        random_ranks: Mapping[str, float] | None = None,
    ) -> str:
        """One log line: ``label knn/linear (random knn/linear)`` per probe, then effective ranks."""
        parts = []
        for label, r in results.items():
            b = random.get(label)
            base = f" (random {b.knn:.3f}/{b.linear:.3f})" if b is not None else ""
            parts.append(f"{label} {r.knn:.3f}/{r.linear:.3f}{base}")
        for name, value in (ranks or {}).items():
            b = (random_ranks or {}).get(name)
            parts.append(f"rank {name} {value:.1f}" + (f" (random {b:.1f})" if b is not None else ""))
        return "; ".join(parts) or "nothing to probe"

    def summary(self, results: Mapping[str, ProbeResult], step: int, training_seconds: float | None = None) -> dict[str, Any]:
        """Final probes, random-init probes and their gap, with the protocol and counts (provenance).

        Args:
            results: the final probes.
            step: the step they were taken at.
            training_seconds: wall time of the training loop, to report the monitor's share.

        Returns:
            A JSON-ready dict.
        """
        random = self.random_results()
        labels = {}
        for label, r in results.items():
            b = random.get(label)
            entry = r.as_dict()
            entry["random_knn"] = b.knn if b is not None else float("nan")
            entry["random_linear"] = b.linear if b is not None else float("nan")
            entry["gap_knn"] = r.knn - entry["random_knn"]
            entry["gap_linear"] = r.linear - entry["random_linear"]
            labels[label] = {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in entry.items()}
        out: dict[str, Any] = {
            "step": int(step),
            "features": self.features,
            "every": self.every,
            "protocol": {
                **asdict(self.settings),
                "items": (
                    "slices and radiographs of the pretraining cases (train and val splits; never test): the free "
                    "labels need no annotation and pretraining uses no labels, so train-split images are legitimate "
                    "probe items; neighbouring slices are never fitted and scored together (gap_mm)"
                ),
            },
            "probe_set": self.probe_set.describe(),
            "labels": labels,
            "effective_rank": {
                name: {"final": _finite_or_none(value), "random": _finite_or_none(self._random_ranks.get(name))}
                for name, value in self.ranks.items()
            },
            "seconds": round(self.seconds, 2),
            "probe_runs": self.calls,
        }
        if training_seconds and training_seconds > self.seconds:
            # the monitor's cost relative to the training it watches (its time is inside training_seconds)
            out["overhead_vs_training"] = round(self.seconds / (training_seconds - self.seconds), 4)
        return out


# -- wiring into a pretraining run -------------------------------------------------------------------


def _label_names(name: str, datasets: Mapping[str, Mapping[str, Any]]) -> dict[int, str]:
    """Label names of a dataset entry; simulated radiographs use their source CT's names."""
    from medclust.train.recipes.finetune import dataset_label_names  # the recipes import the trainer: load on use

    entry = dict(datasets.get(name) or {})
    if entry.get("format") == "drr" and entry.get("source") in datasets and not entry.get("label_names"):
        entry = dict(datasets[entry["source"]])
    return dataset_label_names(entry)


def build_monitor(
    settings: Mapping[str, Any],
    cases: Sequence[PretrainCase],
    build_model: Callable[[], nn.Module],
    final_step: int,
    datasets: Mapping[str, Mapping[str, Any]] | None = None,
) -> LearningMonitor | None:
    """The learning monitor of a pretraining run, or None (``probe.enabled: false``, or not rank 0).

    Args:
        settings: resolved ``pretrain`` settings (``probe_every``, ``probe``, ``view_size``, ``seed``).
        cases: the run's pretraining cases (train/val).
        build_model: builds the method's model; called after seeding with the run's seed, it
            gives the seeded random initialisation (the trainer seeds the same way).
        final_step: the run's last step (0 for ``none``).
        datasets: the config's ``datasets`` entries (``body_region``, ``probe_structures``,
            label names); None = no body-region and structure probes.

    Returns:
        The monitor.
    """
    probe = settings["probe"]
    if not probe["enabled"] or int(os.environ.get("RANK", "0")) != 0:
        return None
    datasets = dict(datasets or {})
    names = dict.fromkeys(c.dataset for c in cases)
    structures = {d: (datasets.get(d) or {}).get("probe_structures") for d in names}
    probe_set = build_probe_set(
        cases,
        settings["view_size"],
        max_items=probe["max_items"],
        max_slices_per_case=probe["max_slices_per_case"],
        z_bins=probe["z_bins"],
        min_pixels=probe["min_pixels"],
        body_region={d: (datasets.get(d) or {}).get("body_region") for d in names},
        structures=structures,
        label_names={d: _label_names(d, datasets) for d in names if structures.get(d)},
        labels=probe["labels"],
    )
    seed, deterministic = int(settings.get("seed", 0)), bool(settings.get("deterministic", False))

    def random_model() -> nn.Module:
        seed_everything(seed, deterministic)  # as Trainer.fit does before building the model
        return build_model()

    log.info("learning monitor: %d probe items (%s)", len(probe_set), ", ".join(f"{d}: {v['items']}" for d, v in probe_set.describe().items()))
    return LearningMonitor(
        probe_set, ProbeSettings.from_dict(probe), settings["probe_every"], final_step, random_model, features=probe["features"]
    )


def finish_monitor(
    monitor: LearningMonitor,
    model: nn.Module,
    step: int,
    metrics_csv: str | os.PathLike[str],
    metric_columns: Sequence[str],
    training_seconds: float,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Final probes of a finished run (reused from the last step when taken there) for provenance.

    A run that trained nothing (``none``) gets its probes as the one row of ``metrics_csv``
    (its columns: ``metric_columns`` then the probe columns); its final probes are its random
    baseline.

    Args:
        monitor: the run's monitor.
        model: the final model.
        step: the run's last step.
        metrics_csv: the run's ``metrics.csv``.
        metric_columns: the training columns of ``metrics.csv`` (header of an untrained run).
        training_seconds: wall time of the training call (for the monitor's overhead).
        device: where to embed when the probes must be recomputed.

    Returns:
        :meth:`LearningMonitor.summary`.
    """
    if monitor.last is not None and monitor.last[0] == step:
        results = monitor.last[1]
    elif step == 0:  # nothing was trained: the model is its own random initialisation
        results = monitor.probe(model)
        monitor.set_random_results(results, monitor.ranks)
        row = {
            **probe_row(results),
            **probe_row(results, "probe_random"),
            **rank_row(monitor.ranks),
            **rank_row(monitor.ranks, "rank_random"),
        }
        columns = list(metric_columns) + list(row)
        with atomic_path(Path(metrics_csv)) as tmp:
            with open(tmp, "w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=columns, restval="")
                writer.writeheader()
                writer.writerow({"step": 0, **{k: f"{v:.6g}" for k, v in row.items()}})
    else:  # a rerun after the last step (e.g. export failed): the row is in metrics.csv already
        results = monitor.probe(model.to(device) if device is not None else model)
    summary = monitor.summary(results, step, training_seconds)
    log.info(
        "final probes at step %d: %s",
        step,
        monitor.describe(results, monitor.random_results(), monitor.ranks, monitor.random_ranks()),
    )
    return summary
