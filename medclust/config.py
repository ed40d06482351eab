"""Load and validate a medclust config against the JSON schema the Snakefile also uses.

The schema (``medclust/schemas/config.schema.yaml``, linked from ``workflow/schemas/``) is the
single source of defaults and descriptions; this module fills defaults exactly as
``snakemake.utils.validate`` does, so a config resolved here and one resolved by the Snakefile
are identical.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from medclust.errors import MedclustError

SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "config.schema.yaml"


def load_schema() -> dict[str, Any]:
    """The config JSON schema as a dict."""
    return yaml.safe_load(SCHEMA_PATH.read_text(encoding="utf-8"))


def _default_filling_validator() -> type:
    base = jsonschema.Draft202012Validator
    validate_properties = base.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):  # noqa: ANN001 - jsonschema hook
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub:
                    instance.setdefault(name, copy.deepcopy(sub["default"]))
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(base, {"properties": set_defaults})


def _key_path(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "<top level>"


def validate_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Validate ``config`` and return a copy with every schema default filled in.

    Args:
        config: the parsed config.yaml (plus command-line overrides).

    Returns:
        The resolved config.

    Raises:
        MedclustError: naming the offending key and the reason.
    """
    resolved = copy.deepcopy(dict(config))
    validator = _default_filling_validator()(load_schema())
    errors = sorted(validator.iter_errors(resolved), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        raise MedclustError(f"config key '{_key_path(first)}': {first.message}")
    return resolved


def load_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML config file and validate it (see :func:`validate_config`)."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise MedclustError(f"{path}: cannot read config: {err}") from err
    return validate_config(raw)
