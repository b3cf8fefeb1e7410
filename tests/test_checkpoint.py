"""Checkpoints: atomic replacement, safe loading, refusal of pickled objects; RNG capture."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from marreid.engine import checkpoint as ckpt
from marreid.engine.checkpoint import load_checkpoint, save_checkpoint
from marreid.engine.seeding import capture_rng_state, restore_rng_state, seed_everything
from marreid.errors import CheckpointError


class Opaque:
    """Something only arbitrary unpickling can rebuild."""


def test_round_trip_plain_state(tmp_path):
    state = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "epoch": 3, "step": 41,
             "config": {"optim": {"lr": 2e-4, "milestones": [0.625, 0.875]}, "model": {"pretrained": None}}}
    save_checkpoint(tmp_path / "a.pt", state)
    back = load_checkpoint(tmp_path / "a.pt")
    assert torch.equal(back["model"]["w"], state["model"]["w"])
    assert back["epoch"] == 3 and back["step"] == 41 and back["config"] == state["config"]
    assert isinstance(back["marreid_version"], str)


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1, "w": torch.ones(3)})
    before = path.read_bytes()

    def broken_save(obj, fh):
        fh.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    assert path.read_bytes() == before
    assert load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary left behind


def test_interrupt_mid_write_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 5})

    def interrupted(obj, fh):
        fh.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 6})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 5
    assert len(list(tmp_path.iterdir())) == 1


def test_pickled_object_is_refused_with_trust_hint(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"thing": Opaque()}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and "--trust-checkpoint" in str(info.value)
    assert isinstance(load_checkpoint(path, trust=True)["thing"], Opaque)


def test_missing_truncated_and_garbage_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "none.pt")
    save_checkpoint(tmp_path / "full.pt", {"w": torch.randn(100, 100)})
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pt"):
        load_checkpoint(tmp_path / "cut.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "junk.pt")
    assert "junk.pt" in str(info.value) and "--trust-checkpoint" not in str(info.value)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="list.pt"):
        load_checkpoint(tmp_path / "list.pt")


def _draws() -> tuple:
    return random.random(), random.gauss(0, 1), float(np.random.rand()), float(np.random.randn()), \
        torch.rand(3).tolist()


def test_rng_state_survives_a_checkpoint(tmp_path):
    seed_everything(7)
    random.gauss(0, 1)  # leaves a cached gaussian in python's generator
    np.random.randn()
    save_checkpoint(tmp_path / "rng.pt", {"rng": capture_rng_state()})
    expected = _draws()
    seed_everything(123)
    _draws()
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert _draws() == expected
