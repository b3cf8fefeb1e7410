"""The MAR trainer on tiny generated data: exact resume, target labels never read, the
non-finite guard and the stop seam. Everything runs on CPU with a tiny backbone."""

from __future__ import annotations

import dataclasses
import json
import math
import random

import pytest
import torch

from fakedata import make_training_trees
from marreid.config import load_config
from marreid.data import Sample
from marreid.engine.checkpoint import load_checkpoint
from marreid.engine.extract import load_target
from marreid.engine.logging import RunLogger, read_log
from marreid.engine.pretrain import load_auxiliary, run_pretrain
from marreid.engine.train import MARTrainer, run_train
from marreid.errors import TrainingError

STEPS_PER_EPOCH = 3  # 6 ids x 4 images = 24 auxiliary images, batches of 8
EPOCHS = 3


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    return make_training_trees(tmp_path_factory.mktemp("engine_data"))


def config(trees, run_dir, *extra):
    return load_config(None, [
        f"data.aux_root={trees / 'aux'}", "data.aux_format=market1501",
        f"data.target_root={trees / 'tgt'}", "data.target_format=market1501",
        "data.height=32", "data.width=16", "data.pad=2", "data.num_workers=0",
        "model.arch=tiny", f"optim.epochs={EPOCHS}", "optim.lr=0.05", "train.aux_batch=8", "train.target_batch=8",
        "mar.mining_ratio=0.1", "mar.mdl_start_epoch=1", "train.device=cpu", "train.diagnostics=true",
        "train.progress=false", f"output.run_dir={run_dir}", *extra,
    ])


def trainer(cfg, target=None) -> MARTrainer:
    target = target if target is not None else load_target(cfg)
    run = MARTrainer(cfg, load_auxiliary(cfg), target, cfg.output.run_dir,
                     logger=RunLogger(cfg.output.run_dir, enabled=False))
    assert run.batches.steps_per_epoch == STEPS_PER_EPOCH
    return run


def fresh(cfg, target=None) -> MARTrainer:
    run = trainer(cfg, target)
    run.initialize()
    run.save()
    return run


def momentum_buffers(run: MARTrainer) -> list[torch.Tensor]:
    return [run.optimizer.state[p]["momentum_buffer"] for g in run.optimizer.param_groups for p in g["params"]]


def assert_same_state(a: MARTrainer, b: MARTrainer) -> None:
    for name, (x, y) in {k: (v, b.model.state_dict()[k]) for k, v in a.model.state_dict().items()}.items():
        assert torch.equal(x, y), f"model {name} differs"
    for x, y in zip(momentum_buffers(a), momentum_buffers(b), strict=True):
        assert torch.equal(x, y)
    for name, x in a.loss.state_dict().items():
        assert torch.equal(x, b.loss.state_dict()[name]), f"loss state {name} differs"
    assert a.scheduler.state_dict() == b.scheduler.state_dict()


@pytest.fixture(scope="module")
def uninterrupted(trees, tmp_path_factory):
    cfg = config(trees, tmp_path_factory.mktemp("run_a"))
    run = fresh(cfg)
    initial_loss_state = {k: v.clone() for k, v in run.loss.state_dict().items()}
    assert run.fit() == "done"
    assert run.step == EPOCHS * STEPS_PER_EPOCH
    return run, initial_loss_state


@pytest.mark.parametrize("stop_at", [4, 3])  # mid-epoch (step 1 of epoch 1), and on an epoch's last step
def test_interrupted_and_resumed_run_ends_identical(trees, tmp_path, uninterrupted, stop_at):
    full, initial_loss_state = uninterrupted
    cfg = config(trees, tmp_path, f"train.max_steps={stop_at}")
    first = fresh(cfg)
    assert first.fit() == "max_steps"
    saved = load_checkpoint(tmp_path / "last.pt")
    assert (saved["step"], saved["epoch"]) == (stop_at, stop_at // STEPS_PER_EPOCH)

    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=None))
    second = trainer(cfg)
    second.resume()
    assert second.step == stop_at
    assert second.fit() == "done"
    assert_same_state(full, second)
    # The loss state really moved (memory filled, threshold and statistics updated), so
    # the comparison above covers it.
    moved = [k for k, v in full.loss.state_dict().items() if not torch.equal(v, initial_loss_state[k])]
    assert any("memory" in k for k in moved) and any("threshold" in k for k in moved)
    assert any("stats" in k for k in moved)
    assert [r["step"] for r in read_log(tmp_path / "log.jsonl", "step")] == list(range(EPOCHS * STEPS_PER_EPOCH))


def test_learning_rate_drops_at_the_milestones(uninterrupted):
    full, _ = uninterrupted
    steps = read_log(full.run_dir / "log.jsonl", "step")
    # 3 epochs: milestones int(3 * 5/8) = 1 and int(3 * 7/8) = 2.
    expected = [0.05] * 3 + [0.005] * 3 + [0.0005] * 3
    assert [r["lr"] for r in steps] == pytest.approx(expected)
    assert all(math.isfinite(r[k]) for r in steps for k in ("loss", "al", "rj", "cml", "mdl"))
    assert all(r["mdl"] == 0 for r in steps[:3]) and any(r["mined"] > 0 for r in steps[3:])


