"""L_MDL (Eq. 3-4), the agreement threshold T and the multilabel memory, against loop oracles."""

from __future__ import annotations

import math

import oracles_losses as oracle
import pytest
import torch
import torch.nn.functional as F

from marreid.errors import TrainingError
from marreid.losses.mdl import AgreementThreshold, MultilabelMemory, mdl_loss, mine_pairs


def _problem(b: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features, the agreement matrix of random multilabels, identities."""
    gen = torch.Generator().manual_seed(seed)
    feat = F.normalize(torch.randn(b, d, generator=gen, dtype=torch.float64), dim=1)
    y = torch.softmax(2 * torch.randn(b, 6, generator=gen, dtype=torch.float64), dim=1)
    pids = torch.randint(0, 3, (b,), generator=gen)
    return feat, oracle.agreement(y), pids


def _condensed(matrix: torch.Tensor) -> torch.Tensor:
    """The pairs i < j of a square matrix in pdist order, as mdl_loss takes them (written out by loops)."""
    return torch.tensor(oracle.pair_values(matrix), dtype=matrix.dtype)


def _check_against_oracle(feat, agreement, threshold, ratio, pids=None):
    feat = feat.clone().requires_grad_()
    condensed = None if agreement is None else _condensed(agreement)
    loss, stats = mdl_loss(feat, condensed, threshold, ratio, pids)
    expected, mined, pos, neg, tp, mined_tp = oracle.mdl_loss(feat, agreement, threshold, ratio, pids)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(torch.autograd.grad(loss, feat)[0], torch.autograd.grad(expected, feat)[0])
    assert (stats.mined, stats.positives, stats.negatives) == (mined, pos, neg)
    if pids is not None:
        assert stats.tp_rate == (pytest.approx(tp) if tp is not None else None)
        assert stats.mined_tp_rate == pytest.approx(mined_tp)
    return stats


@pytest.mark.parametrize("b,d,ratio", [(5, 3, 0.3), (8, 4, 0.25), (12, 5, 0.2), (16, 8, 0.1)])
def test_mine_pairs_takes_the_closest_pairs(b, d, ratio):
    feat, _, _ = _problem(b, d, seed=b)
    pairs = [(i, j) for i in range(b) for j in range(i + 1, b)]
    assert [pairs[q] for q in mine_pairs(feat, ratio).tolist()] == oracle.mined_pairs(feat, ratio)


@pytest.mark.parametrize("b,d,ratio", [(5, 3, 0.5), (8, 4, 0.25), (12, 5, 0.2), (16, 8, 0.1)])
def test_mdl_loss_matches_loops_with_both_sets(b, d, ratio):
    feat, agreement, pids = _problem(b, d, seed=10 + b)
    mined_agreements = sorted(float(agreement[i, j]) for i, j in oracle.mined_pairs(feat, ratio))
    threshold = mined_agreements[len(mined_agreements) // 2 - 1]  # about half positive, half negative
    stats = _check_against_oracle(feat, agreement, threshold, ratio, pids)
    assert stats.positives > 0 and stats.negatives > 0


def test_mdl_loss_mines_one_pair_when_p_times_m_is_below_one():
    feat, agreement, _ = _problem(3, 4, seed=1)
    stats = _check_against_oracle(feat, agreement, 0.0, 0.005)
    assert stats.mined == 1


def test_mdl_loss_all_positive_uses_nbar_one_half():
    feat, agreement, _ = _problem(8, 4, seed=2)
    stats = _check_against_oracle(feat, agreement, -1.0, 0.3)
    assert stats.negatives == 0
    p_bar = torch.stack([torch.exp(-((feat[i] - feat[j]) ** 2).sum()) for i, j in oracle.mined_pairs(feat, 0.3)]).mean()
    loss, _ = mdl_loss(feat, _condensed(agreement), -1.0, 0.3)
    assert loss.item() == pytest.approx(-math.log(p_bar.item() / (p_bar.item() + 0.5)))


def test_mdl_loss_no_positive_uses_pbar_one():
    feat, agreement, _ = _problem(8, 4, seed=3)
    stats = _check_against_oracle(feat, agreement, 2.0, 0.3)
    assert stats.positives == 0
    n_bar = torch.stack([torch.exp(-((feat[i] - feat[j]) ** 2).sum()) for i, j in oracle.mined_pairs(feat, 0.3)]).mean()
    loss, _ = mdl_loss(feat, _condensed(agreement), 2.0, 0.3)
    assert loss.item() == pytest.approx(math.log(1.0 + n_bar.item()))


def test_mdl_loss_with_identical_features():
    feat = torch.ones(6, 4, dtype=torch.float64) / 2
    agreement = torch.zeros(6, 6, dtype=torch.float64)
    agreement[0, 1] = agreement[1, 0] = 0.9  # the first mined pair in pair order is positive
    ratio = 0.2  # 3 of the 15 pairs: (0,1), (0,2), (0,3) by the pair-order tie-break
    stats = _check_against_oracle(feat, agreement, 0.5, ratio)
    assert (stats.mined, stats.positives, stats.negatives) == (3, 1, 2)
    loss, _ = mdl_loss(feat, _condensed(agreement), 0.5, ratio)
    assert loss.item() == pytest.approx(math.log(2.0))  # Pbar = Nbar = exp(0)


def test_mdl_loss_true_positive_rates_by_hand():
    feat = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.2], [5.0, 5.0]], dtype=torch.float64)
    agreement = torch.full((4, 4), 0.9, dtype=torch.float64)
    agreement[0, 2] = agreement[2, 0] = 0.1
    pids = torch.tensor([7, 7, 8, 8])
    # 6 pairs, p = 0.5 mines 3: (0,1) d=.1, (0,2) d=.2, (1,2) d=.22; positives (0,1), (1,2).
    _, stats = mdl_loss(feat, _condensed(agreement), 0.5, 0.5, pids)
    assert (stats.mined, stats.positives, stats.negatives) == (3, 2, 1)
    assert stats.tp_rate == pytest.approx(0.5)
    assert stats.mined_tp_rate == pytest.approx(1 / 3)


def test_mdl_loss_feature_baseline_takes_every_mined_pair_as_positive():
    feat, _, _ = _problem(10, 4, seed=4)
    stats = _check_against_oracle(feat, None, 0.0, 0.2)
    assert stats.positives == stats.mined == 9 and stats.negatives == 0


def test_mdl_loss_of_a_single_image_is_zero_in_the_graph():
    feat = torch.ones(1, 3, requires_grad=True)
    loss, stats = mdl_loss(feat, torch.ones(0), 0.5, 0.1)
    assert loss.item() == 0.0 and loss.requires_grad and stats.mined == 0


def test_half_features_are_computed_in_float32():
    feat, agreement, _ = _problem(6, 4, seed=5)
    loss, _ = mdl_loss(feat.to(torch.bfloat16), _condensed(agreement).float(), 0.3, 0.3)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_threshold_follows_the_momentum_rule_and_round_trips():
    threshold = AgreementThreshold()
    assert not bool(threshold.initialized)
    threshold.initialize(0.4)
    expected = 0.4
    ratio, momentum = 0.2, 0.1
    for seed in range(4):
        _, agreement, _ = _problem(7, 3, seed=20 + seed)
        quantile = oracle.top_quantile(oracle.pair_values(agreement), ratio)
        expected = (1 - momentum) * expected + momentum * quantile
        assert threshold.update(_condensed(agreement), ratio, momentum) == pytest.approx(expected, abs=1e-6)
    fresh = AgreementThreshold()
    fresh.load_state_dict(threshold.state_dict())
    assert bool(fresh.initialized) and fresh.value == threshold.value


def test_memory_stores_first_visits_then_blends_and_round_trips():
    gen = torch.Generator().manual_seed(0)
    memory = MultilabelMemory(6, 4)
    naive: dict[int, torch.Tensor] = {}
    for indices in ([0, 3, 5], [3, 1], [5, 3, 0, 2]):
        y = torch.softmax(torch.randn(len(indices), 4, generator=gen), dim=1)
        rows = memory.update(torch.tensor(indices), y, momentum=0.1)
        torch.testing.assert_close(rows, oracle.memory_update(naive, indices, y, 0.1))
    for index in range(6):
        if index in naive:
            torch.testing.assert_close(memory.memory[index], naive[index])
    assert memory.visited.tolist() == [True, True, True, True, False, True]

    before = memory.memory.clone()
    peek = memory.blend(torch.tensor([3, 4]), torch.full((2, 4), 0.25), momentum=0.1)
    torch.testing.assert_close(peek[0], 0.9 * before[3] + 0.1 * torch.full((4,), 0.25))
    torch.testing.assert_close(peek[1], torch.full((4,), 0.25))
    assert torch.equal(memory.memory, before)

    fresh = MultilabelMemory(6, 4)
    fresh.load_state_dict(memory.state_dict())
    assert torch.equal(fresh.memory, memory.memory) and torch.equal(fresh.visited, memory.visited)


def test_memory_rejects_an_index_outside_the_target_set():
    memory = MultilabelMemory(4, 2)
    with pytest.raises(TrainingError, match="num_target"):
        memory.update(torch.tensor([1, 4]), torch.full((2, 2), 0.5))
