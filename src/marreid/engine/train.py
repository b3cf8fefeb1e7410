"""The MAR trainer: pretrained agents, one initialisation pass over the target, then Eq. 10 by SGD.

Each step feeds the auxiliary and target images through the model, by default
as the release does: each domain in BatchNorm batches of its own
(``train.forward``, ``train.bn_batch``; see ``engine.forward``), takes
``MARLoss`` with L_MDL from epoch ``mar.mdl_start_epoch`` on, and steps SGD;
the learning rate drops at the milestone epochs. Target identities are handed
to the loss only as the optional ``tgt_pids`` diagnostic: no loss term,
schedule or checkpoint decision reads them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from marreid.config import Config, save_config
from marreid.data import ReidDataset, Sample
from marreid.data.loaders import ImageDataset, PairedBatches, augmented_pass_loader, plain_loader
from marreid.engine.checkpoint import load_checkpoint
from marreid.engine.distributed import (Precision, any_rank, autocast_dtype, broadcast_state, data_parallel, ddp_loss,
                                        gather_rows, gather_streams, join_process_group, prepare_model, rank_logger)
from marreid.engine.extract import eval_transform, evaluate_model
from marreid.engine.forward import GroupedForward, plan_groups
from marreid.engine.logging import RunLogger
from marreid.engine.preflight import (ImageScreen, check_checkpoint_space, check_target, load_checked_target,
                                      prepare_run_dir)
from marreid.engine.pretrain import load_auxiliary, train_transform
from marreid.engine.stepped import LAST, SteppedTrainer, build_sgd
from marreid.engine.seeding import seed_everything
from marreid.engine.signals import StopOnSignals
from marreid.errors import CheckpointError, ConfigError
from marreid.losses import MARLoss
from marreid.models import build_model, load_backbone_weights

METRICS_FILE = "metrics.json"


def build_mar_loss(cfg: Config, num_agents: int, num_target: int) -> MARLoss:
    """MARLoss with every value of the ``mar`` section."""
    m = cfg.mar
    return MARLoss(num_agents, num_target, lambda_cml=m.lambda_cml, lambda_ral=m.lambda_ral, beta=m.beta,
                   margin=m.margin, mining_ratio=m.mining_ratio, stats_momentum=m.stats_momentum,
                   threshold_momentum=m.threshold_momentum, memory_momentum=m.memory_momentum,
                   use_al=m.use_al, use_rj=m.use_rj, use_cml=m.use_cml, use_mdl=m.use_mdl,
                   hard_labels=m.hard_labels, positives=m.positives)


def pretrained_path(cfg: Config) -> Path:
    """``train.pretrained_checkpoint``, or ``last.pt`` in ``output.pretrain_dir``."""
    return Path(cfg.train.pretrained_checkpoint or Path(cfg.output.pretrain_dir) / LAST)


class MARTrainer(SteppedTrainer):
    """MAR training on auxiliary samples (relabelled 0..N-1) and a target dataset.

    Call ``load_pretrained`` and ``initialize`` for a fresh run, or ``resume``; then ``fit``.
    """

    kind = "mar"
    loss_names = ("loss", "al", "rj", "ral", "cml", "mdl")

    def __init__(self, cfg: Config, aux: list[Sample], target: ReidDataset, run_dir: str | Path,
                 logger: RunLogger | None = None) -> None:
        super().__init__(cfg, run_dir, logger or rank_logger(run_dir))
        t = cfg.train
        if not target.train:
            raise ConfigError(f"{target.root}: the target has no training images")
        for name, batch, size in (("train.aux_batch", t.aux_batch, len(aux)),
                                  ("train.target_batch", t.target_batch, len(target.train))):
            if batch > size:
                raise ConfigError(f"{name}={batch} exceeds the {size} images it draws from")
        self.target = target
        self.num_agents = len({s.pid for s in aux})
        self.num_target = len(target.train)
        self.ranks, self.device = join_process_group(self.device)
        seed_everything(t.seed, t.deterministic)
        self.model = prepare_model(build_model(cfg.model.arch, self.num_agents, cfg.model.scale), self.device,
                                   self.ranks, t.sync_bn, t.channels_last)
        # The training forward pass goes through DDP (when distributed); without L_AL the agents get no gradient.
        self.net = data_parallel(GroupedForward(self.model), self.ranks, self.device, find_unused=not cfg.mar.use_al)
        world = self.ranks.world_size
        self.bn_groups = plan_groups(t.aux_batch // world, t.target_batch // world, t.forward, t.bn_batch,
                                     self.ranks.rank, world)
        # With only auxiliary terms on, the target pass still runs (it moves the BatchNorm running
        # statistics, as in the release) but needs no graph: backward would only carry zeros through it.
        self.aux_only_groups = self.bn_groups.without_grad_from(t.aux_batch // world)
        self.loss = build_mar_loss(cfg, self.num_agents, self.num_target).to(self.device)
        o = cfg.optim
        self.optimizer, self.scheduler = build_sgd(self.model, o.lr, o.momentum, o.weight_decay, o.no_decay_bn,
                                                   o.milestones, o.epochs, o.gamma, "optim.milestones")
        self.precision = Precision(self.device, autocast_dtype(self.device) if t.amp else None, t.channels_last,
                                   self.optimizer)
        augment = train_transform(cfg)
        self.batches = PairedBatches(ImageDataset(aux, augment), ImageDataset(target.train, augment),
                                     t.aux_batch, t.target_batch, t.seed, cfg.data.num_workers,
                                     pin_memory=self.device.type == "cuda", rank=self.ranks.rank,
                                     world_size=self.ranks.world_size)
        self.epochs = o.epochs
        self.max_steps = t.max_steps
        self.checkpoint_every = t.checkpoint_every_steps
        self.keep_epoch_checkpoints = t.keep_epoch_checkpoints
        # Diagnostics need real identities in the target's names; one pid for all means none.
        self.diagnostics = t.diagnostics if t.diagnostics is not None else len({s.pid for s in target.train}) > 1

    def load_pretrained(self, path: str | Path, trust: bool = False) -> None:
        """Weights and agents from a ``marreid pretrain`` checkpoint (or a foreign weight file
        whose classifier rows fit the auxiliary identities, e.g. the authors' release)."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"pretrained checkpoint not found: {path} (run `marreid pretrain` or pass --pretrained)")
        state = load_checkpoint(path, trust=trust, finite=True)
        if "kind" not in state:
            report = load_backbone_weights(self.model, path, trust=trust)
            if not report.agents_loaded:
                raise CheckpointError(f"{path}: no classifier of {self.num_agents} x {self.model.feat_dim} "
                                      f"to take the agents from")
            return
        arch = state.get("arch")
        if arch != self.cfg.model.arch:
            raise CheckpointError(f"{path}: holds a {arch} model, the configuration asks for {self.cfg.model.arch}")
        agents = state.get("num_agents")
        if agents != self.num_agents:
            raise CheckpointError(f"{path}: {agents} agents, but the auxiliary set has {self.num_agents} identities "
                                  f"(pretrain on the same auxiliary data)")
        try:
            self.model.load_state_dict(state["model"])
        except (KeyError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: weights do not fit the model ({str(exc).splitlines()[0]})") from None

    @torch.no_grad()
    def initialize(self) -> None:
        """Set L_CML's mu / sigma and L_MDL's threshold T from one eval-mode pass over the
        target training images (``mar.init_pass``: all of them with the test transform, or
        the release's augmented, shuffled, drop-last loader), via ``MARLoss.initialize``;
        nothing to do when neither L_CML nor agreement mining is on."""
        if not (self.loss.use_cml or self.loss.uses_agreement):
            return
        self.model.eval()
        cfg = self.cfg
        if cfg.mar.init_pass == "release":
            loader = augmented_pass_loader(self.target.train, train_transform(cfg), cfg.train.seed,
                                           cfg.train.target_batch, cfg.eval.batch_size, cfg.data.num_workers)
        else:
            loader = plain_loader(self.target.train, eval_transform(cfg), cfg.eval.batch_size, cfg.data.num_workers)
        logits, camids = [], []
        for images, _, camid, _ in self.logger.progress(loader, desc="initialise on target", unit="batch"):
            logits.append(self.model(images.to(self.device, non_blocking=True))[1])
            camids.append(camid)
        self.loss.initialize(torch.cat(logits), torch.cat(camids).to(self.device))
        broadcast_state(self.loss)  # every rank computed it; rank 0's copy makes them bit-identical
        self.model.train()

    def trains_in(self, epoch: int) -> bool:
        """False only when L_MDL is the sole term left on and ``epoch`` is before its start."""
        return self.loss.use_al or self.target_terms_on(epoch)

    def target_terms_on(self, epoch: int) -> bool:
        """Whether a loss term with a gradient through the target images (L_RJ's target hinge,
        L_CML, L_MDL) is on in ``epoch``."""
        loss = self.loss
        return loss.use_rj or loss.use_cml or (loss.use_mdl and epoch >= self.cfg.mar.mdl_start_epoch)

    def compute_loss(self, epoch: int, aux_batch, target_batch) -> tuple[torch.Tensor, dict[str, float]]:
        """MARLoss of the global batch (every rank's slice gathered) and its terms; the tensor
        returned is what this rank backpropagates (``ddp_loss``, loss-scaled under fp16)."""
        aux_images, aux_labels = aux_batch[0], aux_batch[1]
        tgt_images, tgt_pids, tgt_camids, tgt_index = target_batch
        n_aux = aux_images.shape[0]
        dev = self.device
        groups = self.bn_groups if self.target_terms_on(epoch) else self.aux_only_groups
        feat, logits = self.precision.forward(self.net, torch.cat([aux_images, tgt_images]).to(dev, non_blocking=True),
                                              groups)
        aux_feat, tgt_feat = gather_streams(feat, n_aux)
        aux_logits, tgt_logits = gather_streams(logits, n_aux)
        total, terms = self.loss(
            aux_feat, aux_logits, gather_rows(aux_labels.to(dev)),
            tgt_feat, tgt_logits, gather_rows(tgt_camids.to(dev)), gather_rows(tgt_index.to(dev)),
            self.model.agent_matrix(),
            mdl_on=epoch >= self.cfg.mar.mdl_start_epoch,
            tgt_pids=gather_rows(tgt_pids.to(dev)) if self.diagnostics else None,
        )
        return self.precision.scale(ddp_loss(total, self.ranks)), terms

    def extra_state(self) -> dict:
        return {"loss": self.loss.state_dict(), "num_target": self.num_target, **self.precision.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        if state.get("num_target") != self.num_target:
            raise CheckpointError(f"checkpoint was trained on {state.get('num_target')} target images, "
                                  f"this run has {self.num_target}")
        self.loss.load_state_dict(state["loss"])
        self.precision.load_state_dict(state)

    def save(self, epoch_end: int | None = None) -> Path:
        """Checkpoint on rank 0 only: every rank holds the same global state."""
        return super().save(epoch_end) if self.ranks.is_main else self.checkpoint_path

    def _end_of_step(self, epoch: int, epoch_done: bool) -> str | None:
        # A stop signal reaches the ranks at different moments; all must stop after the same step.
        self.stop_requested = any_rank(self.stop_requested, self.device)
        return super()._end_of_step(epoch, epoch_done)

    def evaluate(self) -> dict | None:
        """Evaluate on the target's query / gallery; log it and write run_dir/metrics.json.
        Only rank 0 evaluates; the other ranks return None."""
        if not self.ranks.is_main:
            return None
        metrics = evaluate_model(self.model, self.target, self.cfg, self.device,
                                 progress=lambda it: self.logger.progress(it, desc="evaluate", unit="batch"))
        epoch = self.step // self.batches.steps_per_epoch
        metrics.update(step=self.step, epoch=epoch, checkpoint=str(self.checkpoint_path))
        self.logger.log("eval", metrics, step=self.step)
        (self.run_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
        self.model.train()
        return metrics

    def after_epoch(self, epoch: int) -> None:
        every = self.cfg.train.eval_every_epochs
        if every and (epoch + 1) % every == 0 and epoch + 1 < self.epochs:
            self.evaluate()


def run_train(cfg: Config, resume: bool = False, logger: RunLogger | None = None, evaluate: bool = True) -> dict:
    """MAR training into ``cfg.output.run_dir``.

    A fresh run loads the pretrained agents, initialises the loss state and
    checkpoints step 0; ``resume`` continues from ``run_dir/last.pt``. The
    target's query / gallery are evaluated at the end unless the run was stopped
    or ``evaluate`` is False (a caller that scores the checkpoint itself).
    The preflight checks (``engine.preflight``) run first; SIGINT / SIGTERM stop the
    run with a checkpoint. Returns ``{"status", "checkpoint", "steps", "metrics",
    "signal"}`` (metrics None when stopped; signal the stopping signal's number or None).
    """
    run_dir = Path(cfg.output.run_dir)
    prepare_run_dir(run_dir, "output.run_dir", None if resume else run_dir / LAST)
    screen = ImageScreen.from_config(cfg.data)
    aux = load_auxiliary(cfg, screen)
    target = load_checked_target(cfg, screen)
    check_target(target, cfg.mar.use_cml)
    trainer = MARTrainer(cfg, aux, target, run_dir, logger)
    check_checkpoint_space(trainer, "output.run_dir")
    if screen.skipped:
        trainer.logger.log("skipped_images", screen.record)
    stop = StopOnSignals(trainer).install()
    try:
        if resume:
            trainer.resume(trust=cfg.model.trust_checkpoint)
        if trainer.ranks.is_main:
            # only now: a refused resume must leave the run's saved configuration as it was
            save_config(cfg, run_dir / "config.yaml")
        if not resume:
            trainer.load_pretrained(pretrained_path(cfg), trust=cfg.model.trust_checkpoint)
            trainer.initialize()
            trainer.save()
        trainer.logger.log("start", {"run": "mar", "aux_images": len(aux), "num_agents": trainer.num_agents,
                                     "target_images": trainer.num_target, "diagnostics": trainer.diagnostics,
                                     "steps_per_epoch": trainer.batches.steps_per_epoch, "resumed_at": trainer.step})
        status = trainer.fit()
        metrics = trainer.evaluate() if evaluate and status != "stopped" else None
    finally:
        stop.restore()
        if logger is None:
            trainer.logger.close()
    return {"status": status, "checkpoint": str(trainer.checkpoint_path), "steps": trainer.step, "metrics": metrics,
            "signal": stop.received}


__all__ = ["MARTrainer", "run_train", "build_mar_loss", "pretrained_path", "METRICS_FILE"]
