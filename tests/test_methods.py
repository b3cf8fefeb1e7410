"""The method contract (methods.base / registry) and MAR through it: terms as a value and the state
update after it give MARLoss.forward's numbers and state bit for bit; names, a checkpoint's method,
and a method with other terms going through the engine, the gradient diagnostic and the curves
without any of them naming its terms."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import default_collate

from fakedata import make_training_trees
from marreid.analysis.curves import logged_terms, panel_groups, step_table, write_curves
from marreid.analysis.gradients import checkpoint_gradient_shares, gradient_shares, method_term_gradients
from marreid.config import load_config
from marreid.data import Sample
from marreid.data.loaders import ImageDataset
from marreid.engine.checkpoint import load_checkpoint
from marreid.engine.extract import eval_transform, load_target, model_from_checkpoint
from marreid.engine.logging import RunLogger, read_log
from marreid.engine.pretrain import load_auxiliary
from marreid.engine.train import AdaptTrainer, run_train
from marreid.errors import CheckpointError, ConfigError, TrainingError
from marreid.losses.total import MARLoss
from marreid.methods.base import BatchShape, Method, StepOutputs, Terms
from marreid.methods.cluster_contrast import ClusterContrast
from marreid.methods.mar import MARMethod
from marreid.methods.registry import METHODS, method_class
from test_engine_train import config as mar_config
from test_losses_total import BATCHES, N_AGENTS, N_TARGET, SCALE, World

# test_losses_total's CONFIG as the mar section
MAR_OPTIONS = ["mar.lambda_cml=0.3", "mar.lambda_ral=2.0", "mar.beta=0.2", "mar.margin=1.0", "mar.mining_ratio=0.2",
               "mar.mdl_start_epoch=1", "train.aux_batch=6", "train.target_batch=8"]
LOSS_OPTIONS = dict(lambda_cml=0.3, lambda_ral=2.0, beta=0.2, margin=1.0, mining_ratio=0.2)


def mar_method(world: World) -> MARMethod:
    """The MAR method built from a configuration, on a context that holds only what it reads."""
    cfg = load_config(None, MAR_OPTIONS)
    context = SimpleNamespace(
        cfg=cfg, model=SimpleNamespace(num_agents=N_AGENTS), device=torch.device("cpu"),
        ranks=SimpleNamespace(rank=0, world_size=1),
        aux=[Sample(f"a{i}.jpg", i % N_AGENTS, 0) for i in range(12)],
        target=SimpleNamespace(train=[Sample(f"t{i}.jpg", 0, int(c)) for i, c in enumerate(world.camids)]),
    )
    method = MARMethod(cfg, context).double()
    method.initialize(world.init_logits, world.camids)
    return method


def outputs_of(world: World, inp: dict) -> StepOutputs:
    agents = F.normalize(world.weight, dim=1)
    return StepOutputs(tgt_feat=inp["tgt_feat"], tgt_logits=SCALE * inp["tgt_feat"] @ agents.T,
                       tgt_camids=world.camids[inp["index"]], tgt_index=inp["index"], agents=agents,
                       aux_feat=inp["aux_feat"], aux_logits=SCALE * inp["aux_feat"] @ agents.T,
                       aux_labels=inp["aux_labels"], tgt_pids=world.pids[inp["index"]])


def state_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_equal_state(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(got[key], value), key


@pytest.mark.parametrize("epoch", [1, 0], ids=["with L_MDL", "before L_MDL starts"])
def test_mar_terms_then_update_state_equal_marloss_forward_bit_for_bit(epoch):
    world = World.make()
    method = mar_method(world)
    reference = MARLoss(N_AGENTS, N_TARGET, **LOSS_OPTIONS).double()
    reference.initialize(world.init_logits, world.camids)
    assert_equal_state(method.state_dict(), reference.state_dict())  # the same keys: checkpoints keep them
    for indices in BATCHES:
        inp = world.step_inputs(indices)
        outputs = outputs_of(world, inp)
        before = state_of(method)
        terms = method.terms(outputs, epoch)
        assert_equal_state(method.state_dict(), before)  # terms() is a value: nothing moved
        want_total, want_log = reference(outputs.aux_feat, outputs.aux_logits, outputs.aux_labels, outputs.tgt_feat,
                                         outputs.tgt_logits, outputs.tgt_camids, outputs.tgt_index, outputs.agents,
                                         mdl_on=epoch >= 1, tgt_pids=outputs.tgt_pids)
        assert terms.log == want_log and torch.equal(terms.total, want_total)
        leaves = (inp["aux_feat"], inp["tgt_feat"])
        for got, want in zip(torch.autograd.grad(terms.total, leaves, retain_graph=True),
                             torch.autograd.grad(want_total, leaves, retain_graph=True)):
            assert torch.equal(got, want)
        # the weighted terms are the switched-on ones, and add up to the total
        assert set(terms.weighted) == ({"mdl", "cml", "al", "rj"} if epoch >= 1 else {"cml", "al", "rj"})
        assert float(sum(terms.weighted.values()).detach()) == pytest.approx(float(terms.total.detach()), rel=1e-12)
        assert terms.names == ("loss", "al", "rj", "ral", "cml", "mdl") and set(terms.names) <= set(terms.log)
        method.update_state(outputs, terms)
        assert_equal_state(method.state_dict(), reference.state_dict())
    moved = [k for k, v in method.state_dict().items() if not torch.equal(v, mar_method(world).state_dict()[k])]
    assert "stats.running_mean" in moved
    assert ("memory.memory" in moved and "threshold.threshold" in moved) == (epoch >= 1)


def test_mar_active_terms_follow_the_switches_and_the_mdl_start():
    world = World.make()
    method = mar_method(world)
    assert method.active_terms(0) == {"al", "rj", "cml"} and method.active_terms(1) == {"al", "rj", "cml", "mdl"}
    method.use_al = method.use_rj = method.use_cml = False
    assert method.active_terms(0) == frozenset() and method.active_terms(3) == {"mdl"}


def test_registry_names_its_classes_and_refuses_unknown_names():
    assert method_class("mar") is MARMethod and method_class("cluster_contrast") is ClusterContrast
    for name in METHODS:
        assert method_class(name).name == name
        assert all(hasattr(load_config(None), section) for section in method_class(name).sections)
    assert (MARMethod.sections, ClusterContrast.sections) == (("mar", "optim"), ("cc", "mar"))
    with pytest.raises(ConfigError) as info:
        method_class("dbscan_magic")
    assert str(info.value) == "train.method: unknown method 'dbscan_magic'; known: mar, cluster_contrast"
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.method=dbscan_magic"])
    assert "\n" not in str(info.value) and "train.method" in str(info.value) and "cluster_contrast" in str(info.value)


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    return make_training_trees(tmp_path_factory.mktemp("methods_data"))


def cc_config(trees, run_dir, *extra):
    """Cluster contrast from backbone weights (no pretrain checkpoint needed) on the tiny target."""
    return mar_config(trees, run_dir, "train.method=cluster_contrast", "cc.init=backbone", "cc.k1=6", "cc.k2=2",
                      "cc.eps=0.5", "cc.min_samples=2", "cc.batch_size=8", "cc.instances=2", "cc.iters_per_epoch=2",
                      "cc.epochs=2", *extra)


def quiet(cfg, aux=None):
    return AdaptTrainer(cfg, aux, load_target(cfg), cfg.output.run_dir, logger=RunLogger(cfg.output.run_dir,
                                                                                         enabled=False))


def test_a_checkpoint_resumes_only_with_its_own_method(trees, tmp_path):
    mar_cfg = mar_config(trees, tmp_path / "mar")
    mar = quiet(mar_cfg, load_auxiliary(mar_cfg))
    mar.initialize()
    saved = load_checkpoint(mar.save())
    assert (saved["kind"], saved["method"]) == ("mar", "mar")
    cc = quiet(cc_config(trees, tmp_path / "mar"))
    with pytest.raises(CheckpointError) as info:
        cc.resume()
    assert str(info.value) == f"{tmp_path / 'mar' / 'last.pt'}: a 'mar' checkpoint cannot resume a cluster_contrast run"

    cc = quiet(cc_config(trees, tmp_path / "cc"))
    cc.save()
    mar = quiet(mar_config(trees, tmp_path / "cc"), load_auxiliary(mar_cfg))
    with pytest.raises(CheckpointError, match="a 'cluster_contrast' checkpoint cannot resume a mar run"):
        mar.resume()


# A method with terms of its own, registered for these tests only ------------------------------
class ToyBatches:
    """Two target batches of four per epoch, no auxiliary batch."""

    steps_per_epoch = 2

    def __init__(self, data: ImageDataset) -> None:
        self.data = data

    def iterate(self, epoch: int, start_step: int = 0):
        for step in range(start_step, self.steps_per_epoch):
            first = 4 * (epoch * self.steps_per_epoch + step)
            yield step, None, default_collate([self.data[(first + k) % len(self.data)] for k in range(4)])


class ToyMethod(Method):
    """``pull``: the features toward their mean; ``push``: 0.1 x the logits' spread; a step counter as state."""

    name = "toy"
    term_names = ("loss", "pull", "push")
    target_terms = frozenset({"pull", "push"})
    sections = ()
    poison_at: int | None = None  # a step whose push is made non-finite

    @classmethod
    def needs_auxiliary(cls, cfg):
        return False

    @classmethod
    def starts_from_pretrained(cls, cfg):
        return False

    @classmethod
    def agent_count(cls, cfg, aux, start):
        return 3

    def __init__(self, cfg, context) -> None:
        super().__init__()
        self.epochs = 2
        self.batch_shape = BatchShape(0, 4)
        self.register_buffer("steps", torch.tensor(0))
        self._batches = ToyBatches(ImageDataset(context.target.train, eval_transform(cfg)))

    @property
    def steps_per_epoch(self):
        return self._batches.steps_per_epoch

    @property
    def batches(self):
        return self._batches

    def build_optimizer(self, model):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, [], 0.1)

    def active_terms(self, epoch):
        return frozenset(self.term_names[1:])

    def terms(self, outputs, epoch):
        pull = toy_pull(outputs.tgt_feat)
        push = toy_push(outputs.tgt_logits)
        if self.poison_at is not None and int(self.steps) == self.poison_at:
            push = push * float("nan")
        total = pull + push
        return Terms(total, {"pull": pull, "push": push},
                     {name: float(value.detach()) for name, value in zip(self.term_names, (total, pull, push))},
                     self.term_names)

    def update_state(self, outputs, terms):
        self.steps += 1


