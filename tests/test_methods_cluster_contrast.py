"""Cluster contrast through the engine on tiny generated data: exact resume across epoch boundaries
without clustering again mid-epoch, the clustering and the hybrid's distance against independent
computations, fixed agents, no auxiliary set, and the cc section's checks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fakedata import make_training_trees
from marreid.config import load_config
from marreid.data.loaders import read_image
from marreid.engine.checkpoint import load_checkpoint
from marreid.engine.extract import eval_transform, extract_features, load_target
from marreid.engine.logging import RunLogger, read_log
from marreid.engine.pretrain import run_pretrain
from marreid.engine.train import AdaptTrainer, run_train
from marreid.errors import ConfigError, TrainingError
from marreid.methods import cluster_contrast
from marreid.methods.cluster_contrast import ClusterContrast
from marreid.metrics.cluster import cluster_centres, clustering_scores, pseudo_labels
from marreid.metrics.rerank import k_reciprocal_jaccard
from test_engine_train import config as base_config

STEPS_PER_EPOCH = 3
EPOCHS = 3
K1, K2, EPS, MIN_SAMPLES = 6, 2, 0.5, 2


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    return make_training_trees(tmp_path_factory.mktemp("cc_data"))


@pytest.fixture(scope="module")
def pretrained(trees, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cc_pretrain")
    run_pretrain(base_config(trees, folder, f"output.pretrain_dir={folder}", "pretrain.epochs=2",
                             "pretrain.batch_size=8", "pretrain.lr=0.05"))
    return folder / "last.pt"


def config(trees, pretrained, run_dir, *extra):
    return base_config(trees, run_dir, "train.method=cluster_contrast", f"train.pretrained_checkpoint={pretrained}",
                       f"cc.k1={K1}", f"cc.k2={K2}", f"cc.eps={EPS}", f"cc.min_samples={MIN_SAMPLES}",
                       "cc.batch_size=8", "cc.instances=2", f"cc.iters_per_epoch={STEPS_PER_EPOCH}",
                       f"cc.epochs={EPOCHS}", "cc.lr=1e-3", "cc.milestones=[0.5]", *extra)


def trainer(cfg) -> AdaptTrainer:
    return AdaptTrainer(cfg, None, load_target(cfg), cfg.output.run_dir,
                        logger=RunLogger(cfg.output.run_dir, enabled=False))


def fresh(cfg) -> AdaptTrainer:
    run = trainer(cfg)
    run.load_start_weights()
    run.initialize()
    run.save()
    return run


def clustered_epochs(run_dir) -> list[int]:
    return [r["epoch"] for r in read_log(run_dir / "log.jsonl", "cluster")]


def assert_same_state(a: AdaptTrainer, b: AdaptTrainer) -> None:
    for name, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[name]), f"model {name} differs"
    for pa, pb in zip(a.optimizer.param_groups[0]["params"], b.optimizer.param_groups[0]["params"], strict=True):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(a.optimizer.state[pa][key], b.optimizer.state[pb][key]), key
    assert a.scheduler.state_dict() == b.scheduler.state_dict()
    state_a, state_b = a.method.state_dict(), b.method.state_dict()
    assert state_a.keys() == state_b.keys() == {"labels", "prepared_epoch", "memory.centres"}
    for name, value in state_a.items():
        assert torch.equal(value, state_b[name]), f"method state {name} differs"


@pytest.fixture(scope="module")
def uninterrupted(trees, pretrained, tmp_path_factory):
    """The whole run, with the labels and centres of each clustering as it was made."""
    cfg = config(trees, pretrained, tmp_path_factory.mktemp("cc_full"))
    made = []
    with pytest.MonkeyPatch.context() as patch:
        original = ClusterContrast.cluster

        def spy(self, epoch, context):
            labels = original(self, epoch, context)
            made.append((epoch, labels.copy(), self.memory.centres.clone()))
            return labels

        patch.setattr(ClusterContrast, "cluster", spy)
        run = fresh(cfg)
        assert run.fit() == "done"
    assert run.step == EPOCHS * STEPS_PER_EPOCH
    return run, made


@pytest.mark.parametrize("stop_at", [4, 3])  # mid-epoch (step 1 of epoch 1), and on an epoch's last step
def test_interrupted_and_resumed_run_ends_identical_and_clusters_once_per_epoch(trees, pretrained, tmp_path,
                                                                               uninterrupted, monkeypatch, stop_at):
    full, made = uninterrupted
    cfg = config(trees, pretrained, tmp_path, f"train.max_steps={stop_at}")
    first = fresh(cfg)
    assert first.fit() == "max_steps"
    saved = load_checkpoint(tmp_path / "last.pt")
    assert (saved["step"], saved["method"]) == (stop_at, "cluster_contrast")
    assert int(saved["loss"]["prepared_epoch"]) == stop_at // STEPS_PER_EPOCH - (stop_at % STEPS_PER_EPOCH == 0)

    seen = []
    original = ClusterContrast.cluster
    monkeypatch.setattr(ClusterContrast, "cluster",
                        lambda self, epoch, context: seen.append(epoch) or original(self, epoch, context))
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=None))
    second = trainer(cfg)
    second.resume()
    assert second.step == stop_at
    assert second.fit() == "done"
    # mid-epoch, the resumed run goes on with the saved clustering; it clusters at the next epochs only
    assert seen == list(range((stop_at + STEPS_PER_EPOCH - 1) // STEPS_PER_EPOCH, EPOCHS))
    assert clustered_epochs(tmp_path) == list(range(EPOCHS))
    assert_same_state(full, second)
    assert [r["step"] for r in read_log(tmp_path / "log.jsonl", "step")] == list(range(EPOCHS * STEPS_PER_EPOCH))


def test_the_memory_moves_from_the_centroids_and_the_agents_stay(uninterrupted, pretrained):
    full, made = uninterrupted
    assert [epoch for epoch, _, _ in made] == list(range(EPOCHS))
    last_labels, last_centres = made[-1][1], made[-1][2]
    assert np.array_equal(full.method.labels.numpy(), last_labels)
    centres = full.method.memory.centres
    assert centres.shape == last_centres.shape and not torch.allclose(centres, last_centres)
    torch.testing.assert_close(centres.norm(dim=1), torch.ones(len(centres)))
    # The agents are the pretrained rows, outside the optimiser: pure cluster contrast never trains them.
    agents = load_checkpoint(pretrained)["model"]["agents.weight"]
    assert torch.equal(full.model.agents.weight, agents) and not full.model.agents.weight.requires_grad
    trained = {id(p) for group in full.optimizer.param_groups for p in group["params"]}
    assert id(full.model.agents.weight) not in trained
    assert trained == {id(p) for p in full.model.backbone.parameters()}
    steps = read_log(full.run_dir / "log.jsonl", "step")
    assert [r["lr"] for r in steps] == pytest.approx([1e-3] * 3 + [1e-4] * 6)  # milestone int(3 * 0.5) = 1
    assert all(r["loss"] == r["contrast"] > 0 for r in steps)


def test_clustering_equals_an_independent_dense_computation(trees, pretrained, tmp_path):
    cfg = config(trees, pretrained, tmp_path)
    run = trainer(cfg)
    run.load_start_weights()
    target = load_target(cfg)
    features, pids, _ = extract_features(run.model, target.train, eval_transform(cfg), cfg.eval.batch_size, 0, "cpu")
    want = pseudo_labels(k_reciprocal_jaccard(features, K1, K2), EPS, MIN_SAMPLES)  # dense: every pair
    assert want.max() >= 1  # more than one cluster, so the comparison means something
    run.epoch_start(0)
    assert np.array_equal(run.method.labels.numpy(), want)
    torch.testing.assert_close(run.method.memory.centres, cluster_centres(features, want))
    (record,) = read_log(tmp_path / "log.jsonl", "cluster")
    assert record["clusters"] == want.max() + 1 and record["outlier_share"] == pytest.approx(float((want < 0).mean()))
    assert all(record[key] > 0 for key in ("features_s", "distance_s", "dbscan_s"))  # the clustering's cost, logged
    for key, value in clustering_scores(want, pids).items():  # diagnostics: the names' identities
        assert record[key] == pytest.approx(value), key
    run.epoch_start(0)  # prepared already: nothing is clustered again
    assert len(read_log(tmp_path / "log.jsonl", "cluster")) == 1


def test_the_hybrid_clusters_the_jaccard_distance_blended_with_the_agreement(trees, pretrained, tmp_path, monkeypatch):
    weight = 0.45  # below 1 - eps = 0.5, and large enough to change this clustering
    cfg = config(trees, pretrained, tmp_path, f"cc.agreement_weight={weight}")
    run = trainer(cfg)
    run.load_start_weights()
    captured = []
    original = cluster_contrast.pseudo_labels
    monkeypatch.setattr(cluster_contrast, "pseudo_labels",
                        lambda distance, *args: captured.append(distance) or original(distance, *args))
    run.epoch_start(0)

    # By hand: the exact blend over every pair, A(i, j) = sum_k min(y_i^k, y_j^k), y the agents' softmax.
    run.model.eval()
    with torch.no_grad():
        images = torch.stack([eval_transform(cfg)(read_image(s.path)) for s in load_target(cfg).train])
        feat, logits = run.model(images)
    y = torch.softmax(logits.double(), 1)
    agreement = torch.minimum(y[:, None, :], y[None, :, :]).sum(2)
    jaccard = torch.from_numpy(k_reciprocal_jaccard(feat.numpy(), K1, K2)).double()
    exact = (1 - weight) * jaccard + weight * (1 - agreement)
    exact.fill_diagonal_(0.0)
    assert np.array_equal(run.method.labels.numpy(), pseudo_labels(exact.numpy(), EPS, MIN_SAMPLES))
    assert not np.array_equal(run.method.labels.numpy(), pseudo_labels(jaccard.numpy(), EPS, MIN_SAMPLES))
    # every pair that could be an edge is in the distance DBSCAN got, at its blended value
    (distance,) = captured
    stored = torch.from_numpy(distance.toarray()).double()
    near = (jaccard <= EPS / (1 - weight)) & ~torch.eye(len(jaccard), dtype=torch.bool)
    assert bool(near.any())
    torch.testing.assert_close(stored[near], exact[near], rtol=1e-5, atol=1e-5)


def test_a_clustering_without_clusters_is_a_one_line_error(trees, pretrained, tmp_path, monkeypatch):
    run = trainer(config(trees, pretrained, tmp_path))
    monkeypatch.setattr(cluster_contrast, "pseudo_labels", lambda distance, *args: np.full(distance.shape[0], -1))
    with pytest.raises(TrainingError) as info:
        run.epoch_start(0)
    assert str(info.value) == ("the clustering for epoch 1 found no cluster (every target image an outlier at "
                               "cc.eps=0.5, cc.min_samples=2): raise cc.eps or lower cc.min_samples")


def test_backbone_start_reads_no_auxiliary_set(trees, tmp_path, monkeypatch):
    def no_aux(*args, **kwargs):
        raise AssertionError("the auxiliary set was read")

    monkeypatch.setattr("marreid.engine.train.load_auxiliary", no_aux)
    cfg = base_config(trees, tmp_path, "data.aux_root=", "train.method=cluster_contrast", "cc.init=backbone",
                      f"cc.k1={K1}", f"cc.k2={K2}", f"cc.eps={EPS}", f"cc.min_samples={MIN_SAMPLES}",
                      "cc.batch_size=8", "cc.instances=4", "cc.iters_per_epoch=2", "cc.epochs=1")
    result = run_train(cfg)
    assert result["status"] == "done" and result["steps"] == 2 and 0 <= result["metrics"]["mAP"] <= 1
    (start,) = read_log(tmp_path / "log.jsonl", "start")
    assert (start["run"], start["aux_images"], start["num_agents"]) == ("cluster_contrast", 0, 1)
    assert start["terms"] == ["loss", "contrast"]


@pytest.mark.parametrize("override, words", [
    ("cc.instances=3", ["cc.batch_size=64", "cc.instances=3"]),
    ("cc.agreement_weight=0.4", ["cc.agreement_weight", "[0, 0.4)"]),
    ("cc.init=imagenet", ["cc.init", "pretrained, backbone"]),
    ("cc.momentum=1.5", ["cc.momentum"]),
    ("cc.eps=1.0", ["cc.eps", "below 1"]),
    ("cc.milestones=[2.5]", ["cc.milestones"]),
    ("cc.temperature=0", ["cc.temperature"]),
])
def test_cc_options_are_checked_with_one_line_errors(override, words):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert "\n" not in str(info.value) and all(word in str(info.value) for word in words)


def test_cc_defaults_and_the_hybrid_needs_pretrained_agents():
    with pytest.raises(ConfigError, match="cc.init=pretrained"):
        load_config(None, ["cc.init=backbone", "cc.agreement_weight=0.1"])
    cfg = load_config(None, ["train.method=cluster_contrast"])
    assert (cfg.cc.batch_size, cfg.cc.instances, cfg.cc.iters_per_epoch, cfg.cc.epochs) == (64, 4, 200, 8)
    assert (cfg.cc.k1, cfg.cc.k2, cfg.cc.eps, cfg.cc.min_samples, cfg.cc.temperature) == (30, 6, 0.6, 4, 0.05)
    assert (cfg.cc.lr, cfg.cc.weight_decay, cfg.cc.momentum, cfg.cc.agreement_weight) == (3.5e-4, 5e-4, 0.1, 0.0)


def hand_cml(log_y: torch.Tensor, camids: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, momentum: float):
    """L_CML by loops (supplementary Eq. 2, release order): per camera with >= 2 images its mean and
    unbiased std of log y, the running mu / sigma moved toward their averages, then the shares."""
    means, stds = [], []
    for cam in sorted(set(camids.tolist())):
        rows = log_y[camids == cam].double()
        if len(rows) < 2:
            continue
        means.append(rows.mean(0))
        stds.append(rows.std(0, unbiased=True).clamp_min(1e-6))
    mu = (1 - momentum) * mean.double() + momentum * torch.stack(means).mean(0)
    sigma = (1 - momentum) * std.double() + momentum * torch.stack(stds).mean(0)
    total = sum(((m - mu) ** 2).sum() + ((s - sigma) ** 2).sum() for m, s in zip(means, stds)) / (2 * len(means))
    return total, mu, sigma


def test_the_cml_hybrid_adds_lambda1_cml_against_moved_statistics(trees, pretrained, tmp_path):
    from marreid.losses.multilabel import log_soft_multilabel
    from marreid.methods.base import StepOutputs

    cfg = config(trees, pretrained, tmp_path, "cc.cml=true", "mar.lambda_cml=0.01", "mar.stats_momentum=0.2")
    run = fresh(cfg)
    method = run.method
    # fresh_start: mu / sigma from one pass over every target training image
    _, logits, camids = run.target_pass()
    expected = type(method.stats)(logits.shape[1])
    expected.initialize(log_soft_multilabel(logits.float()), camids)
    torch.testing.assert_close(method.stats.running_mean, expected.running_mean)
    torch.testing.assert_close(method.stats.running_std, expected.running_std)

    method.epoch_start(0, run)
    generator = torch.Generator().manual_seed(0)
    index = torch.randperm(len(run.target.train), generator=generator)[:8]
    feat = torch.nn.functional.normalize(torch.randn(8, run.model.feat_dim, generator=generator), dim=1)
    outputs = StepOutputs(tgt_feat=feat, tgt_logits=30.0 * feat @ run.model.agent_matrix().detach().T,
                          tgt_camids=camids[index], tgt_index=index, agents=run.model.agent_matrix())
    before = {k: v.clone() for k, v in method.state_dict().items()}
    terms = method.terms(outputs, 0)
    for key, value in method.state_dict().items():
        assert torch.equal(value, before[key]), f"terms changed {key}"

    cml, mu, sigma = hand_cml(log_soft_multilabel(outputs.tgt_logits), outputs.tgt_camids,
                              method.stats.running_mean, method.stats.running_std, 0.2)
    contrast = cluster_nce_by_hand(feat, method.labels[index], method.memory.centres, cfg.cc.temperature)
    assert terms.log["cml"] == pytest.approx(float(cml), rel=1e-5)
    assert float(terms.total) == pytest.approx(float(contrast + 0.01 * cml), rel=1e-5)
    assert set(terms.weighted) == {"contrast", "cml"} == method.active_terms(0)
    method.update_state(outputs, terms)
    torch.testing.assert_close(method.stats.running_mean.double(), mu)
    torch.testing.assert_close(method.stats.running_std.double(), sigma)


def cluster_nce_by_hand(feat, labels, centres, temperature):
    total = 0.0
    for f, y in zip(feat.double(), labels.tolist()):
        logits = centres.double() @ f / temperature
        total += -(logits[y] - torch.logsumexp(logits, 0))
    return total / len(feat)


def test_the_cml_hybrid_resumes_with_its_statistics(trees, pretrained, tmp_path):
    cfg = config(trees, pretrained, tmp_path, "cc.cml=true", "train.max_steps=4")
    first = fresh(cfg)
    assert first.fit() == "max_steps"
    saved = load_checkpoint(tmp_path / "last.pt")["loss"]
    assert {"stats.running_mean", "stats.running_std", "stats.initialized"} <= set(saved)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=None))
    second = trainer(cfg)
    second.resume()
    for name, value in first.method.state_dict().items():
        assert torch.equal(value, second.method.state_dict()[name]), name
    assert second.fit() == "done"
