"""Supervised pretraining on the auxiliary set with L_AL, and the auxiliary samples both trainings use.

Pretraining learns the reference agents: a bias-free classifier over the
auxiliary identities on ``scale * cos(f(z), a_k)`` (Eq. 7); its rows become
MAR's agents. The step loop itself is ``engine.stepped.SteppedTrainer``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from marreid.config import Config, save_config
from marreid.data import Sample, load_dataset, pool_splits
from marreid.data.loaders import ImageDataset, PairedBatches
from marreid.data.transforms import TrainTransform
from marreid.engine.logging import RunLogger
from marreid.engine.preflight import ImageScreen, check_checkpoint_space, prepare_run_dir
from marreid.engine.seeding import seed_everything
from marreid.engine.signals import StopOnSignals
from marreid.engine.stepped import LAST, SteppedTrainer, build_sgd
from marreid.errors import ConfigError
from marreid.losses import agent_loss
from marreid.models import build_model


def load_auxiliary(cfg: Config, screen: ImageScreen | None = None) -> list[Sample]:
    """The configured auxiliary dataset's pooled, relabelled training samples, passed
    through ``screen`` (default: the one ``cfg.data`` asks for)."""
    if not cfg.data.aux_root:
        raise ConfigError("data.aux_root is not set (the labeled auxiliary dataset's folder)")
    dataset = load_dataset(cfg.data.aux_format, cfg.data.aux_root, pattern=cfg.data.aux_pattern,
                           cuhk03_variant=cfg.data.cuhk03_variant)
    screen = screen or ImageScreen.from_config(cfg.data)
    return screen(pool_splits(dataset, cfg.data.aux_splits), f"{dataset.root} (auxiliary)")


def train_transform(cfg: Config) -> TrainTransform:
    """The paper's augmentation at the configured size: flip, zero-pad and random crop."""
    return TrainTransform(cfg.data.height, cfg.data.width, cfg.data.flip, cfg.data.pad, cfg.data.mean, cfg.data.std)


class Pretrainer(SteppedTrainer):
    """L_AL on the auxiliary set (the agents are the classifier rows)."""

    kind = "pretrain"
    loss_names = ("loss", "accuracy")

    def __init__(self, cfg: Config, aux: list[Sample], run_dir: str | Path, logger: RunLogger | None = None) -> None:
        super().__init__(cfg, run_dir, logger)
        p = cfg.pretrain
        if p.batch_size > len(aux):
            raise ConfigError(f"pretrain.batch_size={p.batch_size} exceeds the auxiliary set's {len(aux)} images")
        self.num_agents = len({s.pid for s in aux})
        seed_everything(cfg.train.seed, cfg.train.deterministic)
        self.model = build_model(cfg.model.arch, self.num_agents, cfg.model.scale, pretrained=cfg.model.pretrained,
                                 trust=cfg.model.trust_checkpoint).to(self.device)
        self.optimizer, self.scheduler = build_sgd(self.model, p.lr, p.momentum, p.weight_decay, p.no_decay_bn,
                                                   p.milestones, p.epochs, p.gamma, "pretrain.milestones")
        self.batches = PairedBatches(ImageDataset(aux, train_transform(cfg)), None, p.batch_size, 0,
                                     cfg.train.seed, cfg.data.num_workers, pin_memory=self.device.type == "cuda")
        self.epochs = p.epochs
        self.max_steps = p.max_steps
        self.checkpoint_every = cfg.train.checkpoint_every_steps
        self.keep_epoch_checkpoints = cfg.train.keep_epoch_checkpoints

    def compute_loss(self, epoch: int, aux_batch, target_batch) -> tuple[torch.Tensor, dict[str, float]]:
        images, labels = aux_batch[0].to(self.device, non_blocking=True), aux_batch[1].to(self.device)
        _, logits = self.model(images)
        loss = agent_loss(logits, labels)
        accuracy = (logits.detach().argmax(1) == labels).float().mean()
        return loss, {"loss": loss.item(), "accuracy": accuracy.item()}


def run_pretrain(cfg: Config, resume: bool = False, logger: RunLogger | None = None) -> dict:
    """Pretrain into ``cfg.output.pretrain_dir``; returns ``{"status", "checkpoint", "steps", "num_agents"}``.

    The resolved configuration is written to ``pretrain_dir/config.yaml``. The preflight
    checks (``engine.preflight``) run first; SIGINT / SIGTERM stop the run with a
    checkpoint, and ``"signal"`` in the result is the signal's number (else None).
    """
    run_dir = Path(cfg.output.pretrain_dir)
    prepare_run_dir(run_dir, "output.pretrain_dir", None if resume else run_dir / LAST)
    screen = ImageScreen.from_config(cfg.data)
    aux = load_auxiliary(cfg, screen)
    trainer = Pretrainer(cfg, aux, run_dir, logger)
    check_checkpoint_space(trainer, "output.pretrain_dir")
    if resume:
        trainer.resume(trust=cfg.model.trust_checkpoint)
    # only now: a refused resume must leave the run's saved configuration as it was
    save_config(cfg, run_dir / "config.yaml")
    if screen.skipped:
        trainer.logger.log("skipped_images", screen.record)
    trainer.logger.log("start", {"run": "pretrain", "terms": list(trainer.loss_names), "aux_images": len(aux),
                                 "num_agents": trainer.num_agents,
                                 "steps_per_epoch": trainer.batches.steps_per_epoch, "resumed_at": trainer.step})
    stop = StopOnSignals(trainer).install()
    try:
        status = trainer.fit()
    finally:
        stop.restore()
        if logger is None:
            trainer.logger.close()
    return {"status": status, "checkpoint": str(trainer.checkpoint_path), "steps": trainer.step,
            "num_agents": trainer.num_agents, "signal": stop.received}


__all__ = ["Pretrainer", "run_pretrain", "load_auxiliary", "train_transform"]
