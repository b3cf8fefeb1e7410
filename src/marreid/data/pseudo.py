"""Identity-balanced target batches from pseudo labels, for cluster contrast (Dai et al. 2021).

Each step takes P = batch_size / instances distinct pseudo identities and ``instances``
images of each, drawn from ``(seed, epoch, step)`` alone, with every image's augmentation
seeded by ``sample_seed``: a run resumed at any step sees the same batches and pixels, as with
``loaders.PairedBatches``.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from marreid.data.loaders import Batch, ImageDataset, make_loader, sample_seed
from marreid.errors import ConfigError

# Streams of loaders.py are 0 (auxiliary), 1 (target), 2 (initialisation pass).
PSEUDO_STREAM = 3


class PseudoLabelBatches:
    """Batches of ``target`` images grouped by pseudo label: P identities x K instances a step.

    Step s of epoch e draws, with ``np.random.default_rng([seed, PSEUDO_STREAM, e, s])``,
    P distinct clusters (in the drawn order) and then, cluster by cluster, K of its images,
    without replacement when the cluster holds at least K, else with replacement. Outliers
    (label -1) are never drawn. The release's sampler also prefers other cameras than the
    first image's; this one does not look at cameras. Under DistributedDataParallel rank
    ``rank`` gets the ``rank``-th equal slice of each global batch (same indices, same
    augmentation seeds), so the ranks together see what one process would.

    ``iterate`` yields ``(step, None, target_batch)``, the target batch being the collated
    ``(images, pids, camids, indices)`` of ``PairedBatches``; ``pids`` are the file names'
    identities (diagnostics only), the pseudo labels are ``labels[indices]``.
    """

    def __init__(
        self,
        target: ImageDataset,
        labels: np.ndarray,
        batch_size: int,
        instances: int,
        steps_per_epoch: int,
        seed: int,
        num_workers: int = 0,
        pin_memory: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        labels = np.asarray(labels)
        if labels.shape != (len(target),) or not np.issubdtype(labels.dtype, np.integer):
            raise ConfigError(f"pseudo labels must be {len(target)} integers (one per target image), "
                              f"got {labels.dtype} {labels.shape}")
        if seed < 0:
            raise ConfigError(f"seed must be >= 0, not {seed}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside 0..{world_size - 1}")
        if instances < 1 or batch_size < 1 or batch_size % instances:
            raise ConfigError(f"batch_size={batch_size} must be a positive multiple of instances={instances}")
        if batch_size % world_size:
            raise ConfigError(f"batch_size={batch_size} cannot be split evenly over {world_size} ranks")
        if steps_per_epoch < 1:
            raise ConfigError(f"steps_per_epoch={steps_per_epoch} must be >= 1")
        clusters, sizes = np.unique(labels[labels >= 0], return_counts=True)
        if len(clusters) < batch_size // instances:
            raise ConfigError(f"a batch of {batch_size} = {batch_size // instances} identities x {instances} needs "
                              f"{batch_size // instances} pseudo identities, the clustering found {len(clusters)}")
        self.target = target
        self.batch_size, self.instances = batch_size, instances
        self.steps_per_epoch = steps_per_epoch
        self.seed, self.num_workers, self.pin_memory = seed, num_workers, pin_memory
        self.rank, self.world_size = rank, world_size
        # members[k]: the target indices of cluster clusters[k], ascending.
        by_label = np.argsort(labels, kind="stable")
        starts = np.searchsorted(labels[by_label], clusters)
        self.members = [by_label[s : s + n] for s, n in zip(starts, sizes)]

    def __len__(self) -> int:
        return self.steps_per_epoch

    def batch_indices(self, epoch: int, step: int) -> list[int]:
        """The global batch of ``step`` in ``epoch`` (all ranks), identity by identity."""
        rng = np.random.default_rng([self.seed, PSEUDO_STREAM, epoch, step])
        chosen = rng.choice(len(self.members), self.batch_size // self.instances, replace=False)
        draws = [
            rng.choice(self.members[k], self.instances, replace=len(self.members[k]) < self.instances)
            for k in chosen
        ]
        return np.concatenate(draws).tolist()

    def step_items(self, epoch: int, step: int) -> list[tuple[int, int]]:
        """This rank's ``(index, seed)`` items of one step."""
        share = self.batch_size // self.world_size
        items = [
            (index, sample_seed(self.seed, epoch, step, slot, PSEUDO_STREAM))
            for slot, index in enumerate(self.batch_indices(epoch, step))
        ]
        return items[self.rank * share : (self.rank + 1) * share]

    def iterate(self, epoch: int, start_step: int = 0) -> Iterator[tuple[int, None, Batch]]:
        """Yield ``(step, None, target_batch)`` for steps ``start_step .. steps_per_epoch - 1``."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ConfigError(f"start_step={start_step} outside 0..{self.steps_per_epoch}")
        steps = range(start_step, self.steps_per_epoch)
        loader = make_loader(
            self.target,
            self.num_workers,
            self.pin_memory,
            batch_sampler=[self.step_items(epoch, step) for step in steps],
        )
        for step, batch in zip(steps, loader):
            yield step, None, batch


__all__ = ["PSEUDO_STREAM", "PseudoLabelBatches"]
