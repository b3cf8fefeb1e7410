"""Index-aware image datasets and the seeded, resumable batch streams built on them.

Every training sample is fetched as ``(index, seed)``: the order of the
samples and the seed of each sample's augmentation are worked out in the main
process from ``(seed, epoch, step)`` alone, so a run resumed at any step, with
any number of workers, sees the same batches and the same pixels.
"""

from __future__ import annotations

import hashlib
import signal
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate

from marreid.data.sample import Sample
from marreid.errors import ConfigError, DatasetError

AUX_STREAM = 0
TARGET_STREAM = 1
INIT_STREAM = 2  # the order of the release's initialisation pass (augmented_pass_loader)
SEED_MASK = (1 << 64) - 1
# what PIL raises on an unreadable, truncated or hostile file
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def sample_seed(base_seed: int, epoch: int, step: int, slot: int, stream: int) -> int:
    """Seed of one sample's augmentation: a stable 63-bit mix of its coordinates.

    BLAKE2b (8-byte digest) over the five values written as little-endian
    64-bit words (two's complement), read little-endian and shifted right by
    one bit. Unlike ``hash()`` it is the same in every process and run.
    ``slot`` is the position in the batch, ``stream`` 0 auxiliary / 1 target.
    """
    words = b"".join((v & SEED_MASK).to_bytes(8, "little") for v in (base_seed, epoch, step, slot, stream))
    return int.from_bytes(hashlib.blake2b(words, digest_size=8).digest(), "little") >> 1


def decode_image(path: str) -> Image.Image:
    """Fully decode the image at ``path`` as RGB (raises PIL's own errors)."""
    with Image.open(path) as img:
        img.load()
        return img.convert("RGB")


def read_image(path: str) -> Image.Image:
    """``decode_image``, with any failure turned into a DatasetError naming the file."""
    try:
        return decode_image(path)
    except IMAGE_ERRORS as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from None


def _decode_failure(path: str) -> str | None:
    """Why ``decode_image`` fails on ``path`` (its first line), or None when it decodes."""
    try:
        decode_image(path)
    except IMAGE_ERRORS as exc:
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return None


def find_bad_images(samples: Sequence[Sample], workers: int = 1) -> list[tuple[str, str]]:
    """(path, reason) for every sample whose image cannot be decoded as training reads it, in order.

    ``workers`` threads decode in parallel (PIL releases the GIL while decoding).
    """
    paths = [s.path for s in samples]
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            reasons = list(pool.map(_decode_failure, paths, chunksize=64))
    else:
        reasons = [_decode_failure(p) for p in paths]
    return [(p, r) for p, r in zip(paths, reasons) if r is not None]


class ImageDataset(Dataset):
    """Samples as ``(image, pid, camid, index)``; ``item`` is an index or ``(index, seed)``."""

    def __init__(self, samples: Sequence[Sample], transform: Callable[[Image.Image, int | None], torch.Tensor]):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int, int, int]:
        index, seed = item if isinstance(item, tuple) else (item, None)
        sample = self.samples[index]
        return self.transform(read_image(sample.path), seed), sample.pid, sample.camid, index


def one_line(exc: DatasetError) -> DatasetError:
    """A worker's DatasetError carries the whole worker traceback; keep its last line's message."""
    lines = str(exc).strip().splitlines()
    if len(lines) <= 1:
        return exc
    prefix = f"{DatasetError.__module__}.{DatasetError.__qualname__}: "
    return DatasetError(lines[-1].removeprefix(prefix))


class ReidDataLoader(DataLoader):
    """A DataLoader whose DatasetErrors stay one line when raised in a worker."""

    def __iter__(self) -> Iterator[Any]:
        try:
            yield from super().__iter__()
        except DatasetError as exc:
            # the traceback keeps the worker iterator in a reference cycle; dropping it
            # shuts the workers down now rather than at a later garbage collection (~5 s)
            raise one_line(exc.with_traceback(None)) from None


