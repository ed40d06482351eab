"""``medclust export --bundle``: a model package as a MONAI bundle.

Layout written (the MONAI bundle specification)::

    configs/metadata.json    versions, task, classes, network_data_format, the package's model.json
    configs/inference.json   network_def, preprocessing, inferer, postprocessing, initialize, run
    models/model.pt          the weights (a state dict of the network in ``network_def``)
    models/model.json        the medclust package description (``medclust predict --model models``)
    docs/README.md           how to run it and how the weights load

Segmentation and detection networks are plain MONAI ``FlexibleUNet`` s, so ``network_def``
needs nothing but MONAI; a classification network is medclust's ``ClassificationNet``. The
preprocessing (read + QC + the training store's preprocessing), the 2.5D channels and the way
back onto the input grid are the transforms below, the same code ``medclust predict`` runs, so a
bundle run and ``medclust predict`` give the same labels. Inference is MONAI's ``SliceInferer``.

Run it (``monai.bundle`` needs no medclust CLI, only the package importable)::

    from monai.bundle import run
    run(config_file="BUNDLE/configs/inference.json", meta_file="BUNDLE/configs/metadata.json",
        bundle_root="BUNDLE", input_files=["scan.nii.gz"], output_dir="out")

(``python -m monai.bundle run --config_file ...`` is the same from a shell; it needs ``fire``.)

A pretrained encoder's bundle holds the ``ResNetEncoder`` weights and two networks,
``network_def`` (the encoder) and ``flexible_unet_def``, with ``load_into_flexible_unet`` loading
the weights into the FlexibleUNet's encoder (``strict=True``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform
from torch import nn

from medclust.io.atomic import write_json_atomic, write_text_atomic
from medclust.io.sources import CaseEntry, sanitize_case_id, strip_image_suffix
from medclust.predict.apply import classify_slices, context_channels, detection_rows, probability_column
from medclust.predict.package import ModelPackage, load_package, write_package
from medclust.predict.prepare import InputPreparer, PreparedInput

__all__ = [
    "ClassifySlices",
    "PrepareInputd",
    "SaveDetectionsd",
    "SaveOnInputGridd",
    "SaveProbabilitiesd",
    "export_bundle",
]

BUNDLE_VERSION = "0.1.0"
_SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json"


# -- transforms used by inference.json -------------------------------------------------------------


class PrepareInputd(MapTransform):
    """Read a path, QC and preprocess it as the package's training store was made, as 2.5D channels.

    ``data[key]`` (a file or DICOM series folder) becomes the ``(2k+1, S, H', W')`` tensor of
    :func:`medclust.predict.apply.context_channels`; ``data[f"{key}_prepared"]`` keeps the
    :class:`PreparedInput` (its grid, for writing the result back on the input grid).

    Args:
        keys: keys holding input paths.
        package_dir: the bundle's ``models`` folder (holds ``model.json``).
        modality: force CT/MR/XR (default: header, else the training modality).
        pad: pad in-plane to the package's multiple (dense networks); classification: False.
    """

    def __init__(self, keys: Any, package_dir: str | os.PathLike[str], modality: str | None = None, pad: bool = True) -> None:
        super().__init__(keys)
        self.package = load_package(package_dir)
        self.preparer = InputPreparer(self.package)
        self.modality = modality
        self.pad = int(self.package.meta["network"].get("pad_multiple", 32)) if pad else 1

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            path = Path(str(d[key]))
            entry = CaseEntry(sanitize_case_id(strip_image_suffix(path.name)), str(path))
            prepared = self.preparer.prepare(entry, self.modality)
            d[key] = context_channels(prepared.slices, self.package.context_slices, self.pad)
            d[f"{key}_prepared"] = prepared
        return d


def _array(pred: Any) -> np.ndarray:
    return torch.as_tensor(pred).detach().cpu().numpy()


class SaveOnInputGridd(MapTransform):
    """Write a label map ``(1, S, H', W')`` (``AsDiscreted(argmax=True)`` output) on the input's grid.

    Args:
        keys: prediction keys.
        output_dir: folder for ``{case}.nii.gz``.
        prepared_key: key of the :class:`PreparedInput` (``image_prepared``).
    """

    def __init__(self, keys: Any, output_dir: str | os.PathLike[str], prepared_key: str = "image_prepared") -> None:
        super().__init__(keys)
        self.output_dir = Path(output_dir)
        self.prepared_key = prepared_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from medclust.io.original_grid import store_to_original, write_label_nifti

        d = dict(data)
        prepared: PreparedInput = d[self.prepared_key]
        s, h, w = prepared.slices.shape
        for key in self.key_iterator(d):
            labels = _array(d[key])[0, :s, :h, :w].astype(np.int16)
            path = self.output_dir / f"{prepared.entry.case_id}.nii.gz"
            write_label_nifti(path, store_to_original(labels, prepared.attrs), prepared.image.affine)
            d[f"{key}_path"] = str(path)
        return d


class _TableWriter(MapTransform):
    """Append rows per input and rewrite ``output_dir/name`` (atomically) after each one."""

    columns: list[str] = []

    def __init__(self, keys: Any, output_dir: str | os.PathLike[str], name: str, prepared_key: str = "image_prepared") -> None:
        super().__init__(keys)
        self.path = Path(output_dir) / name
        self.prepared_key = prepared_key
        self.rows: list[dict[str, Any]] = []

    def _write(self) -> None:
        from medclust.io.atomic import write_csv_atomic

        write_csv_atomic(self.path, self.rows, self.columns, cell=lambda v: format(v, ".6g") if isinstance(v, float) else v)


class SaveDetectionsd(_TableWriter):
    """Group a heatmap ``(1, S, H', W')`` (after a sigmoid) into detections; rows of ``detections.csv``.

    Args:
        keys: prediction keys.
        output_dir: output folder.
        options: the package's ``inference.detection`` options.
    """

    columns = ["case_id", "input", "x_mm", "y_mm", "z_mm", "score", "diameter_mm", "n_slices", "i", "j", "k"]

    def __init__(self, keys: Any, output_dir: str | os.PathLike[str], options: Mapping[str, Any] | None = None, prepared_key: str = "image_prepared") -> None:
        super().__init__(keys, output_dir, "detections.csv", prepared_key)
        self.options = dict(options or {})

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        prepared: PreparedInput = d[self.prepared_key]
        s, h, w = prepared.slices.shape
        for key in self.key_iterator(d):
            heat = _array(d[key])[0, :s, :h, :w]
            found = detection_rows(heat, prepared, self.options)
            self.rows += [{"case_id": prepared.entry.case_id, "input": prepared.entry.image, **row} for row in found]
            d[f"{key}_detections"] = found
        self._write()
        return d


class ClassifySlices:
    """Inferer of a classification network: per-slice (or case-level) probabilities.

    Called like a MONAI inferer, ``inferer(inputs, network)`` with ``inputs`` the
    ``(1, 2k+1, S, H, W)`` channels tensor; returns ``(1, C, S)`` (or ``(1, C, 1)``) probabilities.

    Args:
        batch_size: slices per forward pass.
        level: ``slice`` or ``case``.
        multilabel: sigmoid outputs.
    """

    def __init__(self, batch_size: int = 16, level: str = "slice", multilabel: bool = False) -> None:
        self.batch_size, self.level, self.multilabel = int(batch_size), level, bool(multilabel)

    def __call__(self, inputs: torch.Tensor, network: nn.Module) -> torch.Tensor:
        channels = inputs[0]
        k = (channels.shape[0] - 1) // 2
        centre = channels[k].cpu().numpy()  # the volume; classify_slices rebuilds the same stacks
        probs = classify_slices(network, centre, k, self.batch_size, self.level, self.multilabel, inputs.device)
        return torch.from_numpy(probs).T[None]


class SaveProbabilitiesd(_TableWriter):
    """Rows of ``probabilities.csv`` from ``(C, S)`` probabilities.

    Args:
        keys: prediction keys.
        output_dir: output folder.
        classes: class index -> name (column ``prob_<name>``).
        level: ``slice`` or ``case``.
    """

    def __init__(self, keys: Any, output_dir: str | os.PathLike[str], classes: Mapping[str, str], level: str = "slice", prepared_key: str = "image_prepared") -> None:
        super().__init__(keys, output_dir, "probabilities.csv", prepared_key)
        self.order = sorted(int(c) for c in classes)
        self.names = [probability_column(str(classes[str(c)])) for c in self.order]
        self.level = level
        self.columns = ["case_id", "input", "level", "slice_index", "z_mm", *self.names]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        prepared: PreparedInput = d[self.prepared_key]
        for key in self.key_iterator(d):
            probs = _array(d[key]).reshape(len(self.order), -1).T
            for s, row in enumerate(probs):
                line = {"case_id": prepared.entry.case_id, "input": prepared.entry.image, "level": self.level}
                line["slice_index"] = s if self.level == "slice" else -1
                line["z_mm"] = round(float(prepared.attrs["z_positions_mm"][s]), 3) if self.level == "slice" else ""
                line.update({name: round(float(row[i]), 6) for i, name in enumerate(self.names)})
                self.rows.append(line)
        self._write()
        return d


# -- writing the bundle ---------------------------------------------------------------------------------


def _network_def(package: ModelPackage) -> dict[str, Any]:
    net = package.meta["network"]
    kind = package.task_type
    if kind in ("segmentation", "detection"):
        return {
            "_target_": "monai.networks.nets.FlexibleUNet",
            "in_channels": int(net["in_channels"]),
            "out_channels": int(net["num_outputs"]),
            "backbone": str(net["backbone"]),
            "pretrained": False,
            "decoder_channels": [int(c) for c in net["decoder_channels"]],
            "spatial_dims": 2,
        }
    if kind == "classification":
        return {
            "_target_": "medclust.models.heads.ClassificationNet",
            "in_channels": int(net["in_channels"]),
            "num_classes": int(net["num_outputs"]),
            "backbone": str(net["backbone"]),
            "head": str(net.get("head", "linear")),
            "hidden": int(net.get("hidden", 256)),
            "dropout": float(net.get("dropout", 0.0)),
        }
    return {"_target_": "monai.networks.nets.resnet.ResNetEncoder", "resnet_type": str(net["backbone"]), "pretrained": False, "spatial_dims": 2, "in_channels": 1}


def _inference_config(package: ModelPackage) -> dict[str, Any]:
    kind = package.task_type
    inference = package.meta.get("inference") or {}
    batch = int(inference.get("batch_size", 16))
    size = [int(v) for v in package.preprocessing["settings"]["size"]]
    multiple = int(package.meta["network"].get("pad_multiple", 32))
    roi = [n + (-n) % multiple for n in size]
    config: dict[str, Any] = {
        "imports": ["$import torch", "$import monai", "$import medclust.predict.bundle"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "input_files": [],
        "modality": None,
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network_def": _network_def(package),
        "network": "$@network_def.to(@device)",
        "load_weights": "$@network.load_state_dict(torch.load(@bundle_root + '/models/model.pt', map_location=@device, weights_only=True), strict=True)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {
                    "_target_": "medclust.predict.bundle.PrepareInputd",
                    "keys": "image",
                    "package_dir": "$@bundle_root + '/models'",
                    "modality": "@modality",
                    "pad": kind != "classification",
                }
            ],
        },
        "dataset": {"_target_": "Dataset", "data": "$[{'image': f} for f in @input_files]", "transform": "@preprocessing"},
    }
    if kind in ("segmentation", "detection"):
        config["inferer"] = {"_target_": "SliceInferer", "spatial_dim": 0, "roi_size": roi, "sw_batch_size": batch, "progress": False}
    else:
        task = package.meta["task"]
        config["inferer"] = {
            "_target_": "medclust.predict.bundle.ClassifySlices",
            "batch_size": batch,
            "level": "case" if task.get("level") == "case" else "slice",
            "multilabel": bool(task.get("multilabel")),
        }
    if kind == "segmentation":
        post = [
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "medclust.predict.bundle.SaveOnInputGridd", "keys": "pred", "output_dir": "@output_dir"},
        ]
    elif kind == "detection":
        post = [
            {"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
            {"_target_": "medclust.predict.bundle.SaveDetectionsd", "keys": "pred", "output_dir": "@output_dir",
             "options": inference.get("detection") or {}},
        ]
    else:
        post = [
            {"_target_": "medclust.predict.bundle.SaveProbabilitiesd", "keys": "pred", "output_dir": "@output_dir",
             "classes": {str(k): v for k, v in package.classes.items()}, "level": config["inferer"]["level"]},
        ]
    config["postprocessing"] = {"_target_": "Compose", "transforms": post}
    config["initialize"] = ["@load_weights", "$@network.eval()"]
    # no_grad around the loop only: a global set_grad_enabled(False) would outlive the run in the
    # caller's process (monai.bundle.run in Python, not only `python -m monai.bundle run`)
    config["run"] = [
        "$torch.no_grad()(lambda: [@postprocessing({**d, 'pred': @inferer(d['image'][None].to(@device), @network)[0]})"
        " for d in @dataset])()"
    ]
    return config


def _encoder_config(package: ModelPackage) -> dict[str, Any]:
    net = package.meta["network"]
    return {
        "imports": ["$import torch", "$import monai"],
        "bundle_root": ".",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "weights": "$torch.load(@bundle_root + '/models/model.pt', map_location='cpu', weights_only=True)",
        "network_def": _network_def(package),
        "network": "$@network_def.to(@device)",
        "load_weights": "$@network.load_state_dict(@weights, strict=True)",
        "out_channels": 2,
        "flexible_unet_def": {
            "_target_": "monai.networks.nets.FlexibleUNet",
            "in_channels": 1,
            "out_channels": "@out_channels",
            "backbone": str(net["backbone"]),
            "pretrained": False,
            "spatial_dims": 2,
        },
        "load_into_flexible_unet": "$@flexible_unet_def.encoder.load_state_dict(@weights, strict=True)",
        "initialize": ["@load_weights", "$@network.eval()"],
        "run": ["@load_into_flexible_unet"],
    }


def _metadata(package: ModelPackage) -> dict[str, Any]:
    import monai

    from medclust import __version__

    kind = package.task_type
    net = package.meta["network"]
    prep = package.meta.get("preprocessing") or {}
    first = next(iter(prep.values()), {})
    size = [int(v) for v in (first.get("settings") or {}).get("size", [0, 0])]
    modality = ", ".join(first.get("modalities") or []) or "unknown"
    classes = {str(k): v for k, v in package.classes.items()}
    outputs: dict[str, Any]
    if kind == "segmentation":
        outputs = {"pred": {"type": "image", "format": "segmentation", "num_channels": int(net["num_outputs"]), "spatial_shape": size,
                            "dtype": "float32", "value_range": [], "is_patch_data": False, "channel_def": classes}}
    elif kind == "detection":
        outputs = {"pred": {"type": "image", "format": "heatmap", "num_channels": 1, "spatial_shape": size, "dtype": "float32",
                            "value_range": [0, 1], "is_patch_data": False, "channel_def": {"0": classes.get("0", "lesion")}}}
    elif kind == "classification":
        outputs = {"pred": {"type": "probabilities", "format": "classes", "num_channels": int(net["num_outputs"]), "spatial_shape": [],
                            "dtype": "float32", "value_range": [0, 1], "is_patch_data": False, "channel_def": classes}}
    else:
        outputs = {"features": {"type": "tensor", "format": "features", "num_channels": 0, "spatial_shape": [], "dtype": "float32",
                                "value_range": [], "is_patch_data": False, "channel_def": {}}}
    metrics = (package.meta.get("metrics") or {}).get("values") or {}
    training = package.meta.get("training") or {}
    description = (
        f"medclust {kind} model '{package.name}' (backbone {net['backbone']}, {net['in_channels']} input channel(s) = "
        f"2 x {package.context_slices} neighbouring slices + 1), exported from {package.folder}."
    )
    if kind == "encoder":
        description = (
            f"medclust pretrained encoder '{package.name}': MONAI ResNetEncoder({net['backbone']}, spatial_dims=2, in_channels=1). "
            "It is the encoder of monai.networks.nets.FlexibleUNet(in_channels, out_channels, backbone='"
            f"{net['backbone']}', pretrained=False, spatial_dims=2): unet.encoder.load_state_dict(torch.load('models/model.pt', "
            "weights_only=True), strict=True). See docs/README.md."
        )
    return {
        "schema": _SCHEMA,
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: f"exported by medclust {__version__}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"medclust": __version__},
        "name": f"medclust_{package.name}",
        "task": f"{kind}: {package.name}",
        "description": description,
        "authors": "medclust",
        "copyright": "see the training data's licences (medclust README, data attributions)",
        "data_source": ", ".join(str(d) for d in prep) or "unknown",
        "data_type": "nifti, nrrd, mha, dicom, 2D images",
        "image_classes": f"{modality}, preprocessed as recorded in configs/metadata.json#medclust/preprocessing",
        "label_classes": json.dumps(classes),
        "pred_classes": json.dumps(classes),
        "eval_metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        "intended_use": "research only, not for clinical use",
        "references": ["Nguyen et al., Joint Self-Supervised Image-Volume Representation Learning with Intra-Inter Contrastive Clustering, AAAI 2023"],
        "training": {k: training.get(k) for k in ("recipe", "dataset", "train_dataset", "init", "fraction", "seed", "method", "git_commit")},
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "preprocessed slices",
                    "modality": modality,
                    "num_channels": int(net["in_channels"]),
                    "spatial_shape": size,
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": False,
                    "channel_def": {str(i): f"slice offset {i - package.context_slices}" for i in range(int(net["in_channels"]))},
                }
            },
            "outputs": outputs,
        },
        "medclust": package.meta,
    }


def _readme(package: ModelPackage) -> str:
    if package.task_type == "encoder":
        backbone = package.meta["network"]["backbone"]
        return f"""# medclust pretrained encoder: {package.name}

