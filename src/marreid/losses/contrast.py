"""Cluster contrast's loss (Dai et al., "Cluster Contrast for Unsupervised Person
Re-Identification", 2021): InfoNCE of each feature against the centres of its pseudo-label clusters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from marreid.losses.multilabel import upcast

Tensor = torch.Tensor


def cluster_nce(features: Tensor, labels: Tensor, centres: Tensor, temperature: float = 0.05) -> Tensor:
    """Dai et al. Eq. 3, L = mean_i -log( exp(<f_i, c_{y_i}> / tau) / sum_c exp(<f_i, c> / tau) ).

    The cross-entropy of ``features @ centres.T / tau`` with the pseudo labels. The centres are
    constants (detached), as in the release's ``ClusterMemory``, whose centres change only by
    the momentum update: the gradient reaches the features alone,
    dL/df_i = (softmax_i - onehot(y_i)) @ centres / (tau * B). Half-precision inputs are
    widened and the product is taken outside autocast, so the loss is float32 (or float64)
    under mixed precision. The release L2-normalises the features first; pass unit rows
    (``MARModel``'s features are).

    Parameters
    ----------
    features : Tensor
        ``[B, D]`` features of the batch.
    labels : Tensor
        ``[B]`` integer pseudo labels in 0..C-1.
    centres : Tensor
        ``[C, D]`` cluster centres (``ClusterMemory.centres``).
    temperature : float
        tau; 0.05 in the paper.
    """
    if features.dim() != 2 or centres.dim() != 2 or features.shape[1] != centres.shape[1]:
        raise ValueError(f"features {tuple(features.shape)} and centres {tuple(centres.shape)} "
                         "must be [B, D] and [C, D]")
    if labels.shape != features.shape[:1] or labels.dtype.is_floating_point:
        raise ValueError(f"labels must be {features.shape[0]} integers, got {tuple(labels.shape)} {labels.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    if len(labels):
        low, high = torch.stack(torch.aminmax(labels)).tolist()  # one device sync
        if low < 0 or high >= centres.shape[0]:
            raise ValueError(f"pseudo labels {low}..{high} fall outside the {centres.shape[0]} cluster centres")
    with torch.autocast(features.device.type, enabled=False):
        f = upcast(features)
        logits = f @ upcast(centres.detach()).to(f.dtype).T / temperature
        return F.cross_entropy(logits, labels.long())


__all__ = ["cluster_nce"]
