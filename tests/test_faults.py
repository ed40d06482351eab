"""Faults: no hang after an error (loader workers included), a full disk is one line with nothing
partial, killed writes leave no output, and a killed Snakemake run restarts as the README says."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import phantom_ct, save_nifti
from fault_helpers import ENV, last_line, run_until_exit, small_disk
from pretrain_helpers import make_stores, tiny_settings
from torch import nn

from medclust.cli import describe_error
from medclust.errors import BadInputError, DiskFullError, MedclustError
from medclust.io import atomic
from medclust.io.atomic import is_disk_full, publish_together, save_torch_atomic, staged_path, write_json_atomic
from medclust.io.slice_store import write_case
from medclust.train import Trainer, TrainerConfig
from medclust.train.checkpoint import CheckpointStore
from medclust.train.distributed import DistContext
from medclust.train.seeding import shield_worker_from_preemption, worker_init_fn

REPO = Path(__file__).resolve().parents[1]
#: an error must end the command this fast (the hang it guards against lasted until killed)
EXIT_WITHIN_S = 30.0


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_stores(tmp_path_factory.mktemp("stores"))


def _settings_file(folder: Path, **overrides) -> Path:
    path = folder / "settings.json"
    path.write_text(json.dumps(tiny_settings(**overrides)), encoding="utf-8")
    return path


def _pretrain_args(settings: Path, stores: dict[str, Path], out: Path, checkpoint: Path | None = None) -> list[str]:
    args = ["pretrain", "--method", "swav2d", "--settings", f"@{settings}", "--stores", str(stores["ct"]), str(stores["xr"]), "--out", str(out), "--threads", "1"]
    return args + (["--checkpoint-dir", str(checkpoint)] if checkpoint else [])


# -- loader workers and signals -----------------------------------------------------------------


def _shielded_worker(ready: multiprocessing.synchronize.Event) -> None:
    shield_worker_from_preemption()
    ready.set()
    while True:
        time.sleep(0.05)


def test_worker_survives_a_job_wide_sigterm_but_stops_on_its_parents() -> None:
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    worker = ctx.Process(target=_shielded_worker, args=(ready,), daemon=True)
    worker.start()
    try:
        assert ready.wait(20)
        # SLURM signals every process of the job: a SIGTERM/SIGUSR1 sent by another process
        subprocess.run(["kill", "-TERM", str(worker.pid)], check=True)
        subprocess.run(["kill", "-USR1", str(worker.pid)], check=True)
        worker.join(1.0)
        assert worker.is_alive()
        # the parent's SIGTERM is how multiprocessing stops workers at exit: it must work
        started = time.monotonic()
        worker.terminate()
        worker.join(10)
        assert not worker.is_alive() and worker.exitcode == 128 + signal.SIGTERM
        assert time.monotonic() - started < 5
    finally:
        if worker.is_alive():
            worker.kill()


class _Pids(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": torch.ones(4, 1), "pid": torch.tensor([os.getpid()])}


class _FailingLoaderTask:
    """Batches from a 2-worker DataLoader; the third training step raises."""

    def __init__(self) -> None:
        self.pids: set[int] = set()

    def build_model(self) -> nn.Module:
        return nn.Linear(1, 1)

    def batches(self, epoch: int, rank: int, world_size: int):
        return torch.utils.data.DataLoader(_Pids(), batch_size=None, num_workers=2, worker_init_fn=worker_init_fn)

    def training_step(self, model: nn.Module, batch, step: int):
        self.pids.add(int(batch["pid"]))
        if step == 2:
            raise ValueError("injected failure in the training process")
        return {"loss": model(batch["x"]).pow(2).mean()}


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text(encoding="utf-8").rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_trainer_stops_its_loader_workers_when_a_step_fails(tmp_path: Path) -> None:
    task = _FailingLoaderTask()
    cfg = TrainerConfig(max_steps=10, lr=0.1, log_every=1, progress=False, tensorboard=False)
    with pytest.raises(ValueError, match="injected failure") as info:
        Trainer(cfg, tmp_path, tmp_path / "checkpoint").fit(task)
    # the traceback (kept here, as an uncaught error keeps it until exit) still holds the loader
    assert info.traceback and task.pids and os.getpid() not in task.pids
    deadline = time.monotonic() + 10
    while any(_running(pid) for pid in task.pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in task.pids if _running(pid)]


_FAIL_IN = """
import sys, time
from pathlib import Path
from medclust.data import pretrain_datasets
from medclust.train.recipes import pretrain as recipe

where, marker = sys.argv[1], Path(sys.argv[2])

def fail(what):
    marker.write_text(repr(time.time()), encoding="utf-8")
    raise ValueError("injected failure in " + what)

