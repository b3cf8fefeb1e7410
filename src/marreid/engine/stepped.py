"""The step loop every training shares: ``SteppedTrainer`` and its SGD and loss-guard helpers.

``SteppedTrainer`` holds what pretraining (``engine.pretrain``) and adaptation
(``engine.train``, any method) share: the global step counter, epochs over a
resumable batch stream (``PairedBatches``, ``PseudoLabelBatches``), the
learning-rate schedule, checkpoints (``LAST`` in the run folder) that resume
exactly, the non-finite guard, logging and the ``stop_requested`` seam for
signal handling.
"""

from __future__ import annotations

import math
import re
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from marreid.config import Config, config_to_dict, resolve_milestones
from marreid.engine.checkpoint import load_checkpoint, non_finite_tensors, save_checkpoint
from marreid.engine.extract import resolve_device
from marreid.engine.logging import RunLogger
from marreid.engine.preflight import check_input_size
from marreid.engine.seeding import capture_rng_state, restore_rng_state
from marreid.errors import CheckpointError, TrainingError

LAST = "last.pt"


def parameter_groups(model: nn.Module, weight_decay: float, no_decay_bn: bool) -> list[dict]:
    """SGD groups: BatchNorm weights and biases without weight decay (as the authors train), the rest with it."""
    if not no_decay_bn:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    norm_ids = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                for p in m.parameters(recurse=False)}
    decay = [p for p in model.parameters() if p.requires_grad and id(p) not in norm_ids]
    free = [p for p in model.parameters() if p.requires_grad and id(p) in norm_ids]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": free, "weight_decay": 0.0}]


def build_sgd(model: nn.Module, lr: float, momentum: float, weight_decay: float, no_decay_bn: bool,
              milestones: list[float], epochs: int, gamma: float, key: str
              ) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.MultiStepLR]:
    """SGD with momentum and a per-epoch step schedule (lr x gamma at each milestone epoch)."""
    optimizer = torch.optim.SGD(parameter_groups(model, weight_decay, no_decay_bn), lr=lr, momentum=momentum)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, resolve_milestones(milestones, epochs, key), gamma)
    return optimizer, scheduler


def check_finite(terms: dict[str, float], names: tuple[str, ...], step: int, checkpoint: Path) -> None:
    """TrainingError naming every non-finite loss term (the total and the term that made it so),
    the step, and the checkpoint kept."""
    bad = [f"'{name}' ({terms[name]})" for name in names
           if terms.get(name) is not None and not math.isfinite(terms[name])]
    if bad:
        kept = (f"the last good checkpoint {checkpoint} is kept (fix the cause, e.g. a lower learning "
                f"rate, and continue with --resume)" if checkpoint.is_file() else "no checkpoint was written")
        raise TrainingError(f"non-finite loss {'term' if len(bad) == 1 else 'terms'} {', '.join(bad)} "
                            f"at step {step}; stopped, {kept}")


