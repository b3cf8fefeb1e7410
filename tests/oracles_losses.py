"""Naive loop versions of MAR's equations, written from the paper, for the tests and bench/bench_losses.py.

Loops run over samples, pairs, cameras and agents; only the sums along a
single vector (one feature, one multilabel) are left to torch. All of them
are differentiable with autograd.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def count_top(num_pairs: int, ratio: float) -> int:
    """ceil(p * M), at least one (the paper's p*M pairs, S adaptive so that the loss exists)."""
    return max(1, math.ceil(ratio * num_pairs - 1e-9))


def soft_multilabel(logits: Tensor) -> Tensor:
    """Eq. 1 row by row: exp(l_k) / sum_k' exp(l_k')."""
    rows = []
    for row in logits:
        exps = torch.exp(row - row.max())
        rows.append(exps / exps.sum())
    return torch.stack(rows)


def log_soft_multilabel(logits: Tensor) -> Tensor:
    """log of Eq. 1 row by row: l_k - log sum_k' exp(l_k')."""
    rows = []
    for row in logits:
        top = row.max()
        rows.append(row - top - torch.log(torch.exp(row - top).sum()))
    return torch.stack(rows)


def agreement(y_a: Tensor, y_b: Tensor | None = None) -> Tensor:
    """Eq. 2 pair by pair: sum_k min(y_i^k, y_j^k)."""
    y_b = y_a if y_b is None else y_b
    return torch.stack([torch.stack([torch.minimum(yi, yj).sum() for yj in y_b]) for yi in y_a])


def pair_values(matrix: Tensor) -> list[float]:
    """Entries i < j of a square matrix, row-major."""
    n = matrix.shape[0]
    return [float(matrix[i, j]) for i in range(n) for j in range(i + 1, n)]


def top_quantile(values: list[float], ratio: float) -> float:
    """The k-th largest value, k = count_top(len(values), ratio)."""
    return sorted(values, reverse=True)[count_top(len(values), ratio) - 1]


def agent_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Eq. 7: mean over samples of -log softmax(logits)[w]."""
    terms = []
    for row, w in zip(logits, labels.tolist()):
        terms.append(-(row[w] - torch.log(torch.exp(row).sum())))
    return torch.stack(terms).mean()


def joint_embedding_loss(
    aux_feat: Tensor, aux_labels: Tensor, target_feat: Tensor, agents: Tensor, margin: float = 1.0
) -> Tensor:
    """Eq. 8 as the release computes it: one mean over pull terms and per-sample hinge means."""
    agents = agents.detach()
    terms = []

    def hinge_mean(f: Tensor, skip: int | None) -> None:
        hinges = []
        for j, a in enumerate(agents):
            d2 = ((f - a) ** 2).sum()
            if j != skip and float(d2.detach()) < margin:
                hinges.append(torch.clamp(margin - d2, min=0.0))
        if hinges:
            terms.append(torch.stack(hinges).mean())

    for f, w in zip(aux_feat, aux_labels.tolist()):
        terms.append(((f - agents[w]) ** 2).sum())
        hinge_mean(f, w)
    for f in target_feat:
        hinge_mean(f, None)
    return torch.stack(terms).mean()


def camera_stats(log_y: Tensor, camids: Tensor) -> dict[int, tuple[Tensor, Tensor]]:
    """Per camera with >= 2 images: mean and unbiased std, by explicit sums over its images."""
    stats = {}
    for cam in sorted(set(camids.tolist())):
        members = [log_y[i] for i in range(len(camids)) if int(camids[i]) == cam]
        n = len(members)
        if n < 2:
            continue
        mean = sum(members) / n
        std = torch.sqrt(sum((m - mean) ** 2 for m in members) / (n - 1))
        stats[cam] = (mean, std)
    return stats


def cml_shares(log_y: Tensor, camids: Tensor, mean: Tensor, std: Tensor) -> dict[int, Tensor]:
    """Each camera's (||mu_v - mu||^2 + ||sigma_v - sigma||^2) / (number of terms = 2V)."""
    stats = camera_stats(log_y, camids)
    n_terms = 2 * len(stats)
    return {cam: (((mu - mean) ** 2).sum() + ((sd - std) ** 2).sum()) / n_terms for cam, (mu, sd) in stats.items()}


def cml_loss(log_y: Tensor, camids: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Eq. 5-6: the mean of the 2V terms, 0 without a camera of 2 images."""
    shares = cml_shares(log_y, camids, mean, std)
    return sum(shares.values()) if shares else log_y.sum() * 0.0


def batch_stats(log_y: Tensor, camids: Tensor) -> tuple[Tensor, Tensor] | None:
    """The release's batch value for the running mu / sigma: average of per-camera means and stds."""
    stats = camera_stats(log_y, camids)
    if not stats:
        return None
    means = [mu for mu, _ in stats.values()]
    stds = [sd for _, sd in stats.values()]
    return sum(means) / len(means), sum(stds) / len(stds)


def mined_pairs(feat: Tensor, ratio: float) -> list[tuple[int, int]]:
    """The count_top(M, p) pairs with the smallest distance, ties by pair order."""
    n = feat.shape[0]
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    dists = [float(torch.sqrt(((feat[i] - feat[j]) ** 2).sum())) for i, j in pairs]
    order = sorted(range(len(pairs)), key=lambda q: (dists[q], q))
    return [pairs[q] for q in order[: count_top(len(pairs), ratio)]]


def mdl_loss(feat: Tensor, agreement_matrix: Tensor | None, threshold: float, ratio: float, pids: Tensor | None = None):
    """Eq. 3-4 with the release's stand-ins; returns (loss, mined, positives, negatives, tp, mined_tp)."""
    feat_d = feat.detach()
    mined = mined_pairs(feat_d, ratio)
    pos = [(i, j) for i, j in mined if agreement_matrix is None or float(agreement_matrix[i, j]) > threshold]
    neg = [p for p in mined if p not in pos]

    def mean_exp(pairs):
        return torch.stack([torch.exp(-((feat[i] - feat[j]) ** 2).sum()) for i, j in pairs]).mean()

    p_bar = mean_exp(pos) if pos else torch.tensor(1.0, dtype=feat.dtype)
    n_bar = mean_exp(neg) if neg else torch.tensor(0.5, dtype=feat.dtype)
    loss = -torch.log(p_bar / (p_bar + n_bar))
    tp = mined_tp = None
    if pids is not None:
        same = [int(pids[i]) == int(pids[j]) for i, j in pos]
        tp = sum(same) / len(same) if same else None
        mined_tp = sum(int(pids[i]) == int(pids[j]) for i, j in mined) / len(mined)
    return loss, len(mined), len(pos), len(neg), tp, mined_tp


def memory_update(memory: dict[int, Tensor], indices: list[int], y: Tensor, momentum: float) -> Tensor:
    """First visit stores y, later visits (1 - m) old + m y; returns the new rows in batch order."""
    rows = []
    for index, row in zip(indices, y):
        memory[index] = row.clone() if index not in memory else (1 - momentum) * memory[index] + momentum * row
        rows.append(memory[index])
    return torch.stack(rows)


@dataclass
class MarState:
    """What MARLoss keeps between steps: running mu / sigma, T and the memory rows by image index."""

    mean: Tensor
    std: Tensor
    threshold: float
    memory: dict[int, Tensor] = field(default_factory=dict)


def mar_init(logits: Tensor, camids: Tensor, ratio: float, hard: bool = False) -> MarState:
    """mu / sigma as the average of per-camera statistics, T as the top-p quantile of all pairs' agreement."""
    log_y = log_soft_multilabel(logits)
    stats = camera_stats(log_y, camids)
    mean = sum(m for m, _ in stats.values()) / len(stats)
    std = sum(s for _, s in stats.values()) / len(stats)
    rows = torch.exp(log_y)
    if hard:
        rows = F.one_hot(rows.argmax(1), rows.shape[1]).to(rows.dtype)
    return MarState(mean, std, top_quantile(pair_values(agreement(rows)), ratio))


@dataclass
class MarConfig:
    scale: float = 30.0
    lambda_cml: float = 2e-4
    lambda_ral: float = 50.0
    beta: float = 0.2
    margin: float = 1.0
    ratio: float = 0.005
    stats_momentum: float = 0.0368
    threshold_momentum: float = 0.1
    memory_momentum: float = 0.1
    hard: bool = False
    use_rj: bool = True


def mar_step(state: MarState, cfg: MarConfig, agents: Tensor, aux_feat: Tensor, aux_logits: Tensor, aux_labels: Tensor,
             tgt_feat: Tensor, tgt_camids: Tensor, tgt_index: list[int], pids: Tensor | None = None):
    """One MAR training step with L_MDL on, from the paper; updates ``state``.

    ``agents`` are the normalised agent rows and ``aux_logits`` = s * aux_feat @ agents.T,
    both in the graph of the agent weights. Returns (total, terms, per-camera CML
    shares, tp_rate, mined_tp_rate), ``terms`` holding the tensors / counts of
    each part and the T the batch was split with.
    """
    al = agent_loss(aux_logits, aux_labels)
    rj = joint_embedding_loss(aux_feat, aux_labels, tgt_feat, agents, cfg.margin) if cfg.use_rj else al * 0.0
    log_y = log_soft_multilabel(cfg.scale * tgt_feat @ agents.detach().T)
    batch = batch_stats(log_y.detach(), tgt_camids)
    state.mean = (1 - cfg.stats_momentum) * state.mean + cfg.stats_momentum * batch[0]
    state.std = (1 - cfg.stats_momentum) * state.std + cfg.stats_momentum * batch[1]
    shares = cml_shares(log_y, tgt_camids, state.mean, state.std)
    cml = sum(shares.values())
    rows = memory_update(state.memory, tgt_index, torch.exp(log_y).detach(), cfg.memory_momentum)
    if cfg.hard:
        rows = F.one_hot(rows.argmax(1), rows.shape[1]).to(rows.dtype)
    agree = agreement(rows)
    mdl, mined, pos, neg, tp, mined_tp = mdl_loss(tgt_feat, agree, state.threshold, cfg.ratio, pids)
    used_threshold = state.threshold
    quantile = top_quantile(pair_values(agree), cfg.ratio)
    state.threshold = (1 - cfg.threshold_momentum) * state.threshold + cfg.threshold_momentum * quantile
    total = mdl + cfg.lambda_cml * cml + cfg.lambda_ral * (al + cfg.beta * rj)
    terms = dict(al=al, rj=rj, cml=cml, mdl=mdl, mined=mined, positives=pos, negatives=neg, threshold=used_threshold)
    return total, terms, shares, tp, mined_tp
