"""Each loss term as a share of the gradient that reaches the backbone (a diagnostic).

A method's total is linear in its weighted terms (``methods.base.Terms.weighted``;
MAR: L = L_MDL + lambda1 L_CML + lambda2 (L_AL + beta L_RJ)), so the backbone
gradient is the sum of the terms' gradients. Loss values alone do not say which
term moves the network; the gradient's projection does: term t contributes
(g_t . G) / |G|^2 of the total gradient G along its own direction, and these
fractions sum to one. The terms are whatever the method returns: nothing here
names them.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from marreid.config import Config
from marreid.engine.forward import BatchNormGroups, GroupedForward, plan_groups
from marreid.errors import CheckpointError, ConfigError
from marreid.losses import MARLoss
from marreid.methods.base import Method, StepOutputs

Tensor = torch.Tensor


def weighted_gradients(weighted: dict[str, Tensor], params: Sequence[torch.nn.Parameter]) -> dict[str, Tensor]:
    """The flattened gradient over ``params`` of each weighted term (a term that reaches none of
    them: zeros), the graph kept for the next."""
    grads: dict[str, Tensor] = {}
    for name, term in weighted.items():
        parts = (torch.autograd.grad(term, params, retain_graph=True, allow_unused=True) if term.requires_grad
                 else [None] * len(params))
        grads[name] = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                                 for g, p in zip(parts, params)])
    return grads


def method_term_gradients(method: Method, outputs: StepOutputs, epoch: int,
                          params: Sequence[torch.nn.Parameter]) -> dict[str, Tensor]:
    """Each weighted term's gradient over ``params`` of ``method``'s terms for ``outputs`` in
    ``epoch``, taken in eval mode (``terms`` changes no state either way)."""
    was_training = method.training
    method.eval()
    try:
        terms = method.terms(outputs, epoch)
    finally:
        method.train(was_training)
    return weighted_gradients(terms.weighted, params)


def term_gradients(model: torch.nn.Module, loss: MARLoss, aux_images: Tensor, aux_labels: Tensor,
                   tgt_images: Tensor, tgt_camids: Tensor, tgt_index: Tensor, mdl_on: bool = True,
                   groups: BatchNormGroups | None = None) -> dict[str, Tensor]:
    """The flattened backbone gradient of each weighted term of Eq. 10 that ``loss`` (a ``MARLoss``
    or the MAR method) has switched on, from images.

    One forward pass of ``model`` (as it is: train mode gives batch statistics)
    over the auxiliary and target images in the BatchNorm ``groups`` training uses
    (``AdaptTrainer.bn_groups``; None: one joint batch); the loss is taken in eval
    mode, so its memory, T and running statistics are used as they are.
    The agents are left out: only L_AL reaches them.
    """
    params = [p for p in model.backbone.parameters() if p.requires_grad]
    n_aux = len(aux_images)
    if groups is None:
        groups = plan_groups(n_aux, len(tgt_images), "joint", None)
    feat, logits = GroupedForward(model)(torch.cat([aux_images, tgt_images]), groups)
    was_training = loss.training
    loss.eval()
    try:
        step = loss.compute(feat[:n_aux], logits[:n_aux], aux_labels, feat[n_aux:], logits[n_aux:], tgt_camids,
                            tgt_index, model.agent_matrix(), mdl_on=mdl_on)
    finally:
        loss.train(was_training)
    return weighted_gradients(step.weighted, params)


def diagnostic_epoch(method: Method) -> int:
    """The first epoch in which every term the method ever trains is on (MAR: ``mar.mdl_start_epoch``)."""
    every = frozenset().union(*(method.active_terms(e) for e in range(method.epochs)))
    return next((e for e in range(method.epochs) if method.active_terms(e) == every), 0)


def gradient_shares(grads: dict[str, Tensor]) -> dict[str, dict[str, float]]:
    """Per term: ``norm`` |g_t|, ``along_total`` (g_t . G) / |G|^2 (summing to 1 over the terms, G = sum of g_t)
    and ``cosine`` with G."""
    total = torch.stack(list(grads.values())).sum(0).double()
    total_sq = float(total.pow(2).sum())
    out = {}
    for name, g in grads.items():
        g = g.double()
        dot = float(g @ total)
        norm = float(g.norm())
        out[name] = {"norm": norm,
                     "along_total": dot / total_sq if total_sq > 0 else 0.0,
                     "cosine": dot / (norm * total_sq ** 0.5) if norm > 0 and total_sq > 0 else 0.0}
    return out


def checkpoint_gradient_shares(cfg: Config, state: dict, checkpoint: str | Path, batches: int) -> dict:
    """``gradient_shares`` of the first ``batches`` training batches of the first epoch in which
    all of the method's terms train (``diagnostic_epoch``), for the method of ``cfg.train.method``.

    ``state`` is the loaded ``checkpoint``: a checkpoint of that method brings its state (MAR:
    memory, T, statistics); a pretrain checkpoint gets it as a fresh run would. Returns
    ``{"batches": [per batch], "mean": {term: {...}}}``.
    """
    from marreid.engine.extract import load_target
    from marreid.engine.pretrain import load_auxiliary
    from marreid.engine.train import AdaptTrainer
    from marreid.methods.registry import method_class

    if batches < 1:
        raise ConfigError(f"--batches must be at least 1, not {batches}")
    if "kind" not in state:
        raise CheckpointError(f"{checkpoint}: not a marreid checkpoint")
    method_cls = method_class(cfg.train.method)
    if state["kind"] not in (method_cls.name, "pretrain"):
        raise CheckpointError(f"{checkpoint}: a {state['kind']!r} checkpoint, but train.method is {method_cls.name!r}")
    per_batch = []
    with tempfile.TemporaryDirectory() as scratch:
        aux = load_auxiliary(cfg) if method_cls.needs_auxiliary(cfg) else None
        trainer = AdaptTrainer(cfg, aux, load_target(cfg), scratch)
        try:
            if state["kind"] == trainer.kind:
                trainer.model.load_state_dict(state["model"])
                trainer.load_extra_state(state)
            else:
                trainer.load_pretrained(checkpoint, trust=cfg.model.trust_checkpoint)
                trainer.initialize()
            epoch = diagnostic_epoch(trainer.method)
            trainer.epoch_start(epoch)
            trainer.model.train()
            params = [p for p in trainer.model.backbone.parameters() if p.requires_grad]
            for _, aux_batch, target_batch in trainer.batches.iterate(epoch):
                outputs = trainer.step_outputs(epoch, aux_batch, target_batch)
                per_batch.append(gradient_shares(method_term_gradients(trainer.method, outputs, epoch, params)))
                if len(per_batch) == batches:
                    break
        finally:
            trainer.logger.close()
    mean = {name: {key: sum(b[name][key] for b in per_batch) / len(per_batch) for key in per_batch[0][name]}
            for name in per_batch[0]}
    return {"batches": per_batch, "mean": mean}
