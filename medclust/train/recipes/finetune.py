"""Downstream fine-tuning: one run of task x init x label fraction x seed, trained by the Trainer.

:func:`run_finetune` is the API behind ``medclust finetune``. It

1. loads the task's slice store(s) and derives the targets (label groups, slice-level labels,
   centre heatmaps of lesions or simulated nodules);
2. splits cases/slabs into train/val/test (:func:`medclust.data.downstream.plan_splits`) and
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

import csv
import io
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
    SplitPlan,
    TaskCase,
    context_stack,
    crop_box,
    gaussian_heatmap,
    load_cases,
    plan_splits,
    read_store_json,
    remap_labels,
    resolve_label_groups,
    simulate_nodules,
    slice_centre_heatmap,
    slice_targets_from_mask,
)
from medclust.errors import BadInputError, MedclustError
from medclust.evaluate.predict import group_peaks, pad_to_multiple, predict_logits, predict_segmentation, predict_slices
from medclust.io.atomic import publish_together, write_json_atomic, write_text_atomic
from medclust.io.original_grid import store_to_original, world_to_store_index, write_label_nifti
from medclust.models.heads import build_task_model, heatmap_focal_loss
from medclust.preprocess.intensity import hu_to_store, store_value_range

__all__ = ["FORMAT_VERSION", "FinetuneTask", "TaskData", "prepare_task_data", "run_finetune"]

log = logging.getLogger("medclust.finetune")

FORMAT_VERSION = 1
TASK_TYPES = ("segmentation", "classification", "detection")


def _seed(*parts: int) -> np.random.Generator:
    return np.random.default_rng([int(p) & 0xFFFFFFFF for p in parts])


# -- label names and lesion tables ----------------------------------------------------------------


def _truthy(value: Any) -> bool:
    """A store attr flag (bool, numpy bool or its text) as a bool."""
    if isinstance(value, (bytes, str)):
        return str(value.decode() if isinstance(value, bytes) else value).strip().lower() in ("1", "true", "yes")
    return bool(value) if value is not None else False


def dataset_label_names(entry: Mapping[str, Any] | None) -> dict[int, str]:
    """Label value -> name of a dataset: its config ``label_names``, else an MSD ``dataset.json``.

    Simulated radiographs (format ``drr``) without names of their own take those of their
    source CT dataset (``source_entry``, filled in by the workflow): their labels are the
    source's structure ids projected.
    """
    entry = dict(entry or {})
    if entry.get("label_names"):
        return {int(k): str(v) for k, v in entry["label_names"].items()}
    if entry.get("format") == "drr" and entry.get("source_entry"):
        return dataset_label_names(entry["source_entry"])
    path = entry.get("path")
    if path and entry.get("format") == "msd":
        meta = Path(path) / "dataset.json"
        try:
            labels = json.loads(meta.read_text(encoding="utf-8")).get("labels", {})
        except (OSError, ValueError) as err:
            raise BadInputError(meta, f"cannot read label names: {err}") from err
        out = {}
        for k, v in labels.items():
            # MSD v1: {"1": "name"}; MSD v2 style: {"name": 1}
            if str(k).lstrip("-").isdigit():
                out[int(k)] = str(v)
            elif isinstance(v, (int, float)) or str(v).isdigit():
                out[int(v)] = str(k)
        return out
    return {}


def read_lesion_table(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows of a lesion table (TSV/CSV: ``x_mm, y_mm, z_mm`` RAS, ``diameter_mm``, optional ``case_id``).

    Raises:
        BadInputError: missing file or columns.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as err:
        raise BadInputError(p, f"cannot read lesion table: {err}") from err
    dialect = "excel-tab" if "\t" in text.splitlines()[0] else "excel"
    rows = list(csv.DictReader(io.StringIO(text), dialect=dialect))
    need = {"x_mm", "y_mm", "z_mm"}
    if rows and not need <= set(rows[0]):
        raise BadInputError(p, f"lesion table needs columns {sorted(need)}, has {sorted(rows[0])}")
    out = []
    for row in rows:
        lesion: dict[str, Any] = {
            "case_id": row.get("case_id") or None,
            "x_mm": float(row["x_mm"]),
            "y_mm": float(row["y_mm"]),
            "z_mm": float(row["z_mm"]),
            "diameter_mm": float(row.get("diameter_mm") or 0.0),
        }
        for key, value in row.items():  # extra columns (nodule_id, n_readers, small, ...) kept
            if key in lesion or key is None:
                continue
            lesion[key] = _cell(value)
        out.append(lesion)
    return out


def _cell(value: str | None) -> Any:
    if value is None or value == "":
        return None
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    try:
        return int(value) if value.lstrip("-").isdigit() else float(value)
    except ValueError:
        return value


def lesions_of(table: Sequence[Mapping[str, Any]], case_id: str, only_case: bool) -> list[dict[str, Any]]:
    """The lesion rows of one case; a table without matching ids belongs to the only case."""
    mine = [dict(r) for r in table if r.get("case_id") == case_id]
    if not mine and only_case and not any(r.get("case_id") == case_id for r in table):
        ids = {r.get("case_id") for r in table}
        if len(ids) <= 1:
            mine = [dict(r) for r in table]
    return mine


# -- task data ------------------------------------------------------------------------------------


class TaskData:
    """Everything a run trains and tests on, targets attached.

    Attributes:
        settings: the resolved run settings.
        train_cases: cases of the training dataset (targets in ``case.target``).
        test_cases: cases of the test dataset (the same objects when the datasets are equal).
        plan: the split plan over ``train_cases`` (and ``test_cases`` when equal).
        classes: class value/index -> name (see the spec).
        num_outputs: network outputs.
        multilabel: classification with independent sigmoid outputs.
        lut: raw label value -> class (segmentation, slice labels).
        case_level: classification with one label per case (bags of slices).
        trained_on: ``real labels``, ``simulated nodules`` or ``simulated images`` (e.g. DRRs).
        notes: free text recorded in run.json.
    """

    def __init__(self) -> None:
        self.settings: dict[str, Any] = {}
        self.train_cases: list[TaskCase] = []
        self.test_cases: list[TaskCase] = []
        self.plan: SplitPlan | None = None
        self.classes: dict[int, str] = {}
        self.num_outputs = 1
        self.multilabel = False
        self.lut: dict[int, int] = {}
        self.case_level = False
        self.trained_on = "real labels"
        self.notes: list[str] = []
        self.lesion_table: list[dict[str, Any]] = []
        self.same_dataset = True

    def case(self, case_id: str, train: bool = True) -> TaskCase:
        pool = self.train_cases if train else self.test_cases
        for c in pool:
            if c.case_id == case_id:
                return c
        raise KeyError(case_id)


def _spacing(case: TaskCase) -> tuple[float, float, float]:
    rows, cols = case.pixel_spacing
    return case.slice_spacing, rows, cols


def prepare_task_data(
    settings: Mapping[str, Any],
    slices_dir: str | os.PathLike[str],
    fraction: float,
    seed: int,
    train_slices_dir: str | os.PathLike[str] | None = None,
) -> TaskData:
    """Load the stores, derive targets and split (see the module docstring).

    Args:
        settings: resolved run settings.
        slices_dir: slice store of the task's ``dataset`` (test cases).
        fraction: label fraction.
        seed: run seed.
        train_slices_dir: slice store of ``train_dataset`` when it differs.

    Returns:
        The task data.
    """
    data = TaskData()
    data.settings = dict(settings)
    kind = settings.get("type")
    if kind not in TASK_TYPES:
        raise MedclustError(f"finetune task {settings.get('task')!r}: type must be one of {', '.join(TASK_TYPES)}, got {kind!r}")
    k = int(settings.get("context_slices", 0))
    same = train_slices_dir is None or Path(train_slices_dir).resolve() == Path(slices_dir).resolve()
    data.same_dataset = same
    train_dir = Path(slices_dir if same else train_slices_dir)  # type: ignore[arg-type]
    data.train_cases = load_cases(train_dir)
    data.test_cases = data.train_cases if same else load_cases(slices_dir)
    splits = read_store_json(train_dir, "splits.json") if settings.get("split", "cases") == "cases" else None
    label_names = dataset_label_names(settings.get("train_dataset_entry") or settings.get("dataset_entry"))
    all_cases = data.train_cases if same else data.train_cases + data.test_cases
    if any(_truthy(c.attrs.get("simulated")) for c in data.train_cases):
        # e.g. DRRs: the images themselves are simulated, so every table and figure must say so
        data.trained_on = "simulated images"

    usable = None
    if kind == "segmentation":
        present = set()
        for c in all_cases:
            if c.label is None:
                raise BadInputError(c.path, "segmentation task needs a label map in the slice store")
            present |= set(np.unique(c.label).tolist())
        data.lut, data.classes = resolve_label_groups(settings.get("label_groups"), label_names, present)
        if not data.classes:
            raise MedclustError(f"finetune task {settings.get('task')!r}: no foreground classes")
        for c in all_cases:
            c.target = remap_labels(c.label, data.lut)
        data.num_outputs = max(data.classes) + 1
    elif kind == "classification":
        target = settings.get("target", "slice_structures")
        if target == "slice_structures":
            groups = settings.get("label_groups")
            present = set()
            for c in all_cases:
                if c.label is None:
                    raise BadInputError(c.path, "slice-structure classification needs a label map in the slice store")
                present |= set(np.unique(c.label).tolist())
            data.lut, named = resolve_label_groups(groups, label_names, present)
            data.classes = {i: named[v] for i, v in enumerate(sorted(named))}
            data.num_outputs = len(data.classes)
            data.multilabel = True
            for c in all_cases:
                c.target = slice_targets_from_mask(remap_labels(c.label, data.lut), len(named), int(settings.get("min_pixels", 1)))
        elif target == "class_label":
            labels = sorted({str(c.attrs.get("class_label")) for c in all_cases if c.attrs.get("class_label") not in (None, "")})
            if len(labels) < 2:
                raise MedclustError(f"finetune task {settings.get('task')!r}: class_label classification needs >= 2 classes, found {labels}")
            data.classes = dict(enumerate(labels))
            data.num_outputs = len(labels)
            data.case_level = True
            for c in all_cases:
                value = c.attrs.get("class_label")
                c.target = labels.index(str(value)) if value not in (None, "") else None
            usable_cases = [c for c in all_cases if c.target is not None]
            if len(usable_cases) < len(all_cases):
                log.warning("%d cases have no class_label and are skipped", len(all_cases) - len(usable_cases))
        else:
            raise MedclustError(f"finetune task {settings.get('task')!r}: target must be slice_structures or class_label, got {target!r}")
    else:
        _prepare_detection(data, settings, label_names, seed)

    strategy = settings.get("split", "cases")
    if data.case_level and strategy == "slabs":
        raise MedclustError(f"finetune task {settings.get('task')!r}: case-level labels need split: cases")
    if data.case_level:
        usable = {c.case_id: np.ones(c.num_slices, bool) for c in data.train_cases if c.target is not None}
        cases_for_plan = [c for c in data.train_cases if c.target is not None]
    else:
        cases_for_plan = data.train_cases
    extents = None
    if kind == "segmentation":
        # slabs over the labelled z range only: a slab above the head has nothing to score
        # (slice classification keeps every slice: label-free slices are its negatives)
        extents = {}
        for c in cases_for_plan:
            flat = np.asarray(c.target).reshape(c.num_slices, -1)
            hit = np.flatnonzero(flat.max(axis=1) > 0)
            if hit.size:
                extents[c.case_id] = (int(hit[0]), int(hit[-1]))
    if kind == "detection":
        plan = data.plan  # made while simulating (the slabs decide where nodules go)
    else:
        plan = plan_splits(
            cases_for_plan,
            splits,
            strategy,
            fraction,
            seed,
            slabs=settings.get("slabs"),
            context_slices=k,
            fraction_unit="cases" if data.case_level else settings.get("fraction_unit", "auto"),
            min_cases=int(settings.get("min_cases", 8)),
            val_fraction=float((settings.get("slabs") or {}).get("val_fraction", 0.2)),
            with_test=same,
            usable_slices=usable,
            extents=extents,
        )
    assert plan is not None
    if kind == "detection":
        plan = _apply_fraction_to_plan(plan, fraction, seed, settings)
    if not same:
        plan.test = {c.case_id: np.arange(c.num_slices) for c in data.test_cases}
    if data.case_level:
        unlabelled = sorted(cid for cid in plan.test if data.case(cid, train=same).target is None)
        if unlabelled:
            log.warning("test cases without class_label are not predicted: %s", ", ".join(unlabelled))
        plan.test = {cid: v for cid, v in plan.test.items() if cid not in unlabelled}
    if not plan.test:
        raise MedclustError(f"finetune task {settings.get('task')!r}: no test cases (check splits.json / slab settings)")
    data.plan = plan
    return data


def _apply_fraction_to_plan(plan: SplitPlan, fraction: float, seed: int, settings: Mapping[str, Any]) -> SplitPlan:
    """The label fraction of a detection plan (made at fraction 1 for the simulation): slices of
    training and, alike, of validation (:func:`medclust.data.downstream.apply_label_fraction`)."""
    from medclust.data.downstream import apply_label_fraction

    plan.train, plan.val, plan.train_total = apply_label_fraction(plan.train, plan.val, "slices", fraction, seed)
    plan.unit = "slices"
    return plan


def _prepare_detection(data: TaskData, settings: Mapping[str, Any], label_names: Mapping[int, str], seed: int) -> None:
    """Heatmap targets for detection: simulated nodules (demo) or a lesion table's training lesions."""
    k = int(settings.get("context_slices", 0))
    table_path = settings.get("lesion_table")
    if not table_path:
        raise MedclustError(f"finetune task {settings.get('task')!r}: detection needs lesion_table (the test ground truth)")
    data.lesion_table = read_lesion_table(table_path)
    data.classes = {0: str(settings.get("lesion_name", "lesion"))}
    data.num_outputs = 1
    source = settings.get("train_targets", "lesions")
    sim = dict(settings.get("simulate") or {})
    min_sigma = float(settings.get("heatmap_sigma_mm", 4.0))
    strategy = settings.get("split", "cases")
    splits = read_store_json(Path(data.train_cases[0].path).parent, "splits.json") if strategy == "cases" else None
    # splits first: nodules are simulated in train and val regions only, never across a gap
    plan = plan_splits(
        data.train_cases, splits, strategy, 1.0, seed, slabs=settings.get("slabs"), context_slices=k,
        fraction_unit="slices", with_test=data.same_dataset,
    )
    data.plan = plan
    window = settings.get("ct_window", [-1000, 1000])
    lut = {}
    if source == "simulated":
        data.trained_on = "simulated nodules"
        organ = sim.get("organ")
        if organ:
            lut, _ = resolve_label_groups({"organ": organ}, label_names)
        data.notes.append(
            "training and validation targets are SIMULATED nodules inserted into the training images; "
            "the real lesions of the lesion table are used only for testing"
        )
    elif source != "lesions":
        raise MedclustError(f"finetune task {settings.get('task')!r}: train_targets must be simulated or lesions, got {source!r}")
    for case in data.train_cases:
        if case.case_id not in plan.train and case.case_id not in plan.val:
            # a test case of a case-level split: no targets, nothing simulated
            case.target = np.zeros(case.image.shape, np.float32)
            continue
        spacing = _spacing(case)
        layout = plan.layout.get(case.case_id)
        allowed = np.isin(layout, ["train", "val"]) if layout is not None else np.ones(case.num_slices, bool)
        world = np.array([[r["x_mm"], r["y_mm"], r["z_mm"]] for r in data.lesion_table]).reshape(-1, 3)
        real_idx = world_to_store_index(case.attrs, world) if len(world) else np.zeros((0, 3))
        if source == "simulated":
            if case.label is None and lut:
                raise BadInputError(case.path, "simulated nodules need the organ label map in the slice store")
            organ_mask = remap_labels(case.label, lut) > 0 if lut else np.ones(case.image.shape, bool)
            rng = _seed(int(sim.get("seed", 0)), seed, 0x51B)
            count = int(sim.get("count", 12))
            # nodules in the validation slabs too (in proportion, at least one), so model
            # selection sees positives; the rng stream is fixed by (simulate.seed, run seed)
            regions = [allowed]
            if layout is not None and (layout == "val").any():
                regions = [layout == "train", layout == "val"]
            n_val = 0 if len(regions) == 1 else max(1, int(round(count * regions[1].sum() / max(allowed.sum(), 1))))
            image = case.image
            # nodule HU -> this store's values (window or nnU-Net z-scores), texture noise alike
            norm = json.loads(case.attrs.get("normalisation") or "{}")
            tissue = hu_to_store(np.asarray(sim.get("hu", [-100.0, 100.0]), dtype=float), norm, window).tolist()
            value_range = store_value_range(norm)
            avoid = real_idx if bool(sim.get("avoid_lesions", True)) else np.zeros((0, 3))
            all_centres, all_diam = [], []
            for region, n in zip(regions, [count - n_val, n_val]):
                image, centres_r, diam_r = simulate_nodules(
                    image,
                    organ_mask,
                    spacing,
                    rng,
                    n,
                    diameter_mm=sim.get("diameter_mm", [6.0, 20.0]),
                    intensity=tissue,
                    avoid=np.concatenate([avoid, *all_centres]) if all_centres else avoid,
                    avoid_mm=float(sim.get("avoid_mm", 25.0)),
                    allowed_slices=region,
                    noise=0.02 * (value_range[1] - value_range[0]),
                    value_range=value_range,
                )
                all_centres.append(centres_r)
                all_diam.append(diam_r)
            centres, diam = np.concatenate(all_centres), np.concatenate(all_diam)
            case.image = image
            case.extra["simulated_lesions"] = [
                {"index": c.tolist(), "diameter_mm": float(d)} for c, d in zip(centres, diam)
            ]
        else:
            rows = lesions_of(data.lesion_table, case.case_id, only_case=False)
            pts = np.array([[r["x_mm"], r["y_mm"], r["z_mm"]] for r in rows]).reshape(-1, 3)
            centres = world_to_store_index(case.attrs, pts) if len(pts) else np.zeros((0, 3))
            diam = np.array([max(r["diameter_mm"], 3.0) for r in rows])
            # lesions centred in a test slab (or a gap) are never training targets
            centre_slice = np.clip(np.rint(centres[:, 0]).astype(int), 0, case.num_slices - 1) if len(centres) else np.zeros(0, int)
            keep = allowed[centre_slice] if len(centres) else np.zeros(0, bool)
            centres, diam = centres[keep], diam[keep]
        heat = slice_centre_heatmap(case.image.shape, centres, diam, spacing, min_sigma)
        case.target = heat
        if source == "simulated" and bool(sim.get("ignore_real_lesions", False)) and len(real_idx):
            # opt-in: keep the loss away from the real lesions (they would otherwise be negatives)
            ignore = gaussian_heatmap(case.image.shape, real_idx, np.full((len(real_idx), 3), 1.0) * float(sim.get("avoid_mm", 25.0)) / 2.0 / np.asarray(spacing)) > 0.1
            case.extra["ignore"] = ignore
        case.extra["positive_slices"] = np.flatnonzero(heat.reshape(heat.shape[0], -1).max(axis=1) >= 1.0 - 1e-6)
    if source == "simulated" and bool(sim.get("ignore_real_lesions", False)):
        data.notes.append("the loss ignores a ball around each real lesion (opt-in ignore_real_lesions)")


