"""Backbones, the MAR model (feature + reference agents) and weight loading."""

from __future__ import annotations

from marreid.models.backbones import ARCHS, build_backbone
from marreid.models.mar import MARModel, build_model
from marreid.models.weights import (
    DEEP_SORT_WEIGHTS,
    LoadReport,
    deep_sort_weights_path,
    load_agents,
    load_backbone_weights,
    read_state_dict,
)

__all__ = [
    "ARCHS",
    "DEEP_SORT_WEIGHTS",
    "LoadReport",
    "MARModel",
    "build_backbone",
    "build_model",
    "deep_sort_weights_path",
    "load_agents",
    "load_backbone_weights",
    "read_state_dict",
]
