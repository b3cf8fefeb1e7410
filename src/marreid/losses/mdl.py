"""Soft-multilabel-guided discriminative embedding: L_MDL (Eq. 3-4), its threshold T and the multilabel memory."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from marreid.errors import TrainingError
from marreid.losses.multilabel import top_count, top_quantile, upcast

Tensor = torch.Tensor

# Release stand-ins for an empty set: Pbar = 1 makes the positive part vanish,
# Nbar = 0.5 keeps the positives' pull when no hard negative was mined.
_EMPTY_POSITIVE_MEAN = 1.0
_EMPTY_NEGATIVE_MEAN = 0.5


@dataclass(frozen=True)
class MiningStats:
    """What L_MDL mined in one batch.

    ``tp_rate`` (of the positives) and ``mined_tp_rate`` (of all mined pairs)
    are the fractions of truly same-identity pairs; diagnostics only, None
    without identities or when the set is empty.
    """

    mined: int
    positives: int
    negatives: int
    tp_rate: float | None = None
    mined_tp_rate: float | None = None


def mine_pairs(feat: Tensor, mining_ratio: float) -> Tensor:
    """The adaptive S of Eq. 3: the top_count(M, p) pairs of the batch with the smallest Euclidean distance.

    Distances are of the detached features. Ties are broken by pair order, as
    a stable sort of ``pdist`` would.

    Returns
    -------
    Tensor
        Positions of the mined pairs in pdist order (pairs i < j, row-major), closest first.
    """
    distances = torch.pdist(feat.detach())
    return torch.sort(distances, stable=True).indices[: top_count(len(distances), mining_ratio)]


def _log_mean_exp(values: Tensor) -> Tensor:
    """log(mean(exp(values))) without overflow."""
    return torch.logsumexp(values, 0) - math.log(len(values))


def _rate(same: Tensor) -> float | None:
    return float(same.double().mean()) if len(same) else None


def mdl_loss(
    feat: Tensor,
    agreement: Tensor | None,
    threshold: float,
    mining_ratio: float,
    pids: Tensor | None = None,
) -> tuple[Tensor, MiningStats]:
    """Eq. 3-4, L_MDL = -log(Pbar / (Pbar + Nbar)).

    Among the mined pairs (``mine_pairs``), those whose agreement is strictly
    above ``threshold`` are the positives P, the rest the hard negatives N;
    Pbar = mean over P of exp(-||f_i - f_j||^2), Nbar likewise over N. An
    empty P counts as Pbar = 1, an empty N as Nbar = 0.5 (release stand-ins).

    Parameters
    ----------
    feat : Tensor
        ``[B, D]`` target features.
    agreement : Tensor or None
        ``[B(B-1)/2]`` soft multilabel agreements (Eq. 2) of the batch's pairs in
        pdist order (``pair_agreements``). None is the feature-similarity
        mining baseline: every mined pair is a positive and N is empty.
    threshold : float
        T.
    mining_ratio : float
        p.
    pids : Tensor, optional
        ``[B]`` true identities, read only for the diagnostic rates in the stats.

    Returns
    -------
    tuple
        The loss (0 in the graph when B < 2) and the ``MiningStats``.
    """
    feat = upcast(feat)
    n = len(feat)
    if n < 2:
        return feat[:0].sum(), MiningStats(0, 0, 0)
    mined = mine_pairs(feat, mining_ratio)
    rows, cols = torch.triu_indices(n, n, offset=1, device=feat.device)[:, mined]
    if agreement is None:
        positive = torch.ones(len(mined), dtype=torch.bool, device=feat.device)
    else:
        positive = agreement[mined] > threshold
    d2 = (feat[rows] - feat[cols]).pow(2).sum(1)
    n_pos = int(positive.sum())
    n_neg = len(rows) - n_pos
    log_p = _log_mean_exp(-d2[positive]) if n_pos else feat.new_tensor(math.log(_EMPTY_POSITIVE_MEAN))
    log_n = _log_mean_exp(-d2[~positive]) if n_neg else feat.new_tensor(math.log(_EMPTY_NEGATIVE_MEAN))
    loss = torch.logaddexp(log_p, log_n) - log_p

    tp_rate = mined_tp_rate = None
    if pids is not None:
        same = pids[rows] == pids[cols]
        tp_rate, mined_tp_rate = _rate(same[positive]), _rate(same)
    return loss, MiningStats(len(rows), n_pos, n_neg, tp_rate, mined_tp_rate)


class AgreementThreshold(nn.Module):
    """The global agreement threshold T of Eq. 3, kept as a buffer.

    Release (``DiscriminativeLoss``): T starts at the top-p quantile of all the
    target set's pairwise agreements and, after each batch has been split with
    the current T, moves toward the same quantile of the batch's pairwise
    agreements: T = (1 - m) T + m q, m = 0.1.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("threshold", torch.tensor(0.0))
        self.register_buffer("initialized", torch.tensor(False))

    @property
    def value(self) -> float:
        """T as a Python float."""
        return float(self.threshold)

    @torch.no_grad()
    def initialize(self, value: float) -> None:
        """Set T, normally to ``agreement_top_quantile`` of the whole target set."""
        self.threshold.fill_(value)
        self.initialized.fill_(True)

    @torch.no_grad()
    def update(self, batch_agreement: Tensor, mining_ratio: float, momentum: float = 0.1) -> float:
        """Move T toward the top-p quantile of the batch's pairwise agreements; return the new T.

        Parameters
        ----------
        batch_agreement : Tensor
            The agreements of the batch's distinct pairs, ``[B(B-1)/2]`` (``pair_agreements``).
        """
        self.threshold.copy_(self.moved_toward(batch_agreement, mining_ratio, momentum))
        return self.value

    def moved_toward(self, batch_agreement: Tensor, mining_ratio: float, momentum: float = 0.1) -> Tensor:
        """The T ``update`` would leave, as a new tensor; T itself stays as it is."""
        if len(batch_agreement) == 0:
            return self.threshold.clone()
        quantile = top_quantile(batch_agreement.detach(), mining_ratio)
        return self.threshold.mul(1.0 - momentum).add(momentum * quantile)


