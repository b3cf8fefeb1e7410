"""The registry of adaptation methods: ``train.method`` name -> :class:`~marreid.methods.base.Method` class.

In the spirit of fast-reid's ``Registry``, but each entry names where its class lives and is
imported on first use: the configuration checks names against this table without pulling in
torch models, losses or clustering. A new method is one module and one line here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from marreid.errors import ConfigError

if TYPE_CHECKING:
    from marreid.methods.base import Method

# name: "module:class"
METHODS: dict[str, str] = {
    "mar": "marreid.methods.mar:MARMethod",
    "cluster_contrast": "marreid.methods.cluster_contrast:ClusterContrast",
}


def known_methods() -> str:
    """Every method name, comma-separated, for help texts and error messages."""
    return ", ".join(METHODS)


def method_class(name: str) -> type[Method]:
    """The class registered as ``name``; ConfigError (one line) for an unknown name."""
    if name not in METHODS:
        raise ConfigError(f"train.method: unknown method {name!r}; known: {known_methods()}")
    module, _, attr = METHODS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


__all__ = ["METHODS", "known_methods", "method_class"]
