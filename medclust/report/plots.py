"""Report figures: each function takes plain data (dicts of lists/arrays) and writes one PNG.

Figures are drawn on a ``matplotlib.figure.Figure`` with the Agg canvas (no pyplot state, no
display needed) and saved atomically. Loading the data from the workflow's files is
:mod:`medclust.report.data`'s job, so every plotted number comes from a metrics file, a study
table, an embeddings file or a prediction.

Images are shown in the RAS frame with the patient's right on the image's left and anterior at
the top (radiological convention).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Circle

from medclust.io.atomic import atomic_path

SIMULATED_NOTE = "SIMULATED data"


def _save(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Render ``fig`` to PNG at ``path`` atomically."""
    FigureCanvasAgg(fig)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return path


def _empty(path: str | Path, title: str, message: str) -> Path:
    """A figure that says why there is nothing to show (an output must still exist)."""
    fig = Figure(figsize=(6, 2), layout="constrained")
    ax = fig.add_subplot()
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    return _save(fig, path)


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average that ignores NaNs (same length as the input)."""
    if window <= 1 or values.size < 3:
        return values
    finite = np.isfinite(values)
    filled = np.where(finite, values, 0.0)
    sums = np.convolve(filled, np.ones(window), mode="full")[: values.size]
    counts = np.convolve(finite.astype(float), np.ones(window), mode="full")[: values.size]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / counts, np.nan)


# --- pretraining ------------------------------------------------------------------------------

LOSS_COLUMNS = ("loss", "loss_intra", "loss_inter", "loss_mask")


def plot_loss_curves(curves: Mapping[str, Mapping[str, Sequence[float]]], path: str | Path) -> Path:
    """Pretraining losses against step, one panel per loss term, one line per method.

    Args:
        curves: ``{method: {"step": [...], "loss": [...], "loss_intra": [...], ...}}`` (columns of
            the method's metrics.csv; missing or all-NaN terms are left out).
        path: the PNG to write.

    Returns:
        ``path``.
    """
    present = [c for c in LOSS_COLUMNS if any(np.isfinite(np.asarray(v.get(c, []), float)).any() for v in curves.values())]
    if not present:
        return _empty(path, "Pretraining loss", "no pretraining loss was logged (random init only?)")
    ncols = min(len(present), 2)
    nrows = math.ceil(len(present) / ncols)
    fig = Figure(figsize=(5.2 * ncols, 3.4 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(present) :]:
        ax.axis("off")
    for ax, column in zip(axes, present):
        for i, (method, data) in enumerate(sorted(curves.items())):
            y = np.asarray(data.get(column, []), dtype=float)
            if not np.isfinite(y).any():
                continue
            x = np.asarray(data.get("step", np.arange(y.size)), dtype=float)[: y.size]
            # rows without this term (probe-only rows, a term that starts later) must not break the line
            x, y = x[np.isfinite(y)], y[np.isfinite(y)]
            colour = f"C{i}"
            ax.plot(x, y, color=colour, alpha=0.25, linewidth=0.8)
            ax.plot(x, _smooth(y, max(1, y.size // 25)), color=colour, linewidth=1.6, label=method)
        ax.set_title(column)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes[: len(present) : ncols]:
        ax.set_ylabel("loss (faint: logged; solid: moving average)")
    axes[0].legend(title="method", fontsize=8)
    fig.suptitle("Pretraining loss curves")
    return _save(fig, path)


def pca_2d(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project rows of ``x`` on their first two principal components (numpy SVD).

    Args:
        x: (N, D) data.

    Returns:
        ``(coords (N, 2), explained variance ratio (2,))``; zero-padded for rank < 2.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        return np.zeros((len(x), 2)), np.zeros(2)
    centred = x - x.mean(axis=0, keepdims=True)
    u, s, vt = np.linalg.svd(centred, full_matrices=False)
    # Fix the sign of each component so the picture is deterministic across platforms.
    signs = np.sign(vt[np.arange(vt.shape[0]), np.abs(vt).argmax(axis=1)])
    signs[signs == 0] = 1
    total = float((s**2).sum())
    ratio = (s[:2] ** 2) / total if total > 0 else np.zeros(min(2, s.size))
    # Components without variance (fewer points than dimensions) are rounding noise: flatten them.
    keep = ratio > 1e-9
    coords = u[:, :2] * s[:2] * signs[:2] * keep
    if coords.shape[1] < 2:
        coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
        ratio = np.pad(ratio, (0, 2 - ratio.size))
    return coords, ratio


def _scatter_by(ax: Any, coords: np.ndarray, labels: Sequence[object], title: str, legend_max: int = 12) -> None:
    names = [str(v) for v in labels]
    categories = sorted(set(names), key=lambda v: (len(v), v) if v.isdigit() else (0, v))
    cmap = ListedColormap([f"C{i % 10}" for i in range(10)]) if len(categories) <= 10 else None
    for i, cat in enumerate(categories):
        mask = np.array([n == cat for n in names])
        colour = cmap(i) if cmap is not None else _many_colours(i, len(categories))
        ax.scatter(coords[mask, 0], coords[mask, 1], s=10, alpha=0.75, color=colour, label=cat, linewidths=0)
    if len(categories) <= legend_max:
        ax.legend(fontsize=7, markerscale=1.5, loc="best")
    else:
        ax.text(0.01, 0.01, f"{len(categories)} groups", transform=ax.transAxes, fontsize=8)
    ax.set_title(title, fontsize=10)


def _many_colours(i: int, n: int) -> tuple[float, float, float, float]:
    from matplotlib import colormaps

    return colormaps["hsv"](i / max(n, 1) * 0.9)


def plot_embedding_map(embeddings: Mapping[str, Any], path: str | Path, title: str) -> Path:
    """2D PCA maps of slice and volume embeddings, by dataset (modality) and by cluster.

    Args:
        embeddings: the ``embeddings.npz`` arrays: ``slice_embeddings`` (N, D), ``slice_dataset``,
            ``slice_modality``, ``slice_cluster``, ``volume_embeddings`` (M, D), ``volume_dataset``,
            ``volume_modality``, ``volume_cluster`` (any of the two levels may be missing/empty).
        path: the PNG to write.
        title: figure title (the method name).

    Returns:
        ``path``.
    """
    levels = [
        lvl
        for lvl in ("slice", "volume")
        if f"{lvl}_embeddings" in embeddings and len(np.asarray(embeddings[f"{lvl}_embeddings"])) > 0
    ]
    if not levels:
        return _empty(path, title, "no embeddings")
    fig = Figure(figsize=(10, 4.4 * len(levels)), layout="constrained")
    axes = fig.subplots(len(levels), 2, squeeze=False)
    for row, level in zip(axes, levels):
        x = np.asarray(embeddings[f"{level}_embeddings"], dtype=np.float64)
        coords, ratio = pca_2d(x)
        n = len(x)
        dataset = embeddings.get(f"{level}_dataset", ["?"] * n)
        modality = embeddings.get(f"{level}_modality", [""] * n)
        group = [f"{d} ({m})" if str(m) else str(d) for d, m in zip(dataset, modality)]
        cluster = embeddings.get(f"{level}_cluster", [-1] * n)
        _scatter_by(row[0], coords, group, f"{level} embeddings (n={n}) by dataset (modality)")
        clusters = [int(c) for c in cluster]
        if all(c < 0 for c in clusters):
            # e.g. the volume level of a 2D-only method: no prototypes assign volumes to clusters
            _scatter_by(row[1], coords, ["none"] * n, f"{level} embeddings: no cluster assignment")
        else:
            _scatter_by(row[1], coords, clusters, f"{level} embeddings by assigned cluster")
        for ax in row:
            ax.set_xlabel(f"PC1 ({ratio[0]:.0%} of variance)")
            ax.set_ylabel(f"PC2 ({ratio[1]:.0%} of variance)")
            ax.grid(alpha=0.2)
    fig.suptitle(title)
    return _save(fig, path)


# --- shared by the study and example figures ---------------------------------------------------


def _title_with_note(title: str, simulated: bool, trained_on: str = "") -> str:
    """``title`` plus a SIMULATED marker saying what was simulated, when anything was."""
    if not simulated:
        return title
    what = "; ".join(t for t in str(trained_on or "").split(";") if "simulated" in t.lower())
    return f"{title}\n[{SIMULATED_NOTE}: trained on {what}]" if what else f"{title}\n[{SIMULATED_NOTE}]"


# --- examples ---------------------------------------------------------------------------------


def _label_cmap(n_classes: int) -> ListedColormap:
    colours = [(0, 0, 0, 0)] + [(*_rgb(i), 0.55) for i in range(max(n_classes, 1))]
    return ListedColormap(colours)


def _rgb(i: int) -> tuple[float, float, float]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"] if i < 10 else colormaps["hsv"]
    colour = cmap(i % 10) if i < 10 else cmap((i * 0.61803) % 1.0)
    return colour[:3]


def _display(plane: np.ndarray) -> np.ndarray:
    """An (X, Y) RAS plane as an image array (rows = Y, anterior/superior up with origin="lower";
    columns = X flipped, so that the patient's right (+x) is on the viewer's left)."""
    return np.asarray(plane)[::-1, :].T


def _display_xy(x: float, y: float, width: int) -> tuple[float, float]:
    """Pixel (x, y) of an (X, Y) plane in the coordinates of :func:`_display`."""
    return width - 1 - x, y


def _show_slice(ax: Any, image: np.ndarray, aspect: float) -> None:
    """Show an (X, Y) RAS slice radiologically (see :func:`_display`)."""
    ax.imshow(_display(image), cmap="gray", origin="lower", aspect=aspect, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_segmentation_overlays(example: Mapping[str, Any], path: str | Path) -> Path:
    """Image, ground truth and each init's prediction on a few test slices.

    Args:
        example: ``{"task", "case_id", "image": (K, X, Y) float, "ground_truth": (K, X, Y) int,
            "predictions": {init: (K, X, Y) int}, "slice_labels": [K str], "classes": {value: name},
            "aspect": float (pixel height/width), "scores": {init: str} (optional, per-case metric),
            "simulated": bool, "fraction": float, "seed": int}``.
        path: the PNG to write.

    Returns:
        ``path``.
    """
    image = np.asarray(example.get("image", np.zeros((0, 1, 1))))
    if image.shape[0] == 0:
        return _empty(path, f"Segmentation examples, task {example.get('task')}", "no test slice with ground truth")
    gt = np.asarray(example["ground_truth"])
    preds: Mapping[str, np.ndarray] = example.get("predictions", {})
    classes = {int(k): v for k, v in example.get("classes", {}).items()}
    n_cls = max([*classes, int(gt.max()), *(int(np.asarray(p).max()) for p in preds.values())], default=1)
    cmap = _label_cmap(n_cls)
    columns = ["image", "ground truth", *preds]
    k = image.shape[0]
    aspect = float(example.get("aspect", 1.0))
    fig = Figure(figsize=(2.7 * len(columns), 2.7 * k + 0.9), layout="constrained")
    axes = fig.subplots(k, len(columns), squeeze=False)
    scores = example.get("scores", {})
    for i in range(k):
        for j, name in enumerate(columns):
            ax = axes[i, j]
            _show_slice(ax, image[i], aspect)
            if j == 1:
                overlay = gt[i]
            elif j > 1:
                overlay = np.asarray(preds[name])[i]
            else:
                overlay = None
            if overlay is not None:
                ax.imshow(
                    np.ma.masked_equal(_display(overlay), 0), cmap=cmap, vmin=-0.5, vmax=n_cls + 0.5,
                    origin="lower", aspect=aspect, interpolation="nearest",
                )  # fmt: skip
            if i == 0:
                head = name if j < 2 else f"prediction: {name}"
                if j > 1 and scores.get(name):
                    head += f"\n{scores[name]}"
                ax.set_title(head, fontsize=9)
            if j == 0:
                ax.set_ylabel(example.get("slice_labels", [""] * k)[i], fontsize=8)
    handles = [Circle((0, 0), color=_rgb(c - 1)) for c in sorted(classes)]
    if 0 < len(handles) <= 20:
        fig.legend(handles, [classes[c] for c in sorted(classes)], loc="outside lower center", ncol=min(len(handles), 6), fontsize=8)
    title = (
        f"Task {example.get('task')}: test case {example.get('case_id')} "
        f"(fraction {example.get('fraction')}, seed {example.get('seed')})"
    )
    fig.suptitle(_title_with_note(title, bool(example.get("simulated")), str(example.get("trained_on", ""))))
    return _save(fig, path)


def plot_detection_examples(example: Mapping[str, Any], path: str | Path) -> Path:
    """Slices through ground-truth lesions with each init's detections near that slice.

    Args:
        example: ``{"task", "slices": [{"case_id", "image": (X, Y), "label": str,
            "lesions": [(x_px, y_px, r_px)], "detections": {init: [(x_px, y_px, score, hit)]}}],
            "inits": [str], "aspect": float, "simulated": bool, "trained_on": str,
            "fraction": float, "seed": int}``; pixel coordinates index the (X, Y) slice.
        path: the PNG to write.

    Returns:
        ``path``.
    """
    slices = example.get("slices", [])
    if not slices:
        return _empty(path, f"Detection examples, task {example.get('task')}", "no test lesion to show")
    inits = list(example.get("inits", []))
    aspect = float(example.get("aspect", 1.0))
    fig = Figure(figsize=(3.2 * max(len(inits), 1), 3.3 * len(slices) + 0.8), layout="constrained")
    axes = fig.subplots(len(slices), max(len(inits), 1), squeeze=False)
    for i, item in enumerate(slices):
        for j, init in enumerate(inits or [""]):
            ax = axes[i, j]
            plane = np.asarray(item["image"])
            _show_slice(ax, plane, aspect)
            width = plane.shape[0]
            for x, y, r in item.get("lesions", []):
                centre = _display_xy(x, y, width)
                ax.add_patch(Circle(centre, max(r, 2.0), fill=False, edgecolor="lime", linewidth=1.4))
            for x0, y0, score, hit in item.get("detections", {}).get(init, []):
                x, y = _display_xy(x0, y0, width)
                ax.plot(x, y, marker="x", color="red" if not hit else "yellow", markersize=7, mew=1.6)
                ax.annotate(f"{score:.2f}", (x, y), color="yellow", fontsize=7, xytext=(4, 4), textcoords="offset points")
            if i == 0:
                ax.set_title(f"init: {init}", fontsize=9)
            if j == 0:
                ax.set_ylabel(f"{item.get('case_id')}\n{item.get('label', '')}", fontsize=8)
    fig.suptitle(
        _title_with_note(
            f"Task {example.get('task')}: ground truth (green circles), detections (x: yellow = hit, red = FP)"
            f"\nfraction {example.get('fraction')}, seed {example.get('seed')}; ground truth: the test lesion table",
            bool(example.get("simulated")),
            str(example.get("trained_on", "")),
        ),
        fontsize=10,
    )
    return _save(fig, path)
