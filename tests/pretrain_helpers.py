"""Tiny synthetic slice stores (contract format) and settings for the pretraining tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from medclust.io.slice_store import write_case

SIZE = 16


def make_store(root: Path, name: str, modality: str, cases: dict[str, tuple[int, str]], size: int = SIZE, seed: int = 0) -> Path:
    """Write ``root/name/{case}.h5`` + index.json + splits.json.

    Args:
        root: parent folder.
        name: dataset name.
        modality: CT, MR or XR.
        cases: case id -> (number of slices, split).
        size: in-plane size.
        seed: pixel noise seed.

    Returns:
        The store folder.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    index, splits = [], {"dataset": name, "seed": 0, "train": [], "val": [], "test": []}
    yy, xx = np.mgrid[:size, :size] / size
    for case_id, (n_slices, split) in cases.items():
        phase = rng.uniform(0, 3)
        image = np.stack(
            [0.5 + 0.3 * np.sin(6 * xx + 0.4 * s + phase) * np.cos(4 * yy + phase) + 0.05 * rng.standard_normal((size, size)) for s in range(n_slices)]
        ).clip(0, 1)
        attrs = {
            "case_id": case_id, "dataset": name, "modality": modality, "simulated": False, "source_path": f"{case_id}.nii.gz",
            "source_sha256": "0" * 64, "label_path": "", "original_shape": [size, size, n_slices], "original_spacing": [1.0, 1.0, 2.5],
            "original_affine": np.eye(4), "store_affine": np.eye(4), "target_spacing": [1.0, 1.0, 2.5], "slice_axis": 2,
            "z_positions_mm": (np.arange(n_slices) * 2.5 - 10.0).tolist(), "normalisation": "{}", "medclust_version": "test",
        }
        write_case(folder / f"{case_id}.h5", image.astype(np.float32), attrs)
        index.append({
            "case_id": case_id, "file": f"{case_id}.h5", "modality": modality, "num_slices": n_slices,
            "shape": [n_slices, size, size], "label_classes": [], "simulated": False, "class_label": None,
        })
        splits[split].append(case_id)
    (folder / "index.json").write_text(json.dumps({"dataset": name, "cases": index}), encoding="utf-8")
    (folder / "splits.json").write_text(json.dumps(splits), encoding="utf-8")
    return folder


def make_stores(root: Path) -> dict[str, Path]:
    """A CT store (3 train, 1 val, 1 test volume) and an X-ray store (3 train images, no val)."""
    ct = make_store(root, "ct", "CT", {"ct_a": (10, "train"), "ct_b": (8, "train"), "ct_c": (9, "train"), "ct_v": (9, "val"), "ct_t": (7, "test")})
    xr = make_store(root, "xr", "XR", {"xr_1": (1, "train"), "xr_2": (1, "train"), "xr_3": (1, "train")}, seed=1)
    return {"ct": ct, "xr": xr}


def tiny_settings(**overrides: Any) -> dict[str, Any]:
    """A pretraining config small enough for unit tests (resnet10 on 16x16, light augmentation)."""
    settings: dict[str, Any] = {
        "backbone": "resnet10", "d_model": 32, "proj_dim": 16, "heads": 2, "points": 2, "layers": 1,
        "k_2d": 6, "k_3d": 3, "queue_length": 0, "queue_length_3d": 0, "s_max": 4, "batch_size_2d": 10,
        "batch_size_3d": 1, "view_size": [SIZE, SIZE], "volume_size": [SIZE, SIZE], "steps": 24, "lr": 1e-3,
        "warmup_steps": 2, "freeze_prototypes_steps": 5, "checkpoint_every": 100, "log_every": 1,
        "num_workers": 0, "embed_max_slices": 0, "seed": 0,
        "augment": {"crop_scale": [0.8, 1.0], "affine_prob": 0.0, "noise_prob": 0.0, "contrast_prob": 0.3, "intensity_prob": 0.3},
    }
    settings.update(overrides)
    return settings
