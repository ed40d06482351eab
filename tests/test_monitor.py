"""Learning monitor inside pretraining: metrics.csv rows, TensorBoard scalars, provenance, no side effects."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pretrain_helpers import make_stores, tiny_settings

from medclust.data import collect_cases
from medclust.evaluate.cluster_quality import categorical_values
from medclust.evaluate.probes import ProbeTarget
from medclust.train import Trainer, TrainerConfig
from medclust.train.monitor import build_monitor
from medclust.train.recipes import PretrainTask, resolve_settings, run_pretraining

DATASETS = {"ct": {"body_region": "chest"}, "xr": {"body_region": "hand"}}


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_stores(tmp_path_factory.mktemp("stores"))


@pytest.fixture(scope="module")
def joint_run(stores: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "joint"
    # probes at step 3 (no loss row there: a row of its own) and 4 (merged into the loss row)
    run_pretraining("joint", tiny_settings(steps=4, log_every=2, probe_every=3), stores, out, datasets=DATASETS)
    return out


def _rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="", encoding="utf-8") as handle:
        table = list(csv.reader(handle))
    return table[0], table[1:]


def test_probe_rows_in_metrics_csv(joint_run: Path) -> None:
    header, rows = _rows(joint_run / "metrics.csv")
    assert all(len(r) == len(header) for r in rows)  # rectangular
    steps = [int(r[0]) for r in rows]
    assert steps == [2, 3, 4]
    col = {name: i for i, name in enumerate(header)}
    for label in ("dataset", "modality", "body_region", "z_bin"):
        for kind in ("knn", "linear"):
            assert f"probe/{label}/{kind}" in col and f"probe_random/{label}/{kind}" in col
    by_step = {s: r for s, r in zip(steps, rows)}
    assert by_step[2][col["probe/dataset/knn"]] == ""  # not a probing step
    assert by_step[3][col["loss"]] == "" and by_step[3][col["probe/dataset/knn"]] != ""
    assert by_step[4][col["loss"]] != "" and 0 <= float(by_step[4][col["probe/z_bin/linear"]]) <= 1
    assert by_step[3][col["probe_random/z_bin/knn"]] == by_step[4][col["probe_random/z_bin/knn"]]  # computed once
    # dimensional collapse next to the probes: the ct dataset (36 items) has a rank, the 3 radiographs none
    assert "rank/ct" in col and "rank_random/ct" in col and "rank/xr" not in col
    assert 1.0 <= float(by_step[4][col["rank/ct"]]) <= 36 and by_step[2][col["rank/ct"]] == ""
    assert by_step[3][col["rank_random/ct"]] == by_step[4][col["rank_random/ct"]]


def test_probe_scalars_in_tensorboard(joint_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(joint_run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "probe/dataset/knn", "probe/z_bin/linear", "probe_random/modality/knn"} <= tags
    assert [e.step for e in events.Scalars("probe/dataset/linear")] == [3, 4]


def test_provenance_has_final_gap_and_counts(joint_run: Path) -> None:
    probes = json.loads((joint_run / "provenance.json").read_text(encoding="utf-8"))["settings"]["probes"]
    assert probes["step"] == 4 and probes["probe_runs"] == 3  # random init, step 3, step 4
    z = probes["labels"]["z_bin"]
    assert z["gap_knn"] == pytest.approx(z["knn"] - z["random_knn"])
    assert z["gap_linear"] == pytest.approx(z["linear"] - z["random_linear"])
    # three training CT volumes (10, 8, 9 slices) and the validation one (9); never the test volume
    assert z["n_cases"] == 4 and z["n_items"] == 36 and z["n_units"] > 4 and z["n_folds"] == 5
    assert probes["probe_set"]["ct"] == {"items": 36, "cases": 4, "splits": ["train", "val"]}
    assert probes["labels"]["body_region"]["classes"] == {"chest": 36, "hand": 3}
    header, rows = _rows(joint_run / "metrics.csv")
    assert float(rows[-1][header.index("probe/z_bin/knn")]) == pytest.approx(z["knn"], abs=1e-5)
    rank = probes["effective_rank"]["ct"]
    assert float(rows[-1][header.index("rank/ct")]) == pytest.approx(rank["final"], rel=1e-5)
    assert float(rows[-1][header.index("rank_random/ct")]) == pytest.approx(rank["random"], rel=1e-5)
    assert rank["final"] != rank["random"]  # the trained encoder's own features, not the baseline's


def test_random_baseline_is_the_none_encoder(joint_run: Path, stores: dict[str, Path], tmp_path: Path) -> None:
    run_pretraining("none", tiny_settings(), stores, tmp_path / "none", datasets=DATASETS)
    # the baseline a joint run probes is the encoder `none` exports, weight for weight
    settings = resolve_settings(tiny_settings(probe_every=3))
    monitor = build_monitor(settings, collect_cases(stores), PretrainTask("joint", settings, collect_cases(stores)).build_model, 4, DATASETS)
    assert monitor is not None
    exported = torch.load(tmp_path / "none" / "slice_encoder.pt", weights_only=True)["state_dict"]
    rebuilt = monitor.random_model().encoder.state_dict()
    assert rebuilt.keys() == exported.keys() and all(torch.equal(rebuilt[k], exported[k]) for k in exported)
    none_probes = json.loads((tmp_path / "none" / "provenance.json").read_text(encoding="utf-8"))["settings"]["probes"]
    assert none_probes["probe_runs"] == 1  # an untrained run is its own random init: probed once
    none = none_probes["labels"]
    joint = json.loads((joint_run / "provenance.json").read_text(encoding="utf-8"))["settings"]["probes"]["labels"]
    for label in ("dataset", "z_bin"):
        assert none[label]["knn"] == pytest.approx(joint[label]["random_knn"])
        assert none[label]["linear"] == pytest.approx(joint[label]["random_linear"])
        assert none[label]["gap_knn"] == 0.0
    none_rank = none_probes["effective_rank"]["ct"]
    joint_rank = json.loads((joint_run / "provenance.json").read_text(encoding="utf-8"))["settings"]["probes"]["effective_rank"]["ct"]
    assert none_rank["final"] == none_rank["random"] == pytest.approx(joint_rank["random"])
    header, rows = _rows(tmp_path / "none" / "metrics.csv")
    assert header[:2] == ["step", "loss"] and len(rows) == 1 and rows[0][0] == "0"
    # clustering.json: the random init has no cluster head to score, only its embedding
    none_clusters = json.loads((tmp_path / "none" / "clustering.json").read_text(encoding="utf-8"))
    assert none_clusters["labels"]["dataset"]["assignments"] is None
    assert none_clusters["probes"]["dataset"]["knn"] == pytest.approx(none["dataset"]["knn"])


def test_clustering_json_scores_embedding_and_own_clusters(joint_run: Path) -> None:
    report = json.loads((joint_run / "clustering.json").read_text(encoding="utf-8"))
    assert report["method"] == "joint" and report["step"] == 4
    dataset = report["labels"]["dataset"]
    assert dataset["items"] == 39 and dataset["classes"] == 2  # 36 CT slices + 3 radiographs
    assert dataset["embedding"]["k"] == 2
    for partition in ("embedding", "assignments"):
        scores = dataset[partition]
        assert 0.0 <= scores["nmi"] <= 1.0 and -1.0 <= scores["ari"] <= 1.0 and 0.5 <= scores["accuracy"] <= 1.0
    assert 1 <= dataset["assignments"]["clusters"] <= resolve_settings(tiny_settings())["k_2d"]
    # z bins exist for volume slices only: radiographs are left out of that label
    assert report["labels"]["z_bin"]["items"] == 36
    provenance = json.loads((joint_run / "provenance.json").read_text(encoding="utf-8"))["settings"]["probes"]
    assert report["probes"]["z_bin"]["linear"] == pytest.approx(provenance["labels"]["z_bin"]["linear"])


def test_monitor_leaves_training_unchanged(stores: dict[str, Path], tmp_path: Path) -> None:
    settings = resolve_settings(tiny_settings(steps=3, probe_every=1))
    cases = collect_cases(stores)

    def fit(name: str, with_monitor: bool) -> torch.nn.Module:
        task = PretrainTask("joint", settings, cases)
        monitor = build_monitor(settings, cases, task.build_model, 3, DATASETS) if with_monitor else None
        trainer = Trainer(TrainerConfig.from_dict({**settings, "progress": False, "tensorboard": False}), tmp_path / name, tmp_path / name / "ck")
        model = trainer.fit(task, monitor)
        if with_monitor:
            assert monitor is not None and monitor.calls == 4  # random init + 3 steps
        return model

    plain, watched = fit("plain", False), fit("watched", True)
    for (name, a), b in zip(plain.state_dict().items(), watched.state_dict().values()):
        assert torch.equal(a, b), name
    assert watched.training  # the monitor restored train mode


def test_structure_sets_use_the_columns_that_apply_to_each_item() -> None:
    nan = float("nan")
    target = ProbeTarget(
        "structures",
        np.array([[1, 0, nan], [1, 1, nan], [0, 0, nan], [nan, nan, 1], [nan, nan, nan]]),
        columns=["chest/lung", "chest/heart", "brain/grey"],
    )
    assert categorical_values(target).tolist() == ["chest/lung", "chest/lung+chest/heart", "none", "brain/grey", ""]
