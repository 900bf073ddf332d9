"""VGG networks (Simonyan & Zisserman, 2015) without batch normalisation.

Two configurations are provided: the classic VGG-19 and the very deep
VGG-416 used by the AutoTM paper to build workloads larger than memory.
Both expect 3x224x224 images (the classifier flattens a 512x7x7 map).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["VGG", "VGG19_CFG", "VGG416_CFG", "CHANNELS", "vgg", "vgg19", "vgg416"]

#: output channels of the five convolutional stages
CHANNELS: tuple[int, ...] = (64, 128, 256, 512, 512)
#: number of 3x3 convolutions per stage
VGG19_CFG: tuple[int, ...] = (2, 2, 4, 4, 4)
VGG416_CFG: tuple[int, ...] = (80, 81, 82, 83, 83)


class VGG(nn.Module):
    """Plain VGG: stages of 3x3 conv + ReLU, each ended by a 2x2 max-pool."""

    def __init__(
        self,
        cfg: Sequence[int],
        num_classes: int = 1000,
        channels: Sequence[int] = CHANNELS,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if len(cfg) != len(channels):
            raise ValueError(f"cfg has {len(cfg)} stages but channels has {len(channels)}.")
        layers: list[nn.Module] = []
        in_ch = 3
        for depth, out_ch in zip(cfg, channels):
            for _ in range(depth):
                layers.append(nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1))
                layers.append(nn.ReLU(inplace=True))
                in_ch = out_ch
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(in_ch * 7 * 7, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def vgg(cfg: Sequence[int], num_classes: int = 1000) -> VGG:
    """Build a VGG with ``cfg[i]`` 3x3 convolutions in stage ``i``."""
    return VGG(cfg, num_classes=num_classes)


def vgg19(num_classes: int = 1000) -> VGG:
    """VGG-19 (configuration E, no batch norm); about 143.7M parameters."""
    return vgg(VGG19_CFG, num_classes)


def vgg416(num_classes: int = 1000) -> VGG:
    """VGG-416 of the AutoTM paper: (80, 81, 82, 83, 83) convolutions per stage."""
    return vgg(VGG416_CFG, num_classes)
