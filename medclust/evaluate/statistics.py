"""Bootstrap confidence intervals for the study: over seeds, and over test cases within seeds.

Procedure (the README quotes it):

- A *run* is one (task, init, fraction, seed). Its metric value is computed from its per-case
  records (``per_case.csv``) by the same function that wrote ``metrics.json``; a
  :class:`CaseResampler` recomputes it for resampled case sets.
- A *cell* is one (init, fraction) with S runs (seeds). Reported: n = S, the mean and the sample
  standard deviation (ddof=1) of the S run values, and a percentile bootstrap CI of the mean:
  each of ``n_samples`` replicates draws S seeds with replacement and, for every drawn seed that
  has per-case records, draws its test cases with replacement (a fresh draw for every pick) and
  recomputes the run's metric; the replicate's statistic is the mean over the drawn seeds. This
  two-level (hierarchical) bootstrap reflects both training variability (seeds) and test-set
  sampling (cases). Without per-case records the seed level alone is resampled.
- The *paired difference* to random init (``none``) pairs runs by fraction and seed (same split,
  same label subset, same test cases) and, within a pair, by case: a replicate draws the pairs
  with replacement, draws one set of case indices per drawn pair and applies it to both arms,
  and averages ``metric(init) - metric(none)``. The point estimate is the mean over pairs of the
  run-level differences.
- CIs are percentile intervals at the configured level. A cell with a single seed and at most
  one test case has no CI (NaN): there is nothing to resample. With few seeds and one test case
  (the demo), the interval reflects seed variation only and is crude (2 seeds: about their range).
  Every draw comes from a ``numpy.random.Generator`` seeded from the study seed and the cell's
  name, so a table is reproducible and one cell's CI does not depend on which other cells exist.
- The resampling unit within a run is the test case (all slices of a case move together), never
  the slice: slices of one volume are correlated, and treating them as independent would make
  the intervals too narrow.
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

Recompute = Callable[[np.ndarray], np.ndarray]
"""Maps case indices (B, n) -> B metric values, one per row of indices."""


@dataclass
class CaseResampler:
    """The per-case records of one run, able to recompute the run's metric on resampled cases.

    Args:
        case_ids: the n cases (the resampling units), in the order ``recompute`` indexes them.
        recompute: ``indices (B, n) int -> (B,) float``: the metric on each resampled case set.
    """

    case_ids: list[str]
    recompute: Recompute

    @property
    def n(self) -> int:
        return len(self.case_ids)

    def aligned(self, order: Sequence[str]) -> CaseResampler:
        """The same records re-indexed to ``order`` (a permutation or subset of the case ids)."""
        position = {c: i for i, c in enumerate(self.case_ids)}
        index = np.array([position[c] for c in order], dtype=np.int64)
        inner = self.recompute
        return CaseResampler(list(order), lambda idx: inner(index[idx]))


def mean_of_columns_resampler(case_ids: Sequence[str], values: np.ndarray) -> CaseResampler:
    """A resampler for metrics that are ``nanmean over columns of (nanmean over cases)``.

    Args:
        case_ids: n case ids.
        values: (n,) or (n, C) per-case values (NaN = not defined for that case/column).

    Returns:
        A :class:`CaseResampler` whose metric on all cases equals
        ``nanmean_c(nanmean_i(values[i, c]))`` — e.g. the class-mean Dice.
    """
    matrix = np.asarray(values, dtype=np.float64)
    if matrix.ndim == 1:
        matrix = matrix[:, None]

    def recompute(idx: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns are NaN, by design
            per_column = np.nanmean(matrix[idx], axis=1)  # (B, C)
            return np.nanmean(per_column, axis=-1)

    return CaseResampler(list(case_ids), recompute)


def loop_resampler(case_ids: Sequence[str], metric: Callable[[np.ndarray], float]) -> CaseResampler:
    """A resampler for metrics that must be recomputed from scratch (AUC, FROC).

    Args:
        case_ids: n case ids.
        metric: ``indices (n,) -> value`` on one resampled case set.
    """

    def recompute(idx: np.ndarray) -> np.ndarray:
        return np.array([metric(row) for row in np.atleast_2d(idx)], dtype=np.float64)

    return CaseResampler(list(case_ids), recompute)


def cell_rng(seed: int, *names: object) -> np.random.Generator:
    """A generator seeded from the study seed and a cell's name (stable across runs)."""
    key = zlib.crc32("/".join(str(n) for n in names).encode())
    return np.random.default_rng(np.random.SeedSequence([int(seed), key]))


def percentile_interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    """The central ``level`` percentile interval of finite bootstrap samples (NaN if none)."""
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return math.nan, math.nan
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(finite, [alpha, 1.0 - alpha])
    return float(low), float(high)


