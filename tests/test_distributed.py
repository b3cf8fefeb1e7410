"""DistributedDataParallel on CPU: two gloo processes against one process on the same global batch.

The two ranks are started with torch.multiprocessing's spawn and find each other
through torchrun's environment variables on a free localhost port. One spawn
serves every check: the ranks train two steps of MAR (tiny backbone, L_MDL on from
the first step) twice, with the joint forward pass and synchronised BatchNorm and with
the per-domain forward pass in BatchNorm batches of 2, then three steps of cluster
contrast from a pretrained checkpoint (across an epoch boundary, so they cluster twice),
and also run a few collectives whose results are compared here with plain one-process
computations.
"""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fakedata import make_training_trees
from marreid.config import load_config
from marreid.data.loaders import ImageDataset, PairedBatches
from marreid.engine.checkpoint import load_checkpoint
from marreid.engine.distributed import GlobalBatchNorm, any_rank, gather_rows, gather_streams
from marreid.engine.extract import load_target
from marreid.engine.logging import read_log
from marreid.engine.pretrain import load_auxiliary, run_pretrain
from marreid.engine.train import AdaptTrainer, MARTrainer
from marreid.errors import ConfigError

WORLD = 2
STEPS = 2
SPAWN_DEADLINE_S = 600  # a guard against a hung collective, not a speed check: slow CI machines take minutes
BN_ROWS_PER_RANK = 3
# Cluster contrast: two steps of epoch 0, then one of epoch 1 after clustering again.
CC_STEPS = 3
CC_OPTIONS = ("train.method=cluster_contrast", "cc.k1=6", "cc.k2=2", "cc.eps=0.5", "cc.min_samples=2",
              "cc.batch_size=8", "cc.instances=2", "cc.iters_per_epoch=2", "cc.epochs=2", "train.bn_batch=2")
# (options of each rank, options of the one-process reference) per mode
MODES = {
    "joint": (("train.forward=joint", "train.sync_bn=true"), ("train.forward=joint",)),
    "per_domain": (("train.bn_batch=2",), ("train.bn_batch=2",)),
    "cluster_contrast": (CC_OPTIONS, CC_OPTIONS),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_config(trees, run_dir, *extra):
    return load_config(None, [
        f"data.aux_root={trees / 'aux'}", "data.aux_format=market1501",
        f"data.target_root={trees / 'tgt'}", "data.target_format=market1501",
        "data.height=32", "data.width=16", "data.pad=2", "data.num_workers=0",
        "model.arch=tiny", "optim.epochs=2", "optim.lr=0.05", "train.aux_batch=8", "train.target_batch=8",
        "mar.mining_ratio=0.1", "mar.mdl_start_epoch=0", "train.device=cpu", "train.diagnostics=true",
        "train.progress=false", f"output.run_dir={run_dir}", *extra,
    ])


def mode_config(trees, run_dir, mode, pretrained, reference=False):
    """A mode's configuration for a rank (or, ``reference``, for the one-process run)."""
    options = MODES[mode][1 if reference else 0]
    if mode == "cluster_contrast":
        return make_config(trees, run_dir, *options, f"train.pretrained_checkpoint={pretrained}",
                           f"train.max_steps={CC_STEPS}")
    return make_config(trees, run_dir, *options, f"train.max_steps={STEPS}")


def fresh_trainer(cfg) -> AdaptTrainer:
    if cfg.train.method == "cluster_contrast":  # no auxiliary set; starts from the pretrain checkpoint
        run = AdaptTrainer(cfg, None, load_target(cfg), cfg.output.run_dir)
        run.load_start_weights()
    else:
        run = MARTrainer(cfg, load_auxiliary(cfg), load_target(cfg), cfg.output.run_dir)
    run.initialize()
    run.save()
    return run


def bn_problem():
    """A global batch for BatchNorm: input, upstream gradient, affine parameters."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(WORLD * BN_ROWS_PER_RANK, 4, 3, 2, generator=g) * 3.0 + 1.5
    upstream = torch.randn(x.shape, generator=g)
    return x, upstream, torch.linspace(0.5, 2.0, 4), torch.linspace(-1.0, 1.0, 4)


def _collective_checks(rank: int) -> dict:
    x, upstream, weight, bias = bn_problem()
    rows = slice(rank * BN_ROWS_PER_RANK, (rank + 1) * BN_ROWS_PER_RANK)
    bn = GlobalBatchNorm(4)
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    local = x[rows].clone().requires_grad_()
    out = bn(local)
    (out * upstream[rows]).sum().backward()

    mine = torch.full((2, 3), float(rank + 1), requires_grad=True)
    coefficients = torch.arange(WORLD * 2 * 3, dtype=torch.float32).reshape(WORLD * 2, 3)
    gathered = gather_rows(mine)
    (gathered * coefficients).sum().backward()
    first, second = gather_streams(torch.tensor([[10 * rank], [10 * rank + 1], [10 * rank + 2]]), 1)
    return {
        "bn_out": out.detach(), "bn_input_grad": local.grad, "bn_weight_grad": bn.weight.grad,
        "bn_bias_grad": bn.bias.grad, "bn_running_mean": bn.running_mean, "bn_running_var": bn.running_var,
        "gathered": gathered.detach(), "gather_grad": mine.grad, "first": first, "second": second,
        "any_one": any_rank(rank == 1, torch.device("cpu")), "any_none": any_rank(False, torch.device("cpu")),
    }


def _rank_main(rank: int, port: int, trees, out, pretrained) -> None:
    """One rank: torchrun's environment, each mode's training run, then the collectives."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    for mode, (options, _) in MODES.items():
        # Separate run folders show which rank writes what (a real job shares one).
        cfg = mode_config(trees, out / mode / f"rank{rank}", mode, pretrained)
        run = fresh_trainer(cfg)
        status = run.fit()
        torch.save({
            "status": status,
            "ddp": isinstance(run.net, DistributedDataParallel),
            "global_bn": sum(isinstance(m, GlobalBatchNorm) for m in run.model.modules()),
            "local_batch": len(run.batches.step_items(0, 0)),
            "bn_groups": run.bn_groups.sizes,
            "grads": {name: p.grad.clone() for name, p in run.model.named_parameters() if p.grad is not None},
            "model": run.model.state_dict(),
            "loss": run.loss.state_dict(),
            **_collective_checks(rank),
        }, out / mode / f"rank{rank}.pt")


def spawn_ranks(trees, out, pretrained) -> None:
    context = mp.spawn(_rank_main, args=(free_port(), trees, out, pretrained), nprocs=WORLD, join=False)
    deadline = time.monotonic() + SPAWN_DEADLINE_S
    while not context.join(timeout=2):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD} ranks did not finish within {SPAWN_DEADLINE_S} s")


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    return make_training_trees(tmp_path_factory.mktemp("ddp_data"))


