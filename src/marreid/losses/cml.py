"""Cross-view consistent soft multilabel learning: L_CML (Eq. 5-6, supplementary Eq. 2)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from marreid.errors import DatasetError
from marreid.losses.multilabel import upcast

Tensor = torch.Tensor

# A zero per-camera variance (identical multilabels) would make the std's
# gradient 0/0; flooring the std at 1e-6 gives it gradient 0 there instead.
_VAR_FLOOR = 1e-12


def per_camera_stats(log_y: Tensor, camids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """mu_v and sigma_v of supplementary Eq. 2 for each camera v with at least 2 images.

    sigma_v is the unbiased (n - 1) standard deviation, floored at 1e-6.

    Parameters
    ----------
    log_y : Tensor
        ``[B, N]`` log soft multilabels.
    camids : Tensor
        ``[B]`` camera ids.

    Returns
    -------
    tuple of Tensor
        ``cams [V]`` (ascending), ``means [V, N]``, ``stds [V, N]``.
    """
    log_y = upcast(log_y)
    cams, inverse, counts = torch.unique(camids, return_inverse=True, return_counts=True)
    onehot = F.one_hot(inverse, len(cams)).to(log_y.dtype)
    means = (onehot.T @ log_y) / counts[:, None].to(log_y.dtype)
    centred = log_y - means[inverse]
    dof = (counts - 1).clamp_min(1)[:, None].to(log_y.dtype)
    stds = ((onehot.T @ (centred * centred)) / dof).clamp_min(_VAR_FLOOR).sqrt()
    keep = counts >= 2
    return cams[keep], means[keep], stds[keep]


def camera_shares(means: Tensor, stds: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Supplementary Eq. 2 per camera, divided by 2V: (||mu_v - mu||^2 + ||sigma_v - sigma||^2) / (2V).

    Dividing by 2V (the release's mean of 2V terms) keeps the 1/2 of the
    supplementary Eq. 2; the V shares sum to L_CML.

    Parameters
    ----------
    means, stds : Tensor
        ``[V, N]`` per-camera statistics (``per_camera_stats``).
    mean, std : Tensor
        ``[N]`` the whole target set's mu and sigma.
    """
    distances = ((means - mean.to(means.dtype)) ** 2).sum(1) + ((stds - std.to(stds.dtype)) ** 2).sum(1)
    return distances / (2 * max(len(means), 1))


def cml_per_camera(log_y: Tensor, camids: Tensor, mean: Tensor, std: Tensor) -> tuple[Tensor, Tensor]:
    """Each camera's share of L_CML (``camera_shares``) for the cameras with at least 2 images.

    Returns
    -------
    tuple of Tensor
        ``cams [V]`` and ``shares [V]``.
    """
    cams, means, stds = per_camera_stats(log_y, camids)
    return cams, camera_shares(means, stds, mean, std)


