"""PseudoLabelBatches: identity-balanced, seeded per (seed, epoch, step), resumable, sliced by rank."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from marreid.data import Sample
from marreid.data.loaders import ImageDataset, sample_seed
from marreid.data.pseudo import PSEUDO_STREAM, PseudoLabelBatches
from marreid.data.transforms import TrainTransform
from marreid.errors import ConfigError

# Pseudo labels of 20 images: clusters 0 (5 images), 1 (2), 2 (4), 3 (3), 4 (2); 4 outliers.
LABELS = np.array([0, 1, 2, -1, 0, 3, 2, 0, -1, 4, 1, 3, 2, 0, -1, 4, 3, 2, 0, -1])


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> ImageDataset:
    """20 tiny images, image i filled with grey level 10 i, file identity i // 3, camera i % 2."""
    folder = tmp_path_factory.mktemp("pseudo")
    samples = []
    for i in range(len(LABELS)):
        path = folder / f"{i:03d}.png"
        Image.new("RGB", (4, 8), (10 * i,) * 3).save(path)
        samples.append(Sample(str(path), i // 3, i % 2))
    return ImageDataset(samples, TrainTransform(8, 4, pad=1))


def batches(target, **options) -> PseudoLabelBatches:
    settings = dict(labels=LABELS, batch_size=8, instances=4, steps_per_epoch=5, seed=3) | options
    return PseudoLabelBatches(target, **settings)


def collect(stream) -> list:
    return [(step, aux, [t.clone() for t in batch]) for step, aux, batch in stream]


def test_batches_are_identity_balanced_and_never_draw_outliers(target):
    sampler = batches(target, batch_size=12, instances=3, steps_per_epoch=30)
    seen_clusters = set()
    for step, aux, (images, pids, camids, indices) in sampler.iterate(epoch=0):
        assert aux is None and images.shape == (12, 3, 8, 4)
        labels = LABELS[indices.numpy()]
        assert (labels >= 0).all()
        # 4 distinct clusters, 3 images each, grouped.
        groups = labels.reshape(4, 3)
        assert (groups == groups[:, :1]).all() and len(set(groups[:, 0].tolist())) == 4
        seen_clusters |= set(groups[:, 0].tolist())
        for members in indices.numpy().reshape(4, 3):
            size = int((LABELS == LABELS[members[0]]).sum())
            if size >= 3:  # enough images: drawn without replacement
                assert len(set(members.tolist())) == 3
        assert pids.tolist() == [i // 3 for i in indices.tolist()]
        assert camids.tolist() == [i % 2 for i in indices.tolist()]
    assert seen_clusters == {0, 1, 2, 3, 4}


def test_small_clusters_are_drawn_with_replacement(target):
    counts = Counter()
    for epoch in range(3):
        for step in range(5):
            for members in np.array(batches(target).batch_indices(epoch, step)).reshape(2, 4):
                if LABELS[members[0]] in (1, 4):  # two images each
                    counts[len(set(members.tolist()))] += 1
                    assert len(set(members.tolist())) <= 2
    assert counts


def test_draw_follows_its_definition_and_the_augmentation_seeds(target):
    sampler = batches(target)
    rng = np.random.default_rng([3, PSEUDO_STREAM, 2, 4])
    clusters = rng.choice(5, 2, replace=False)
    expected = []
    for k in clusters:
        members = np.flatnonzero(LABELS == k)
        expected += rng.choice(members, 4, replace=len(members) < 4).tolist()
    assert sampler.batch_indices(2, 4) == expected
    images = next(iter(sampler.iterate(2, start_step=4)))[2][0]
    for slot, index in enumerate(expected):
        direct = target[(index, sample_seed(3, 2, 4, slot, PSEUDO_STREAM))][0]
        assert torch.equal(images[slot], direct)


def test_deterministic_and_resumable_at_any_step(target):
    sampler = batches(target)
    full = collect(sampler.iterate(epoch=1))
    assert [step for step, _, _ in full] == list(range(5))
    again = collect(batches(target, num_workers=2).iterate(epoch=1))
    for (_, _, a), (_, _, b) in zip(full, again):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    for start in (0, 2, 4, 5):
        tail = collect(batches(target).iterate(epoch=1, start_step=start))
        assert [s for s, _, _ in tail] == list(range(start, 5))
        for (_, _, a), (_, _, b) in zip(full[start:], tail):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
    other_epoch = collect(sampler.iterate(epoch=2))
    assert any(not torch.equal(a[2][3], b[2][3]) for a, b in zip(full, other_epoch))


def test_rank_slices_concatenate_to_the_single_process_batch(target):
    whole = collect(batches(target).iterate(epoch=0))
    parts = [collect(batches(target, rank=r, world_size=4).iterate(epoch=0)) for r in range(4)]
    for step in range(5):
        for field in range(4):
            joined = torch.cat([parts[r][step][2][field] for r in range(4)])
            assert torch.equal(joined, whole[step][2][field])


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(batch_size=10, instances=4), "multiple of instances=4"),
        (dict(batch_size=24, instances=4), "needs 6 pseudo identities, the clustering found 5"),
        (dict(labels=np.full(20, -1)), "found 0"),
        (dict(labels=LABELS[:5]), "20 integers"),
        (dict(labels=LABELS.astype(float)), "20 integers"),
        (dict(rank=2, world_size=2), "outside"),
        (dict(world_size=3), "ranks"),
        (dict(steps_per_epoch=0), "steps_per_epoch"),
        (dict(seed=-1), "seed"),
    ],
)
def test_bad_settings_are_one_line_config_errors(target, options, message):
    with pytest.raises(ConfigError, match=message) as info:
        batches(target, **options)
    assert "\n" not in str(info.value)


def test_start_step_out_of_range(target):
    with pytest.raises(ConfigError, match="start_step"):
        next(batches(target).iterate(0, start_step=6))
