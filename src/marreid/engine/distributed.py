"""Scaling the MAR trainer out: torchrun / DistributedDataParallel, synchronised BatchNorm,
mixed precision and channels_last.

Under ``torchrun`` each rank forwards its slice of the global batch (``PairedBatches``
with ``rank`` / ``world_size``). The features, logits and labels of all ranks are
then gathered in rank order, so every rank holds the global batch exactly as one
process would and takes the same loss on it: L_CML's per-camera statistics,
L_MDL's mining and agreements, L_AL's and L_RJ's means are those of the global
batch, and the loss state (running mu / sigma, threshold T, multilabel memory)
receives identical updates on every rank. The gather passes gradients back to
each rank's own rows only, so a rank's gradient is the global loss's gradient
through its part of the batch; DDP *averages* the ranks' gradients, hence each
rank backpropagates ``world_size`` times the loss (``ddp_loss``) and the average
is the single-process gradient. The same code runs with NCCL on GPUs and gloo
on CPUs.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from marreid.engine.logging import RunLogger
from marreid.errors import ConfigError

Tensor = torch.Tensor


@dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun job; ``Ranks()`` is a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, logs, progress bars and evaluates."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer (torchrun sets it)") from None


def _in_group() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def current_ranks() -> Ranks:
    """The initialised process group's rank and size, else torchrun's RANK / WORLD_SIZE (0 / 1 when unset)."""
    local = _env_int("LOCAL_RANK", 0)
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), local)
    return Ranks(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), local)


def _leave_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def join_process_group(device: torch.device) -> tuple[Ranks, torch.device]:
    """Join torchrun's process group when WORLD_SIZE > 1; return the ranks and this rank's device.

    NCCL for CUDA, gloo otherwise, rendezvous from the environment torchrun sets
    (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE). A CUDA rank uses ``cuda:LOCAL_RANK``.
    A group initialised beforehand is used as it is. A single process is left alone.
    """
    ranks = current_ranks()
    if not ranks.distributed:
        return ranks, device
    if device.type == "cuda":
        if ranks.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={ranks.local_rank}, but this node has {torch.cuda.device_count()} "
                              f"CUDA device(s): start at most that many processes per node (--nproc_per_node)")
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        try:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        except ValueError as exc:
            raise ConfigError(f"cannot join the torchrun process group ({str(exc).splitlines()[0]}); "
                              f"launch with torchrun, which sets MASTER_ADDR / MASTER_PORT") from None
        atexit.register(_leave_process_group)
    return ranks, device


class _GatherRows(torch.autograd.Function):
    """All ranks' rows in rank order; backward keeps the gradient of this rank's rows only.

    Every rank takes the same loss of the gathered rows, so the gradient for
    another rank's rows is that rank's to propagate through its own graph.
    """

    @staticmethod
    def forward(ctx, rows: Tensor) -> Tensor:
        parts = [torch.empty_like(rows, memory_format=torch.contiguous_format) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, rows.contiguous())
        ctx.start = dist.get_rank() * len(rows)
        ctx.stop = ctx.start + len(rows)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad[ctx.start : ctx.stop]


class _SumOverRanks(torch.autograd.Function):
    """The sum of a tensor over the ranks, on every rank; backward sums the gradients the same way,
    since each rank's copy of the sum feeds that rank's part of the global loss."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total


def gather_rows(rows: Tensor) -> Tensor:
    """Every rank's ``rows`` (same shape on all ranks) concatenated in rank order; ``rows`` itself in a single process.

    Differentiable: the gradient reaching the result flows back to this rank's own rows.
    """
    if not _in_group():
        return rows
    return _GatherRows.apply(rows)


def gather_streams(local: Tensor, n_first: int) -> tuple[Tensor, Tensor]:
    """The global batch's two streams from each rank's ``[first rows; second rows]``.

    Each rank's ``local`` holds its slice of the first stream (``n_first`` rows,
    e.g. auxiliary) followed by its slice of the second (target). Returns all
    ranks' first rows and all ranks' second rows, each in rank order: the order
    one process would hold them in, since rank r's slice is the r-th of the batch.
    """
    rows = gather_rows(local)
    per_rank = rows.unflatten(0, (len(rows) // len(local), len(local)))
    return per_rank[:, :n_first].flatten(0, 1), per_rank[:, n_first:].flatten(0, 1)


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is set on any rank (a collective: every rank calls it); ``flag`` in a single process."""
    if not _in_group():
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def ddp_loss(total: Tensor, ranks: Ranks) -> Tensor:
    """What a rank backpropagates: ``world_size`` x the global loss.

    Each rank's gradient is the global loss's gradient through its own rows and
    DDP averages them; scaling by the world size turns the average into the sum,
    the single-process gradient.
    """
    return total * ranks.world_size


@torch.no_grad()
def broadcast_state(module: nn.Module, source: int = 0) -> None:
    """Overwrite every parameter and buffer of ``module`` with rank ``source``'s (no-op in a single process)."""
    if not _in_group():
        return
    for tensor in module.state_dict().values():
        dist.broadcast(tensor, source)


class GlobalBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch over all ranks.

    Per-channel sums and sums of squares (shifted by the running mean, which
    every rank holds alike, to limit cancellation) and the element count are
    summed over the ranks with a differentiable all-reduce, so the output and
    its gradient equal one BatchNorm over the whole batch. Works on any device
    and backend (torch's ``SyncBatchNorm`` is CUDA-only); in eval mode or a
    single process it is a plain BatchNorm2d with the same state dict.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and _in_group()):
            return super().forward(x)
        self._check_input_dim(x)
        dims = (0, 2, 3)
        channels = x.shape[1]
        shift = self.running_mean.detach() if self.running_mean is not None else x.new_zeros(channels, dtype=torch.float32)
        centred = x.float() - shift.view(1, -1, 1, 1)
        count = centred.new_tensor([x.numel() / channels])
        sums = _SumOverRanks.apply(torch.cat([centred.sum(dims), centred.square().sum(dims), count]))
        n = sums[-1]
        mean = sums[:channels] / n
        var = (sums[channels : 2 * channels] / n - mean.square()).clamp_min(0.0)
        out = (centred - mean.view(1, -1, 1, 1)) * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            out = out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        if self.track_running_stats:
            self._update_running_stats(shift + mean.detach(), var.detach() * n / (n - 1).clamp_min(1.0))
        return out

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, unbiased_var: Tensor) -> None:
        """As BatchNorm does: momentum, or the cumulative average when momentum is None."""
        self.num_batches_tracked.add_(1)
        factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        self.running_mean.mul_(1.0 - factor).add_(factor * mean)
        self.running_var.mul_(1.0 - factor).add_(factor * unbiased_var)

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """``module`` with every BatchNorm2d replaced by a GlobalBatchNorm holding the same parameters and buffers."""
        if isinstance(module, nn.BatchNorm2d) and not isinstance(module, cls):
            converted = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
            if module.affine:
                converted.weight, converted.bias = module.weight, module.bias
            converted.running_mean = module.running_mean
            converted.running_var = module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
            converted.train(module.training)
            return converted
        for name, child in module.named_children():
            module.add_module(name, cls.convert(child))
        return module


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of ``model`` synchronised over the ranks: torch's SyncBatchNorm (fused
    kernels) on CUDA, ``GlobalBatchNorm`` elsewhere. The state dict keys do not change."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return GlobalBatchNorm.convert(model)


