"""Conda environment files (envs/*.yaml) pin exactly what pyproject.toml pins.

A drift between the two means `snakemake --use-conda` runs different library versions than the
venv the tests ran in, which is the kind of difference nobody finds until a result changes.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
ENV_FILES = sorted((REPO / "envs").glob("*.yaml"))
# Entries of a conda env file that are not PyPI packages of the project.
CONDA_ONLY = {"python", "pip"}
_CONDA_SPEC = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$")


def pyproject_pins() -> dict[str, SpecifierSet]:
    """``{canonical name: specifier}`` of pyproject [project].dependencies."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    pins = {}
    for line in project["dependencies"]:
        req = Requirement(line)
        pins[canonicalize_name(req.name)] = req.specifier
    return pins


def env_entries(path: Path) -> tuple[dict[str, SpecifierSet], dict[str, str], list[str]]:
    """Parse one env file.

    Args:
        path: a conda environment YAML file.

    Returns:
        (pip pins ``{name: specifier}``, conda entries ``{name: raw spec}``, pip option lines
        such as ``-e ...`` or ``--extra-index-url ...``).
    """
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    pip_pins: dict[str, SpecifierSet] = {}
    conda: dict[str, str] = {}
    options: list[str] = []
    for dep in data.get("dependencies", []):
        if isinstance(dep, dict):
            for line in dep.get("pip", []):
                line = str(line).strip()
                if line.startswith("-"):
                    options.append(line)
                    continue
                try:
                    req = Requirement(line)
                except InvalidRequirement as err:
                    pytest.fail(f"{path.name}: pip entry {line!r} is not a PEP 508 requirement: {err}")
                name = canonicalize_name(req.name)
                assert name not in pip_pins, f"{path.name}: {req.name} listed twice under pip"
                pip_pins[name] = req.specifier
        else:
            match = _CONDA_SPEC.match(str(dep))
            assert match, f"{path.name}: cannot parse conda dependency {dep!r}"
            conda[canonicalize_name(match.group(1))] = match.group(2).strip()
    return pip_pins, conda, options


def test_env_files_exist():
    assert ENV_FILES, "envs/ holds no *.yaml conda environment"
    assert (REPO / "envs" / "medclust.yaml") in ENV_FILES


@pytest.mark.parametrize("env_file", ENV_FILES, ids=lambda p: p.name)
def test_env_pins_match_pyproject(env_file: Path):
    pins = pyproject_pins()
    pip_pins, conda, _ = env_entries(env_file)

    # Every project dependency is in the env, with the very same specifier (as a set, so
    # "<1.7,>=1.6" equals ">=1.6,<1.7").
    for name, spec in pins.items():
        if name in pip_pins:
            assert pip_pins[name] == spec, (
                f"{env_file.name}: {name} is pinned {pip_pins[name] or '(unpinned)'} "
                f"but pyproject.toml says {spec or '(unpinned)'}"
            )
        elif name in conda:
            raw = conda[name].replace(" ", "")
            # conda's "==x" is pip's "==x"; a bare conda "=x" means x.* and is a different pin.
            assert raw and not re.match(r"^=[^=]", raw), (
                f"{env_file.name}: conda entry {name}{conda[name]} is not pip-comparable; "
                f"write it as in pyproject.toml ({spec})"
            )
            assert SpecifierSet(raw) == spec, (
                f"{env_file.name}: conda pins {name}{conda[name]} but pyproject.toml says {spec}"
            )
        else:
            pytest.fail(f"{env_file.name}: pyproject dependency {name}{spec} is missing")

    # Nothing pinned in the env that the project does not declare (it would silently differ
    # from a pip install of the package).
    extra = (set(pip_pins) | (set(conda) - CONDA_ONLY)) - set(pins)
    assert not extra, f"{env_file.name}: packages not in pyproject.toml dependencies: {sorted(extra)}"


@pytest.mark.parametrize("env_file", ENV_FILES, ids=lambda p: p.name)
def test_env_python_satisfies_requires_python(env_file: Path):
    requires = SpecifierSet(tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["requires-python"])
    _, conda, _ = env_entries(env_file)
    assert "python" in conda, f"{env_file.name}: no python entry"
    version = conda["python"].lstrip("=<>!~ ").split(",")[0].split("*")[0].rstrip(".")
    assert Version(version) in requires, (
        f"{env_file.name}: python {conda['python']} does not satisfy requires-python {requires}"
    )


def test_medclust_env_installs_the_package():
    """--use-conda jobs call the `medclust` CLI, so the env must install this checkout."""
    _, _, options = env_entries(REPO / "envs" / "medclust.yaml")
    assert any(opt.startswith("-e") and "MEDCLUST_ROOT" in opt for opt in options), options


def test_drift_is_detected(tmp_path: Path):
    """The comparison itself: a changed pin must be reported, naming the package."""
    text = (REPO / "envs" / "medclust.yaml").read_text(encoding="utf-8").replace("monai>=1.6,<1.7", "monai>=1.5")
    bad = tmp_path / "bad.yaml"
    bad.write_text(text, encoding="utf-8")
    with pytest.raises(AssertionError, match="monai"):
        test_env_pins_match_pyproject(bad)


def test_every_command_rule_declares_the_env():
    """`snakemake --use-conda` runs a rule in envs/medclust.yaml only if the rule says so."""
    missing = []
    for path in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"^(?:rule|checkpoint) (\w+):(.*?)(?=^\S|\Z)", text, re.M | re.S):
            name, body = match.groups()
            if re.search(r"^\s+(shell|script):", body, re.M) and not re.search(r"^\s+conda:\s*\n?\s*MEDCLUST_ENV", body, re.M):
                missing.append(f"{path.name}:{name}")
    assert not missing, f"rules without `conda: MEDCLUST_ENV`: {missing}"