def toy_pull(feat):
    return (feat - feat.mean(0)).pow(2).sum(1).mean()


def toy_push(logits):
    return 0.1 * logits.std(0).mean()


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(METHODS, "toy", "test_methods:ToyMethod")
    monkeypatch.setattr(ToyMethod, "poison_at", None)


def test_a_method_with_other_terms_trains_and_its_terms_reach_the_log_and_curves(trees, tmp_path, toy):
    cfg = mar_config(trees, tmp_path, "train.method=toy", "data.aux_root=")  # no auxiliary set at all
    result = run_train(cfg)
    assert result["status"] == "done" and result["steps"] == 4
    records = read_log(tmp_path / "log.jsonl")
    assert logged_terms(records) == ("loss", "pull", "push")
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [0, 1, 2, 3] and all(r["pull"] > 0 and r["push"] > 0 for r in steps)
    assert int(load_checkpoint(tmp_path / "last.pt")["loss"]["steps"]) == 4  # update_state ran after every step
    # its terms get the first panels; a log that did not name them would put them after the learning rate
    columns = step_table(records)[0]
    assert [p[0] for p in panel_groups(columns, [], logged_terms(records))][:4] == \
        ["loss", "pull", "push", "learning rate"]
    unnamed = [p[0] for p in panel_groups(columns, [], ("loss",))]
    assert unnamed.index("pull") > unnamed.index("learning rate")
    # 3 terms, learning rate, images / s, the final evaluation
    assert write_curves(tmp_path / "log.jsonl", tmp_path / "curves")["panels"] == 6