`models/model.pt` is the state dict of MONAI's `ResNetEncoder("{backbone}", spatial_dims=2, in_channels=1)`,
the backbone MONAI's `FlexibleUNet` builds. Load it into a FlexibleUNet:

```python
import torch
from monai.networks.nets import FlexibleUNet

unet = FlexibleUNet(in_channels=1, out_channels=2, backbone="{backbone}", pretrained=False, spatial_dims=2)
unet.encoder.load_state_dict(torch.load("models/model.pt", weights_only=True), strict=True)
```

or through this bundle's config: `ConfigParser` → `get_parsed_content("load_into_flexible_unet")` after
setting `out_channels`. For 2k+1 input channels (2.5D), `medclust.models.heads.load_encoder_weights`
repeats the first convolution over the channels and divides it by 2k+1. Inputs must be preprocessed
as `configs/metadata.json` → `medclust.preprocessing` records (one block per pretraining dataset).
"""
    return f"""# medclust {package.task_type} model: {package.name}

Run on new images (files, DICOM series folders):

```python
from monai.bundle import run

run(config_file="configs/inference.json", meta_file="configs/metadata.json", bundle_root=".",
    input_files=["scan.nii.gz"], output_dir="eval")
```

(or `python -m monai.bundle run --config_file configs/inference.json --meta_file configs/metadata.json
--bundle_root . --input_files "['scan.nii.gz']" --output_dir eval`, which needs `pip install fire`).

