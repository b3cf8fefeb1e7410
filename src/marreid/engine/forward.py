"""How a training step's images are cut into BatchNorm batches.

The authors' release runs two forward passes per step, ``net(auxiliary)`` then
``net(target)``, under a 4-GPU ``nn.DataParallel`` without synchronised
BatchNorm: every BatchNorm batch holds 46 images of *one* camera network, and
the running statistics that survive each pass are those of replica 0, i.e. of
the first 46 images. ``train.forward`` chooses between that (``per_domain``)
and one concatenated pass over both domains (``joint``); ``train.bn_batch``
sets the images per BatchNorm batch within a domain (None: the domain's whole
global batch; 46 for the release's 4 GPUs).

The groups are a property of the global batch, not of the hardware: under
torchrun each rank runs the groups of its slice, and only the first group of
each domain (on rank 0) updates the running statistics, which DDP broadcasts
from rank 0. So weights and running statistics do not change with the number of
processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from marreid.errors import ConfigError

Tensor = torch.Tensor


@dataclass(frozen=True)
class BatchNormGroups:
    """Consecutive row groups of one forward call: ``sizes[i]`` rows normalised together,
    ``update[i]`` whether that group moves the running statistics, ``grad[i]`` whether its
    outputs are recorded for backward (None: all are)."""

    sizes: tuple[int, ...]
    update: tuple[bool, ...]
    grad: tuple[bool, ...] | None = None

    def without_grad_from(self, row: int) -> BatchNormGroups:
        """These groups with the ones starting at or after ``row`` run without autograd: their
        outputs feed no loss term (the target pass of an epoch with only auxiliary terms), so
        backward need not run through them. A group straddling ``row`` keeps its graph."""
        starts = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        return BatchNormGroups(self.sizes, self.update, tuple(start < row for start in starts))


def plan_groups(n_aux: int, n_target: int, forward: str, bn_batch: int | None, rank: int = 0,
                world_size: int = 1, keys: tuple[str, str] = ("train.aux_batch", "train.target_batch")
                ) -> BatchNormGroups:
    """The BatchNorm groups of one rank's ``[auxiliary rows; target rows]``.

    ``joint``: one group of everything. ``per_domain``: each domain cut into groups of
    ``bn_batch`` rows (or one group per domain when ``bn_batch`` is None); the running
    statistics follow the first group of each domain, auxiliary then target, as the
    release's replica 0 does. ``n_aux`` / ``n_target`` are this rank's slice sizes; a
    domain without rows (a method that draws no auxiliary batch) has no group. ``keys``
    name the options that set the two batch sizes, for the error messages.

    >>> plan_groups(4, 4, "per_domain", 2)
    BatchNormGroups(sizes=(2, 2, 2, 2), update=(True, False, True, False))
    """
    if forward == "joint":
        return BatchNormGroups((n_aux + n_target,), (True,))
    if forward != "per_domain":
        raise ConfigError(f"train.forward: expected per_domain or joint, got {forward!r}")
    if bn_batch is None:
        if world_size > 1:
            raise ConfigError("train.bn_batch must be set under torchrun with train.forward=per_domain, so that "
                              "BatchNorm batches do not depend on the process count (46: the release's 4 GPUs)")
        sizes = tuple(rows for rows in (n_aux, n_target) if rows)
        return BatchNormGroups(sizes, (True,) * len(sizes))
    sizes: list[int] = []
    update: list[bool] = []
    for name, rows in zip(keys, (n_aux, n_target)):
        if rows % bn_batch:
            where = f"of each of the {world_size} ranks" if world_size > 1 else "of a step"
            raise ConfigError(f"train.bn_batch={bn_batch} does not divide the {rows} {name} images {where}")
        count = rows // bn_batch
        sizes += [bn_batch] * count
        update += [rank == 0 and i == 0 for i in range(count)]
    return BatchNormGroups(tuple(sizes), tuple(update))


@contextmanager
def running_stats_frozen(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers of ``model`` normalise with their batch's statistics but leave the
    running statistics (and ``num_batches_tracked``) untouched.

    In training mode a BatchNorm that does not track running statistics uses the batch's
    statistics and updates nothing, which is what a DataParallel replica other than 0 does.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


class GroupedForward(nn.Module):
    """``model`` run over consecutive row groups in one call, each group its own BatchNorm batch.

    One call, so DistributedDataParallel wraps it as it wraps the model: each parameter's
    gradient (summed over the groups by autograd) is reduced once per step. The outputs
    of the groups are concatenated in order, so the result lines up with the input rows.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, groups: BatchNormGroups) -> tuple[Tensor, ...]:
        if sum(groups.sizes) != len(images):
            raise ValueError(f"groups cover {sum(groups.sizes)} rows, the batch has {len(images)}")
        grad = groups.grad or (True,) * len(groups.sizes)
        if len(groups.sizes) == 1:
            return self._run(images, groups.update[0], grad[0])
        chunks = images.split(list(groups.sizes))
        outputs = [self._run(chunk, update, g) for chunk, update, g in zip(chunks, groups.update, grad)]
        return tuple(torch.cat(parts) for parts in zip(*outputs))

    def _run(self, images: Tensor, update: bool, grad: bool) -> tuple[Tensor, ...]:
        with nullcontext() if update else running_stats_frozen(self.model), torch.set_grad_enabled(
                grad and torch.is_grad_enabled()):
            return self.model(images)


__all__ = ["BatchNormGroups", "plan_groups", "running_stats_frozen", "GroupedForward"]
