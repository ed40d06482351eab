"""Intervals and verdicts of the study: one rule, chosen by what was replicated.

The README ("Statistics in the study table") quotes this procedure.

- A *run* is one (task, init, fraction, seed); its value is the metric of its ``metrics.json``,
  computed from its per-case records (``per_case.csv``). A :class:`CaseResampler` recomputes it
  on resampled case sets. The resampling unit is the test case (or group: all rows with one
  ``case_id`` move together), never the slice: slices of one volume are correlated.
- A *cell* is one (init, fraction) with S runs (seeds); its statistic is the mean of the S run
  values. A *comparison* is the paired difference ``init - none`` over the S seeds run in both
  arms (same fraction, seed, split, label subset and test cases); its statistic is the mean of
  the S per-seed differences.
- C is the number of test cases common to every run involved (0 without per-case records).

The rule (``ci_method`` in the study table says which branch was taken, and why):

1. **C >= 5 and S >= 3: two-level bootstrap.** Seed level: the variance of the mean over seeds,
   ``s^2 / S`` (s: sample std of the S run values or paired differences) — what resampling the
   seeds estimates, without the ``(S-1)/S`` shrinkage of a bootstrap over few values. Case level:
   ``n_samples`` replicates each draw C cases with replacement (stratified, see below) and
   recompute every run's metric on them; one draw serves every seed of the replicate and both
   arms of a pair, because every run of a study is tested on the same cases. The variance of the
   replicate statistic, rescaled by ``C / (C - H)`` (H strata; unbiased for a mean), is the case
   level. The interval is ``estimate +- t * sqrt(V_seeds + V_cases)`` with the Student-t
   quantile on Welch-Satterthwaite degrees of freedom (``S - 1`` for the seed level, ``C - H``
   for the case level), so that with 3 seeds the interval is as wide as 3 seeds warrant. (The
   per-run noise that is neither seed nor case is counted in both levels: slightly
   conservative.)
2. **Otherwise, S >= 3: the seed is the unit.** Student-t interval of the mean of the S run values
   (cells) or of the S per-seed paired differences (comparisons): ``mean +- t_{S-1} s / sqrt(S)``.
3. **Otherwise no interval** (NaN), with the reason, e.g. ``none: 2 seeds < 3 and 1 test case < 5``.
   Two seeds do not support an interval even with many cases: the seed level's variance then
   rests on one degree of freedom, and in simulated studies (S = 2, C = 8-20) the two-level
   interval covered 0.875-0.94 of the time instead of 0.95.

No interval either, with the reason, when

- nothing varies: all S values are equal where the seed is the unit (``none: all 3 seeds give
  0``), or equal on every case draw in the two-level bootstrap. A metric quantised on a small
  test set (FROC on one scan, accuracy over a few slices) ties across seeds, and a zero-width
  interval would claim a certainty that three ties do not give;
- the runs were not tested on the same cases (``none: runs tested on different test cases``):
  they are then not paired as the rule assumes, and the runs' own values (over all of their
  cases) and a case draw over the cases they share would describe different test sets.

Runs whose value is undefined (NaN) are left out and named in ``ci_method``.

Undefined replicates (the metric is NaN on a drawn case set: an AUC class left with one label, a
Dice class absent from every drawn case, no lesion drawn) are counted, not dropped; above 1 % of
the replicates the interval is NaN with the reason. Class-mean metrics are undefined on a
replicate as soon as one class that is defined on all cases is undefined on the drawn ones (a
mean over a different class set is a different metric). Classification cases are drawn within
strata of equal label signature (per class: has a positive, has a negative), so both labels of
every class stay present; detection cases within "has lesions" / "has none".

A comparison's verdict (:func:`verdict`) reads its interval: ``helps`` / ``hurts`` when it excludes
0 (metric direction taken into account: lower HD95 helps), ``no detectable difference`` when a
valid interval contains 0, and ``inconclusive (too few seeds or cases)`` without an interval or
with fewer than 3 paired seeds. Every draw comes from a generator seeded from the study seed and
the cell's name (:func:`cell_rng`), so a table is reproducible and one cell's interval does not
depend on which other cells exist.
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

Recompute = Callable[[np.ndarray], np.ndarray]
"""Maps case indices (B, n) -> B metric values, one per row of indices."""

MIN_CASES = 5
"""Test cases (common to the runs) from which cases are independent resampling units."""
MIN_SEEDS = 3
"""Seeds from which the seed alone supports an interval, and a verdict other than inconclusive."""
MAX_UNDEFINED = 0.01
"""Largest share of undefined bootstrap replicates that still gives an interval."""
_TIE = 1e-9
"""Relative spread below which values count as equal (differences of equal fractions round apart)."""

HELPS = "helps"
HURTS = "hurts"
NO_DIFFERENCE = "no detectable difference"
INCONCLUSIVE = "inconclusive (too few seeds or cases)"
VERDICTS = (HELPS, HURTS, NO_DIFFERENCE, INCONCLUSIVE)


@dataclass
class CaseResampler:
    """The per-case records of one run, able to recompute the run's metric on resampled cases.

    Args:
        case_ids: the n cases (the resampling units), in the order ``recompute`` indexes them.
        recompute: ``indices (B, n) int -> (B,) float``: the metric on each resampled case set.
        strata: optional (n,) stratum label of every case; draws keep each stratum's size.
    """

    case_ids: list[str]
    recompute: Recompute
    strata: np.ndarray | None = field(default=None)

    @property
    def n(self) -> int:
        return len(self.case_ids)

    def aligned(self, order: Sequence[str]) -> CaseResampler:
        """The same records re-indexed to ``order`` (a permutation or subset of the case ids)."""
        position = {c: i for i, c in enumerate(self.case_ids)}
        index = np.array([position[c] for c in order], dtype=np.int64)
        inner = self.recompute
        strata = None if self.strata is None else np.asarray(self.strata)[index]
        return CaseResampler(list(order), lambda idx: inner(index[idx]), strata)


def mean_of_columns_resampler(case_ids: Sequence[str], values: np.ndarray) -> CaseResampler:
    """A resampler for metrics that are ``mean over columns of (nanmean over cases)``.

    Args:
        case_ids: n case ids.
        values: (n,) or (n, C) per-case values (NaN = not defined for that case/column).

    Returns:
        A :class:`CaseResampler` whose metric on all cases equals
        ``nanmean_c(nanmean_i(values[i, c]))`` — e.g. the class-mean Dice. A drawn case set on
        which a column that is defined on all cases has no value gives NaN (undefined), not a
        mean over fewer columns.
    """
    matrix = np.asarray(values, dtype=np.float64)
    if matrix.ndim == 1:
        matrix = matrix[:, None]
    defined = np.isfinite(matrix).any(axis=0)
    matrix = matrix[:, defined]

    def recompute(idx: np.ndarray) -> np.ndarray:
        if matrix.shape[1] == 0:
            return np.full(np.atleast_2d(idx).shape[0], np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns are NaN, by design
            per_column = np.nanmean(matrix[idx], axis=1)  # (B, C)
            return per_column.mean(axis=-1)  # NaN if any column is undefined on the draw

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


def draw_cases(n: int, n_samples: int, rng: np.random.Generator, strata: np.ndarray | None = None) -> np.ndarray:
    """Bootstrap draws of case indices, within strata when given.

    Args:
        n: number of cases.
        n_samples: replicates B.
        rng: generator.
        strata: optional (n,) stratum labels; each replicate keeps every stratum's size.

    Returns:
        (B, n) indices into the cases.
    """
    if strata is None:
        return rng.integers(0, n, size=(n_samples, n))
    idx = np.empty((n_samples, n), dtype=np.int64)
    for label in np.unique(strata):
        members = np.flatnonzero(strata == label)
        idx[:, members] = members[rng.integers(0, members.size, size=(n_samples, members.size))]
    return idx


def t_interval(values: Sequence[float] | np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean: ``mean +- t_{n-1} * s / sqrt(n)``.

    Args:
        values: the sample (NaNs dropped).
        level: confidence level.

    Returns:
        ``(low, high)``; ``(nan, nan)`` for fewer than two values.
    """
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size < 2:
        return math.nan, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, x.size - 1)) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return float(x.mean()) - half, float(x.mean()) + half


