"""A seeded split of a training set by identity: what the hybrid's blend weight is chosen on.

The target's own training identities are split, never its test set, so choosing the weight
does not look at the images the method is evaluated on.
"""

from __future__ import annotations

import numpy as np

from marreid.data.sample import Sample
from marreid.errors import ConfigError

# Distinct from loaders.py's and pseudo.py's streams (0-3).
SPLIT_STREAM = 4


def split_identities(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(train, validation): ``round(fraction * ids)`` identities drawn for validation, all their images with them.

    The validation identities are a uniform draw of ``np.random.default_rng([seed, SPLIT_STREAM])``
    from the sorted distinct pids; ``round`` is Python's (half to even). Both lists keep the
    order of ``samples``. Validation must hold at least one identity and fewer than all.
    """
    if seed < 0:
        raise ConfigError(f"seed must be >= 0, not {seed}")
    pids = np.unique(np.array([s.pid for s in samples], np.int64))
    count = round(fraction * len(pids))
    if not 1 <= count < len(pids):
        raise ConfigError(f"validation fraction {fraction} of {len(pids)} identities gives {count}; "
                          f"it must give between 1 and {len(pids) - 1}")
    held = set(np.random.default_rng([seed, SPLIT_STREAM]).choice(pids, count, replace=False).tolist())
    train = [s for s in samples if s.pid not in held]
    validation = [s for s in samples if s.pid in held]
    return train, validation


__all__ = ["SPLIT_STREAM", "split_identities"]