def prepare_model(model: nn.Module, device: torch.device, ranks: Ranks, sync_bn: bool = False,
                  channels_last: bool = False) -> nn.Module:
    """``model`` on ``device``: BatchNorm synchronised when asked for and there are several ranks, NHWC weights when asked for."""
    if sync_bn and ranks.distributed:
        model = sync_batchnorm(model, device)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def data_parallel(model: nn.Module, ranks: Ranks, device: torch.device, find_unused: bool = False) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel when there are several ranks, else ``model`` itself.

    ``find_unused`` must be set when some parameters get no gradient (the agents
    without L_AL). The wrapper only runs the training forward pass; the model
    itself is what is saved, evaluated and loaded.
    """
    if not ranks.distributed:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=find_unused)


class QuietLogger(RunLogger):
    """The logger of ranks other than 0: RunLogger's interface, no progress bars, no files."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = False
        self.path = Path(os.devnull)
        self._file = self.path.open("a", encoding="utf-8")
        self._tb = None


def rank_logger(run_dir: str | Path) -> RunLogger | None:
    """None on rank 0 (the trainer makes its usual logger there), a ``QuietLogger`` on the other ranks."""
    return None if current_ranks().is_main else QuietLogger(run_dir)


def autocast_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where ``device`` supports it (CPUs, CUDA from Ampere on), float16 on older GPUs."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


class Precision:
    """The forward pass's precision and memory format, and fp16 loss scaling.

    ``dtype`` None runs in float32; bfloat16 / float16 autocast the forward pass
    (the losses switch autocast off and stay float32). With float16 a GradScaler
    scales the loss (``scale``) and hooks into ``optimizer``: before each step the
    gradients are unscaled and, if any is not finite, dropped, so the step
    changes nothing (SGD skips parameters without a gradient); after it the scale
    is updated. ``channels_last`` feeds the images as NHWC.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype | None = None, channels_last: bool = False,
                 optimizer: torch.optim.Optimizer | None = None) -> None:
        if dtype not in (None, torch.bfloat16, torch.float16):
            raise ConfigError(f"autocast dtype must be bfloat16 or float16, not {dtype}")
        self.device = device
        self.dtype = dtype
        self.channels_last = channels_last
        self.scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
        if self.scaler is not None:
            if optimizer is None:
                raise ConfigError("float16 autocast needs the optimizer, whose steps the loss scaling guards")
            optimizer.register_step_pre_hook(self._unscale_or_skip)
            optimizer.register_step_post_hook(self._update_scale)

    def forward(self, net: nn.Module, images: Tensor, *args) -> tuple[Tensor, ...]:
        """``net(images, *args)`` in the configured memory format and autocast mode."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            return net(images, *args)

    def scale(self, loss: Tensor) -> Tensor:
        """The loss to backpropagate: multiplied by the current loss scale under float16."""
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def _unscale_or_skip(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        self.scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if params and not torch.stack([torch.isfinite(p.grad).all() for p in params]).all():
            for p in params:
                p.grad = None

    def _update_scale(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        self.scaler.update()

    def state_dict(self) -> dict:
        """``{"grad_scaler": ...}`` under float16 (for exact resume), else empty."""
        return {"grad_scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        """Restore the loss scale saved by ``state_dict`` (absent or unused: nothing to do)."""
        if self.scaler is not None and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])


__all__ = [
    "Ranks", "current_ranks", "join_process_group", "gather_rows", "gather_streams", "any_rank", "ddp_loss",
    "broadcast_state", "GlobalBatchNorm", "sync_batchnorm", "prepare_model", "data_parallel",
    "QuietLogger", "rank_logger", "autocast_dtype", "Precision",
]
