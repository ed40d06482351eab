"""Calibration of the study's intervals on simulated studies with a known answer.

A simulated study has S seeds per arm and C test cases shared by every run (as in a real study:
splits do not depend on the seed). Per-case metric of seed s on case c:

    reference (none):  mu         + seed_s        + case_c                  + noise_sc
    compared (joint):  mu + delta + seed'_s       + case_c + case_x_arm_c   + noise'_sc

With >= 5 cases the truth is the population value (mu, delta: new seeds, new patients). With
fewer, the design says the seed is the unit: the interval is about training variability on
*these* test cases, so the truth is conditional on them (mu + mean case_c; delta + mean
case_x_arm_c).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from medclust.evaluate.statistics import (
    INCONCLUSIVE,
    CaseResampler,
    Unit,
    cell_rng,
    draw_cases,
    mean_of_columns_resampler,
    paired_difference,
    summarise_cell,
    t_interval,
)

B = 400  # bootstrap replicates: enough for the variance the interval uses (a few % Monte Carlo error)
MU, DELTA = 0.6, 0.08
NOISE = {"seed": 0.04, "case": 0.06, "case_x_arm": 0.03, "run": 0.03}


def _units(values: np.ndarray) -> list[Unit]:
    """(S, C) per-case values -> one Unit per seed with its case resampler."""
    ids = [f"c{i}" for i in range(values.shape[1])]
    return [Unit(s, float(v.mean()), mean_of_columns_resampler(ids, v)) for s, v in enumerate(values)]


def _simulate(rng: np.random.Generator, n: int, seeds: int, cases: int, delta: float, noise=NOISE):
    """n studies at once: (n, S, C) per-case values of both arms and the two conditional truths."""
    case = rng.normal(0, noise["case"], (n, 1, cases))
    case_x_arm = rng.normal(0, noise["case_x_arm"], (n, 1, cases))
    ref = MU + rng.normal(0, noise["seed"], (n, seeds, 1)) + case + rng.normal(0, noise["run"], (n, seeds, cases))
    arm = (MU + delta + rng.normal(0, noise["seed"], (n, seeds, 1)) + case + case_x_arm
           + rng.normal(0, noise["run"], (n, seeds, cases)))  # fmt: skip
    if cases >= 5:
        return ref, arm, np.full(n, MU), np.full(n, delta)
    return ref, arm, MU + case.mean(axis=(1, 2)), delta + case_x_arm.mean(axis=(1, 2))


@pytest.mark.parametrize("seeds,cases", [(3, 1), (5, 1), (3, 8), (5, 8), (3, 20)])
def test_coverage_of_cells_and_paired_differences(seeds, cases):
    n = 300
    rng = np.random.default_rng(1000 * seeds + cases)
    hits = {"cell": 0, "diff": 0}
    expected = "two-level bootstrap" if cases >= 5 else "student-t"
    for half, delta in enumerate((0.0, DELTA)):  # no effect, and an effect
        ref, arm, truth_cell, truth_diff = _simulate(rng, n // 2, seeds, cases, delta)
        for k in range(n // 2):
            reference = _units(ref[k])
            cell = summarise_cell(reference, B, 0.95, cell_rng(half, k))
            pair = paired_difference(_units(arm[k]), reference, B, 0.95, cell_rng(half, k, "pair"))
            assert cell.ci_method.startswith(expected) and pair.ci_method.startswith(expected)
            hits["cell"] += cell.ci_low <= truth_cell[k] <= cell.ci_high
            hits["diff"] += pair.ci_low <= truth_diff[k] <= pair.ci_high
    coverage = {key: value / n for key, value in hits.items()}
    assert 0.90 <= coverage["cell"] <= 0.99, coverage
    assert 0.90 <= coverage["diff"] <= 0.99, coverage


def test_t_interval_known_answer():
    low, high = t_interval([0.5, 0.7, 0.9], 0.95)
    half = stats.t.ppf(0.975, 2) * 0.2 / math.sqrt(3)
    assert (low, high) == pytest.approx((0.7 - half, 0.7 + half), abs=1e-12)
    # the same numbers through a study cell of three single-case runs
    runs = [Unit(s, v, mean_of_columns_resampler(["c0"], np.array([v]))) for s, v in enumerate((0.5, 0.7, 0.9))]
    cell = summarise_cell(runs, B, 0.95, cell_rng(0, "known"))
    assert (cell.mean, cell.std) == pytest.approx((0.7, 0.2))
    assert (cell.ci_low, cell.ci_high) == pytest.approx((0.7 - half, 0.7 + half), abs=1e-12)
    assert cell.ci_method == "student-t over 3 seeds (1 test case < 5)"


def test_two_seeds_and_one_case_have_no_interval_and_say_why():
    runs = [Unit(s, v, mean_of_columns_resampler(["c0"], np.array([v]))) for s, v in enumerate((0.5, 0.9))]
    cell = summarise_cell(runs, B, 0.95, cell_rng(0, "two"))
    assert cell.mean == pytest.approx(0.7)
    assert math.isnan(cell.ci_low) and math.isnan(cell.ci_high)
    assert cell.ci_method == "none: 2 seeds < 3 and 1 test case < 5"
    other = [Unit(s, v + 0.1, mean_of_columns_resampler(["c0"], np.array([v + 0.1]))) for s, v in enumerate((0.5, 0.9))]
    pair = paired_difference(other, runs, B, 0.95, cell_rng(0, "two", "pair"))
    assert pair.n_pairs == 2 and pair.diff == pytest.approx(0.1)
    assert math.isnan(pair.ci_low) and pair.ci_method == "none: 2 paired seeds < 3 and 1 test case < 5"


def test_two_seeds_have_no_interval_even_with_many_cases():
    # With 2 seeds the seed level's variance rests on one degree of freedom: simulated two-level
    # intervals covered 0.875-0.94 instead of 0.95, so the rule asks for 3 seeds at any case count.
    rng = np.random.default_rng(11)
    ref, arm, _, _ = _simulate(rng, 1, 2, 20, DELTA)
    cell = summarise_cell(_units(ref[0]), B, 0.95, cell_rng(0, "two-many"))
    pair = paired_difference(_units(arm[0]), _units(ref[0]), B, 0.95, cell_rng(0, "two-many", "pair"))
    assert math.isnan(cell.ci_low) and cell.ci_method == "none: 2 seeds < 3: training variability not estimable"
    assert math.isnan(pair.ci_low) and pair.ci_method == "none: 2 paired seeds < 3: training variability not estimable"
    assert cell.n == 2 and cell.n_cases == 20 and pair.n_pairs == 2


def test_runs_on_different_test_cases_are_not_paired():
    # The reference was tested on other cases than the compared arm: no interval, the reason said.
    rng = np.random.default_rng(12)
    values = rng.uniform(0.4, 0.8, size=(3, 6))
    ids_ref, ids_arm = [f"c{i}" for i in range(6)], [f"c{i}" for i in range(3, 9)]
    ref = [Unit(s, float(v.mean()), mean_of_columns_resampler(ids_ref, v)) for s, v in enumerate(values)]
    arm = [Unit(s, float(v.mean()) + 0.2 + 0.01 * s, mean_of_columns_resampler(ids_arm, v + 0.2 + 0.01 * s))
           for s, v in enumerate(values)]  # fmt: skip
    pair = paired_difference(arm, ref, B, 0.95, cell_rng(0, "other-cases"))
    assert pair.n_pairs == 3 and pair.diff == pytest.approx(0.21)
    assert math.isnan(pair.ci_low) and pair.ci_method == "none: runs tested on different test cases (3 in common)"
    # within one cell as well
    cell = summarise_cell([*ref[:2], arm[2]], B, 0.95, cell_rng(0, "other-cases", "cell"))
    assert math.isnan(cell.ci_low) and cell.ci_method == "none: runs tested on different test cases (3 in common)"
    # the same cases in another order are the same test set
    shuffled = [Unit(u.seed, u.value, mean_of_columns_resampler(ids_ref[::-1], values[u.seed][::-1])) for u in ref]
    assert summarise_cell(shuffled, B, 0.95, cell_rng(0, "order")).ci_method.startswith("two-level bootstrap")


def test_runs_with_an_undefined_value_are_left_out_and_named():
    rng = np.random.default_rng(13)
    values = rng.uniform(0.4, 0.8, size=(4, 3))
    units = _units(values)
    units[3] = Unit(3, math.nan, units[3].cases)
    cell = summarise_cell(units, B, 0.95, cell_rng(0, "nan"))
    assert cell.n == 3 and cell.mean == pytest.approx(values[:3].mean())
    assert cell.ci_method == "student-t over 3 seeds (3 test cases < 5); left out, value undefined: seed 3"
    pair = paired_difference(_units(values + 0.1 + 0.01 * np.arange(4)[:, None]), units, B, 0.95, cell_rng(0, "nan", "pair"))
    assert pair.n_pairs == 3 and pair.ci_method.endswith("; left out, value undefined: paired seed 3")


def _width(values: np.ndarray) -> float:
    cell = summarise_cell(_units(values), 2000, 0.95, cell_rng(0, "width"))
    assert cell.ci_method.startswith("two-level bootstrap")
    return cell.ci_high - cell.ci_low


def test_case_level_carries_case_noise():
    # Every seed gives the same per-case values: all the uncertainty is which patients were drawn.
    cases = np.random.default_rng(3).normal(0, 1, 10)
    width = _width(np.tile(MU + 0.05 * cases, (3, 1)))
    # case level alone: t on C - 1 df times the standard error of the mean over cases
    assert width == pytest.approx(2 * stats.t.ppf(0.975, 9) * 0.05 * cases.std(ddof=1) / math.sqrt(10), rel=0.1)
    assert _width(np.tile(MU + 0.10 * cases, (3, 1))) == pytest.approx(2 * width, rel=0.1)


def test_seed_level_carries_seed_noise():
    # Seeds differ by an offset, cases are identical within a seed: all the uncertainty is training.
    offsets = np.array([-1.0, 0.2, 0.8])
    width = _width(MU + 0.05 * offsets[:, None] + np.zeros((3, 10)))
    assert width == pytest.approx(2 * stats.t.ppf(0.975, 2) * 0.05 * offsets.std(ddof=1) / math.sqrt(3), rel=1e-9)
    assert _width(MU + 0.10 * offsets[:, None] + np.zeros((3, 10))) == pytest.approx(2 * width, rel=1e-9)


def test_paired_difference_uses_one_case_draw_for_both_arms():
    # The compared arm is the reference shifted by 0.1 + a per-seed offset on every case: whatever
    # cases are drawn, each seed's difference is its shift, so the case level adds nothing and the
    # interval is the t interval over the four shifts (separate draws per arm would widen it).
    rng = np.random.default_rng(5)
    ref = rng.uniform(0.3, 0.9, size=(4, 8))
    shifts = 0.1 + np.array([-0.015, -0.005, 0.005, 0.015])
    pair = paired_difference(_units(ref + shifts[:, None]), _units(ref), B, 0.95, cell_rng(0, "shift"))
    assert pair.n_pairs == 4 and pair.ci_method.startswith("two-level bootstrap (4 paired seeds, 8 cases, t on 3.0 df)")
    assert pair.diff == pytest.approx(0.1)
    assert (pair.ci_low, pair.ci_high) == pytest.approx(t_interval(shifts), rel=1e-6)


def _class_columns(present_in: int, cases: int) -> np.ndarray:
    """(cases, 2) Dice columns: class 0 everywhere, class 1 only in the first `present_in` cases."""
    values = np.full((cases, 2), np.nan)
    values[:, 0] = np.linspace(0.5, 0.9, cases)
    values[:present_in, 1] = 0.7
    return values


def test_undefined_replicates_are_counted_and_above_one_percent_give_no_interval():
    ids = [f"c{i}" for i in range(10)]
    # class 1 in 1 of 10 cases: a draw misses it with probability 0.9^10 = 35 %
    rare = [Unit(s, 0.7, mean_of_columns_resampler(ids, _class_columns(1, 10) + 0.01 * s)) for s in range(3)]
    cell = summarise_cell(rare, 1000, 0.95, cell_rng(0, "rare"))
    assert math.isnan(cell.ci_low) and math.isnan(cell.ci_high)
    assert 300 <= cell.n_undefined <= 400
    assert cell.ci_method == f"none: {cell.n_undefined} of 1000 bootstrap replicates undefined ({cell.n_undefined / 10:.1f}% > 1%)"
    # class 1 in 4 of 10 cases: missed with probability 0.6^10 = 0.6 %: counted, interval kept
    some = [Unit(s, 0.7, mean_of_columns_resampler(ids, _class_columns(4, 10) + 0.01 * s)) for s in range(3)]
    cell = summarise_cell(some, 2000, 0.95, cell_rng(0, "some"))
    assert 1 <= cell.n_undefined <= 20
    assert cell.ci_method.startswith("two-level bootstrap") and cell.ci_low < cell.mean < cell.ci_high


def test_a_replicate_missing_a_class_is_undefined_not_a_mean_over_fewer_classes():
    resampler = mean_of_columns_resampler(["a", "b", "c"], np.array([[0.2, 0.8], [0.4, np.nan], [0.6, np.nan]]))
    assert resampler.recompute(np.array([[0, 1, 2]]))[0] == pytest.approx((0.4 + 0.8) / 2)
    assert math.isnan(resampler.recompute(np.array([[1, 2, 2]]))[0])


def test_stratified_draws_keep_every_stratum_size():
    strata = np.array([0, 0, 0, 1, 2, 2])
    idx = draw_cases(6, 500, np.random.default_rng(0), strata)
    assert np.array_equal(np.sort(strata[idx], axis=1), np.tile(np.sort(strata), (500, 1)))
    assert len({tuple(row) for row in idx[:, :3].tolist()}) > 5  # stratum 0 is still resampled
    # stratified: a case alone in its stratum is always drawn, so a rare class is never lost
    ids = [f"c{i}" for i in range(10)]
    values = _class_columns(1, 10)
    strata = np.array([1] + [0] * 9)
    units = [Unit(s, 0.7, CaseResampler(ids, mean_of_columns_resampler(ids, values + 0.01 * s).recompute, strata))
             for s in range(3)]  # fmt: skip
    cell = summarise_cell(units, 1000, 0.95, cell_rng(0, "strata"))
    assert cell.n_undefined == 0 and cell.ci_method.startswith("two-level bootstrap")


def test_verdicts_follow_interval_direction_and_seed_count():
    from medclust.evaluate.statistics import HELPS, HURTS, NO_DIFFERENCE, verdict

    assert verdict(0.01, 0.2, 3) == HELPS
    assert verdict(-0.2, -0.01, 3) == HURTS
    assert verdict(-0.1, 0.1, 3) == NO_DIFFERENCE
    assert verdict(0.01, 0.2, 2) == INCONCLUSIVE  # never helps on fewer than 3 seeds
    assert verdict(math.nan, math.nan, 10) == INCONCLUSIVE
    # lower is better (HD95): a negative difference helps
    assert verdict(-3.0, -1.0, 3, higher_is_better=False) == HELPS
    assert verdict(1.0, 3.0, 3, higher_is_better=False) == HURTS
