"""Cluster contrast's memory of cluster centres (Dai et al. 2021, the release's ``ClusterMemory``)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from marreid.errors import ConfigError, TrainingError

Tensor = torch.Tensor


class ClusterMemory(nn.Module):
    """One L2-normalised centre per pseudo-label cluster, ``centres`` ``[C, D]`` (C = 0 until ``reset``).

    ``reset`` loads the centroids after each clustering (C changes from epoch to epoch);
    ``update`` moves the centres of a batch's clusters toward its features, as the release's
    ``CM.backward``: c_y <- m c_y + (1 - m) f, then c_y <- c_y / ||c_y||, feature by feature in
    batch order, ``momentum`` m weighting the old centre (0.1 in the paper).
    """

    centres: Tensor

    def __init__(self, feat_dim: int, momentum: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ConfigError(f"cluster memory momentum={momentum!r} must be in [0, 1]")
        self.feat_dim = feat_dim
        self.momentum = momentum
        self.register_buffer("centres", torch.zeros(0, feat_dim))

    @property
    def num_clusters(self) -> int:
        return self.centres.shape[0]

    @torch.no_grad()
    def reset(self, centres: Tensor) -> None:
        """Replace the memory by ``centres`` ``[C, D]``, rows L2-normalised (the buffer keeps its device and dtype)."""
        if centres.dim() != 2 or centres.shape[1] != self.feat_dim:
            raise ValueError(f"centres must be [C, {self.feat_dim}], got {tuple(centres.shape)}")
        if centres.shape[0] == 0:
            raise TrainingError("the clustering found no cluster (every image an outlier): no centre to train against")
        rows = F.normalize(centres.detach().to(self.centres.dtype), dim=1)
        self.centres = rows.to(self.centres.device)

    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor) -> None:
        """c_y <- normalise(m c_y + (1 - m) f) for each (f, y) of the batch, in batch order.

        A cluster met k times is updated k times in a row. The batch is walked in rounds: round r
        takes the r-th occurrence of every label at once (distinct rows, so the order between them
        does not matter), which gives the per-feature loop's result in as many rounds as the
        largest number of images of one cluster in the batch.
        """
        if features.dim() != 2 or features.shape[1] != self.feat_dim or labels.shape != features.shape[:1]:
            raise ValueError(f"features {tuple(features.shape)} and labels {tuple(labels.shape)} must be "
                             f"[B, {self.feat_dim}] and [B]")
        if len(labels) == 0:
            return
        labels = labels.to(self.centres.device).long()
        low, high = torch.stack(torch.aminmax(labels)).tolist()
        if low < 0 or high >= self.num_clusters:
            raise ValueError(f"pseudo labels {low}..{high} fall outside the memory's {self.num_clusters} clusters")
        features = features.detach().to(self.centres.device, self.centres.dtype)
        order = torch.sort(labels, stable=True).indices
        sorted_labels = labels[order]
        first = torch.searchsorted(sorted_labels, sorted_labels)  # where each label's run begins
        occurrence = torch.empty_like(labels)
        occurrence[order] = torch.arange(len(labels), device=labels.device) - first
        for r in range(int(occurrence.max()) + 1):
            rows = occurrence == r
            y = labels[rows]
            moved = self.momentum * self.centres[y] + (1.0 - self.momentum) * features[rows]
            self.centres[y] = F.normalize(moved, dim=1)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # The number of clusters changes every epoch: take the saved one before the size check.
        saved = state_dict.get(prefix + "centres")
        if isinstance(saved, Tensor) and saved.dim() == 2 and saved.shape[1] == self.feat_dim:
            self.centres = self.centres.new_empty(saved.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


__all__ = ["ClusterMemory"]
