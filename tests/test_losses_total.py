"""MARLoss (Eq. 10): several training steps against a loop oracle of every term and of the state updates."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace

import oracles_losses as oracle
import pytest
import torch
import torch.nn.functional as F

from marreid.errors import ConfigError, TrainingError
from marreid.losses.total import MARLoss

N_AGENTS, N_TARGET, DIM, SCALE = 7, 20, 5, 30.0
RATIO = 0.2
WEIGHTS = dict(lambda_cml=0.3, lambda_ral=2.0, beta=0.2, margin=1.0)
CONFIG = dict(WEIGHTS, mining_ratio=RATIO)
ORACLE_CONFIG = oracle.MarConfig(scale=SCALE, ratio=RATIO, **WEIGHTS)
BATCHES = [list(range(0, 8)), list(range(4, 12)), [0, 2, 4, 6, 8, 10, 12, 14]]
GEN_SEED = 2  # every step below mines both positives and negatives, soft and hard


def _unit(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=1)


@dataclass
class World:
    """A fixed random problem: agent weights, target set cameras / identities, initial logits."""

    weight: torch.Tensor
    camids: torch.Tensor
    pids: torch.Tensor
    init_logits: torch.Tensor
    gen: torch.Generator = field(repr=False)

    @classmethod
    def make(cls) -> World:
        gen = torch.Generator().manual_seed(GEN_SEED)
        weight = torch.randn(N_AGENTS, DIM, generator=gen, dtype=torch.float64)
        camids = torch.arange(N_TARGET) % 3
        pids = torch.randint(0, 4, (N_TARGET,), generator=gen)
        init_feat = _unit(N_TARGET, DIM, gen=gen)
        init_logits = SCALE * init_feat @ F.normalize(weight, dim=1).T
        return cls(weight, camids, pids, init_logits, gen)

    def step_inputs(self, indices: list[int]) -> dict:
        aux_feat = _unit(6, DIM, gen=self.gen).requires_grad_()
        tgt_feat = _unit(len(indices), DIM, gen=self.gen).requires_grad_()
        aux_labels = torch.randint(0, N_AGENTS, (6,), generator=self.gen)
        return dict(aux_feat=aux_feat, aux_labels=aux_labels, tgt_feat=tgt_feat, index=torch.tensor(indices))


def _oracle_step(state: oracle.MarState, weight: torch.Tensor, inp: dict, world: World, hard: bool):
    agents = F.normalize(weight, dim=1)
    aux_logits = SCALE * inp["aux_feat"] @ agents.T
    index = inp["index"]
    tgt = (inp["tgt_feat"], world.camids[index], index.tolist(), world.pids[index])
    aux = (inp["aux_feat"], aux_logits, inp["aux_labels"])
    return oracle.mar_step(state, replace(ORACLE_CONFIG, hard=hard), agents, *aux, *tgt)


def _call(loss_fn: MARLoss, weight: torch.Tensor, inp: dict, world: World, **kwargs):
    agents = F.normalize(weight, dim=1)
    return loss_fn(
        inp["aux_feat"],
        SCALE * inp["aux_feat"] @ agents.T,
        inp["aux_labels"],
        inp["tgt_feat"],
        SCALE * inp["tgt_feat"] @ agents.T,
        world.camids[inp["index"]],
        inp["index"],
        agents,
        **kwargs,
    )


def _initialized(world: World, **overrides) -> MARLoss:
    """An initialised MARLoss whose state buffers are float64, like the oracle's arithmetic."""
    loss_fn = MARLoss(N_AGENTS, N_TARGET, **{**CONFIG, **overrides}).double()
    loss_fn.initialize(world.init_logits, world.camids)
    return loss_fn


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard labels"])
def test_training_steps_match_the_loop_oracle(hard):
    world = World.make()
    loss_fn = _initialized(world, hard_labels=hard)
    state = oracle.mar_init(world.init_logits, world.camids, RATIO, hard=hard)
    torch.testing.assert_close(loss_fn.stats.running_mean, state.mean)
    torch.testing.assert_close(loss_fn.stats.running_std, state.std)
    assert loss_fn.threshold.value == pytest.approx(state.threshold, abs=1e-12)

    for indices in BATCHES:
        inp = world.step_inputs(indices)
        weight = world.weight.clone().requires_grad_()
        total, terms = _call(loss_fn, weight, inp, world, mdl_on=True, tgt_pids=world.pids[inp["index"]])
        leaves = (inp["aux_feat"], inp["tgt_feat"], weight)
        grads = torch.autograd.grad(total, leaves)

        oracle_weight = world.weight.clone().requires_grad_()
        expected, expected_terms, shares, tp, mined_tp = _oracle_step(state, oracle_weight, inp, world, hard=hard)
        expected_grads = torch.autograd.grad(expected, (inp["aux_feat"], inp["tgt_feat"], oracle_weight))

        assert terms["loss"] == pytest.approx(expected.item(), rel=1e-9)
        for key, value in expected_terms.items():
            value = value.item() if isinstance(value, torch.Tensor) else value
            assert terms[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
        assert terms["positives"] > 0 and terms["negatives"] > 0
        assert terms["ral"] == pytest.approx(terms["al"] + 0.2 * terms["rj"], rel=1e-9)
        for cam, share in shares.items():
            assert terms[f"cml_cam{cam}"] == pytest.approx(share.item(), rel=1e-9)
        assert sum(v for k, v in terms.items() if k.startswith("cml_cam")) == pytest.approx(terms["cml"], rel=1e-6)
        assert terms.get("tp_rate") == (pytest.approx(tp) if tp is not None else None)
        assert terms["mined_tp_rate"] == pytest.approx(mined_tp)
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got, want)

        torch.testing.assert_close(loss_fn.stats.running_mean, state.mean)
        torch.testing.assert_close(loss_fn.stats.running_std, state.std)
        assert loss_fn.threshold.value == pytest.approx(state.threshold, abs=1e-12)
        for index, row in state.memory.items():
            torch.testing.assert_close(loss_fn.memory.memory[index], row)
    assert sorted(state.memory) == torch.nonzero(loss_fn.memory.visited).flatten().tolist()


