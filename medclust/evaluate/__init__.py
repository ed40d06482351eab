"""Downstream evaluation: metrics (MONAI), run scoring, bootstrap statistics and the study table."""

from medclust.evaluate.collapse import dataset_ranks, effective_rank
from medclust.evaluate.evaluate_run import PRIMARY_METRIC, evaluate_run, summarise
from medclust.evaluate.metrics import (
    FROC_FP_RATES,
    Detection,
    Nodule,
    froc,
    match_detections,
    roc_auc_per_class,
    segmentation_scores,
)
from medclust.evaluate.statistics import VERDICTS, paired_difference, summarise_cell, t_interval, verdict
from medclust.evaluate.study import read_study_table, run_study, study_table

__all__ = [
    "FROC_FP_RATES",
    "PRIMARY_METRIC",
    "VERDICTS",
    "Detection",
    "Nodule",
    "dataset_ranks",
    "effective_rank",
    "evaluate_run",
    "froc",
    "match_detections",
    "paired_difference",
    "read_study_table",
    "roc_auc_per_class",
    "run_study",
    "segmentation_scores",
    "study_table",
    "summarise",
    "summarise_cell",
    "t_interval",
    "verdict",
]
