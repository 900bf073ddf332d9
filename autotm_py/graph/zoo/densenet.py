"""DenseNet-BC (Huang et al., 2017), in particular DenseNet-264.

Features are concatenated with ``torch.cat`` before every dense layer (no
memory-efficient checkpointing): the quadratic memory growth is what makes
DenseNet an interesting workload for tensor placement.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["DenseLayer", "DenseNet", "densenet", "densenet264"]


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv (bn_size*growth) -> BN-ReLU-3x3 conv (growth) on concatenated inputs."""

    def __init__(self, in_ch: int, growth: int, bn_size: int, dropout: float = 0.0) -> None:
        super().__init__()
        mid = bn_size * growth
        self.norm1 = nn.BatchNorm2d(in_ch)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_ch, mid, kernel_size=1, bias=False)
        self.norm2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(mid, growth, kernel_size=3, padding=1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(features, 1)
        x = self.conv1(self.relu1(self.norm1(x)))
        x = self.conv2(self.relu2(self.norm2(x)))
        return self.dropout(x)


class DenseBlock(nn.ModuleList):
    """``n`` dense layers; each sees the concatenation of all earlier outputs."""

    def __init__(self, n: int, in_ch: int, growth: int, bn_size: int, dropout: float) -> None:
        super().__init__(
            DenseLayer(in_ch + i * growth, growth, bn_size, dropout) for i in range(n)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self:
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """BN-ReLU-1x1 conv (compression) -> 2x2 average pool."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(
            nn.BatchNorm2d(in_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_ch, out_ch, kernel_size=1, bias=False),
            nn.AvgPool2d(kernel_size=2, stride=2),
        )


class DenseNet(nn.Module):
    """DenseNet-BC for 3x224x224 images."""

    def __init__(
        self,
        block_sizes: Sequence[int],
        growth: int = 32,
        num_init_features: int = 64,
        bn_size: int = 4,
        compression: float = 0.5,
        dropout: float = 0.0,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(num_init_features),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        ]
        ch = num_init_features
        for i, n in enumerate(block_sizes):
            layers.append(DenseBlock(n, ch, growth, bn_size, dropout))
            ch += n * growth
            if i != len(block_sizes) - 1:
                out = int(ch * compression)
                layers.append(Transition(ch, out))
                ch = out
        layers += [nn.BatchNorm2d(ch), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


def densenet(block_sizes: Sequence[int], growth: int = 32, num_classes: int = 1000) -> DenseNet:
    """DenseNet-BC (bn_size 4, compression 0.5, 64 initial features)."""
    return DenseNet(block_sizes, growth=growth, num_classes=num_classes)


def densenet264(num_classes: int = 1000) -> DenseNet:
    """DenseNet-264: growth 32, blocks (6, 12, 64, 48); about 33.3M parameters."""
    return densenet((6, 12, 64, 48), 32, num_classes)


def densenet201(num_classes: int = 1000) -> DenseNet:
    """DenseNet-201: growth 32, blocks (6, 12, 48, 32); about 20.0M parameters."""
    return densenet((6, 12, 48, 32), 32, num_classes)
