"""Package re-exports loaded on first use (PEP 562).

A package ``__init__`` that imports every submodule makes each process pay for all of them:
``from medclust.evaluate import read_study_table`` imported torch and MONAI (~3.5 s) in every
plotting and table job of the workflow, which need neither.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package`` that import ``exports[name]`` when ``name`` is first used.

    Args:
        package: the package's ``__name__``.
        exports: public name -> submodule (relative to ``package``) that defines it.

    Returns:
        The two module-level functions to assign in the package's ``__init__``.
    """

    def __getattr__(name: str) -> Any:
        submodule = exports.get(name)
        if submodule is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{submodule}"), name)
        setattr(sys.modules[package], name, value)  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    class _Package(types.ModuleType):
        def __setattr__(self, name: str, value: Any) -> None:
            # Importing a submodule binds it on its package. Where an export shares its
            # submodule's name (evaluate_run.evaluate_run), that would hide the export from
            # every later `from package import name` once anything imported the submodule
            # first; the export wins, as it did when the package imported it eagerly.
            if exports.get(name) == name and isinstance(value, types.ModuleType) and value.__name__ == f"{package}.{name}":
                value = getattr(value, name)
            super().__setattr__(name, value)

    sys.modules[package].__class__ = _Package
    return __getattr__, __dir__
