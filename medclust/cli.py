"""``medclust <stage> ...``: the command line the Snakemake rules call.

Thin by design: parse arguments, call the stage's API, turn a :class:`MedclustError` into one
line on stderr and exit code 2. ``--verbose`` shows the traceback instead.
Stages register a ``_cmd_<name>(sub)`` function below that adds its parser and sets ``func``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from medclust import __version__
from medclust.errors import MedclustError

log = logging.getLogger("medclust")


def settings_arg(value: str) -> dict[str, Any]:
    """Parse ``--settings``: a JSON object, or ``@path`` to a JSON/YAML file."""
    try:
        if value.startswith("@"):
            return yaml.safe_load(Path(value[1:]).read_text()) or {}
        parsed = json.loads(value)
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise argparse.ArgumentTypeError(f"--settings: cannot parse {value[:80]!r}: {err}") from err
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError("--settings must be a JSON object")
    return parsed


# --- data stage -------------------------------------------------------------------------------
# (fetch-demo, ingest, preprocess, index, drr)

# --- pretraining ------------------------------------------------------------------------------
# (pretrain)

# --- fine-tuning, evaluation, study, report ---------------------------------------------------
# (finetune, evaluate, study, plot)

# --- registry (keep last) ---------------------------------------------------------------------


def _commands() -> list[Callable[[Any], None]]:
    return [obj for name, obj in sorted(globals().items()) if name.startswith("_cmd_") and callable(obj)]


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
    """Entry point of the ``medclust`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        args.func(args)
    except MedclustError as err:
        if args.verbose:
            raise
        print(f"medclust {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"medclust {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