def test_the_finite_check_and_the_progress_names_come_from_the_method(trees, tmp_path, toy, monkeypatch):
    monkeypatch.setattr(ToyMethod, "poison_at", 1)
    run = quiet(mar_config(trees, tmp_path, "train.method=toy"))
    assert run.loss_names == ("loss", "pull", "push")
    with pytest.raises(TrainingError) as info:
        run.fit()
    assert "non-finite loss terms 'loss' (nan), 'push' (nan) at step 1" in str(info.value)


def test_gradient_shares_of_a_method_with_other_terms(trees, tmp_path, toy):
    cfg = mar_config(trees, tmp_path, "train.method=toy")
    run_train(cfg, evaluate=False)
    checkpoint = tmp_path / "last.pt"
    state = load_checkpoint(checkpoint)
    report = checkpoint_gradient_shares(cfg, state, checkpoint, batches=2)
    assert len(report["batches"]) == 2
    for batch in report["batches"]:
        assert set(batch) == {"pull", "push"}
        assert sum(term["along_total"] for term in batch.values()) == pytest.approx(1.0)
    # The first batch by hand: the checkpoint's model in train mode over the batch, each term's
    # backbone gradient taken alone, G their sum.
    model = model_from_checkpoint(state, str(checkpoint), cfg).train()
    data = ImageDataset(load_target(cfg).train, eval_transform(cfg))
    _, _, batch = next(ToyBatches(data).iterate(0))
    feat, logits = model(batch[0])
    params = list(model.backbone.parameters())
    own = {name: torch.cat([g.flatten() for g in torch.autograd.grad(term, params, retain_graph=True)])
           for name, term in (("pull", toy_pull(feat)), ("push", toy_push(logits)))}
    total = own["pull"] + own["push"]
    for name, g in own.items():
        got = report["batches"][0][name]
        assert got["norm"] == pytest.approx(float(g.norm()), rel=1e-4)
        assert got["along_total"] == pytest.approx(float(g @ total) / float(total @ total), rel=1e-4, abs=1e-6)


