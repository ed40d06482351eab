"""``medclust <stage> ...``: the command line the Snakemake rules call.

Thin by design: parse arguments, call the stage's API, turn a :class:`MedclustError` (and a full
disk) into one line on stderr and exit code 2, any other error into one line and exit code 1.
``--verbose`` shows the traceback instead.
Stages register a ``_cmd_<name>(sub)`` function that adds its parser and sets ``func``: in
:mod:`medclust.cli_data` for the data stage, below for training, evaluation and the study, in
:mod:`medclust.cli_report` for report items, :mod:`medclust.cli_predict` for applying models.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from medclust import __version__
from medclust.errors import DiskFullError, MedclustError

log = logging.getLogger("medclust")


def settings_arg(value: str) -> dict[str, Any]:
    """Parse ``--settings``: a JSON object, or ``@path`` to a JSON/YAML file."""
    try:
        if value.startswith("@"):
            return yaml.safe_load(Path(value[1:]).read_text(encoding="utf-8")) or {}
        parsed = json.loads(value)
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise argparse.ArgumentTypeError(f"--settings: cannot parse {value[:80]!r}: {err}") from err
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError("--settings must be a JSON object")
    return parsed


@contextlib.contextmanager
def heavy_imports() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a stage imports torch, MONAI & co.

    Those imports create a few million long-lived objects; the collector's passes over them
    cost ~1 s of CPU per process while importing and again in the first collections after
    (``benchmarks/startup.py``). They are modules, classes and functions that live as long as
    the process, so they are frozen afterwards (moved out of the collector's view, as
    ``gc.freeze`` is meant for): nothing is lost, the training loop's own garbage is collected
    as before.
    """
    import gc

    enabled = gc.isenabled()
    gc.collect()  # in a fresh process a few milliseconds; keeps earlier garbage out of the freeze
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


# --- pretraining ------------------------------------------------------------------------------
# (pretrain)


def _cmd_pretrain(sub: Any) -> None:
    p = sub.add_parser(
        "pretrain",
        help="self-supervised pretraining of one method (resumes from its checkpoint folder)",
        description="Writes OUT/{encoder.pt, slice_encoder.pt, metrics.csv, embeddings.npz, provenance.json, "
        "tensorboard/}; checkpoints go to --checkpoint-dir. SIGTERM/SIGUSR1 save a checkpoint and exit "
        "143/138; rerunning the same command resumes.",
    )
    p.add_argument("--method", required=True, help="joint | swav2d | deepcluster2d | none")
    p.add_argument("--settings", type=settings_arg, default={}, help="config `pretrain` section + `seed` (JSON or @file)")
    p.add_argument("--stores", type=Path, nargs="+", required=True, help="slice store folders results/slices/{dataset}")
    p.add_argument("--out", type=Path, required=True, help="output folder results/pretrain/{method}")
    p.add_argument("--checkpoint-dir", type=Path, default=None, help="default: OUT/checkpoint")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--datasets", type=settings_arg, default={},
        help="config `datasets` entries (JSON or @file) for the learning monitor's labels: body_region, probe_structures, label names",
    )

    def run(args: argparse.Namespace) -> None:
        with heavy_imports():
            import torch
            import torch._dynamo  # torch.optim imports it at the first optimiser anyway

            from medclust.train import TrainingInterrupted
            from medclust.train.recipes import run_pretraining

        if args.threads:
            torch.set_num_threads(args.threads)
        try:
            run_pretraining(args.method, args.settings, args.stores, args.out, args.checkpoint_dir, datasets=args.datasets)
        except TrainingInterrupted as err:
            # 128 + signal, what a shell reports for a killed process: the scheduler sees pre-emption
            print(f"medclust pretrain: {err}", file=sys.stderr)
            raise SystemExit(err.exit_code) from None

    p.set_defaults(func=run)


# --- fine-tuning, evaluation, study, report ---------------------------------------------------
# (finetune, evaluate, study, plot)

# fine-tuning (begin) ---


