"""split_identities: a seeded split of training identities into train and validation."""

from __future__ import annotations

import numpy as np
import pytest

from marreid.data import Sample
from marreid.data.split import SPLIT_STREAM, split_identities
from marreid.errors import ConfigError


def samples(ids: int = 10) -> list[Sample]:
    """Identity p (given as 3 p + 1) has p % 3 + 1 images, interleaved across identities."""
    return [Sample(f"{p}_{k}.jpg", 3 * p + 1, k % 2) for k in range(3) for p in range(ids) if k <= p % 3]


def test_split_by_identity_in_input_order():
    data = samples()
    train, validation = split_identities(data, 0.3, seed=5)
    held = {s.pid for s in validation}
    assert len(held) == 3
    assert not held & {s.pid for s in train}
    assert train == [s for s in data if s.pid not in held]
    assert validation == [s for s in data if s.pid in held]
    pids = np.unique([s.pid for s in data])
    expected = set(np.random.default_rng([5, SPLIT_STREAM]).choice(pids, 3, replace=False).tolist())
    assert held == expected


def test_same_seed_same_split_other_seeds_differ():
    data = samples(20)
    first = split_identities(data, 0.25, seed=1)
    assert split_identities(data, 0.25, seed=1) == first
    held = {frozenset(s.pid for s in split_identities(data, 0.25, seed)[1]) for seed in range(8)}
    assert len(held) > 1


@pytest.mark.parametrize("fraction, count", [(0.25, 2), (0.15, 2), (0.05, 0), (0.5, 5)])
def test_rounding_follows_python_round(fraction, count):
    data = samples(10)
    if count == 0:
        with pytest.raises(ConfigError, match="gives 0; it must give between 1 and 9"):
            split_identities(data, fraction, 0)
    else:
        assert len({s.pid for s in split_identities(data, fraction, 0)[1]}) == count == round(fraction * 10)


@pytest.mark.parametrize("fraction", [0.0, 0.97, 1.0])
def test_validation_must_hold_some_but_not_all_identities(fraction):
    with pytest.raises(ConfigError, match="between 1 and 9") as info:
        split_identities(samples(10), fraction, 0)
    assert "\n" not in str(info.value)


def test_negative_seed():
    with pytest.raises(ConfigError, match="seed"):
        split_identities(samples(), 0.3, -1)
