"""Package re-exports load on first use: the workflow's table and plot jobs do not import torch."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "statement",
    [
        "from medclust.evaluate import read_study_table, t_interval, verdict",
        "from medclust.report import plot_study_curves, plot_study_table, write_verdict_table",
    ],
)
def test_study_tables_and_plots_do_not_import_torch(statement: str) -> None:
    code = f"import sys\n{statement}\nprint(sorted({{'torch', 'monai'}} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("package", ["medclust.evaluate", "medclust.report", "medclust.train.recipes"])
def test_every_exported_name_resolves(package: str) -> None:
    module = importlib.import_module(package)
    assert module.__all__ and set(module.__all__) <= set(dir(module))
    for name in module.__all__:
        value = getattr(module, name)
        assert getattr(value, "__name__", name) == name or not callable(value)
    with pytest.raises(AttributeError, match="no attribute 'not_exported'"):
        getattr(module, "not_exported")


def test_an_export_named_like_its_submodule_stays_the_export() -> None:
    # `evaluate_run` is both a submodule and the function it defines: importing the submodule
    # first (as scoring code does) must not turn the package's `evaluate_run` into the module.
    code = (
        "import medclust.evaluate.evaluate_run, types\n"
        "from medclust.evaluate import evaluate_run\n"
        "import medclust.evaluate as package\n"
        "print(type(evaluate_run).__name__, type(package.evaluate_run).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["function", "function"]
