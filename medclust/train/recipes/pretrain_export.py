"""Embeddings of a pretrained model (``embeddings.npz``): slice and volume vectors with their clusters."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from medclust.data.pretrain_datasets import CaseArrays, PretrainCase, collect_cases, eval_volume_indices, resize_slices
from medclust.io.atomic import atomic_path
from medclust.models import JointModel, masked_mean

__all__ = ["export_cases", "export_embeddings"]


def export_cases(stores: Any) -> tuple[list[PretrainCase], dict[str, str]]:
    """Validation cases of each dataset, or its training cases when it has none."""
    cases = collect_cases(stores, ("train", "val"))
    chosen, used = [], {}
    for dataset in dict.fromkeys(c.dataset for c in cases):
        val = [c for c in cases if c.dataset == dataset and c.split == "val"]
        if val:
            chosen += val
            used[dataset] = "val"
        else:
            chosen += [c for c in cases if c.dataset == dataset]
            used[dataset] = "train (no validation cases)"
    return chosen, used


@torch.no_grad()
def export_embeddings(
    model: JointModel,
    arrays: CaseArrays,
    settings: Mapping[str, Any],
    method: str,
    path: str | os.PathLike[str],
    splits_used: Mapping[str, str],
    device: torch.device | None = None,
    chunk: int = 64,
) -> dict[str, np.ndarray]:
    """Slice and volume embeddings of the given cases, with cluster assignments, as ``.npz``.

    Slice embeddings are the encoder's ``d_model`` vectors of every slice (at most
    ``embed_max_slices`` evenly spaced per case), cluster = argmax of the 2D prototypes. Volume
    embeddings (cases with >= 2 slices, ``s_max`` evenly spaced slices): for ``joint`` the mean
    of the slice-attention outputs, cluster = argmax of the 3D prototypes; for the other
    methods, which have no trained 3D branch, the mean slice embedding and cluster -1.

    Args:
        model: the trained model.
        arrays: the cases to embed.
        settings: resolved settings.
        method: the method name (stored in the metadata).
        path: the ``embeddings.npz`` to write (atomically).
        splits_used: dataset -> which split's cases were embedded (metadata).
        device: where to run (default CPU).
        chunk: slices per forward pass.

    Returns:
        The arrays written.
    """
    device = device or torch.device("cpu")
    model = model.to(device).eval()
    s = settings
    view_size, volume_size, s_max = tuple(s["view_size"]), tuple(s["volume_size"]), int(s["s_max"])
    attention_pooling = model.has_volume_branch  # joint; the 2D-only methods have no trained 3D branch
    slice_rows: dict[str, list[Any]] = {k: [] for k in ("emb", "dataset", "modality", "cluster", "case", "index")}
    vol_rows: dict[str, list[Any]] = {k: [] for k in ("emb", "dataset", "modality", "cluster", "case")}

    def embed(images: np.ndarray, size: tuple[int, ...]) -> Tensor:
        x = resize_slices(torch.from_numpy(images), size)
        return torch.cat([model.embed_slices(x[i : i + chunk, None].to(device)) for i in range(0, len(x), chunk)])

    limit = int(s["embed_max_slices"])
    for c, case in enumerate(arrays.cases):
        n = case.num_slices
        idx = eval_volume_indices(n, limit) if limit > 0 else np.arange(n)
        emb = embed(arrays.slices(c, idx), view_size)
        clusters = model.prototypes_2d(model.project_2d(emb)).argmax(1)
        slice_rows["emb"].append(emb.float().cpu())
        slice_rows["cluster"].append(clusters.cpu())
        slice_rows["index"].append(torch.from_numpy(idx))
        for key, value in (("dataset", case.dataset), ("modality", case.modality), ("case", case.case_id)):
            slice_rows[key] += [value] * len(idx)
        if n < 2:
            continue
        vidx = eval_volume_indices(n, s_max)
        if attention_pooling:
            tokens = embed(arrays.slices(c, vidx), volume_size)[None]
            valid = torch.ones(1, len(vidx), dtype=torch.bool, device=device)
            z = torch.from_numpy(arrays.z_mm[c][vidx]).to(device)[None]
            out, vol = model.embed_volume(tokens, z, valid)
            rep = masked_mean(out, valid)[0]
            cluster = int(model.prototypes_3d(vol).argmax(1)[0])
        else:
            rep = embed(arrays.slices(c, vidx), view_size).mean(0)
            cluster = -1
        vol_rows["emb"].append(rep.float().cpu()[None])
        vol_rows["cluster"].append(cluster)
        for key, value in (("dataset", case.dataset), ("modality", case.modality), ("case", case.case_id)):
            vol_rows[key].append(value)

    d = model.d_model
    meta = {
        "method": method,
        "cases_embedded": dict(splits_used),
        "slice_embedding": f"SliceEncoder output (d_model={d}); at most {limit or 'all'} slices per case, resized to {list(view_size)}",
        "slice_cluster": "argmax of the 2D (intra) prototypes",
        "volume_embedding": (
            f"mean of slice-attention outputs over {s_max} evenly spaced slices" if attention_pooling else f"mean slice embedding over {s_max} evenly spaced slices"
        ),
        "volume_cluster": "argmax of the 3D (inter) prototypes" if attention_pooling else "-1: this method has no trained volume prototypes",
    }
    arrays_out = {
        "slice_embeddings": torch.cat(slice_rows["emb"]).numpy() if slice_rows["emb"] else np.zeros((0, d), np.float32),
        "slice_dataset": np.asarray(slice_rows["dataset"], dtype=str),
        "slice_modality": np.asarray(slice_rows["modality"], dtype=str),
        "slice_cluster": torch.cat(slice_rows["cluster"]).numpy().astype(np.int64) if slice_rows["cluster"] else np.zeros(0, np.int64),
        "slice_case": np.asarray(slice_rows["case"], dtype=str),
        "slice_index": torch.cat(slice_rows["index"]).numpy().astype(np.int64) if slice_rows["index"] else np.zeros(0, np.int64),
        "volume_embeddings": torch.cat(vol_rows["emb"]).numpy() if vol_rows["emb"] else np.zeros((0, d), np.float32),
        "volume_dataset": np.asarray(vol_rows["dataset"], dtype=str),
        "volume_modality": np.asarray(vol_rows["modality"], dtype=str),
        "volume_cluster": np.asarray(vol_rows["cluster"], dtype=np.int64),
        "volume_case": np.asarray(vol_rows["case"], dtype=str),
        "meta": np.asarray(json.dumps(meta)),
    }
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays_out)
    model.train()
    return arrays_out