if where == "worker":
    getitem = pretrain_datasets.PretrainBatches.__getitem__
    def patched(self, index):
        if index >= 2:
            fail("a loader worker")
        return getitem(self, index)
    pretrain_datasets.PretrainBatches.__getitem__ = patched
else:
    training_step = recipe.PretrainTask.training_step
    def patched(self, model, batch, step):
        if step >= 2:
            fail("the training process")
        return training_step(self, model, batch, step)
    recipe.PretrainTask.training_step = patched

from medclust.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("where, what", [("worker", "ValueError (in a data loader worker): injected failure in a loader worker"),
                                         ("main", "ValueError: injected failure in the training process")])
def test_an_error_with_two_loader_workers_ends_the_job_in_seconds(stores: dict[str, Path], tmp_path: Path, where: str, what: str) -> None:
    settings = _settings_file(tmp_path, steps=8, num_workers=2, checkpoint_every=1)
    marker = tmp_path / "failed_at"
    cmd = [sys.executable, "-c", _FAIL_IN, where, str(marker), *_pretrain_args(settings, stores, tmp_path / "out")]
    done = run_until_exit(cmd, ENV)
    exited = time.time()
    assert done.returncode == 1, done.stderr[-3000:]
    assert exited - float(marker.read_text(encoding="utf-8")) < EXIT_WITHIN_S
    assert last_line(done.stderr) == f"medclust pretrain: error: unexpected {what} (`medclust --verbose ...` shows the traceback)"
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out" / "encoder.pt").exists() and not (tmp_path / "out" / "metrics.csv").exists()


# -- full disk -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_full_disk_while_checkpointing_with_two_workers_is_one_line_and_no_hang(stores: dict[str, Path], tmp_path: Path) -> None:
    settings = _settings_file(tmp_path, steps=8, num_workers=2, checkpoint_every=2)
    with small_disk(tmp_path / "disk", 64 * 1024) as disk:
        checkpoint = disk.path / "checkpoint"
        done = run_until_exit(disk.python_prefix() + _pretrain_args(settings, stores, tmp_path / "out", checkpoint), disk.env())
        assert done.returncode == 2, done.stderr[-3000:]
        assert done.seconds_after_error is not None and done.seconds_after_error < EXIT_WITHIN_S
        assert last_line(done.stderr) == (
            f"medclust pretrain: error: {checkpoint}/step_00000002: no space left on device (nothing partial was kept; free space and rerun)"
        )
        assert "Traceback" not in done.stderr
        assert sorted(p.name for p in checkpoint.iterdir()) == ["metrics.csv"]  # the live log; no partial checkpoint
    assert not (tmp_path / "out" / "encoder.pt").exists()


@pytest.mark.slow
def test_full_disk_while_preprocessing_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    image = save_nifti(tmp_path / "vol.nii.gz", phantom_ct((64, 64, 40)), np.diag([2.0, 2.0, 3.0, 1.0]))
    settings = json.dumps({"spacing": [2.0, 2.0, 3.0], "size": [64, 64], "dtype": "float32", "ct_normalization": "window"})
    with small_disk(tmp_path / "disk", 64 * 1024) as disk:
        out = disk.path / "slices" / "vol.h5"
        cmd = disk.python_prefix() + ["preprocess", "--image", str(image), "--modality", "CT", "--settings", settings, "--out", str(out)]
        done = subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace", env=disk.env(), timeout=300)
        assert done.returncode == 2, done.stderr[-3000:]
        assert done.stderr.strip().splitlines() == [
            f"medclust preprocess: error: {out}: no space left on device (nothing partial was kept; free space and rerun)"
        ]
        assert list(out.parent.iterdir()) == []


def test_write_case_on_a_full_disk(tmp_path: Path) -> None:
    attrs = {k: "x" for k in ("case_id", "dataset", "modality", "simulated", "source_path", "source_sha256", "label_path",
                              "original_shape", "original_spacing", "original_affine", "store_affine", "target_spacing",
                              "slice_axis", "z_positions_mm", "normalisation", "medclust_version")}
    with small_disk(tmp_path / "disk", 64 * 1024) as disk:
        with pytest.raises(DiskFullError, match=r"a\.h5: no space left on device") as info:
            write_case(disk.path / "a.h5", np.random.default_rng(0).random((20, 64, 64)), attrs, dtype="float32")
        assert "\n" not in str(info.value)
        assert list(disk.path.iterdir()) == []
        write_case(disk.path / "b.h5", np.zeros((1, 8, 8)), attrs)  # space is back: nothing was kept
        assert [p.name for p in disk.path.iterdir()] == ["b.h5"]


