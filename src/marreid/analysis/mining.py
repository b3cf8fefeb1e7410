"""L_MDL's mining over a whole target set, scored with the identities known (a diagnostic, never a training input).

In a batch, L_MDL mines the p*M most similar pairs by feature distance and
keeps as positives those whose soft multilabel agreement is above T. Over
the whole training set the same rule answers how useful that mining can be:
how many of the most similar pairs are the same person, how many of them
share a camera, and how well agreement (Eq. 2) separates true from false
pairs among them (AUC), against the feature distance itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from marreid.errors import DatasetError
from marreid.losses.multilabel import agreement_top_quantile, pair_count, top_count

Tensor = torch.Tensor


def rank_auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve of ``scores`` for the boolean labels ``positive`` (Mann-Whitney U).

    The probability that a random positive scores above a random negative,
    ties counting one half. None when either class is empty.

    >>> rank_auc(np.array([0.9, 0.2, 0.5]), np.array([True, False, False]))
    1.0
    """
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over runs of equal scores
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def closest_pairs(feat: Tensor, ratio: float, camids: Tensor | None = None, chunk: int = 1024) -> Tensor:
    """The top_count(M, p) pairs ``i < j`` of the whole set with the smallest Euclidean feature distance.

    Eq. 3's mining applied to every pair of the set instead of a batch. With
    ``camids``, only pairs from two different cameras count (M is then their
    number). Streams over blocks of ``chunk`` rows, keeping the running best.

    Returns
    -------
    Tensor
        ``[k, 2]`` long (i, j) pairs, closest first.
    """
    n = len(feat)
    feat = feat.float()
    cross = camids is not None
    if cross:
        camids = torch.as_tensor(camids)
        counts = torch.bincount(camids - camids.min()).double()
        total = int((counts.sum() ** 2 - (counts ** 2).sum()) // 2)
    else:
        total = pair_count(n)
    if total == 0:
        raise DatasetError("no pairs to mine: the set has fewer than 2 images (or one camera only)")
    k = top_count(total, ratio)
    best_d = feat.new_zeros(0)
    best_pairs = torch.zeros(0, 2, dtype=torch.long)
    columns = torch.arange(n)
    for start in range(0, n, chunk):
        rows = torch.arange(start, min(start + chunk, n))
        d2 = torch.cdist(feat[rows], feat).pow(2)
        valid = columns[None, :] > rows[:, None]
        if cross:
            valid &= camids[None, :] != camids[rows][:, None]
        r, c = valid.nonzero(as_tuple=True)
        candidates = torch.cat([best_d, d2[r, c]])
        pairs = torch.cat([best_pairs, torch.stack([rows[r], c], 1)])
        keep = torch.sort(candidates, stable=True).indices[:k]
        best_d, best_pairs = candidates[keep], pairs[keep]
    return best_pairs


def mining_report(feat: Tensor, y: Tensor, pids: Sequence[int], camids: Sequence[int], ratio: float,
                  threshold: float | None = None) -> dict:
    """What L_MDL's rule finds among all pairs of a target set, against the true identities.

    Parameters
    ----------
    feat : Tensor
        ``[n, D]`` features (as mined: the model's training output).
    y : Tensor
        ``[n, N]`` soft multilabels (Eq. 1).
    pids, camids : sequence of int
        True identities (read only here) and camera ids.
    ratio : float
        The mining ratio p.
    threshold : float, optional
        The agreement threshold T; default, the top-p quantile of all pairs' agreements (T's initial value).

    Returns
    -------
    dict
        ``base_rate`` (same-person share of all pairs), then for the mined pairs
        (``mined``: all pairs; ``mined_cross_camera``: mining restricted to pairs
        of two cameras): their count, ``precision`` (same-person share),
        ``same_camera`` share, ``positives`` (agreement above T) and their
        ``positive_precision``, and the AUC of agreement and of negative
        distance as scores of same-person.
    """
    pids_t = torch.as_tensor(np.asarray(pids))
    cams_t = torch.as_tensor(np.asarray(camids))
    y = y.float()
    if threshold is None:
        threshold = agreement_top_quantile(y, ratio)
    counts = torch.bincount(pids_t - pids_t.min()).double()
    same_pairs = float(((counts * (counts - 1)) / 2).sum())
    report = {"images": len(feat), "pairs": pair_count(len(feat)), "ratio": ratio, "threshold": float(threshold),
              "base_rate": same_pairs / max(pair_count(len(feat)), 1)}
    for name, cams in (("mined", None), ("mined_cross_camera", cams_t)):
        pairs = closest_pairs(feat, ratio, cams)
        i, j = pairs[:, 0], pairs[:, 1]
        same = (pids_t[i] == pids_t[j]).numpy()
        agreement = (1.0 - (y[i] - y[j]).abs().sum(1) / 2.0).numpy()
        distance = (feat[i].float() - feat[j].float()).pow(2).sum(1).numpy()
        positive = agreement > threshold
        report[name] = {
            "count": len(pairs),
            "precision": float(same.mean()),
            "same_camera": float((cams_t[i] == cams_t[j]).double().mean()),
            "positives": int(positive.sum()),
            "positive_precision": float(same[positive].mean()) if positive.any() else None,
            "agreement_auc": rank_auc(agreement, same),
            "feature_auc": rank_auc(-distance, same),
        }
    return report
