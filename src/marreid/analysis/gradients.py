"""Each term of Eq. 10 as a share of the gradient that reaches the backbone (a diagnostic).

The total L = L_MDL + lambda1 L_CML + lambda2 (L_AL + beta L_RJ) is linear in
its weighted terms, so the backbone gradient is the sum of the four terms'
gradients. Loss values alone do not say which term moves the network; the
gradient's projection does: term t contributes (g_t . G) / |G|^2 of the
total gradient G along its own direction, and these fractions sum to one.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from marreid.config import Config
from marreid.engine.forward import BatchNormGroups, GroupedForward, plan_groups
from marreid.errors import CheckpointError, ConfigError
from marreid.losses import MARLoss

Tensor = torch.Tensor

# each weighted term of Eq. 10 and the MARLoss switch that leaves only it on
TERM_SWITCHES = {"mdl": "use_mdl", "cml": "use_cml", "al": "use_al", "rj": "use_rj"}


def term_gradients(model: torch.nn.Module, loss: MARLoss, aux_images: Tensor, aux_labels: Tensor,
                   tgt_images: Tensor, tgt_camids: Tensor, tgt_index: Tensor, mdl_on: bool = True,
                   groups: BatchNormGroups | None = None) -> dict[str, Tensor]:
    """The flattened backbone gradient of each weighted term of Eq. 10 that ``loss`` has switched on.

    One forward pass of ``model`` (as it is: train mode gives batch statistics)
    over the auxiliary and target images in the BatchNorm ``groups`` training uses
    (``MARTrainer.bn_groups``; None: one joint batch); the loss is taken in eval
    mode, so its memory, T and running statistics stay as they are.
    The agents are left out: only L_AL reaches them.
    """
    params = [p for p in model.backbone.parameters() if p.requires_grad]
    n_aux = len(aux_images)
    if groups is None:
        groups = plan_groups(n_aux, len(tgt_images), "joint", None)
    feat, logits = GroupedForward(model)(torch.cat([aux_images, tgt_images]), groups)
    enabled = [name for name, switch in TERM_SWITCHES.items() if getattr(loss, switch)]
    saved = {switch: getattr(loss, switch) for switch in TERM_SWITCHES.values()}
    was_training = loss.training
    loss.eval()
    grads: dict[str, Tensor] = {}
    try:
        for name in enabled:
            for switch in TERM_SWITCHES.values():
                setattr(loss, switch, switch == TERM_SWITCHES[name])
            total, _ = loss(feat[:n_aux], logits[:n_aux], aux_labels, feat[n_aux:], logits[n_aux:], tgt_camids,
                            tgt_index, model.agent_matrix(), mdl_on=mdl_on)
            parts = torch.autograd.grad(total, params, retain_graph=True, allow_unused=True)
            grads[name] = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                                     for g, p in zip(parts, params)])
    finally:
        for switch, value in saved.items():
            setattr(loss, switch, value)
        loss.train(was_training)
    return grads


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
    """``gradient_shares`` of the first ``batches`` training batches of epoch ``mar.mdl_start_epoch``.

    ``state`` is the loaded ``checkpoint``: a MAR checkpoint brings its loss state
    (memory, T, statistics); a pretrain checkpoint gets it from one pass over the
    target, as a fresh MAR run would. Returns ``{"batches": [per batch], "mean": {term: {...}}}``.
    """
    from marreid.engine.extract import load_target
    from marreid.engine.pretrain import load_auxiliary
    from marreid.engine.train import MARTrainer

    if batches < 1:
        raise ConfigError(f"--batches must be at least 1, not {batches}")
    if "kind" not in state:
        raise CheckpointError(f"{checkpoint}: not a marreid checkpoint")
    per_batch = []
    with tempfile.TemporaryDirectory() as scratch:
        trainer = MARTrainer(cfg, load_auxiliary(cfg), load_target(cfg), scratch)
        try:
            if state["kind"] == "mar":
                trainer.model.load_state_dict(state["model"])
                trainer.load_extra_state(state)
            else:
                trainer.load_pretrained(checkpoint, trust=cfg.model.trust_checkpoint)
                trainer.initialize()
            trainer.model.train()
            dev = trainer.device
            for _, aux, tgt in trainer.batches.iterate(cfg.mar.mdl_start_epoch):
                grads = term_gradients(trainer.model, trainer.loss, aux[0].to(dev), aux[1].to(dev),
                                       tgt[0].to(dev), tgt[2].to(dev), tgt[3].to(dev), groups=trainer.bn_groups)
                per_batch.append(gradient_shares(grads))
                if len(per_batch) == batches:
                    break
        finally:
            trainer.logger.close()
    mean = {name: {key: sum(b[name][key] for b in per_batch) / len(per_batch) for key in per_batch[0][name]}
            for name in per_batch[0]}
    return {"batches": per_batch, "mean": mean}
