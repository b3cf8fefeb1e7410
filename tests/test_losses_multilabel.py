"""Eq. 1 (soft multilabel), Eq. 2 (agreement) and the top-p quantile, against loop oracles."""

from __future__ import annotations

import oracles_losses as oracle
import pytest
import torch

from marreid.errors import DatasetError
from marreid.losses.multilabel import (
    agreement_top_quantile,
    log_soft_multilabel,
    pair_agreements,
    pair_count,
    pairwise_agreement,
    soft_multilabel,
    top_count,
    top_quantile,
)


def _distributions(n: int, k: int, seed: int, sharpness: float = 3.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(sharpness * torch.randn(n, k, generator=gen, dtype=torch.float64), dim=1)


@pytest.mark.parametrize("shape", [(1, 3), (5, 7), (8, 40)])
@pytest.mark.parametrize(
    "fn,naive", [(soft_multilabel, oracle.soft_multilabel), (log_soft_multilabel, oracle.log_soft_multilabel)]
)
def test_multilabel_values_and_gradients(shape, fn, naive):
    gen = torch.Generator().manual_seed(sum(shape))
    logits = (10 * torch.randn(*shape, generator=gen, dtype=torch.float64)).requires_grad_()
    weights = torch.randn(*shape, generator=gen, dtype=torch.float64)
    got = fn(logits)
    (grad_got,) = torch.autograd.grad((got * weights).sum(), logits)
    expected = naive(logits)
    (grad_expected,) = torch.autograd.grad((expected * weights).sum(), logits)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(grad_got, grad_expected)


def test_soft_multilabel_rows_are_distributions_and_log_stays_finite():
    logits = torch.tensor([[0.0, 2000.0, -2000.0]])
    y = soft_multilabel(logits)
    assert torch.allclose(y.sum(1), torch.ones(1))
    log_y = log_soft_multilabel(logits)
    assert torch.isfinite(log_y).all()
    assert log_y[0, 2].item() == pytest.approx(-4000.0)


def test_half_inputs_are_computed_in_float32():
    logits = torch.randn(4, 6).to(torch.bfloat16)
    assert soft_multilabel(logits).dtype == torch.float32
    assert log_soft_multilabel(logits).dtype == torch.float32
    assert pairwise_agreement(soft_multilabel(logits).to(torch.float16)).dtype == torch.float32


@pytest.mark.parametrize("n,m,k,chunk", [(1, 1, 2, 1024), (5, 5, 7, 2), (9, 4, 30, 4), (12, 7, 3, 5)])
def test_pairwise_agreement_matches_sum_of_minima(n, m, k, chunk):
    y_a = _distributions(n, k, seed=n)
    y_b = _distributions(m, k, seed=100 + m)
    torch.testing.assert_close(pairwise_agreement(y_a, y_b, chunk=chunk), oracle.agreement(y_a, y_b))
    torch.testing.assert_close(pairwise_agreement(y_a, chunk=chunk), oracle.agreement(y_a))
    expected_pairs = torch.tensor(oracle.pair_values(oracle.agreement(y_a)), dtype=torch.float64)
    torch.testing.assert_close(pair_agreements(y_a), expected_pairs)


def test_agreement_extremes_by_hand():
    y = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.2, 0.3, 0.5]])
    expected = torch.tensor(
        [
            [1.0, 0.0, 0.2],
            [0.0, 1.0, 0.8],
            [0.2, 0.8, 1.0],
        ]
    )
    torch.testing.assert_close(pairwise_agreement(y), expected)


def test_top_count_by_hand():
    assert pair_count(184) == 16836
    assert top_count(16836, 0.005) == 85  # 84.18 rounded up
    assert top_count(3, 0.005) == 1  # p*M < 1 still mines one pair
    assert top_count(30, 0.1) == 3  # 0.1 * 30 is 3.0000000000000004 in floating point
    assert top_count(10, 0.5) == 5
    assert top_count(10, 1.0) == 10


def test_pair_agreements_order_and_top_quantile_by_hand():
    y = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.2, 0.3, 0.5]])
    torch.testing.assert_close(pair_agreements(y), torch.tensor([0.0, 0.2, 0.8]))  # (0,1), (0,2), (1,2)
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    assert top_quantile(values, 0.5) == 4.0  # k = 3: 6, 5, 4
    assert top_quantile(values, 0.01) == 6.0
    assert top_quantile(values, 1.0) == 1.0


@pytest.mark.parametrize("n", [2, 13, 31])
@pytest.mark.parametrize("ratio", [0.001, 0.05, 0.3, 1.0])
@pytest.mark.parametrize("tile", [1, 4, 1000])
def test_agreement_top_quantile_is_exact_when_streamed(n, ratio, tile):
    y = _distributions(n, 6, seed=n + 7, sharpness=1.5)
    expected = oracle.top_quantile(oracle.pair_values(oracle.agreement(y)), ratio)
    assert agreement_top_quantile(y, ratio, tile=tile) == pytest.approx(expected, abs=1e-12)


def test_agreement_top_quantile_counts_tied_values():
    # Pairs: (0,1)=1, (0,2)=0, (1,2)=0; with k = 2 the second largest is 0.
    y = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert agreement_top_quantile(y, 0.5) == 0.0
    assert agreement_top_quantile(y, 0.3) == 1.0


def test_agreement_top_quantile_needs_two_rows():
    with pytest.raises(DatasetError, match="at least 2"):
        agreement_top_quantile(torch.ones(1, 3) / 3, 0.1)
