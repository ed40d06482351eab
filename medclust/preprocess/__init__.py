"""Ingest + QC, preprocessing into the slice store, index and splits, radiograph simulation."""

from medclust.preprocess.drr import DrrRenderer, hu_to_attenuation, render_drr
from medclust.preprocess.drr_dataset import simulate_drr_dataset
from medclust.preprocess.index import build_index, make_splits, write_index_and_splits
from medclust.preprocess.ingest import check_case, ingest_dataset, read_cases
from medclust.preprocess.pipeline import PreprocessSettings, preprocess_case, preprocess_image

__all__ = [
    "DrrRenderer",
    "PreprocessSettings",
    "build_index",
    "check_case",
    "hu_to_attenuation",
    "ingest_dataset",
    "make_splits",
    "preprocess_case",
    "preprocess_image",
    "read_cases",
    "render_drr",
    "simulate_drr_dataset",
    "write_index_and_splits",
]
