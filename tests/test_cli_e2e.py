"""``marreid pretrain`` -> ``train`` -> ``evaluate`` / ``extract`` in-process on tiny generated data."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml

from fakedata import make_market_tree, write_tiny_config
from marreid.cli import main
from marreid.engine.checkpoint import load_checkpoint
from marreid.engine.logging import read_log


class Opaque:
    """Only arbitrary unpickling can rebuild this."""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One pretrain and one train run through the CLI, shared by the checks below."""
    root = tmp_path_factory.mktemp("e2e")
    make_market_tree(root / "aux", ids=5, cams=2, per_id=4, size=(32, 16), junk=0, distractors=0)
    target = make_market_tree(root / "tgt", ids=5, cams=3, per_id=4, size=(32, 16), seed=2)
    config = write_tiny_config(root / "tiny.yaml", root / "aux", root / "tgt", pretrain={"epochs": 2},
                               optim={"epochs": 2})
    pre, mar = root / "pre", root / "mar"
    assert main(["pretrain", str(config), "--run-dir", str(pre)]) == 0
    assert main(["train", str(config), "--run-dir", str(mar), "--pretrained", str(pre / "last.pt"),
                 "--set", "train.checkpoint_every_steps=2"]) == 0
    return {"root": root, "config": config, "pre": pre, "mar": mar, "target": target}


def test_run_directories_hold_their_files(runs):
    for name in ("config.yaml", "log.jsonl", "last.pt"):
        assert (runs["pre"] / name).is_file() and (runs["mar"] / name).is_file()
    assert (runs["mar"] / "metrics.json").is_file()
    saved = yaml.safe_load((runs["mar"] / "config.yaml").read_text())
    assert saved["train"]["checkpoint_every_steps"] == 2 and saved["model"]["arch"] == "tiny"
    assert saved["train"]["pretrained_checkpoint"] == str(runs["pre"] / "last.pt")


