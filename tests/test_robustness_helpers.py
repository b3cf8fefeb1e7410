"""Shared by the robustness tests: tiny auxiliary / target trees, a config and a pretrained
checkpoint, and a CLI call that returns the exit status and the lines printed to stderr.
(No tests here.)"""

from __future__ import annotations

import shutil
from pathlib import Path


from fakedata import make_market_tree, write_tiny_config
from marreid.cli import main

AUX_IDS = 4
AUX_IMAGES = 16  # 4 ids x 4 images: 2 steps of 8 per epoch
TARGET_TRAIN = 16


def make_run_data(root: Path) -> dict[str, Path]:
    """Auxiliary and target Market-style trees, ``tiny.yaml`` (1 epoch of 2 steps, CPU, tiny
    backbone, every option explicit) and a pretrain run in ``pre/`` whose ``last.pt`` the
    config names as ``train.pretrained_checkpoint``."""
    make_market_tree(root / "aux", ids=AUX_IDS, cams=2, per_id=4, size=(32, 16), junk=0, distractors=0)
    make_market_tree(root / "tgt", ids=4, cams=3, per_id=4, size=(32, 16), seed=1)
    config = write_tiny_config(root / "tiny.yaml", root / "aux", root / "tgt", optim={"lr": 0.05},
                               train={"pretrained_checkpoint": str(root / "pre" / "last.pt")})
    assert main(["pretrain", str(config), "--run-dir", str(root / "pre")]) == 0
    return {"root": root, "config": config, "aux": root / "aux", "tgt": root / "tgt", "pre": root / "pre"}


def copy_tree(source: Path, dest: Path) -> Path:
    """A private copy of a dataset tree that a test may damage."""
    shutil.copytree(source, dest)
    return dest


def cli(capsys, *argv: str) -> tuple[int, list[str]]:
    """Run ``marreid *argv`` in-process; (exit status, stderr lines)."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip().splitlines()


def first_image(folder: Path) -> Path:
    """The first image a reader keeps (junk, identity -1, is dropped unread)."""
    return sorted(p for p in folder.glob("*.jpg") if not p.name.startswith("-1_"))[0]