def cml_loss(log_y: Tensor, camids: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Eq. 5-6, L_CML: the simplified 2-Wasserstein distance of each camera's log multilabels to the whole set's.

    L_CML = sum_v (||mu_v - mu||^2 + ||sigma_v - sigma||^2) / (2V) over the
    cameras with at least 2 images in the batch; 0 (still part of the graph)
    when there is none.

    Parameters
    ----------
    log_y : Tensor
        ``[B, N]`` log soft multilabels of the target batch.
    camids : Tensor
        ``[B]`` their camera ids.
    mean, std : Tensor
        ``[N]`` the whole target set's mu and sigma.
    """
    return cml_per_camera(log_y, camids, mean, std)[1].sum()


class LogMultilabelStats(nn.Module):
    """The target set's mu and sigma of log soft multilabels, kept as running averages.

    Follows the release's ``MultilabelLoss``: initialised from the whole target
    training set as the average of its per-camera means and stds, then after
    each batch moved toward the average of the batch's per-camera means and
    stds (cameras with one image skipped), like BatchNorm's running statistics,
    before L_CML is taken against the new values.
    """

    def __init__(self, num_agents: int) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(num_agents))
        self.register_buffer("running_std", torch.ones(num_agents))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def initialize(self, log_y: Tensor | Iterable[Tensor], camids: Tensor | Iterable[Tensor]) -> None:
        """Set mu and sigma from the whole target training set, given whole or in matching chunks.

        Per-camera sums are accumulated in float64, so chunking does not change the result.

        Raises
        ------
        DatasetError
            When fewer than two cameras have at least two images: L_CML compares
            cameras and is undefined then.
        """
        chunks = zip([log_y], [camids]) if isinstance(log_y, Tensor) else zip(log_y, camids)
        sums: dict[int, list] = {}
        for chunk, cams in chunks:
            chunk = chunk.detach().double()
            for cam in torch.unique(cams).tolist():
                rows = chunk[cams == cam]
                acc = sums.setdefault(cam, [0, 0.0, 0.0])
                acc[0] += len(rows)
                acc[1] = acc[1] + rows.sum(0)
                acc[2] = acc[2] + (rows * rows).sum(0)
        usable = {cam: acc for cam, acc in sums.items() if acc[0] >= 2}
        if len(usable) < 2:
            raise DatasetError(
                f"the target training set has {len(usable)} camera(s) with at least 2 images "
                f"(cameras: {sorted(sums)}); L_CML needs two or more: switch it off with use_cml=False"
            )
        means, stds = [], []
        for count, total, square in usable.values():
            mean = total / count
            means.append(mean)
            stds.append(((square - total * mean) / (count - 1)).clamp_min(_VAR_FLOOR).sqrt())
        self.running_mean.copy_(torch.stack(means).mean(0))
        self.running_std.copy_(torch.stack(stds).mean(0))
        self.initialized.fill_(True)

    @torch.no_grad()
    def update(self, log_y: Tensor, camids: Tensor, momentum: float = 0.0368) -> None:
        """new = (1 - m) * old + m * batch value, for mu and sigma; no change when no camera has 2 images.

        The batch value is the mean over the batch's cameras of their means (stds),
        as in the release's ``_update_centers``; m = 368 / 10000 there.
        """
        _, means, stds = per_camera_stats(log_y.detach(), camids)
        self.update_from_cameras(means, stds, momentum)

    @torch.no_grad()
    def update_from_cameras(self, means: Tensor, stds: Tensor, momentum: float = 0.0368) -> None:
        """``update`` from per-camera statistics ``[V, N]`` already computed; no change when V = 0."""
        self.set(*self.moved_toward(means, stds, momentum))

    def moved_toward(self, means: Tensor, stds: Tensor, momentum: float = 0.0368) -> tuple[Tensor, Tensor]:
        """The (mu, sigma) ``update_from_cameras`` would leave, as new tensors; the buffers stay as
        they are (a method computes its terms against them and commits them after the step)."""
        mean, std = self.running_mean, self.running_std
        if len(means) == 0:
            return mean.clone(), std.clone()
        return (mean.mul(1.0 - momentum).add(momentum * means.detach().mean(0).to(mean.dtype)),
                std.mul(1.0 - momentum).add(momentum * stds.detach().mean(0).to(std.dtype)))

    def batch_shares(self, log_y: Tensor, camids: Tensor, momentum: float | None
                     ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
        """L_CML's per-camera shares of one batch (``camera_shares``), taken against mu / sigma moved
        toward the batch's statistics first (the release's order of a training step), or against
        them as they are when ``momentum`` is None. Returns ``(cams, shares, moved)``: ``moved`` the
        (mu, sigma) to commit with ``set`` (None without a move, or when no camera has 2 images);
        the buffers stay as they are."""
        cams, means, stds = per_camera_stats(log_y, camids)
        moved = self.moved_toward(means, stds, momentum) if momentum is not None and len(means) else None
        mean, std = moved if moved is not None else (self.running_mean, self.running_std)
        return cams, camera_shares(means, stds, mean, std), moved

    @torch.no_grad()
    def set(self, mean: Tensor, std: Tensor) -> None:
        """Commit values from ``moved_toward``."""
        self.running_mean.copy_(mean)
        self.running_std.copy_(std)
