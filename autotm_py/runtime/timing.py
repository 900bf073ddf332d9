"""Actual against predicted, per kernel: the GPU time each kernel of a planned CUDA step
takes, beside the time the profile gave the optimizer for it.

CUDA events are recorded on the compute stream around every kernel node of one step run
through an fx.Interpreter (no synchronization in between, so copies still overlap); the
moves between kernels are not counted. The span between a kernel's two events also holds
any time the GPU sat idle inside the node: where the caching allocator synchronizes the
device to free its cache for the kernel's allocations, that stall is counted to the kernel.
`kernel_gpu_trace` separates the two: each node runs inside a profiler range, and the GPU
kernels its launches started (matched by the profiler's correlation ids) are the node's, with
their own durations, so a slow kernel and a stall inside the node read apart.
"""

from __future__ import annotations

import bisect
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

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


# the profiler range each kernel node runs in: its kernel index after the prefix
RANGE_PREFIX = "autotm_kernel:"
# GPU work a node's launches start: kernels, and the memsets and device copies it issues
_GPU_CATS = ("kernel", "gpu_memset", "gpu_memcpy")


@dataclass(frozen=True)
class GpuWork:
    """The GPU work one kernel node launched: (name, seconds) of each GPU kernel, memset or
    copy, in the order they started on the GPU."""

    kernel: int
    launches: tuple[tuple[str, float], ...]

    @property
    def seconds(self) -> float:
        return sum(s for _, s in self.launches)


class _RangeProbe(StepInterpreter):
    def run_node(self, n: fx.Node) -> Any:
        k = n.meta.get("autotm_kernel") if n.op == "call_function" else None
        if k is None:
            return super().run_node(n)
        with torch.profiler.record_function(f"{RANGE_PREFIX}{int(k)}"):
            return super().run_node(n)


def gpu_work_by_kernel(events: Iterable[dict[str, Any]]) -> dict[int, GpuWork]:
    """The GPU work of each kernel node in a chrome trace of one step run by `_RangeProbe`:
    a host launch (a CUDA runtime or driver call) inside a node's range on the same thread
    owns the GPU events of its correlation id. Ranges do not nest (one per node)."""
    ranges: dict[Any, list[tuple[float, float, int]]] = {}
    launches: list[tuple[Any, float, int]] = []
    gpu: dict[int, list[tuple[float, str, float]]] = {}
    for e in events:
        cat, name = e.get("cat", ""), e.get("name", "")
        if cat == "user_annotation" and name.startswith(RANGE_PREFIX):
            ts = float(e["ts"])
            ranges.setdefault(e.get("tid"), []).append((ts, ts + float(e.get("dur", 0.0)), int(name[len(RANGE_PREFIX):])))
        elif cat in ("cuda_runtime", "cuda_driver"):
            corr = (e.get("args") or {}).get("correlation")
            if corr is not None:
                launches.append((e.get("tid"), float(e["ts"]), int(corr)))
        elif cat in _GPU_CATS:
            corr = (e.get("args") or {}).get("correlation")
            if corr is not None:
                gpu.setdefault(int(corr), []).append((float(e["ts"]), name, float(e.get("dur", 0.0)) * 1e-6))
    for rs in ranges.values():
        rs.sort()
    owner: dict[int, int] = {}
    for tid, ts, corr in launches:
        rs = ranges.get(tid, [])
        i = bisect.bisect_right(rs, (ts, math.inf, math.inf)) - 1  # the last range starting at or before ts
        if i >= 0 and ts <= rs[i][1]:
            owner[corr] = rs[i][2]
    out: dict[int, list[tuple[float, str, float]]] = {}
    for corr, k in owner.items():
        out.setdefault(k, []).extend(gpu.get(corr, []))
    return {k: GpuWork(k, tuple((name, sec) for _, name, sec in sorted(v))) for k, v in out.items()}


def trace_events(run: Callable[[], Any]) -> list[dict[str, Any]]:
    """The chrome-trace events of a torch.profiler trace (host and CUDA activity) of `run()`,
    from a synchronized device to the end of the GPU work it started."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as fh:
        prof.export_chrome_trace(fh.name)
        return json.loads(Path(fh.name).read_text()).get("traceEvents", [])


def kernel_gpu_trace(step: PlannedStep, inputs: Sequence[torch.Tensor] | torch.Tensor,
                     target: torch.Tensor | None = None) -> dict[int, GpuWork]:
    """The GPU work each kernel node of one planned CUDA step launched, from a profiler
    trace (it updates the model like any other step); kernels that launch nothing are absent."""
    if step.plan.device != "cuda":
        raise RunError("a kernel GPU trace needs a CUDA plan")
    return gpu_work_by_kernel(trace_events(lambda: run_with_probe(step, inputs, target, _RangeProbe)))