# -- the training task ----------------------------------------------------------------------------


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


@torch.no_grad()
def _case_probs(model: nn.Module, case: TaskCase, idx: np.ndarray, k: int, bs: int, bag: int) -> np.ndarray:
    """Case-level class probabilities: the model's bag pooling over all ``idx`` slices."""
    was = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        stack = torch.from_numpy(context_stack(case.image, idx, k)).to(device)
        feats = torch.cat([model.features(stack[i : i + bs]) for i in range(0, len(stack), bs)]).mean(0, keepdim=True)  # type: ignore[operator]
        logits = model.head(feats)  # type: ignore[operator]
    finally:
        model.train(was)
    return torch.softmax(logits.float(), dim=1)[0].cpu().numpy()


# -- the run --------------------------------------------------------------------------------------


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
    if not bool(run_settings.get("keep_checkpoint", False)):
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


def _write_segmentation(model: nn.Module, data: TaskData, out: Path, s: Mapping[str, Any]) -> list[dict[str, Any]]:
    from medclust.io.original_grid import slice_roi_on_original

    plan = data.plan
    assert plan is not None
    k = int(s.get("context_slices", 0))
    bs = int(s.get("predict_batch_size", 16))
    lut_json = None if all(r == c for r, c in data.lut.items()) else {str(r): c for r, c in sorted(data.lut.items())}
    entries = []
    for cid in sorted(plan.test):
        case = data.case(cid, train=data.same_dataset)
        idx = plan.test[cid]
        pred = predict_segmentation(model, case.image, idx, k, bs)
        original = store_to_original(pred, case.attrs)
        affine = np.asarray(case.attrs["original_affine"], dtype=float)
        pred_rel = f"predictions/{cid}.nii.gz"
        write_label_nifti(out / pred_rel, original, affine)
        roi_rel = None
        z_ranges = None
        if len(idx) < case.num_slices:
            mask = np.zeros(case.num_slices, bool)
            mask[idx] = True
            roi_rel = f"roi/{cid}.nii.gz"
            write_label_nifti(out / roi_rel, slice_roi_on_original(mask, case.attrs).astype(np.uint8), affine, dtype=np.uint8)
            z_ranges = _z_ranges(case.z_mm, mask)
        entries.append(
            {
                "case_id": cid,
                "image": case.attrs.get("source_path"),
                "label": case.attrs.get("label_path") or None,
                "label_map": lut_json,
                "prediction": pred_rel,
                "roi": roi_rel,
                "roi_z_mm": z_ranges,
            }
        )
    return entries


