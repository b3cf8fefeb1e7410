"""Cluster contrast (Dai et al., "Cluster Contrast for Unsupervised Person Re-Identification", 2021)
as a method, and its MAR hybrids (``cc.agreement_weight`` > 0, ``cc.cml``).

Each epoch starts with a clustering of the target training set: features of every
image (test transform, eval mode), the k-reciprocal Jaccard distance, DBSCAN with
outliers dropped; the cluster memory starts from the centroids and each step
trains InfoNCE of the batch's features against it (``losses.contrast.cluster_nce``)
on identity-balanced batches of pseudo identities (``data.pseudo.PseudoLabelBatches``),
then moves the batch's centres toward its features. No auxiliary data is read.

The hybrid clusters (1 - w) d_J + w (1 - A) instead (``metrics.cluster.blended_distance``),
A MAR's soft multilabel agreement over the model's reference agents: the pretrained
agent rows, kept fixed (they get no gradient here), against the same pass's features.
With ``cc.cml`` the loss adds MAR's camera alignment, lambda1 L_CML (Eq. 5) of the
batch's soft multilabels against running statistics initialised over the target and
moved toward each batch's before the term is taken (MAR's release order), with the
``mar`` section's lambda_cml and stats_momentum.

The clustering is state (pseudo labels, memory, the epoch it was made for), so a run
resumed mid-epoch continues with the labels it had and clusters again only at the
next epoch. Per clustering a ``cluster`` record is logged: the number of clusters,
the outlier share and, when the target's names carry identities, the clustering's
scores against them (``metrics.cluster.clustering_scores``; never read by training).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from marreid.config import Config, resolve_milestones
from marreid.data import ReidDataset, Sample
from marreid.data.loaders import ImageDataset
from marreid.data.pseudo import PseudoLabelBatches
from marreid.engine.checkpoint import load_checkpoint
from marreid.engine.distributed import broadcast_state
from marreid.engine.preflight import check_evaluable
from marreid.engine.pretrain import train_transform
from marreid.errors import CheckpointError, TrainingError
from marreid.losses.cml import LogMultilabelStats
from marreid.losses.contrast import cluster_nce
from marreid.losses.multilabel import log_soft_multilabel, soft_multilabel
from marreid.methods.base import BatchShape, Method, StepOutputs, Terms, TrainContext
from marreid.methods.cluster_memory import ClusterMemory
from marreid.metrics.cluster import blend_cutoff, blended_distance, cluster_centres, clustering_scores, pseudo_labels
from marreid.metrics.rerank import k_reciprocal_jaccard

NOT_PREPARED = -1


def pretrained_agents(path: Path, trust: bool = False) -> int:
    """The number of reference agents of the ``marreid pretrain`` checkpoint at ``path``."""
    if not path.is_file():
        raise CheckpointError(f"pretrained checkpoint not found: {path} (run `marreid pretrain` or pass --pretrained)")
    state = load_checkpoint(path, trust=trust)
    if "kind" not in state:
        raise CheckpointError(f"{path}: not a marreid checkpoint; cluster contrast starts from a `marreid pretrain` "
                              f"checkpoint, or from backbone weights with cc.init=backbone and model.pretrained")
    return int(state["num_agents"])


class ClusterContrast(Method):
    """Cluster contrast on the target alone, configured by the ``cc`` section."""

    name = "cluster_contrast"
    term_names = ("loss", "contrast", "cml")
    target_terms = frozenset({"contrast", "cml"})
    # mar: the hybrid's lambda_cml and stats_momentum
    sections = ("cc", "mar")

    @classmethod
    def needs_auxiliary(cls, cfg: Config) -> bool:
        return False

    @classmethod
    def starts_from_pretrained(cls, cfg: Config) -> bool:
        return cfg.cc.init == "pretrained"

    @classmethod
    def agent_count(cls, cfg: Config, aux: list[Sample] | None, start: Path | None) -> int:
        """The pretrain checkpoint's agents (the hybrid's reference agents); one unused agent when
        starting from backbone weights."""
        return 1 if start is None else pretrained_agents(start, cfg.model.trust_checkpoint)

    @classmethod
    def check_target(cls, cfg: Config, target: ReidDataset) -> None:
        check_evaluable(target)

    def __init__(self, cfg: Config, context: TrainContext) -> None:
        super().__init__()
        c = cfg.cc
        self.cc = c
        self.epochs = c.epochs
        self.batch_shape = BatchShape(0, c.batch_size, target_key="cc.batch_size")
        # The agents (the hybrid's fixed reference) get no gradient, so no optimiser state or DDP reduction.
        context.model.agents.weight.requires_grad_(False)
        self.memory = ClusterMemory(context.model.feat_dim, c.momentum)
        self.register_buffer("labels", torch.full((len(context.target.train),), -1, dtype=torch.long))
        self.register_buffer("prepared_epoch", torch.tensor(NOT_PREPARED))
        self._images = ImageDataset(context.target.train, train_transform(cfg))
        self._identities = np.array([s.pid for s in context.target.train])
        self._stream = dict(seed=cfg.train.seed, num_workers=cfg.data.num_workers,
                            pin_memory=context.device.type == "cuda", rank=context.ranks.rank,
                            world_size=context.ranks.world_size)
        self._batches: PseudoLabelBatches | None = None
        self._batches_of = NOT_PREPARED  # the epoch whose labels _batches holds
        self.stats = LogMultilabelStats(context.model.num_agents) if c.cml else None
        if self.stats is None:  # pure cluster contrast logs no L_CML column
            self.term_names = ("loss", "contrast")
        self.lambda_cml, self.stats_momentum = cfg.mar.lambda_cml, cfg.mar.stats_momentum

    @property
    def steps_per_epoch(self) -> int:
        return self.cc.iters_per_epoch

    @property
    def batches(self) -> PseudoLabelBatches:
        if self._batches is None or self._batches_of != int(self.prepared_epoch):
            if int(self.prepared_epoch) == NOT_PREPARED:
                raise TrainingError("cluster contrast has no pseudo labels yet: epoch_start must run first")
            c = self.cc
            self._batches = PseudoLabelBatches(self._images, self.labels.cpu().numpy(), c.batch_size, c.instances,
                                               c.iters_per_epoch, **self._stream)
            self._batches_of = int(self.prepared_epoch)
        return self._batches

    def build_optimizer(self, model: nn.Module) -> tuple[Any, Any]:
        """Adam over the trained parameters (the agents are not), lr x gamma at ``cc.milestones``."""
        c = self.cc
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=c.lr,
                                     weight_decay=c.weight_decay)
        milestones = resolve_milestones(c.milestones, c.epochs, "cc.milestones")
        return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, c.gamma)

    @torch.no_grad()
    def fresh_start(self, context: TrainContext) -> None:
        """With ``cc.cml``: L_CML's mu / sigma from one pass over the target (MAR's ``init_pass: all``)."""
        if self.stats is not None:
            _, logits, camids = context.target_pass(desc="initialise L_CML's statistics")
            self.stats.initialize(log_soft_multilabel(logits.float()), camids)
            broadcast_state(self)

    def epoch_start(self, epoch: int, context: TrainContext) -> None:
        """Cluster for ``epoch`` unless its clustering is already in the state (a mid-epoch resume)."""
        if int(self.prepared_epoch) != epoch:
            self.cluster(epoch, context)

    @torch.no_grad()
    def cluster(self, epoch: int, context: TrainContext) -> np.ndarray:
        """Pseudo labels of the target training images for ``epoch`` and the memory's centroids;
        returns the labels (-1: outlier) and logs a ``cluster`` record."""
        c = self.cc
        clock = [time.perf_counter()]
        feat, logits, _ = context.target_pass(desc=f"cluster for epoch {epoch + 1}")
        features = feat.float().cpu().numpy()
        clock.append(time.perf_counter())
        w = c.agreement_weight
        # Sparse: only the pairs that can be DBSCAN edges, before or after the blend.
        distance = k_reciprocal_jaccard(features, c.k1, c.k2, max_distance=blend_cutoff(w, c.eps) if w > 0 else c.eps)
        if w > 0:
            multilabels = soft_multilabel(logits.float()).cpu().numpy()
            distance = blended_distance(distance, multilabels, w, eps=c.eps)
        clock.append(time.perf_counter())
        labels = pseudo_labels(distance, c.eps, c.min_samples)
        clock.append(time.perf_counter())
        if labels.max(initial=-1) < 0:
            raise TrainingError(f"the clustering for epoch {epoch + 1} found no cluster (every target image an "
                                f"outlier at cc.eps={c.eps}, cc.min_samples={c.min_samples}): raise cc.eps or lower "
                                f"cc.min_samples")
        self.memory.reset(cluster_centres(features, labels))
        self.labels.copy_(torch.from_numpy(labels))
        self.prepared_epoch.fill_(epoch)
        self._share_from_rank_zero(context)
        labels = self.labels.cpu().numpy()
        seconds = np.diff(clock)
        record: dict[str, Any] = {"epoch": epoch, "clusters": self.memory.num_clusters,
                                  "outlier_share": float((labels < 0).mean()), "features_s": float(seconds[0]),
                                  "distance_s": float(seconds[1]), "dbscan_s": float(seconds[2])}
        if context.diagnostics:  # against the names' identities: logged, never used
            record.update(clustering_scores(labels, self._identities))
        context.logger.log("cluster", record, step=epoch * self.steps_per_epoch)
        return labels

    def _share_from_rank_zero(self, context: TrainContext) -> None:
        """Under torchrun every rank clustered; rank 0's labels and centres are kept by all."""
        if not context.ranks.distributed:
            return
        count = torch.tensor([self.memory.num_clusters], device=self.labels.device)
        dist.broadcast(count, 0)
        if context.ranks.rank != 0:
            self.memory.centres = self.memory.centres.new_zeros(int(count), self.memory.feat_dim)
        broadcast_state(self)

    def active_terms(self, epoch: int) -> frozenset[str]:
        return frozenset({"contrast", "cml"} if self.stats is not None else {"contrast"})

    def terms(self, outputs: StepOutputs, epoch: int) -> Terms:
        """InfoNCE of the batch's features against the cluster memory at ``cc.temperature``, plus
        lambda1 L_CML with ``cc.cml`` (against the statistics moved toward this batch's, which
        ``pending`` carries to ``update_state``)."""
        contrast = cluster_nce(outputs.tgt_feat, self.labels[outputs.tgt_index], self.memory.centres,
                               self.cc.temperature)
        weighted = {"contrast": contrast}
        log = {"contrast": float(contrast.detach())}
        pending = None
        if self.stats is not None:
            if not bool(self.stats.initialized):
                raise TrainingError("cc.cml: L_CML's running mu / sigma are unset (fresh_start did not run)")
            # the agents are fixed, so the model's logits are Eq. 1's argument with no agent gradient
            cams, shares, pending = self.stats.batch_shares(log_soft_multilabel(outputs.tgt_logits.float()),
                                                            outputs.tgt_camids, self.stats_momentum)
            cml = shares.sum()
            weighted["cml"] = self.lambda_cml * cml
            log["cml"] = float(cml.detach())
            log.update({f"cml_cam{int(c)}": float(v) for c, v in zip(cams, shares.detach())})
        total = sum(weighted.values())
        log["loss"] = float(total.detach())
        return Terms(total, weighted, log, self.term_names, pending)

    def update_state(self, outputs: StepOutputs, terms: Terms) -> None:
        """Each feature moves its cluster's centre (momentum ``cc.momentum``), in batch order; with
        ``cc.cml`` the running statistics take the values the terms were taken against."""
        self.memory.update(outputs.tgt_feat.detach(), self.labels[outputs.tgt_index])
        if terms.pending is not None:
            self.stats.set(*terms.pending)


__all__ = ["ClusterContrast", "pretrained_agents"]