@pytest.fixture(scope="module")
def pretrained(trees, tmp_path_factory):
    """The pretrain checkpoint cluster contrast starts from, made once before the ranks start."""
    folder = tmp_path_factory.mktemp("ddp_pretrain")
    run_pretrain(make_config(trees, folder, f"output.pretrain_dir={folder}", "pretrain.epochs=2",
                             "pretrain.batch_size=8", "pretrain.lr=0.05"))
    return folder / "last.pt"


@pytest.fixture(scope="module")
def spawned(trees, pretrained, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_runs")
    spawn_ranks(trees, out, pretrained)
    return out


def mode_runs(trees, out, mode, pretrained=None):
    """The run folder, the one-process reference trainer and the ranks' results of one mode."""
    single = fresh_trainer(mode_config(trees, out / mode / "single", mode, pretrained, reference=True))
    assert single.fit() == "max_steps"
    ranks = [torch.load(out / mode / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return out / mode, single, ranks


@pytest.fixture(scope="module")
def runs(trees, spawned):
    return mode_runs(trees, spawned, "joint")


@pytest.fixture(scope="module")
def domain_runs(trees, spawned):
    return mode_runs(trees, spawned, "per_domain")


@pytest.fixture(scope="module")
def cc_runs(trees, spawned, pretrained):
    return mode_runs(trees, spawned, "cluster_contrast", pretrained)


def assert_close_dicts(got: dict, want: dict, what: str) -> None:
    """Equal to float32 rounding: sums over half batches and over the whole batch round differently."""
    assert got.keys() == want.keys()
    for name, value in want.items():
        scale = float(value.double().abs().max()) if value.numel() else 0.0
        torch.testing.assert_close(got[name].double(), value.double(), rtol=1e-4, atol=1e-4 * scale + 1e-8,
                                   msg=lambda m: f"{what} {name}: {m}")


def test_ranks_run_ddp_with_synchronised_batchnorm_on_half_batches(runs):
    _, _, ranks = runs
    for r in ranks:
        assert r["status"] == "max_steps" and r["ddp"]
        assert r["global_bn"] == 3  # the tiny backbone's three BatchNorms
        assert r["local_batch"] == 8  # 4 auxiliary + 4 target of the global 8 + 8


def test_loss_terms_of_every_step_equal_the_single_process_run(runs):
    out, single, _ = runs
    want = read_log(out / "single" / "log.jsonl", "step")
    got = read_log(out / "rank0" / "log.jsonl", "step")
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(STEPS))
    for g, w in zip(got, want):
        assert w["mdl"] > 0 and w["mined"] > 0  # L_MDL is really on
        for key in ("loss", "al", "rj", "ral", "cml", "mdl", "threshold", "cml_cam0", "cml_cam1", "cml_cam2"):
            assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-7), key
        for key in ("mined", "positives", "negatives", "tp_rate", "mined_tp_rate"):
            assert g.get(key) == w.get(key), key


def test_gradients_after_the_last_step_equal_the_single_process_run(runs):
    _, single, ranks = runs
    want = {name: p.grad for name, p in single.model.named_parameters()}
    assert all(g is not None and g.abs().sum() > 0 for g in want.values())
    for r in ranks:
        assert_close_dicts(r["grads"], want, "gradient")


def test_weights_batchnorm_statistics_and_loss_state_equal_the_single_process_run(runs):
    _, single, ranks = runs
    for r in ranks:
        assert_close_dicts(r["model"], single.model.state_dict(), "model")
        assert_close_dicts(r["loss"], single.loss.state_dict(), "loss state")
    # The soft multilabel memory, T and the running statistics are the same on every rank, bit for bit.
    for name, value in ranks[0]["loss"].items():
        assert torch.equal(value, ranks[1]["loss"][name]), name


def test_only_rank_zero_writes_checkpoints_and_logs(runs):
    out, _, _ = runs
    assert load_checkpoint(out / "rank0" / "last.pt")["step"] == STEPS
    assert len(read_log(out / "rank0" / "log.jsonl", "step")) == STEPS
    assert sorted(p.name for p in (out / "rank1").iterdir()) == []


def test_two_rank_checkpoint_resumes_in_one_process(runs, trees):
    out, single, _ = runs
    single.max_steps = STEPS + 1
    assert single.fit() == "max_steps"
    cfg = make_config(trees, out / "rank0", "train.forward=joint", f"train.max_steps={STEPS + 1}")
    resumed = MARTrainer(cfg, load_auxiliary(cfg), load_target(cfg), cfg.output.run_dir)
    resumed.resume()
    assert resumed.step == STEPS
    assert resumed.fit() == "max_steps"
    assert_close_dicts(resumed.model.state_dict(), single.model.state_dict(), "model")
    assert_close_dicts(resumed.loss.state_dict(), single.loss.state_dict(), "loss state")


def test_per_domain_batchnorm_batches_give_the_single_process_run_on_any_rank_count(domain_runs):
    """Each rank runs its slice's groups of 2 per domain; only rank 0's first group of each
    domain moves the running statistics, which DDP broadcasts: the result is one process's."""
    out, single, ranks = domain_runs
    assert single.bn_groups.sizes == (2,) * 8 and single.bn_groups.update == (True, False, False, False) * 2
    want_log = read_log(out / "single" / "log.jsonl", "step")
    got_log = read_log(out / "rank0" / "log.jsonl", "step")
    for g, w in zip(got_log, want_log, strict=True):
        assert w["mdl"] > 0
        for key in ("loss", "al", "rj", "cml", "mdl", "threshold"):
            assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-7), key
    want = {name: p.grad for name, p in single.model.named_parameters()}
    for r in ranks:
        assert r["ddp"] and r["global_bn"] == 0 and r["bn_groups"] == (2, 2, 2, 2)
        assert_close_dicts(r["grads"], want, "gradient")
    # Rank 0 holds (and saves) the running statistics; they are the one-process run's.
    assert_close_dicts(ranks[0]["model"], single.model.state_dict(), "model")
    assert_close_dicts(ranks[0]["loss"], single.loss.state_dict(), "loss state")


