"""The variants a pipeline can train: each one's config overrides and table label.

MAR and its ablations, and other methods selected by ``train.method`` (cluster contrast
and its hybrid with MAR's agreement).

Light on purpose (no torch): the command-line help lists the variants from
this table, so building the parser must not import the training machinery.
"""

from __future__ import annotations

import json
from typing import Any

from marreid.config import Config, config_from_dict, config_to_dict
from marreid.errors import ConfigError

# name: (config overrides, label in the tables)
VARIANTS: dict[str, tuple[dict[str, Any], str]] = {
    "mar": ({}, "MAR (all losses)"),
    "no_cml": ({"mar.use_cml": False}, "MAR without L_CML"),
    "no_mdl": ({"mar.use_mdl": False}, "MAR without L_MDL"),
    "no_rj": ({"mar.use_rj": False}, "MAR without L_RJ"),
    "hard_labels": ({"mar.hard_labels": True}, "MAR with hard labels"),
    "no_ral": ({"mar.use_al": False, "mar.use_rj": False}, "MAR without L_RAL"),
    "no_cml_ral": ({"mar.use_cml": False, "mar.use_al": False, "mar.use_rj": False}, "MAR without L_CML and L_RAL"),
    "feature_mining": ({"mar.positives": "feature"}, "feature-similarity mining"),
    "al_only": ({"mar.use_cml": False, "mar.use_mdl": False, "mar.use_rj": False},
                "control: L_AL only, no target loss"),
    # train.bn_batch is the release's MAR batching (184 images as 4 x 46); a cluster-contrast batch
    # (cc.batch_size) is normalised as one BatchNorm batch.
    "cluster_contrast": ({"train.method": "cluster_contrast", "train.bn_batch": None},
                         "cluster contrast (Dai et al. 2021)"),
    # MAR's camera alignment added to the cluster loss, with the mar section's lambda_cml: no value of
    # its own to choose. (The other hybrid, cc.agreement_weight, lost to w = 0 on held-out target
    # training identities: results/cpu_cuhk03_market/methods/cluster_weights_full.json.)
    "cc_cml": ({"train.method": "cluster_contrast", "train.bn_batch": None, "cc.cml": True},
               "hybrid: cluster contrast + MAR's L_CML"),
}
ABLATION = ("mar", "no_cml", "no_mdl", "no_rj", "hard_labels")


def known_variants() -> str:
    """Every variant name, comma-separated, for help texts and error messages."""
    return ", ".join(VARIANTS)


def with_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """A validated copy of ``cfg`` with dotted ``key: value`` overrides."""
    items = [f"{key}={json.dumps(value)}" for key, value in overrides.items()]
    return config_from_dict(config_to_dict(cfg), items)


def variant_config(cfg: Config, name: str) -> Config:
    """``cfg`` with the overrides of variant ``name`` applied (ConfigError for an unknown name)."""
    if name not in VARIANTS:
        raise ConfigError(f"unknown variant {name!r}; known: {known_variants()}")
    return with_overrides(cfg, VARIANTS[name][0])


def parse_variants(text: str) -> list[str]:
    """``"mar,no_cml"`` -> ``["mar", "no_cml"]``, each checked against ``VARIANTS``."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ConfigError("--variants: name at least one variant")
    for name in names:
        if name not in VARIANTS:
            raise ConfigError(f"--variants: unknown variant {name!r}; known: {known_variants()}")
    return list(dict.fromkeys(names))


__all__ = ["ABLATION", "VARIANTS", "known_variants", "parse_variants", "variant_config", "with_overrides"]
