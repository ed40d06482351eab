"""The tiny study end to end on a real SLURM cluster, with a pre-empted pretraining job.

Needs a running cluster with accounting (`bash .ci/slurm_up.sh` starts a single-node one with
slurmdbd, account `testacct`, partition `debug` and one fake GPU); skips with the reason when
there is none, except under CI (``CI=true``, as .ci/run sets), where a missing cluster fails the
test: CI must never go green without having run it. What it checks:
- every non-local job went through sbatch: each is in `sacct` under the run's job name (the
  plugin names every job of a run after its run id) with the account and partition given on
  the command line, GPU jobs with a GPU allocated;
- the study's outputs are complete;
- a pretraining job that gets SIGTERM mid-run (`scancel --signal=TERM`, what SLURM sends before
  a pre-emption or the time limit) checkpoints and fails, Snakemake resubmits it with a longer
  time limit (`runtime` grows with `attempt`) and it resumes: "resuming from step N", N > 0.
The profile is workflow/profiles/slurm with only the sizes clamped to the 2-core test node.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_study  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "workflow" / "profiles" / "slurm" / "config.yaml"
ACCOUNT, PARTITION = os.environ.get("MEDCLUST_TEST_SLURM_ACCOUNT", "testacct"), os.environ.get(
    "MEDCLUST_TEST_SLURM_PARTITION", "debug"
)
PRETRAIN_STEPS = 20
CHECKPOINT_EVERY = 3
RUN_TIMEOUT_S = 900


def _cluster_problem() -> str | None:
    """Why the SLURM tests cannot run here, or None when they can."""
    for tool in ("sinfo", "sbatch", "sacct", "scancel"):
        if shutil.which(tool) is None:
            return f"`{tool}` not on PATH (no SLURM client; start one with `bash .ci/slurm_up.sh`)"
    try:
        states = subprocess.run(
            ["sinfo", "-h", "-p", PARTITION, "-o", "%T"], capture_output=True, encoding="utf-8", errors="replace", timeout=15
        )
        acct = subprocess.run(["sacct", "-n", "-X", "-S", "now"], capture_output=True, encoding="utf-8", errors="replace", timeout=15)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"SLURM does not answer: {err}"
    if states.returncode != 0:
        return f"sinfo failed: {states.stderr.strip()[:200]}"
    if not re.search(r"\b(idle|mixed|allocated)", states.stdout):
        return f"no usable node in partition {PARTITION!r} (states: {states.stdout.split()})"
    if acct.returncode != 0:
        return f"sacct failed (slurmdbd not running?): {acct.stderr.strip()[:200]}"
    gres = subprocess.run(["sinfo", "-h", "-p", PARTITION, "-o", "%G"], capture_output=True, encoding="utf-8", errors="replace").stdout
    if "gpu" not in gres:
        return f"partition {PARTITION!r} has no (fake) GPU gres; start the cluster with FAKE_GPUS=1"
    return None


_PROBLEM = _cluster_problem()
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.skipif(_PROBLEM is not None and not IN_CI, reason=f"no SLURM cluster: {_PROBLEM}"),
]


@pytest.fixture(autouse=True)
def _cluster_is_up() -> None:
    """Under CI a missing cluster is a failure, not a skip (outside CI the mark above skips)."""
    if _PROBLEM is not None:
        pytest.fail(f"CI is set but the SLURM test cannot run: {_PROBLEM} (.ci/run starts the cluster)", pytrace=False)


def ci_profile(folder: Path) -> Path:
    """workflow/profiles/slurm with threads and memory clamped to the 2-core test node.

    Everything that decides how jobs are submitted and retried (executor, retries, requeue,
    gpu, slurm_extra, runtime expressions) is kept as it is.
    """
    prof = yaml.safe_load(PROFILE.read_text(encoding="utf-8"))
    prof["set-threads"] = {rule: 1 for rule in prof.get("set-threads", {})}
    for res in prof.get("set-resources", {}).values():
        if "mem_mb" in res:
            res["mem_mb"] = min(int(res["mem_mb"]), 2500)
    prof["default-resources"] = {"mem_mb": 2000, "runtime": 30}
    prof["latency-wait"] = 5
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(prof, sort_keys=False), encoding="utf-8")
    return folder


def sacct_jobs(run_id: str) -> dict[str, dict[str, str]]:
    fields = ["JobID", "JobName", "Partition", "Account", "AllocTRES", "State", "Timelimit", "ExitCode"]
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-S", "now-1days", "--name", run_id, "-o", ",".join(fields)],
        capture_output=True, encoding="utf-8", errors="replace", check=True,
    ).stdout
    rows = [dict(zip(fields, line.split("|"))) for line in out.splitlines() if line.strip()]
    return {row["JobID"]: row for row in rows}


def minutes(limit: str) -> int:
    """SLURM [D-]HH:MM:SS -> minutes."""
    days, _, hms = limit.rpartition("-")
    h, m, s = (int(x) for x in hms.split(":"))
    return (int(days) if days else 0) * 1440 + h * 60 + m + (s > 0)


def wait_for(predicate, proc: subprocess.Popen, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"snakemake exited ({proc.returncode}) while waiting for {what}")
        time.sleep(1)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.mark.timeout(RUN_TIMEOUT_S + 120)
def test_study_on_slurm_with_preempted_pretraining(tmp_path):
    work = tmp_path / "study"
    pretrain = dict(tiny_study.CONFIG["pretrain"], steps=PRETRAIN_STEPS, checkpoint_every=CHECKPOINT_EVERY)
    finetune = dict(tiny_study.CONFIG["finetune"], inits=["none", "joint"])
    config = tiny_study.write_study(work, cases=3, pretrain=pretrain, finetune=finetune)
    profile = ci_profile(tmp_path / "profile")
    task = next(iter(finetune["tasks"]))
    targets = [f"results/study/{task}.csv", "results/pretrain/joint/encoder.pt"]
    log_path = tmp_path / "snakemake.log"
    cmd = [
        shutil.which("snakemake") or "snakemake",
        "-s", str(REPO / "Snakefile"), "--directory", str(work), "--configfile", str(config),
        "--workflow-profile", str(profile),
        "--default-resources", f"slurm_account={ACCOUNT}", f"slurm_partition={PARTITION}", "mem_mb=2000", "runtime=30",
        "--slurm-init-seconds-before-status-checks", "2",
        *targets,
    ]
    started = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, cwd=work, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    text = lambda: log_path.read_text(encoding="utf-8")  # noqa: E731
    run_id = None
    try:
        run_id = wait_for(lambda: (re.search(r"SLURM run ID: (\S+)", text()) or [None, None])[1], proc, 120, "run id")

        # Pre-empt the first pretraining job once it has written a checkpoint.
        def pretrain_job():
            m = re.search(r"has been submitted with SLURM jobid (\d+) \(log: \S*rule_pretrain_method", text())
            return m and m.group(1)

        first_pretrain = wait_for(pretrain_job, proc, RUN_TIMEOUT_S / 2, "the pretraining job")
        ckpt_dir = work / "results" / "pretrain" / "joint" / "checkpoint"
        wait_for(lambda: ckpt_dir.is_dir() and any(ckpt_dir.glob("step_*")), proc, 300, "a pretraining checkpoint")
        subprocess.run(["scancel", "--signal=TERM", first_pretrain], check=True)
        signalled_at = time.monotonic()

        try:
            proc.wait(timeout=max(10, RUN_TIMEOUT_S - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            pytest.fail(f"the study did not finish in {RUN_TIMEOUT_S} s; log tail:\n{text()[-3000:]}")
        wall = time.monotonic() - started
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
        if run_id:  # never leave jobs of this run behind on the cluster
            subprocess.run(["scancel", "--name", run_id], capture_output=True)

    output = text()
    assert proc.returncode == 0, output[-4000:]
    print(f"\nSLURM study wall time: {wall:.0f} s (pre-empted {signalled_at - started:.0f} s in)")

    # -- outputs complete
    results = work / "results"
    for path in [
        results / "study" / f"{task}.csv",
        results / "pretrain" / "joint" / "encoder.pt",
        *[results / "finetune" / task / init / "1.0" / "0" / name for init in ("none", "joint")
          for name in ("model.pt", "run.json", "metrics.json")],
    ]:
        assert path.is_file() and path.stat().st_size > 0, f"missing output {path.relative_to(work)}"

    # -- every non-local job went through sbatch and is accounted under this run
    submissions = re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: \S*/rule_(\w+?)/", output)
    submitted = {slurm_id: rule for _, slurm_id, rule in submissions}
    # local jobs print "localrule"/"localcheckpoint"; a retried job prints its block again
    executed = re.findall(r"^(?:rule|checkpoint) (\w+):\n(?:    .*\n)*?    jobid: (\d+)$", output, re.M)
    assert executed, output[-3000:]
    assert sorted(executed) == sorted((rule, sm_id) for sm_id, _, rule in submissions), (executed, submissions)
    jobs = sacct_jobs(run_id)
    assert set(submitted) == set(jobs), (submitted, jobs)
    for row in jobs.values():
        assert row["Account"] == ACCOUNT and row["Partition"] == PARTITION, row
    for job_id, rule in submitted.items():
        if rule in ("pretrain_method", "finetune_run"):
            assert "gres/gpu=1" in jobs[job_id]["AllocTRES"], jobs[job_id]

    # -- the pre-empted job failed, was resubmitted with a longer limit, and resumed
    pre_jobs = sorted((int(j) for j, r in submitted.items() if r == "pretrain_method"))
    assert len(pre_jobs) == 2 and str(pre_jobs[0]) == first_pretrain, pre_jobs
    first, second = jobs[str(pre_jobs[0])], jobs[str(pre_jobs[1])]
    assert first["State"] == "FAILED", first
    assert second["State"] == "COMPLETED", second
    assert minutes(second["Timelimit"]) > minutes(first["Timelimit"]), (first, second)
    pre_log = (results / "logs" / "pretrain" / "joint.log").read_text(encoding="utf-8")
    resumed = re.search(r"resuming from step (\d+)", pre_log)
    assert resumed and int(resumed.group(1)) > 0, pre_log[-2000:]
    assert "starting at step 0" not in pre_log
    assert int(resumed.group(1)) < PRETRAIN_STEPS
    print(f"pre-empted pretraining resumed from step {resumed.group(1)} of {PRETRAIN_STEPS}")
    for job_id in sorted(jobs, key=int):
        row = jobs[job_id]
        print(f"  {job_id:>5} {submitted[job_id]:<16} {row['Partition']} {row['Account']} "
              f"{row['AllocTRES']} {row['State']} {row['Timelimit']}")
