"""kNN and linear probes of frozen embeddings, cross-validated so that near-copies never meet.

A probe asks whether a label that needs no annotation effort (dataset, modality, body region,
slice position, which structures a slice shows) can be read off an embedding: a kNN classifier
(cosine similarity, temperature-weighted votes, as in solo-learn and DINO) and a linear
classifier (L2-regularised logistic regression, SciPy's L-BFGS-B; scikit-learn is not a
dependency) are fitted on some items and scored on others.

**Protocol.** Neighbouring slices of one volume are near-copies: a probe that fits on slice
``i`` and scores slice ``i + 1`` measures memorisation, not representation. Every item belongs
to a *unit*: a 2D image is a unit of its own, a volume is cut into contiguous z blocks of
``block_mm``. Units are dealt round-robin to ``folds`` folds; when a fold is scored, the fit set is
every other fold's items **except** items of the same case closer than ``gap_mm`` in z to any
scored item (a buffer, like the fine-tuning slabs' gap). Every item is scored exactly once
(out-of-fold), and the scores are computed once over all out-of-fold predictions. Labels that
only mean something inside a dataset (z bin, structures) are fitted and scored within each
dataset. Classes held by fewer than ``min_units`` units cannot be predicted out of fold and are
left out (reported). Each result reports how many items, cases, units and folds it used.

Scores: balanced accuracy (mean per-class recall; chance = 1 / classes) for single-label
probes, macro ROC AUC over label columns that have both classes (MONAI; chance = 0.5) for
multi-label probes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medclust.errors import MedclustError

__all__ = [
    "ProbeResult",
    "ProbeSettings",
    "ProbeTarget",
    "balanced_accuracy",
    "fit_exclusion",
    "fit_linear",
    "knn_scores",
    "linear_scores",
    "macro_auc",
    "probe_units",
    "run_probe",
    "run_probes",
    "unit_folds",
]


@dataclass(frozen=True)
class ProbeSettings:
    """How probes are fitted and cross-validated (config ``pretrain.probe``).

    Attributes:
        folds: cross-validation folds over units.
        block_mm: z length of one unit (contiguous block) of a volume.
        gap_mm: items of the same case closer than this in z to a scored item are never fitted.
        knn_k: neighbours (at most the fit-set size).
        knn_temperature: votes are weighted by ``exp(cosine / temperature)``.
        linear_l2: L2 penalty on the logistic-regression weights (features are standardised).
        linear_steps: L-BFGS iterations of the linear probe.
        min_units: a class needs at least this many units to be probed.
    """

    folds: int = 5
    block_mm: float = 20.0
    gap_mm: float = 20.0
    knn_k: int = 20
    knn_temperature: float = 0.07
    linear_l2: float = 1e-3
    linear_steps: int = 100
    min_units: int = 2

    def __post_init__(self) -> None:
        if self.folds < 2 or self.knn_k < 1 or self.linear_steps < 1 or self.min_units < 1:
            raise MedclustError("probe settings: folds must be >= 2, knn_k, linear_steps and min_units >= 1")
        if not (self.block_mm > 0 and self.gap_mm >= 0 and self.knn_temperature > 0 and self.linear_l2 >= 0):
            raise MedclustError("probe settings: block_mm and knn_temperature must be > 0, gap_mm and linear_l2 >= 0")

    @classmethod
    def from_dict(cls, settings: Mapping[str, Any]) -> ProbeSettings:
        """Pick this class's keys out of a (larger) ``probe`` settings dict."""
        names = cls.__dataclass_fields__.keys()
        return cls(**{k: v for k, v in settings.items() if k in names})


@dataclass
class ProbeTarget:
    """One label to probe.

    Attributes:
        name: label name (``dataset``, ``structures`` ...).
        values: single-label: (N,) strings, ``""`` where the label does not apply; multi-label:
            (N, C) floats in {0, 1}, NaN where a column does not apply.
        columns: multi-label column names (None for single-label).
        within_dataset: fit and score only among items of the same dataset.
    """

    name: str
    values: np.ndarray
    columns: list[str] | None = None
    within_dataset: bool = False

    @property
    def multilabel(self) -> bool:
        return self.columns is not None


