"""Fine-tuning data: a task's slice stores, targets, splits and label fraction (:func:`prepare_task_data`).

Loads the task's store(s), derives the targets (label groups, slice-level labels, centre heatmaps
of lesions or simulated nodules), splits cases/slabs into train/val/test
(:func:`medclust.data.splits.plan_splits`) and keeps the seeded, nested label fraction of the
training items. Used by :mod:`medclust.train.recipes.finetune`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medclust.data.downstream import (
    TaskCase,
    gaussian_heatmap,
    load_cases,
    read_store_json,
    remap_labels,
    resolve_label_groups,
    simulate_nodules,
    slice_centre_heatmap,
    slice_targets_from_mask,
)
from medclust.data.splits import SplitPlan, plan_splits
from medclust.errors import BadInputError, MedclustError
from medclust.io.original_grid import world_to_store_index
from medclust.preprocess.intensity import hu_to_store, store_value_range

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
    training and, alike, of validation (:func:`medclust.data.splits.apply_label_fraction`)."""
    from medclust.data.splits import apply_label_fraction

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