@dataclass
class Unit:
    """One run in a cell: its metric value and, if available, its per-case records."""

    seed: int
    value: float
    cases: CaseResampler | None = None


@dataclass
class Interval:
    """An interval and how it was obtained.

    Args:
        low, high: bounds (NaN: no interval).
        method: the rule's branch, or ``none: <reason>``.
        n_cases: cases common to the runs (0 without per-case records).
        n_undefined: bootstrap replicates whose metric was undefined (0 when not bootstrapped).
    """

    low: float
    high: float
    method: str
    n_cases: int
    n_undefined: int = 0


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _common_cases(resamplers: Sequence[CaseResampler | None]) -> tuple[list[CaseResampler], int, bool]:
    """Every resampler aligned to the cases all of them hold; ``([], n, same)`` if one is missing.

    ``n`` is then the largest case count (for the table), else the number of common cases.
    ``same`` says whether every run with records holds the same set of cases.
    """
    present = [r for r in resamplers if r is not None]
    same = len({frozenset(r.case_ids) for r in present}) <= 1
    if not present or len(present) < len(resamplers):
        return [], max((r.n for r in present), default=0), same
    shared = set(present[0].case_ids).intersection(*(r.case_ids for r in present[1:]))
    common = [c for c in present[0].case_ids if c in shared]
    return [r.aligned(common) for r in present], len(common), same