@dataclass
class ProbeResult:
    """Out-of-fold scores of one label and what they were computed on.

    Attributes:
        label: label name.
        metric: ``balanced_accuracy`` or ``macro_auc``.
        knn: kNN score (NaN when nothing could be scored).
        linear: linear-probe score.
        chance: the score of a guess that ignores the embedding.
        n_items: items scored.
        n_cases: cases they come from.
        n_units: units (2D images and z blocks) they form.
        n_folds: folds that scored at least one item.
        classes: class (or column) -> items (positives for multi-label) among the scored items.
        dropped: classes or columns left out, with the reason.
    """

    label: str
    metric: str
    knn: float
    linear: float
    chance: float
    n_items: int
    n_cases: int
    n_units: int
    n_folds: int
    classes: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Plain types (JSON)."""
        return asdict(self)


# -- protocol ----------------------------------------------------------------------------------------


def probe_units(case: Sequence[str] | np.ndarray, z_mm: Sequence[float] | np.ndarray, block_mm: float) -> np.ndarray:
    """Unit id of every item: contiguous ``block_mm`` z blocks within each case.

    Args:
        case: (N,) case key of each item (unique across datasets).
        z_mm: (N,) slice position along the slice axis (any value for 2D images).
        block_mm: block length.

    Returns:
        (N,) int unit ids, numbered in order of first appearance.
    """
    case = np.asarray(case).astype(str)
    z = np.asarray(z_mm, dtype=np.float64)
    keys = np.empty(len(case), dtype=object)
    for c in dict.fromkeys(case.tolist()):
        sel = case == c
        block = np.floor((z[sel] - z[sel].min()) / block_mm).astype(np.int64)
        keys[np.flatnonzero(sel)] = [(c, int(b)) for b in block]
    ids: dict[Any, int] = {}
    return np.asarray([ids.setdefault(k, len(ids)) for k in keys], dtype=np.int64)


def unit_folds(units: np.ndarray, folds: int) -> np.ndarray:
    """Fold of every item: units dealt round-robin, so neighbouring blocks land in different folds."""
    return (np.asarray(units, dtype=np.int64) % folds).astype(np.int64)


def fit_exclusion(case: np.ndarray, z_mm: np.ndarray, gap_mm: float) -> np.ndarray:
    """``near[i, j]``: items i and j are of one case and closer than ``gap_mm`` in z (never fit i to score j).

    An item is always near itself, so it is never fitted while it is scored.
    """
    case = np.asarray(case).astype(str)
    z = np.asarray(z_mm, dtype=np.float64)
    return (case[:, None] == case[None, :]) & (np.abs(z[:, None] - z[None, :]) < gap_mm)


# -- classifiers -------------------------------------------------------------------------------------


def knn_scores(fit_x: torch.Tensor, fit_y: torch.Tensor, query_x: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """Temperature-weighted kNN votes with cosine similarity.

    Args:
        fit_x: (n, D) fit features.
        fit_y: (n, C) one-hot (single-label) or 0/1 (multi-label) targets.
        query_x: (m, D) features to score.
        k: neighbours (capped at n).
        temperature: votes weigh ``exp(cosine / temperature)``.

    Returns:
        (m, C) vote shares (rows sum to 1 for one-hot targets); uniform when ``n == 0``.
    """
    m, c = query_x.shape[0], fit_y.shape[1]
    if fit_x.shape[0] == 0:
        return torch.full((m, c), 1.0 / max(c, 1), dtype=torch.float32)
    sim = F.normalize(query_x.float(), dim=1) @ F.normalize(fit_x.float(), dim=1).T
    top, idx = sim.topk(min(k, fit_x.shape[0]), dim=1)
    # subtract the row maximum first: exp(1 / 0.07) alone is ~1.6e6 and the sum can overflow in float32
    weights = torch.exp((top - top[:, :1]) / temperature)
    votes = (weights[..., None] * fit_y.float()[idx]).sum(1)
    return votes / weights.sum(1, keepdim=True)


def _logistic_loss_grad(
    params: np.ndarray, x: np.ndarray, y: np.ndarray, sample_w: np.ndarray | None, multilabel: bool, l2: float
) -> tuple[float, np.ndarray]:
    """Mean (weighted) cross-entropy + ``l2 * ||W||^2`` and its gradient, for L-BFGS."""
    n, d = x.shape
    c = y.shape[1]
    weight, bias = params[: d * c].reshape(d, c), params[d * c :]
    logits = x @ weight + bias
    if multilabel:
        # log(1 + e^z) - y z, computed stably
        loss = float(np.mean(np.logaddexp(0.0, logits) - y * logits)) * c
        dlogits = (1.0 / (1.0 + np.exp(-logits)) - y) / n
    else:
        logits = logits - logits.max(axis=1, keepdims=True)
        log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        w = sample_w if sample_w is not None else np.ones(n)
        loss = float(-(w * (y * log_p).sum(axis=1)).mean())
        dlogits = (np.exp(log_p) - y) * w[:, None] / n
    loss += l2 * float((weight**2).sum())
    grad = np.concatenate([(x.T @ dlogits + 2.0 * l2 * weight).ravel(), dlogits.sum(axis=0)])
    return loss, grad


def fit_linear(x: np.ndarray, y: np.ndarray, multilabel: bool, l2: float, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """L2-regularised logistic regression (softmax, or one sigmoid per column) with L-BFGS.

    scikit-learn is not a dependency; this is its ``LogisticRegression(solver="lbfgs")``
    objective (mean loss + ``l2 * ||W||^2``, bias not penalised), minimised with SciPy's
    L-BFGS-B on an analytic gradient, which is ~50x faster than ``torch.optim.LBFGS`` on these
    small problems. Classes are weighted inversely to their frequency (single-label), matching
    the balanced accuracy the probe is scored with. Starts from zero weights: deterministic.

    Args:
        x: (n, D) standardised features.
        y: (n, C) one-hot or 0/1 targets.
        multilabel: sigmoid per column instead of a softmax.
        l2: penalty on the weights.
        steps: most L-BFGS iterations.

    Returns:
        ``(W, b)``: (D, C) and (C,) float64.
    """
    from scipy.optimize import minimize

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    d, c = x.shape[1], y.shape[1]
    sample_w = None
    if not multilabel:
        counts = y.sum(axis=0)
        present = counts > 0
        class_w = np.where(present, y.shape[0] / (np.maximum(counts, 1) * max(int(present.sum()), 1)), 0.0)
        sample_w = y @ class_w
    result = minimize(
        _logistic_loss_grad, np.zeros(d * c + c), args=(x, y, sample_w, multilabel, l2),
        jac=True, method="L-BFGS-B", options={"maxiter": int(steps)},
    )
    return result.x[: d * c].reshape(d, c), result.x[d * c :]


def linear_scores(fit_x: torch.Tensor, fit_y: torch.Tensor, query_x: torch.Tensor, multilabel: bool, l2: float, steps: int) -> torch.Tensor:
    """Fit :func:`fit_linear` on standardised ``fit_x`` and return (m, C) probabilities for ``query_x``."""
    m, c = query_x.shape[0], fit_y.shape[1]
    if fit_x.shape[0] == 0:
        return torch.full((m, c), 0.5 if multilabel else 1.0 / max(c, 1))
    fx, qx = fit_x.double().numpy(), query_x.double().numpy()
    mean, std = fx.mean(axis=0), np.maximum(fx.std(axis=0), 1e-6)
    fx, qx = (fx - mean) / std, (qx - mean) / std
    if fx.shape[1] > fx.shape[0]:
        # fewer items than features: the optimal W lies in the fit items' row space (any other
        # component only adds to the rotation-invariant L2 penalty), so fitting in that basis
        # gives the same classifier with n instead of D parameters per class
        # (orthonormal basis from the n x n Gram matrix: cheaper than an SVD of the n x D features)
        evals, evecs = np.linalg.eigh(fx @ fx.T)
        keep = evals > max(float(evals.max()), 1e-12) * 1e-10
        scale = np.sqrt(evals[keep])
        qx = (qx @ fx.T) @ evecs[:, keep] / scale
        fx = evecs[:, keep] * scale
    weight, bias = fit_linear(fx, fit_y.double().numpy(), multilabel, l2, steps)
    logits = torch.from_numpy(qx @ weight + bias)
    return (torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=1)).float()


# -- scores ------------------------------------------------------------------------------------------


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean recall over the classes present in ``y_true`` (NaN when empty)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    classes = np.unique(y_true)
    if classes.size == 0:
        return math.nan
    return float(np.mean([(y_pred[y_true == c] == c).mean() for c in classes]))


def macro_auc(targets: np.ndarray, scores: np.ndarray) -> float:
    """Mean ROC AUC over columns with both classes among their non-NaN targets (MONAI); NaN if none."""
    from medclust.evaluate.metrics import roc_auc_per_class

    values = []
    for c in range(targets.shape[1]):
        ok = np.isfinite(targets[:, c]) & np.isfinite(scores[:, c])
        t = targets[ok, c]
        if t.size and 0 < t.sum() < t.size:
            values.append(roc_auc_per_class(scores[ok, c][:, None], t[:, None])[0])
    return float(np.mean(values)) if values else math.nan


# -- running a probe ---------------------------------------------------------------------------------


def _out_of_fold(
    features: torch.Tensor, y: np.ndarray, folds: np.ndarray, near: np.ndarray, multilabel: bool, s: ProbeSettings
) -> tuple[np.ndarray, np.ndarray]:
    """kNN and linear out-of-fold scores (n, C) of one item subset (``y`` finite everywhere)."""
    n, c = y.shape
    knn_out = np.full((n, c), np.nan)
    lin_out = np.full((n, c), np.nan)
    yt = torch.from_numpy(y).float()
    for f in np.unique(folds):
        scored = folds == f
        fit = ~scored & ~near[:, scored].any(axis=1)
        q = torch.from_numpy(np.flatnonzero(scored))
        idx = torch.from_numpy(np.flatnonzero(fit))
        knn_out[scored] = knn_scores(features[idx], yt[idx], features[q], s.knn_k, s.knn_temperature).numpy()
        lin_out[scored] = linear_scores(features[idx], yt[idx], features[q], multilabel, s.linear_l2, s.linear_steps).numpy()
    return knn_out, lin_out


def run_probe(
    features: np.ndarray | torch.Tensor,
    target: ProbeTarget,
    case: np.ndarray,
    z_mm: np.ndarray,
    dataset: np.ndarray,
    settings: ProbeSettings,
) -> ProbeResult:
    """Cross-validated kNN and linear probe of one label (module docstring: the protocol).

    Args:
        features: (N, D) embeddings.
        target: the label.
        case: (N,) case key of each item (unique across datasets).
        z_mm: (N,) z position of each item.
        dataset: (N,) dataset of each item.
        settings: protocol and classifier settings.

    Returns:
        The scores and the counts they rest on.
    """
    x = torch.as_tensor(np.asarray(features, dtype=np.float32))
    case, dataset = np.asarray(case).astype(str), np.asarray(dataset).astype(str)
    z = np.asarray(z_mm, dtype=np.float64)
    units = probe_units(case, z, settings.block_mm)
    dropped: dict[str, str] = {}
    values = np.asarray(target.values)
    if target.multilabel:
        columns = list(target.columns or [])
        y_all = values.astype(np.float64).reshape(len(case), len(columns))
        keep = np.isfinite(y_all).any(axis=1)
        metric, chance = "macro_auc", 0.5
    else:
        labels = values.astype(str)
        keep = labels != ""
        for cls in sorted(set(labels[keep].tolist())):
            n_units = len(set(units[keep & (labels == cls)].tolist()))
            if n_units < settings.min_units:
                keep &= labels != cls
                dropped[cls] = f"{n_units} unit(s) < min_units={settings.min_units}: cannot be predicted out of fold"
        columns = sorted(set(labels[keep].tolist()))
        y_all = np.zeros((len(case), len(columns)))
        for j, cls in enumerate(columns):
            y_all[labels == cls, j] = 1.0
        metric, chance = "balanced_accuracy", (1.0 / len(columns) if columns else math.nan)
    folds = unit_folds(units, settings.folds)
    near = fit_exclusion(case, z, settings.gap_mm)
    knn_out = np.full(y_all.shape, np.nan)
    lin_out = np.full(y_all.shape, np.nan)
    groups = sorted(set(dataset[keep].tolist())) if target.within_dataset else [None]
    fold_ids: set[int] = set()
    for group in groups:
        sel = keep & (dataset == group) if group is not None else keep.copy()
        # multi-label: the columns that apply to every item of the group (a dataset's own structures)
        cols = np.flatnonzero(np.isfinite(y_all[sel]).all(axis=0)) if target.multilabel else np.arange(len(columns))
        if not sel.any() or cols.size == 0:
            continue
        rows = np.flatnonzero(sel)
        y = y_all[np.ix_(rows, cols)]
        k_out, l_out = _out_of_fold(x[torch.from_numpy(rows)], y, folds[rows], near[np.ix_(rows, rows)], target.multilabel, settings)
        knn_out[np.ix_(rows, cols)] = k_out
        lin_out[np.ix_(rows, cols)] = l_out
        fold_ids |= set(folds[rows].tolist())
    scored = keep
    if target.multilabel:
        ys = y_all[scored]
        classes = {}
        for j, col in enumerate(columns):
            t = ys[:, j][np.isfinite(ys[:, j])]
            if t.size == 0:
                continue
            if 0 < t.sum() < t.size:
                classes[col] = int(t.sum())
            else:
                dropped[col] = "present on every item" if t.sum() == t.size else "present on no item"
        knn, linear = macro_auc(ys, knn_out[scored]), macro_auc(ys, lin_out[scored])
    else:
        truth = y_all[scored].argmax(1) if columns else np.zeros(0, int)
        classes = {cls: int((truth == j).sum()) for j, cls in enumerate(columns)}
        knn = balanced_accuracy(truth, np.nan_to_num(knn_out[scored], nan=-1).argmax(1)) if columns else math.nan
        linear = balanced_accuracy(truth, np.nan_to_num(lin_out[scored], nan=-1).argmax(1)) if columns else math.nan
    return ProbeResult(
        label=target.name,
        metric=metric,
        knn=knn,
        linear=linear,
        chance=chance,
        n_items=int(scored.sum()),
        n_cases=len(set(case[scored].tolist())),
        n_units=len(set(units[scored].tolist())),
        n_folds=len(fold_ids),
        classes=classes,
        dropped=dropped,
    )


def run_probes(
    features: np.ndarray | torch.Tensor,
    targets: Sequence[ProbeTarget],
    case: np.ndarray,
    z_mm: np.ndarray,
    dataset: np.ndarray,
    settings: ProbeSettings,
) -> dict[str, ProbeResult]:
    """:func:`run_probe` for every target; labels with nothing to score are left out.

    Returns:
        label name -> result.
    """
    out = {}
    with torch.no_grad():
        for target in targets:
            result = run_probe(features, target, case, z_mm, dataset, settings)
            # a single-label probe needs two classes, a multi-label one a column with both
            if len(result.classes) >= (1 if target.multilabel else 2):
                out[target.name] = result
    return out
