"""L_CML (Eq. 5-6) and the running log-multilabel statistics, against loop oracles."""

from __future__ import annotations

import oracles_losses as oracle
import pytest
import torch

from marreid.errors import DatasetError
from marreid.losses.cml import LogMultilabelStats, cml_loss, cml_per_camera, per_camera_stats


def _log_y(n: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.log_softmax(4 * torch.randn(n, k, generator=gen, dtype=torch.float64), dim=1)


CAMERA_LAYOUTS = {
    "two cameras": [0, 1, 0, 1, 0, 1],
    "uneven, one single-image camera": [2, 0, 0, 5, 2, 2, 0, 2, 3],
    "single camera": [4, 4, 4, 4],
    "many cameras": [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 0, 1],
}


@pytest.mark.parametrize("layout", CAMERA_LAYOUTS.values(), ids=CAMERA_LAYOUTS.keys())
@pytest.mark.parametrize("k", [3, 17])
def test_per_camera_stats_match_loops(layout, k):
    camids = torch.tensor(layout)
    log_y = _log_y(len(layout), k, seed=len(layout) + k)
    cams, means, stds = per_camera_stats(log_y, camids)
    expected = oracle.camera_stats(log_y, camids)
    assert cams.tolist() == list(expected)
    for cam, mean, std in zip(cams.tolist(), means, stds):
        torch.testing.assert_close(mean, expected[cam][0])
        torch.testing.assert_close(std, expected[cam][1])


@pytest.mark.parametrize("layout", CAMERA_LAYOUTS.values(), ids=CAMERA_LAYOUTS.keys())
@pytest.mark.parametrize("k", [3, 17])
def test_cml_loss_values_and_gradients_match_loops(layout, k):
    camids = torch.tensor(layout)
    log_y = _log_y(len(layout), k, seed=3 * len(layout) + k).requires_grad_()
    mean = _log_y(1, k, seed=99)[0]
    std = torch.rand(k, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 0.5
    got = cml_loss(log_y, camids, mean, std)
    expected = oracle.cml_loss(log_y, camids, mean, std)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(torch.autograd.grad(got, log_y)[0], torch.autograd.grad(expected, log_y)[0])

    cams, shares = cml_per_camera(log_y, camids, mean, std)
    expected_shares = oracle.cml_shares(log_y, camids, mean, std)
    assert cams.tolist() == list(expected_shares)
    torch.testing.assert_close(shares, torch.stack(list(expected_shares.values())))


def test_cml_loss_by_hand():
    # One camera, two images, one dimension: mu_v = 2, sigma_v = sqrt(((1-2)^2 + (3-2)^2) / 1) = sqrt(2).
    log_y = torch.tensor([[1.0], [3.0]], dtype=torch.float64)
    got = cml_loss(log_y, torch.tensor([0, 0]), torch.tensor([0.0]), torch.tensor([1.0]))
    assert got.item() == pytest.approx(((2.0 - 0.0) ** 2 + (2**0.5 - 1.0) ** 2) / 2)


def test_cml_loss_is_zero_in_the_graph_without_a_usable_camera():
    log_y = _log_y(3, 5, seed=1).requires_grad_()
    got = cml_loss(log_y, torch.tensor([0, 1, 2]), torch.zeros(5), torch.ones(5))
    assert got.item() == 0.0
    (grad,) = torch.autograd.grad(got, log_y)
    assert torch.equal(grad, torch.zeros_like(log_y))


def test_cml_loss_with_identical_multilabels_has_finite_gradient():
    row = _log_y(1, 6, seed=2)
    log_y = torch.cat([row, row, row, _log_y(2, 6, seed=3)]).requires_grad_()
    camids = torch.tensor([0, 0, 0, 1, 1])
    mean, std = torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    got = cml_loss(log_y, camids, mean, std)
    (grad,) = torch.autograd.grad(got, log_y)
    assert torch.isfinite(grad).all()
    # camera 0's std is 0 (floored at 1e-6): its term is ||mu_0||^2 + ||0 - 1||^2.
    expected = oracle.cml_loss(log_y.detach(), camids, mean, std)
    assert got.item() == pytest.approx(expected.item(), abs=1e-4)


def test_half_input_is_computed_in_float32():
    log_y = _log_y(4, 3, seed=0).to(torch.bfloat16)
    got = cml_loss(log_y, torch.tensor([0, 0, 1, 1]), torch.zeros(3), torch.ones(3))
    assert got.dtype == torch.float32


def test_stats_initialize_averages_per_camera_statistics_whole_or_in_chunks():
    camids = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 0, 3])  # camera 3 has one image: skipped
    log_y = _log_y(len(camids), 4, seed=11)
    expected = oracle.camera_stats(log_y, camids)
    assert sorted(expected) == [0, 1, 2]
    mean = sum(m for m, _ in expected.values()) / 3
    std = sum(s for _, s in expected.values()) / 3

    whole = LogMultilabelStats(4)
    whole.initialize(log_y, camids)
    chunked = LogMultilabelStats(4)
    chunked.initialize(log_y.split(3), camids.split(3))
    for stats in (whole, chunked):
        assert bool(stats.initialized)
        torch.testing.assert_close(stats.running_mean, mean.float())
        torch.testing.assert_close(stats.running_std, std.float())


def test_stats_initialize_rejects_a_single_camera():
    stats = LogMultilabelStats(3)
    with pytest.raises(DatasetError, match="use_cml=False"):
        stats.initialize(_log_y(5, 3, seed=0), torch.zeros(5, dtype=torch.long))
    with pytest.raises(DatasetError, match="camera"):
        stats.initialize(_log_y(3, 3, seed=0), torch.tensor([0, 0, 1]))


def test_stats_update_follows_the_momentum_rule_step_by_step_and_round_trips():
    k, momentum = 5, 0.0368
    stats = LogMultilabelStats(k)
    init_camids = torch.tensor([0, 0, 1, 1, 2, 2])
    stats.initialize(_log_y(6, k, seed=0), init_camids)
    mean = stats.running_mean.double().clone()
    std = stats.running_std.double().clone()
    batches = [
        (_log_y(6, k, seed=1), torch.tensor([0, 1, 0, 1, 2, 2])),
        (_log_y(5, k, seed=2), torch.tensor([3, 3, 3, 1, 0])),  # cameras 1 and 0 single: only camera 3 counts
        (_log_y(3, k, seed=3), torch.tensor([0, 1, 2])),  # no camera with 2 images: unchanged
        (_log_y(7, k, seed=4), torch.tensor([0, 0, 0, 1, 1, 2, 2])),
    ]
    for log_y, camids in batches:
        stats.update(log_y, camids, momentum=momentum)
        batch = oracle.batch_stats(log_y, camids)
        if batch is not None:
            mean = (1 - momentum) * mean + momentum * batch[0]
            std = (1 - momentum) * std + momentum * batch[1]
        torch.testing.assert_close(stats.running_mean, mean.float())
        torch.testing.assert_close(stats.running_std, std.float())

    fresh = LogMultilabelStats(k)
    fresh.load_state_dict(stats.state_dict())
    assert bool(fresh.initialized)
    assert torch.equal(fresh.running_mean, stats.running_mean)
    assert torch.equal(fresh.running_std, stats.running_std)