def _strata(resampler: CaseResampler) -> tuple[np.ndarray | None, int]:
    """Strata for the draws and their count H; unstratified when no stratum has 2 cases."""
    if resampler.strata is None:
        return None, 1
    labels, counts = np.unique(np.asarray(resampler.strata), return_counts=True)
    if counts.max() < 2:
        return None, 1
    return np.asarray(resampler.strata), int(labels.size)


def _shared_case_variance(draws: np.ndarray) -> float:
    """Case-level variance of the mean over seeds: the mean covariance between different seeds.

    Args:
        draws: (B, S) per-seed values on B case draws (one draw shared by the seeds).

    Returns:
        ``mean_{s != t} cov(draws[:, s], draws[:, t])``, at least 0. The variance of the mean over
        seeds is the mean of all S^2 covariances; the diagonal (each seed's own response to the
        draw) is per-run noise that the seed level already holds, and counting it twice would make
        the interval too wide. What the seeds share is the test set's effect.
    """
    b, s = draws.shape
    cov = np.cov(draws, rowvar=False, ddof=1).reshape(s, s)
    shared = (cov.sum() - np.trace(cov)) / (s * (s - 1))
    return max(float(shared), 0.0)


def interval(
    values: np.ndarray,
    replicate: Callable[[np.ndarray], np.ndarray] | None,
    strata_source: CaseResampler | None,
    n_cases: int,
    n_samples: int,
    level: float,
    rng: np.random.Generator,
    unit: str = "seed",
    no_cases_reason: str = "",
) -> Interval:
    """The rule of the module docstring for one statistic (a cell's mean or a mean difference).

    Args:
        values: (S,) finite per-seed values (run values, or per-seed paired differences).
        replicate: ``case indices (B, C) -> (B, S)`` per-seed values on drawn cases (the same
            draw for every seed), or None without usable per-case records.
        strata_source: the resampler whose strata stratify the draws (aligned to the C cases).
        n_cases: C.
        n_samples: bootstrap replicates.
        level: confidence level.
        rng: the statistic's generator.
        unit: ``"seed"`` or ``"paired seed"`` (for the method text).
        no_cases_reason: why cases are not resampled, when ``replicate`` is None.

    Returns:
        The :class:`Interval` around ``values.mean()``.
    """
    s = int(values.size)
    if s == 0:
        return Interval(math.nan, math.nan, f"none: no {unit} with a finite value", n_cases)
    mean = float(values.mean())
    q = 0.5 + level / 2
    if replicate is not None and n_cases >= MIN_CASES and s >= MIN_SEEDS:
        strata, h = _strata(strata_source) if strata_source is not None else (None, 1)
        draws = replicate(draw_cases(n_cases, n_samples, rng, strata))  # (B, S)
        finite = np.isfinite(draws).all(axis=1)
        undefined = int((~finite).sum())
        if undefined > MAX_UNDEFINED * n_samples:
            reason = (f"none: {undefined} of {n_samples} bootstrap replicates undefined "
                      f"({undefined / n_samples:.1%} > {MAX_UNDEFINED:.0%})")  # fmt: skip
            return Interval(math.nan, math.nan, reason, n_cases, undefined)
        v_seeds = float(values.var(ddof=1)) / s
        df_cases = max(n_cases - h, 1)
        v_cases = _shared_case_variance(draws[finite]) * n_cases / df_cases
        total = v_seeds + v_cases
        if total <= (_TIE * max(1.0, abs(mean))) ** 2:
            return Interval(math.nan, math.nan, f"none: all {_plural(s, unit)} give {mean:.4g} on every case draw", n_cases, undefined)
        denominator = v_seeds**2 / (s - 1) + v_cases**2 / df_cases
        df = total**2 / denominator if denominator > 0 else math.inf
        half = float(stats.t.ppf(q, df)) * math.sqrt(total)
        method = f"two-level bootstrap ({_plural(s, unit)}, {_plural(n_cases, 'case')}, t on {df:.1f} df)"
        return Interval(mean - half, mean + half, method, n_cases, undefined)
    if s >= MIN_SEEDS and float(np.ptp(values)) <= _TIE * max(1.0, float(np.abs(values).max())):
        return Interval(math.nan, math.nan, f"none: all {_plural(s, unit)} give {mean:.4g}", n_cases)
    if s >= MIN_SEEDS:
        low, high = t_interval(values, level)
        why = no_cases_reason or f"{_plural(n_cases, 'test case')} < {MIN_CASES}"
        return Interval(low, high, f"student-t over {_plural(s, unit)} ({why})", n_cases)
    if replicate is not None and n_cases >= MIN_CASES:
        return Interval(math.nan, math.nan, f"none: {_plural(s, unit)} < {MIN_SEEDS}: training variability not estimable", n_cases)
    why = no_cases_reason or f"{_plural(n_cases, 'test case')} < {MIN_CASES}"
    return Interval(math.nan, math.nan, f"none: {_plural(s, unit)} < {MIN_SEEDS} and {why}", n_cases)