def _cmd_finetune(sub: Any) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune one downstream run (task x init x fraction x seed), predict and score its test cases",
        description="Trains on the task's training items (label fraction, seed), selects on val, predicts and "
        "scores the test cases and writes run.json, predictions, metrics.json, per_case.csv, provenance.json "
        "and model.pt (last) into --out.",
    )
    p.add_argument("--settings", type=settings_arg, required=True,
                   help="the task's resolved settings (finetune keys + the task's own) as JSON, or @file.yaml")
    p.add_argument("--slices", type=Path, required=True, help="results/slices/DATASET (the task's dataset)")
    p.add_argument("--train-slices", type=Path, default=None,
                   help="results/slices/TRAIN_DATASET when the task trains on another dataset")
    p.add_argument("--init", required=True, help="none or the pretraining method")
    p.add_argument("--encoder", type=Path, default=None, help="results/pretrain/INIT/encoder.pt (unless --init none)")
    p.add_argument("--fraction", type=float, required=True, help="label fraction in (0, 1]")
    p.add_argument("--seed", type=int, required=True, help="run seed")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", type=Path, required=True, help="results/finetune/TASK/INIT/FRACTION/SEED")

    def run(args: argparse.Namespace) -> None:
        with heavy_imports():
            import torch
            import torch._dynamo  # torch.optim imports it at the first optimiser anyway

            from medclust.train import TrainingInterrupted
            from medclust.train.recipes.finetune import run_finetune

        torch.set_num_threads(max(1, args.threads))
        try:
            run_finetune(args.settings, args.slices, args.out, args.init, args.fraction, args.seed,
                         encoder=args.encoder, train_slices_dir=args.train_slices)
        except TrainingInterrupted as err:
            # a pre-empted (not failed) job: 143 / 138 like a process killed by the signal
            print(f"medclust finetune: {err}", file=sys.stderr)
            raise SystemExit(err.exit_code) from None

    p.set_defaults(func=run)


def _cmd_finetune_many(sub: Any) -> None:
    p = sub.add_parser(
        "finetune-many",
        help="several fine-tuning runs of one task in one process (start-up paid once)",
        description="Runs `medclust finetune` for each cell of --cells in turn, in this one process: the same "
        "run folders and outputs, each cell's output in its own log file. The first failing cell stops the batch.",
    )
    p.add_argument("--settings", type=settings_arg, required=True,
                   help="the task's resolved settings (finetune keys + the task's own) as JSON, or @file.yaml")
    p.add_argument("--slices", type=Path, required=True, help="results/slices/DATASET (the task's dataset)")
    p.add_argument("--train-slices", type=Path, default=None,
                   help="results/slices/TRAIN_DATASET when the task trains on another dataset")
    p.add_argument("--cells", type=settings_arg, required=True,
                   help='JSON (or @file): {"cells": [{"init", "fraction", "seed", "out", "encoder" (unless init none), "log"}]}')
    p.add_argument("--threads", type=int, default=1, help="torch threads")

    def run(args: argparse.Namespace) -> None:
        with heavy_imports():
            import torch
            import torch._dynamo  # torch.optim imports it at the first optimiser anyway

            from medclust.train import TrainingInterrupted
            from medclust.train.recipes.finetune_batch import (
                parse_cells,
                run_finetune_cells,
            )

        torch.set_num_threads(max(1, args.threads))
        cells = parse_cells(args.cells.get("cells", []))
        try:
            run_finetune_cells(args.settings, args.slices, cells, train_slices_dir=args.train_slices)
        except TrainingInterrupted as err:
            print(f"medclust finetune-many: {err}", file=sys.stderr)
            raise SystemExit(err.exit_code) from None

    p.set_defaults(func=run)


# fine-tuning (end) ---

# evaluation, study and report figures (begin) ---


