"""The MAR objective, Eq. 10: L = L_MDL + lambda1 * L_CML + lambda2 * L_RAL, with switches for the ablations.

``MARLoss.compute`` takes one step's terms as a value and the state update they imply
(``MARPending``); ``commit`` writes that update; ``forward`` is the two in a row (training
mode), the one code path both the loss-level callers and ``methods.mar`` go through.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from marreid.errors import ConfigError, TrainingError
from marreid.losses.agents import (
    agent_loss,
    agent_products,
    joint_embedding_terms,
    reference_agent_loss,
    squared_distances,
)
from marreid.losses.cml import LogMultilabelStats
from marreid.losses.mdl import AgreementThreshold, MiningStats, MultilabelMemory, mdl_loss
from marreid.losses.multilabel import agreement_top_quantile, log_soft_multilabel, pair_agreements, upcast

Tensor = torch.Tensor

POSITIVE_RULES = ("agreement", "feature")


def without_autocast(forward: Callable) -> Callable:
    """``forward(self, ...)`` run with autocast off on the device of its first tensor argument.

    Inside an autocast region the losses' matmuls (per-camera means, agent
    products) would run in bf16 / fp16; switching it off keeps every term in
    float32 whatever precision the model's forward pass used.
    """

    @functools.wraps(forward)
    def run(self, *args, **kwargs):
        device = next(v.device for v in (*args, *kwargs.values()) if isinstance(v, Tensor))
        with torch.autocast(device.type, enabled=False):
            return forward(self, *args, **kwargs)

    return run


@dataclass
class MARPending:
    """The state one training step implies, computed as values: the running ``(mean, std)``,
    the memory's ``(indices, rows)`` and T (a 0-d tensor); None where the step changes nothing."""

    stats: tuple[Tensor, Tensor] | None = None
    memory: tuple[Tensor, Tensor] | None = None
    threshold: Tensor | None = None


class MARTerms(NamedTuple):
    """Eq. 10 of one step (:meth:`MARLoss.compute`): ``total`` in the graph, ``weighted`` the
    switched-on terms as they enter it (``mdl``, ``cml`` x lambda1, ``al`` x lambda2, ``rj`` x
    lambda2 beta; they sum to ``total`` up to rounding), ``log`` the floats :meth:`MARLoss.forward`
    returns, ``pending`` the state update."""

    total: Tensor
    weighted: dict[str, Tensor]
    log: dict[str, float]
    pending: MARPending


def one_hot_rows(y: Tensor) -> Tensor:
    """Each row replaced by the one-hot vector of its largest entry (the hard-label ablation)."""
    return F.one_hot(y.argmax(1), y.shape[1]).to(y.dtype)


