"""The per-domain forward pass (engine.forward): which rows share a BatchNorm batch, the
normalisation and running statistics against hand computations, gradients against a
network written out by hand, and the MAR trainer's step against separate model calls."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fakedata import make_training_trees
from test_engine_train import config
from marreid.analysis.gradients import term_gradients
from marreid.config import load_config
from marreid.data.loaders import augmented_pass_loader, read_image
from marreid.data.transforms import TestTransform
from marreid.engine.extract import load_target
from marreid.engine.forward import BatchNormGroups, GroupedForward, plan_groups, running_stats_frozen
from marreid.engine.logging import RunLogger
from marreid.engine.pretrain import load_auxiliary, train_transform
from marreid.engine.train import MARTrainer
from marreid.errors import ConfigError
from marreid.losses import MARLoss
from marreid.models import build_model

EPS = 1e-5
MOMENTUM = 0.1


class Probe(nn.Module):
    """A BatchNorm alone, returning (output,) as the MAR model returns a tuple."""

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, eps=EPS, momentum=MOMENTUM)
        with torch.no_grad():
            self.bn.weight.copy_(torch.tensor([0.5, 1.5, 2.0][:channels]))
            self.bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3][:channels]))

    def forward(self, x):
        return (self.bn(x),)


class SmallNet(nn.Module):
    """conv -> BatchNorm -> ReLU -> average pool -> L2-normalised feature, and scaled cosine logits."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4, eps=EPS, momentum=MOMENTUM)
        self.agents = nn.Linear(4, 5, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g))
            self.bn.weight.copy_(torch.rand(4, generator=g) + 0.5)
            self.bn.bias.copy_(torch.randn(4, generator=g))
            self.agents.weight.copy_(torch.randn(5, 4, generator=g))

    def forward(self, x):
        feat = F.normalize(F.relu(self.bn(self.conv(x))).mean((2, 3)), dim=1)
        return feat, 30.0 * feat @ F.normalize(self.agents.weight, dim=1).T


def domains(n_aux=4, n_tgt=4, seed=1):
    """Two domains with very different pixel statistics."""
    g = torch.Generator().manual_seed(seed)
    aux = torch.randn(n_aux, 3, 5, 4, generator=g) * 2.0 + 3.0
    tgt = torch.randn(n_tgt, 3, 5, 4, generator=g) * 0.5 - 1.0
    return aux, tgt


def hand_batchnorm(x, weight, bias):
    """(x - mean) / sqrt(var + eps) * weight + bias per channel, mean and biased var over (N, H, W), by loops."""
    out = torch.empty_like(x, dtype=torch.float64)
    xd = x.double()
    for c in range(x.shape[1]):
        values = [float(v) for v in xd[:, c].flatten()]
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / len(values)
        out[:, c] = (xd[:, c] - mean) / (var + EPS) ** 0.5 * float(weight[c]) + float(bias[c])
    return out