def ignore_stop_signals(worker_id: int) -> None:
    """Worker init: leave SIGINT / SIGTERM to the main process.

    A terminal's Ctrl-C or a scheduler's SIGTERM reaches the whole process group;
    a worker that died of it would break the batch the main process is finishing
    before its checkpoint. The main process shuts the workers down itself.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(dataset: Dataset, num_workers: int, pin_memory: bool, **kwargs: Any) -> ReidDataLoader:
    """A loader with its own generator, so creating it never consumes torch's global RNG;
    its workers ignore the stop signals (``ignore_stop_signals``)."""
    return ReidDataLoader(
        dataset,
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(0),
        worker_init_fn=ignore_stop_signals if num_workers > 0 else None,
        **kwargs,
    )


def plain_loader(
    samples: Sequence[Sample],
    transform: Callable[[Image.Image, int | None], torch.Tensor],
    batch_size: int,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> ReidDataLoader:
    """Batches of ``samples`` in order, the last one possibly short (feature extraction)."""
    return make_loader(
        ImageDataset(samples, transform), num_workers, pin_memory, batch_size=batch_size, shuffle=False
    )


def augmented_pass_loader(
    samples: Sequence[Sample],
    transform: Callable[[Image.Image, int | None], torch.Tensor],
    seed: int,
    drop_to: int,
    batch_size: int,
    num_workers: int = 0,
) -> ReidDataLoader:
    """One seeded shuffled pass over ``samples`` with ``transform`` (training augmentation),
    cut to a whole number of ``drop_to``-image batches as a ``drop_last`` loader would;
    yielded in batches of ``batch_size``. The order and every sample's augmentation
    follow from ``seed`` alone (augmentation: ``sample_seed`` with epoch -1, the pass
    before training)."""
    order = np.random.default_rng([seed, INIT_STREAM]).permutation(len(samples))
    order = order[: len(samples) // drop_to * drop_to]
    items = [(int(index), sample_seed(seed, -1, 0, slot, TARGET_STREAM)) for slot, index in enumerate(order)]
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    return make_loader(ImageDataset(samples, transform), num_workers, False, batch_sampler=batches)


class _PairedItems(Dataset):
    """Items ``(stream, index, seed)`` of the auxiliary (0) or target (1) dataset."""

    def __init__(self, aux: ImageDataset, target: ImageDataset | None):
        self.sets = (aux, target)

    def __getitem__(self, item: tuple[int, int, int]) -> tuple[torch.Tensor, int, int, int]:
        stream, index, seed = item
        return self.sets[stream][(index, seed)]


class _SplitCollate:
    """Collate the first ``aux_batch`` items and the rest (the target's) separately."""

    def __init__(self, aux_batch: int):
        self.aux_batch = aux_batch

    def __call__(self, items: list[tuple]) -> tuple[Batch, Batch | None]:
        target = items[self.aux_batch :]
        return default_collate(items[: self.aux_batch]), default_collate(target) if target else None


class PairedBatches:
    """MAR's batches: an auxiliary batch and a target batch per step.

    An epoch is one pass over ``aux`` in a seeded order (``len(aux) // aux_batch``
    steps, the rest dropped). The target set runs in passes of its own,
    ``target_order(k)`` giving the index order of pass ``k`` (default: a seeded
    permutation), each cut into whole batches and restarted when spent, so the
    target batch of global step ``g = epoch * steps_per_epoch + step`` depends
    only on ``(seed, g)``. ``target=None`` (pretraining) yields ``None`` as
    the target batch. Each batch is the collated ``(images, pids, camids, indices)``.
    Under DistributedDataParallel, rank ``rank`` of ``world_size`` gets the
    ``rank``-th equal slice of each stream of the global batch (same indices,
    same augmentation seeds), so the ranks together see what one process would.
    """

    def __init__(
        self,
        aux: ImageDataset,
        target: ImageDataset | None,
        aux_batch: int,
        target_batch: int,
        seed: int,
        num_workers: int = 0,
        target_order: Callable[[int], Sequence[int]] | None = None,
        pin_memory: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if seed < 0:
            raise ConfigError(f"seed must be >= 0, not {seed}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside 0..{world_size - 1}")
        for name, size in (("aux_batch", aux_batch), ("target_batch", target_batch if target is not None else 0)):
            if size % world_size:
                raise ConfigError(f"{name}={size} cannot be split evenly over {world_size} ranks")
        if aux_batch < 1 or aux_batch > len(aux):
            raise ConfigError(f"aux_batch={aux_batch} must be between 1 and the auxiliary set's {len(aux)} images")
        if target is not None and target_batch < 1:
            raise ConfigError(f"target_batch={target_batch} must be >= 1")
        self.aux, self.target = aux, target
        self.aux_batch, self.target_batch = aux_batch, target_batch
        self.seed, self.num_workers, self.pin_memory = seed, num_workers, pin_memory
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = len(aux) // aux_batch
        self.target_order = target_order or self.default_target_order
        self._pass_lengths: list[int] = []
        self._cached_pass: tuple[int, Sequence[int]] | None = None
        self._cached_epoch: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.steps_per_epoch

    def aux_indices(self, epoch: int, step: int) -> list[int]:
        """Auxiliary indices of ``step`` in ``epoch``."""
        if self._cached_epoch is None or self._cached_epoch[0] != epoch:
            order = np.random.default_rng([self.seed, AUX_STREAM, epoch]).permutation(len(self.aux))
            self._cached_epoch = (epoch, order)
        return self._cached_epoch[1][step * self.aux_batch : (step + 1) * self.aux_batch].tolist()

    def default_target_order(self, k: int) -> Sequence[int]:
        """Pass ``k`` over the target set: a permutation seeded by ``(seed, k)``."""
        return np.random.default_rng([self.seed, TARGET_STREAM, k]).permutation(len(self.target)).tolist()

    def _target_pass(self, k: int) -> Sequence[int]:
        if self._cached_pass is None or self._cached_pass[0] != k:
            self._cached_pass = (k, self.target_order(k))
        return self._cached_pass[1]

    def _batches_in_pass(self, k: int) -> int:
        while len(self._pass_lengths) <= k:
            k_new = len(self._pass_lengths)
            count = len(self._target_pass(k_new)) // self.target_batch
            if count == 0:
                raise ConfigError(f"target_batch={self.target_batch} is larger than target pass {k_new}")
            self._pass_lengths.append(count)
        return self._pass_lengths[k]

    def target_indices(self, global_step: int) -> list[int]:
        """Target indices of global step ``global_step``."""
        k, j = 0, global_step
        while j >= self._batches_in_pass(k):
            j -= self._batches_in_pass(k)
            k += 1
        order = self._target_pass(k)
        return [int(i) for i in order[j * self.target_batch : (j + 1) * self.target_batch]]

    def _rank_slice(self, items: list) -> list:
        share = len(items) // self.world_size
        return items[self.rank * share : (self.rank + 1) * share]

    def step_items(self, epoch: int, step: int) -> list[tuple[int, int, int]]:
        """This rank's ``(stream, index, seed)`` items of one step: auxiliary first, then target."""
        items = self._rank_slice([
            (AUX_STREAM, index, sample_seed(self.seed, epoch, step, slot, AUX_STREAM))
            for slot, index in enumerate(self.aux_indices(epoch, step))
        ])
        if self.target is not None:
            items += self._rank_slice([
                (TARGET_STREAM, index, sample_seed(self.seed, epoch, step, slot, TARGET_STREAM))
                for slot, index in enumerate(self.target_indices(epoch * self.steps_per_epoch + step))
            ])
        return items

    def iterate(self, epoch: int, start_step: int = 0) -> Iterator[tuple[int, Batch, Batch | None]]:
        """Yield ``(step, aux_batch, target_batch)`` for steps ``start_step .. steps_per_epoch - 1``."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ConfigError(f"start_step={start_step} outside 0..{self.steps_per_epoch}")
        steps = range(start_step, self.steps_per_epoch)
        loader = make_loader(
            _PairedItems(self.aux, self.target),
            self.num_workers,
            self.pin_memory,
            batch_sampler=[self.step_items(epoch, step) for step in steps],
            collate_fn=_SplitCollate(self.aux_batch // self.world_size),
        )
        for step, (aux_batch, target_batch) in zip(steps, loader):
            yield step, aux_batch, target_batch