@dataclass
class CellSummary:
    """Statistics of one (init, fraction) cell."""

    n: int
    n_cases: int
    mean: float
    std: float
    ci_low: float
    ci_high: float
    ci_method: str = ""
    n_undefined: int = 0


def _no_cases_reason(resample_cases: bool, n_cases: int, have_records: bool) -> str:
    if not resample_cases:
        return "case resampling off"
    if not have_records:
        return "no per-case records"
    return ""


def summarise_cell(
    units: Sequence[Unit], n_samples: int, level: float, rng: np.random.Generator, resample_cases: bool = True
) -> CellSummary:
    """Mean, std and interval of the run values of one cell (rule of the module docstring).

    Args:
        units: the cell's runs (one per seed); runs with a NaN value are left out.
        n_samples: bootstrap replicates.
        level: confidence level.
        rng: the cell's generator.
        resample_cases: allow the two-level bootstrap where per-case records exist.

    Returns:
        The cell's :class:`CellSummary`.
    """
    left_out = _undefined_note([u.seed for u in units if not math.isfinite(u.value)], "seed")
    units = [u for u in units if math.isfinite(u.value)]
    values = np.array([u.value for u in units], dtype=np.float64)
    aligned, n_cases, same = _common_cases([u.cases for u in units])
    replicate = None
    if resample_cases and aligned:

        def replicate(idx: np.ndarray) -> np.ndarray:
            return np.stack([r.recompute(idx) for r in aligned], axis=1)

    if not same:
        ci = Interval(math.nan, math.nan, f"none: runs tested on different test cases ({n_cases} in common)", n_cases)
    else:
        why = _no_cases_reason(resample_cases, n_cases, bool(aligned))
        ci = interval(values, replicate, aligned[0] if aligned else None, n_cases, n_samples, level, rng,
                      no_cases_reason=why)  # fmt: skip
    mean = float(values.mean()) if values.size else math.nan
    std = float(values.std(ddof=1)) if values.size > 1 else math.nan
    return CellSummary(int(values.size), n_cases, mean, std, ci.low, ci.high, ci.method + left_out, ci.n_undefined)