class MARLoss(nn.Module):
    """Eq. 10 with the release's state: running log-multilabel statistics, threshold T, multilabel memory.

    Parameters
    ----------
    num_agents : int
        Number of reference agents N (auxiliary identities).
    num_target : int
        Number of target training images (rows of the multilabel memory).
    lambda_cml, lambda_ral, beta, margin, mining_ratio : float
        lambda1, lambda2, beta, m and p of the paper.
    stats_momentum, threshold_momentum, memory_momentum : float
        Momenta of the running mu / sigma, of T and of the memory rows.
    use_al, use_rj, use_cml, use_mdl : bool
        Ablation switches; a switched-off term is 0.
    hard_labels : bool
        Agreements from one-hot argmax rows of the memory instead of the soft
        rows (the memory itself still holds soft multilabels). Agreement is then
        1 for pairs with the same nearest agent and 0 otherwise, so with T < 1
        the positives are the mined pairs sharing their nearest agent. T is set
        and updated by the same rules from these 0/1 agreements.
    positives : str
        ``"agreement"`` (MAR) or ``"feature"``: the feature-similarity mining
        baseline, where every mined pair (the top p of pairs by feature
        distance) is a positive, no agreement test is made, N is empty
        (Nbar = 0.5) and neither the memory nor T is used.
    """

    def __init__(
        self,
        num_agents: int,
        num_target: int,
        *,
        lambda_cml: float = 2e-4,
        lambda_ral: float = 50.0,
        beta: float = 0.2,
        margin: float = 1.0,
        mining_ratio: float = 0.005,
        stats_momentum: float = 0.0368,
        threshold_momentum: float = 0.1,
        memory_momentum: float = 0.1,
        use_al: bool = True,
        use_rj: bool = True,
        use_cml: bool = True,
        use_mdl: bool = True,
        hard_labels: bool = False,
        positives: str = "agreement",
    ) -> None:
        super().__init__()
        if positives not in POSITIVE_RULES:
            raise ConfigError(f"positives must be one of {', '.join(POSITIVE_RULES)}, not {positives!r}")
        if not 0.0 < mining_ratio <= 1.0:
            raise ConfigError(f"mining_ratio must be in (0, 1], not {mining_ratio}")
        for name, value in (
            ("stats_momentum", stats_momentum),
            ("threshold_momentum", threshold_momentum),
            ("memory_momentum", memory_momentum),
        ):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], not {value}")
        self.lambda_cml = lambda_cml
        self.lambda_ral = lambda_ral
        self.beta = beta
        self.margin = margin
        self.mining_ratio = mining_ratio
        self.stats_momentum = stats_momentum
        self.threshold_momentum = threshold_momentum
        self.memory_momentum = memory_momentum
        self.use_al = use_al
        self.use_rj = use_rj
        self.use_cml = use_cml
        self.use_mdl = use_mdl
        self.hard_labels = hard_labels
        self.positives = positives
        self.stats = LogMultilabelStats(num_agents)
        self.threshold = AgreementThreshold()
        self.memory = MultilabelMemory(num_target, num_agents)

    @property
    def uses_agreement(self) -> bool:
        """Whether L_MDL splits mined pairs by agreement (and so needs T and the memory)."""
        return self.use_mdl and self.positives == "agreement"

    def _agreement_rows(self, y: Tensor) -> Tensor:
        return one_hot_rows(y) if self.hard_labels else y

    def _cml(self, log_y: Tensor, camids: Tensor, log: dict[str, float], pending: MARPending) -> Tensor:
        """L_CML against the running mu / sigma; in training mode against those values moved first
        toward this batch's (release order), the moved values going to ``pending``."""
        if not bool(self.stats.initialized):
            raise TrainingError("MARLoss.initialize must run before training: the running mu / sigma are unset")
        cams, shares, pending.stats = self.stats.batch_shares(log_y, camids,
                                                              self.stats_momentum if self.training else None)
        log.update({f"cml_cam{int(c)}": float(s) for c, s in zip(cams, shares.detach())})
        return shares.sum()

    def _mdl(
        self, feat: Tensor, log_y: Tensor, index: Tensor, pids: Tensor | None, pending: MARPending
    ) -> tuple[Tensor, MiningStats]:
        """L_MDL; with agreement positives, split by the current T on the memory rows blended with
        this batch, after which (in training mode) T would move toward the batch's quantile
        (release order): the rows and the new T go to ``pending``."""
        if not self.uses_agreement:
            return mdl_loss(feat, None, self.threshold.value, self.mining_ratio, pids)
        if not bool(self.threshold.initialized):
            raise TrainingError("MARLoss.initialize must run before L_MDL is switched on: T is unset")
        rows = self.memory.blend(index, log_y.detach().exp(), self.memory_momentum)
        agreements = pair_agreements(self._agreement_rows(rows))
        loss, mining = mdl_loss(feat, agreements, self.threshold.value, self.mining_ratio, pids)
        if self.training:
            pending.memory = (index, rows)
            if len(agreements):
                pending.threshold = self.threshold.moved_toward(agreements, self.mining_ratio,
                                                                self.threshold_momentum)
        return loss, mining

    @torch.no_grad()
    def initialize(self, target_logits_all: Tensor, camids_all: Tensor) -> None:
        """Set mu / sigma and T from one pass over the whole target training set.

        Parameters
        ----------
        target_logits_all : Tensor
            ``[N_target, N_agents]`` logits of every target training image.
        camids_all : Tensor
            ``[N_target]`` their camera ids.
        """
        log_y = log_soft_multilabel(target_logits_all)
        if self.use_cml:
            self.stats.initialize(log_y, camids_all)
        if self.uses_agreement:
            rows = self._agreement_rows(log_y.exp())
            self.threshold.initialize(agreement_top_quantile(rows, self.mining_ratio))

    @without_autocast
    def compute(
        self,
        aux_feat: Tensor,
        aux_logits: Tensor,
        aux_labels: Tensor,
        tgt_feat: Tensor,
        tgt_logits: Tensor,
        tgt_camids: Tensor,
        tgt_index: Tensor,
        agents: Tensor,
        *,
        mdl_on: bool,
        tgt_pids: Tensor | None = None,
    ) -> MARTerms:
        """Eq. 10 of one step as a value; the state (statistics, memory, T) is left as it is.

        In training mode the terms are those of a training step: L_CML is taken against the
        running statistics already moved toward this batch, L_MDL on the memory rows blended
        with it, and the state these imply is returned as ``pending`` for :meth:`commit`. In
        eval mode L_CML uses the statistics as they are and ``pending`` stays empty.
        The arguments are :meth:`forward`'s.
        """
        aux_feat, tgt_feat = upcast(aux_feat), upcast(tgt_feat)
        agents = upcast(agents).detach()
        zero = tgt_feat.new_zeros(())

        # The target's products with the detached agents serve both L_RJ and the multilabel.
        tgt_products, scale = agent_products(tgt_feat, agents, tgt_logits)
        log_y = log_soft_multilabel(scale * tgt_products)
        al = agent_loss(aux_logits, aux_labels) if self.use_al else zero
        rj = zero
        if self.use_rj:
            d2_aux = squared_distances(aux_feat, agents, agent_products(aux_feat, agents, aux_logits)[0])
            d2_tgt = squared_distances(tgt_feat, agents, tgt_products)
            rj = joint_embedding_terms(d2_aux, aux_labels, d2_tgt, self.margin)
        ral = reference_agent_loss(al, rj, self.beta)

        log: dict[str, float] = {}
        pending = MARPending()
        cml = self._cml(log_y, tgt_camids, log, pending) if self.use_cml else zero
        threshold = self.threshold.value
        mdl, mining = zero, MiningStats(0, 0, 0)
        mdl_taken = self.use_mdl and mdl_on
        if mdl_taken:
            mdl, mining = self._mdl(tgt_feat, log_y, tgt_index, tgt_pids, pending)

        total = mdl + self.lambda_cml * cml + self.lambda_ral * ral
        # Eq. 10 is linear in these: each one's gradient is its share of the total's.
        weighted = {"mdl": mdl, "cml": self.lambda_cml * cml, "al": self.lambda_ral * al,
                    "rj": self.lambda_ral * self.beta * rj}
        on = {"mdl": mdl_taken, "cml": self.use_cml, "al": self.use_al, "rj": self.use_rj}
        log.update(
            loss=float(total.detach()),
            al=float(al.detach()),
            rj=float(rj.detach()),
            ral=float(ral.detach()),
            cml=float(cml.detach()),
            mdl=float(mdl.detach()),
            mined=float(mining.mined),
            positives=float(mining.positives),
            negatives=float(mining.negatives),
            threshold=threshold,
        )
        if mining.tp_rate is not None:
            log["tp_rate"] = mining.tp_rate
        if mining.mined_tp_rate is not None:
            log["mined_tp_rate"] = mining.mined_tp_rate
        return MARTerms(total, {name: term for name, term in weighted.items() if on[name]}, log, pending)

    @torch.no_grad()
    def commit(self, pending: MARPending) -> None:
        """Write the state one step implies (``MARTerms.pending``): the running statistics, the
        memory rows (marked visited) and T; parts left None stay as they are."""
        if pending.stats is not None:
            self.stats.set(*pending.stats)
        if pending.memory is not None:
            self.memory.write(*pending.memory)
        if pending.threshold is not None:
            self.threshold.threshold.copy_(pending.threshold)

    @without_autocast
    def forward(
        self,
        aux_feat: Tensor,
        aux_logits: Tensor,
        aux_labels: Tensor,
        tgt_feat: Tensor,
        tgt_logits: Tensor,
        tgt_camids: Tensor,
        tgt_index: Tensor,
        agents: Tensor,
        *,
        mdl_on: bool,
        tgt_pids: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """The total loss of one step and its terms: :meth:`compute`, then in training mode
        :meth:`commit` of the state it implies.

        Parameters
        ----------
        aux_feat, aux_logits, aux_labels : Tensor
            Auxiliary features ``[Ba, D]``, logits ``[Ba, N]`` (agents in their graph: L_AL trains them), labels.
        tgt_feat, tgt_logits, tgt_camids, tgt_index : Tensor
            Target features, logits, camera ids and indices into the training set.
        agents : Tensor
            ``[N, D]`` normalised agent rows (``model.agent_matrix()``); used detached.
        mdl_on : bool
            Whether L_MDL is taken this step (the release starts it at the second epoch);
            the memory and T change only when it is.
        tgt_pids : Tensor, optional
            True target identities, only for the ``tp_rate`` / ``mined_tp_rate`` diagnostics.

        Returns
        -------
        tuple
            The total (a tensor in the graph) and a dict of floats: ``loss, al, rj,
            ral, cml, mdl, mined, positives, negatives, threshold`` (the T this
            batch was split with), ``cml_cam{v}`` (each camera's share of
            ``cml``), and ``tp_rate`` / ``mined_tp_rate`` when ``tgt_pids`` is
            given and the set is not empty.
        """
        step = self.compute(aux_feat, aux_logits, aux_labels, tgt_feat, tgt_logits, tgt_camids, tgt_index, agents,
                            mdl_on=mdl_on, tgt_pids=tgt_pids)
        if self.training:
            self.commit(step.pending)
        return step.total, step.log
