"""Snakemake profiles (workflow/profiles/*) and the training launcher (common.smk launch_prefix).

What a profile asks SLURM for only shows when a job is submitted, hours into a study; these tests
read the profiles, check every rule they name exists, and dry-run Snakemake to see the resources
and the command lines each job would get.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PROFILES = REPO / "workflow" / "profiles"
SLURM = PROFILES / "slurm" / "config.yaml"
MULTINODE = PROFILES / "slurm-multinode" / "config.yaml"
LOCAL = PROFILES / "local" / "config.yaml"
LOCAL_GPU = PROFILES / "local-gpu" / "config.yaml"
RULE_FILES = sorted((REPO / "workflow" / "rules").glob("*.smk"))
# Rules that train a network: they must request GPUs on a cluster and start through launch_prefix.
TRAINING_COMMANDS = ("medclust pretrain", "medclust finetune")


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def snakemake(*args: str, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run the snakemake CLI of this interpreter; output (stdout+stderr) in .stdout."""
    exe = shutil.which("snakemake") or "snakemake"
    return subprocess.run(
        [exe, *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        encoding="utf-8", errors="replace",
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def rule_blocks() -> dict[str, str]:
    """``{rule name: source text}`` of every rule/checkpoint in workflow/rules/*.smk."""
    blocks: dict[str, str] = {}
    for path in RULE_FILES:
        text = path.read_text(encoding="utf-8")
        starts = [(m.start(), m.group(2)) for m in re.finditer(r"^(rule|checkpoint)\s+(\w+)\s*:", text, re.M)]
        for i, (start, name) in enumerate(starts):
            end = starts[i + 1][0] if i + 1 < len(starts) else len(text)
            # a block ends at the next top-level statement
            body = re.split(r"\n(?=\S)", text[start:end])[0]
            blocks[name] = body
    return blocks


def local_rules() -> set[str]:
    names: set[str] = set()
    for path in RULE_FILES:
        for m in re.finditer(r"^localrules:\s*\n((?:[ \t]+\S.*\n?)+)", path.read_text(encoding="utf-8"), re.M):
            names.update(n.strip() for n in m.group(1).replace("\n", ",").split(",") if n.strip())
    return names


def training_rules() -> list[str]:
    return sorted(n for n, b in rule_blocks().items() if any(c in b for c in TRAINING_COMMANDS))


@pytest.fixture(scope="module")
def workflow_rules() -> set[str]:
    out = snakemake("--list-rules", cwd=REPO)
    assert out.returncode == 0, out.stdout
    return {line.strip() for line in out.stdout.splitlines() if re.fullmatch(r"\s*\w+\s*", line)}


# --------------------------------------------------------------------------- the profiles


def test_profiles_parse_and_have_their_roles():
    for path in (SLURM, MULTINODE, LOCAL, LOCAL_GPU):
        assert path.is_file(), path
    slurm = load(SLURM)
    assert slurm["executor"] == "slurm"
    assert slurm["slurm-requeue"] is True
    assert slurm["retries"] >= 1, "pre-empted training jobs need a retry to resume"
    assert slurm["latency-wait"] >= 30, "shared file systems lag behind the compute node"
    assert slurm["jobs"] >= 10
    assert 0 < slurm["slurm-init-seconds-before-status-checks"] <= 60
    for key in ("mem_mb", "runtime"):
        assert key in slurm["default-resources"], key
    local = load(LOCAL)
    assert "executor" not in local and local["cores"] == "all"
    assert load(LOCAL_GPU)["resources"]["gpu"] >= 1


def test_site_settings_only_in_profiles():
    """Account and partition are site settings: placeholders in the slurm profiles, nowhere else."""
    text = SLURM.read_text(encoding="utf-8")
    for key in ("slurm_account", "slurm_partition"):
        assert re.search(rf"^\s*#\s*{key}:", text, re.M), f"commented placeholder for {key} missing"
        # not set to a value: a CLI --default-resources or the user's edit provides it
        assert key not in load(SLURM)["default-resources"]
    others = [REPO / "Snakefile", REPO / "config.yaml", *RULE_FILES, *(PROFILES / "local").glob("*"),
              *(PROFILES / "local-gpu").glob("*")]
    for path in others:
        for key in ("slurm_account", "slurm_partition", "slurm_extra"):
            assert key not in path.read_text(encoding="utf-8"), f"{path.relative_to(REPO)} sets the site setting {key}"


def test_profile_rule_names_exist(workflow_rules):
    """A typo in set-resources is silently ignored by Snakemake, so check every name."""
    assert workflow_rules, "snakemake --list-rules listed nothing"
    for path in (SLURM, MULTINODE, LOCAL, LOCAL_GPU):
        prof = load(path)
        named = set(prof.get("set-resources", {})) | set(prof.get("set-threads", {}))
        unknown = named - workflow_rules
        assert not unknown, f"{path.relative_to(REPO)} names rules that do not exist: {sorted(unknown)}"


def test_training_rules_get_gpus_and_a_preemption_signal():
    slurm = load(SLURM)["set-resources"]
    rules = training_rules()
    for name in rules:
        res = slurm.get(name)
        assert res, f"slurm profile has no set-resources for training rule {name}"
        assert res.get("gpu", 0) >= 1, f"{name}: no gpu request on SLURM"
        assert "tasks" not in res, f"{name}: `tasks` on a GPU rule becomes --ntasks-per-gpu"
        assert "--signal=TERM@" in str(res.get("slurm_extra", "")), f"{name}: no early SIGTERM"
    for local in (LOCAL, LOCAL_GPU):
        gpu = 1 if local == LOCAL_GPU else 0
        for name in rules:
            assert load(local)["set-resources"][name]["gpu"] == gpu, (local, name)


@pytest.mark.parametrize("path", [SLURM, MULTINODE], ids=["slurm", "slurm-multinode"])
def test_slurm_runtimes_grow_with_attempt(path):
    """A job killed at its time limit is retried with more time (and resumes its checkpoint)."""
    for name, res in load(path)["set-resources"].items():
        runtime = res.get("runtime")
        assert runtime is not None, f"{name}: no runtime"
        one, two = (eval(str(runtime), {"attempt": a}) for a in (1, 2))  # noqa: S307 - our own file
        assert isinstance(one, int) and one > 0, (name, runtime)
        if name in training_rules():
            assert two > one, f"{name}: runtime {runtime!r} does not grow with attempt"


def test_multinode_profile_differs_only_in_pretraining():
    slurm, multi = load(SLURM), load(MULTINODE)
    pre = [n for n in training_rules() if "medclust pretrain" in rule_blocks()[n]]
    assert pre, "no pretraining rule found"
    for key in set(slurm) | set(multi):
        a, b = slurm.get(key), multi.get(key)
        if key == "set-resources":
            a = {k: v for k, v in a.items() if k not in pre}
            b = {k: v for k, v in b.items() if k not in pre}
        if key == "set-threads":
            a = {k: v for k, v in a.items() if k not in pre}
            b = {k: v for k, v in b.items() if k not in pre}
        assert a == b, f"slurm-multinode differs from slurm in {key}"
    res = multi["set-resources"][pre[0]]
    assert res["mpi"] == "srun" and res["nodes"] == res["tasks"] >= 2
    assert res["gpu"] == 0 and res["tasks_per_gpu"] == 0 and re.fullmatch(r"gpu(:\w+)?:\d+", res["gres"])


# ----------------------------------------------------------------------- the rules themselves


def test_heavy_rules_declare_threads_mem_runtime():
    """Every rule that runs a command declares threads, mem_mb and runtime; training rules gpu."""
    missing = []
    locals_ = local_rules()
    for name, body in rule_blocks().items():
        if name in locals_ or not re.search(r"^\s+(shell|script|run):", body, re.M):
            continue
        for what, pattern in (("threads", r"^\s+threads:"), ("mem_mb", r"mem_mb"), ("runtime", r"runtime")):
            if not re.search(pattern, body, re.M):
                missing.append(f"{name}: {what}")
        if any(c in body for c in TRAINING_COMMANDS) and "gpu" not in body:
            missing.append(f"{name}: gpu")
    assert not missing, "rules without resource declarations: " + ", ".join(missing)


def test_training_rules_use_the_launcher():
    for name in training_rules():
        body = rule_blocks()[name]
        assert "launch_prefix(" in body, f"{name}: params must use launch_prefix(resources, threads)"
        assert re.search(r"\{params\.\w+\}medclust (pretrain|finetune)", body), (
            f"{name}: the shell line must start its medclust command with the launch prefix"
        )


# ----------------------------------------------------------------------------- launch_prefix

HARNESS = '''\
from snakemake.utils import validate
configfile: "{repo}/config.yaml"
validate(config, "{repo}/workflow/schemas/config.schema.yaml")
include: "{repo}/workflow/rules/common.smk"

LAUNCH = lambda wildcards, resources, threads: launch_prefix(resources, threads)

rule cpu:
    output: "out/cpu.txt"
    params: launch=LAUNCH
    resources: gpu=0
    shell: """{{params.launch}}{command} > {{output}}"""

rule one_gpu:
    output: "out/one_gpu.txt"
    params: launch=LAUNCH
    resources: gpu=1
    shell: """{{params.launch}}{command} > {{output}}"""

rule train:
    output: "out/{{name}}.txt"
    params: launch=LAUNCH
    threads: 2
    resources: gpu=1, mem_mb=100, runtime=5,
    shell: """{{params.launch}}{command} > {{output}}"""

rule multi_node:
    output: "out/multi_node.txt"
    params: launch=LAUNCH
    threads: 2
    resources: mpi="srun", nodes=2, tasks=2, gres="gpu:4", gpu=0, tasks_per_gpu=0
    shell: """{{params.launch}}{command} > {{output}}"""
'''


def harness(tmp_path: Path, command: str) -> Path:
    (tmp_path / "Snakefile").write_text(HARNESS.format(repo=REPO, command=command), encoding="utf-8")
    return tmp_path


def test_launch_prefix_commands(tmp_path):
    wd = harness(tmp_path, "medclust pretrain --settings x")
    targets = ["out/cpu.txt", "out/one_gpu.txt", "out/four.txt", "out/multi_node.txt"]
    out = snakemake("-n", "-p", "--cores", "2", *targets, "--set-resources", "train:gpu=4", cwd=wd)
    assert out.returncode == 0, out.stdout
    commands = {}
    for line in out.stdout.splitlines():
        if "medclust pretrain" in line:
            command = line.removeprefix("Shell command:").strip()
            commands[re.search(r"> out/(\w+)\.txt", command).group(1)] = command
    assert commands["cpu"] == "exec medclust pretrain --settings x > out/cpu.txt"
    assert commands["one_gpu"] == "exec medclust pretrain --settings x > out/one_gpu.txt"
    assert commands["four"].startswith(
        "exec torchrun --standalone --nnodes=1 --nproc_per_node=4 --no-python medclust pretrain"
    )
    multi = commands["multi_node"]
    assert multi.startswith(
        "exec srun --nodes=2 --ntasks-per-node=1 --cpus-per-task=2 --kill-on-bad-exit=1 --gres=gpu:4 "
    )
    assert "torchrun --nnodes=2 --nproc_per_node=4 --rdzv-id=$SLURM_JOB_ID --rdzv-backend=c10d" in multi
    assert re.search(
        r"--rdzv-endpoint=\$\(scontrol show hostnames .*\):\$\(\(29500 \+ SLURM_JOB_ID % 1000\)\) "
        r"--no-python medclust pretrain",
        multi,
    ), multi


def test_launch_prefix_refuses_nodes_without_mpi(tmp_path):
    wd = harness(tmp_path, "medclust pretrain")
    out = snakemake("-n", "--cores", "2", "out/x.txt", "--set-resources", "train:nodes=2", cwd=wd)
    assert out.returncode != 0
    assert "nodes=2 needs the `mpi` resource" in out.stdout


@pytest.mark.slow
def test_torchrun_launch_runs_ranks(tmp_path):
    """The multi-GPU prefix really starts N ranks (on CPU here: torchrun does not need GPUs)."""
    probe = 'import os; print(os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"])'
    wd = harness(tmp_path, f"{sys.executable} -c '{probe}'")
    out = snakemake("--cores", "2", "out/x.txt", "--set-resources", "train:gpu=2", cwd=wd, timeout=180)
    assert out.returncode == 0, out.stdout
    lines = sorted((wd / "out" / "x.txt").read_text(encoding="utf-8").split("\n"))
    assert [line for line in lines if line] == ["0 2 0", "1 2 1"]


# ---------------------------------------------------------- dry-run of the study with each profile


def dry_run_jobs(output: str) -> list[dict]:
    """Jobs of a `snakemake -n -p` output: rule, threads, resources dict, shell command."""
    jobs = []
    for block in re.split(r"\n(?=\[\w{3} \w{3} +\d+ [\d:]+ \d{4}\]\n)", output):
        head = re.search(r"^(rule|checkpoint|localrule|localcheckpoint) (\w+):", block, re.M)
        if not head:
            continue
        res_line = re.search(r"^    resources: (.*)$", block, re.M)
        resources = {}
        for item in (res_line.group(1).split(", ") if res_line else []):
            key, _, value = item.partition("=")
            resources[key] = value
        threads = re.search(r"^    threads: (\d+)$", block, re.M)
        shell = re.search(r"^Shell command: (.*)$", block, re.M)
        jobs.append({
            "rule": head.group(2),
            "local": head.group(1).startswith("local"),
            "threads": int(threads.group(1)) if threads else 1,
            "resources": resources,
            "shell": shell.group(1) if shell else "",
        })
    return jobs


@pytest.fixture(scope="module")
def tiny_study_dir(tmp_path_factory) -> Path:
    """The tiny study with its ingest checkpoint done, so that a dry run sees every job."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import tiny_study

    root = tmp_path_factory.mktemp("tiny_study")
    tiny_study.write_study(root, cases=2)
    out = snakemake(*study_args(root), "--cores", "1", "results/cases/ct.json", cwd=root, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:]
    return root


def study_args(root: Path) -> list[str]:
    return ["-s", str(REPO / "Snakefile"), "--directory", str(root), "--configfile", str(root / "config.yaml")]


def dry_run_study(root: Path, profile: Path, *extra: str) -> list[dict]:
    out = snakemake(
        *study_args(root), "-n", "-p", "--forcerun", "preprocess", "--cores", "64",
        "--workflow-profile", str(profile.parent), *extra, cwd=root,
    )
    assert out.returncode == 0, out.stdout[-3000:]
    jobs = dry_run_jobs(out.stdout)
    assert jobs, out.stdout[-3000:]
    return jobs


def expected(value, attempt: int = 1):
    return eval(str(value), {"attempt": attempt}) if isinstance(value, str) else value  # noqa: S307


@pytest.mark.slow
def test_dry_run_resources_per_rule_with_slurm_profile(tiny_study_dir):
    """Every job the study submits gets the profile's requests (the table in the README)."""
    prof = load(SLURM)
    jobs = dry_run_study(
        tiny_study_dir, SLURM, "--default-resources", "slurm_account=testacct", "slurm_partition=debug"
    )
    table = {}
    for job in jobs:
        if job["local"] or job["rule"] == "all":
            continue
        res, rule = job["resources"], job["rule"]
        assert res.get("slurm_account") == "testacct" and res.get("slurm_partition") == "debug", job
        for key in ("mem_mb", "runtime"):
            assert res.get(key, "<TBD>").isdigit(), f"{rule}: no {key} ({res})"
        want = prof["set-resources"].get(rule, {})
        for key, value in want.items():
            got = res.get(key)
            if key in ("mem_mb", "runtime", "gpu"):
                assert int(got) == expected(value), f"{rule}: {key}={got}, profile says {value}"
            else:
                assert got == str(expected(value)), f"{rule}: {key}={got}, profile says {value}"
        if rule in prof.get("set-threads", {}):
            assert job["threads"] == prof["set-threads"][rule], (rule, job["threads"])
        if rule in training_rules():
            assert int(res.get("gpu", 0)) >= 1 and "tasks" not in res, job
            assert job["shell"].startswith("exec medclust "), job["shell"]
        table[rule] = (job["threads"], res["mem_mb"], res["runtime"], res.get("gpu", "-"), res.get("slurm_extra", ""))
    assert set(training_rules()) <= set(table), f"training rules missing from the dry run: {table}"
    print("\nrule                  threads  mem_mb  runtime  gpu  slurm_extra")
    for rule, row in sorted(table.items()):
        print(f"{rule:<22}{row[0]:>7}{row[1]:>8}{row[2]:>9}{row[3]:>5}  {row[4]}")


@pytest.mark.slow
def test_dry_run_multinode_and_local_profiles(tiny_study_dir):
    multi = dry_run_study(
        tiny_study_dir, MULTINODE, "--default-resources", "slurm_account=testacct", "slurm_partition=debug"
    )
    pre = next(j for j in multi if j["rule"] == "pretrain_method")
    assert pre["resources"]["mpi"] == "srun" and pre["resources"]["nodes"] == "2", pre
    assert pre["shell"].startswith("exec srun --nodes=2 --ntasks-per-node=1 ")
    assert "torchrun --nnodes=2 --nproc_per_node=4" in pre["shell"]
    fine = next(j for j in multi if j["rule"] == "finetune_run")
    assert fine["shell"].startswith("exec medclust finetune"), fine["shell"]

    local = dry_run_study(tiny_study_dir, LOCAL)
    for job in local:
        if job["rule"] in training_rules():
            assert job["resources"].get("gpu") == "0", job
            assert job["shell"].startswith("exec medclust "), job["shell"]
        assert "slurm_account" not in job["resources"]
