"""Reference agent learning: L_AL (Eq. 7), L_RJ (Eq. 8) and L_RAL (Eq. 9)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from marreid.losses.multilabel import upcast

Tensor = torch.Tensor


def agent_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Eq. 7, L_AL: cross-entropy of the scaled cosine logits s * cos(f(z), a_k) against label w.

    Parameters
    ----------
    logits : Tensor
        ``[B, N]`` auxiliary logits, scale times cosine to every agent.
    labels : Tensor
        ``[B]`` auxiliary identity labels in ``0..N-1``.
    """
    return F.cross_entropy(upcast(logits), labels)


class _ProductsFromLogits(torch.autograd.Function):
    """feat @ agents.T for fixed agents, its value given: no forward matmul, backward grad @ agents."""

    @staticmethod
    def forward(ctx, feat: Tensor, agents: Tensor, value: Tensor) -> Tensor:
        ctx.save_for_backward(agents)
        return value.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (agents,) = ctx.saved_tensors
        return grad @ agents, None, None


def _norm_ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    return numerator.detach().norm() / denominator.detach().norm().clamp_min(torch.finfo(denominator.dtype).tiny)


def agent_products(feat: Tensor, agents: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
    """f_i . a_k for every feature and agent ``[B, N]``, the agents held fixed, and the logits' scale s.

    ``logits`` are the model's s * feat @ agents.T, with the agents in their
    graph; in MAR only L_AL trains the agents (L_RJ, L_CML and L_MDL move the
    features only), so the products are rebuilt with the agents detached, and
    s is read off the logits so that the losses need no scale setting. Float32 / float64 logits
    are reused as values (s from the row with the largest logits), which saves
    the forward matmul; half-precision logits are too coarse for d^2 near the
    margin, so then the product is computed and s is the ratio of the norms.
    """
    feat = upcast(feat)
    agents = agents.detach().to(feat.dtype)
    if logits.dtype in (torch.float16, torch.bfloat16):
        products = feat @ agents.T
        return products, _norm_ratio(logits.float(), products)
    row = int(logits.detach().norm(dim=1).argmax())
    scale = _norm_ratio(logits[row], feat[row] @ agents.T)
    value = (logits.detach() / scale.clamp_min(torch.finfo(scale.dtype).tiny)).to(feat.dtype)
    return _ProductsFromLogits.apply(feat, agents, value), scale


def squared_distances(feat: Tensor, agents: Tensor, products: Tensor | None = None) -> Tensor:
    """||f_i - a_k||^2 for every feature and agent, ``[B, N]``, the agents held fixed (detached).

    Expanded as |f|^2 + |a|^2 - 2 f.a, which is 2 - 2 cos for unit vectors,
    and has the gradient 2 (f - a) of the squared distance itself. ``products``
    (``feat @ agents.T`` with the agents detached) may be passed when already computed.
    """
    agents = agents.detach()
    if products is None:
        products = feat @ agents.T
    agent_sq = torch.linalg.vector_norm(agents, dim=1).square()
    return (feat * feat).sum(1, keepdim=True) + agent_sq[None, :] - 2.0 * products


def _hinge_means(d2: Tensor, hard: Tensor, margin: float) -> Tensor:
    """Mean of [m - d^2]_+ over each row's hard agents, for the rows that have any."""
    counts = hard.sum(1)
    sums = torch.where(hard, F.relu(margin - d2), 0.0).sum(1)
    has_hard = counts > 0
    return sums[has_hard] / counts[has_hard]


def joint_embedding_terms(d2_aux: Tensor, aux_labels: Tensor, d2_target: Tensor, margin: float = 1.0) -> Tensor:
    """Eq. 8, L_RJ, from the squared distances to the (detached) agents; see ``joint_embedding_loss``.

    Parameters
    ----------
    d2_aux : Tensor
        ``[Ba, N]`` squared distances of the auxiliary features to every agent.
    aux_labels : Tensor
        ``[Ba]`` their own agents w.
    d2_target : Tensor
        ``[Bt, N]`` squared distances of the target features to every agent.
    margin : float
        The margin m.
    """
    own = aux_labels[:, None]
    pull = d2_aux.gather(1, own).squeeze(1)
    aux_hard = (d2_aux.detach() < margin).scatter(1, own, False)
    aux_push = _hinge_means(d2_aux, aux_hard, margin)
    target_push = _hinge_means(d2_target, d2_target.detach() < margin, margin)
    return torch.cat([pull, aux_push, target_push]).mean()


def joint_embedding_loss(
    aux_feat: Tensor,
    aux_labels: Tensor,
    target_feat: Tensor,
    agents: Tensor,
    margin: float = 1.0,
) -> Tensor:
    """Eq. 8, L_RJ, as the release computes it.

    Terms, all on squared distances d^2 between L2-normalised vectors:
    one pull term d^2(f(z), a_w) per auxiliary sample; for each auxiliary sample
    with hard agents {j != w : d^2 < m}, the mean of [m - d^2]_+ over them; for
    each target sample with hard agents {j : d^2 < m} (target people are not
    reference people), the same mean. L_RJ is the mean of all these terms
    together. The agents are detached: L_RJ moves the features only. Hard
    agents are those with d^2 < m, i.e. cos > 1 - m/2 (release ``JointLoss``).

    Parameters
    ----------
    aux_feat : Tensor
        ``[Ba, D]`` normalised auxiliary features.
    aux_labels : Tensor
        ``[Ba]`` their agent indices w.
    target_feat : Tensor
        ``[Bt, D]`` normalised target features (Bt may be 0).
    agents : Tensor
        ``[N, D]`` normalised agent rows.
    margin : float
        The margin m.
    """
    agents = upcast(agents).detach()
    d2_aux = squared_distances(upcast(aux_feat), agents)
    d2_target = squared_distances(upcast(target_feat), agents)
    return joint_embedding_terms(d2_aux, aux_labels, d2_target, margin)


def reference_agent_loss(al: Tensor, rj: Tensor, beta: float = 0.2) -> Tensor:
    """Eq. 9, L_RAL = L_AL + beta * L_RJ."""
    return al + beta * rj