def channel_stats(x):
    """Per-channel mean and unbiased variance over (N, H, W), by loops."""
    means, variances = [], []
    for c in range(x.shape[1]):
        values = [float(v) for v in x[:, c].double().flatten()]
        mean = sum(values) / len(values)
        means.append(mean)
        variances.append(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return torch.tensor(means, dtype=torch.float64), torch.tensor(variances, dtype=torch.float64)


def test_plan_groups_joint_per_domain_and_release_groups():
    assert plan_groups(6, 4, "joint", None) == BatchNormGroups((10,), (True,))
    assert plan_groups(6, 4, "per_domain", None) == BatchNormGroups((6, 4), (True, True))
    # The release: 184 images per domain over 4 DataParallel replicas, replica 0's statistics kept.
    release = plan_groups(184, 184, "per_domain", 46)
    assert release.sizes == (46,) * 8 and release.update == (True, False, False, False) * 2
    # Under torchrun the same global groups are split over the ranks; only rank 0 updates.
    assert plan_groups(92, 92, "per_domain", 46, rank=0, world_size=2).update == (True, False, True, False)
    assert plan_groups(92, 92, "per_domain", 46, rank=1, world_size=2).update == (False,) * 4


def test_plan_groups_refuses_what_would_depend_on_the_process_count():
    with pytest.raises(ConfigError, match="train.bn_batch must be set under torchrun"):
        plan_groups(4, 4, "per_domain", None, rank=0, world_size=2)
    with pytest.raises(ConfigError, match=r"train.bn_batch=4 does not divide the 6 train.target_batch"):
        plan_groups(8, 6, "per_domain", 4)
    with pytest.raises(ConfigError, match="train.forward"):
        plan_groups(8, 8, "both", None)


@pytest.mark.parametrize("options, message", [
    (["train.forward=sideways"], "train.forward: expected one of per_domain, joint"),
    (["train.forward=joint", "train.bn_batch=4"], "only train.forward=per_domain"),
    (["train.sync_bn=true"], "train.sync_bn: synchronised BatchNorm would pool both domains"),
    (["train.bn_batch=1"], "at least 2 images"),
    (["train.bn_batch=48"], r"train.bn_batch=48 does not divide train.aux_batch=184"),
])
def test_config_refuses_inconsistent_forward_options(options, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, options)


def test_config_defaults_to_the_release_per_domain_forward():
    cfg = load_config(None, [])
    assert cfg.train.forward == "per_domain" and cfg.train.bn_batch is None
    assert load_config(None, ["train.bn_batch=46"]).train.bn_batch == 46


def test_each_domain_is_normalised_with_its_own_batch_statistics():
    aux, tgt = domains()
    probe = Probe().train()
    net = GroupedForward(probe)
    (out,) = net(torch.cat([aux, tgt]), plan_groups(4, 4, "per_domain", None))
    w, b = probe.bn.weight.detach(), probe.bn.bias.detach()
    torch.testing.assert_close(out[:4].double(), hand_batchnorm(aux, w, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[4:].double(), hand_batchnorm(tgt, w, b), rtol=1e-5, atol=1e-5)
    # The joint pass normalises both domains together, which is not the same at all.
    (joint,) = GroupedForward(Probe().train())(torch.cat([aux, tgt]), plan_groups(4, 4, "joint", None))
    torch.testing.assert_close(joint.double(), hand_batchnorm(torch.cat([aux, tgt]), w, b), rtol=1e-5, atol=1e-5)
    assert (joint[4:] - out[4:]).abs().max() > 0.5


def test_groups_of_bn_batch_rows_are_each_normalised_alone():
    aux, tgt = domains(n_aux=6, n_tgt=4)
    probe = Probe().train()
    (out,) = GroupedForward(probe)(torch.cat([aux, tgt]), plan_groups(6, 4, "per_domain", 2))
    w, b = probe.bn.weight.detach(), probe.bn.bias.detach()
    rows = torch.cat([aux, tgt])
    for start in range(0, 10, 2):
        torch.testing.assert_close(out[start : start + 2].double(), hand_batchnorm(rows[start : start + 2], w, b),
                                   rtol=1e-5, atol=1e-5)


def test_running_statistics_follow_the_first_group_of_each_domain_auxiliary_first():
    aux, tgt = domains(n_aux=4, n_tgt=4)
    probe = Probe().train()
    with torch.no_grad():
        probe.bn.running_mean.copy_(torch.tensor([0.3, -0.4, 1.0]))
        probe.bn.running_var.copy_(torch.tensor([2.0, 0.5, 1.5]))
    mean, var = probe.bn.running_mean.double().clone(), probe.bn.running_var.double().clone()
    GroupedForward(probe)(torch.cat([aux, tgt]), plan_groups(4, 4, "per_domain", 2))
    for group in (aux[:2], tgt[:2]):  # replica 0 of each pass: the first 2 rows of each domain
        group_mean, group_var = channel_stats(group)
        mean = (1 - MOMENTUM) * mean + MOMENTUM * group_mean
        var = (1 - MOMENTUM) * var + MOMENTUM * group_var
    torch.testing.assert_close(probe.bn.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probe.bn.running_var.double(), var, rtol=1e-5, atol=1e-6)
    assert int(probe.bn.num_batches_tracked) == 2


def test_frozen_running_statistics_are_restored_even_on_error():
    probe = Probe().train()
    with pytest.raises(RuntimeError):
        with running_stats_frozen(probe):
            assert probe.bn.track_running_stats is False
            probe(torch.randn(2, 4, 3, 3))  # wrong channel count
    assert probe.bn.track_running_stats is True


def reference_outputs(net: SmallNet, images: torch.Tensor, sizes: tuple[int, ...]):
    """SmallNet written out by hand, each group of rows normalised with its own statistics."""
    feats = []
    for group in images.split(list(sizes)):
        x = F.conv2d(group, net.conv.weight, padding=1)
        n = x.shape[0] * x.shape[2] * x.shape[3]
        mean = x.sum((0, 2, 3), keepdim=True) / n
        var = ((x - mean) ** 2).sum((0, 2, 3), keepdim=True) / n
        x = (x - mean) / torch.sqrt(var + EPS) * net.bn.weight.view(1, -1, 1, 1) + net.bn.bias.view(1, -1, 1, 1)
        pooled = torch.clamp(x, min=0).sum((2, 3)) / (x.shape[2] * x.shape[3])
        feats.append(pooled / pooled.norm(dim=1, keepdim=True).clamp_min(1e-12))
    feat = torch.cat(feats)
    agents = net.agents.weight / net.agents.weight.norm(dim=1, keepdim=True)
    return feat, 30.0 * feat @ agents.T


@pytest.mark.parametrize("forward, bn_batch", [("per_domain", None), ("per_domain", 2), ("joint", None)])
def test_gradients_equal_the_network_written_out_by_hand(forward, bn_batch):
    aux, tgt = domains(n_aux=4, n_tgt=6, seed=3)
    images = torch.cat([aux, tgt])
    groups = plan_groups(4, 6, forward, bn_batch)
    g = torch.Generator().manual_seed(7)
    feat_weights, logit_weights = torch.randn(10, 4, generator=g), torch.randn(10, 5, generator=g)

    def loss_of(feat, logits):
        return (feat * feat_weights).sum() + (logits.log_softmax(1) * logit_weights).sum()

    model = SmallNet().train()
    reference = copy.deepcopy(model)
    loss_of(*GroupedForward(model)(images, groups)).backward()
    loss_of(*reference_outputs(reference, images, groups.sizes)).backward()
    for (name, got), want in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert got.grad.abs().sum() > 0, name
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    return make_training_trees(tmp_path_factory.mktemp("forward_data"))


def mar_config(trees, run_dir, *extra):
    """The engine tests' tiny run, with L_MDL from the first step and no diagnostics."""
    return config(trees, run_dir, "mar.mdl_start_epoch=0", "train.diagnostics=false", *extra)


@pytest.mark.parametrize("bn_batch", [None, 4])
def test_mar_step_equals_separate_model_calls_per_batchnorm_batch(trees, tmp_path, bn_batch):
    """The trainer's loss and gradient against the slow way: the auxiliary images, then the
    target images, through the model in separate calls of bn_batch images each."""
    extra = [] if bn_batch is None else [f"train.bn_batch={bn_batch}"]
    cfg = mar_config(trees, tmp_path, *extra)
    run = MARTrainer(cfg, load_auxiliary(cfg), load_target(cfg), tmp_path, logger=RunLogger(tmp_path, enabled=False))
    run.initialize()
    slow_model, slow_loss = copy.deepcopy(run.model), copy.deepcopy(run.loss)
    _, aux_batch, target_batch = next(iter(run.batches.iterate(0)))
    total, terms = run.compute_loss(0, aux_batch, target_batch)
    total.backward()

    size = bn_batch or 8
    outputs = []
    for images in (aux_batch[0], target_batch[0]):
        for i, group in enumerate(images.split(size)):
            if i == 0:
                outputs.append(slow_model(group))
            else:
                with running_stats_frozen(slow_model):
                    outputs.append(slow_model(group))
    n_groups = 8 // size
    aux_feat, aux_logits = (torch.cat(p) for p in zip(*outputs[:n_groups]))
    tgt_feat, tgt_logits = (torch.cat(p) for p in zip(*outputs[n_groups:]))
    want, want_terms = slow_loss(aux_feat, aux_logits, aux_batch[1], tgt_feat, tgt_logits, target_batch[2],
                                 target_batch[3], slow_model.agent_matrix(), mdl_on=True)
    want.backward()
    assert terms["mdl"] == pytest.approx(want_terms["mdl"], rel=1e-5) and terms["mdl"] > 0
    assert total.item() == pytest.approx(want.item(), rel=1e-5)
    for (name, p), q in zip(run.model.named_parameters(), slow_model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    for (name, b), c in zip(run.model.named_buffers(), slow_model.buffers(), strict=True):
        torch.testing.assert_close(b, c, msg=lambda m: f"{name}: {m}")


def test_release_init_pass_is_one_augmented_shuffled_drop_last_pass(trees, tmp_path):
    """mar.init_pass=release: eval mode over the release's training loader; 'all' over every image."""
    cfg = mar_config(trees, tmp_path, "mar.init_pass=release", "train.target_batch=5", "eval.batch_size=4")
    target = load_target(cfg)
    n = len(target.train)
    loader = augmented_pass_loader(target.train, train_transform(cfg), cfg.train.seed, 5, 4)
    images, indices = [], []
    for batch_images, _, _, batch_index in loader:
        images.append(batch_images)
        indices += batch_index.tolist()
    assert len(indices) == n // 5 * 5 < n and len(set(indices)) == len(indices)
    assert indices != sorted(indices)  # shuffled
    plain = torch.stack([TestTransform(32, 16)(read_image(target.train[i].path)) for i in indices])
    assert not torch.equal(torch.cat(images), plain)  # augmented (flip / crop)
    again = [i for _, _, _, b in augmented_pass_loader(target.train, train_transform(cfg), 0, 5, 4) for i in b.tolist()]
    assert again == indices

    run = MARTrainer(cfg, load_auxiliary(cfg), target, tmp_path, logger=RunLogger(tmp_path, enabled=False))
    expected = copy.deepcopy(run.loss)
    run.model.eval()
    with torch.no_grad():
        logits = run.model(torch.cat(images))[1]
    expected.initialize(logits, torch.tensor([target.train[i].camid for i in indices]))
    run.model.train()
    run.initialize()
    assert run.model.training
    for name, value in expected.state_dict().items():
        torch.testing.assert_close(run.loss.state_dict()[name], value, msg=lambda m: f"{name}: {m}")

    every = MARTrainer(mar_config(trees, tmp_path / "all"), load_auxiliary(cfg), target, tmp_path / "all",
                       logger=RunLogger(tmp_path / "all", enabled=False))
    every.initialize()
    assert not torch.equal(every.loss.stats.running_mean, run.loss.stats.running_mean)


def test_gradient_shares_diagnostic_uses_the_training_batchnorm_groups():
    """analysis.gradients.term_gradients with per-domain groups: its terms add up to the gradient
    of Eq. 10 over two separate model calls, not to the joint pass's."""
    torch.manual_seed(0)
    model = build_model("tiny", 5, scale=10.0).train()
    loss = MARLoss(5, 8, mining_ratio=0.2, lambda_cml=0.05, lambda_ral=2.0)
    camids = torch.arange(8) % 2
    with torch.no_grad():
        loss.initialize(model(torch.randn(8, 3, 32, 16))[1], camids)
    aux, tgt = torch.randn(6, 3, 32, 16) + 1.0, torch.randn(8, 3, 32, 16) - 1.0
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    grads = term_gradients(model, loss, aux, labels, tgt, camids, torch.arange(8),
                           groups=plan_groups(6, 8, "per_domain", None))
    params = list(model.backbone.parameters())
    loss.eval()
    aux_feat, aux_logits = model(aux)
    tgt_feat, tgt_logits = model(tgt)
    total, _ = loss(aux_feat, aux_logits, labels, tgt_feat, tgt_logits, camids, torch.arange(8),
                    model.agent_matrix(), mdl_on=True)
    want = torch.cat([g.flatten() for g in torch.autograd.grad(total, params)])
    got = sum(grads.values())
    assert float((got - want).norm()) < 1e-5 * float(want.norm())
    joint = sum(term_gradients(model, loss, aux, labels, tgt, camids, torch.arange(8)).values())
    assert float((joint - want).norm()) > 1e-2 * float(want.norm())


def test_without_grad_from_marks_the_groups_after_a_row():
    groups = plan_groups(4, 4, "per_domain", 2)
    assert groups.without_grad_from(4).grad == (True, True, False, False)
    assert plan_groups(4, 4, "joint", None).without_grad_from(4).grad == (True,)  # one group: kept


@pytest.mark.parametrize("bn_batch", [None, 4])
def test_auxiliary_only_step_skips_the_target_graph_and_changes_nothing_else(trees, tmp_path, bn_batch):
    """The L_AL-only control: the target pass runs without autograd (it still moves the running
    statistics), and the gradient, loss and BatchNorm state equal those of a full-graph pass."""
    extra = ["mar.use_rj=false", "mar.use_cml=false", "mar.use_mdl=false"]
    extra += [] if bn_batch is None else [f"train.bn_batch={bn_batch}"]
    cfg = mar_config(trees, tmp_path, *extra)
    run = MARTrainer(cfg, load_auxiliary(cfg), load_target(cfg), tmp_path, logger=RunLogger(tmp_path, enabled=False))
    assert not run.target_terms_on(5) and run.trains_in(0)
    full = copy.deepcopy(run.model)
    _, aux_batch, target_batch = next(iter(run.batches.iterate(0)))
    seen = []
    run.model.backbone.register_forward_hook(lambda module, args, out: seen.append(out.requires_grad))
    total, _ = run.compute_loss(0, aux_batch, target_batch)
    total.backward()
    groups = len(run.bn_groups.sizes) // 2
    assert seen == [True] * groups + [False] * groups
    feat, logits = GroupedForward(full)(torch.cat([aux_batch[0], target_batch[0]]), run.bn_groups)
    want = cfg.mar.lambda_ral * F.cross_entropy(logits[:8], aux_batch[1])
    want.backward()
    assert total.item() == pytest.approx(want.item(), rel=1e-6)
    for (name, p), q in zip(run.model.named_parameters(), full.parameters(), strict=True):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, msg=lambda m: f"{name}: {m}")
    for (name, b), c in zip(run.model.named_buffers(), full.buffers(), strict=True):
        torch.testing.assert_close(b, c, msg=lambda m: f"{name}: {m}")
