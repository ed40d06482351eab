"""Phase timestamps of a ``medclust`` process, for ``benchmarks/startup.py`` (not part of the package).

Run as ``python benchmarks/_phase_probe.py RECORD.json SRC_DIR medclust <stage> ...``: loads the
``medclust`` package from SRC_DIR (the checkout to measure), installs the hooks below and calls
``medclust.cli.main`` exactly as the console script does. At exit it writes RECORD.json:

- ``boot``: ``time.perf_counter()`` when this file started (CLOCK_MONOTONIC on Linux: the parent
  compares it with its own clock to get the interpreter's start-up);
- ``imports``: ``[start, seconds, name]`` of every outermost import that loaded new modules
  (nested imports are inside their parent's seconds);
- ``events``: ``[time, name]`` around the fine-tuning phases (``cell_start``, ``data_end``,
  ``fit_start``, ``batches`` (each epoch's batches requested), ``step_end`` per optimiser step, ``val_start``/``val_end``,
  ``fit_end``, ``predict_start``/``predict_end``, ``score_start``/``score_end``,
  ``package_start``/``package_end``, ``cell_end``) and ``exit``.

Hooks wrap functions by name after their module is imported; a name that a checkout does not
have is skipped (its phases are then missing from the record, not wrong).
"""

from __future__ import annotations

import atexit
import builtins
import functools
import importlib.util
import json
import os
import sys
import threading
import time

BOOT = time.perf_counter()
RECORD, SRC = sys.argv[1], sys.argv[2]
sys.argv = sys.argv[3:]

_events: list[list] = []
_imports: list[list] = []
_depth = threading.local()
_real_import = builtins.__import__


def _mark(name: str) -> None:
    _events.append([time.perf_counter(), name])


def _timed(fn, before: str, after: str | None = None):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _mark(before)
        try:
            return fn(*args, **kwargs)
        finally:
            if after:
                _mark(after)

    wrapper.__probe__ = True  # type: ignore[attr-defined]
    return wrapper


def _timed_gen(fn, first: str):
    """Wrap a generator function: mark when the first item is requested."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _mark(first)
        yield from fn(*args, **kwargs)

    wrapper.__probe__ = True  # type: ignore[attr-defined]
    return wrapper


# module -> [(attribute path, wrap)]; attribute path "Class.method" or "function"
_PATCHES = {
    "medclust.train.recipes.finetune": [
        ("run_finetune", lambda f: _timed(f, "cell_start", "cell_end")),
        ("prepare_task_data", lambda f: _timed(f, "data_start", "data_end")),
        ("FinetuneTask.batches", lambda f: _timed_gen(f, "batches")),
        ("FinetuneTask.after_optimizer_step", lambda f: _timed(f, "step_end")),
        ("FinetuneTask.validate", lambda f: _timed(f, "val_start", "val_end")),
        ("_write_segmentation", lambda f: _timed(f, "predict_start", "predict_end")),
        ("_write_classification", lambda f: _timed(f, "predict_start", "predict_end")),
        ("_write_detection", lambda f: _timed(f, "predict_start", "predict_end")),
    ],
    # `from ... import run_finetune` at import time binds the function before it is wrapped above
    "medclust.train.recipes.finetune_batch": [("run_finetune", lambda f: _timed(f, "cell_start", "cell_end"))],
    "medclust.train.trainer": [("Trainer.fit", lambda f: _timed(f, "fit_start", "fit_end"))],
    "medclust.evaluate": [("evaluate_run", lambda f: _timed(f, "score_start", "score_end"))],
    "medclust.predict.recipes": [("write_finetune_package", lambda f: _timed(f, "package_start", "package_end"))],
}


def _apply_patches() -> None:
    for module_name in list(_PATCHES):
        module = sys.modules.get(module_name)
        if module is None or getattr(module, "__spec__", None) is None:
            continue
        for path, wrap in _PATCHES.pop(module_name):
            owner, _, attr = path.rpartition(".")
            target = getattr(module, owner, None) if owner else module
            fn = getattr(target, attr, None) if target is not None else None
            if fn is not None and not getattr(fn, "__probe__", False):
                setattr(target, attr, wrap(fn))


def _import(name, globals=None, locals=None, fromlist=(), level=0):
    depth = getattr(_depth, "n", 0)
    if depth:
        return _real_import(name, globals, locals, fromlist, level)
    before = len(sys.modules)
    start = time.perf_counter()
    _depth.n = 1
    try:
        return _real_import(name, globals, locals, fromlist, level)
    finally:
        _depth.n = 0
        if len(sys.modules) != before:
            _imports.append([start, time.perf_counter() - start, name])
            _apply_patches()


def _write() -> None:
    _mark("exit")
    with open(RECORD, "w", encoding="utf-8") as fh:
        json.dump({"boot": BOOT, "events": _events, "imports": _imports}, fh)


builtins.__import__ = _import
atexit.register(_write)

# `medclust` from SRC even where an editable install's finder (ahead of sys.path) maps it elsewhere
_start = time.perf_counter()
_spec = importlib.util.spec_from_file_location(
    "medclust", os.path.join(SRC, "medclust", "__init__.py"), submodule_search_locations=[os.path.join(SRC, "medclust")]
)
_package = importlib.util.module_from_spec(_spec)
sys.modules["medclust"] = _package
_spec.loader.exec_module(_package)
_imports.append([_start, time.perf_counter() - _start, "medclust"])

from medclust.cli import main

sys.exit(main())