def _undefined_note(seeds: Sequence[int], unit: str) -> str:
    """``ci_method``'s note on the runs left out for an undefined value ("" when none)."""
    if not seeds:
        return ""
    return f"; left out, value undefined: {unit} {', '.join(str(x) for x in sorted(seeds))}"


@dataclass
class PairedSummary:
    """Paired difference ``init - reference`` over matched seeds (and cases)."""

    n_pairs: int
    diff: float
    ci_low: float
    ci_high: float
    ci_method: str = ""
    n_cases: int = 0
    n_undefined: int = 0


def paired_difference(
    units: Sequence[Unit],
    reference: Sequence[Unit],
    n_samples: int,
    level: float,
    rng: np.random.Generator,
    resample_cases: bool = True,
) -> PairedSummary:
    """Mean paired difference to the reference arm with its interval (rule of the module docstring).

    Args:
        units: runs of the compared arm (one per seed).
        reference: runs of the reference arm (random init), same fraction.
        n_samples: bootstrap replicates.
        level: confidence level.
        rng: the comparison's generator.
        resample_cases: allow the two-level bootstrap where both arms have per-case records; a
            replicate draws one case set and applies it to both arms of every pair.

    Returns:
        The :class:`PairedSummary`; no interval when no seed is in both arms.
    """
    ref_by_seed = {u.seed: u for u in reference}
    matched = [u for u in units if u.seed in ref_by_seed]
    undefined = [u.seed for u in matched if not (math.isfinite(u.value) and math.isfinite(ref_by_seed[u.seed].value))]
    pairs = [(u, ref_by_seed[u.seed]) for u in matched if u.seed not in undefined]
    diffs = np.array([a.value - b.value for a, b in pairs], dtype=np.float64)
    aligned, n_cases, same = _common_cases([c for a, b in pairs for c in (a.cases, b.cases)])
    replicate = None
    if resample_cases and aligned:
        arms, refs = aligned[0::2], aligned[1::2]

        def replicate(idx: np.ndarray) -> np.ndarray:
            return np.stack([a.recompute(idx) - r.recompute(idx) for a, r in zip(arms, refs)], axis=1)

    if not same:
        ci = Interval(math.nan, math.nan, f"none: runs tested on different test cases ({n_cases} in common)", n_cases)
    else:
        why = _no_cases_reason(resample_cases, n_cases, bool(aligned))
        ci = interval(diffs, replicate, aligned[1] if aligned else None, n_cases, n_samples, level, rng,
                      unit="paired seed", no_cases_reason=why)  # fmt: skip
    diff = float(diffs.mean()) if diffs.size else math.nan
    method = ci.method + _undefined_note(undefined, "paired seed")
    return PairedSummary(len(pairs), diff, ci.low, ci.high, method, n_cases, ci.n_undefined)


def verdict(low: float, high: float, n_pairs: int, higher_is_better: bool = True) -> str:
    """The verdict of a comparison from its paired interval (module docstring).

    Args:
        low, high: the interval of ``init - reference`` (NaN: none).
        n_pairs: paired seeds.
        higher_is_better: direction of the metric (HD95: False, so a negative difference helps).

    Returns:
        One of :data:`VERDICTS`.
    """
    if n_pairs < MIN_SEEDS or not (math.isfinite(low) and math.isfinite(high)):
        return INCONCLUSIVE
    if low > 0:
        return HELPS if higher_is_better else HURTS
    if high < 0:
        return HURTS if higher_is_better else HELPS
    return NO_DIFFERENCE