def test_shuffled_target_identities_give_identical_weights(trees, tmp_path, uninterrupted):
    full, _ = uninterrupted
    cfg = config(trees, tmp_path)
    target = load_target(cfg)
    pids = [s.pid for s in target.train]
    random.Random(3).shuffle(pids)
    pids = [p + 1000 * i for i, p in enumerate(pids)]  # every image its own made-up person
    target.train = [Sample(s.path, p, s.camid) for s, p in zip(target.train, pids)]
    run = fresh(cfg, target)
    assert run.diagnostics
    assert run.fit() == "done"
    assert_same_state(full, run)
    # The identities did reach the diagnostics: with all-different ids no mined pair is a true match.
    true_rates = [r.get("mined_tp_rate") for r in read_log(full.run_dir / "log.jsonl", "step")]
    fake_rates = [r.get("mined_tp_rate") for r in read_log(tmp_path / "log.jsonl", "step")]
    assert any(r for r in true_rates if r is not None)
    assert all(r == 0 for r in fake_rates if r is not None) and any(r is not None for r in fake_rates)


def test_non_finite_term_stops_and_keeps_last_good_checkpoint(trees, tmp_path):
    cfg = config(trees, tmp_path, "train.checkpoint_every_steps=1")
    run = fresh(cfg)
    compute = run.compute_loss

    def poisoned(epoch, aux_batch, target_batch):
        total, terms = compute(epoch, aux_batch, target_batch)
        if run.step == 2:
            return total * float("nan"), {**terms, "cml": float("nan"), "loss": float("nan")}
        return total, terms

    run.compute_loss = poisoned
    with pytest.raises(TrainingError) as info:
        run.fit()
    message = str(info.value)
    assert "'loss'" in message and "step 2" in message and "last.pt" in message
    saved = load_checkpoint(tmp_path / "last.pt")
    assert saved["step"] == 2
    for name, value in saved["model"].items():
        assert torch.isfinite(value.float()).all(), name


def test_stop_request_finishes_the_step_and_checkpoints(trees, tmp_path):
    cfg = config(trees, tmp_path)
    run = fresh(cfg)
    compute = run.compute_loss

    def request_stop(epoch, aux_batch, target_batch):
        if run.step == 1:
            run.stop_requested = True
        return compute(epoch, aux_batch, target_batch)

    run.compute_loss = request_stop
    assert run.fit() == "stopped"
    assert run.step == 2 and load_checkpoint(tmp_path / "last.pt")["step"] == 2


def test_evaluate_writes_metrics(trees, tmp_path):
    cfg = config(trees, tmp_path)
    run = fresh(cfg)
    metrics = run.evaluate()
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk == metrics
    assert 0.0 <= metrics["mAP"] <= 1.0 and metrics["rank1"] <= metrics["rank5"] <= metrics["rank10"] <= 1.0
    assert metrics["num_query"] == 6 and metrics["ap_rule"] == "plain"
    assert read_log(tmp_path / "log.jsonl", "eval")[0]["mAP"] == metrics["mAP"]


def test_initialize_skips_the_target_pass_when_no_term_needs_it(trees, tmp_path, monkeypatch):
    cfg = config(trees, tmp_path, "mar.use_cml=false", "mar.use_mdl=false")
    run = trainer(cfg)

    def no_pass(*args, **kwargs):
        raise AssertionError("the target was read")

    monkeypatch.setattr("marreid.engine.train.plain_loader", no_pass)
    run.initialize()
    assert not bool(run.loss.stats.initialized) and not bool(run.loss.threshold.initialized)
    assert run.fit() == "done"


def test_run_train_without_evaluation_writes_no_metrics(trees, tmp_path):
    pretrain_dir = tmp_path / "pretrain"
    cfg = config(trees, tmp_path / "mar", "optim.epochs=1", "pretrain.epochs=1", "pretrain.batch_size=8",
                 f"output.pretrain_dir={pretrain_dir}")
    run_pretrain(cfg)
    result = run_train(cfg, evaluate=False)
    assert result["status"] == "done" and result["metrics"] is None
    assert not (tmp_path / "mar" / "metrics.json").exists()
    assert read_log(tmp_path / "mar" / "log.jsonl", "eval") == []


def test_an_epoch_without_any_loss_term_only_counts_its_steps(trees, tmp_path):
    # the paper's "without L_CML and L_RAL": L_MDL alone, which starts in the second epoch
    cfg = config(trees, tmp_path, "mar.use_al=false", "mar.use_rj=false", "mar.use_cml=false", "optim.epochs=2",
                 "train.checkpoint_every_steps=0")
    run = fresh(cfg)
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    run.epochs = 1
    assert run.fit() == "done" and run.step == STEPS_PER_EPOCH
    assert all(torch.equal(v, before[k]) for k, v in run.model.state_dict().items())
    run.epochs = 2
    assert run.fit() == "done" and run.step == 2 * STEPS_PER_EPOCH
    assert any(not torch.equal(v, before[k]) for k, v in run.model.state_dict().items())
    assert bool(run.loss.memory.visited.any())
