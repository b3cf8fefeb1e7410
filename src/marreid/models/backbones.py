"""Feature extractors: image batch -> pooled, un-normalised feature ``[B, feat_dim]``.

Every backbone ends without a final nonlinearity (the paper removes ResNet-50's
last ReLU "so that the feature embedding would not be cut to a half
hypersphere", supplementary Sec. 3); the same is done for the others.
Parameter names follow torchvision (``conv1``, ``layer4.2.bn3``, ``features.18.1``...)
so that its state dicts load as they are.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from marreid.errors import ConfigError

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2", "tiny")


class _BottleneckNoFinalReLU(Bottleneck):
    """torchvision's bottleneck block returning the residual sum before the last ReLU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class _BasicBlockNoFinalReLU(BasicBlock):
    """torchvision's basic block returning the residual sum before the last ReLU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


def _without_final_relu(block: nn.Module) -> nn.Module:
    """A copy of the last residual block (stride 1, no downsample) without its final ReLU."""
    cls = _BottleneckNoFinalReLU if isinstance(block, Bottleneck) else _BasicBlockNoFinalReLU
    replacement = cls(block.conv1.in_channels, block.conv1.out_channels)
    replacement.load_state_dict(block.state_dict())
    return replacement


class ResNetBackbone(nn.Module):
    """torchvision ResNet up to global average pooling, the last block's final ReLU removed."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        net = getattr(torchvision.models, f"resnet{depth}")(weights=None)
        self.conv1 = net.conv1
        self.bn1 = net.bn1
        self.relu = net.relu
        self.maxpool = net.maxpool
        self.layer1 = net.layer1
        self.layer2 = net.layer2
        self.layer3 = net.layer3
        self.layer4 = net.layer4
        self.layer4[-1] = _without_final_relu(net.layer4[-1])
        self.feat_dim = net.fc.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean(dim=(2, 3))


class PooledBackbone(nn.Module):
    """A convolutional ``features`` stack followed by global average pooling."""

    def __init__(self, features: nn.Sequential, feat_dim: int) -> None:
        super().__init__()
        self.features = features
        self.feat_dim = feat_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))


def _mobilenet_v2() -> PooledBackbone:
    features = torchvision.models.mobilenet_v2(weights=None).features
    features[-1][-1] = nn.Identity()
    return PooledBackbone(features, 1280)


def _tiny() -> PooledBackbone:
    """Three strided 3x3 convolutions with BatchNorm, 32-D: for tests and the synthetic demo."""

    def conv_bn(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout)]

    features = nn.Sequential(
        *conv_bn(3, 16, 2), nn.ReLU(inplace=True), *conv_bn(16, 32, 2), nn.ReLU(inplace=True), *conv_bn(32, 32, 1)
    )
    return PooledBackbone(features, 32)


def build_backbone(arch: str) -> nn.Module:
    """A randomly initialised backbone by name (one of ``ARCHS``), with a ``feat_dim`` attribute."""
    if arch.startswith("resnet") and arch in ARCHS:
        return ResNetBackbone(int(arch[len("resnet") :]))
    if arch == "mobilenet_v2":
        return _mobilenet_v2()
    if arch == "tiny":
        return _tiny()
    raise ConfigError(f"unknown model arch {arch!r}: choose one of {', '.join(ARCHS)}")