def test_full_disk_in_a_checkpoint_keeps_the_previous_one(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", 256 * 1024) as disk:
        store = CheckpointStore(disk.path / "ckpt")
        store.save(1, {"w": torch.zeros(10)}, {"rng": torch.zeros(3)}, DistContext())
        with pytest.raises(DiskFullError, match=r"step_00000002: no space left on device"):
            store.save(2, {"w": torch.zeros(200_000)}, {"rng": torch.zeros(3)}, DistContext())
        assert [p.name for p in store.directory.iterdir()] == ["step_00000001"]
        assert store.load(0)[0].name == "step_00000001"


def test_torch_save_on_a_full_disk_names_the_file(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", 64 * 1024) as disk:
        with pytest.raises(DiskFullError, match=r"encoder\.pt: no space left on device"):
            save_torch_atomic({"w": torch.zeros(100_000)}, disk.path / "encoder.pt")
        assert list(disk.path.iterdir()) == []


def test_disk_full_recognised_without_an_errno(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # torch.save to a path on a full disk: "unexpected pos" and no errno
    unexpected_pos = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    free = {"bytes": 0}
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda _: type("U", (), {"free": free["bytes"]})())
    assert is_disk_full(unexpected_pos, tmp_path)
    free["bytes"] = 10 << 30
    assert not is_disk_full(unexpected_pos, tmp_path)
    assert is_disk_full(RuntimeError("Can't write data (file write failed: errno = 28, error message = 'No space left on device')"))
    assert not is_disk_full(ValueError("No space left on device"))


# -- one-line messages ---------------------------------------------------------------------------


def _raised_in_a_worker(err: Exception) -> BaseException:
    from torch._utils import ExceptionWrapper

    try:
        raise err
    except Exception:  # noqa: BLE001
        wrapper = ExceptionWrapper(where="in DataLoader worker process 0")
    try:
        wrapper.reraise()
    except Exception as reraised:  # noqa: BLE001 - what the main process receives
        return reraised
    raise AssertionError("reraise did not raise")


def test_error_messages_are_one_line() -> None:
    worker_bad_input = _raised_in_a_worker(BadInputError("/data/ct_a.h5", "cannot open slice store file (truncated)"))
    assert "\n" in str(worker_bad_input)
    assert describe_error(worker_bad_input) == (2, "/data/ct_a.h5: cannot open slice store file (truncated) (in a data loader worker)")
    assert describe_error(_raised_in_a_worker(KeyError("views2d"))) == (
        1, "unexpected KeyError (in a data loader worker): 'views2d' (`medclust --verbose ...` shows the traceback)"
    )
    assert describe_error(MedclustError("pretrain settings: key 'lr':\n  must be > 0")) == (2, "pretrain settings: key 'lr': must be > 0")
    assert describe_error(OSError(28, "No space left on device")) == (
        2, "a file being written: no space left on device (nothing partial was kept; free space and rerun)"
    )
    assert describe_error(FileNotFoundError(2, "No such file or directory", "/x/index.json")) == (2, "/x/index.json: No such file or directory")
    assert describe_error(ZeroDivisionError("division by zero"))[0] == 1


# -- killed writes -------------------------------------------------------------------------------

_KILLED_WRITER = """
import sys, time
from pathlib import Path
from medclust.io.atomic import atomic_path, publish_together, write_json_atomic
folder = Path(sys.argv[1])
with publish_together():
    write_json_atomic(folder / "a.json", {"a": 1})
    with atomic_path(folder / "b.json") as tmp:
        tmp.write_text("{", encoding="utf-8")
        print("writing", flush=True)
        time.sleep(60)
"""


def test_a_killed_writer_leaves_no_output_and_the_next_write_removes_its_temps(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(tmp_path)], stdout=subprocess.PIPE, encoding="utf-8", env=ENV)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    proc.kill()
    proc.wait(30)
    # a.json was complete but its job was not: neither output appears
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == []
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 2 and all(re.fullmatch(r"\.[ab]\.json\.\w{8}\.tmp", n) for n in left)
    (tmp_path / ".other.json.keep").write_text("x", encoding="utf-8")

    write_json_atomic(tmp_path / "a.json", {"a": 2})
    write_json_atomic(tmp_path / "b.json", {"b": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.json.keep", "a.json", "b.json"]


def test_publish_together_holds_outputs_until_the_end(tmp_path: Path) -> None:
    with publish_together():
        write_json_atomic(tmp_path / "x.json", {"v": 1})
        write_json_atomic(tmp_path / "x.json", {"v": 2})  # rewritten in the block: the last one counts
        save_torch_atomic({"w": torch.ones(2)}, tmp_path / "m.pt")
        assert not (tmp_path / "x.json").exists()
        assert json.loads(staged_path(tmp_path / "x.json").read_text(encoding="utf-8")) == {"v": 2}
        assert staged_path(tmp_path / "never.json") == tmp_path / "never.json"
    assert json.loads((tmp_path / "x.json").read_text(encoding="utf-8")) == {"v": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "x.json"]

    @publish_together()
    def failing_job(folder: Path) -> None:
        write_json_atomic(folder / "y.json", {"v": 1})
        raise MedclustError("failed after writing y.json")

    with pytest.raises(MedclustError):
        failing_job(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "x.json"]


def test_next_run_removes_a_killed_checkpoint_save(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "ckpt")
    store.save(3, {"w": torch.zeros(2)}, {"rng": torch.zeros(1)}, DistContext())
    killed = store.directory / ".step_00000009.tmp"  # what a kill during the save of step 9 leaves
    killed.mkdir()
    (killed / "rank0.pt").write_bytes(b"partial")
    assert store.load(0)[0].name == "step_00000003"
    assert sorted(p.name for p in store.directory.iterdir()) == ["step_00000003"]


class _LineTask:
    """y = 2x; records whether the run's metrics.csv existed while it trained."""

    def __init__(self, out: Path) -> None:
        self.out, self.seen = out, []

    def build_model(self) -> nn.Module:
        return nn.Linear(1, 1)

    def batches(self, epoch: int, rank: int, world_size: int):
        x = torch.linspace(-1, 1, 8)[:, None]
        yield {"x": x, "y": 2 * x}

    def training_step(self, model: nn.Module, batch, step: int):
        self.seen.append(((self.out / "metrics.csv").exists(), (self.out / "checkpoint" / "metrics.csv").is_file()))
        return {"loss": nn.functional.mse_loss(model(batch["x"]), batch["y"])}


def test_metrics_csv_is_written_at_the_end_and_the_live_log_beside_the_checkpoints(tmp_path: Path) -> None:
    task = _LineTask(tmp_path)
    cfg = TrainerConfig(max_steps=4, lr=0.1, log_every=1, progress=False, tensorboard=False)
    Trainer(cfg, tmp_path, tmp_path / "checkpoint").fit(task)
    assert task.seen == [(False, True)] * 4
    final = (tmp_path / "metrics.csv").read_text(encoding="utf-8").splitlines()
    assert final[0].startswith("step,loss,") and [int(r.split(",")[0]) for r in final[1:]] == [1, 2, 3, 4]
    assert (tmp_path / "checkpoint" / "metrics.csv").read_text(encoding="utf-8").splitlines() == final


# -- kill -9 of a real Snakemake run -----------------------------------------------------------


def _snakemake(root: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(["snakemake", "-s", str(REPO / "Snakefile"), "--cores", "1", *args], cwd=root, capture_output=True,
                          encoding="utf-8", errors="replace", env=ENV, timeout=timeout)


@pytest.mark.slow
def test_kill_9_of_snakemake_mid_pretraining_then_the_readme_restart_resumes(tmp_path: Path) -> None:
    from tiny_study import CONFIG, write_study

    write_study(tmp_path, pretrain={**CONFIG["pretrain"], "num_workers": 1, "checkpoint_every": 2})
    out = tmp_path / "results" / "pretrain" / "joint"

    proc = subprocess.Popen(["snakemake", "-s", str(REPO / "Snakefile"), "--cores", "1", "pretrain"], cwd=tmp_path, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 900
    while not list((out / "checkpoint").glob("step_*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, "snakemake ended before the first pretraining checkpoint"
    os.killpg(proc.pid, signal.SIGKILL)  # Snakemake, its job and the job's loader worker, at once
    proc.wait(30)
    for _ in range(100):  # the group is gone (no orphaned trainer keeps writing)
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("processes of the killed run are still alive")
    assert not [p.name for p in out.iterdir() if p.is_file() and not p.name.startswith(".")]  # no output was declared yet
    (out / ".encoder.pt.k1ll3d00.tmp").write_bytes(b"half")  # as left by a kill during a write

    # what the README says: a plain rerun is refused while Snakemake's own lock remains...
    locked = _snakemake(tmp_path, "pretrain")
    assert locked.returncode != 0 and "--unlock" in locked.stdout + locked.stderr
    # ...so: --unlock, then the same command
    assert _snakemake(tmp_path, "--unlock", "pretrain").returncode == 0
    done = _snakemake(tmp_path, "pretrain")
    log = (tmp_path / "results" / "logs" / "pretrain" / "joint.log").read_text(encoding="utf-8")
    assert done.returncode == 0, done.stderr[-3000:] + log[-3000:]
    assert int(re.search(r"resuming from step (\d+)", log).group(1)) >= 2
    for name in ("encoder.pt", "metrics.csv", "embeddings.npz", "provenance.json"):
        assert (out / name).is_file()
    assert not list(out.rglob("*.tmp"))
    steps = [int(line.split(",")[0]) for line in (out / "metrics.csv").read_text(encoding="utf-8").splitlines()[1:]]
    assert steps == list(range(1, steps[-1] + 1))  # the history of the killed run is kept
