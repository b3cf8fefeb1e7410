"""Datasets on disk: samples, readers for each layout, and their summary.

Transforms and loaders (which import torch) live in ``marreid.data.transforms``
and ``marreid.data.loaders``; import them from there.
"""

from __future__ import annotations

from marreid.data.registry import DATASET_FORMATS, detect_format, load_dataset
from marreid.data.sample import ReidDataset, Sample, pool_splits, relabel
from marreid.data.summary import format_summary, summarize

__all__ = [
    "DATASET_FORMATS",
    "ReidDataset",
    "Sample",
    "detect_format",
    "format_summary",
    "load_dataset",
    "pool_splits",
    "relabel",
    "summarize",
]
