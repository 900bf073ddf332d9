"""Repair a plan that does not fit on the device (reference 5.2, the original's defragmentation
loop): measure how much device memory is allocated while each kernel of the planned step runs,
lower the fast-memory limit in windows around the kernels that went over it, and solve again.

The plan counts tensor bytes; the caching allocator adds rounding, fragmentation and the
workspaces the libraries keep. A repair cuts the windows around the kernels that went over by
the measured shortfall plus MIN_CUT, and the whole step by the larger of the shortfall and the
fragmentation measured at the failure, plus STEP_MARGIN, since the excess is mostly step-wide;
repeated failures cut the whole step more (`repair_limits`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import fx

from ..optimizer.plan import Plan
from .step import PlannedStep, RunError, StepInterpreter, run_with_probe

WINDOW = 10  # kernels on each side of an offending one whose limit is lowered (as the original)
MIN_CUT, MAX_CUT = 0.02, 0.10  # each repair lowers a window's limit by 2% to 10%
# Beyond the measured shortfall, the first cut of the whole step (then 4x, 16x that on repeated
# failures, at most MAX_CUT; the measured fragmentation plus this margin is the least cut). On
# an H200 the first plans of ResNet152 and DenseNet201 fell short by 0.18% to 0.28% of the cap;
# after a window cut, the next plans fell short by 0.32% and 0.48% at kernels outside it. The
# excess is not local: where a plan fills the limit, whatever the plan does not count (up to
# 35 MB in those traces) and fragmentation find it short.
STEP_MARGIN = 0.005
# The ceiling of a whole-step cut sized by the measured fragmentation, which may exceed MAX_CUT:
# on an H200, DenseNet201 batch 128 under 5.2 GiB fitted only once 10.9% had been cut, in three
# repairs, and its first failed step had allocated at most 4.64 GiB (10.8% under the cap).
MAX_STEP_CUT = 0.25


@dataclass(frozen=True)
class MemoryTrace:
    """Device memory of one planned step, per kernel of its graph."""

    peaks: np.ndarray  # (K,) most bytes allocated while the kernel ran, moves before it included; 0 if it did not run
    failed_kernel: int | None  # the kernel during which an allocation failed (out of memory), if one did
    # (K,) times the caching allocator had to free its cache to serve the kernel (a device-wide
    # synchronization each: the step fits, but only just)
    retries: np.ndarray | None = None
    # device memory the failed allocation would have needed: what the allocator still held
    # after freeing its cache, plus the request (None where no allocation failed, or its size
    # is not known)
    failed_need: int | None = None
    # free device memory the allocator held at the failure, after freeing its cache, that the
    # request could not use (reserved minus allocated: fragmentation); None without a failure
    failed_held: int | None = None
    # times the allocator had to free its cache outside the kernels (in the moves, whose copies
    # allocate their buffers)
    retries_between: int = 0


_OOM_REQUEST = re.compile(r"Tried to allocate ([0-9.]+) (bytes|KiB|MiB|GiB)")
_UNIT = {"bytes": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def oom_request_bytes(message: str) -> int | None:
    """The size of the allocation an out-of-memory error of the caching allocator reports
    ('Tried to allocate 44.00 MiB'), or None."""
    m = _OOM_REQUEST.search(message)
    return None if m is None else int(float(m.group(1)) * _UNIT[m.group(2)])


class _PeakProbe(StepInterpreter):
    """Runs the rewritten step node by node and records the allocator's peak around each kernel.
    The peak counter is reset before a kernel, so it starts at what is allocated then (the
    tensors live across it, including copies the moves before it made)."""

    def __init__(self, gm: fx.GraphModule, num_kernels: int) -> None:
        super().__init__(gm)
        self.peaks = np.zeros(num_kernels, dtype=np.int64)
        self.retries = np.zeros(num_kernels, dtype=np.int64)
        self.current: int | None = None
        self.failed_need: int | None = None
        self.failed_held: int | None = None
        self.retries_between = 0

    def run_node(self, n: fx.Node) -> Any:
        try:
            return self._run_node(n)
        except torch.OutOfMemoryError as exc:
            # measured here, while every tensor the step holds is still referenced
            request = oom_request_bytes(str(exc))
            reserved = torch.cuda.memory_reserved()
            if request is not None:
                self.failed_need = reserved + request
            self.failed_held = reserved - torch.cuda.memory_allocated()
            raise

    def _run_node(self, n: fx.Node) -> Any:
        k = n.meta.get("autotm_kernel") if n.op == "call_function" else None
        if k is None:
            if n.op != "call_function":
                return super().run_node(n)
            before = torch.cuda.memory_stats().get("num_alloc_retries", 0)
            out = super().run_node(n)  # a move: its copy's buffer is allocated here
            self.retries_between += torch.cuda.memory_stats().get("num_alloc_retries", 0) - before
            return out
        self.current = int(k)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_stats().get("num_alloc_retries", 0)
        out = super().run_node(n)
        self.peaks[k] = max(int(self.peaks[k]), torch.cuda.max_memory_allocated())
        self.retries[k] += torch.cuda.memory_stats().get("num_alloc_retries", 0) - before
        return out


def kernel_memory_trace(step: PlannedStep, inputs: Sequence[torch.Tensor] | torch.Tensor,
                        target: torch.Tensor | None = None) -> MemoryTrace:
    """Run one planned CUDA step (it updates the model like any other) and return the device
    memory allocated per kernel. An out-of-memory error ends the step and names its kernel."""
    if step.plan.device != "cuda":
        raise RunError("a memory trace needs a CUDA plan: on the CPU the allocator does not count tiers")
    probe, err = run_with_probe(step, inputs, target, lambda gm: _PeakProbe(gm, len(step.plan.kernel_masks)),
                                catch=(torch.OutOfMemoryError,))
    failed = err is not None
    return MemoryTrace(probe.peaks.copy(), probe.current if failed else None, probe.retries.copy(),
                       probe.failed_need if failed else None, probe.failed_held if failed else None,
                       probe.retries_between)


def offending_kernels(trace: MemoryTrace, limits: np.ndarray) -> tuple[np.ndarray, float]:
    """(kernels whose measured memory went over their limit, the worst measured/limit ratio).
    A kernel that ran out of memory is offending. Where the trace knows what its failed
    allocation needed, its ratio is set so that the cut (half the ratio's excess) covers the
    whole shortfall plus MIN_CUT: that allocation must fit next time. Where it does not, the
    overshoot is unknown and counts as twice the largest cut. On an H200 the first plans of
    ResNet152 and DenseNet201 ran out of memory at one kernel each, having allocated at most
    66 MB to 600 MB less than the cap, and got the largest cut (10%: 2.5 GiB more to move at
    a 24.55 GiB cap) for a shortfall of unknown size."""
    lim = np.maximum(np.asarray(limits, dtype=np.int64), 1)
    over = trace.peaks > lim
    ratio = float((trace.peaks / lim).max()) if len(lim) else 0.0
    if trace.failed_kernel is not None:
        f = trace.failed_kernel
        over[f] = True
        short = measured_shortfall(trace, int(lim[f]))
        ratio = max(ratio, 1 + 2 * (MAX_CUT if short is None else short + MIN_CUT))
    return np.flatnonzero(over), ratio


def excess_over_plan(trace: MemoryTrace, plan: Plan) -> np.ndarray:
    """Per kernel: bytes the trace measured while it ran beyond what the plan holds there (its
    fast-memory bytes and the workspace it leaves room for), 0 where the kernel did not run:
    library workspaces (cuBLAS keeps one per stream), transient buffers, algorithms that
    took more than their room."""
    planned = np.asarray(plan.fast_bytes, dtype=np.int64)
    if plan.workspace is not None:
        planned = planned + np.asarray(plan.workspace, dtype=np.int64)
    return np.where(trace.peaks > 0, trace.peaks - planned, 0)


def retry_kernels(trace: MemoryTrace) -> np.ndarray:
    """Kernels during which the allocator had to free its cache: the step fits under the cap
    only by synchronizing the device there, which costs more than the copies a little less
    memory would take."""
    return np.zeros(0, dtype=np.int64) if trace.retries is None else np.flatnonzero(trace.retries > 0)


def window_cut(worst_ratio: float) -> float:
    """The fraction lowered_limits takes off: half the relative overshoot, MIN_CUT to MAX_CUT."""
    return min(MAX_CUT, max(MIN_CUT, (worst_ratio - 1) / 2))


def lowered_limits(limits: np.ndarray, offending: np.ndarray, worst_ratio: float,
                   window: int = WINDOW) -> np.ndarray:
    """Per-kernel limits with every kernel within `window` of an offending one cut by half the
    relative overshoot (between MIN_CUT and MAX_CUT), once, however many windows cover it."""
    lim = np.asarray(limits, dtype=np.int64).copy()
    if len(offending) == 0:
        return lim
    cut = window_cut(worst_ratio)
    mark = np.zeros(len(lim) + 1, dtype=np.int64)
    np.add.at(mark, np.clip(offending - window, 0, len(lim)), 1)
    np.add.at(mark, np.clip(offending + window + 1, 0, len(lim)), -1)
    covered = np.cumsum(mark[:-1]) > 0
    lim[covered] = np.floor(lim[covered] * (1 - cut)).astype(np.int64)
    return lim


def measured_shortfall(trace: MemoryTrace, cap: int) -> float | None:
    """How far the failed allocation's need went over `cap`, as a fraction of it (0 if it did
    not), or None where the trace does not know it."""
    return None if trace.failed_need is None else max(trace.failed_need / max(cap, 1) - 1, 0.0)


def measured_fragmentation(trace: MemoryTrace, cap: int) -> float | None:
    """The free memory the allocator held at the failure and could not use, as a fraction of
    `cap`, or None where the trace does not know it."""
    return None if trace.failed_held is None else max(trace.failed_held, 0) / max(cap, 1)


def step_cut(shortfall: float | None, repeats: int, fragmentation: float | None = None) -> float:
    """The fraction of every kernel's limit a repair takes off: the shortfall and STEP_MARGIN,
    4**repeats times that margin after `repeats` failures in a row, at most MAX_CUT; at least
    the fragmentation plus STEP_MARGIN, at most MAX_STEP_CUT. With the shortfall unknown,
    nothing on a first repair (the windows take the largest cut) and MAX_CUT on a repeated one.
    The fragmentation counts because a plan that fits the cap only by the shortfall finds it
    short again at other kernels: on an H200 the failed steps of DenseNet201 batch 128 had
    allocated 3% to 11% less than the cap (the allocator held the rest), those of ResNet152
    batch 256 at most 0.8% less; cut by the shortfall plus the margin, ResNet152's next plans
    fitted and DenseNet201's ran out of memory twice more."""
    if shortfall is None:
        return 0.0 if repeats == 0 else MAX_CUT
    escalated = min(MAX_CUT, shortfall + STEP_MARGIN * 4 ** repeats)
    held = 0.0 if fragmentation is None else min(MAX_STEP_CUT, fragmentation + STEP_MARGIN)
    return max(escalated, held)


