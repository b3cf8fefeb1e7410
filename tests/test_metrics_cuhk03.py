from __future__ import annotations

import numpy as np
import pytest

from marreid.errors import ConfigError, DatasetError
from marreid.metrics import evaluate_cuhk03_single_shot


def naive_single_shot(dist, q_pids, g_pids, q_cams, g_cams, max_rank, repeats, seed):
    """The documented draw replayed one query and one identity at a time."""
    ids = sorted({int(p) for p in g_pids} - {-1})
    draws = np.random.default_rng(seed).random((repeats, len(q_pids), len(ids)))
    total, answers = np.zeros(max_rank), 0
    for t in range(repeats):
        for i, q_pid in enumerate(q_pids):
            kept, match = [], None
            for p, pid in enumerate(ids):
                candidates = [
                    j
                    for j in range(len(g_pids))
                    if g_pids[j] == pid and not (pid == q_pid and g_cams[j] == q_cams[i])
                ]
                if not candidates:
                    continue
                chosen = candidates[int(draws[t, i, p] * len(candidates))]
                kept.append(chosen)
                if pid == q_pid:
                    match = chosen
            if match is None:
                continue
            kept.sort(key=lambda j: (dist[i][j], j))
            rank = kept.index(match) + 1
            total += [1.0 if rank <= k else 0.0 for k in range(1, max_rank + 1)]
            answers += 1
    return total / answers, answers // repeats


@pytest.mark.parametrize("ties", [False, True])
def test_matches_naive_loop_with_the_same_draws(ties: bool) -> None:
    compared = 0
    for seed in range(10):
        rng = np.random.default_rng(100 + seed)
        num_q, num_g = int(rng.integers(2, 15)), int(rng.integers(5, 50))
        dist = rng.integers(0, 4, (num_q, num_g)).astype(np.float32) if ties else rng.random((num_q, num_g))
        g_pids, q_pids = rng.integers(-1, 8, num_g), rng.integers(0, 9, num_q)
        g_cams, q_cams = rng.integers(0, 2, num_g), rng.integers(0, 2, num_q)
        want_cmc, want_valid = naive_single_shot(dist, q_pids, g_pids, q_cams, g_cams, 6, 3, seed)
        got = evaluate_cuhk03_single_shot(
            dist, q_pids, g_pids, q_cams, g_cams, max_rank=6, repeats=3, seed=seed, chunk_size=seed % 3 + 1
        )
        np.testing.assert_allclose(got.cmc, want_cmc, atol=1e-12)
        assert got.num_valid_queries == want_valid
        assert got.num_skipped_queries == num_q - want_valid
        compared += 1
    assert compared == 10


def test_one_image_per_identity_needs_no_draw() -> None:
    # Query identity 1 from camera 0; one image each of identities 1, 2, 3 (camera 1).
    dist = np.array([[0.5, 0.2, 0.9]])
    got = evaluate_cuhk03_single_shot(dist, [1], [1, 2, 3], [0], [1, 1, 1], max_rank=3, repeats=4)
    np.testing.assert_array_equal(got.cmc, [0, 1, 1])


def test_own_camera_images_are_never_drawn() -> None:
    # The query's identity has a perfect match from its own camera (d 0) and one from camera 1 (d .6);
    # identity 2 (d .3) is always ahead of the cross-camera match, so the rank is always 2.
    dist = np.array([[0.0, 0.6, 0.3]])
    got = evaluate_cuhk03_single_shot(dist, [1], [1, 1, 2], [0], [0, 1, 1], max_rank=2, repeats=20, seed=3)
    np.testing.assert_array_equal(got.cmc, [0, 1])


def test_draws_average_over_repeats() -> None:
    # Identity 2 has a close (d .1) and a far (d .9) image; the match sits at d .5.
    # Each repeat draws U and keeps the close image when floor(2U) = 0, i.e. U < 1/2.
    dist = np.array([[0.5, 0.1, 0.9]])
    repeats, seed = 40, 11
    got = evaluate_cuhk03_single_shot(
        dist, [1], [1, 2, 2], [0], [1, 1, 1], max_rank=2, repeats=repeats, seed=seed
    )
    draws = np.random.default_rng(seed).random((repeats, 1, 2))
    far_kept = (draws[:, 0, 1] >= 0.5).mean()
    assert 0 < far_kept < 1
    np.testing.assert_allclose(got.cmc, [far_kept, 1.0])


def test_bad_inputs() -> None:
    with pytest.raises(DatasetError, match="no query identity has a gallery image from another camera"):
        evaluate_cuhk03_single_shot(np.zeros((1, 2)), [1], [1, 2], [0], [0, 0])
    with pytest.raises(DatasetError, match="no identity other than junk"):
        evaluate_cuhk03_single_shot(np.zeros((1, 2)), [1], [-1, -1], [0], [1, 1])
    with pytest.raises(ConfigError, match="repeats=0"):
        evaluate_cuhk03_single_shot(np.zeros((1, 2)), [1], [1, 2], [0], [1, 1], repeats=0)
    with pytest.raises(DatasetError, match="g_camids must be 1-D with 2 entries"):
        evaluate_cuhk03_single_shot(np.zeros((1, 2)), [1], [1, 2], [0], [1])