def _z_ranges(z_mm: np.ndarray, mask: np.ndarray) -> list[list[float]]:
    ranges = []
    start = None
    for i, m in enumerate(list(mask) + [False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            lo, hi = sorted((float(z_mm[start]), float(z_mm[i - 1])))
            ranges.append([round(lo, 3), round(hi, 3)])
            start = None
    return ranges


def _write_classification(model: nn.Module, data: TaskData, out: Path, s: Mapping[str, Any]) -> list[dict[str, Any]]:
    plan = data.plan
    assert plan is not None
    k = int(s.get("context_slices", 0))
    bs = int(s.get("predict_batch_size", 16))
    n = data.num_outputs
    head = ["case_id", "slice_index", "z_mm"]
    head += [f"target_{c}" for c in range(n)] if data.multilabel else ["target"]
    head += [f"prob_{c}" for c in range(n)]
    lines = [head]
    entries = []
    for cid in sorted(plan.test):
        case = data.case(cid, train=data.same_dataset)
        idx = np.asarray(plan.test[cid])
        if data.case_level:
            probs = _case_probs(model, case, idx, k, bs, int(s.get("bag_size", 8)))
            lines.append([cid, -1, ""] + [case.target] + [f"{p:.6f}" for p in probs])
            n_items = 1
        else:
            probs = predict_slices(model, case.image, idx, k, bs, multilabel=data.multilabel)
            for j, sl in enumerate(idx):
                targets = [int(t) for t in case.target[sl]]
                lines.append([cid, int(sl), f"{float(case.z_mm[sl]):.3f}"] + targets + [f"{p:.6f}" for p in probs[j]])
            n_items = len(idx)
        entries.append({"case_id": cid, "image": case.attrs.get("source_path"), "label": case.attrs.get("label_path") or None, "n_items": n_items})
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(lines)
    write_text_atomic(out / "predictions.csv", buf.getvalue())
    return entries


def _write_detection(model: nn.Module, data: TaskData, out: Path, s: Mapping[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    plan = data.plan
    assert plan is not None
    k = int(s.get("context_slices", 0))
    bs = int(s.get("predict_batch_size", 16))
    rows = [["case_id", "x_mm", "y_mm", "z_mm", "score", "diameter_mm", "n_slices"]]
    entries = []
    test_ids = sorted(plan.test)
    for cid in test_ids:
        case = data.case(cid, train=data.same_dataset)
        idx = np.asarray(plan.test[cid])
        heat = np.zeros(case.image.shape, np.float32)
        if len(idx):
            heat[idx] = torch.sigmoid(predict_logits(model, case.image, idx, k, bs))[:, 0].numpy()
        dets = group_peaks(
            heat,
            case.attrs,
            _spacing(case),
            min_score=float(s.get("min_score", 0.05)),
            max_distance_mm=float(s.get("group_distance_mm", 10.0)),
            max_slice_gap_mm=float(s.get("group_slice_gap_mm", 15.0)),
            max_detections=int(s.get("max_detections", 100)),
        )
        for d in dets:
            rows.append([cid, f"{d.world[0]:.2f}", f"{d.world[1]:.2f}", f"{d.world[2]:.2f}", f"{d.score:.6f}", f"{d.diameter_mm:.1f}", d.n_slices])
        lesions = lesions_of(data.lesion_table, cid, only_case=len(test_ids) == 1)
        entry: dict[str, Any] = {"case_id": cid, "image": case.attrs.get("source_path"), "lesions": lesions}
        layout = plan.layout.get(cid) if data.same_dataset else None
        if layout is not None:
            # slab split: only lesions centred in the test slabs are ground truth, only test slices predicted
            pts = np.array([[r["x_mm"], r["y_mm"], r["z_mm"]] for r in lesions]).reshape(-1, 3)
            sl = np.rint(world_to_store_index(case.attrs, pts)[:, 0]).astype(int) if len(pts) else np.zeros(0, int)
            inside = (sl >= 0) & (sl < case.num_slices)
            entry["lesions"] = [r for r, ok, s_ in zip(lesions, inside, sl) if ok and layout[s_] == "test"]
            entry["roi_z_mm"] = _z_ranges(case.z_mm, layout == "test")
        entries.append(entry)
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    write_text_atomic(out / "detections.csv", buf.getvalue())
    block = {
        "lesion_table": str(s.get("lesion_table")),
        "hit_rule": "distance",
        "min_hit_radius_mm": float(s.get("min_hit_radius_mm", 5.0)),
        # lesions below this size are irrelevant findings at scoring (LUNA16), see evaluate.metrics
        "min_diameter_mm": float(s.get("min_diameter_mm", 3.0)),
        "fp_rates": [float(v) for v in s.get("fp_rates", [0.125, 0.25, 0.5, 1, 2, 4, 8])],
        "n_scans": len(test_ids),
    }
    return entries, block


def _write_val_csv(path: Path, rows: Sequence[Mapping[str, float]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["step", "val_metric", "val_loss"])
    for r in rows:
        writer.writerow([r["step"], f"{r['val_metric']:.6f}", f"{r['val_loss']:.6f}"])
    write_text_atomic(path, buf.getvalue())
