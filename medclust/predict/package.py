"""Model packages: the weights of a trained model plus ``model.json``, everything needed to apply it.

A package is a folder holding ``model.json`` and the weights file it names. Every fine-tuning run
folder is one (``model.json`` + ``model.pt``) and so is every pretraining folder (``model.json`` +
``encoder.pt``); copying those two files anywhere gives a working package.

``model.json`` (``format: medclust-model``, ``format_version`` 1):

- ``task``: ``name``, ``type`` (segmentation | classification | detection | encoder), ``level``
  (slice | case), ``multilabel``;
- ``network``: how to rebuild the model (:func:`medclust.models.heads.build_task_model`
  arguments: ``backbone``, ``in_channels`` = 2 * ``context_slices`` + 1, ``num_outputs``,
  ``decoder_channels``, ``head``, ``hidden``, ``dropout``) and the MONAI class it is (or wraps);
- ``classes``: output value -> name (segmentation: the label value written in the output map,
  0 = background); ``label_map``: raw training label value -> class, when labels were grouped;
- ``preprocessing``: per training dataset, the ``preprocess`` settings exactly as recorded in the
  training slice store (spacing, size, slice_axis, windows/percentiles, any normalisation mode),
  the normalisation record of each modality (store ``normalisation`` attrs, keys equal across the
  dataset's cases; per-image values such as measured percentiles are recomputed on each input),
  any dataset-level intensity file of the store, and the store dtype (inputs are rounded to it,
  as the training images were);
- ``inference``: batch size, detection grouping options, bag size of case-level classification;
- ``weights``: file name, sha256 (checked on load), format (a ``state_dict``);
- ``training``: provenance (datasets, init/encoder, fraction, seed, steps, selection, cases,
  medclust version, git commit, settings); ``metrics``: the run's test scores.

Nothing in a package is re-typed from the config: preprocessing comes from the store attrs the
model was trained on, classes and architecture from the run itself
(:mod:`medclust.predict.recipes` writes the packages of the two training recipes).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medclust.errors import BadInputError, MedclustError
from medclust.io.atomic import write_bytes_atomic, write_json_atomic

__all__ = ["FORMAT", "FORMAT_VERSION", "PACKAGE_FILE", "TASK_TYPES", "ModelPackage", "load_package", "write_package"]

FORMAT = "medclust-model"
FORMAT_VERSION = 1
PACKAGE_FILE = "model.json"
TASK_TYPES = ("segmentation", "classification", "detection", "encoder")


@dataclass
class ModelPackage:
    """A loaded ``model.json`` and the folder it lives in.

    Attributes:
        folder: the package folder.
        meta: the parsed ``model.json``.
    """

    folder: Path
    meta: dict[str, Any]

    @property
    def task_type(self) -> str:
        """segmentation, classification, detection or encoder."""
        return str(self.meta["task"]["type"])

    @property
    def name(self) -> str:
        """The task (or pretraining method) name."""
        return str(self.meta["task"].get("name") or self.task_type)

    @property
    def classes(self) -> dict[int, str]:
        """Output value / index -> class name."""
        return {int(k): str(v) for k, v in (self.meta.get("classes") or {}).items()}

    @property
    def context_slices(self) -> int:
        """k of the 2.5D input (2k+1 neighbouring slices as channels)."""
        return int(self.meta["network"].get("context_slices", 0))

    @property
    def weights_path(self) -> Path:
        """The weights file."""
        return self.folder / str(self.meta["weights"]["file"])

    @property
    def preprocessing(self) -> dict[str, Any]:
        """The preprocessing block of the (single) training dataset.

        Raises:
            MedclustError: the package lists several datasets (an encoder) or none.
        """
        blocks = self.meta.get("preprocessing") or {}
        if len(blocks) != 1:
            raise MedclustError(
                f"{self.folder / PACKAGE_FILE}: preprocessing lists {len(blocks)} datasets "
                f"({', '.join(blocks) or 'none'}); a task model has exactly one"
            )
        return dict(next(iter(blocks.values())))

    def load_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights (``torch.load(weights_only=True)``), checked against ``model.json``'s sha256.

        Raises:
            BadInputError: missing or unreadable file, or a checksum that does not match.
        """
        path = self.weights_path
        try:
            raw = path.read_bytes()
        except OSError as err:
            raise BadInputError(path, f"cannot read model weights ({err.strerror or err})") from err
        expected = self.meta["weights"].get("sha256")
        if expected and hashlib.sha256(raw).hexdigest() != expected:
            raise BadInputError(path, f"weights do not match {PACKAGE_FILE} (sha256 differs): file replaced or damaged")
        try:
            state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for a corrupt archive
            raise BadInputError(path, f"cannot load model weights ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from err
        if not isinstance(state, Mapping):
            raise BadInputError(path, f"expected a state dict, found {type(state).__name__}")
        return dict(state)

    def build_model(self, load_weights: bool = True) -> nn.Module:
        """The network described by ``network``, with the package's weights (strict), in eval mode.

        Raises:
            MedclustError: an encoder package (no task head) or weights that do not fit.
        """
        from medclust.models.heads import build_task_model

        if self.task_type == "encoder":
            raise MedclustError(
                f"{self.folder / PACKAGE_FILE}: a pretrained encoder has no task head; fine-tune it first "
                "(or load it into FlexibleUNet, see `medclust export --bundle`)"
            )
        net = self.meta["network"]
        model = build_task_model(
            self.task_type,
            in_channels=int(net["in_channels"]),
            num_outputs=int(net["num_outputs"]),
            backbone=str(net["backbone"]),
            decoder_channels=tuple(int(c) for c in net.get("decoder_channels", (256, 128, 64, 32, 16))),
            head=str(net.get("head", "linear")),
            hidden=int(net.get("hidden", 256)),
            dropout=float(net.get("dropout", 0.0)),
        )
        if load_weights:
            try:
                model.load_state_dict(self.load_state_dict(), strict=True)
            except RuntimeError as err:
                raise BadInputError(self.weights_path, f"weights do not fit the network of {PACKAGE_FILE}: {str(err).splitlines()[0]}") from err
        return model.eval()


def _check_meta(meta: Any, where: Path) -> dict[str, Any]:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BadInputError(where, f"not a medclust model package (no \"format\": \"{FORMAT}\")")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise BadInputError(where, f"package format_version {version!r} is newer than this medclust reads ({FORMAT_VERSION}); update medclust")
    for key in ("task", "network", "weights"):
        if not isinstance(meta.get(key), dict):
            raise BadInputError(where, f"'{key}' missing or not an object")
    if meta["task"].get("type") not in TASK_TYPES:
        raise BadInputError(where, f"task.type must be one of {', '.join(TASK_TYPES)}, got {meta['task'].get('type')!r}")
    if not meta["weights"].get("file"):
        raise BadInputError(where, "weights.file missing")
    return meta


def load_package(path: str | os.PathLike[str]) -> ModelPackage:
    """Open a package: its folder (a run folder), or its ``model.json``.

    Args:
        path: package folder, fine-tuning or pretraining run folder, or a ``model.json`` file.

    Returns:
        The package.

    Raises:
        BadInputError: no ``model.json``, unreadable, or not a supported package.
    """
    p = Path(path)
    file = p if p.is_file() else p / PACKAGE_FILE
    if not file.is_file():
        hint = ""
        if (p / "run.json").is_file() or (p / "encoder.pt").is_file():
            hint = " (the run predates model packages: rerun it to write one)"
        raise BadInputError(p, f"no {PACKAGE_FILE}: not a model package or run folder{hint}")
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise BadInputError(file, f"cannot read model package ({err})") from err
    return ModelPackage(folder=file.parent, meta=_check_meta(meta, file))


def write_package(folder: str | os.PathLike[str], meta: Mapping[str, Any], state: Mapping[str, torch.Tensor], weights_name: str = "model.pt") -> Path:
    """Write ``model.json`` and then the weights (last, so the weights file marks completion).

    Both go through :mod:`medclust.io.atomic` (temporary name + rename; inside a
    ``publish_together`` block they appear with the run's other outputs).

    Args:
        folder: the package (run) folder.
        meta: ``model.json`` without ``format``/``format_version``/``weights`` (filled in here).
        state: the model's state dict (copied to CPU).
        weights_name: weights file name inside ``folder``.

    Returns:
        The weights path.
    """
    folder = Path(folder)
    buffer = io.BytesIO()
    torch.save({k: v.detach().to("cpu") for k, v in state.items()}, buffer)
    raw = buffer.getvalue()
    record = {"format": FORMAT, "format_version": FORMAT_VERSION, **dict(meta)}
    record["weights"] = {"file": weights_name, "format": "state_dict", "sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw)}
    _check_meta(json.loads(json.dumps(record, default=str)), folder / PACKAGE_FILE)
    write_json_atomic(folder / PACKAGE_FILE, record)
    weights = folder / weights_name
    write_bytes_atomic(weights, raw)
    return weights
