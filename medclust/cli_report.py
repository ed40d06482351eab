"""``medclust plot-* | verdict-table | method-comparison``: the report's figures and tables.

Sub-commands of :mod:`medclust.cli` (registered there like its own ``_cmd_<name>`` functions);
each reads metrics files, study tables, embeddings or predictions and draws one report item.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medclust.errors import MedclustError


def _add_metrics_plot(sub: Any, name: str, help_text: str, plot: str) -> None:
    """A sub-command that plots the named :mod:`medclust.report` figure from pretraining metrics.csv files."""
    p = sub.add_parser(name, help=help_text)
    p.add_argument("--metrics", type=Path, nargs="+", required=True, help="results/pretrain/{method}/metrics.csv")
    p.add_argument("--out", type=Path, required=True)

    def run(args: argparse.Namespace) -> None:
        from medclust import report

        getattr(report, plot)({m.parent.name: report.read_loss_curve(m) for m in args.metrics}, args.out)

    p.set_defaults(func=run)


def _cmd_plot_loss(sub: Any) -> None:
    _add_metrics_plot(sub, "plot-loss", "pretraining loss curves (PNG)", "plot_loss_curves")


def _cmd_plot_probes(sub: Any) -> None:
    _add_metrics_plot(sub, "plot-probes", "learning-monitor probe curves and effective ranks vs random init (PNG)", "plot_probe_curves")


def _cmd_plot_embeddings(sub: Any) -> None:
    p = sub.add_parser("plot-embeddings", help="2D PCA map of slice/volume embeddings (PNG)")
    p.add_argument("--embeddings", type=Path, required=True, help="results/pretrain/{method}/embeddings.npz")
    p.add_argument("--title", default=None)
    p.add_argument("--out", type=Path, required=True)

    def run(args: argparse.Namespace) -> None:
        from medclust.report import plot_embedding_map, read_embeddings

        title = args.title or f"Validation embeddings, method {args.embeddings.parent.name} (PCA)"
        plot_embedding_map(read_embeddings(args.embeddings), args.out, title)

    p.set_defaults(func=run)


def _cmd_plot_study(sub: Any) -> None:
    p = sub.add_parser("plot-study", help="primary metric vs label fraction per init, or the table (PNG)")
    p.add_argument("--table", type=Path, required=True, help="results/study/{task}.csv")
    p.add_argument("--kind", choices=["curves", "table"], default="curves")
    p.add_argument("--metric", default=None, help="default: the task's primary metric")
    p.add_argument("--out", type=Path, required=True)

    def run(args: argparse.Namespace) -> None:
        from medclust.evaluate import read_study_table
        from medclust.report import plot_study_curves, plot_study_table

        rows = read_study_table(args.table)
        if args.kind == "table":
            plot_study_table(rows, args.out)
        else:
            plot_study_curves(rows, args.out, args.metric)

    p.set_defaults(func=run)


def _cmd_verdict_table(sub: Any) -> None:
    p = sub.add_parser("verdict-table", help="does pretraining help: task x init x fraction verdicts (HTML)")
    p.add_argument("--tables", type=Path, nargs="+", required=True, help="results/study/{task}.csv")
    p.add_argument("--out", type=Path, required=True, help="an HTML fragment (one table)")

    def run(args: argparse.Namespace) -> None:
        from medclust.evaluate import read_study_table
        from medclust.report import write_verdict_table

        write_verdict_table([read_study_table(t) for t in args.tables], args.out)

    p.set_defaults(func=run)


def _cmd_method_comparison(sub: Any) -> None:
    p = sub.add_parser(
        "method-comparison",
        help="every pretraining method side by side: clustering, probes and fine-tuning verdicts (CSV, HTML, PNG)",
        description="One row per method (--methods order, none last): NMI/ARI/Hungarian accuracy and probe scores "
        "per free label from each clustering.json, and per task the primary metric at the smallest label "
        "fraction with its interval and verdict copied from the study tables.",
    )
    p.add_argument("--clustering", type=Path, nargs="+", required=True, help="results/pretrain/{method}/clustering.json")
    p.add_argument("--study", type=Path, nargs="*", default=[], help="results/study/{task}.csv")
    p.add_argument("--methods", nargs="*", default=None, help="config pretrain.methods, for the row order")
    p.add_argument("--out-csv", type=Path, default=None, help="results/report/method_comparison.csv")
    p.add_argument("--out-html", type=Path, default=None, help="results/report/method_comparison.html")
    p.add_argument("--out-png", type=Path, default=None, help="results/report/method_comparison.png")

    def run(args: argparse.Namespace) -> None:
        from medclust.report.method_comparison import load_comparison, write_method_comparison

        comparison = load_comparison(args.clustering, args.study, args.methods)
        write_method_comparison(comparison, args.out_csv, args.out_html, args.out_png)

    p.set_defaults(func=run)


def _run_dirs(paths: Sequence[Path]) -> dict[str, Path]:
    """``{init: run folder}`` from run folders (or files inside them), init read from run.json."""
    out = {}
    for path in paths:
        folder = path if path.is_dir() else path.parent
        out[str(json.loads((folder / "run.json").read_text(encoding="utf-8")).get("init"))] = folder
    return dict(sorted(out.items(), key=lambda kv: (kv[0] != "none", kv[0])))


def _cmd_plot_examples(sub: Any) -> None:
    p = sub.add_parser("plot-examples", help="segmentation overlays or detection examples of runs (PNG)")
    p.add_argument("--runs", type=Path, nargs="+", required=True, help="run folders (one per init), or files in them")
    p.add_argument("--kind", choices=["segmentation", "detection"], required=True)
    p.add_argument("--slices", type=Path, default=None, help="detection: results/slices/{dataset} of the test cases")
    p.add_argument("--n", type=int, default=3, help="slices to show")
    p.add_argument("--out", type=Path, required=True)

    def run(args: argparse.Namespace) -> None:
        from medclust.report import (
            detection_example,
            plot_detection_examples,
            plot_segmentation_overlays,
            segmentation_example,
        )

        runs = _run_dirs(args.runs)
        if args.kind == "segmentation":
            plot_segmentation_overlays(segmentation_example(runs, args.n), args.out)
        else:
            if args.slices is None:
                raise MedclustError("plot-examples --kind detection needs --slices results/slices/{dataset}")
            plot_detection_examples(detection_example(runs, args.slices, args.n), args.out)

    p.set_defaults(func=run)


def _cmd_plot_radiograph(sub: Any) -> None:
    p = sub.add_parser("plot-radiograph", help="a model's predicted label map over the radiograph it came from (PNG)")
    p.add_argument("--predicted", type=Path, required=True, help="predict.json of medclust predict (its first input is shown)")
    p.add_argument("--model", type=Path, required=True, help="the fine-tuning run folder (class names)")
    p.add_argument("--title", default="", help="figure title")
    p.add_argument("--out", type=Path, required=True)

    def run(args: argparse.Namespace) -> None:
        from medclust.report.radiograph_overlay import first_prediction, model_classes, plot_radiograph_prediction

        image, labels = first_prediction(args.predicted)
        plot_radiograph_prediction(image, labels, model_classes(args.model), args.out, args.title)

    p.set_defaults(func=run)


# evaluation, study and report figures (end) ---

# applying and sharing models (begin) ---
