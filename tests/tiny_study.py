"""A tiny but complete medclust study (synthetic CT phantoms) for workflow-level tests.

Used by tests/test_slurm.py (the study on a real SLURM cluster) and tests/test_profiles.py (the
per-rule resource table of a dry run). Four small CT volumes with two labelled structures, one
pretraining method with a handful of steps, one segmentation task with a minimal grid.
"""

from __future__ import annotations

import copy
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml

#: Pretraining steps of the tiny study; the SLURM test interrupts the run part-way.
PRETRAIN_STEPS = 60


def phantom(shape=(40, 40, 12), seed=0) -> tuple[np.ndarray, np.ndarray]:
    """An int16 CT phantom (HU) and its labels: 1 = body, 2 = a bright disc that moves with z."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    body = (x / 0.8) ** 2 + (y / 0.7) ** 2 < 1
    disc = (x - 0.3 * z) ** 2 + (y + 0.1) ** 2 < 0.06 + 0.02 * seed
    hu = np.where(body, 30.0, -1000.0) + np.where(disc, 700.0, 0.0) + rng.normal(0, 15, shape)
    label = body.astype(np.uint8) + (disc & body).astype(np.uint8)
    return hu.astype(np.int16), label


def write_data(root: Path, cases: int = 4) -> Path:
    """Write ``root/data/ct/{images,labels}/*.nii.gz`` and ``manifest.tsv``; returns the manifest."""
    folder = root / "data" / "ct"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    affine = np.diag([2.0, 2.0, 4.0, 1.0])
    rows = ["image\tlabel\tmodality"]
    for i in range(cases):
        image, label = phantom(seed=i)
        nib.save(nib.Nifti1Image(image, affine), str(folder / "images" / f"ph{i}.nii.gz"))
        nib.save(nib.Nifti1Image(label, affine), str(folder / "labels" / f"ph{i}.nii.gz"))
        rows.append(f"images/ph{i}.nii.gz\tlabels/ph{i}.nii.gz\tCT")
    manifest = folder / "manifest.tsv"
    manifest.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return manifest


CONFIG = {
    "results_dir": "results",
    "resources_dir": "resources",
    "seed": 0,
    "on_bad_input": "skip",
    "preprocess": {"spacing": [4.0, 4.0, 4.0], "size": [32, 32], "slice_axis": 2},
    "datasets": {"ct": {"format": "manifest", "path": "data/ct/manifest.tsv", "modality": "CT"}},
    "splits": {"val_fraction": 0.25, "test_fraction": 0.25},
    "pretrain": {
        "methods": ["joint"],
        "backbone": "resnet10",
        "d_model": 32,
        "proj_dim": 16,
        "heads": 2,
        "points": 2,
        "layers": 1,
        "k_2d": 8,
        "k_3d": 4,
        "queue_length": 0,
        "queue_length_3d": 0,
        "freeze_prototypes_steps": 0,
        "s_max": 8,
        "batch_size_2d": 20,  # > batch_size_3d * s_max: volume slices count inside the 2D batch
        "batch_size_3d": 2,
        "view_size": [32, 32],
        "volume_size": [32, 32],
        "steps": PRETRAIN_STEPS,
        "warmup_steps": 2,
        "checkpoint_every": 5,
        "log_every": 1,
        "amp": False,
        "num_workers": 0,
        "embed_max_slices": 8,
    },
    "finetune": {
        "inits": ["none", "joint"],
        "fractions": [1.0],
        "seeds": [0],
        "steps": 4,
        "warmup_steps": 1,
        "batch_size": 4,
        "eval_every": 2,
        "checkpoint_every": 2,
        "log_every": 1,
        "amp": False,
        "min_cases": 1,
        "decoder_channels": [16, 8, 8, 8, 8],
        "tasks": {"body": {"type": "segmentation", "dataset": "ct"}},
    },
    "study": {"bootstrap_samples": 100},
    # every rule on one CPU, small memory: the test cluster is a 2-core machine
    "resources": {},
}


def write_study(root: Path, cases: int = 4, **overrides) -> Path:
    """Synthetic data plus ``root/config.yaml``; ``overrides`` replace top-level config keys.

    Returns:
        The config file.
    """
    root.mkdir(parents=True, exist_ok=True)
    write_data(root, cases)
    config = copy.deepcopy(CONFIG)
    config.update(overrides)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path
