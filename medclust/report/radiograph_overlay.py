"""Overlay of a predicted label map on the radiograph it was predicted from (report figure).

``medclust predict`` writes a 2D image's label map as a NIfTI on the image's own grid, in
MONAI's 2D axis order (axis 0 = image column, axis 1 = row); the figure shows it over the
image as displayed (MONOCHROME1 inverted, so bone is bright as on a film).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from medclust.errors import BadInputError
from medclust.io.atomic import atomic_path

_COLOURS = ((0.1, 0.6, 1.0), (1.0, 0.3, 0.2), (0.2, 0.9, 0.3), (1.0, 0.8, 0.1), (0.8, 0.3, 1.0))


def read_radiograph(path: str | os.PathLike[str]) -> np.ndarray:
    """Display array (rows, columns) of a 2D image, float in [0, 1], bone bright.

    Args:
        path: a single-frame DICOM radiograph or a PNG/JPEG/TIFF image.

    Returns:
        The image as displayed (MONOCHROME1 inverted), scaled to its 1st..99th percentiles.
    """
    path = Path(path)
    try:
        if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif", ".tiff"):
            from PIL import Image

            array = np.asarray(Image.open(path).convert("F"), dtype=np.float32)
        else:
            import pydicom

            ds = pydicom.dcmread(str(path))
            array = np.asarray(ds.pixel_array, dtype=np.float32)
            if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
                array = array.max() - array
    except Exception as err:  # noqa: BLE001 - any reader failure becomes one line naming the file
        raise BadInputError(path, f"cannot read the radiograph: {err}") from err
    if array.ndim != 2:
        raise BadInputError(path, f"not a single 2D image (shape {array.shape})")
    lo, hi = np.percentile(array, [1, 99])
    return np.clip((array - lo) / max(hi - lo, 1e-6), 0.0, 1.0)


def plot_radiograph_prediction(
    image_path: str | os.PathLike[str],
    label_path: str | os.PathLike[str],
    classes: Mapping[int, str],
    out: str | os.PathLike[str],
    title: str,
    alpha: float = 0.4,
) -> Path:
    """Write a PNG: the radiograph beside it with the predicted classes overlaid.

    Args:
        image_path: the radiograph the labels were predicted from.
        label_path: ``medclust predict``'s NIfTI label map of it (axis 0 = column).
        classes: label value -> class name (the model's classes).
        out: PNG path (written atomically).
        title: figure title (say what the model was trained on).
        alpha: overlay opacity.

    Returns:
        The PNG path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib
    from matplotlib.patches import Patch

    image = read_radiograph(image_path)
    label = np.asarray(nib.load(str(label_path)).dataobj).squeeze().T  # NIfTI (col, row) -> (row, col)
    if label.shape != image.shape:
        raise BadInputError(label_path, f"label map {label.shape} is not on the image grid {image.shape} of {image_path}")
    overlay = np.repeat(image[..., None], 3, axis=2)
    handles = []
    for n, (value, name) in enumerate(sorted(classes.items())):
        mask = label == int(value)
        colour = np.array(_COLOURS[n % len(_COLOURS)])
        overlay[mask] = (1 - alpha) * overlay[mask] + alpha * colour
        handles.append(Patch(color=colour, label=f"{name} ({mask.mean():.0%} of the image)"))
    fig, axes = plt.subplots(1, 2, figsize=(9, 5))
    axes[0].imshow(image, cmap="gray")
    axes[0].set_title("real radiograph")
    axes[1].imshow(overlay)
    axes[1].set_title("predicted")
    for ax in axes:
        ax.axis("off")
    axes[1].legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, -0.12), ncol=len(handles), fontsize=8)
    fig.suptitle(title, fontsize=9)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=80, format="png", bbox_inches="tight")
    plt.close(fig)
    return out


def first_prediction(predict_json: str | os.PathLike[str]) -> tuple[Path, Path]:
    """(input image, label map) of the first successfully predicted input of a ``predict.json``."""
    predict_json = Path(predict_json)
    try:
        record = json.loads(predict_json.read_text(encoding="utf-8"))
        done = [e for e in record["inputs"] if e.get("status") == "ok" and e.get("outputs")]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BadInputError(predict_json, f"cannot read the predictions: {err}") from err
    if not done:
        raise BadInputError(predict_json, "no input was predicted")
    entry = done[0]
    image = Path(entry["input"])
    if image.is_dir():  # a folder input: its (single) image file
        files = sorted(p for p in image.rglob("*") if p.is_file() and p.suffix.lower() in (".dcm", ".png", ".jpg", ".jpeg", ".tif", ".tiff"))
        if not files:
            raise BadInputError(image, "no radiograph file in the predicted folder")
        image = files[0]
    return image, predict_json.parent / entry["outputs"][0]


def model_classes(model_dir: str | os.PathLike[str]) -> dict[int, str]:
    """Label value -> class name of a fine-tuning run folder (its ``run.json`` ``classes``)."""
    run = Path(model_dir) / "run.json"
    try:
        classes = json.loads(run.read_text(encoding="utf-8"))["classes"]
    except (OSError, ValueError, KeyError) as err:
        raise BadInputError(run, f"cannot read the model's classes: {err}") from err
    return {int(k): str(v) for k, v in classes.items()}


__all__ = ["first_prediction", "model_classes", "plot_radiograph_prediction", "read_radiograph"]
