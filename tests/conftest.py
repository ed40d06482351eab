"""Shared test set-up: the machine has 2 cores shared with other jobs, so keep torch to one thread."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def repo_root() -> str:
    """Absolute path of the repository checkout."""
    return REPO