def _cmd_evaluate(sub: Any) -> None:
    p = sub.add_parser("evaluate", help="score a fine-tuning run folder: metrics.json + per_case.csv")
    p.add_argument("--run", type=Path, required=True, help="results/finetune/{task}/{init}/{fraction}/{seed}")
    p.add_argument("--settings", type=settings_arg, default={},
                   help="fallback detection options (min_hit_radius_mm, min_diameter_mm, fp_rates) as JSON or @file; run.json's win")

    def run(args: argparse.Namespace) -> None:
        from medclust.evaluate import evaluate_run

        evaluate_run(args.run, args.settings)

    p.set_defaults(func=run)


def _cmd_study(sub: Any) -> None:
    p = sub.add_parser("study", help="study table of one task from its runs' metrics.json files")
    p.add_argument("--task", required=True)
    p.add_argument("--runs", type=Path, nargs="+", required=True, help="metrics.json of every run")
    p.add_argument("--out", type=Path, required=True, help="results/study/{task}.csv")
    p.add_argument("--settings", type=settings_arg, default={}, help="config `study` section (JSON or @file)")

    def run(args: argparse.Namespace) -> None:
        from medclust.evaluate import run_study
        from medclust.provenance import write_provenance

        run_study(args.task, args.runs, args.out, args.settings)
        write_provenance(args.out.parent, args.settings, args.runs, name=f"{args.out.stem}.provenance.json")

    p.set_defaults(func=run)


# --- registry (keep last) ---------------------------------------------------------------------


def _commands() -> list[Callable[[Any], None]]:
    from medclust import cli_data, cli_predict, cli_report  # the data stage, the report, applying models

    found = {**globals(), **vars(cli_data), **vars(cli_report), **vars(cli_predict)}
    return [obj for name, obj in sorted(found.items()) if name.startswith("_cmd_") and callable(obj)]


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, one sub-command per stage."""
    parser = argparse.ArgumentParser(prog="medclust", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"medclust {__version__}")
    parser.add_argument("--verbose", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<stage>")
    for register in _commands():
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``medclust`` console script.

    Args:
        argv: the arguments; None (the console script) reads ``sys.argv`` and also means that the
            process ends after this call (see the end of the function).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        args.func(args)
    except KeyboardInterrupt:
        print(f"medclust {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the last line of defence: one line and an exit status, never a hang
        if args.verbose:
            raise
        code, message = describe_error(err)
        print(f"medclust {args.command}: error: {message}", file=sys.stderr)
        return code
    finally:
        if argv is None:
            # The process exits next. Python's final garbage collection at exit walks every object
            # torch and MONAI created (0.5-2 s of a ~20 s job); frozen objects are skipped. Outputs
            # are closed and renamed by now, and atexit handlers (logging, h5py) still run.
            import gc

            gc.freeze()
    return 0


def describe_error(err: BaseException) -> tuple[int, str]:
    """Exit status and one-line message for an error that ends a command.

    :class:`MedclustError` (bad input, bad config, disk full) exits 2 with its message; a full
    disk raised by any library is reported the same way; any other error (a bug) exits 1 with
    its type and first line. An error raised in a DataLoader worker reaches the main process
    with the worker's traceback as its message (torch): the message is the traceback's last line.

    Args:
        err: the exception.

    Returns:
        ``(exit status, message)``; the message has no line breaks.
    """
    from medclust.io.atomic import is_disk_full

    text, name, where = str(err), type(err).__name__, ""
    lines = [line for line in text.splitlines() if line.strip()]
    if "Original Traceback" in text and lines:
        where = " (in a data loader worker)"
        qualified, _, text = lines[-1].partition(": ")
        name = qualified.rsplit(".", 1)[-1]
        known = isinstance(err, MedclustError) or qualified.startswith("medclust.")
    else:
        known = isinstance(err, MedclustError)
    text = " ".join(text.split())
    if known:
        return 2, text + where
    if is_disk_full(err):
        filename = getattr(err, "filename", None)
        return 2, str(DiskFullError(filename or "a file being written", quota="quota" in text.lower())) + where
    if isinstance(err, OSError) and err.filename and err.strerror:
        return 2, f"{err.filename}: {err.strerror}{where}"
    return 1, f"unexpected {name}{where}: {text} (`medclust --verbose ...` shows the traceback)"


if __name__ == "__main__":
    sys.exit(main())