class SteppedTrainer:
    """Epochs of a batch stream counted by a global step, with exact resume.

    Subclasses set ``model``, ``optimizer``, ``scheduler``, ``batches``, ``epochs``,
    ``max_steps``, ``checkpoint_every``, ``kind`` and implement ``compute_loss``; the
    loop checks every name in ``loss_names`` is finite before the optimiser step, and
    calls ``epoch_start`` before an epoch's (first remaining) step and ``end_step``
    after each optimiser step. A batch stream yields ``(step, aux_batch, target_batch)``,
    either batch possibly None.
    ``step`` is always the next global step to run; the epoch and the step within
    it follow from it. Setting ``stop_requested`` (e.g. from a signal handler)
    ends the run after the current step with a checkpoint.
    """

    kind = "base"
    loss_names: tuple[str, ...] = ("loss",)

    def __init__(self, cfg: Config, run_dir: str | Path, logger: RunLogger | None = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.logger = logger or RunLogger(self.run_dir, enabled=cfg.train.progress)
        self.device = resolve_device(cfg.train.device)
        self.step = 0
        self.stop_requested = False
        self.keep_epoch_checkpoints = False

    # subclass hooks -------------------------------------------------------------
    def trains_in(self, epoch: int) -> bool:
        """Whether any loss term is on in ``epoch``; in an epoch without one a step only counts."""
        return True

    def compute_loss(self, epoch: int, aux_batch, target_batch) -> tuple[torch.Tensor, dict[str, float]]:
        """The total loss of one step (in the graph) and its terms as floats."""
        raise NotImplementedError

    def end_step(self) -> None:
        """Called after the optimiser step of a step that trained (state updates)."""

    def epoch_start(self, epoch: int) -> None:
        """Called before the steps of ``epoch`` run, on a fresh epoch and on a resumed one."""

    @property
    def steps_per_epoch(self) -> int:
        return self.batches.steps_per_epoch

    def extra_state(self) -> dict:
        """What a subclass adds to the checkpoint."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Restore what ``extra_state`` saved."""

    def after_epoch(self, epoch: int) -> None:
        """Called after the checkpoint at the end of ``epoch``."""

    # state ----------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / LAST

    def state_dict(self) -> dict:
        """Everything a resumed run needs, as tensors and plain containers."""
        epoch = self.step // self.steps_per_epoch
        return {
            "kind": self.kind,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": capture_rng_state(),
            "epoch": epoch,
            "step": self.step,
            "config": config_to_dict(self.cfg),
            "arch": self.cfg.model.arch,
            "num_agents": int(self.model.num_agents),
            **self.extra_state(),
        }

    def save(self, epoch_end: int | None = None) -> Path:
        """Write run_dir/last.pt (and epoch_{k}.pt after epoch k when asked).

        Non-finite weights are never saved over the last good checkpoint, and a failed
        write (disk full) leaves it intact; both raise a one-line error.
        """
        state = self.state_dict()
        bad = non_finite_tensors(state["model"])
        if bad:
            raise TrainingError(f"non-finite weights in {bad[0]} after step {self.step}; not saved, the last "
                                f"good checkpoint {self.checkpoint_path} is kept")
        paths = [self.checkpoint_path]
        if epoch_end is not None and self.keep_epoch_checkpoints:
            paths.append(self.run_dir / f"epoch_{epoch_end + 1}.pt")
        for path in paths:
            try:
                save_checkpoint(path, state)
            except OSError as exc:
                raise CheckpointError(f"cannot write checkpoint {path} ({exc.strerror or exc}); "
                                      f"the previous one is kept") from None
        return self.checkpoint_path

    def resume(self, path: str | Path | None = None, trust: bool = False) -> None:
        """Continue from a checkpoint of this kind: weights, optimiser, schedule, RNG, step."""
        path = Path(path) if path is not None else self.checkpoint_path
        state = load_checkpoint(path, trust=trust)
        if state.get("kind") != self.kind:
            raise CheckpointError(f"{path}: a {state.get('kind', 'foreign')!r} checkpoint cannot resume a {self.kind} run")
        check_input_size(state, self.cfg, path)
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.load_extra_state(state)
            restore_rng_state(state["rng"])
            self.step = int(state["step"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"{path}: does not fit this run ({str(exc).splitlines()[0]})") from None

    # the loop -------------------------------------------------------------------
    def fit(self) -> str:
        """Run until the last epoch ends ("done"), ``max_steps`` ("max_steps") or a stop request ("stopped")."""
        per_epoch = self.steps_per_epoch
        self.model.train()
        if self.max_steps and self.step >= self.max_steps:
            return "max_steps"
        while self.step < self.epochs * per_epoch:
            epoch, start = divmod(self.step, per_epoch)
            self.epoch_start(epoch)
            bar = self.logger.progress(total=per_epoch, initial=start, unit="step",
                                       desc=f"{self.kind} epoch {epoch + 1}/{self.epochs}")
            tick = time.perf_counter()
            try:
                for in_epoch, aux_batch, target_batch in self.batches.iterate(epoch, start):
                    lr = self.optimizer.param_groups[0]["lr"]
                    terms: dict[str, float] = {}
                    if self.trains_in(epoch):
                        total, terms = self.compute_loss(epoch, aux_batch, target_batch)
                        check_finite(terms, self.loss_names, self.step, self.checkpoint_path)
                        self.optimizer.zero_grad(set_to_none=True)
                        total.backward()
                        self.optimizer.step()
                        self.end_step()
                    self.step += 1
                    images = sum(batch[0].shape[0] for batch in (aux_batch, target_batch) if batch is not None)
                    now = time.perf_counter()
                    self.logger.log("step", {"epoch": epoch, "lr": lr, **terms,
                                             "images_per_s": images / max(now - tick, 1e-9)}, step=self.step - 1)
                    tick = now
                    bar.update(1)
                    bar.set_postfix({k: f"{terms[k]:.4g}" for k in self.loss_names if k in terms})
                    status = self._end_of_step(epoch, in_epoch == per_epoch - 1)
                    if status is not None:
                        return status
            finally:
                bar.close()
        return "done"

    def _end_of_step(self, epoch: int, epoch_done: bool) -> str | None:
        """Schedule, checkpoint and evaluation after a step; the status if the run ends here.

        The scheduler steps before the epoch-end checkpoint, so a run stopped on an
        epoch's last step resumes with the next epoch's learning rate.
        """
        if epoch_done:
            with warnings.catch_warnings():
                # an epoch without a loss term (trains_in) never stepped the optimizer; the
                # epoch-indexed schedule is still right, so PyTorch's order warning is noise
                warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
                self.scheduler.step()
        capped = bool(self.max_steps) and self.step >= self.max_steps
        periodic = bool(self.checkpoint_every) and self.step % self.checkpoint_every == 0
        if epoch_done or capped or self.stop_requested or periodic:
            self.save(epoch_end=epoch if epoch_done else None)
        if epoch_done:
            self.logger.log("epoch", {"epoch": epoch, "checkpoint": str(self.checkpoint_path)}, step=self.step - 1)
            self.after_epoch(epoch)
        if capped:
            return "max_steps"
        if self.stop_requested:
            return "stopped"
        return None


__all__ = ["LAST", "SteppedTrainer", "build_sgd", "check_finite", "parameter_groups"]