The same model as a medclust package: `medclust predict --model models --input scan.nii.gz --out eval`.
Preprocessing (orientation, spacing, in-plane size, intensity normalisation) is the one recorded
with the training data, in `models/model.json` → `preprocessing`; outputs are written on each
input's own grid. Classes: {json.dumps({str(k): v for k, v in package.classes.items()})}.
"""


def export_bundle(model: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Write a MONAI bundle of a model package (see the module docstring).

    Args:
        model: package folder, run folder (fine-tuning or pretraining) or ``model.json``.
        out_dir: the bundle folder (created; files inside replaced).

    Returns:
        ``out_dir``.

    Raises:
        BadInputError: not a package, or weights that do not match it.
    """
    package = load_package(model)
    out = Path(out_dir)
    state = package.load_state_dict()  # checks the checksum before anything is written
    if package.task_type == "encoder":
        config = _encoder_config(package)
    else:
        InputPreparer(package)  # preprocessing settings recorded and valid
        package.build_model()  # the weights fit the network the bundle declares
        config = _inference_config(package)
    models = out / "models"
    models.mkdir(parents=True, exist_ok=True)
    meta = {k: v for k, v in package.meta.items() if k not in ("format", "format_version", "weights")}
    write_package(models, meta, state, "model.pt")
    write_json_atomic(out / "configs" / "inference.json", config)
    write_json_atomic(out / "configs" / "metadata.json", _metadata(package))
    write_text_atomic(out / "docs" / "README.md", _readme(package))
    return out

