"""Apply a model package to new images: the API behind ``medclust predict``.

For every input (see :mod:`medclust.predict.inputs`):

1. read and QC it with the data stage's own functions (:func:`medclust.preprocess.ingest.check_case`:
   readable, 2D/3D, finite, not constant); the modality comes from ``--modality``, else the DICOM
   header, else the model's training modality, and must be one the model was trained on;
2. preprocess it with :func:`medclust.preprocess.pipeline.preprocess_image` and the settings
   recorded in the package (never re-typed), then round to the training store's dtype, so the
   network sees exactly what a slice-store case would have held;
3. run the network slice by slice (MONAI ``SliceInferer`` over a ``(1, 2k+1, S, H, W)`` tensor
   whose channels are the neighbouring slices, i.e. the 2.5D stacks of training; in-plane sizes
   padded to a multiple of 32 at the bottom/right as in training and cropped back), on CUDA when
   present;
4. write the result: segmentation, a label map NIfTI on the input's own grid (shape, affine and
   orientation of the input; :func:`medclust.io.original_grid.store_to_original`) and, for
   DICOM inputs when asked, a DICOM SEG; detection, rows of ``detections.csv`` (RAS mm, score,
   and the position as a voxel index of the input); classification, rows of
   ``probabilities.csv`` (per slice of the preprocessed volume, or per image for case-level
   models).

A bad input is one line (``path: reason``); ``on_bad_input`` decides whether it stops the run
(``fail``) or is recorded in ``predict.json`` and skipped. Every file is written atomically.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medclust.errors import BadInputError, MedclustError
from medclust.io.sources import CaseEntry
from medclust.predict.package import PACKAGE_FILE, ModelPackage, load_package
from medclust.predict.prepare import InputPreparer, PreparedInput

__all__ = ["Predictor", "classify_slices", "context_channels", "detection_rows", "predict_inputs", "probability_column", "slice_inference"]

log = logging.getLogger("medclust.predict")


def context_channels(slices: np.ndarray, context_slices: int = 0, pad_multiple: int = 32) -> torch.Tensor:
    """A volume as the ``(2k+1, S, H', W')`` tensor whose channel j at slice i is slice ``i+j-k``.

    Slices beyond the volume repeat the edge slice, as the 2.5D stacks of training
    (:func:`medclust.data.downstream.context_stack`); ``H'``, ``W'`` are ``H``, ``W`` zero-padded
    at the bottom/right to a multiple of ``pad_multiple`` (FlexibleUNet's five stride-2 stages).

    Args:
        slices: ``(S, H, W)`` preprocessed volume.
        context_slices: k.
        pad_multiple: in-plane padding multiple (1 = none).

    Returns:
        float32 tensor on CPU.
    """
    volume = torch.from_numpy(np.ascontiguousarray(slices, dtype=np.float32))
    s, h, w = volume.shape
    idx = torch.clamp(torch.arange(s)[:, None] + torch.arange(-context_slices, context_slices + 1)[None], 0, s - 1)
    stacks = volume[idx].permute(1, 0, 2, 3)
    return torch.nn.functional.pad(stacks, (0, (-w) % pad_multiple, 0, (-h) % pad_multiple))


@torch.no_grad()
def slice_inference(
    model: nn.Module,
    slices: np.ndarray,
    context_slices: int = 0,
    batch_size: int = 16,
    device: torch.device | str | None = None,
    pad_multiple: int = 32,
) -> torch.Tensor:
    """Dense outputs of a 2D network for every slice of a volume, with MONAI's ``SliceInferer``.

    ``SliceInferer`` cutting the :func:`context_channels` tensor along S hands the network
    exactly the training input of each slice (its 2.5D stack).

    Args:
        model: ``(N, 2k+1, H, W) -> (N, K, H, W)`` network (eval mode is set here).
        slices: ``(S, H, W)`` preprocessed volume.
        context_slices: k.
        batch_size: slices per forward pass.
        device: where to run (default: the model's).
        pad_multiple: in-plane sizes are zero-padded (bottom/right) to a multiple of this.

    Returns:
        ``(S, K, H, W)`` float32 on CPU.
    """
    from monai.inferers import SliceInferer

    model.eval()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    h, w = slices.shape[-2:]
    stacks = context_channels(slices, context_slices, pad_multiple)[None].to(device)
    inferer = SliceInferer(spatial_dim=0, roi_size=tuple(stacks.shape[-2:]), sw_batch_size=int(batch_size), progress=False)
    out = inferer(stacks, model)
    return out[0, :, :, :h, :w].permute(1, 0, 2, 3).float().cpu()


class Predictor:
    """A loaded model package, ready to predict one input at a time.

    Args:
        package: a :class:`ModelPackage` or its path (package folder, run folder, ``model.json``).
        device: ``cuda``/``cpu``/... (default: CUDA when present).
        batch_size: slices per forward pass (default: the package's).
    """

    def __init__(self, package: ModelPackage | str | os.PathLike[str], device: str | torch.device | None = None, batch_size: int | None = None) -> None:
        self.package = package if isinstance(package, ModelPackage) else load_package(package)
        self.preparer = InputPreparer(self.package)
        self.device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = self.package.build_model().to(self.device)
        inference = self.package.meta.get("inference") or {}
        self.batch_size = int(batch_size or inference.get("batch_size", 16))
        self.k = self.package.context_slices
        self.pad_multiple = int(self.package.meta["network"].get("pad_multiple", 32))

    @property
    def task_type(self) -> str:
        """segmentation, classification or detection."""
        return self.package.task_type

    def prepare(self, entry: CaseEntry, modality: str | None = None) -> PreparedInput:
        """Read, QC and preprocess one input (:meth:`InputPreparer.prepare`)."""
        return self.preparer.prepare(entry, modality)

    # -- the three task types -----------------------------------------------------------------------

    def logits(self, prepared: PreparedInput) -> torch.Tensor:
        """Dense outputs ``(S, K, H, W)`` of a segmentation/detection network."""
        return slice_inference(self.model, prepared.slices, self.k, self.batch_size, self.device, self.pad_multiple)

    def segment(self, prepared: PreparedInput) -> np.ndarray:
        """Label map on the input's own grid (int16; values are the package's class values)."""
        from medclust.io.original_grid import store_to_original

        labels = self.logits(prepared).argmax(dim=1).numpy().astype(np.int16)
        return store_to_original(labels, prepared.attrs)

    def detect(self, prepared: PreparedInput) -> list[dict[str, Any]]:
        """Detections, strongest first (:func:`detection_rows`)."""
        heat = torch.sigmoid(self.logits(prepared))[:, 0].numpy()
        return detection_rows(heat, prepared, (self.package.meta.get("inference") or {}).get("detection"))

    def classify(self, prepared: PreparedInput) -> tuple[str, np.ndarray]:
        """Class probabilities: ``("slice", (S, C))`` or, for case-level models, ``("case", (1, C))``."""
        task = self.package.meta["task"]
        level = "case" if task.get("level") == "case" else "slice"
        probs = classify_slices(self.model, prepared.slices, self.k, self.batch_size, level, bool(task.get("multilabel")), self.device)
        return level, probs


def detection_rows(heat: np.ndarray, prepared: PreparedInput, options: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """3D detections of a heatmap volume, strongest first, as output rows.

    Args:
        heat: ``(S, H, W)`` scores in [0, 1] on the preprocessed grid.
        prepared: the input (its grid attrs).
        options: the package's ``inference.detection`` grouping options.

    Returns:
        Rows with ``x_mm, y_mm, z_mm`` (RAS), ``score``, ``diameter_mm``, ``n_slices`` and
        ``i, j, k``, the position as a (fractional) voxel index of the input image.
    """
    from medclust.evaluate.predict import group_peaks

    opts = dict(options or {})
    found = group_peaks(
        heat,
        prepared.attrs,
        prepared.spacing,
        min_score=float(opts.get("min_score", 0.05)),
        max_distance_mm=float(opts.get("group_distance_mm", 10.0)),
        max_slice_gap_mm=float(opts.get("group_slice_gap_mm", 15.0)),
        max_detections=int(opts.get("max_detections", 100)),
    )
    inverse = np.linalg.inv(np.asarray(prepared.attrs["original_affine"], dtype=np.float64))
    rows = []
    for d in found:
        ijk = inverse[:3, :3] @ np.asarray(d.world, dtype=np.float64) + inverse[:3, 3]
        rows.append(
            {
                "x_mm": float(d.world[0]), "y_mm": float(d.world[1]), "z_mm": float(d.world[2]),
                "score": float(d.score), "diameter_mm": float(d.diameter_mm), "n_slices": int(d.n_slices),
                "i": float(ijk[0]), "j": float(ijk[1]), "k": float(ijk[2]),
            }
        )
    return rows


@torch.no_grad()
def classify_slices(
    model: nn.Module,
    slices: np.ndarray,
    context_slices: int,
    batch_size: int,
    level: str = "slice",
    multilabel: bool = False,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """Class probabilities of a classification network, per slice or for the whole volume.

    Slices go in unpadded, as in training. ``level="case"`` averages the slice features before
    the head (the bag pooling of case-level training) and applies a softmax.

    Args:
        model: a :class:`medclust.models.heads.ClassificationNet`.
        slices: ``(S, H, W)`` preprocessed volume.
        context_slices: k of the 2.5D stacks.
        batch_size: slices per forward pass.
        level: ``slice`` or ``case``.
        multilabel: sigmoid outputs (slice level).
        device: where to run (default: the model's).

    Returns:
        ``(S, C)`` or ``(1, C)`` probabilities.
    """
    from medclust.data.downstream import context_stack

    model.eval()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    outs = []
    for start in range(0, slices.shape[0], batch_size):
        stack = torch.from_numpy(context_stack(slices, np.arange(start, min(start + batch_size, slices.shape[0])), context_slices)).to(device)
        outs.append(model.features(stack) if level == "case" else model(stack))  # type: ignore[operator]
    if level == "case":
        logits = model.head(torch.cat(outs).mean(0, keepdim=True))  # type: ignore[operator]
        return torch.softmax(logits.float(), dim=1).cpu().numpy()
    logits = torch.cat(outs).float()
    return (torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=1)).cpu().numpy()


# -- the run over many inputs -------------------------------------------------------------------------


def probability_column(name: str) -> str:
    """The ``probabilities.csv`` column of a class: ``prob_<name>`` with unsafe characters replaced."""
    return "prob_" + (re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "class")


def _remove_stale(out: Path, case_id: str, keep: Sequence[str], record: dict[str, Any]) -> None:
    """Remove a case's label files that this run did not write (an earlier run's, into the same
    ``out``): beside a predict.json that says "skipped", or a new NIfTI, they would pass for this
    model's output. The names removed are recorded."""
    removed = []
    for name in (f"{case_id}.nii.gz", f"{case_id}.seg.dcm"):
        if name not in keep and (out / name).exists():
            (out / name).unlink()
            removed.append(name)
    if removed:
        record["removed_stale"] = removed


def predict_inputs(
    model: ModelPackage | str | os.PathLike[str],
    inputs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    on_bad_input: str = "skip",
    dicom_seg: bool = False,
    modality: str | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    progress: bool = True,
    assume_pixel_spacing: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Predict every input with a model package and write the results into ``out_dir``.

    Args:
        model: package folder, run folder or ``model.json`` (or a loaded package).
        inputs: files, folders (DICOM series, images) and manifests.
        out_dir: output folder: ``{case}.nii.gz`` (+ ``{case}.seg.dcm``), ``detections.csv`` or
            ``probabilities.csv``, ``predict.json``, ``provenance.json``.
        on_bad_input: ``fail`` (stop at the first bad input) or ``skip`` (one line, go on).
        dicom_seg: also write a DICOM SEG for DICOM inputs (segmentation models).
        modality: force the modality of every input.
        batch_size: slices per forward pass.
        device: ``cuda``/``cpu`` (default: CUDA when present).
        progress: show a progress bar over the inputs.
        assume_pixel_spacing: (row, column) mm for radiographs whose header records no usable
            pixel spacing (as a dataset's ``assume_pixel_spacing``).

    Returns:
        The ``predict.json`` record.

    Raises:
        BadInputError: a bad input under ``fail``, or no input could be predicted.
    """
    from tqdm import tqdm

    from medclust.io.atomic import write_csv_atomic, write_json_atomic
    from medclust.io.original_grid import write_label_nifti
    from medclust.predict.inputs import collect_inputs
    from medclust.provenance import write_provenance

    if on_bad_input not in ("fail", "skip"):
        raise MedclustError(f"on_bad_input must be 'fail' or 'skip', got {on_bad_input!r}")
    started = time.perf_counter()
    predictor = Predictor(model, device=device, batch_size=batch_size)
    package = predictor.package
    kind = predictor.task_type
    if dicom_seg and kind != "segmentation":
        raise MedclustError(f"--dicom-seg needs a segmentation model; {package.name} is a {kind} model")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = collect_inputs(inputs, modality)
    if assume_pixel_spacing is not None:
        for entry in entries:
            entry.assume_spacing = (float(assume_pixel_spacing[0]), float(assume_pixel_spacing[1]))
    class_names = package.classes
    records: list[dict[str, Any]] = []
    table: list[dict[str, Any]] = []
    for entry in tqdm(entries, desc=f"predict {package.name}", unit="input", disable=not progress):
        t0 = time.perf_counter()
        record: dict[str, Any] = {"case_id": entry.case_id, "input": entry.image}
        try:
            prepared = predictor.prepare(entry, modality)
            record.update({"modality": prepared.modality, "shape": list(prepared.image.shape), "outputs": []})
            if kind == "segmentation":
                labels = predictor.segment(prepared)
                name = f"{entry.case_id}.nii.gz"
                write_label_nifti(out / name, labels, prepared.image.affine)
                record["outputs"].append(name)
                record["labels_present"] = sorted(int(v) for v in np.unique(labels) if v != 0)
                if dicom_seg and prepared.image.kind in ("dicom", "dicom_series"):
                    from medclust.predict.dicom_seg import write_dicom_seg

                    seg_name = f"{entry.case_id}.seg.dcm"
                    write_dicom_seg(out / seg_name, labels, prepared.image, class_names, package)
                    record["outputs"].append(seg_name)
            elif kind == "detection":
                found = predictor.detect(prepared)
                table += [{"case_id": entry.case_id, "input": entry.image, **row} for row in found]
                record["detections"] = len(found)
            else:
                level, probs = predictor.classify(prepared)
                order = sorted(class_names)
                for s, row in enumerate(probs):
                    line = {"case_id": entry.case_id, "input": entry.image, "level": level}
                    line["slice_index"] = s if level == "slice" else -1
                    line["z_mm"] = round(float(prepared.attrs["z_positions_mm"][s]), 3) if level == "slice" else ""
                    line.update({probability_column(class_names[c]): round(float(row[i]), 6) for i, c in enumerate(order)})
                    table.append(line)
                record["items"] = len(probs)
        except BadInputError as err:
            if on_bad_input == "fail":
                raise
            log.warning("skipped %s", err)
            record.update({"status": "skipped", "reason": str(err)})
            _remove_stale(out, entry.case_id, keep=(), record=record)
            records.append(record)
            continue
        _remove_stale(out, entry.case_id, keep=record.get("outputs", ()), record=record)
        record.update({"status": "ok", "seconds": round(time.perf_counter() - t0, 2)})
        records.append(record)
    if kind == "detection":
        columns = ["case_id", "input", "x_mm", "y_mm", "z_mm", "score", "diameter_mm", "n_slices", "i", "j", "k"]
        write_csv_atomic(out / "detections.csv", table, columns, cell=_cell)
    elif kind == "classification":
        columns = ["case_id", "input", "level", "slice_index", "z_mm"] + [probability_column(class_names[c]) for c in sorted(class_names)]
        write_csv_atomic(out / "probabilities.csv", table, columns, cell=_cell)
    done = [r for r in records if r["status"] == "ok"]
    summary = {
        "model": str(package.folder),
        "task": package.meta["task"],
        "weights_sha256": package.meta["weights"].get("sha256"),
        "device": str(predictor.device),
        "on_bad_input": on_bad_input,
        "n_inputs": len(records),
        "n_ok": len(done),
        "n_skipped": len(records) - len(done),
        "seconds": round(time.perf_counter() - started, 2),
        "inputs": records,
    }
    write_json_atomic(out / "predict.json", summary)
    write_provenance(
        out,
        {"model": str(package.folder), "inputs": [str(p) for p in inputs], "on_bad_input": on_bad_input,
         "dicom_seg": dicom_seg, "modality": modality, "batch_size": predictor.batch_size},
        [package.folder / PACKAGE_FILE, package.weights_path],
    )
    if not done:
        first = next((r["reason"] for r in records if r.get("reason")), "no inputs")
        raise BadInputError(", ".join(str(p) for p in inputs), f"no input could be predicted ({len(records)} skipped; first: {first})")
    log.info("predicted %d of %d inputs with %s in %.1f s -> %s", len(done), len(records), package.name, summary["seconds"], out)
    return summary


def _cell(value: Any) -> Any:
    return format(value, ".6g") if isinstance(value, float) else value
