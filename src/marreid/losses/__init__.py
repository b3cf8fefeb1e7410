"""MAR's losses: pure functions for each equation and the stateful pieces as modules."""

from __future__ import annotations

from marreid.losses.agents import (
    agent_loss,
    agent_products,
    joint_embedding_loss,
    joint_embedding_terms,
    reference_agent_loss,
    squared_distances,
)
from marreid.losses.cml import LogMultilabelStats, camera_shares, cml_loss, cml_per_camera, per_camera_stats
from marreid.losses.mdl import AgreementThreshold, MiningStats, MultilabelMemory, mdl_loss, mine_pairs
from marreid.losses.multilabel import (
    agreement_top_quantile,
    log_soft_multilabel,
    pair_agreements,
    pair_count,
    pairwise_agreement,
    soft_multilabel,
    top_count,
    top_quantile,
    upcast,
)
from marreid.losses.total import POSITIVE_RULES, MARLoss, one_hot_rows

__all__ = [
    "POSITIVE_RULES",
    "AgreementThreshold",
    "LogMultilabelStats",
    "MARLoss",
    "MiningStats",
    "MultilabelMemory",
    "agent_loss",
    "agent_products",
    "agreement_top_quantile",
    "camera_shares",
    "cml_loss",
    "cml_per_camera",
    "joint_embedding_loss",
    "joint_embedding_terms",
    "log_soft_multilabel",
    "mdl_loss",
    "mine_pairs",
    "one_hot_rows",
    "pair_agreements",
    "pair_count",
    "pairwise_agreement",
    "per_camera_stats",
    "reference_agent_loss",
    "soft_multilabel",
    "squared_distances",
    "top_count",
    "top_quantile",
    "upcast",
]