def test_cluster_contrast_on_two_ranks_gives_the_single_process_run(cc_runs):
    """Each rank forwards half of each identity-balanced batch (BatchNorm groups of 2, rank 0's
    first one moving the running statistics); every rank clusters, rank 0's labels and centres
    are kept; the memory moves with the gathered global batch."""
    out, single, ranks = cc_runs
    assert single.bn_groups.sizes == (2,) * 4 and len(single.batches.step_items(0, 0)) == 8
    for r in ranks:
        assert r["status"] == "max_steps" and r["ddp"] and r["global_bn"] == 0
        assert r["bn_groups"] == (2, 2) and r["local_batch"] == 4  # half of the global 8
    want_log = read_log(out / "single" / "log.jsonl", "step")
    got_log = read_log(out / "rank0" / "log.jsonl", "step")
    assert [r["step"] for r in got_log] == [r["step"] for r in want_log] == list(range(CC_STEPS))
    for g, w in zip(got_log, want_log, strict=True):
        assert w["contrast"] > 0
        for key in ("loss", "contrast"):
            assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-7), key
    # clustered for epochs 0 and 1, rank 0's clusterings being the one process's
    want_clusters = read_log(out / "single" / "log.jsonl", "cluster")
    got_clusters = read_log(out / "rank0" / "log.jsonl", "cluster")
    assert [c["epoch"] for c in got_clusters] == [c["epoch"] for c in want_clusters] == [0, 1]
    for g, w in zip(got_clusters, want_clusters, strict=True):
        assert (g["clusters"], g["outlier_share"]) == (w["clusters"], w["outlier_share"])
    want = {name: p.grad for name, p in single.model.named_parameters() if p.grad is not None}
    assert "agents.weight" not in want and all(g.abs().sum() > 0 for g in want.values())
    for r in ranks:
        assert_close_dicts(r["grads"], want, "gradient")
    state = single.method.state_dict()
    assert state.keys() == {"labels", "prepared_epoch", "memory.centres"} and int(state["prepared_epoch"]) == 1
    assert_close_dicts(ranks[0]["model"], single.model.state_dict(), "model")
    assert_close_dicts(ranks[0]["loss"], state, "method state")
    for r in ranks:
        assert torch.equal(r["loss"]["labels"], state["labels"])
        assert int(r["loss"]["prepared_epoch"]) == 1
    # labels and memory are the same on every rank, bit for bit
    for name, value in ranks[0]["loss"].items():
        assert torch.equal(value, ranks[1]["loss"][name]), name