class MultilabelMemory(nn.Module):
    """A per-image memory of the target set's soft multilabels, from which L_MDL's agreements are taken.

    Release (``ReidTrainer.train_epoch``): on an image's first visit its
    multilabel is stored, afterwards the row becomes 0.9 * old + 0.1 * new; the
    agreements for mining are computed from the rows after this update.
    """

    def __init__(self, num_target: int, num_agents: int) -> None:
        super().__init__()
        self.register_buffer("memory", torch.zeros(num_target, num_agents))
        self.register_buffer("visited", torch.zeros(num_target, dtype=torch.bool))

    def blend(self, indices: Tensor, y: Tensor, momentum: float = 0.1) -> Tensor:
        """The rows ``update`` would write, without writing them: y on a first visit, else (1 - m) old + m y."""
        if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= len(self.memory)):
            raise TrainingError(
                f"target image indices {int(indices.min())}..{int(indices.max())} fall outside the multilabel memory's "
                f"{len(self.memory)} rows: num_target must be the target training set's size"
            )
        old = self.memory[indices]
        y = y.detach().to(old.dtype)
        seen = self.visited[indices][:, None]
        return torch.where(seen, (1.0 - momentum) * old + momentum * y, y)

    @torch.no_grad()
    def update(self, indices: Tensor, y: Tensor, momentum: float = 0.1) -> Tensor:
        """Write the blended rows for ``indices`` (distinct) and mark them visited; return them."""
        rows = self.blend(indices, y, momentum)
        self.write(indices, rows)
        return rows

    @torch.no_grad()
    def write(self, indices: Tensor, rows: Tensor) -> None:
        """Store ``rows`` (from ``blend``) for ``indices`` and mark them visited."""
        self.memory[indices] = rows
        self.visited[indices] = True
