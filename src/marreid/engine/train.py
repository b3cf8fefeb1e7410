"""Adaptation training: one trainer for every method, the method chosen by ``train.method``.

``AdaptTrainer`` owns what every method shares: the model, the forward pass (by
default as the release does, each domain in BatchNorm batches of its own:
``train.forward``, ``train.bn_batch``; see ``engine.forward``), the optimiser
step, exact-resume checkpoints, logging and evaluation. Everything that differs
between methods it asks the method (``methods.base.Method``, looked up in
``methods.registry``): whether the auxiliary set is read, the batches, the
optimiser and its schedule, the fresh-start and per-epoch work, which terms
train in an epoch, the terms of a batch (a value) and the state update after
the optimiser step. Target identities reach a method only as the optional
``tgt_pids`` diagnostic: no loss term, schedule or checkpoint decision reads them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from marreid.config import Config, save_config
from marreid.data import ReidDataset, Sample
from marreid.data.loaders import augmented_pass_loader, plain_loader
from marreid.engine.checkpoint import load_checkpoint
from marreid.engine.distributed import (Precision, any_rank, autocast_dtype, broadcast_state, data_parallel, ddp_loss,
                                        gather_rows, gather_streams, join_process_group, prepare_model, rank_logger)
from marreid.engine.extract import eval_transform, evaluate_model
from marreid.engine.forward import GroupedForward, plan_groups
from marreid.engine.logging import RunLogger
from marreid.engine.preflight import ImageScreen, check_checkpoint_space, load_checked_target, prepare_run_dir
from marreid.engine.pretrain import load_auxiliary, train_transform
from marreid.engine.seeding import seed_everything
from marreid.engine.signals import StopOnSignals
from marreid.engine.stepped import LAST, SteppedTrainer
from marreid.errors import CheckpointError, ConfigError
from marreid.methods.base import Method, StepOutputs, Terms
from marreid.methods.registry import method_class
from marreid.models import build_model, load_backbone_weights

METRICS_FILE = "metrics.json"


def pretrained_path(cfg: Config) -> Path:
    """``train.pretrained_checkpoint``, or ``last.pt`` in ``output.pretrain_dir``."""
    return Path(cfg.train.pretrained_checkpoint or Path(cfg.output.pretrain_dir) / LAST)


class AdaptTrainer(SteppedTrainer):
    """Training of the method ``cfg.train.method`` on the target dataset (and, when the method
    reads it, the auxiliary samples, relabelled 0..N-1).

    Call ``load_start_weights`` and ``initialize`` for a fresh run, or ``resume``; then ``fit``.
    The checkpoint ``kind`` is the method's name, so a run resumes only with its own method.
    """

    def __init__(self, cfg: Config, aux: list[Sample] | None, target: ReidDataset, run_dir: str | Path,
                 logger: RunLogger | None = None) -> None:
        super().__init__(cfg, run_dir, logger or rank_logger(run_dir))
        t = cfg.train
        if not target.train:
            raise ConfigError(f"{target.root}: the target has no training images")
        method_cls = method_class(t.method)
        if aux is None and method_cls.needs_auxiliary(cfg):
            raise ConfigError(f"train.method={method_cls.name} trains on the auxiliary set, and none was given")
        self.kind = method_cls.name
        self.aux, self.target = aux, target
        start = pretrained_path(cfg) if method_cls.starts_from_pretrained(cfg) else None
        self.num_agents = method_cls.agent_count(cfg, aux, start)
        self.num_target = len(target.train)
        self.ranks, self.device = join_process_group(self.device)
        # Diagnostics need real identities in the target's names; one pid for all means none.
        self.diagnostics = t.diagnostics if t.diagnostics is not None else len({s.pid for s in target.train}) > 1
        seed_everything(t.seed, t.deterministic)
        self.model = prepare_model(build_model(cfg.model.arch, self.num_agents, cfg.model.scale), self.device,
                                   self.ranks, t.sync_bn, t.channels_last)
        self.method: Method = method_cls(cfg, self).to(self.device)
        # The training forward pass goes through DDP (when distributed).
        self.net = data_parallel(GroupedForward(self.model), self.ranks, self.device,
                                 find_unused=self.method.partial_gradients)
        world, shape = self.ranks.world_size, self.method.batch_shape
        self.bn_groups = plan_groups(shape.aux // world, shape.target // world, t.forward, t.bn_batch,
                                     self.ranks.rank, world, (shape.aux_key, shape.target_key))
        # With only auxiliary terms on, the target pass still runs (it moves the BatchNorm running
        # statistics, as in the release) but needs no graph: backward would only carry zeros through it.
        self.aux_only_groups = self.bn_groups.without_grad_from(shape.aux // world)
        self.optimizer, self.scheduler = self.method.build_optimizer(self.model)
        self.precision = Precision(self.device, autocast_dtype(self.device) if t.amp else None, t.channels_last,
                                   self.optimizer)
        self.epochs = self.method.epochs
        self.max_steps = t.max_steps
        self.checkpoint_every = t.checkpoint_every_steps
        self.keep_epoch_checkpoints = t.keep_epoch_checkpoints
        self._step: tuple[StepOutputs, Terms] | None = None

    # what the loop reads from the method ----------------------------------------
    @property
    def loss(self) -> Method:
        """The method (the name the loss state had: checkpoints keep the method's state under "loss")."""
        return self.method

    @property
    def loss_names(self) -> tuple[str, ...]:
        return self.method.term_names

    @property
    def batches(self):
        return self.method.batches

    @property
    def steps_per_epoch(self) -> int:
        return self.method.steps_per_epoch

    def trains_in(self, epoch: int) -> bool:
        """Whether any term trains in ``epoch``; in an epoch without one a step only counts."""
        return bool(self.method.active_terms(epoch))

    def target_terms_on(self, epoch: int) -> bool:
        """Whether a term with a gradient through the target images trains in ``epoch``."""
        return bool(self.method.active_terms(epoch) & self.method.target_terms)

    # weights and state ----------------------------------------------------------
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

    def load_start_weights(self) -> None:
        """A fresh run's weights: the pretrain checkpoint (``pretrained_path``) when the method
        starts from it, else the backbone weights of ``model.pretrained`` (unset: as built)."""
        cfg = self.cfg
        if self.method.starts_from_pretrained(cfg):
            self.load_pretrained(pretrained_path(cfg), trust=cfg.model.trust_checkpoint)
        elif cfg.model.pretrained:
            load_backbone_weights(self.model, cfg.model.pretrained, trust=cfg.model.trust_checkpoint)

    def initialize(self) -> None:
        """The method's fresh-start state (MAR: mu / sigma and T from one pass over the target),
        made bit-identical on every rank."""
        self.method.fresh_start(self)
        broadcast_state(self.method)  # every rank computed it; rank 0's copy makes them bit-identical

    @torch.no_grad()
    def target_pass(self, drop_to: int | None = None, desc: str = "target pass"
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Features, agent logits and camera ids of the target training images, in eval mode
        without autograd, on the device: every image with the test transform, in order; or, with
        ``drop_to``, the release's pass (a seeded shuffle, training augmentation, cut to whole
        batches of ``drop_to``). The model's train / eval mode is restored afterwards."""
        cfg = self.cfg
        if drop_to is not None:
            loader = augmented_pass_loader(self.target.train, train_transform(cfg), cfg.train.seed, drop_to,
                                           cfg.eval.batch_size, cfg.data.num_workers)
        else:
            loader = plain_loader(self.target.train, eval_transform(cfg), cfg.eval.batch_size, cfg.data.num_workers)
        was_training = self.model.training
        self.model.eval()
        feats, logits, camids = [], [], []
        try:
            for images, _, camid, _ in self.logger.progress(loader, desc=desc, unit="batch"):
                feat, logit = self.model(images.to(self.device, non_blocking=True))
                feats.append(feat)
                logits.append(logit)
                camids.append(camid)
        finally:
            self.model.train(was_training)
        return torch.cat(feats), torch.cat(logits), torch.cat(camids).to(self.device)

    def extra_state(self) -> dict:
        return {"method": self.method.name, "loss": self.method.state_dict(), "num_target": self.num_target,
                **self.precision.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        if state.get("num_target") != self.num_target:
            raise CheckpointError(f"checkpoint was trained on {state.get('num_target')} target images, "
                                  f"this run has {self.num_target}")
        self.method.load_state_dict(state["loss"])
        self.precision.load_state_dict(state)

    # the step ---------------------------------------------------------------------
    def step_outputs(self, epoch: int, aux_batch, target_batch) -> StepOutputs:
        """The model over one step's images, every rank's slice gathered into the global batch;
        the target pass without a graph when no target term trains in ``epoch``."""
        tgt_images, tgt_pids, tgt_camids, tgt_index = target_batch
        images = tgt_images if aux_batch is None else torch.cat([aux_batch[0], tgt_images])
        n_aux = 0 if aux_batch is None else aux_batch[0].shape[0]
        dev = self.device
        groups = self.bn_groups if self.target_terms_on(epoch) else self.aux_only_groups
        feat, logits = self.precision.forward(self.net, images.to(dev, non_blocking=True), groups)
        aux_feat, tgt_feat = gather_streams(feat, n_aux)
        aux_logits, tgt_logits = gather_streams(logits, n_aux)
        aux_labels = None if aux_batch is None else gather_rows(aux_batch[1].to(dev))
        return StepOutputs(
            tgt_feat=tgt_feat, tgt_logits=tgt_logits,
            tgt_camids=gather_rows(tgt_camids.to(dev)), tgt_index=gather_rows(tgt_index.to(dev)),
            agents=self.model.agent_matrix(),
            aux_feat=None if aux_batch is None else aux_feat, aux_logits=None if aux_batch is None else aux_logits,
            aux_labels=aux_labels, tgt_pids=gather_rows(tgt_pids.to(dev)) if self.diagnostics else None,
        )

    def compute_loss(self, epoch: int, aux_batch, target_batch) -> tuple[torch.Tensor, dict[str, float]]:
        """The method's terms of the global batch; the tensor returned is what this rank
        backpropagates (``ddp_loss``, loss-scaled under fp16). The state update waits for ``end_step``."""
        outputs = self.step_outputs(epoch, aux_batch, target_batch)
        terms = self.method.terms(outputs, epoch)
        self._step = (outputs, terms)
        return self.precision.scale(ddp_loss(terms.total, self.ranks)), terms.log

    def end_step(self) -> None:
        if self._step is not None:
            self.method.update_state(*self._step)
            self._step = None

    def epoch_start(self, epoch: int) -> None:
        self.method.epoch_start(epoch, self)

    # checkpoints and evaluation -------------------------------------------------
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
        epoch = self.step // self.steps_per_epoch
        metrics.update(step=self.step, epoch=epoch, checkpoint=str(self.checkpoint_path))
        self.logger.log("eval", metrics, step=self.step)
        (self.run_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
        self.model.train()
        return metrics

    def after_epoch(self, epoch: int) -> None:
        every = self.cfg.train.eval_every_epochs
        if every and (epoch + 1) % every == 0 and epoch + 1 < self.epochs:
            self.evaluate()


# The name tests and older callers know the trainer by (MAR was its only method).
MARTrainer = AdaptTrainer


def run_train(cfg: Config, resume: bool = False, logger: RunLogger | None = None, evaluate: bool = True) -> dict:
    """Train ``cfg.train.method`` into ``cfg.output.run_dir``.

    A fresh run loads its start weights (the pretrain checkpoint, or backbone weights when
    the method starts from those), sets up the method's state and checkpoints step 0;
    ``resume`` continues from ``run_dir/last.pt``. The auxiliary set is read only when the
    method trains on it. The target's query / gallery are evaluated at the end unless the
    run was stopped or ``evaluate`` is False (a caller that scores the checkpoint itself).
    The preflight checks (``engine.preflight``, the method's ``check_target``) run first;
    SIGINT / SIGTERM stop the run with a checkpoint. Returns ``{"status", "checkpoint",
    "steps", "metrics", "signal"}`` (metrics None when stopped; signal the stopping
    signal's number or None).
    """
    run_dir = Path(cfg.output.run_dir)
    method_cls = method_class(cfg.train.method)
    prepare_run_dir(run_dir, "output.run_dir", None if resume else run_dir / LAST)
    screen = ImageScreen.from_config(cfg.data)
    aux = load_auxiliary(cfg, screen) if method_cls.needs_auxiliary(cfg) else None
    target = load_checked_target(cfg, screen)
    method_cls.check_target(cfg, target)
    trainer = AdaptTrainer(cfg, aux, target, run_dir, logger)
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
            trainer.load_start_weights()
            trainer.initialize()
            trainer.save()
        trainer.logger.log("start", {"run": trainer.kind, "terms": list(trainer.loss_names),
                                     "aux_images": len(aux) if aux is not None else 0,
                                     "num_agents": trainer.num_agents, "target_images": trainer.num_target,
                                     "diagnostics": trainer.diagnostics,
                                     "steps_per_epoch": trainer.steps_per_epoch, "resumed_at": trainer.step})
        status = trainer.fit()
        metrics = trainer.evaluate() if evaluate and status != "stopped" else None
    finally:
        stop.restore()
        if logger is None:
            trainer.logger.close()
    return {"status": status, "checkpoint": str(trainer.checkpoint_path), "steps": trainer.step, "metrics": metrics,
            "signal": stop.received}


__all__ = ["AdaptTrainer", "MARTrainer", "run_train", "pretrained_path", "METRICS_FILE"]