def bootstrap_ci(
    values: Sequence[float] | np.ndarray, n_samples: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``values`` (NaNs dropped).

    Args:
        values: the sample.
        n_samples: bootstrap replicates.
        level: confidence level, e.g. 0.95.
        seed: seed of the resampling.

    Returns:
        ``(low, high)``; ``(nan, nan)`` for fewer than two values.
    """
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_samples, x.size))].mean(axis=1)
    return percentile_interval(means, level)


@dataclass
class Unit:
    """One run in a cell: its metric value and, if available, its per-case records."""

    seed: int
    value: float
    cases: CaseResampler | None = None


def _draw_run_values(units: Sequence[Unit], picks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Metric of each picked unit, with its cases resampled afresh for every pick.

    Args:
        units: the runs.
        picks: (B, S) indices into ``units``.
        rng: generator.

    Returns:
        (B, S) values.
    """
    out = np.empty(picks.shape, dtype=np.float64)
    for j, unit in enumerate(units):
        where = picks == j
        count = int(where.sum())
        if count == 0:
            continue
        if unit.cases is None or unit.cases.n < 2:
            # nothing to resample within the run: every draw is the run itself
            out[where] = unit.value
        else:
            idx = rng.integers(0, unit.cases.n, size=(count, unit.cases.n))
            out[where] = unit.cases.recompute(idx)
    return out


@dataclass
class CellSummary:
    """Statistics of one (init, fraction) cell."""

    n: int
    n_cases: int
    mean: float
    std: float
    ci_low: float
    ci_high: float


def summarise_cell(
    units: Sequence[Unit], n_samples: int, level: float, rng: np.random.Generator, resample_cases: bool = True
) -> CellSummary:
    """Mean, std and hierarchical bootstrap CI of the run values of one cell (module docstring).

    Args:
        units: the cell's runs (one per seed).
        n_samples: bootstrap replicates.
        level: confidence level.
        rng: the cell's generator.
        resample_cases: resample cases within runs where per-case records exist.

    Returns:
        The cell's :class:`CellSummary`.
    """
    units = [u for u in units if math.isfinite(u.value)]
    if not units:
        return CellSummary(0, 0, math.nan, math.nan, math.nan, math.nan)
    values = np.array([u.value for u in units])
    if not resample_cases:
        units = [Unit(u.seed, u.value, None) for u in units]
    n_cases = max((u.cases.n for u in units if u.cases is not None), default=0)
    std = float(values.std(ddof=1)) if values.size > 1 else math.nan
    if values.size < 2 and n_cases < 2:
        # One value and nothing to resample within it: an interval would claim certainty.
        return CellSummary(int(values.size), n_cases, float(values.mean()), std, math.nan, math.nan)
    picks = rng.integers(0, len(units), size=(n_samples, len(units)))
    replicates = _draw_run_values(units, picks, rng).mean(axis=1)
    low, high = percentile_interval(replicates, level)
    return CellSummary(int(values.size), n_cases, float(values.mean()), std, low, high)


@dataclass
class PairedSummary:
    """Paired difference ``init - reference`` over matched seeds (and cases)."""

    n_pairs: int
    diff: float
    ci_low: float
    ci_high: float


def paired_difference(
    units: Sequence[Unit],
    reference: Sequence[Unit],
    n_samples: int,
    level: float,
    rng: np.random.Generator,
    resample_cases: bool = True,
) -> PairedSummary:
    """Mean paired difference to the reference arm with a paired hierarchical bootstrap CI.

    Args:
        units: runs of the compared arm (one per seed).
        reference: runs of the reference arm (random init), same fraction.
        n_samples: bootstrap replicates.
        level: confidence level.
        rng: the cell's generator.
        resample_cases: resample (shared) cases within pairs where both arms have per-case records.

    Returns:
        The :class:`PairedSummary`; NaN when no seed is in both arms.
    """
    ref_by_seed = {u.seed: u for u in reference if math.isfinite(u.value)}
    pairs = [(u, ref_by_seed[u.seed]) for u in units if u.seed in ref_by_seed and math.isfinite(u.value)]
    if not pairs:
        return PairedSummary(0, math.nan, math.nan, math.nan)
    diffs = np.array([a.value - b.value for a, b in pairs])
    # Align both arms of each pair to their common cases, so one draw of indices serves both.
    aligned: list[tuple[CaseResampler, CaseResampler] | None] = []
    for a, b in pairs:
        if resample_cases and a.cases is not None and b.cases is not None:
            common = [c for c in b.cases.case_ids if c in set(a.cases.case_ids)]
            aligned.append((a.cases.aligned(common), b.cases.aligned(common)) if len(common) > 1 else None)
        else:
            aligned.append(None)
    if len(pairs) < 2 and all(x is None for x in aligned):
        return PairedSummary(len(pairs), float(diffs.mean()), math.nan, math.nan)
    picks = rng.integers(0, len(pairs), size=(n_samples, len(pairs)))
    drawn = np.empty(picks.shape, dtype=np.float64)
    for j, pair in enumerate(aligned):
        where = picks == j
        count = int(where.sum())
        if count == 0:
            continue
        if pair is None:
            drawn[where] = diffs[j]
        else:
            arm, ref = pair
            idx = rng.integers(0, arm.n, size=(count, arm.n))
            drawn[where] = arm.recompute(idx) - ref.recompute(idx)
    low, high = percentile_interval(drawn.mean(axis=1), level)
    return PairedSummary(len(pairs), float(diffs.mean()), low, high)
