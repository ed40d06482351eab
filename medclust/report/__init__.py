"""Report figures (matplotlib, Agg) and the loaders that feed them from the workflow's files."""

from medclust.report.data import (
    detection_example,
    read_embeddings,
    read_loss_curve,
    segmentation_example,
)
from medclust.report.plots import (
    pca_2d,
    plot_detection_examples,
    plot_embedding_map,
    plot_loss_curves,
    plot_segmentation_overlays,
)
from medclust.report.probe_plots import plot_probe_curves
from medclust.report.study_plots import plot_study_curves, plot_study_table
from medclust.report.verdicts import verdict_table_html, write_verdict_table

__all__ = [
    "detection_example",
    "pca_2d",
    "plot_detection_examples",
    "plot_embedding_map",
    "plot_loss_curves",
    "plot_probe_curves",
    "plot_segmentation_overlays",
    "plot_study_curves",
    "plot_study_table",
    "read_embeddings",
    "read_loss_curve",
    "segmentation_example",
    "verdict_table_html",
    "write_verdict_table",
]