def test_method_term_gradients_take_the_terms_in_eval_mode_and_restore_it():
    world = World.make()
    method = mar_method(world)
    inp = world.step_inputs(BATCHES[0])
    feat = inp["tgt_feat"]
    before = state_of(method)
    grads = method_term_gradients(method, outputs_of(world, inp), 1, [feat])
    assert set(grads) == {"mdl", "cml", "al", "rj"} and method.training
    assert_equal_state(method.state_dict(), before)
    # eval mode: L_CML against the statistics as they are, not moved toward the batch first
    method.eval()
    want = torch.autograd.grad(method.terms(outputs_of(world, inp), 1).weighted["cml"], feat)[0]
    assert torch.equal(grads["cml"], want.flatten())
    shares = gradient_shares(grads)
    assert sum(s["along_total"] for s in shares.values()) == pytest.approx(1.0)
    assert all(math.isfinite(s["cosine"]) for s in shares.values())


def test_mar_trainer_is_the_adaptation_trainer_with_the_mar_method(trees, tmp_path):
    cfg = mar_config(trees, tmp_path)
    run = quiet(cfg, load_auxiliary(cfg))
    assert isinstance(run.method, MARMethod) and run.loss is run.method and run.kind == "mar"
    assert run.steps_per_epoch == run.batches.steps_per_epoch == 3
    clone = copy.deepcopy(run.loss)  # a plain MARLoss to the loss-level callers
    assert isinstance(clone, MARLoss)
