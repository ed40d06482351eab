"""Downstream fine-tuning: one run of task x init x label fraction x seed, trained by the Trainer.

:func:`run_finetune` is the API behind ``medclust finetune``. It

1. loads the task's slice store(s) and derives the targets (label groups, slice-level labels,
   centre heatmaps of lesions or simulated nodules);
2. splits cases/slabs into train/val/test (:func:`medclust.data.splits.plan_splits`) and
   keeps the seeded, nested label fraction of the training items;
3. trains a :class:`FinetuneTask` with :class:`medclust.train.Trainer` (checkpoints, resume,
   signals), evaluating on the validation items every ``eval_every`` steps and keeping the best
   weights (model selection on val only; the test items are never looked at);
4. predicts the test cases and writes the run folder described in the downstream spec
   (``run.json``, predictions on the original grid, ``predictions.csv`` or ``detections.csv``,
   ``val.csv``, ``provenance.json``, and ``model.pt`` last).

Settings are the ``finetune`` grid keys with the task's own keys applied on top (the workflow
merges them); see the ``finetune`` section of the config schema for every key.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medclust.data.downstream import (
    TaskCase,
    context_stack,
    crop_box,
)
from medclust.errors import BadInputError, MedclustError
from medclust.evaluate.predict import pad_to_multiple, predict_logits
from medclust.io.atomic import publish_together, write_json_atomic
from medclust.models.heads import build_task_model, heatmap_focal_loss
from medclust.train.recipes.finetune_data import (  # the data half of the finetune API, re-exported
    FORMAT_VERSION,
    TASK_TYPES,
    TaskData,
    _seed,
    dataset_label_names,
    prepare_task_data,
    read_lesion_table,
)
from medclust.train.recipes.finetune_outputs import (
    _case_probs,
    _write_classification,
    _write_detection,
    _write_segmentation,
    _write_val_csv,
    _z_ranges,
)

__all__ = [
    "FORMAT_VERSION",
    "TASK_TYPES",
    "FinetuneTask",
    "TaskData",
    "dataset_label_names",
    "prepare_task_data",
    "read_lesion_table",
    "run_finetune",
]

log = logging.getLogger("medclust.finetune")


class FinetuneTask:
    """:class:`medclust.train.TrainTask` of one downstream run.

    Args:
        data: the prepared task data (targets and split plan).
        encoder_path: pretrained ``encoder.pt`` or None (random init).
    """

    def __init__(self, data: TaskData, encoder_path: str | os.PathLike[str] | None = None) -> None:
        self.data = data
        self.s = data.settings
        self.kind = self.s["type"]
        self.k = int(self.s.get("context_slices", 0))
        self.seed = int(self.s.get("seed", 0))
        self.batch = int(self.s.get("batch_size", 8))
        patch = self.s.get("patch_size")
        self.patch = None if patch in (None, [], 0) else [int(p) for p in patch]
        self.encoder_path = None if encoder_path is None else str(encoder_path)
        self.max_steps = int(self.s.get("steps", 100))
        self.eval_every = max(1, int(self.s.get("eval_every", max(1, self.max_steps // 4))))
        assert data.plan is not None
        self.plan = data.plan
        self.items = [(cid, int(i)) for cid in sorted(self.plan.train) for i in self.plan.train[cid]]
        if data.case_level:
            self.items = [(cid, -1) for cid in sorted(self.plan.train)]
        self.by_id = {c.case_id: c for c in data.train_cases}
        self.best_state: dict[str, Tensor] | None = None
        self.best_value = -math.inf
        self.best_step = -1
        self.val_rows: list[dict[str, float]] = []
        self._val_cache: list[tuple[TaskCase, np.ndarray]] | None = None
        self.positives: list[tuple[str, int]] = []
        if self.kind == "detection":
            for cid in sorted(self.plan.train):
                chosen = set(self.plan.train[cid].tolist())
                pos = self.by_id[cid].extra.get("positive_slices", [])
                self.positives += [(cid, int(i)) for i in pos if int(i) in chosen]

    # -- protocol --------------------------------------------------------------------------

    def signature(self) -> dict[str, Any]:
        keys = sorted(k for k in self.s if not k.endswith("_entry"))
        return {"settings": {k: self.s[k] for k in keys}, "encoder": self.encoder_path, "n_items": len(self.items)}

    def build_model(self) -> nn.Module:
        return build_task_model(
            self.kind,
            in_channels=2 * self.k + 1,
            num_outputs=self.data.num_outputs,
            backbone=str(self.s.get("backbone", "resnet10")),
            decoder_channels=self.s.get("decoder_channels", (256, 128, 64, 32, 16)),
            head=str(self.s.get("head", "linear")),
            hidden=int(self.s.get("hidden", 256)),
            dropout=float(self.s.get("dropout", 0.0)),
            freeze_encoder=self.s.get("mode", "full") == "frozen",
            encoder_weights=self.encoder_path,
        )

    def batches(self, epoch: int, rank: int, world_size: int) -> Iterator[dict[str, Tensor]]:
        rng = _seed(self.seed, epoch, 0xBA7C)
        items = self.items
        order = rng.permutation(len(items))
        mine = [items[i] for i in order][rank::world_size]
        n_batches = max(1, len(mine) // self.batch)
        positives = self.positives
        for b in range(n_batches):
            chunk = mine[b * self.batch : (b + 1) * self.batch] if len(mine) >= self.batch else mine
            brng = _seed(self.seed, epoch, b, rank, 0xC409)
            if positives:
                n_pos = int(round(float(self.s.get("positive_fraction", 0.5)) * len(chunk)))
                picks = brng.integers(0, len(positives), size=n_pos)
                chunk = [positives[i] for i in picks] + list(chunk[n_pos:])
            yield self._make_batch(chunk, brng)

    def _make_batch(self, chunk: Sequence[tuple[str, int]], rng: np.random.Generator) -> dict[str, Tensor]:
        if self.data.case_level:
            # one bag size per run so bags stack; 2D images (one slice) give bags of one
            bag = min(int(self.s.get("bag_size", 8)), min(len(self.plan.train[cid]) for cid, _ in self.items))
            images, targets = [], []
            for cid, _ in chunk:
                case = self.by_id[cid]
                pool = self.plan.train[cid]
                idx = np.sort(rng.choice(pool, size=min(bag, len(pool)), replace=False)) if len(pool) > bag else np.resize(pool, bag)
                images.append(context_stack(case.image, idx, self.k))
                targets.append(case.target)
            return {"image": torch.from_numpy(np.stack(images)), "target": torch.as_tensor(targets, dtype=torch.long)}
        images, targets, ignores = [], [], []
        dense = self.kind in ("segmentation", "detection")
        for cid, s in chunk:
            case = self.by_id[cid]
            stack = context_stack(case.image, [s], self.k)[0]
            if dense:
                centre = None
                if self.kind == "detection" and case.target[s].max() >= 1.0 - 1e-6:
                    centre = np.unravel_index(int(np.argmax(case.target[s])), case.target[s].shape)
                rows, cols = crop_box(stack.shape[1:], self.patch, rng, must_contain=centre)
                images.append(stack[:, rows, cols])
                targets.append(case.target[s, rows, cols][None])
                if self.kind == "detection":
                    ign = case.extra.get("ignore")
                    ignores.append((ign[s, rows, cols] if ign is not None else np.zeros(targets[-1].shape[1:], bool))[None])
            else:
                images.append(stack)
                targets.append(case.target[s])
        batch = {"image": torch.from_numpy(np.stack(images).astype(np.float32))}
        if self.kind == "segmentation":
            batch["target"] = torch.from_numpy(np.stack(targets).astype(np.int64))
        else:
            batch["target"] = torch.from_numpy(np.stack(targets).astype(np.float32))
        if ignores:
            batch["ignore"] = torch.from_numpy(np.stack(ignores))
        return batch

    def loss(self, logits: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        """The task loss of a batch's outputs."""
        target = batch["target"]
        if self.kind == "segmentation":
            return _dice_ce(logits.float(), target)
        if self.kind == "detection":
            return heatmap_focal_loss(logits, target, ignore=batch.get("ignore"))
        if self.data.multilabel:
            return F.binary_cross_entropy_with_logits(logits.float(), target.float())
        return F.cross_entropy(logits.float(), target.long())

    def training_step(self, model: nn.Module, batch: Mapping[str, Tensor], step: int) -> dict[str, Tensor]:
        image = batch["image"]
        if self.kind in ("segmentation", "detection"):
            h, w = image.shape[-2:]
            return {"loss": self.loss(model(pad_to_multiple(image))[..., :h, :w], batch)}
        return {"loss": self.loss(model(image), batch)}

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        done = step + 1
        if done % self.eval_every == 0 or done == self.max_steps:
            self.validate(getattr(model, "module", model), done)

    def state_dict(self) -> dict[str, Any]:
        return {
            "best_state": self.best_state,
            "best_value": self.best_value,
            "best_step": self.best_step,
            "val_rows": json.dumps(self.val_rows),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best_state = state.get("best_state")
        self.best_value = float(state.get("best_value", -math.inf))
        self.best_step = int(state.get("best_step", -1))
        self.val_rows = json.loads(state.get("val_rows", "[]"))

    # -- model selection -------------------------------------------------------------------

    def _val_items(self) -> list[tuple[TaskCase, np.ndarray]]:
        if self._val_cache is None:
            cap = int(self.s.get("val_max_slices", 64))
            items = []
            for cid in sorted(self.plan.val):
                idx = np.asarray(self.plan.val[cid])
                items.append((self.by_id[cid], idx))
            total = sum(len(i) for _, i in items)
            if total > cap and not self.data.case_level:
                # evenly spaced slices: deterministic and spread over the whole validation range
                keep = []
                for case, idx in items:
                    n = max(1, int(round(cap * len(idx) / total)))
                    keep.append((case, idx[np.linspace(0, len(idx) - 1, n).round().astype(int)]))
                items = keep
            self._val_cache = items
        return self._val_cache

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> tuple[float, float]:
        """Validation ``(metric, loss)``; higher metric is better (mean Dice, or minus the loss)."""
        items = self._val_items()
        if not items:
            return math.nan, math.nan
        bs = int(self.s.get("predict_batch_size", 16))
        if self.data.case_level:
            losses = []
            for case, idx in items:
                probs = _case_probs(model, case, idx, self.k, bs, int(self.s.get("bag_size", 8)))
                losses.append(-math.log(max(float(probs[case.target]), 1e-7)))
            loss = float(np.mean(losses))
            return -loss, loss
        losses, weights = [], []
        inter = np.zeros(self.data.num_outputs)
        denom = np.zeros(self.data.num_outputs)
        for case, idx in items:
            logits = predict_logits(model, case.image, idx, self.k, bs)
            target = torch.from_numpy(np.asarray(case.target[idx]))
            if self.kind == "segmentation":
                target = target.long()
                pred = logits.argmax(1)
                for c in range(1, self.data.num_outputs):
                    p, t = pred == c, target == c
                    inter[c] += float((p & t).sum())
                    denom[c] += float(p.sum() + t.sum())
                losses.append(float(_dice_ce(logits, target[:, None])))
            elif self.kind == "detection":
                ign = case.extra.get("ignore")
                ign_t = torch.from_numpy(ign[idx][:, None]) if ign is not None else None
                losses.append(float(heatmap_focal_loss(logits, target[:, None].float(), ignore=ign_t)))
            else:
                losses.append(float(F.binary_cross_entropy_with_logits(logits, target.float())))
            weights.append(len(idx))
        loss = float(np.average(losses, weights=weights))
        if self.kind == "segmentation":
            present = denom[1:] > 0
            dice = 2 * inter[1:][present] / denom[1:][present]
            return (float(dice.mean()) if dice.size else 0.0), loss
        return -loss, loss

    def validate(self, model: nn.Module, step: int) -> None:
        """Evaluate on val, log a row, keep the weights if they are the best so far."""
        metric, loss = self.evaluate(model)
        self.val_rows.append({"step": step, "val_metric": metric, "val_loss": loss})
        better = math.isnan(metric) or metric > self.best_value or self.best_state is None
        if better and not math.isnan(metric):
            self.best_value, self.best_step = metric, step
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        elif math.isnan(metric):
            # no validation items: the last weights are the selection
            self.best_step = step
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        log.info("step %d: val %s %.4f (loss %.4f), best %.4f at step %d", step, self.metric_name, metric, loss, self.best_value, self.best_step)

    @property
    def metric_name(self) -> str:
        return "val_dice" if self.kind == "segmentation" else "neg_val_loss"


def _dice_ce(logits: Tensor, target: Tensor) -> Tensor:
    from monai.losses import DiceCELoss

    return DiceCELoss(to_onehot_y=True, softmax=True, batch=True)(logits, target)


def _fraction_str(fraction: float) -> str:
    return str(float(fraction))


def run_finetune(
    settings: Mapping[str, Any],
    slices_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    init: str,
    fraction: float,
    seed: int,
    encoder: str | os.PathLike[str] | None = None,
    train_slices_dir: str | os.PathLike[str] | None = None,
    keep_checkpoint: bool | None = None,
) -> Path:
    """Train, select on val, predict and score the test cases and write the run folder.

    Args:
        settings: resolved task settings (grid keys + the task's keys; ``task`` = its name).
        slices_dir: slice store of the task's dataset (its test cases are predicted).
        out_dir: the run folder ``results/finetune/{task}/{init}/{fraction}/{seed}``.
        init: ``none`` or the pretraining method (recorded; weights from ``encoder``).
        fraction: label fraction in (0, 1].
        seed: run seed (label subset, initialisation, data order).
        encoder: the pretrained ``encoder.pt``; required unless ``init == "none"``.
        train_slices_dir: slice store of the training dataset when it differs.
        keep_checkpoint: keep ``checkpoint/`` after the run (default: the ``keep_checkpoint``
            setting); ``medclust finetune-many`` keeps it until all its cells have finished.

    Returns:
        The path of ``model.pt`` (written last).
    """
    from medclust.evaluate import evaluate_run
    from medclust.provenance import write_provenance
    from medclust.train import Trainer, TrainerConfig

    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if init != "none" and encoder is None:
        raise MedclustError(f"finetune: init {init!r} needs --encoder (the pretraining encoder.pt)")
    if init == "none":
        encoder = None
    if encoder is not None and not Path(encoder).is_file():
        raise BadInputError(encoder, "encoder weights not found (run the pretraining first)")
    run_settings = dict(settings)
    run_settings["seed"] = int(seed)
    for stale in ("predictions", "roi"):
        shutil.rmtree(out / stale, ignore_errors=True)

    data = prepare_task_data(run_settings, slices_dir, fraction, seed, train_slices_dir)
    plan = data.plan
    assert plan is not None
    log.info(
        "%s (%s): %d training %s of %d (fraction %s), %d val slices, %d test cases; init %s, mode %s",
        run_settings.get("task"), data.settings["type"], plan.n_train, plan.unit, plan.train_total, fraction,
        sum(len(v) for v in plan.val.values()), len(plan.test), init, run_settings.get("mode", "full"),
    )
    task = FinetuneTask(data, encoder)
    trainer_settings = dict(run_settings)
    trainer_settings.setdefault("checkpoint_every", max(int(run_settings.get("steps", 100)), 1))
    cfg = TrainerConfig.from_dict(trainer_settings)
    trainer = Trainer(cfg, out_dir=out, checkpoint_dir=out / "checkpoint")
    model = trainer.fit(task)
    trained_at = time.perf_counter()
    if not trainer.context.is_main:
        return out / "model.pt"  # under torchrun only rank 0 predicts and writes the run folder
    if task.best_state is not None:
        model.load_state_dict(task.best_state)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model = model.to(device).eval()

    record = _base_record(data, run_settings, init, fraction, seed, encoder, task)
    if data.settings["type"] == "segmentation":
        record["test_cases"] = _write_segmentation(model, data, out, run_settings)
        record["predictions"] = "predictions/"
    elif data.settings["type"] == "classification":
        record["test_cases"] = _write_classification(model, data, out, run_settings)
        record["predictions"] = "predictions.csv"
    else:
        record["test_cases"], record["detection"] = _write_detection(model, data, out, run_settings)
        record["predictions"] = "detections.csv"
    record["timing_s"] = {"train": round(trained_at - started, 2), "total": round(time.perf_counter() - started, 2)}
    _write_val_csv(out / "val.csv", task.val_rows)
    inputs = [Path(slices_dir) / "index.json", Path(slices_dir) / "splits.json"]
    if train_slices_dir is not None:
        inputs += [Path(train_slices_dir) / "index.json", Path(train_slices_dir) / "splits.json"]
    if encoder is not None:
        inputs.append(Path(encoder))
    if data.settings.get("lesion_table"):
        inputs.append(Path(data.settings["lesion_table"]))
    from medclust.predict.recipes import write_finetune_package

    # The declared outputs (run.json, metrics.json, per_case.csv, model.json, model.pt) appear
    # together at the end: a job killed before leaves none of them, so a plain rerun redoes it
    # (no --rerun-incomplete).
    with publish_together():
        write_json_atomic(out / "run.json", record)
        write_provenance(out, {**run_settings, "init": init, "fraction": fraction, "seed": seed}, inputs)
        # scored here, not in a job of its own, which would pay the ~7 s torch + MONAI start-up again
        evaluate_run(out, run_settings)
        # the run folder is the model package: model.json + model.pt
        model_path = write_finetune_package(out, model, run_settings, train_slices_dir or slices_dir, label_map=data.lut)
    if not (bool(run_settings.get("keep_checkpoint", False)) if keep_checkpoint is None else keep_checkpoint):
        shutil.rmtree(out / "checkpoint", ignore_errors=True)
    log.info("wrote %s in %.1f s (training %.1f s)", out, time.perf_counter() - started, trained_at - started)
    return model_path


def _input_normalisation(cases: Sequence[TaskCase]) -> list[dict[str, Any]]:
    """The distinct intensity normalisations of the training cases (per-case block sizes left out)."""
    seen: list[dict[str, Any]] = []
    for case in cases:
        norm = {k: v for k, v in json.loads(case.attrs.get("normalisation") or "{}").items() if k != "antialias_block"}
        if norm.get("method") == "percentiles":  # per-image values; the rule is what carries over
            norm.pop("values", None)
        if norm not in seen:
            seen.append(norm)
    return seen


def _base_record(data: TaskData, s: Mapping[str, Any], init: str, fraction: float, seed: int, encoder: Any, task: FinetuneTask) -> dict[str, Any]:
    plan = data.plan
    assert plan is not None
    record: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "task": s.get("task"),
        "type": s["type"],
        "dataset": s.get("dataset"),
        "train_dataset": s.get("train_dataset") or s.get("dataset"),
        "init": init,
        "encoder": None if encoder is None else str(encoder),
        "fraction": float(fraction),
        "seed": int(seed),
        "mode": s.get("mode", "full"),
        "context_slices": int(s.get("context_slices", 0)),
        "split": s.get("split", "cases"),
        "fraction_unit": plan.unit,
        "n_train_items": plan.n_train,
        "n_train_items_total": plan.train_total,
        "train_cases": sorted(plan.train),
        "val_cases": sorted(plan.val),
        "n_val_slices": int(sum(len(v) for v in plan.val.values())),
        # model selection sees only labels of this run's fraction (README "Splits and label fractions")
        "validation": {
            "rule": "label fraction",
            "n_val_slices": int(sum(len(v) for v in plan.val.values())),
            "n_val_slices_total": int(plan.val_total_slices),
        },
        "trained_on": data.trained_on,
        "notes": data.notes,
        "selection": {"metric": task.metric_name, "best_step": task.best_step, "best_value": task.best_value, "steps": task.max_steps},
        "classes": {str(k): v for k, v in sorted(data.classes.items())},
        # the input normalisation the model was trained on (a new scan must get the same)
        "input_normalisation": _input_normalisation(data.train_cases),
    }
    if plan.layout:
        # where the slab split put train/val/test along the slice axis (mm, store z positions)
        record["slabs"] = {
            cid: {split: _z_ranges(data.case(cid).z_mm, lay == split) for split in ("train", "val", "test") if (lay == split).any()}
            for cid, lay in sorted(plan.layout.items())
        }
    if s["type"] == "segmentation":
        record["background"] = 0
    if s["type"] == "classification":
        record["multilabel"] = data.multilabel
        record["level"] = "case" if data.case_level else "slice"
    return record