def test_agents_get_gradient_only_from_the_agent_loss():
    world = World.make()
    loss_fn = _initialized(world)
    inp = world.step_inputs(BATCHES[0])
    weight = world.weight.clone().requires_grad_()
    total, _ = _call(loss_fn, weight, inp, world, mdl_on=True)
    (grad_total,) = torch.autograd.grad(total, weight)
    agents = F.normalize(weight, dim=1)
    al = oracle.agent_loss(SCALE * inp["aux_feat"] @ agents.T, inp["aux_labels"])
    (grad_al,) = torch.autograd.grad(CONFIG["lambda_ral"] * al, weight)
    torch.testing.assert_close(grad_total, grad_al)


def test_mdl_off_and_eval_mode_leave_the_memory_and_threshold_alone():
    world = World.make()
    loss_fn = _initialized(world)
    threshold = loss_fn.threshold.value
    _, terms = _call(loss_fn, world.weight, world.step_inputs(BATCHES[0]), world, mdl_on=False)
    assert terms["mdl"] == 0.0 and terms["mined"] == 0.0
    assert not loss_fn.memory.visited.any() and loss_fn.threshold.value == threshold

    loss_fn.eval()
    state = copy.deepcopy(loss_fn.state_dict())
    _, terms = _call(loss_fn, world.weight, world.step_inputs(BATCHES[1]), world, mdl_on=True)
    assert terms["mined"] > 0
    for key, value in loss_fn.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_switches_zero_their_terms():
    world = World.make()
    inp = world.step_inputs(BATCHES[0])
    loss_fn = _initialized(world, use_al=False, use_rj=False, use_cml=False)
    total, terms = _call(loss_fn, world.weight, inp, world, mdl_on=True)
    assert terms["al"] == terms["rj"] == terms["ral"] == terms["cml"] == 0.0
    assert not any(k.startswith("cml_cam") for k in terms)
    assert terms["loss"] == pytest.approx(terms["mdl"]) and total.item() == pytest.approx(terms["mdl"])

    loss_fn = _initialized(world, use_mdl=False)
    _, terms = _call(loss_fn, world.weight, inp, world, mdl_on=True)
    assert terms["mdl"] == 0.0 and terms["mined"] == 0.0


def test_feature_baseline_mines_positives_by_feature_alone():
    world = World.make()
    loss_fn = _initialized(world, positives="feature")
    assert not bool(loss_fn.threshold.initialized)  # T is neither set nor used
    inp = world.step_inputs(BATCHES[0])
    _, terms = _call(loss_fn, world.weight, inp, world, mdl_on=True)
    expected, mined, pos, neg, _, _ = oracle.mdl_loss(inp["tgt_feat"], None, 0.0, RATIO)
    assert (terms["mined"], terms["positives"], terms["negatives"]) == (mined, pos, neg) == (6, 6, 0)
    assert terms["mdl"] == pytest.approx(expected.item())
    assert not loss_fn.memory.visited.any()


def test_forward_before_initialize_is_an_error():
    world = World.make()
    with pytest.raises(TrainingError, match="initialize"):
        _call(MARLoss(N_AGENTS, N_TARGET, **CONFIG), world.weight, world.step_inputs(BATCHES[0]), world, mdl_on=False)
    loss_fn = MARLoss(N_AGENTS, N_TARGET, **{**CONFIG, "use_cml": False})
    with pytest.raises(TrainingError, match="initialize"):
        _call(loss_fn, world.weight, world.step_inputs(BATCHES[0]), world, mdl_on=True)


@pytest.mark.parametrize("option", [{"positives": "labels"}, {"mining_ratio": 0.0}, {"memory_momentum": 1.5}])
def test_bad_options_are_config_errors(option):
    with pytest.raises(ConfigError, match=next(iter(option))):
        MARLoss(N_AGENTS, N_TARGET, **option)


def test_half_inputs_give_a_float32_loss():
    world = World.make()
    loss_fn = _initialized(world)
    inp = world.step_inputs(BATCHES[0])
    agents = F.normalize(world.weight, dim=1).to(torch.bfloat16)
    aux, tgt = inp["aux_feat"].detach().to(torch.bfloat16), inp["tgt_feat"].detach().to(torch.bfloat16)
    camids = world.camids[inp["index"]]
    total, terms = loss_fn(
        aux, SCALE * aux @ agents.T, inp["aux_labels"],
        tgt, SCALE * tgt @ agents.T, camids, inp["index"],
        agents, mdl_on=True,
    )
    assert total.dtype == torch.float32
    assert all(torch.isfinite(torch.tensor(v)) for v in terms.values())


def test_state_dict_round_trip_continues_identically():
    world = World.make()
    loss_fn = _initialized(world)
    for indices in BATCHES[:2]:
        _call(loss_fn, world.weight, world.step_inputs(indices), world, mdl_on=True)
    fresh = MARLoss(N_AGENTS, N_TARGET, **CONFIG).double()
    fresh.load_state_dict(loss_fn.state_dict())
    inp = world.step_inputs(BATCHES[2])
    total_a, terms_a = _call(loss_fn, world.weight, inp, world, mdl_on=True)
    total_b, terms_b = _call(fresh, world.weight, inp, world, mdl_on=True)
    assert terms_a == terms_b
    for key, value in loss_fn.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]), key
