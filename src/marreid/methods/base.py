"""The contract between the training engine and an adaptation method.

The engine (``engine.train.AdaptTrainer`` on ``engine.stepped.SteppedTrainer``'s loop)
owns the model, the forward pass, the optimiser step, checkpoints and logging; a
:class:`Method` owns its losses, its state and what it needs per epoch. Per step the
engine runs the model over the batch the method's ``batches`` yield, hands the outputs
(:class:`StepOutputs`) to :meth:`Method.terms`, which returns the weighted loss terms
as a value (:class:`Terms`) without touching any state; after the optimiser step the
engine calls :meth:`Method.update_state`, which commits the state update. A method
whose update must be computed in ``terms`` (MAR takes L_CML against statistics already
moved toward the batch) carries it in ``Terms.pending``.

Which terms train in an epoch (:meth:`Method.active_terms`) is all the engine asks to
decide whether an epoch trains at all and whether the target images need autograd
(``Method.target_terms``). ``term_names`` (the total first) is what is checked finite,
shown in the progress bar and plotted; ``Terms.weighted`` is what the gradient-share
diagnostic splits the gradient by.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from marreid.config import Config
    from marreid.data import ReidDataset, Sample
    from marreid.engine.distributed import Ranks
    from marreid.engine.logging import RunLogger

Tensor = torch.Tensor


@dataclass
class StepOutputs:
    """One step's model outputs over the global batch (every rank's slice gathered, in rank order).

    ``agents`` are the model's L2-normalised agent rows, in the graph; the auxiliary fields
    are None for a method that draws no auxiliary batch; ``tgt_pids`` (the file names'
    identities) is set only when diagnostics are on, and is read for diagnostics only.
    """

    tgt_feat: Tensor
    tgt_logits: Tensor
    tgt_camids: Tensor
    tgt_index: Tensor
    agents: Tensor
    aux_feat: Tensor | None = None
    aux_logits: Tensor | None = None
    aux_labels: Tensor | None = None
    tgt_pids: Tensor | None = None


@dataclass
class Terms:
    """The loss of one batch as a value.

    ``total`` is what is backpropagated; ``weighted`` holds each term that trains this step
    as it enters ``total`` (weight included; they sum to ``total`` up to rounding), for the
    gradient-share diagnostic; ``log`` is the step record's floats (every name of ``names``
    and any diagnostics); ``names`` (the method's ``term_names``) are checked finite and shown
    in the progress bar; ``pending`` is the state update computed with the terms, which
    :meth:`Method.update_state` commits.
    """

    total: Tensor
    weighted: dict[str, Tensor]
    log: dict[str, float]
    names: tuple[str, ...]
    pending: Any = None


@dataclass(frozen=True)
class BatchShape:
    """Images per global step of each stream and the options that set them (for error messages)."""

    aux: int
    target: int
    aux_key: str = "train.aux_batch"
    target_key: str = "train.target_batch"


class Batches(Protocol):
    """A resumable batch stream (``data.loaders.PairedBatches``, ``data.pseudo.PseudoLabelBatches``)."""

    steps_per_epoch: int

    def iterate(self, epoch: int, start_step: int = 0) -> Iterator[tuple[int, Any, Any]]:
        """``(step, aux_batch or None, target_batch)`` from ``start_step`` to the epoch's end."""


class TrainContext(Protocol):
    """What the engine lends a method's hooks (the trainer meets it)."""

    cfg: Config
    model: nn.Module
    device: torch.device
    ranks: Ranks
    aux: list[Sample] | None
    target: ReidDataset
    logger: RunLogger
    diagnostics: bool  # whether the target's file names carry identities to score against
    step: int  # the next global step

    def target_pass(self, drop_to: int | None = None, desc: str = "target pass") -> tuple[Tensor, Tensor, Tensor]:
        """Features, agent logits and camera ids of the target training images, in eval mode without
        autograd, on the device: every image with the test transform in order, or (``drop_to``) the
        release's initialisation pass (seeded shuffle, training augmentation, whole batches)."""


class Method(nn.Module):
    """An adaptation method: its configuration, its state (buffers, so ``state_dict`` is what exact
    resume needs) and the hooks the engine calls. Subclasses set the class attributes and
    implement the hooks; ``__init__(cfg, context)`` builds what does not change between epochs."""

    name: ClassVar[str]
    # The step record's loss terms, the total first: checked finite, shown, plotted. The class
    # lists every term the method can log; an instance may narrow it to what its configuration trains.
    term_names: tuple[str, ...]
    # The terms whose gradient runs through the target images' forward pass.
    target_terms: ClassVar[frozenset[str]]
    # The configuration sections of the method's own values (what a run's outcome depends on
    # besides data, model and train).
    sections: ClassVar[tuple[str, ...]]

    # what the engine asks before building anything ----------------------------------
    @classmethod
    def needs_auxiliary(cls, cfg: Config) -> bool:
        """Whether training reads the labeled auxiliary set (else it is never loaded)."""
        raise NotImplementedError

    @classmethod
    def starts_from_pretrained(cls, cfg: Config) -> bool:
        """Whether a fresh run starts from the pretrain checkpoint (``train.pretrained_checkpoint``);
        else from the backbone weights of ``model.pretrained``."""
        raise NotImplementedError

    @classmethod
    def agent_count(cls, cfg: Config, aux: list[Sample] | None, start: Path | None) -> int:
        """The model's number of reference agents; ``start`` is the pretrain checkpoint a fresh
        run starts from (None when the method starts from backbone weights)."""
        raise NotImplementedError

    @classmethod
    def check_target(cls, cfg: Config, target: ReidDataset) -> None:
        """One-line errors (``DatasetError``) for a target this method cannot train on or be
        evaluated on, before anything is built."""

    # what the engine asks of a built method -----------------------------------------
    epochs: int
    batch_shape: BatchShape
    # Whether some trainable parameter may get no gradient in a step (DDP must look for it).
    partial_gradients: bool = False

    @property
    def steps_per_epoch(self) -> int:
        raise NotImplementedError

    @property
    def batches(self) -> Batches:
        """The batch stream of the prepared epoch."""
        raise NotImplementedError

    def build_optimizer(self, model: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
        """The optimiser over ``model``'s trained parameters and its per-epoch schedule."""
        raise NotImplementedError

    def fresh_start(self, context: TrainContext) -> None:
        """State a fresh run starts from, once its weights are loaded (nothing by default)."""

    def epoch_start(self, epoch: int, context: TrainContext) -> None:
        """Per-epoch work before the epoch's first step (also before a mid-epoch resume's first
        step: what it prepares is state, so an epoch already prepared is not prepared again)."""

    def active_terms(self, epoch: int) -> frozenset[str]:
        """The terms that train in ``epoch`` (none: the epoch's steps only count)."""
        raise NotImplementedError

    def terms(self, outputs: StepOutputs, epoch: int) -> Terms:
        """The weighted loss terms of one batch; changes no state."""
        raise NotImplementedError

    def update_state(self, outputs: StepOutputs, terms: Terms) -> None:
        """Commit the state update of a trained step (``terms`` from :meth:`terms` on ``outputs``)."""


__all__ = ["Batches", "BatchShape", "Method", "StepOutputs", "Terms", "TrainContext"]
