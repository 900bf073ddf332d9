"""Whole-step timing: run the captured FX module of a Graph on real tensors, unplanned.

This is what a profile predicts with every tensor in fast memory (`Profile.all_fast_seconds`);
`benchmarks/profile_accuracy.py` compares the two.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from ..graph.types import Graph


@dataclass(frozen=True)
class StepTiming:
    seconds: float  # median
    runs: tuple[float, ...]


def step_inputs(graph: Graph, device: str = "cpu", seed: int = 0) -> list[torch.Tensor]:
    """Real tensors for the module's placeholders: small random floats (parameters stay
    well-behaved over a few SGD steps), zero integers (valid class indices)."""
    if graph.module is None:
        raise ValueError("this Graph has no FX module (it was loaded from JSON); capture it again")
    gen = torch.Generator().manual_seed(seed)
    out = []
    for node in graph.module.graph.nodes:
        if node.op != "placeholder":
            continue
        v = node.meta["val"]
        t = torch.empty_strided(tuple(v.shape), tuple(v.stride()), dtype=v.dtype, device="cpu")
        if v.dtype.is_floating_point:
            t.copy_(torch.randn(tuple(v.shape), generator=gen, dtype=v.dtype) * 0.05)
        else:
            t.zero_()
        out.append(t.to(device))
    return out


def measure_step(graph: Graph, device: str = "cpu", *, warmup: int = 1, runs: int = 5) -> StepTiming:
    """Median wall time of the whole unplanned step (after `warmup` untimed runs)."""
    inputs = step_inputs(graph, device)
    cuda = device == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    times = []
    with torch.no_grad():
        for i in range(warmup + runs):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            graph.module(*inputs)
            if cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return StepTiming(statistics.median(times), tuple(times))
