"""Downstream evaluation: metrics (MONAI), run scoring, bootstrap statistics and the study table.

The names are loaded on first use (:mod:`medclust._lazy`): reading a study table or computing
its statistics does not import torch and MONAI, which scoring a run does.
"""

from medclust._lazy import lazy_exports

_EXPORTS = {
    "FROC_FP_RATES": "metrics",
    "PRIMARY_METRIC": "evaluate_run",
    "VERDICTS": "statistics",
    "Detection": "metrics",
    "Nodule": "metrics",
    "dataset_ranks": "collapse",
    "effective_rank": "collapse",
    "evaluate_run": "evaluate_run",
    "froc": "metrics",
    "match_detections": "metrics",
    "paired_difference": "statistics",
    "read_study_table": "study",
    "roc_auc_per_class": "metrics",
    "run_study": "study",
    "segmentation_scores": "metrics",
    "study_table": "study",
    "summarise": "evaluate_run",
    "summarise_cell": "statistics",
    "t_interval": "statistics",
    "verdict": "statistics",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
