"""MAR (Yu et al., CVPR 2019) as a method: Eq. 10 by SGD on paired auxiliary + target batches.

``MARMethod`` is ``losses.total.MARLoss`` (its state: running log-multilabel statistics,
threshold T, multilabel memory; ``state_dict`` keys as before) with the method contract
on top: the ``mar`` section's switches say which terms train (L_MDL from epoch
``mar.mdl_start_epoch`` on), ``optim`` gives SGD and its schedule, a fresh run sets
mu / sigma and T from one eval-mode pass over the target (``mar.init_pass``), and each
step's state update (computed with the terms, in release order) is committed after
the optimiser step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from marreid.config import Config
from marreid.data import ReidDataset, Sample
from marreid.data.loaders import ImageDataset, PairedBatches
from marreid.engine import preflight
from marreid.engine.pretrain import train_transform
from marreid.engine.stepped import build_sgd
from marreid.errors import ConfigError
from marreid.losses.total import MARLoss
from marreid.methods.base import BatchShape, Method, StepOutputs, Terms, TrainContext


class MARMethod(MARLoss, Method):
    """MAR: L = L_MDL + lambda1 L_CML + lambda2 (L_AL + beta L_RJ) with the ``mar`` section's switches."""

    name = "mar"
    term_names = ("loss", "al", "rj", "ral", "cml", "mdl")
    # L_RJ's target hinge, L_CML and L_MDL reach the network through the target images
    target_terms = frozenset({"rj", "cml", "mdl"})
    sections = ("mar", "optim")

    @classmethod
    def needs_auxiliary(cls, cfg: Config) -> bool:
        return True

    @classmethod
    def starts_from_pretrained(cls, cfg: Config) -> bool:
        return True

    @classmethod
    def agent_count(cls, cfg: Config, aux: list[Sample] | None, start: Path | None) -> int:
        """One agent per auxiliary identity."""
        return len({s.pid for s in aux})

    @classmethod
    def check_target(cls, cfg: Config, target: ReidDataset) -> None:
        """Two cameras with two images or more when L_CML is on, and an evaluable query / gallery."""
        preflight.check_target(target, cfg.mar.use_cml)

    def __init__(self, cfg: Config, context: TrainContext) -> None:
        m, t = cfg.mar, cfg.train
        aux, target = context.aux, context.target
        for name, batch, size in (("train.aux_batch", t.aux_batch, len(aux)),
                                  ("train.target_batch", t.target_batch, len(target.train))):
            if batch > size:
                raise ConfigError(f"{name}={batch} exceeds the {size} images it draws from")
        super().__init__(context.model.num_agents, len(target.train), lambda_cml=m.lambda_cml, lambda_ral=m.lambda_ral,
                         beta=m.beta, margin=m.margin, mining_ratio=m.mining_ratio, stats_momentum=m.stats_momentum,
                         threshold_momentum=m.threshold_momentum, memory_momentum=m.memory_momentum,
                         use_al=m.use_al, use_rj=m.use_rj, use_cml=m.use_cml, use_mdl=m.use_mdl,
                         hard_labels=m.hard_labels, positives=m.positives)
        self.mdl_start_epoch = m.mdl_start_epoch
        self.init_pass = m.init_pass
        self._optim = cfg.optim
        self.epochs = cfg.optim.epochs
        self.batch_shape = BatchShape(t.aux_batch, t.target_batch)
        # Without L_AL the agents get no gradient.
        self.partial_gradients = not m.use_al
        augment = train_transform(cfg)
        self._batches = PairedBatches(ImageDataset(aux, augment), ImageDataset(target.train, augment),
                                      t.aux_batch, t.target_batch, t.seed, cfg.data.num_workers,
                                      pin_memory=context.device.type == "cuda", rank=context.ranks.rank,
                                      world_size=context.ranks.world_size)

    @property
    def steps_per_epoch(self) -> int:
        return self._batches.steps_per_epoch

    @property
    def batches(self) -> PairedBatches:
        return self._batches

    def build_optimizer(self, model: nn.Module) -> tuple[Any, Any]:
        """SGD with momentum, BatchNorm without weight decay (``optim.no_decay_bn``), lr x gamma at the milestones."""
        o = self._optim
        return build_sgd(model, o.lr, o.momentum, o.weight_decay, o.no_decay_bn, o.milestones, o.epochs, o.gamma,
                         "optim.milestones")

    def fresh_start(self, context: TrainContext) -> None:
        """mu / sigma and T from one eval-mode pass over the target training images (``mar.init_pass``:
        all of them with the test transform, or the release's augmented, shuffled, drop-last pass);
        nothing to do when neither L_CML nor agreement mining is on."""
        if not (self.use_cml or self.uses_agreement):
            return
        drop_to = context.cfg.train.target_batch if self.init_pass == "release" else None
        _, logits, camids = context.target_pass(drop_to, desc="initialise on target")
        self.initialize(logits, camids)

    def active_terms(self, epoch: int) -> frozenset[str]:
        on = {"al": self.use_al, "rj": self.use_rj, "cml": self.use_cml,
              "mdl": self.use_mdl and epoch >= self.mdl_start_epoch}
        return frozenset(name for name, active in on.items() if active)

    def terms(self, outputs: StepOutputs, epoch: int) -> Terms:
        """``MARLoss.compute`` of the batch, L_MDL from ``mar.mdl_start_epoch`` on; in training mode
        the state update (statistics, memory rows, T) rides along as ``pending``."""
        step = self.compute(outputs.aux_feat, outputs.aux_logits, outputs.aux_labels, outputs.tgt_feat,
                            outputs.tgt_logits, outputs.tgt_camids, outputs.tgt_index, outputs.agents,
                            mdl_on=epoch >= self.mdl_start_epoch, tgt_pids=outputs.tgt_pids)
        return Terms(step.total, step.weighted, step.log, self.term_names, step.pending)

    def update_state(self, outputs: StepOutputs, terms: Terms) -> None:
        self.commit(terms.pending)


__all__ = ["MARMethod"]
