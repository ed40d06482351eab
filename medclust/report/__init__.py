"""Report figures (matplotlib, Agg) and the loaders that feed them from the workflow's files.

The names are loaded on first use (:mod:`medclust._lazy`): a study plot does not import the
probe plots' data pipeline (torch, MONAI).
"""

from medclust._lazy import lazy_exports

_EXPORTS = {
    "detection_example": "data",
    "pca_2d": "plots",
    "plot_detection_examples": "plots",
    "plot_embedding_map": "plots",
    "plot_loss_curves": "plots",
    "plot_probe_curves": "probe_plots",
    "plot_segmentation_overlays": "plots",
    "plot_study_curves": "study_plots",
    "plot_study_table": "study_plots",
    "read_embeddings": "data",
    "read_loss_curve": "data",
    "segmentation_example": "data",
    "verdict_table_html": "verdicts",
    "write_verdict_table": "verdicts",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
