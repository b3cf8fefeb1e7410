"""Re-ID evaluation: distances, CMC / mAP (Market-1501 protocol), CUHK03 single-shot CMC, top-k search,
k-reciprocal Jaccard distance and re-ranking."""

from __future__ import annotations

from marreid.metrics.cuhk03 import SingleShotResult, evaluate_cuhk03_single_shot
from marreid.metrics.distance import METRICS, compute_distance_matrix
from marreid.metrics.rank import (
    AP_RULES,
    RankResult,
    evaluate_features,
    evaluate_rank,
    evaluate_rank_detailed,
)
from marreid.metrics.rerank import k_reciprocal_jaccard, rerank
from marreid.metrics.search import BACKENDS, topk_search

__all__ = [
    "AP_RULES",
    "BACKENDS",
    "METRICS",
    "RankResult",
    "SingleShotResult",
    "compute_distance_matrix",
    "evaluate_cuhk03_single_shot",
    "evaluate_features",
    "evaluate_rank",
    "evaluate_rank_detailed",
    "k_reciprocal_jaccard",
    "rerank",
    "topk_search",
]
