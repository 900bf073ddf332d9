"""Actual against predicted, per kernel: the GPU time each kernel of a planned CUDA step
takes, beside the time the profile gave the optimizer for it.

CUDA events are recorded on the compute stream around every kernel node of one step run
through an fx.Interpreter (no synchronization in between, so copies still overlap); the
moves between kernels are not counted. The span between a kernel's two events also holds
any time the GPU sat idle inside the node: where the caching allocator synchronizes the
device to free its cache for the kernel's allocations, that stall is counted to the kernel.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import fx

from .step import PlannedStep, RunError, StepInterpreter, run_with_probe


class _EventProbe(StepInterpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.events: list[tuple[int, torch.cuda.Event, torch.cuda.Event]] = []

    def run_node(self, n: fx.Node) -> Any:
        k = n.meta.get("autotm_kernel") if n.op == "call_function" else None
        if k is None:
            return super().run_node(n)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = super().run_node(n)
        end.record()
        self.events.append((int(k), start, end))
        return out


def kernel_time_trace(step: PlannedStep, inputs: Sequence[torch.Tensor] | torch.Tensor,
                      target: torch.Tensor | None = None) -> np.ndarray:
    """Seconds each kernel of the graph took on the GPU in one planned step (it updates the
    model like any other step); 0 for kernels that launch nothing."""
    if step.plan.device != "cuda":
        raise RunError("a kernel time trace needs a CUDA plan")
    probe, _ = run_with_probe(step, inputs, target, _EventProbe)
    out = np.zeros(len(step.plan.kernel_masks))
    for k, start, end in probe.events:
        out[k] += start.elapsed_time(end) / 1000.0
    return out
