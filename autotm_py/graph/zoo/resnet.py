"""Bottleneck residual networks (He et al., 2016) with batch normalisation.

The stride-2 downsampling of a stage sits on the 3x3 convolution of its first
block (the common "v1.5" placement); parameter counts do not depend on it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["Bottleneck", "ResNet", "resnet", "resnet50", "resnet200"]

EXPANSION = 4


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 -> 1x1 expand (x4), each followed by BN; ReLU after the sum."""

    def __init__(self, in_ch: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_ch = width * EXPANSION
        self.conv1 = nn.Conv2d(in_ch, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Stem (7x7/2 conv, BN, ReLU, 3x3/2 max-pool), four bottleneck stages, pool, fc."""

    def __init__(self, depths: Sequence[int], num_classes: int = 1000) -> None:
        super().__init__()
        if len(depths) != 4:
            raise ValueError(f"ResNet needs 4 stage depths, got {len(depths)}.")
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_ch = 64
        stages: list[nn.Sequential] = []
        for i, (depth, width) in enumerate(zip(depths, (64, 128, 256, 512))):
            blocks: list[nn.Module] = []
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(Bottleneck(in_ch, width, stride))
                in_ch = width * EXPANSION
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet(depths: Sequence[int], num_classes: int = 1000) -> ResNet:
    """Bottleneck ResNet with the given four stage depths."""
    return ResNet(depths, num_classes)


def resnet50(num_classes: int = 1000) -> ResNet:
    """ResNet-50, stage depths (3, 4, 6, 3); about 25.6M parameters."""
    return resnet((3, 4, 6, 3), num_classes)


def resnet152(num_classes: int = 1000) -> ResNet:
    """ResNet-152, stage depths (3, 8, 36, 3); about 60.2M parameters."""
    return resnet((3, 8, 36, 3), num_classes)


def resnet200(num_classes: int = 1000) -> ResNet:
    """ResNet-200, stage depths (3, 24, 36, 3); about 64.7M parameters."""
    return resnet((3, 24, 36, 3), num_classes)
