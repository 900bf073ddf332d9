"""User workloads for the CLI tests (`tests.workloads:NAME`)."""

import torch
from torch import nn


class DataDependent(nn.Module):
    """Branches on a tensor's value: cannot be traced with fake tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        if y.sum().item() > 0:
            return y * 2
        return y


def bad_model(batch: int = 2):
    return DataDependent(), (torch.randn(batch, 4),), torch.zeros(batch, dtype=torch.long)


def tiny_mlp(batch: int = 2):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    return net, (torch.randn(batch, 4),), torch.zeros(batch, dtype=torch.long)


def not_a_tuple():
    return 3
