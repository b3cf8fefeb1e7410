"""cluster_nce (Dai et al. Eq. 3) against a loop written from the equation, value and gradient."""

from __future__ import annotations

import math

import pytest
import torch

from marreid.losses.contrast import cluster_nce


def naive_nce(features, labels, centres, tau):
    """mean_i -log( exp(<f_i, c_{y_i}>/tau) / sum_c exp(<f_i, c>/tau) ), one scalar at a time."""
    total = 0.0
    for i in range(len(features)):
        scores = [sum(f * c for f, c in zip(features[i], centre)) / tau for centre in centres]
        total += -math.log(math.exp(scores[labels[i]]) / sum(math.exp(s) for s in scores))
    return total / len(features)


def problem(seed=0, batch=6, clusters=4, dim=8):
    g = torch.Generator().manual_seed(seed)
    f = torch.nn.functional.normalize(torch.randn(batch, dim, generator=g, dtype=torch.float64), dim=1)
    c = torch.nn.functional.normalize(torch.randn(clusters, dim, generator=g, dtype=torch.float64), dim=1)
    y = torch.randint(0, clusters, (batch,), generator=g)
    return f, y, c


@pytest.mark.parametrize("tau", [0.05, 0.5, 1.0])
def test_value_matches_the_equation(tau):
    f, y, c = problem()
    got = cluster_nce(f, y, c, tau)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(naive_nce(f.tolist(), y.tolist(), c.tolist(), tau), rel=1e-12)


def test_gradient_goes_to_the_features_only_and_matches_hand_derivation():
    tau = 0.1
    f, y, c = problem(seed=1)
    f.requires_grad_(True)
    c.requires_grad_(True)
    cluster_nce(f, y, c, tau).backward()
    assert c.grad is None
    soft = torch.softmax(f.detach() @ c.detach().T / tau, dim=1)
    onehot = torch.nn.functional.one_hot(y, len(c)).double()
    hand = (soft - onehot) @ c.detach() / tau / len(f)
    torch.testing.assert_close(f.grad, hand, rtol=1e-10, atol=1e-12)


def test_gradient_matches_finite_differences():
    tau, h = 0.2, 1e-6
    f, y, c = problem(seed=2, batch=3, clusters=3, dim=4)
    f.requires_grad_(True)
    cluster_nce(f, y, c, tau).backward()
    numeric = torch.zeros_like(f)
    for i in range(f.shape[0]):
        for d in range(f.shape[1]):
            step = torch.zeros_like(f)
            step[i, d] = h
            plus = naive_nce((f.detach() + step).tolist(), y.tolist(), c.tolist(), tau)
            minus = naive_nce((f.detach() - step).tolist(), y.tolist(), c.tolist(), tau)
            numeric[i, d] = (plus - minus) / (2 * h)
    torch.testing.assert_close(f.grad, numeric, rtol=1e-6, atol=1e-8)


def test_float32_under_autocast_and_half_inputs():
    f, y, c = problem(seed=3)
    expected = cluster_nce(f.float(), y, c.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = cluster_nce(f.float(), y, c.float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)
    half = cluster_nce(f.bfloat16(), y, c.bfloat16())
    assert half.dtype == torch.float32


@pytest.mark.parametrize(
    "features, labels, centres, message",
    [
        (torch.zeros(2, 3), torch.tensor([0, 1]), torch.zeros(2, 4), "must be"),
        (torch.zeros(2, 3), torch.tensor([0]), torch.zeros(2, 3), "labels"),
        (torch.zeros(2, 3), torch.tensor([0.0, 1.0]), torch.zeros(2, 3), "labels"),
        (torch.zeros(2, 3), torch.tensor([0, 2]), torch.zeros(2, 3), "outside the 2 cluster centres"),
        (torch.zeros(2, 3), torch.tensor([-1, 0]), torch.zeros(2, 3), "outside"),
    ],
)
def test_bad_inputs_are_one_line_errors(features, labels, centres, message):
    with pytest.raises(ValueError, match=message) as info:
        cluster_nce(features, labels, centres)
    assert "\n" not in str(info.value)


def test_temperature_must_be_positive():
    f, y, c = problem()
    with pytest.raises(ValueError, match="temperature"):
        cluster_nce(f, y, c, 0.0)
