"""Throughput of a full MAR training step against the backbone's forward + backward alone.

For each setting, on the same batch of random images (data loading excluded):
- ``backbone``: ``model.backbone(x)``, a scalar of its output, backward (no optimiser);
- ``mar step``: what ``MARTrainer`` does per step: one concatenated forward of the
  auxiliary + target images through the MARModel (features and agent logits),
  ``MARLoss`` with every term on (L_AL, L_RJ, L_CML, L_MDL with the memory and T),
  backward, and the SGD step (momentum, weight decay);
and, to explain the difference, the three pieces the MAR step adds: ``agents`` (the
agent layer, normalisation + scaled cosine logits, forward + backward on the detached
backbone output), ``loss`` (MARLoss forward + backward on detached features / logits
of that batch) and ``sgd`` (the optimiser step alone).
The two full steps are timed alternately (order swapped every repetition), ``--reps``
times each after ``--warmup`` runs. On a shared machine other processes only ever
add time, so the fastest run of each is the primary figure (images/s and the ratio
MAR step / backbone; the goal is at most 1.10); the ratio of the medians is printed
beside it, and ``1 + (agents + loss + sgd) / backbone`` as an estimate that the
load disturbs less (the pieces are short).

Usage: python bench/bench_train.py [--settings resnet18 resnet50] [--reps 4] [--warmup 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from marreid.losses import MARLoss
from marreid.models import build_model

# name: (arch, height, width, aux batch, target batch)
SETTINGS = {
    "resnet18": ("resnet18", 128, 64, 32, 32),
    "resnet50": ("resnet50", 384, 128, 16, 16),
}
NUM_AGENTS = 4101  # all of MSMT17's identities, as in the paper
NUM_TARGET = 12936  # Market-1501's training images: the multilabel memory's rows
NUM_CAMS = 6


def make_batch(height: int, width: int, n_aux: int, n_tgt: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "images": torch.randn(n_aux + n_tgt, 3, height, width, generator=g),
        "aux_labels": torch.randint(0, NUM_AGENTS, (n_aux,), generator=g),
        "tgt_camids": torch.arange(n_tgt) % NUM_CAMS,
        "tgt_index": torch.randperm(NUM_TARGET, generator=g)[:n_tgt],
    }


def make_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> MARLoss:
    """MARLoss with the paper's values, its state initialised from a few target-like images."""
    loss = MARLoss(NUM_AGENTS, NUM_TARGET, mining_ratio=0.005)
    model.eval()
    with torch.no_grad():
        logits = model(batch["images"])[1]
    model.train()
    loss.initialize(logits, torch.arange(logits.shape[0]) % NUM_CAMS)
    return loss


def backbone_step(model, batch, n_aux, loss, optimizer) -> None:
    out = model.backbone(batch["images"])
    out.square().mean().backward()
    model.zero_grad(set_to_none=True)


def mar_step(model, batch, n_aux, loss, optimizer) -> None:
    feat, logits = model(batch["images"])
    total, _ = loss(feat[:n_aux], logits[:n_aux], batch["aux_labels"], feat[n_aux:], logits[n_aux:],
                    batch["tgt_camids"], batch["tgt_index"], model.agent_matrix(), mdl_on=True)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()


def _fastest(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_setting(name: str, reps: int, warmup: int) -> dict:
    arch, height, width, n_aux, n_tgt = SETTINGS[name]
    torch.manual_seed(0)
    model = build_model(arch, NUM_AGENTS)
    batch = make_batch(height, width, n_aux, n_tgt)
    loss = make_loss(model, batch)
    optimizer = torch.optim.SGD(model.parameters(), lr=2e-4, momentum=0.9, weight_decay=2.5e-2)
    modes = {"backbone": backbone_step, "mar step": mar_step}
    times: dict[str, list[float]] = {m: [] for m in modes}
    for i in range(warmup + reps):
        for mode in (list(modes) if i % 2 == 0 else list(modes)[::-1]):
            start = time.perf_counter()
            modes[mode](model, batch, n_aux, loss, optimizer)
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times[mode].append(elapsed)

    with torch.no_grad():
        backbone_out = model.backbone(batch["images"])
        feat, logits = model(batch["images"])
    agents = model.agent_matrix().detach()

    def agent_layer() -> None:
        f = F.normalize(backbone_out.clone().requires_grad_(), dim=1)
        (model.scale * f @ model.agent_matrix().T).sum().backward()

    def loss_only() -> None:
        f, lg = feat.clone().requires_grad_(), logits.clone().requires_grad_()
        total, _ = loss(f[:n_aux], lg[:n_aux], batch["aux_labels"], f[n_aux:], lg[n_aux:],
                        batch["tgt_camids"], batch["tgt_index"], agents, mdl_on=True)
        total.backward()

    mar_step(model, batch, n_aux, loss, optimizer)  # leaves gradients for the SGD step alone
    pieces = {"agents": _fastest(agent_layer, reps), "loss": _fastest(loss_only, reps),
              "sgd": _fastest(optimizer.step, reps)}
    images = n_aux + n_tgt
    best = {m: min(t) for m, t in times.items()}
    medians = {m: statistics.median(t) for m, t in times.items()}
    return {"name": name, "arch": arch, "size": f"{height}x{width}", "batch": f"{n_aux}+{n_tgt}",
            **{f"{m} s": best[m] for m in modes}, **{f"{m} img/s": images / best[m] for m in modes},
            **{f"{p} s": t for p, t in pieces.items()},
            "ratio": best["mar step"] / best["backbone"],
            "median ratio": medians["mar step"] / medians["backbone"],
            "pieces ratio": 1.0 + sum(pieces.values()) / best["backbone"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; {NUM_AGENTS} agents, "
          f"memory of {NUM_TARGET} target images; fastest of {args.reps} runs after {args.warmup} warm-up")
    print(f"{'setting':<10} {'input':>8} {'batch':>7} {'backbone s':>11} {'MAR step s':>11} "
          f"{'backbone img/s':>15} {'MAR img/s':>10} {'ratio':>6} {'median ratio':>13} "
          f"{'agents s':>9} {'loss s':>7} {'sgd s':>6} {'1+pieces/backbone':>18}")
    for name in args.settings:
        r = bench_setting(name, args.reps, args.warmup)
        print(f"{r['name']:<10} {r['size']:>8} {r['batch']:>7} {r['backbone s']:>11.3f} {r['mar step s']:>11.3f} "
              f"{r['backbone img/s']:>15.1f} {r['mar step img/s']:>10.1f} {r['ratio']:>6.3f} "
              f"{r['median ratio']:>13.3f} {r['agents s']:>9.3f} {r['loss s']:>7.3f} {r['sgd s']:>6.3f} "
              f"{r['pieces ratio']:>18.3f}",
              flush=True)


if __name__ == "__main__":
    main()
