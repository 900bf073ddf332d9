"""Inception-v4 (Szegedy, Ioffe, Vanhoucke & Alemi, 2016), for 3x299x299 inputs.

Layout: stem -> 4x Inception-A -> Reduction-A -> 7x Inception-B -> Reduction-B
-> 3x Inception-C -> global average pool -> dropout (keep 0.8) -> fc.
Every convolution is a :class:`ConvBN` block (conv without bias, BN, ReLU);
"V" convolutions of the paper use no padding, the others keep the size.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ConvBN", "InceptionV4", "inception_v4"]

_Size = int | tuple[int, int]


class ConvBN(nn.Module):
    """Convolution (no bias) + BatchNorm + ReLU."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel: _Size, stride: int = 1, padding: _Size = 0
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_ch, eps=1e-3)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


def _c1x7(in_ch: int, out_ch: int) -> ConvBN:
    return ConvBN(in_ch, out_ch, (1, 7), padding=(0, 3))


def _c7x1(in_ch: int, out_ch: int) -> ConvBN:
    return ConvBN(in_ch, out_ch, (7, 1), padding=(3, 0))


def _avg3() -> nn.AvgPool2d:
    return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)


class Stem(nn.Module):
    """3x299x299 -> 384x35x35."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = ConvBN(3, 32, 3, stride=2)  # 149x149
        self.conv2 = ConvBN(32, 32, 3)  # 147x147
        self.conv3 = ConvBN(32, 64, 3, padding=1)  # 147x147
        self.pool4 = nn.MaxPool2d(3, stride=2)  # 73x73
        self.conv4 = ConvBN(64, 96, 3, stride=2)  # 73x73 -> concat 160
        self.branch5a = nn.Sequential(ConvBN(160, 64, 1), ConvBN(64, 96, 3))  # 71x71
        self.branch5b = nn.Sequential(
            ConvBN(160, 64, 1), _c7x1(64, 64), _c1x7(64, 64), ConvBN(64, 96, 3)
        )  # 71x71 -> concat 192
        self.conv6 = ConvBN(192, 192, 3, stride=2)  # 35x35
        self.pool6 = nn.MaxPool2d(3, stride=2)  # 35x35 -> concat 384

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3(self.conv2(self.conv1(x)))
        x = torch.cat([self.pool4(x), self.conv4(x)], 1)
        x = torch.cat([self.branch5a(x), self.branch5b(x)], 1)
        return torch.cat([self.conv6(x), self.pool6(x)], 1)


class InceptionA(nn.Module):
    """35x35 block, 384 -> 384 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.branch0 = nn.Sequential(_avg3(), ConvBN(384, 96, 1))
        self.branch1 = ConvBN(384, 96, 1)
        self.branch2 = nn.Sequential(ConvBN(384, 64, 1), ConvBN(64, 96, 3, padding=1))
        self.branch3 = nn.Sequential(
            ConvBN(384, 64, 1), ConvBN(64, 96, 3, padding=1), ConvBN(96, 96, 3, padding=1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)], 1)


class ReductionA(nn.Module):
    """35x35x384 -> 17x17x1024 (k, l, m, n = 192, 224, 256, 384)."""

    def __init__(self) -> None:
        super().__init__()
        self.branch0 = nn.MaxPool2d(3, stride=2)
        self.branch1 = ConvBN(384, 384, 3, stride=2)
        self.branch2 = nn.Sequential(
            ConvBN(384, 192, 1), ConvBN(192, 224, 3, padding=1), ConvBN(224, 256, 3, stride=2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch0(x), self.branch1(x), self.branch2(x)], 1)


class InceptionB(nn.Module):
    """17x17 block, 1024 -> 1024 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.branch0 = nn.Sequential(_avg3(), ConvBN(1024, 128, 1))
        self.branch1 = ConvBN(1024, 384, 1)
        self.branch2 = nn.Sequential(ConvBN(1024, 192, 1), _c1x7(192, 224), _c7x1(224, 256))
        self.branch3 = nn.Sequential(
            ConvBN(1024, 192, 1),
            _c1x7(192, 192),
            _c7x1(192, 224),
            _c1x7(224, 224),
            _c7x1(224, 256),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)], 1)


class ReductionB(nn.Module):
    """17x17x1024 -> 8x8x1536."""

    def __init__(self) -> None:
        super().__init__()
        self.branch0 = nn.MaxPool2d(3, stride=2)
        self.branch1 = nn.Sequential(ConvBN(1024, 192, 1), ConvBN(192, 192, 3, stride=2))
        self.branch2 = nn.Sequential(
            ConvBN(1024, 256, 1), _c1x7(256, 256), _c7x1(256, 320), ConvBN(320, 320, 3, stride=2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch0(x), self.branch1(x), self.branch2(x)], 1)


class InceptionC(nn.Module):
    """8x8 block, 1536 -> 1536 channels, with split 1x3 / 3x1 branches."""

    def __init__(self) -> None:
        super().__init__()
        self.branch0 = nn.Sequential(_avg3(), ConvBN(1536, 256, 1))
        self.branch1 = ConvBN(1536, 256, 1)
        self.branch2 = ConvBN(1536, 384, 1)
        self.branch2a = ConvBN(384, 256, (1, 3), padding=(0, 1))
        self.branch2b = ConvBN(384, 256, (3, 1), padding=(1, 0))
        self.branch3 = nn.Sequential(
            ConvBN(1536, 384, 1),
            ConvBN(384, 448, (1, 3), padding=(0, 1)),
            ConvBN(448, 512, (3, 1), padding=(1, 0)),
        )
        self.branch3a = ConvBN(512, 256, (3, 1), padding=(1, 0))
        self.branch3b = ConvBN(512, 256, (1, 3), padding=(0, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b2 = self.branch2(x)
        b3 = self.branch3(x)
        return torch.cat(
            [
                self.branch0(x),
                self.branch1(x),
                self.branch2a(b2),
                self.branch2b(b2),
                self.branch3a(b3),
                self.branch3b(b3),
            ],
            1,
        )


class InceptionV4(nn.Module):
    """Inception-v4 classifier; about 42.7M parameters with 1000 classes."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        self.features = nn.Sequential(
            Stem(),
            *(InceptionA() for _ in range(4)),
            ReductionA(),
            *(InceptionB() for _ in range(7)),
            ReductionB(),
            *(InceptionC() for _ in range(3)),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(1536, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.fc(self.dropout(x))


def inception_v4(num_classes: int = 1000) -> InceptionV4:
    """Inception-v4 for 3x299x299 images."""
    return InceptionV4(num_classes)