def test_checkpoints_hold_the_resume_state(runs):
    pre = load_checkpoint(runs["pre"] / "last.pt")
    mar = load_checkpoint(runs["mar"] / "last.pt")
    assert pre["kind"] == "pretrain" and mar["kind"] == "mar"
    assert pre["num_agents"] == mar["num_agents"] == 5  # the auxiliary identities
    assert mar["num_target"] == 20 and mar["step"] == 2 * (20 // 8) and mar["epoch"] == 2
    assert {"model", "optimizer", "scheduler", "loss", "rng", "config", "marreid_version"} <= set(mar)
    assert mar["loss"]["memory.memory"].shape == (20, 5) and bool(mar["loss"]["threshold.initialized"])
    # MAR started from the pretrained agents' checkpoint, not from scratch.
    assert pre["model"]["agents.weight"].shape == mar["model"]["agents.weight"].shape


def test_losses_are_finite_and_metrics_in_range(runs):
    pre_steps = read_log(runs["pre"] / "log.jsonl", "step")
    mar_steps = read_log(runs["mar"] / "log.jsonl", "step")
    assert len(pre_steps) == 2 * (20 // 8) and len(mar_steps) == 2 * (20 // 8)
    for record in pre_steps + mar_steps:
        assert math.isfinite(record["loss"]) and record["images_per_s"] > 0 and record["lr"] > 0
    for record in mar_steps:
        for key in ("al", "rj", "cml", "mdl", "mined", "threshold"):
            assert math.isfinite(record[key]), key
    metrics = json.loads((runs["mar"] / "metrics.json").read_text())
    for key in ("rank1", "rank5", "rank10", "mAP"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["ap_rule"] == "plain" and metrics["num_query"] == 5


def _naive_rank1_and_map(qf, q_pids, q_cams, gf, g_pids, g_cams):
    """Market-1501 protocol written out per query: cosine distance, same id + same camera ignored."""
    hits1, aps = [], []
    for i in range(len(qf)):
        dist = [1.0 - float(np.dot(qf[i], gf[j])) for j in range(len(gf))]
        order = sorted(range(len(gf)), key=lambda j: dist[j])
        kept = [j for j in order if not (g_pids[j] == q_pids[i] and g_cams[j] == q_cams[i])]
        match = [g_pids[j] == q_pids[i] for j in kept]
        if not any(match):
            continue
        hits1.append(match[0])
        found, precisions = 0, []
        for rank, is_hit in enumerate(match, start=1):
            if is_hit:
                found += 1
                precisions.append(found / rank)
        aps.append(sum(precisions) / len(precisions))
    return sum(hits1) / len(hits1), sum(aps) / len(aps)


def test_evaluate_and_extract_agree_with_a_naive_protocol(runs, tmp_path, capsys):
    ckpt = runs["mar"] / "last.pt"
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(ckpt), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "AP rule: plain" in printed
    metrics = json.loads(out.read_text())
    feats = {}
    for split in ("query", "gallery"):
        path = tmp_path / f"{split}.npz"
        assert main(["extract", str(ckpt), "--split", split, "--out", str(path)]) == 0
        with np.load(path) as data:
            assert set(data.files) == {"feats", "paths", "pids", "camids"}
            feats[split] = {k: data[k] for k in data.files}
    q, g = feats["query"], feats["gallery"]
    assert np.allclose(np.linalg.norm(q["feats"], axis=1), 1.0, atol=1e-5)
    written = runs["target"].kept("query")
    assert sorted(zip(q["pids"].tolist(), q["camids"].tolist())) == sorted(written)
    rank1, mAP = _naive_rank1_and_map(q["feats"], q["pids"], q["camids"], g["feats"], g["pids"], g["camids"])
    assert metrics["rank1"] == pytest.approx(rank1, abs=1e-9)
    assert metrics["mAP"] == pytest.approx(mAP, abs=1e-6)
    # Training's final evaluation is the same one.
    assert json.loads((runs["mar"] / "metrics.json").read_text())["mAP"] == pytest.approx(mAP, abs=1e-6)


def test_evaluate_names_the_ap_rule(runs, tmp_path):
    out = tmp_path / "m.json"
    assert main(["evaluate", str(runs["mar"] / "last.pt"), "--ap-rule", "trapezoid", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["ap_rule"] == "trapezoid"


def test_extract_an_image_folder(runs, tmp_path):
    out = tmp_path / "f.npz"
    folder = runs["root"] / "tgt" / "query"
    assert main(["extract", str(runs["mar"] / "last.pt"), "--images", str(folder), "--out", str(out)]) == 0
    with np.load(out) as data:
        assert data["feats"].shape == (5, 32) and (data["pids"] == -1).all() and (data["camids"] == -1).all()
        assert sorted(data["paths"].tolist()) == sorted(str(p) for p in folder.iterdir())


def test_resume_of_a_finished_run_changes_nothing(runs, capsys):
    before = load_checkpoint(runs["mar"] / "last.pt")
    assert main(["train", "--run-dir", str(runs["mar"]), "--resume"]) == 0
    after = load_checkpoint(runs["mar"] / "last.pt")
    assert after["step"] == before["step"]
    assert all(torch.equal(v, after["model"][k]) for k, v in before["model"].items())
    assert "train done" in capsys.readouterr().out


def test_user_errors_are_one_line_with_exit_2(runs, tmp_path, capsys):
    assert main(["train", str(runs["config"]), "--set", "optim.lrr=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "optim.lrr" in err and "optim.lr" in err and len(err.splitlines()) == 1
    evil = tmp_path / "evil.pt"
    torch.save({"x": Opaque()}, evil)
    assert main(["evaluate", str(evil)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--trust-checkpoint" in err and str(evil) in err and len(err.splitlines()) == 1

    assert main(["train", str(runs["config"]), "--run-dir", str(tmp_path / "r"),
                 "--pretrained", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err
    assert main(["pretrain", "--run-dir", str(tmp_path / "nothing"), "--resume"]) == 2
    assert "nothing" in capsys.readouterr().err
