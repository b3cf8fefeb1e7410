"""Time one MARLoss step at the paper's shapes against loop versions and a ResNet-50 step.

Shapes: 184 auxiliary + 184 target images, 4,101 agents, 2,048-D features,
a 12,936-row multilabel memory (Market-1501's training set), 6 cameras.
A step is MARLoss's forward and backward: all four losses, mining, the
memory / statistics / threshold updates, with its inputs (features, agent
logits, normalised agent rows) as leaf tensors; the agent logits s * f @ a.T
are the model's work and are timed in the backbone line.

The loop version is the test oracles (tests/oracles_losses.py): loops over
samples, pairs, cameras and agents. Its L_RJ loops over all 4,101 agents for
each sample, so it is timed on a few samples and scaled linearly to 184 + 184.
The backbone is timed on a small batch and scaled linearly to 368 images.

    .venv/bin/python bench/bench_losses.py [--device cuda] [--threads 1] [--init]

One CPU thread by default: on a CPU shared with other jobs torch's thread pool
spin-waits and the numbers swing tenfold (--threads 0 for torch's default).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import oracles_losses as oracle  # noqa: E402

from marreid.losses import MARLoss, agreement_top_quantile  # noqa: E402
from marreid.models import build_model  # noqa: E402

HALF_BATCH, N_AGENTS, DIM, N_TARGET, CAMERAS, SCALE = 184, 4101, 2048, 12936, 6, 30.0
CUHK03_AGENTS = 1467


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds per call after one warm-up call."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


LEAVES = ("aux_feat", "aux_logits", "tgt_feat", "tgt_logits")


def _batch(agents: torch.Tensor, gen: torch.Generator, device: torch.device) -> dict:
    aux_feat = F.normalize(torch.randn(HALF_BATCH, DIM, generator=gen), dim=1).to(device)
    tgt_feat = F.normalize(torch.randn(HALF_BATCH, DIM, generator=gen), dim=1).to(device)
    return dict(
        aux_feat=aux_feat,
        aux_logits=SCALE * aux_feat @ agents.detach().T,
        aux_labels=torch.randint(0, N_AGENTS, (HALF_BATCH,), generator=gen).to(device),
        tgt_feat=tgt_feat,
        tgt_logits=SCALE * tgt_feat @ agents.detach().T,
        camids=torch.randint(0, CAMERAS, (HALF_BATCH,), generator=gen).to(device),
        index=torch.randperm(N_TARGET, generator=gen)[:HALF_BATCH].to(device),
    )


def _fresh(batch: dict) -> dict:
    """The same batch with new leaf tensors, so that each timed step builds its own graph."""
    return {**batch, **{k: batch[k].detach().requires_grad_() for k in LEAVES}}


def _prepared_loss(agents: torch.Tensor, gen: torch.Generator, device: torch.device) -> MARLoss:
    """A MARLoss with plausible state: statistics from 1,200 images, T from 800, half the memory visited."""
    loss_fn = MARLoss(N_AGENTS, N_TARGET).to(device)
    agents = agents.detach()
    feats = F.normalize(torch.randn(1200, DIM, generator=gen), dim=1).to(device)
    logits = SCALE * feats @ agents.T
    loss_fn.stats.initialize(torch.log_softmax(logits, 1), torch.arange(1200, device=device) % CAMERAS)
    loss_fn.threshold.initialize(agreement_top_quantile(torch.softmax(logits[:800], 1), loss_fn.mining_ratio))
    visited = torch.randperm(N_TARGET, generator=gen)[: N_TARGET // 2].to(device)
    for rows in visited.split(1200):
        loss_fn.memory.update(rows, torch.softmax(logits[: len(rows)], 1))
    return loss_fn


def bench_vectorised(loss_fn: MARLoss, agents: torch.Tensor, batch: dict, device: torch.device, repeats: int) -> float:
    def step() -> None:
        b = _fresh(batch)
        total, _ = loss_fn(
            b["aux_feat"],
            b["aux_logits"],
            b["aux_labels"],
            b["tgt_feat"],
            b["tgt_logits"],
            b["camids"],
            b["index"],
            agents,
            mdl_on=True,
        )
        total.backward()

    return _time(step, device, repeats)


def bench_loops(
    loss_fn: MARLoss, agents: torch.Tensor, batch: dict, device: torch.device, rj_samples: int
) -> tuple[float, float]:
    """Seconds of the loop version without L_RJ (whole batch), and of L_RJ scaled from ``rj_samples`` per side."""
    visited = {int(i): loss_fn.memory.memory[i].clone() for i in batch["index"] if loss_fn.memory.visited[i]}
    stats = loss_fn.stats
    state = oracle.MarState(stats.running_mean.clone(), stats.running_std.clone(), loss_fn.threshold.value, visited)
    cfg = oracle.MarConfig(scale=SCALE, use_rj=False)

    def step() -> None:
        b = _fresh(batch)
        total, *_ = oracle.mar_step(
            state, cfg, agents, b["aux_feat"], b["aux_logits"], b["aux_labels"],
            b["tgt_feat"], b["camids"], b["index"].tolist(),
        )
        total.backward()

    def rj() -> None:
        b = _fresh(batch)
        s = rj_samples
        loss = oracle.joint_embedding_loss(b["aux_feat"][:s], b["aux_labels"][:s], b["tgt_feat"][:s], agents)
        loss.backward()

    rest = _time(step, device, repeats=1)
    rj_scaled = _time(rj, device, repeats=1) * HALF_BATCH / rj_samples
    return rest, rj_scaled


def bench_backbone(device: torch.device, batch: int, repeats: int) -> float:
    """Seconds of one ResNet-50 (with its 4,101 agents) forward + backward at 384x128 over ``batch`` images."""
    model = build_model("resnet50", N_AGENTS).to(device).train()
    images = torch.randn(batch, 3, 384, 128, device=device)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        feat, logits = model(images)
        (feat.sum() + logits.sum()).backward()

    return _time(step, device, repeats)


def bench_initialize(device: torch.device, agents: int) -> float:
    """Seconds of MARLoss.initialize over the whole 12,936-image target set (T's exact streamed quantile)."""
    gen = torch.Generator().manual_seed(1)
    logits = (SCALE * F.normalize(torch.randn(N_TARGET, agents, generator=gen), dim=1)).to(device)
    camids = (torch.arange(N_TARGET) % CAMERAS).to(device)
    loss_fn = MARLoss(agents, N_TARGET).to(device)
    start = time.perf_counter()
    loss_fn.initialize(logits, camids)
    _sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rj-samples", type=int, default=4, help="samples per side for the L_RJ loop, scaled to 184")
    parser.add_argument("--backbone-batch", type=int, default=8, help="images for the ResNet-50 step, scaled to 368")
    parser.add_argument("--init", action="store_true", help="also time MARLoss.initialize at 12,936 x 1,467")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (0: its default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")

    agents = F.normalize(torch.randn(N_AGENTS, DIM, generator=gen), dim=1).to(device).requires_grad_()
    loss_fn = _prepared_loss(agents, gen, device)
    batch = _batch(agents, gen, device)

    vector = bench_vectorised(loss_fn, agents, batch, device, args.repeats)
    print(f"MARLoss step, vectorised:                 {vector * 1e3:10.1f} ms  (median of {args.repeats})")
    rest, rj = bench_loops(loss_fn, agents, batch, device, args.rj_samples)
    loops = rest + rj
    print(f"loop version, all but L_RJ:               {rest * 1e3:10.1f} ms")
    scaled = f"{args.rj_samples}+{args.rj_samples} samples x {HALF_BATCH / args.rj_samples:.0f}"
    print(f"loop version, L_RJ ({scaled}):{'':>{17 - len(scaled)}}{rj * 1e3:10.1f} ms")
    print(f"loop version, total:                      {loops * 1e3:10.1f} ms")
    print(f"speed-up over loops:                      {loops / vector:10.1f} x   (goal >= 50 x)")

    backbone = bench_backbone(device, args.backbone_batch, args.repeats) * 2 * HALF_BATCH / args.backbone_batch
    print(f"ResNet-50 384x128 fwd+bwd, 368 images:    {backbone * 1e3:10.1f} ms  "
          f"(timed on {args.backbone_batch}, scaled)")
    print(f"loss step / backbone step:                {100 * vector / backbone:10.2f} %   (goal <= 1 %)")

    if args.init:
        seconds = bench_initialize(device, CUHK03_AGENTS)
        print(f"MARLoss.initialize, {N_TARGET} x {CUHK03_AGENTS}:       {seconds:10.1f} s")


if __name__ == "__main__":
    main()
