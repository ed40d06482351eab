"""CI cannot go green without the SLURM test: .ci/run stops when the cluster does not start, and
tests/test_slurm.py fails instead of skipping under CI=true.

Nothing here touches a cluster: every run gets a PATH without the SLURM tools (and fake ``pip``
and ``python`` that only record being called), so the cluster test's body can never start.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "SLURM_UP_STRICT", "PYTEST_ADDOPTS")}
    env["MEDCLUST_SLURM_START"] = str(tmp_path / "no_start_slurm.sh")  # the cluster cannot start
    env.update(extra)
    return env


def _fake_tools(tmp_path: Path) -> Path:
    """A folder with ``pip`` and ``python`` stand-ins that leave a mark and fail."""
    shim = tmp_path / "shim"
    shim.mkdir()
    for tool in ("pip", "python"):
        script = shim / tool
        script.write_text(f"#!/bin/sh\ntouch '{tmp_path}/{tool}_was_called'\nexit 1\n", encoding="utf-8")
        script.chmod(0o755)
    return shim


def test_ci_run_fails_when_the_cluster_does_not_start(tmp_path):
    shim = _fake_tools(tmp_path)
    env = _env(tmp_path, PATH=f"{shim}:{os.environ['PATH']}")
    proc = subprocess.run(["bash", str(REPO / ".ci" / "run")], env=env, capture_output=True, encoding="utf-8",
                          errors="replace", timeout=120)  # fmt: skip
    assert proc.returncode != 0, proc.stdout
    assert "SLURM cluster NOT started" in proc.stdout and "strict mode" in proc.stdout
    # it stopped before installing and testing, so CI reports the cluster, not a green suite
    assert not (tmp_path / "pip_was_called").exists() and not (tmp_path / "python_was_called").exists()


def test_slurm_up_is_strict_under_ci_and_lenient_by_hand(tmp_path):
    script = str(REPO / ".ci" / "slurm_up.sh")

    def code(**extra: str) -> int:
        return subprocess.run(["bash", script], env=_env(tmp_path, **extra), capture_output=True, timeout=60).returncode

    assert code() == 0  # by hand: says why and lets the slurm tests skip
    assert code(CI="true") == 1
    assert code(SLURM_UP_STRICT="1") == 1
    assert code(CI="true", SLURM_UP_STRICT="0") == 0  # an explicit choice wins


def _run_slurm_test(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess:
    empty = tmp_path / "empty_path"
    empty.mkdir(exist_ok=True)
    env = _env(tmp_path, PATH=str(empty))  # no sinfo/sbatch/sacct: the cluster "is not there"
    if ci is not None:
        env["CI"] = ci
    # --noconftest: the shared conftest only pins torch threads, and importing torch is most of the time
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--noconftest", str(REPO / "tests" / "test_slurm.py")]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=300)


def test_slurm_test_fails_instead_of_skipping_under_ci(tmp_path):
    in_ci = _run_slurm_test(tmp_path, "true")
    assert in_ci.returncode == 1, in_ci.stdout[-2000:]
    # the fixture fails the test at set-up: reported as an error, and the run fails
    assert "1 error" in in_ci.stdout and "skipped" not in in_ci.stdout
    assert "CI is set but the SLURM test cannot run" in in_ci.stdout
    by_hand = _run_slurm_test(tmp_path, None)
    assert by_hand.returncode == 0, by_hand.stdout[-2000:]
    assert "1 skipped" in by_hand.stdout and "sinfo" in by_hand.stdout
