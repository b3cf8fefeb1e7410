"""AdaBN (Li et al., "Adaptive Batch Normalization for practical domain adaptation", Pattern
Recognition 2018): BatchNorm running statistics recomputed on target images, no weight changed.

It is the cheapest label-free adaptation there is, so it is the baseline that tells how much of a
training method's gain is BatchNorm statistics moving to the new camera network rather than
learning from the target losses.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

_BatchNorm = nn.modules.batchnorm._BatchNorm


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device | str = "cpu") -> int:
    """Replace every BatchNorm layer's running mean and variance by their average over ``batches``.

    Each layer's statistics are reset and then accumulated with ``momentum=None`` (PyTorch's
    cumulative moving average), so after n batches they are the unweighted mean of the n
    batch means and of the n unbiased batch variances (Li et al. Alg. 1 with batch
    statistics averaged). Only BatchNorm layers run in training mode; weights, momenta and
    the model's train / eval mode are left as they were. Returns the number of batches.
    """
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not layers:
        raise ValueError("the model has no BatchNorm layer with running statistics to recompute")
    was_training = model.training
    momenta = [m.momentum for m in layers]
    count = 0
    try:
        model.eval()
        for layer in layers:
            layer.reset_running_stats()
            layer.momentum = None
            layer.train()
        for images in batches:
            model(images.to(device, non_blocking=True))
            count += 1
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        model.train(was_training)
    if count == 0:
        raise ValueError("no images to recompute the BatchNorm statistics from")
    return count


__all__ = ["recompute_batchnorm"]