def test_global_batchnorm_equals_one_batchnorm_over_the_whole_batch(runs):
    _, _, ranks = runs
    x, upstream, weight, bias = bn_problem()
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    x = x.clone().requires_grad_()
    out = bn(x)
    (out * upstream).sum().backward()
    n = BN_ROWS_PER_RANK
    for r, got in enumerate(ranks):
        torch.testing.assert_close(got["bn_out"], out[r * n : (r + 1) * n].detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["bn_input_grad"], x.grad[r * n : (r + 1) * n], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got["bn_running_mean"], bn.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["bn_running_var"], bn.running_var, rtol=1e-5, atol=1e-6)
    # Parameter gradients stay per rank (DDP reduces them): their sum is the whole batch's.
    torch.testing.assert_close(ranks[0]["bn_weight_grad"] + ranks[1]["bn_weight_grad"], bn.weight.grad,
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ranks[0]["bn_bias_grad"] + ranks[1]["bn_bias_grad"], bn.bias.grad,
                               rtol=1e-4, atol=1e-5)


def test_gathers_keep_rank_order_and_send_gradients_to_local_rows_only(runs):
    _, _, ranks = runs
    coefficients = torch.arange(WORLD * 2 * 3, dtype=torch.float32).reshape(WORLD * 2, 3)
    for r, got in enumerate(ranks):
        assert got["gathered"].tolist() == [[1.0] * 3] * 2 + [[2.0] * 3] * 2
        assert torch.equal(got["gather_grad"], coefficients[2 * r : 2 * r + 2])
        # Rank r held [first stream row; two second stream rows] = 10r, 10r+1, 10r+2.
        assert got["first"].flatten().tolist() == [0, 10]
        assert got["second"].flatten().tolist() == [1, 2, 11, 12]
        assert got["any_one"] is True and got["any_none"] is False


def test_rank_slices_of_paired_batches_make_up_the_global_batch(trees):
    cfg = make_config(trees, trees / "unused")
    aux = ImageDataset(load_auxiliary(cfg), lambda img, seed: img)
    target = ImageDataset(load_target(cfg).train, lambda img, seed: img)
    whole = PairedBatches(aux, target, 8, 8, seed=3)
    halves = [PairedBatches(aux, target, 8, 8, seed=3, rank=r, world_size=2) for r in range(2)]
    for epoch, step in ((0, 0), (1, 2)):
        items = whole.step_items(epoch, step)
        parts = [h.step_items(epoch, step) for h in halves]
        assert parts[0][:4] + parts[1][:4] == items[:8]  # auxiliary, with their augmentation seeds
        assert parts[0][4:] + parts[1][4:] == items[8:]  # target
    with pytest.raises(ConfigError, match="target_batch=6 cannot be split evenly over 4 ranks"):
        PairedBatches(aux, target, 8, 6, seed=3, rank=0, world_size=4)
    with pytest.raises(ConfigError, match="rank 2 is outside 0..1"):
        PairedBatches(aux, target, 8, 8, seed=3, rank=2, world_size=2)
