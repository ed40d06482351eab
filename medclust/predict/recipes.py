"""The model packages of the two training recipes, and what a slice store says about its preprocessing.

:func:`write_finetune_package` is called at the end of every fine-tuning run (the run folder
becomes the package), :func:`write_pretrain_package` at the end of every pretraining run. Both
take the preprocessing from the training slice stores' own attrs
(:func:`store_preprocessing`), never from the config. The format is in
:mod:`medclust.predict.package`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medclust.errors import BadInputError, MedclustError
from medclust.predict.package import write_package

__all__ = ["store_preprocessing", "write_finetune_package", "write_pretrain_package"]

# store `normalisation` keys that describe one image, not the dataset (recomputed per input)
_PER_IMAGE_KEYS = ("values", "antialias_block")
# files of a slice store folder that are not dataset-level intensity information
_STORE_BOOKKEEPING = {"index.json", "splits.json"}


# -- what the training store says about preprocessing ------------------------------------------------


def _json_value(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def store_preprocessing(store_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The preprocessing a slice store's images went through, read from its own attrs.

    Args:
        store_dir: ``results/slices/{dataset}`` (``index.json`` + one ``.h5`` per case).

    Returns:
        ``{"dataset", "settings", "modalities", "normalisation": {modality: record}, "store_dtype",
        "intensity": {file name: content} (dataset-level intensity files, if any)}``; ``settings``
        is None for a store written before the ``preprocess`` attr existed (such a package cannot
        be applied to new images).

    Raises:
        BadInputError: no index, no cases, or cases preprocessed with different settings.
    """
    import h5py

    from medclust.io.slice_store import read_attrs

    folder = Path(store_dir)
    index_path = folder / "index.json"
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise BadInputError(index_path, f"cannot read slice store index ({err})") from err
    entries = index.get("cases") or []
    if not entries:
        raise BadInputError(index_path, "slice store lists no cases")
    settings: dict[str, Any] | None = None
    normalisation: dict[str, dict[str, Any]] = {}
    varying: dict[str, set[str]] = {}
    dtype = None
    for entry in entries:
        path = folder / entry.get("file", f"{entry['case_id']}.h5")
        attrs = read_attrs(path)
        prep = _json_value(attrs.get("preprocess"))
        prep = prep if isinstance(prep, dict) else None  # stores written before the attr existed
        if entry is entries[0]:
            settings = prep
        elif prep != settings:
            raise BadInputError(path, f"preprocessed with other settings than the rest of {folder.name} ({prep} vs {settings})")
        modality = str(attrs.get("modality") or "")
        record = _json_value(attrs.get("normalisation"))
        record = dict(record) if isinstance(record, dict) else {}
        if modality not in normalisation:
            normalisation[modality] = record
            varying[modality] = set()
        else:
            first = normalisation[modality]
            varying[modality] |= {k for k in set(first) | set(record) if first.get(k) != record.get(k)}
        if dtype is None:
            with h5py.File(path, "r") as handle:
                dtype = str(handle["image"].dtype)
    for modality, keys in varying.items():
        # per-image measurements (percentile values, anti-alias blocks) are recomputed on each input
        for key in keys | set(_PER_IMAGE_KEYS):
            normalisation[modality].pop(key, None)
    intensity = {}
    for extra in sorted(folder.glob("*.json")):
        if extra.name not in _STORE_BOOKKEEPING and "intensity" in extra.name:
            intensity[extra.name] = json.loads(extra.read_text(encoding="utf-8"))
    return {
        "dataset": str(index.get("dataset") or folder.name),
        "settings": settings,
        "modalities": sorted(m for m in normalisation if m),
        "normalisation": normalisation,
        "store_dtype": dtype,
        "intensity": intensity,
    }


