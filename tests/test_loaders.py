"""Transforms and loaders: hand-computed augmentation, seeded order, exact resume."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from marreid.data import Sample
from marreid.data.loaders import ImageDataset, PairedBatches, find_bad_images, plain_loader, sample_seed
from marreid.data.transforms import IMAGENET_MEAN, IMAGENET_STD, TestTransform, TrainTransform
from marreid.errors import ConfigError, DatasetError

H, W = 6, 4
MEAN, STD = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)


def pattern_image() -> np.ndarray:
    """Every pixel distinct: R = 10*y + x + 1, G = 100 + 10*y + x, B = 250 - 10*y - x."""
    y, x = np.mgrid[0:H, 0:W]
    return np.stack([10 * y + x + 1, 100 + 10 * y + x, 250 - 10 * y - x], axis=-1).astype(np.uint8)


def normalise(pixels: np.ndarray) -> np.ndarray:
    return ((pixels / 255.0 - MEAN) / STD).transpose(2, 0, 1)


def write_images(folder, count: int, size=(8, 16)) -> list[Sample]:
    """``count`` images, image i filled with grey level 10*i, pid i // 2, camera i % 3."""
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(count):
        path = folder / f"{i:03d}.png"
        Image.new("RGB", size, (10 * i % 256,) * 3).save(path)
        samples.append(Sample(str(path), i // 2, i % 3))
    return samples


def test_sample_seed_follows_its_definition():
    for args in [(0, 0, 0, 0, 0), (123, 4, 56, 7, 1), (2**40, 19, 686, 183, 1), (-5, 0, 1, 2, 0)]:
        digest = hashlib.blake2b(struct.pack("<5Q", *(a % 2**64 for a in args)), digest_size=8).digest()
        assert sample_seed(*args) == struct.unpack("<Q", digest)[0] >> 1
    seeds = {sample_seed(1, e, s, k, st) for e in range(3) for s in range(4) for k in range(5) for st in (0, 1)}
    assert len(seeds) == 3 * 4 * 5 * 2
    assert all(0 <= s < 2**63 for s in seeds)


def test_train_transform_matches_hand_flip_and_crop():
    img = Image.fromarray(pattern_image())
    pad = 2
    transform = TrainTransform(H, W, pad=pad)
    flips = set()
    for seed in range(40):
        rng = np.random.default_rng(seed)
        flip, top, left = rng.random() < 0.5, rng.integers(0, 2 * pad + 1), rng.integers(0, 2 * pad + 1)
        flips.add(bool(flip))
        src = pattern_image()[:, ::-1] if flip else pattern_image()
        expected = np.zeros((H, W, 3))
        for y in range(H):
            for x in range(W):
                sy, sx = y + top - pad, x + left - pad
                if 0 <= sy < H and 0 <= sx < W:
                    expected[y, x] = src[sy, sx]
        out = transform(img, seed)
        assert out.shape == (3, H, W) and out.dtype == torch.float32
        np.testing.assert_allclose(out.numpy(), normalise(expected), atol=1e-5)
    assert flips == {True, False}


def test_train_transform_same_seed_same_tensor_and_offsets_cover_range():
    img = Image.fromarray(pattern_image())
    transform = TrainTransform(H, W, pad=1)
    assert torch.equal(transform(img, 7), transform(img, 7))
    outputs = {transform(img, seed).numpy().tobytes() for seed in range(60)}
    # 2 flips x 3 tops x 3 lefts
    assert len(outputs) == 18


def test_train_transform_without_flip_or_pad_is_resize_and_normalise():
    img = Image.fromarray(pattern_image())
    out = TrainTransform(H, W, flip=False, pad=0)(img, 3)
    np.testing.assert_allclose(out.numpy(), normalise(pattern_image().astype(float)), atol=1e-5)
    with pytest.raises(ValueError, match="seed"):
        TrainTransform(H, W)(img, None)


def test_test_transform_resizes_and_normalises():
    img = Image.new("RGB", (20, 50), (51, 102, 204))
    out = TestTransform(10, 4)(img)
    assert out.shape == (3, 10, 4)
    expected = (np.array([51, 102, 204]) / 255.0 - MEAN) / STD
    np.testing.assert_allclose(out.numpy(), np.broadcast_to(expected[:, None, None], (3, 10, 4)), atol=1e-5)
    custom = TestTransform(10, 4, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))(img.convert("L"))
    np.testing.assert_allclose(custom.numpy()[:, 0, 0], [0.2 * 0.299 + 0.4 * 0.587 + 0.8 * 0.114] * 3, atol=3e-3)


def test_image_dataset_items(tmp_path):
    samples = write_images(tmp_path, 3)
    train = ImageDataset(samples, TrainTransform(16, 8, pad=3))
    image, pid, camid, index = train[(2, 99)]
    assert (pid, camid, index) == (1, 2, 2)
    assert torch.equal(image, TrainTransform(16, 8, pad=3)(Image.open(samples[2].path), 99))
    test = ImageDataset(samples, TestTransform(16, 8, mean=(0, 0, 0), std=(1, 1, 1)))
    image, pid, camid, index = test[1]
    assert (pid, camid, index) == (0, 1, 1)
    assert torch.allclose(image, torch.full((3, 16, 8), 10 / 255))


def test_unreadable_image_raises_dataset_error_naming_it(tmp_path):
    samples = write_images(tmp_path, 2)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really")
    dataset = ImageDataset(samples + [Sample(str(bad), 9, 0)], TestTransform(16, 8))
    with pytest.raises(DatasetError, match=str(bad)):
        dataset[2]
    missing = ImageDataset([Sample(str(tmp_path / "gone.png"), 1, 0)], TestTransform(16, 8))
    with pytest.raises(DatasetError, match="gone.png"):
        missing[0]


def test_worker_errors_stay_one_line(tmp_path):
    samples = write_images(tmp_path, 4)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    loader = plain_loader(samples + [Sample(str(bad), 9, 0)], TestTransform(16, 8), batch_size=5, num_workers=2)
    with pytest.raises(DatasetError) as info:
        list(loader)
    assert str(info.value).startswith(f"cannot read image {bad}") and "\n" not in str(info.value)


def test_plain_loader_in_order_with_short_last_batch(tmp_path):
    samples = write_images(tmp_path, 5)
    batches = list(plain_loader(samples, TestTransform(16, 8), batch_size=2))
    assert [b[3].tolist() for b in batches] == [[0, 1], [2, 3], [4]]
    assert [b[1].tolist() for b in batches] == [[0, 0], [1, 1], [2]]
    assert [b[2].tolist() for b in batches] == [[0, 1], [2, 0], [1]]


def make_paired(tmp_path, num_workers=0, target=True, **kwargs) -> PairedBatches:
    aux = ImageDataset(write_images(tmp_path / "aux", 7), TrainTransform(16, 8, pad=2))
    tgt = ImageDataset(write_images(tmp_path / "tgt", 5), TrainTransform(16, 8, pad=2)) if target else None
    return PairedBatches(aux, tgt, aux_batch=2, target_batch=2, seed=11, num_workers=num_workers, **kwargs)


def collect(batches: PairedBatches, epoch: int, start_step: int = 0) -> list:
    return [(step, aux, tgt) for step, aux, tgt in batches.iterate(epoch, start_step)]


def test_aux_epochs_are_seeded_permutations(tmp_path):
    batches = make_paired(tmp_path)
    assert batches.steps_per_epoch == len(batches) == 3
    orders = []
    for epoch in range(3):
        seen = [i for _, aux, _ in collect(batches, epoch) for i in aux[3].tolist()]
        assert len(seen) == 6 and len(set(seen)) == 6 and set(seen) <= set(range(7))
        expected = np.random.default_rng([11, 0, epoch]).permutation(7)[:6].tolist()
        assert seen == expected
        orders.append(seen)
    assert orders[0] != orders[1]


def test_target_batches_follow_global_step_with_custom_order(tmp_path):
    def rotated(k):
        return [(i + k) % 5 for i in range(5)]

    batches = make_paired(tmp_path, target_order=rotated)
    got = [tgt[3].tolist() for epoch in range(3) for _, _, tgt in collect(batches, epoch)]
    # passes of 5 images give 2 whole batches of 2; global step g is batch g % 2 of pass g // 2
    expected = [rotated(g // 2)[2 * (g % 2) : 2 * (g % 2) + 2] for g in range(9)]
    assert got == expected


def test_default_target_passes_restart_with_new_permutation(tmp_path):
    batches = make_paired(tmp_path)
    got = [tgt[3].tolist() for epoch in range(4) for _, _, tgt in collect(batches, epoch)]
    passes = [got[i] + got[i + 1] for i in range(0, 12, 2)]
    assert all(len(set(p)) == 4 for p in passes)
    for k, p in enumerate(passes):
        assert p == np.random.default_rng([11, 1, k]).permutation(5)[:4].tolist()
    assert len({tuple(p) for p in passes}) > 1


def test_pixels_come_from_the_sample_seed(tmp_path):
    batches = make_paired(tmp_path)
    step, aux, tgt = collect(batches, epoch=2)[1]
    for slot, index in enumerate(aux[3].tolist()):
        image = batches.aux[(index, sample_seed(11, 2, step, slot, 0))][0]
        assert torch.equal(aux[0][slot], image)
    for slot, index in enumerate(tgt[3].tolist()):
        assert torch.equal(tgt[0][slot], batches.target[(index, sample_seed(11, 2, step, slot, 1))][0])
    assert torch.equal(aux[1], torch.tensor([i // 2 for i in aux[3].tolist()]))


def assert_same(a: list, b: list) -> None:
    assert [s for s, _, _ in a] == [s for s, _, _ in b]
    for (_, aux_a, tgt_a), (_, aux_b, tgt_b) in zip(a, b):
        for x, y in zip(aux_a + tgt_a, aux_b + tgt_b):
            assert torch.equal(x, y)


def test_resume_mid_epoch_and_workers_give_identical_batches(tmp_path):
    serial = make_paired(tmp_path)
    full = collect(serial, epoch=1)
    resumed = collect(make_paired(tmp_path), epoch=1, start_step=1)
    assert_same(full[1:], resumed)
    assert_same(full, collect(make_paired(tmp_path, num_workers=2), epoch=1))
    assert_same(full[2:], collect(make_paired(tmp_path, num_workers=2), epoch=1, start_step=2))
    assert collect(serial, epoch=1, start_step=3) == []


def test_iterating_leaves_global_torch_rng_alone(tmp_path):
    batches = make_paired(tmp_path)
    state = torch.get_rng_state()
    collect(batches, epoch=0)
    assert torch.equal(state, torch.get_rng_state())


def test_aux_only_batches(tmp_path):
    batches = make_paired(tmp_path, target=False)
    out = collect(batches, epoch=0)
    assert [s for s, _, _ in out] == [0, 1, 2]
    assert all(t is None for _, _, t in out)
    assert [a[0].shape for _, a, _ in out] == [torch.Size([2, 3, 16, 8])] * 3


def test_batch_size_errors(tmp_path):
    aux = ImageDataset(write_images(tmp_path / "aux", 3), TrainTransform(16, 8))
    tgt = ImageDataset(write_images(tmp_path / "tgt", 2), TrainTransform(16, 8))
    with pytest.raises(ConfigError, match="aux_batch=4"):
        PairedBatches(aux, tgt, aux_batch=4, target_batch=1, seed=0)
    with pytest.raises(ConfigError, match="target_batch=3"):
        next(PairedBatches(aux, tgt, aux_batch=1, target_batch=3, seed=0).iterate(0))
    with pytest.raises(ConfigError, match="start_step"):
        next(PairedBatches(aux, tgt, aux_batch=1, target_batch=1, seed=0).iterate(0, start_step=4))


def test_find_bad_images(tmp_path):
    samples = write_images(tmp_path, 3)
    jpeg = tmp_path / "ok.jpg"
    Image.new("RGB", (32, 64), (1, 2, 3)).save(jpeg)
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(jpeg.read_bytes()[:-30])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    everything = samples + [Sample(str(p), 0, 0) for p in (jpeg, truncated, empty)]
    bad = find_bad_images(everything)
    assert [path for path, _ in bad] == [str(truncated), str(empty)]
    assert all(reason and "\n" not in reason for _, reason in bad)