def repair_limits(limits: np.ndarray, offending: np.ndarray, worst_ratio: float, repeats: int = 0,
                  shortfall: float | None = None, fragmentation: float | None = None) -> np.ndarray:
    """The limits of the next solve after a step went over them at `offending`, `worst_ratio`,
    `shortfall` and `fragmentation` as measured (offending_kernels, measured_shortfall,
    measured_fragmentation). A first repair (`repeats` 0) cuts windows around those kernels and
    then the whole step (step_cut); a repeated one (the plan solved after `repeats` earlier cuts
    ran out of memory again) only the whole step, by more. On an H200 (DenseNet-201 batch 128
    under 5.2 GiB, asynchronous plans) window cuts alone moved the failure along the step,
    kernel 726, then 1028, 1061 and 1093, each past the window cut before it, until the retries
    ran out. A whole-step cut of MAX_CUT on the second failure then fitted, but cost 4%
    (ResNet152 under 9.82 GiB) and 9% (DenseNet201 under 13 GiB) more predicted time than the
    first plan."""
    lim = np.asarray(limits, dtype=np.int64)
    if repeats == 0:
        lim = lowered_limits(lim, offending, worst_ratio)
    return np.floor(lim * (1 - step_cut(shortfall, repeats, fragmentation))).astype(np.int64)


def next_limits(trace: MemoryTrace | None, limits: np.ndarray, cap: int, overshoot: float | None,
                repeats: int = 0) -> tuple[np.ndarray, list[int], float]:
    """(the next solve's per-kernel limits, the kernels that went over `cap`, the fraction the
    whole step lost) after a step did not fit: cut as repair_limits says where `trace` names
    the kernels (`repeats`: the out-of-memory failures in a row before this one); otherwise
    (no trace, or a step that went over between kernels) every kernel lowered by half the
    `overshoot` (measured peak / cap - 1; None for an out-of-memory error: twice MAX_CUT),
    between MIN_CUT and MAX_CUT."""
    if trace is not None:
        offending, worst = offending_kernels(trace, np.full(len(limits), cap))
        if len(offending):
            short, held = measured_shortfall(trace, cap), measured_fragmentation(trace, cap)
            return (repair_limits(limits, offending, worst, repeats, short, held), offending.tolist(),
                    step_cut(short, repeats, held))
    ratio = 1 + (2 * MAX_CUT if overshoot is None else overshoot)
    return lowered_limits(limits, np.arange(len(limits)), ratio, window=0), [], window_cut(ratio)

