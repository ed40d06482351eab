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
    Unit,
    bootstrap_ci,
    cell_rng,
    mean_of_columns_resampler,
    paired_difference,
    summarise_cell,
)
from medclust.evaluate.study import read_study_table, run_study


def test_bootstrap_ci_constant_is_zero_width():
    assert bootstrap_ci([0.7, 0.7, 0.7, 0.7], n_samples=500) == pytest.approx((0.7, 0.7))


def test_bootstrap_ci_normal_sample_covers_mean():
    x = np.random.default_rng(1).normal(10.0, 2.0, size=400)
    low, high = bootstrap_ci(x, n_samples=2000, level=0.95, seed=3)
    assert low < 10.0 < high
    # Normal-theory half-width 1.96 * 2 / sqrt(400) = 0.196.
    assert (high - low) / 2 == pytest.approx(0.196, rel=0.2)
    assert bootstrap_ci(x, n_samples=2000, seed=3) == (low, high)  # seeded


def test_bootstrap_ci_needs_two_values():
    assert all(math.isnan(v) for v in bootstrap_ci([1.0]))


def _units(per_seed_cases: dict[int, np.ndarray]) -> list[Unit]:
    out = []
    for seed, values in per_seed_cases.items():
        ids = [f"c{i}" for i in range(len(values))]
        out.append(Unit(seed, float(np.mean(values)), mean_of_columns_resampler(ids, values)))
    return out


def test_cell_constant_values_zero_width_and_case_level_ci():
    rng = cell_rng(0, "x")
    const = _units({0: np.full(5, 0.8), 1: np.full(5, 0.8), 2: np.full(5, 0.8)})
    cell = summarise_cell(const, 300, 0.95, rng)
    assert (cell.n, cell.n_cases, cell.mean, cell.std) == (3, 5, pytest.approx(0.8), pytest.approx(0.0))
    assert (cell.ci_low, cell.ci_high) == pytest.approx((0.8, 0.8))
    # One seed, varying cases: the CI comes from resampling cases and covers the mean.
    one = _units({0: np.random.default_rng(2).normal(0.6, 0.1, 50)})
    cell = summarise_cell(one, 1000, 0.95, rng)
    assert cell.n == 1 and math.isnan(cell.std)
    assert cell.ci_low < cell.mean < cell.ci_high and cell.ci_high - cell.ci_low < 0.1
    # One seed, one test case: nothing to resample, no interval (not a zero-width one).
    cell = summarise_cell(_units({0: np.array([0.5])}), 100, 0.95, rng)
    assert cell.mean == 0.5 and cell.n_cases == 1 and math.isnan(cell.ci_low) and math.isnan(cell.ci_high)


def test_paired_difference_of_shifted_copy_is_the_shift():
    rng = np.random.default_rng(5)
    base = {s: rng.uniform(0.3, 0.9, size=8) for s in range(4)}
    reference = _units(base)
    shifted = _units({s: v + 0.125 for s, v in base.items()})
    out = paired_difference(shifted, reference, 500, 0.95, cell_rng(0, "pair"))
    assert out.n_pairs == 4
    assert out.diff == pytest.approx(0.125)
    assert (out.ci_low, out.ci_high) == pytest.approx((0.125, 0.125))
    # Unpaired seeds are dropped.
    out = paired_difference(shifted[:2], reference[1:], 200, 0.95, cell_rng(0, "pair"))
    assert out.n_pairs == 1


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


@pytest.fixture()
def study_runs(tmp_path: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    files = []
    for fraction in (0.25, 1.0):
        for seed in range(3):
            cases = rng.uniform(0.4, 0.8, size=(4, 2))
            files.append(_write_run(tmp_path, "none", fraction, seed, cases.tolist()))
            files.append(_write_run(tmp_path, "joint", fraction, seed, (cases + 0.1).tolist(), simulated=fraction == 1.0))
    return files


def test_study_table_means_cis_and_paired_differences(tmp_path, study_runs):
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
        values = [json.loads((p).read_text(encoding="utf-8"))["metrics"]["dice_mean"] for p in study_runs
                  if f"/{r['init']}/{r['fraction']:g}/" in str(p)]  # fmt: skip
        assert r["n_seeds"] == 3 and r["n_cases"] == 4
        assert r["mean"] == pytest.approx(np.mean(values), abs=1e-6)
        assert r["std"] == pytest.approx(np.std(values, ddof=1), abs=1e-6)
        assert r["ci_low"] <= r["mean"] <= r["ci_high"]
        assert r["ci_level"] == 0.9 and r["bootstrap"] == 400
        if r["init"] == "joint":
            # Every case shifted by +0.1: the paired difference and its CI are exactly the shift.
            assert r["n_pairs"] == 3
            assert r["diff_vs_ref"] == pytest.approx(0.1, abs=1e-6)
            assert (r["diff_ci_low"], r["diff_ci_high"]) == pytest.approx((0.1, 0.1), abs=1e-6)
            assert r["simulated"] is (r["fraction"] == 1.0)
        else:
            assert math.isnan(r["diff_vs_ref"])
    hd = [r for r in rows if r["metric"] == "hd95_mean" and r["init"] == "joint"]
    assert hd and not hd[0]["higher_is_better"] and hd[0]["diff_vs_ref"] == pytest.approx(-1.0, abs=1e-6)
    # Reproducible: the same inputs and seed give the same file.
    again = tmp_path / "again.csv"
    run_study("organs", study_runs, again, settings)
    assert again.read_text(encoding="utf-8") == out.read_text(encoding="utf-8")


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
