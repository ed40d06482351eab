"""Pretraining recipe: the joint 2D/3D intra-inter contrastive clustering task and its baselines.

Methods (config ``pretrain.methods``; names and their 2D objectives: :mod:`.pretrain_methods`,
the objectives' glue: :mod:`.pretrain_objectives`):

- ``joint`` — ``w_intra * L_intra + w_inter * L_inter + w_mask * L_mask`` in one run. L_intra
  is SwAV between two views of every 2D item (slices and radiographs); L_inter is SwAV between
  two views of every volume at the volume-embedding level (own prototypes); L_mask predicts the
  stop-gradient slice embeddings of masked slice tokens. ``warmup_2d_steps`` stages it (2D
  objective only first), as the paper's separate stages did.
- ``swav2d`` — the 2D SwAV objective only.
- ``deepcluster2d`` — DeepCluster-v2: a memory bank of 2D embeddings, spherical k-means once per
  epoch, prototypes set to the centroids, cross-entropy to the assignments.
- ``none`` — the seeded random initialisation, not trained (the study's baseline).

Cost control of the 3D branch: both views of a volume go through the slice encoder in the same
pass as the 2D items (one call when the sizes match) and only kept, non-padded slices are
encoded. The two views' z windows overlap on a shared slice grid, so a slice kept by both views
is also a 2D item with two views: with ``volume_slices_in_2d`` those embeddings feed L_intra too
and take their share of ``batch_size_2d`` (a joint step draws ``batch_size_2d - batch_size_3d *
s_max`` other 2D items), so a joint step encodes no more images than a swav2d step and the 3D
objectives cost little beyond the slice attention. The masked objective's targets are the (stop-gradient)
slice embeddings of that same pass, and one masked attention pass serves both the masked and
the inter objective (masking doubles as a volume-level augmentation).

Settings and the model they build live in :mod:`.pretrain_settings`, the embedding export in
:mod:`.pretrain_export`; this module is the training task and the run.

Outputs of :func:`run_pretraining` in ``out_dir``: ``metrics.csv`` and ``tensorboard/`` (by the
trainer), ``embeddings.npz``, ``provenance.json``, ``clustering.json`` (NMI / ARI / Hungarian
accuracy against the free labels, :mod:`medclust.evaluate.cluster_quality`), ``slice_encoder.pt`` and, written last,
``encoder.pt`` (the MONAI ``ResNetEncoder`` state dict that ``FlexibleUNet(...).encoder`` loads
with ``strict=True``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from medclust.data.augment import AugmentSettings
from medclust.data.pretrain_datasets import CaseArrays, PretrainBatches, PretrainCase, collect_cases, item_table, plan_epoch, volume_table
from medclust.errors import MedclustError
from medclust.evaluate.cluster_quality import probe_scores
from medclust.io.atomic import atomic_path, publish_together, save_torch_atomic, staged_path, write_json_atomic
from medclust.losses import Agreement3DLoss, DeepClusterLoss, MaskedEmbeddingLoss, MemoryBank
from medclust.models import JointModel, SliceEncoder, normalize_prototypes_
from medclust.provenance import write_provenance
from medclust.train.distributed import DistContext
from medclust.train.monitor import LearningMonitor, build_monitor, finish_monitor
from medclust.train.recipes.pretrain_export import export_cases, export_embeddings
from medclust.train.recipes.pretrain_methods import OBJECTIVE_SECTIONS, cluster_head, is_joint, objective_of
from medclust.train.recipes.pretrain_objectives import Objective2D, build_objective
from medclust.train.recipes.pretrain_settings import (
    METHODS,
    METRIC_COLUMNS,
    RUNTIME_KEYS,
    THREE_D_KEYS,
    build_joint_model,
    resolve_settings,
    warn_on_assignment_sizes,
)
from medclust.train.seeding import derive_seed, loader_generator, worker_init_fn
from medclust.train.trainer import Trainer, TrainerConfig

__all__ = [
    "METHODS",
    "THREE_D_KEYS",
    "PretrainTask",
    "build_joint_model",
    "export_embeddings",
    "resolve_settings",
    "run_pretraining",
]

log = logging.getLogger("medclust.pretrain")


class PretrainTask:
    """A :class:`~medclust.train.TrainTask` for one pretraining method.

    Args:
        method: ``joint``, ``swav2d``, ``deepcluster2d`` or ``none``.
        settings: resolved ``pretrain`` settings (:func:`resolve_settings`).
        cases: the cases to train on.
        arrays: their slices (built from ``cases`` when not given).
    """

    def __init__(self, method: str, settings: Mapping[str, Any], cases: Sequence[PretrainCase], arrays: CaseArrays | None = None) -> None:
        if method not in METHODS:
            raise MedclustError(f"pretrain: unknown method {method!r}; choose one of {', '.join(METHODS)}")
        self.method = method
        self.s = dict(settings)
        self.seed = int(self.s.get("seed", 0))
        self.cases = list(cases)
        self.arrays = arrays if arrays is not None else CaseArrays(self.cases, in_memory=self.s["cache_in_memory"])
        self.augment = AugmentSettings.from_dict(self.s["augment"])
        unknown = sorted(set(self.augment.flip_axes) - {c.dataset for c in self.cases})
        if unknown:
            log.warning("pretrain.augment.flip_axes: %s are not among the pretraining datasets; ignored", unknown)
        self.num_items = len(item_table(self.arrays))
        self.uses_3d = is_joint(method) and (self.s["w_inter"] > 0 or self.s["w_mask"] > 0) and self.s["batch_size_3d"] > 0
        self.num_volumes = len(volume_table(self.arrays)) if self.uses_3d else 0
        if self.num_items == 0:
            raise MedclustError("pretrain: the selected datasets and splits hold no images")
        if self.uses_3d and self.num_volumes == 0:
            log.warning("pretrain: no volume (>= 2 slices) among the cases; the joint method trains its 2D objective only")
            self.uses_3d = False
        self.batch_3d = self.s["batch_size_3d"] if self.uses_3d else 0
        warn_on_assignment_sizes(self.s, self.num_items, self.num_volumes if self.uses_3d else 0, self.batch_3d)
        self.reuse_slices = self.uses_3d and bool(self.s["volume_slices_in_2d"])
        # batch_size_2d counts the 2D images of a step; reused volume slices take their share of it,
        # so the joint step encodes no more images than a swav2d step of the same batch_size_2d
        self.batch_2d = self.s["batch_size_2d"] - (self.batch_3d * self.s["s_max"] if self.reuse_slices else 0)
        if self.batch_2d < 2:
            raise MedclustError(
                f"pretrain: batch_size_2d={self.s['batch_size_2d']} must exceed batch_size_3d * s_max = "
                f"{self.batch_3d * self.s['s_max']} (the volume slices are part of the 2D batch); raise it or set "
                "volume_slices_in_2d: false"
            )
        self.context = DistContext()
        t, eps, iters, proj = self.s["temperature"], self.s["epsilon"], self.s["sinkhorn_iterations"], self.s["proj_dim"]
        name = objective_of(method)
        self.objective: Objective2D | None = build_objective(name, self.s) if name not in (None, "deepcluster") else None
        self.agree = Agreement3DLoss(t, eps, iters, queue_length=self.s["queue_length_3d"], feature_dim=proj)
        self.masked = MaskedEmbeddingLoss(self.s["mask_loss"])
        self.dc_loss = DeepClusterLoss(t)
        self.bank: MemoryBank | None = None
        self.assignments: Tensor | None = None
        self._centroids_loaded = False

    # -- TrainTask -------------------------------------------------------------------------------

    def setup(self, context: DistContext) -> None:
        """Keep the device and rank; size the per-rank memory bank."""
        self.context = context
        ws = context.world_size
        b2, b3 = self.batch_2d, self.batch_3d
        if b2 % ws or b3 % ws:
            raise MedclustError(
                f"pretrain: the per-step 2D items ({b2}) and volumes ({b3}) must be divisible by the {ws} training "
                "processes (see batch_size_2d, batch_size_3d, s_max)"
            )
        for module in (self.objective, self.agree):
            if module is not None:
                module.to(context.device)
        if self.method == "deepcluster2d":
            steps = max(1, self.num_items // b2)
            size = self.s["deepcluster"]["memory_size"] or steps * (b2 // ws)
            self.bank = MemoryBank(size, self.s["proj_dim"]).to(context.device)
            self.assignments = torch.full((self.num_items,), -1, dtype=torch.long, device=context.device)

    def build_model(self) -> nn.Module:
        """The joint model; without its volume branch when the method has no 3D objective.

        The encoder is built first either way (then the objective's extra heads), so the seeded
        initialisation (what ``none`` exports) does not depend on the method.
        """
        heads = self.objective.heads if self.objective is not None else None
        return build_joint_model(self.s, volume_branch=self.uses_3d, extra_heads=heads)

    def compile_model(self, model: nn.Module) -> None:
        """``torch.compile`` the encoder and the slice attention in place (the steps call them, not ``model``)."""
        jm = _unwrap(model)
        jm.encoder.compile(dynamic=True)  # the number of real slices encoded varies per step
        if jm.attention is not None:
            jm.attention.compile(dynamic=True)

    def signature(self) -> dict[str, Any]:
        """Settings and data that identify the run (a checkpoint of another run is discarded)."""
        learn = {k: v for k, v in self.s.items() if k not in RUNTIME_KEYS}
        return {"method": self.method, "settings": learn, "cases": [(c.dataset, c.case_id) for c in self.cases]}

    def _plans(self, epoch: int, rank: int, world_size: int) -> list[Any]:
        return plan_epoch(
            self.num_items,
            self.num_volumes,
            self.batch_2d,
            self.batch_3d,
            self.seed,
            epoch,
            rank,
            world_size,
        )

    def batches(self, epoch: int, rank: int, world_size: int, start: int = 0) -> DataLoader:
        """This rank's batches of ``epoch``, from batch ``start`` on (workers build whole batches)."""
        plans = self._plans(epoch, rank, world_size)[start:]
        dataset = PretrainBatches(self.arrays, plans, self.s["view_size"], self.s["volume_size"], self.s["s_max"], self.augment)
        workers = int(self.s["num_workers"])
        return DataLoader(
            dataset,
            batch_size=None,
            shuffle=False,
            num_workers=workers,
            worker_init_fn=worker_init_fn if workers else None,
            generator=loader_generator(self.seed, epoch),
            pin_memory=self.context.device.type == "cuda",
            prefetch_factor=2 if workers else None,
            persistent_workers=False,
        )

    def batch_size(self, batch: Mapping[str, Tensor]) -> int:
        """2D items plus volumes in a batch (the items/s unit)."""
        n = int(batch["views2d"].shape[1]) if "views2d" in batch else 0
        return n + (int(batch["volumes"].shape[1]) if "volumes" in batch else 0)

    @torch.no_grad()
    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        """DeepCluster-v2: (fill the bank on the first epoch,) k-means, prototypes := centroids."""
        if self.method != "deepcluster2d" or self.bank is None:
            return
        jm = _unwrap(model)
        if epoch == 0 and int((self.bank.indices >= 0).sum()) == 0:
            # the first clustering needs embeddings: one forward pass over this epoch's batches
            for batch in self.batches(epoch, self.context.rank, self.context.world_size):
                views = batch["views2d"].to(self.context.device)
                self.bank.add(jm.project_2d(jm.embed_slices(views[0])), batch["index2d"].to(self.context.device))
        dc = self.s["deepcluster"]
        centroids, table = self.bank.cluster(self.s["k_2d"], self.num_items, iterations=dc["kmeans_iterations"], seed=derive_seed(self.seed, epoch, 0xDC))
        jm.prototypes_2d.load_centroids_(centroids)
        self._centroids_loaded = True  # the rows' optimiser state is reset before the next update
        self.assignments = table.to(self.context.device)

    def training_step(self, model: nn.Module, batch: Mapping[str, Tensor], step: int) -> dict[str, Tensor]:
        """One step of the method's objective; returns the total and each term."""
        jm = _unwrap(model)
        # each prototype set is frozen for the first steps of its own objective (the 3D one starts
        # after the 2D warm-up; counted from step 0 it would never freeze when warmup >= freeze)
        freeze = self.s["freeze_prototypes_steps"]
        jm.prototypes_2d.set_frozen(step < freeze)
        if jm.prototypes_3d is not None:
            jm.prototypes_3d.set_frozen(step - self.s["warmup_2d_steps"] < freeze)
        if self.method == "deepcluster2d":
            return self._deepcluster_step(jm, batch)
        views = batch["views2d"]
        n = views.shape[1]
        images = views.flatten(0, 1)  # (2n, 1, h, w): view 1 then view 2
        stage_3d = self.uses_3d and "volumes" in batch and step >= self.s["warmup_2d_steps"]
        if not (stage_3d or (self.reuse_slices and "volumes" in batch)):
            return self._joint_out(self._intra(jm, jm.embed_slices(images), n, images))

        vols, valid, z_mm = batch["volumes"], batch["valid"], batch["z_mm"]
        _, b, s_max, hv, wv = vols.shape
        valid = valid.reshape(2 * b, s_max)
        real = vols.reshape(2 * b, s_max, hv, wv)[valid][:, None]  # (R, 1, hv, wv): padding never encoded
        if images.shape[-2:] == real.shape[-2:]:
            emb = jm.embed_slices(torch.cat([images, real]))
            emb2d, emb_real = emb[: 2 * n], emb[2 * n :]
        else:
            emb2d, emb_real = jm.embed_slices(images), jm.embed_slices(real)
        tokens = emb_real.new_zeros(2 * b, s_max, emb_real.shape[-1]).masked_scatter(valid[..., None], emb_real)
        if self.reuse_slices:
            # a slice both views of a volume kept (in their overlap) is two views of one 2D item
            pair = batch["pair"]
            rows, slots = (pair >= 0).nonzero(as_tuple=True)
            emb2d = torch.cat([emb2d[:n], tokens[:b][rows, slots], emb2d[n:], tokens[b:][rows, pair[rows, slots]]])
            n = n + len(rows)
        intra = self._intra(jm, emb2d, n, images)
        if not stage_3d:  # staged schedule: the 2D objective only, volume slices as 2D items
            return self._joint_out(intra)
        mask = jm.sample_mask(valid) if self.s["w_mask"] > 0 else None
        token_out, volume = jm.embed_volume(tokens, z_mm.reshape(2 * b, s_max), valid, mask)
        scores = jm.prototypes_3d(volume)
        loss_inter = self.agree(scores[:b], scores[b:], volume[:b], volume[b:], jm.prototypes_3d)
        loss_mask = self.masked(jm.predict_masked(token_out), tokens, mask) if mask is not None else loss_inter.new_zeros(())
        return self._joint_out(intra, loss_inter, loss_mask)

    def _intra(self, jm: JointModel, emb2d: Tensor, n: int, images: Tensor) -> dict[str, Tensor]:
        """The method's 2D objective on n two-view items; ``images``: both views of the first of them."""
        assert self.objective is not None  # deepcluster2d has its own step; none never trains
        return self.objective(jm, emb2d, n, images if self.objective.needs_images else None)

    def _joint_out(self, intra: Mapping[str, Tensor], loss_inter: Tensor | None = None, loss_mask: Tensor | None = None) -> dict[str, Tensor]:
        """The total (weighted in joint forms; the 2D objective alone otherwise) and every term."""
        s = self.s
        out = dict(intra)
        loss = s["w_intra"] * out["loss_intra"] if is_joint(self.method) else out["loss_intra"]
        if loss_inter is not None and loss_mask is not None:
            loss = loss + s["w_inter"] * loss_inter + s["w_mask"] * loss_mask
            out.update(loss_inter=loss_inter, loss_mask=loss_mask)
        return {"loss": loss, **out}

    def _deepcluster_step(self, jm: JointModel, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        views, index = batch["views2d"], batch["index2d"]
        n = views.shape[1]
        z = jm.project_2d(jm.embed_slices(views.flatten(0, 1)))
        scores = jm.prototypes_2d(z)
        assert self.assignments is not None and self.bank is not None  # set in setup()
        targets = self.assignments[index]
        loss = 0.5 * (self.dc_loss(scores[:n], targets) + self.dc_loss(scores[n:], targets))
        self.bank.add(z[:n].detach(), index)
        return {"loss": loss, "loss_intra": loss}

    def before_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """DeepCluster-v2: new centroids start with fresh optimiser state.

        The moments that AdamW (or LARS momentum) kept for the prototype rows belong to the
        previous epoch's clusters, whose rows the k-means has just replaced (in another order).
        """
        if self._centroids_loaded:
            optimizer.state.pop(_unwrap(model).prototypes_2d.weight, None)
            self._centroids_loaded = False

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        """Prototypes back on the unit sphere after every update."""
        normalize_prototypes_(_unwrap(model))

    def state_dict(self) -> dict[str, Any]:
        """Queues, memory bank and cluster assignments (this rank's)."""
        state: dict[str, Any] = {"agree": self.agree.state_dict()}
        if self.objective is not None:
            state["objective"] = self.objective.state_dict()
        if self.bank is not None:
            state["bank"] = self.bank.state_dict()
            state["assignments"] = self.assignments
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        if self.objective is not None:
            self.objective.load_state_dict(state["objective"])
        self.agree.load_state_dict(state["agree"])
        if self.bank is not None and "bank" in state:
            self.bank.load_state_dict(state["bank"])
            self.assignments = state["assignments"].to(self.context.device)


def _unwrap(model: nn.Module) -> JointModel:
    """The JointModel behind a ``torch.compile`` wrapper."""
    return getattr(model, "_orig_mod", model)  # type: ignore[return-value]



def _clustering_report(
    method: str, monitor: LearningMonitor | None, model: nn.Module, step: int, probes: Mapping[str, Any] | None, seed: int
) -> dict[str, Any]:
    """``clustering.json``: NMI / ARI / Hungarian accuracy per free label, and the probe scores.

    The method's own clusters are scored where it has a cluster head (not ``none``: random
    prototypes assign nothing the method learned); every method's embedding is clustered by k-means.
    """
    report: dict[str, Any] = {"method": method, "step": int(step)}
    if monitor is None:
        return {**report, "labels": {}, "probes": {}, "note": "pretrain.probe.enabled is false: no probe set, nothing scored"}
    own = cluster_head(method)
    labels = monitor.clustering(model, own_assignments=own, seed=seed)
    return {**report, "features": monitor.features, "probe_set": monitor.probe_set.describe(), "labels": labels, "probes": probe_scores(probes)}


def _save_torch_atomic(obj: Any, path: Path) -> None:
    save_torch_atomic(obj, path)  # a full disk: one line naming the file, not torch's "unexpected pos"


# all outputs appear together at the end: a job killed before leaves none (a plain rerun redoes it)
@publish_together()
def run_pretraining(
    method: str,
    settings: Mapping[str, Any],
    stores: Mapping[str, str | os.PathLike[str]] | Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    checkpoint_dir: str | os.PathLike[str] | None = None,
    datasets: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path | None:
    """Pretrain one method and write its outputs (resuming from ``checkpoint_dir`` if possible).

    Args:
        method: ``joint``, ``swav2d``, ``deepcluster2d`` or ``none``.
        settings: the ``pretrain`` config section (partial is fine: schema defaults fill the
            rest) plus the global ``seed``.
        stores: dataset name -> slice store folder (``results/slices/{dataset}``), or folders.
        out_dir: ``results/pretrain/{method}``.
        checkpoint_dir: default ``out_dir/checkpoint``.
        datasets: the config's ``datasets`` entries, for the learning monitor's free labels
            (``body_region``, ``probe_structures`` and label names; :mod:`medclust.train.monitor`).

    Returns:
        The path of ``encoder.pt`` on rank 0; None on other ranks (they write nothing).

    Raises:
        TrainingInterrupted: SIGTERM/SIGUSR1 during training (checkpoint saved; rerun resumes).
        MedclustError: unknown method, no data, non-finite loss, ...
    """
    if method not in METHODS:
        raise MedclustError(f"pretrain: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    started = time.perf_counter()
    s = resolve_settings(settings)
    # a run depends only on what its method reads: 2D methods on no 3D key, each method on its own
    # objective's section (the others keep their schema defaults); see THREE_D_KEYS
    defaults = resolve_settings({})
    if not is_joint(method):
        s.update({k: defaults[k] for k in THREE_D_KEYS})
    own = OBJECTIVE_SECTIONS.get(objective_of(method) or "")
    s.update({k: defaults[k] for k in OBJECTIVE_SECTIONS.values() if k != own})
    out_dir = Path(out_dir)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else out_dir / "checkpoint"
    cases = collect_cases(stores, s["splits"])
    if not cases:
        raise MedclustError(f"pretrain: no {'/'.join(s['splits'])} cases in the slice stores {list(stores)}")
    counts: dict[str, int] = {}
    for c in cases:
        counts[c.dataset] = counts.get(c.dataset, 0) + 1
    log.info("pretrain %s: %d cases (%s)", method, len(cases), ", ".join(f"{k}: {v}" for k, v in counts.items()))

    task = PretrainTask(method, s, cases)
    trainer_settings = {**s, "max_steps": 0 if method == "none" else s["steps"]}
    monitor = build_monitor(s, cases, task.build_model, trainer_settings["max_steps"], datasets)
    trainer = Trainer(TrainerConfig.from_dict(trainer_settings), out_dir, checkpoint_dir)
    model = trainer.fit(task, monitor)
    if not trainer.context.is_main:
        return None
    trained = time.perf_counter() - started

    export, used = export_cases(stores)
    export_arrays = CaseArrays(export, in_memory=True)
    export_embeddings(model, export_arrays, s, method, out_dir / "embeddings.npz", used, trainer.context.device)
    probes = None
    if monitor is not None:
        probes = finish_monitor(monitor, model, trainer.step, out_dir / "metrics.csv", METRIC_COLUMNS, trained, trainer.context.device)
    write_json_atomic(out_dir / "clustering.json", _clustering_report(method, monitor, model, trainer.step, probes, s["seed"]))
    model = model.cpu()
    metrics = staged_path(out_dir / "metrics.csv")  # written by the trainer, published at the end
    if not metrics.exists() or metrics.stat().st_size == 0:  # `none` trains nothing: header only
        with atomic_path(out_dir / "metrics.csv") as tmp:
            tmp.write_text(",".join(METRIC_COLUMNS) + "\n", encoding="utf-8")
    inputs = [Path(p) / name for p in (stores.values() if isinstance(stores, Mapping) else stores) for name in ("index.json", "splits.json")]
    final = trainer.history[-1] if trainer.history else {}
    write_provenance(
        out_dir,
        {
            "method": method,
            "settings": s,
            "cases": [{"dataset": c.dataset, "case_id": c.case_id, "split": c.split} for c in cases],
            "steps": trainer.step,
            "resumed_from_step": trainer.start_step,
            "final_metrics": final,
            "seconds": round(time.perf_counter() - started, 1),
            "training_seconds_this_run": round(trained, 1),
            "device": str(trainer.context.device),
            "probes": probes,
        },
        inputs,
    )
    encoder: SliceEncoder = model.encoder
    _save_torch_atomic(
        {"backbone": encoder.backbone_name, "d_model": encoder.d_model, "in_channels": encoder.in_channels, "state_dict": encoder.state_dict()},
        out_dir / "slice_encoder.pt",
    )
    from medclust.predict.recipes import write_pretrain_package

    # the folder is the encoder's model package: model.json, then encoder.pt (last: marks completion)
    store_dirs = list(stores.values()) if isinstance(stores, Mapping) else list(stores)
    write_pretrain_package(out_dir, encoder.export_backbone_state(), method, s, store_dirs, final, {"steps": trainer.step, "cases": len(cases)})
    log.info("pretrain %s: wrote %s (%.1f s)", method, out_dir / "encoder.pt", time.perf_counter() - started)
    return out_dir / "encoder.pt"