# -- packages of the two training recipes ----------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    from medclust.io.atomic import staged_path

    try:  # a file the run wrote in a publish_together block is still at its temporary name
        return json.loads(staged_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _provenance_basics() -> dict[str, Any]:
    from medclust import __version__
    from medclust.provenance import git_commit

    return {"medclust_version": __version__, "git_commit": git_commit()}


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def write_finetune_package(
    run_dir: str | os.PathLike[str],
    model: nn.Module | Mapping[str, torch.Tensor],
    settings: Mapping[str, Any],
    train_store: str | os.PathLike[str],
    label_map: Mapping[int, int] | None = None,
) -> Path:
    """Write the package of a fine-tuning run (``model.json``, then ``model.pt``) into its folder.

    Reads the run's own ``run.json`` (classes, type, selection, cases) and ``metrics.json``
    (test scores), and the training store's preprocessing (:func:`store_preprocessing`).

    Args:
        run_dir: the run folder (holds ``run.json``, and ``metrics.json`` once scored).
        model: the selected model or its state dict.
        settings: the run's resolved settings (architecture and inference keys).
        train_store: slice store the model was trained on.
        label_map: raw training label value -> class (kept for segmentation, where the output
            values are these classes).

    Returns:
        The path of ``model.pt``.
    """
    run_dir = Path(run_dir)
    run = _read_json(run_dir / "run.json")
    if not run:
        raise MedclustError(f"{run_dir / 'run.json'}: needed to write the model package")
    metrics = _read_json(run_dir / "metrics.json")
    kind = str(run["type"])
    classes = {str(k): str(v) for k, v in (run.get("classes") or {}).items()}
    k = int(run.get("context_slices", settings.get("context_slices", 0)))
    if kind == "segmentation":
        num_outputs = max(int(c) for c in classes) + 1
        classes = {"0": "background", **classes}
    elif kind == "classification":
        num_outputs = len(classes)
    else:
        num_outputs = 1
    if kind != "segmentation":
        label_map = None
    state = model.state_dict() if isinstance(model, nn.Module) else model
    prep = store_preprocessing(train_store)
    meta: dict[str, Any] = {
        "task": {
            "name": run.get("task"),
            "type": kind,
            "level": run.get("level", "slice"),
            "multilabel": bool(run.get("multilabel", False)),
            "trained_on": run.get("trained_on"),
        },
        "network": {
            "builder": "medclust.models.heads.build_task_model",
            "monai_class": "monai.networks.nets.FlexibleUNet" if kind in ("segmentation", "detection") else None,
            "backbone": str(settings.get("backbone", "resnet10")),
            "spatial_dims": 2,
            "context_slices": k,
            "in_channels": 2 * k + 1,
            "num_outputs": num_outputs,
            "decoder_channels": [int(c) for c in settings.get("decoder_channels", (256, 128, 64, 32, 16))],
            "head": str(settings.get("head", "linear")),
            "hidden": int(settings.get("hidden", 256)),
            "dropout": float(settings.get("dropout", 0.0)),
            "pad_multiple": 32,
        },
        "classes": classes,
        "label_map": {str(r): int(c) for r, c in sorted((label_map or {}).items())} or None,
        "preprocessing": {prep["dataset"]: prep},
        "inference": {
            "batch_size": int(settings.get("predict_batch_size", 16)),
            "bag_size": int(settings.get("bag_size", 8)),
            "detection": {
                "min_score": float(settings.get("min_score", 0.05)),
                "group_distance_mm": float(settings.get("group_distance_mm", 10.0)),
                "group_slice_gap_mm": float(settings.get("group_slice_gap_mm", 15.0)),
                "max_detections": int(settings.get("max_detections", 100)),
            }
            if kind == "detection"
            else None,
        },
        "training": {
            **_provenance_basics(),
            "recipe": "finetune",
            "dataset": run.get("dataset"),
            "train_dataset": run.get("train_dataset"),
            "init": run.get("init"),
            "encoder": run.get("encoder"),
            "fraction": run.get("fraction"),
            "seed": run.get("seed"),
            "mode": run.get("mode"),
            "selection": run.get("selection"),
            "n_train_items": run.get("n_train_items"),
            "train_cases": run.get("train_cases"),
            "val_cases": run.get("val_cases"),
            "notes": run.get("notes"),
            "settings": _plain({k_: v for k_, v in settings.items() if not str(k_).endswith("_entry")}),
        },
        "metrics": {
            "test_dataset": metrics.get("dataset"),
            "primary_metric": metrics.get("primary_metric"),
            "n_cases": metrics.get("n_cases"),
            "simulated": metrics.get("simulated"),
            "values": metrics.get("metrics"),
        }
        if metrics
        else None,
    }
    return write_package(run_dir, meta, state, "model.pt")


def write_pretrain_package(
    out_dir: str | os.PathLike[str],
    encoder_state: Mapping[str, torch.Tensor],
    method: str,
    settings: Mapping[str, Any],
    stores: Sequence[str | os.PathLike[str]],
    metrics: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write the package of a pretraining run (``model.json``, then ``encoder.pt``).

    Args:
        out_dir: ``results/pretrain/{method}``.
        encoder_state: the ``ResNetEncoder`` state dict (the ``encoder.pt`` format).
        method: pretraining method.
        settings: resolved ``pretrain`` settings (``backbone``, ``d_model``, ``seed`` ...).
        stores: slice store folders it was trained on.
        metrics: final training metrics (last logged row).
        extra: further provenance (steps, cases ...).

    Returns:
        The path of ``encoder.pt``.
    """
    backbone = str(settings.get("backbone", "resnet10"))
    prep = {}
    for store in stores:
        block = store_preprocessing(store)
        prep[block["dataset"]] = block
    meta = {
        "task": {"name": method, "type": "encoder", "level": "slice", "multilabel": False},
        "network": {
            "builder": "monai.networks.nets.resnet.ResNetEncoder",
            "monai_class": "monai.networks.nets.resnet.ResNetEncoder",
            "backbone": backbone,
            "spatial_dims": 2,
            "context_slices": 0,
            "in_channels": 1,
            "num_outputs": 0,
            "d_model": settings.get("d_model"),
            "load_into": (
                f"FlexibleUNet(in_channels, out_channels, backbone='{backbone}', pretrained=False, spatial_dims=2)"
                ".encoder.load_state_dict(torch.load('encoder.pt', weights_only=True)); for 2k+1 input channels "
                "medclust.models.heads.load_encoder_weights adapts the first convolution"
            ),
        },
        "classes": {},
        "label_map": None,
        "preprocessing": prep,
        "inference": {},
        "training": {**_provenance_basics(), "recipe": "pretrain", "method": method, "settings": _plain(dict(settings)), **_plain(dict(extra or {}))},
        "metrics": _plain(dict(metrics)) if metrics else None,
    }
    return write_package(out_dir, meta, encoder_state, "encoder.pt")
