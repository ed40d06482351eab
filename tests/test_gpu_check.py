"""benchmarks/gpu_check.sh: fails loudly without CUDA; its driver runs end to end on CPU (tiny scale)."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="these check the behaviour without CUDA")


def _run(*args: str, timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PYTHON": sys.executable}
    started = time.perf_counter()
    proc = subprocess.run(
        ["bash", str(SCRIPT), *args], check=False, capture_output=True, text=True, encoding="utf-8", timeout=timeout, env=env, cwd=REPO
    )
    return proc, time.perf_counter() - started


def test_require_cuda_fails_within_a_minute_with_one_clear_line():
    proc, seconds = _run("--require-cuda", timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert seconds < 60
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["gpu_check: FAILED: --require-cuda but torch sees no CUDA device (torch.cuda.is_available() is False)"]


def test_without_cuda_and_without_cpu_mode_nothing_is_measured_and_it_says_so():
    proc, _ = _run("--steps", "5", timeout=60)
    assert proc.returncode == 3
    assert "CUDA is not available: nothing measured" in proc.stderr
    assert "items_per_s" not in proc.stdout


def test_cpu_smoke_run_reports_every_figure():
    proc, _ = _run("--device", "cpu", "--steps", "3", "--finetune-steps", "2", timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    values = dict(re.findall(r"(\w+)=(\S+)", last))
    assert list(values) == [
        "pretrain_items_per_s", "compiled_items_per_s", "finetune_items_per_s", "gpu_busy_pct",
        "compiled_gpu_busy_pct", "peak_mem_gib", "data_wait_share", "compiled_data_wait_share",
    ]
    assert float(values["pretrain_items_per_s"]) > 0 and float(values["finetune_items_per_s"]) > 0
    assert 0 < float(values["data_wait_share"]) < 1
    assert values["compiled_items_per_s"] == "nan"  # compile is off in the CPU smoke run
    assert "pretrain: 3 steps" in proc.stdout and "finetune: 2 steps" in proc.stdout
