"""Bootstrap statistics and the study table on synthetic metrics with known answers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from medclust.cli import main
from medclust.errors import MedclustError
from medclust.evaluate.evaluate_run import write_per_case
from medclust.evaluate.statistics import (
    HELPS,
    INCONCLUSIVE,
    Unit,
    cell_rng,
    mean_of_columns_resampler,
    paired_difference,
    summarise_cell,
    t_interval,
)
from medclust.evaluate.study import RunResult, read_study_table, run_resampler, run_study


def _units(per_seed_cases: dict[int, np.ndarray]) -> list[Unit]:
    out = []
    for seed, values in per_seed_cases.items():
        ids = [f"c{i}" for i in range(len(values))]
        out.append(Unit(seed, float(np.mean(values)), mean_of_columns_resampler(ids, values)))
    return out


def test_cell_constant_values_have_no_interval_and_what_one_seed_supports():
    rng = cell_rng(0, "x")
    # Nothing varies, neither seeds nor cases: no interval (a zero-width one would claim certainty).
    const = _units({0: np.full(5, 0.8), 1: np.full(5, 0.8), 2: np.full(5, 0.8)})
    cell = summarise_cell(const, 300, 0.95, rng)
    assert (cell.n, cell.n_cases, cell.mean, cell.std) == (3, 5, pytest.approx(0.8), pytest.approx(0.0))
    assert math.isnan(cell.ci_low) and math.isnan(cell.ci_high)
    assert cell.ci_method == "none: all 3 seeds give 0.8 on every case draw"
    # Equal seed values on fewer than 5 cases (a quantised metric): no interval either.
    cell = summarise_cell(_units({s: np.array([0.25, 0.5]) for s in range(3)}), 300, 0.95, rng)
    assert math.isnan(cell.ci_low) and cell.ci_method == "none: all 3 seeds give 0.375"
    # One seed, many cases: the test set is resampled, but training variability is unknown.
    one = _units({0: np.random.default_rng(2).normal(0.6, 0.1, 50)})
    cell = summarise_cell(one, 1000, 0.95, rng)
    assert cell.n == 1 and math.isnan(cell.std) and math.isnan(cell.ci_low) and math.isnan(cell.ci_high)
    assert cell.ci_method == "none: 1 seed < 3: training variability not estimable"
    # One seed, one test case: nothing to resample, no interval (not a zero-width one).
    cell = summarise_cell(_units({0: np.array([0.5])}), 100, 0.95, rng)
    assert cell.mean == 0.5 and cell.n_cases == 1 and math.isnan(cell.ci_low) and math.isnan(cell.ci_high)
    assert cell.ci_method == "none: 1 seed < 3 and 1 test case < 5"


def test_paired_difference_of_shifted_copy_is_the_shift():
    rng = np.random.default_rng(5)
    base = {s: rng.uniform(0.3, 0.9, size=8) for s in range(4)}
    reference = _units(base)
    shifted = _units({s: v + 0.125 for s, v in base.items()})
    out = paired_difference(shifted, reference, 500, 0.95, cell_rng(0, "pair"))
    assert out.n_pairs == 4 and out.n_cases == 8
    assert out.diff == pytest.approx(0.125)
    # the same difference on every seed and every case draw: no interval, and the reason
    assert math.isnan(out.ci_low) and math.isnan(out.ci_high)
    assert out.ci_method == "none: all 4 paired seeds give 0.125 on every case draw"
    # Unpaired seeds are dropped.
    out = paired_difference(shifted[:2], reference[1:], 200, 0.95, cell_rng(0, "pair"))
    assert out.n_pairs == 1 and math.isnan(out.ci_low)


# --- the study table from metrics.json files --------------------------------------------------


def _write_run(root: Path, init: str, fraction: float, seed: int, dice_cases: list[list[float]], simulated=False) -> Path:
    run = root / "organs" / init / f"{fraction:g}" / str(seed)
    run.mkdir(parents=True)
    keys = {"1": "lungs", "2": "heart"}
    rows = [
        {"case_id": f"c{i}", "dice_lungs": d[0], "dice_heart": d[1], "hd95_lungs": 10 * (1 - d[0]), "hd95_heart": 10 * (1 - d[1])}
        for i, d in enumerate(dice_cases)
    ]
    write_per_case(run / "per_case.csv", rows)
    arr = np.array(dice_cases)
    metrics = {
        "dice_mean": float(arr.mean(axis=0).mean()),
        "hd95_mean": float((10 * (1 - arr)).mean(axis=0).mean()),
        "dice_lungs": float(arr[:, 0].mean()),
        "dice_heart": float(arr[:, 1].mean()),
    }
    record = {
        "task": "organs", "type": "segmentation", "init": init, "fraction": fraction, "seed": seed,
        "simulated": simulated, "trained_on": "real labels", "primary_metric": "dice_mean",
        "study_metrics": ["dice_mean", "hd95_mean"], "class_keys": keys, "metrics": metrics,
    }  # fmt: skip
    (run / "metrics.json").write_text(json.dumps(record), encoding="utf-8")
    return run / "metrics.json"


def _study(root: Path, seeds: int, cases: int) -> list[Path]:
    """none and joint (= none + 0.1 + a per-seed offset of mean 0, on every case) at two fractions;
    seeds differ, cases differ. The per-seed difference is 0.1 + the offset: it varies with the
    seed (three equal differences would give no interval), not with the case."""
    rng = np.random.default_rng(0)
    files = []
    for fraction in (0.25, 1.0):
        for seed in range(seeds):
            values = rng.uniform(0.4, 0.8, size=(cases, 2))
            shift = 0.1 + _OFFSET * (seed - (seeds - 1) / 2)
            files.append(_write_run(root, "none", fraction, seed, values.tolist()))
            files.append(_write_run(root, "joint", fraction, seed, (values + shift).tolist(), simulated=fraction == 1.0))
    return files


_OFFSET = 0.01


@pytest.fixture()
def study_runs(tmp_path: Path) -> list[Path]:
    return _study(tmp_path, seeds=3, cases=4)


def _dice(files: list[Path], init: str, fraction: float) -> list[float]:
    records = [json.loads(p.read_text(encoding="utf-8")) for p in files]
    return [r["metrics"]["dice_mean"] for r in records if r["init"] == init and r["fraction"] == fraction]


def test_study_table_means_intervals_paired_differences_and_verdicts(tmp_path, study_runs):
    out = tmp_path / "study" / "organs.csv"
    settings = {"bootstrap_samples": 400, "ci_level": 0.9, "seed": 7}
    assert main(["study", "--task", "organs", "--runs", *map(str, study_runs), "--out", str(out),
                 "--settings", json.dumps(settings)]) == 0  # fmt: skip
    rows = read_study_table(out)
    assert (out.parent / "organs.provenance.json").exists()
    primary = [r for r in rows if r["primary"]]
    assert {r["metric"] for r in primary} == {"dice_mean"}
    assert [(r["init"], r["fraction"]) for r in primary] == [("none", 0.25), ("none", 1.0), ("joint", 0.25), ("joint", 1.0)]
    for r in primary:
        values = _dice(study_runs, r["init"], r["fraction"])
        assert r["n_seeds"] == 3 and r["n_cases"] == 4
        assert r["mean"] == pytest.approx(np.mean(values), abs=1e-6)
        assert r["std"] == pytest.approx(np.std(values, ddof=1), abs=1e-6)
        # 4 test cases < 5: the seed is the unit, a t interval over the three run values
        assert (r["ci_low"], r["ci_high"]) == pytest.approx(t_interval(values, 0.9), abs=1e-6)
        assert r["ci_low"] < r["mean"] < r["ci_high"]
        assert r["ci_method"] == "student-t over 3 seeds (4 test cases < 5)" and r["ci_undefined"] == 0
        assert r["ci_level"] == 0.9 and r["bootstrap"] == 400
        if r["init"] == "joint":
            # Every case shifted by 0.1 + a per-seed offset: a t interval over the three shifts.
            assert r["n_pairs"] == 3
            assert r["diff_vs_ref"] == pytest.approx(0.1, abs=1e-6)
            shifts = [0.1 - _OFFSET, 0.1, 0.1 + _OFFSET]
            assert (r["diff_ci_low"], r["diff_ci_high"]) == pytest.approx(t_interval(shifts, 0.9), abs=1e-6)
            assert r["diff_ci_method"] == "student-t over 3 paired seeds (4 test cases < 5)"
            assert r["verdict"] == HELPS
            assert r["simulated"] is (r["fraction"] == 1.0)
        else:
            assert math.isnan(r["diff_vs_ref"]) and r["verdict"] == "" and r["diff_ci_method"] == ""
    hd = [r for r in rows if r["metric"] == "hd95_mean" and r["init"] == "joint"]
    # HD95 falls by 1 mm: lower is better, so pretraining helps
    assert hd and not hd[0]["higher_is_better"] and hd[0]["diff_vs_ref"] == pytest.approx(-1.0, abs=1e-6)
    assert hd[0]["verdict"] == HELPS
    # Reproducible: the same inputs and seed give the same file.
    again = tmp_path / "again.csv"
    run_study("organs", study_runs, again, settings)
    assert again.read_text(encoding="utf-8") == out.read_text(encoding="utf-8")


def test_study_table_switches_rule_with_cases_and_seeds(tmp_path):
    # 3 seeds x 6 cases: two-level bootstrap, for cells and differences
    rows = run_study("organs", _study(tmp_path / "six", seeds=3, cases=6), tmp_path / "six.csv", {"bootstrap_samples": 300})
    for r in (r for r in rows if r["primary"]):
        assert r["n_cases"] == 6 and r["ci_method"].startswith("two-level bootstrap (3 seeds, 6 cases")
        assert r["ci_low"] < r["mean"] < r["ci_high"]
        if r["init"] == "joint":
            assert r["diff_ci_method"].startswith("two-level bootstrap (3 paired seeds, 6 cases")
    # case resampling off: the seed is the unit whatever the number of cases
    rows = run_study("organs", _study(tmp_path / "off", seeds=3, cases=6), tmp_path / "off.csv",
                     {"bootstrap_samples": 300, "resample_cases": False})  # fmt: skip
    assert {r["ci_method"] for r in rows} == {"student-t over 3 seeds (case resampling off)"}
    # 2 seeds x 4 cases: no interval, the reason in the table, and no verdict but inconclusive
    rows = run_study("organs", _study(tmp_path / "two", seeds=2, cases=4), tmp_path / "two.csv", {"bootstrap_samples": 300})
    for r in rows:
        assert math.isnan(r["ci_low"]) and r["ci_method"] == "none: 2 seeds < 3 and 4 test cases < 5"
        if r["init"] == "joint":
            assert r["diff_vs_ref"] == pytest.approx(0.1 if r["metric"] == "dice_mean" else -1.0, abs=1e-6)
            assert math.isnan(r["diff_ci_low"]) and r["diff_ci_method"] == "none: 2 paired seeds < 3 and 4 test cases < 5"
            assert r["verdict"] == INCONCLUSIVE
    text = (tmp_path / "two.csv").read_text(encoding="utf-8")
    assert "ci_method" in text.splitlines()[0] and "inconclusive (too few seeds or cases)" in text


def test_study_rejects_other_tasks_and_duplicates(tmp_path, study_runs):
    with pytest.raises(MedclustError, match="another task"):
        run_study("other", study_runs, tmp_path / "x.csv")
    with pytest.raises(MedclustError, match="same init/fraction/seed"):
        run_study("organs", [*study_runs, study_runs[0]], tmp_path / "x.csv")


def test_case_resampler_matches_summarise_for_auc_and_froc():
    from medclust.evaluate.evaluate_run import case_resampler, summarise

    rng = np.random.default_rng(3)
    info = {"class_keys": {"0": "a", "1": "b"}, "multilabel": True}
    rows = [
        {"case_id": f"c{i // 3}", "prob_0": p0, "prob_1": p1, "target_0": t0, "target_1": t1}
        for i, (p0, p1, t0, t1) in enumerate(
            zip(rng.uniform(size=12), rng.uniform(size=12), rng.integers(0, 2, 12), rng.integers(0, 2, 12))
        )
    ]
    resampler = case_resampler("classification", rows, info, "auc_macro")
    assert resampler.n == 4
    identity = np.arange(4)[None]
    assert resampler.recompute(identity)[0] == pytest.approx(summarise("classification", rows, info)["auc_macro"])
    # Drawing case c0 four times uses only its three rows, four times over: same AUC as c0 alone.
    only_c0 = summarise("classification", rows[:3], info)["auc_macro"]
    assert resampler.recompute(np.zeros((1, 4), int))[0] == pytest.approx(only_c0, nan_ok=True)

    det_info = {"class_keys": {"0": "nodule"}}
    det_rows = [
        {"case_id": "s0", "n_lesions": 2, "n_detections": 3, "fp_scores": "0.8", "tp_scores": "0.9;0.6"},
        {"case_id": "s1", "n_lesions": 2, "n_detections": 4, "fp_scores": "0.5;0.2;0.1", "tp_scores": "0.3;0"},
    ]
    resampler = case_resampler("detection", det_rows, det_info, "froc_avg")
    assert resampler.recompute(np.array([[0, 1]]))[0] == pytest.approx(4 / 7)
    assert resampler.recompute(np.array([[1, 1]]))[0] == pytest.approx(
        summarise("detection", [det_rows[1], det_rows[1]], det_info)["froc_avg"]
    )


def _classification_run(seed: int, strata: bool = True) -> RunResult:
    """6 test cases of 3 slices, 2 labels; label b is positive in case c0 only (multi-label)."""
    rng = np.random.default_rng(seed)
    rows = []
    for case in range(6):
        for _ in range(3):
            a = int(rng.integers(0, 2))
            b = int(case == 0)
            rows.append({"case_id": f"c{case}", "prob_0": 0.3 + 0.4 * a + rng.normal(0, 0.2),
                         "prob_1": 0.3 + 0.4 * b + rng.normal(0, 0.2), "target_0": a, "target_1": b})  # fmt: skip
    record = {"task": "cls", "type": "classification", "init": "none", "fraction": 1.0, "seed": seed,
              "class_keys": {"0": "a", "1": "b"}, "multilabel": True, "metrics": {}}  # fmt: skip
    return RunResult(Path(f"run{seed}"), record, [{k: str(v) for k, v in r.items()} for r in rows])


def test_classification_draws_are_stratified_so_every_class_keeps_both_labels():
    from dataclasses import replace

    from medclust.evaluate.evaluate_run import summarise

    runs = [_classification_run(seed) for seed in range(3)]
    resamplers = [run_resampler(r, "auc_macro") for r in runs]
    for run, resampler in zip(runs, resamplers):
        # the full case set gives the run's own macro AUC
        full = summarise("classification", run.rows, run.record)["auc_macro"]
        assert resampler.recompute(np.arange(6)[None])[0] == pytest.approx(full)
        # c0 (the only case with label b) is a stratum of its own
        assert list(resampler.strata).count(resampler.strata[0]) == 1
        # a draw without c0 leaves label b without positives: undefined, not the AUC of label a
        assert math.isnan(resampler.recompute(np.array([[1, 1, 2, 3, 4, 5]]))[0])
    units = [Unit(r.key[2], resampler.recompute(np.arange(6)[None])[0], resampler) for r, resampler in zip(runs, resamplers)]
    cell = summarise_cell(units, 300, 0.95, cell_rng(0, "cls"))
    assert cell.n_undefined == 0 and cell.ci_method.startswith("two-level bootstrap (3 seeds, 6 cases")
    # the same runs drawn without strata lose c0 in a third of the draws: no interval, reason given
    flat = [Unit(u.seed, u.value, replace(u.cases, strata=None)) for u in units]
    cell = summarise_cell(flat, 300, 0.95, cell_rng(0, "cls"))
    assert math.isnan(cell.ci_low) and cell.n_undefined > 50 and "bootstrap replicates undefined" in cell.ci_method


def test_intervals_never_leave_the_metric_range(tmp_path):
    """3 seeds of Dice 0.60 / 0.95 / 0.99 (one case): the t-interval of the mean reaches past 1,
    the table stops it at 1 (the mean of a Dice cannot exceed it); HD95 stops at 0."""
    files = []
    for seed, dice in enumerate((0.60, 0.95, 0.99)):
        files.append(_write_run(tmp_path, "none", 0.25, seed, [[dice, dice]]))
        files.append(_write_run(tmp_path, "joint", 0.25, seed, [[1.0 - dice / 2, 1.0 - dice / 2]]))
    rows = run_study("organs", files, tmp_path / "t.csv", {"bootstrap_samples": 100})
    none = {r["metric"]: r for r in rows if r["init"] == "none"}
    lo, hi = t_interval(np.array([0.60, 0.95, 0.99]), 0.95)
    assert hi > 1 and none["dice_mean"]["ci_high"] == 1.0 and none["dice_mean"]["ci_low"] == pytest.approx(lo)
    hd_lo, _ = t_interval(10 * (1 - np.array([0.60, 0.95, 0.99])), 0.95)
    assert hd_lo < 0 and none["hd95_mean"]["ci_low"] == 0.0
    joint = next(r for r in rows if r["init"] == "joint" and r["metric"] == "dice_mean")
    assert -1.0 <= joint["diff_ci_low"] < joint["diff_vs_ref"] < joint["diff_ci_high"] <= 1.0


def test_study_table_lists_only_the_seeds_it_counts(tmp_path):
    files = _study(tmp_path / "nan", seeds=3, cases=4)
    record = json.loads(files[4].read_text(encoding="utf-8"))  # none, fraction 0.25, seed 2
    assert (record["init"], record["fraction"], record["seed"]) == ("none", 0.25, 2)
    record["metrics"]["dice_mean"] = float("nan")
    files[4].write_text(json.dumps(record), encoding="utf-8")
    rows = run_study("organs", files, tmp_path / "nan.csv", {"bootstrap_samples": 200})
    cell = next(r for r in rows if r["primary"] and r["init"] == "none" and r["fraction"] == 0.25)
    assert (cell["n_seeds"], cell["seeds"]) == (2, "0;1")
    assert cell["ci_method"] == "none: 2 seeds < 3 and 4 test cases < 5; left out, value undefined: seed 2"
    pair = next(r for r in rows if r["primary"] and r["init"] == "joint" and r["fraction"] == 0.25)
    assert pair["n_pairs"] == 2 and pair["verdict"] == INCONCLUSIVE
