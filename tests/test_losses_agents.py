"""L_AL (Eq. 7), L_RJ (Eq. 8) and L_RAL (Eq. 9) against loop oracles and a hand-worked case."""

from __future__ import annotations

import math

import oracles_losses as oracle
import pytest
import torch
import torch.nn.functional as F

from marreid.losses.agents import (
    agent_loss,
    agent_products,
    joint_embedding_loss,
    reference_agent_loss,
    squared_distances,
)


def _unit(n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)


@pytest.mark.parametrize("b,n", [(1, 2), (6, 5), (16, 40)])
def test_agent_loss_matches_loop(b, n):
    gen = torch.Generator().manual_seed(b * n)
    logits = (30 * torch.randn(b, n, generator=gen, dtype=torch.float64)).requires_grad_()
    labels = torch.randint(0, n, (b,), generator=gen)
    got = agent_loss(logits, labels)
    expected = oracle.agent_loss(logits, labels)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(torch.autograd.grad(got, logits)[0], torch.autograd.grad(expected, logits)[0])


def test_agent_loss_half_input_is_float32():
    logits = torch.randn(4, 5).to(torch.float16)
    assert agent_loss(logits, torch.tensor([0, 1, 2, 3])).dtype == torch.float32


@pytest.mark.parametrize("scale", [30.0, 7.5])
def test_agent_products_reuse_full_precision_logits_with_gradient_to_features_only(scale):
    gen = torch.Generator().manual_seed(1)
    feat = _unit(6, 4, gen).requires_grad_()
    agents = _unit(5, 4, gen).requires_grad_()
    logits = scale * feat @ agents.T
    products, found = agent_products(feat, agents, logits)
    assert found.item() == pytest.approx(scale)
    torch.testing.assert_close(products, (feat @ agents.T).detach())
    weights = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    grad_feat, grad_agents = torch.autograd.grad((products * weights).sum(), (feat, agents), allow_unused=True)
    torch.testing.assert_close(grad_feat, weights @ agents.detach())
    assert grad_agents is None
    fixed = agents.detach()
    leaf = feat.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda f: agent_products(f, fixed, scale * f @ fixed.T)[0], (leaf,))


def test_agent_products_recompute_from_half_logits():
    gen = torch.Generator().manual_seed(2)
    feat, agents = _unit(6, 4, gen).float(), _unit(5, 4, gen).float()
    products, scale = agent_products(feat, agents, (30.0 * feat @ agents.T).to(torch.bfloat16))
    torch.testing.assert_close(products, feat @ agents.T)
    assert scale.item() == pytest.approx(30.0, rel=1e-2)


def test_agent_products_of_zero_features_are_zero():
    products, _ = agent_products(torch.zeros(2, 3), torch.eye(3), torch.zeros(2, 3))
    assert torch.equal(products, torch.zeros(2, 3))


def test_squared_distances_are_euclidean():
    gen = torch.Generator().manual_seed(0)
    f, a = _unit(3, 4, gen), _unit(5, 4, gen)
    expected = torch.tensor([[((fi - aj) ** 2).sum().item() for aj in a] for fi in f], dtype=torch.float64)
    torch.testing.assert_close(squared_distances(f, a), expected)
    torch.testing.assert_close(squared_distances(f, a), 2 - 2 * f @ a.T)


@pytest.mark.parametrize("margin", [0.0, 0.5, 1.0, 1.5, 4.5])
@pytest.mark.parametrize("ba,bt,n,d", [(1, 1, 2, 3), (5, 4, 6, 4), (9, 0, 12, 5), (12, 10, 20, 4)])
def test_joint_embedding_loss_matches_loop(margin, ba, bt, n, d):
    gen = torch.Generator().manual_seed(ba * 100 + bt * 10 + n)
    aux = _unit(ba, d, gen).requires_grad_()
    tgt = _unit(bt, d, gen).requires_grad_()
    agents = _unit(n, d, gen).requires_grad_()
    labels = torch.randint(0, n, (ba,), generator=gen)
    got = joint_embedding_loss(aux, labels, tgt, agents, margin)
    expected = oracle.joint_embedding_loss(aux, labels, tgt, agents, margin)
    torch.testing.assert_close(got, expected)
    got_grads = torch.autograd.grad(got, (aux, tgt), allow_unused=True, retain_graph=True)
    expected_grads = torch.autograd.grad(expected, (aux, tgt), allow_unused=True)
    for g, e in zip(got_grads, expected_grads):
        if e is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, e)
    got.backward()
    assert agents.grad is None  # agents are detached inside L_RJ


def test_joint_embedding_loss_by_hand():
    # aux f=(1,0) with agent 0 = (1,0): pull 0; agent 2 at 30 degrees is hard:
    # d2 = 2 - sqrt(3) < 1, hinge 1 - d2 = sqrt(3) - 1. Agent 1 (orthogonal, d2 = 2) is not.
    # target t=(0,1): agent 1 has d2 = 0 (hinge 1); agent 2 at 60 degrees has d2 = 1, not < 1.
    agents = torch.tensor([[1.0, 0.0], [0.0, 1.0], [math.cos(math.pi / 6), math.sin(math.pi / 6)]], dtype=torch.float64)
    aux = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    tgt = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    got = joint_embedding_loss(aux, torch.tensor([0]), tgt, agents, margin=1.0)
    assert got.item() == pytest.approx((0.0 + (math.sqrt(3) - 1) + 1.0) / 3)


def test_joint_embedding_loss_without_hard_agents_is_the_mean_pull():
    agents = torch.eye(3, dtype=torch.float64)
    aux = F.normalize(torch.tensor([[1.0, 0.2, 0.0], [0.0, 1.0, 0.3]], dtype=torch.float64), dim=1)
    labels = torch.tensor([0, 1])
    pulls = [((aux[0] - agents[0]) ** 2).sum().item(), ((aux[1] - agents[1]) ** 2).sum().item()]
    got = joint_embedding_loss(aux, labels, aux[:0], agents, margin=0.0)
    assert got.item() == pytest.approx(sum(pulls) / 2)


def test_reference_agent_loss_is_al_plus_beta_rj():
    assert reference_agent_loss(torch.tensor(2.0), torch.tensor(3.0), beta=0.2).item() == pytest.approx(2.6)
