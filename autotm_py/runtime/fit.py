"""Fit a plan to a device budget (reference 5.2): solve, run the step under the budget, and
where it runs out of memory or its measured peak goes over, trace its memory per kernel, lower
the limits where it went over (defrag.next_limits) and solve again, up to a number of times.

The loop takes its three stages as functions (`autotm run --device cuda` gives them; a test
gives fakes, with no GPU): `solve(limits)` returns a plan, `run(plan)` a RunOutcome,
`trace(outcome)` the MemoryTrace of the failed step (or None). The GPU comparison
(bench.peers) keeps a loop of its own, which also times every fitting plan and keeps the
fastest; both repair as defrag.next_limits says.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from ..optimizer.plan import Plan
from .defrag import MemoryTrace, kernel_memory_trace, next_limits
from .step import time_steps

OK, OUT_OF_MEMORY, OVER = "ok", "out of memory", "over the budget"


@dataclass(frozen=True)
class RunOutcome:
    """What running a plan under the budget gave: "ok" or "out of memory", the measured peak
    device bytes, and whatever the caller needs later (the compiled step, its timings)."""

    status: str
    peak: int
    payload: Any = None


@dataclass(frozen=True)
class Attempt:
    limit: int  # the lowest per-kernel limit of this solve
    status: str  # "ok", "out of memory" or "over the budget"
    peak: int  # measured peak device bytes (the peak up to the failure where it ran out)
    predicted_seconds: float
    step_cut: float = 0.0  # the fraction the repair after it took off every kernel's limit
    lowered_at: tuple[int, ...] = ()  # the kernels the trace found over the budget (first 50)


@dataclass(frozen=True)
class Fitted:
    """The last plan solved, its outcome, and every attempt; `fits` says whether it fitted."""

    plan: Plan
    outcome: RunOutcome
    attempts: tuple[Attempt, ...]

    @property
    def fits(self) -> bool:
        return self.attempts[-1].status == OK

    @property
    def resolves(self) -> int:
        return len(self.attempts) - 1

    def summary(self) -> str:
        """One line for a report: how many re-solves, and how far the limit came down."""
        if not self.resolves:
            return ""
        cut = 1 - self.attempts[-1].limit / max(self.attempts[0].limit, 1)
        fitted = "fitted" if self.fits else "did not fit"
        return (f"{self.resolves} re-solve(s) after the step went over the budget "
                f"(lowest limit {cut:.1%} under it); the last plan {fitted}")


def fit_to_budget(solve: Callable[[Any], Plan], run: Callable[[Plan], RunOutcome],
                  trace: Callable[[RunOutcome], MemoryTrace | None], budget: int, num_kernels: int,
                  max_retries: int = 3, log: Callable[[str], None] | None = None) -> Fitted:
    """Solve at `budget`, run, and repair up to `max_retries` times; returns the last attempt
    (the first that fitted, or the last that did not)."""
    if max_retries < 0:
        raise ValueError(f"max_retries must be 0 or more, got {max_retries}")
    limits: Any = budget
    attempts: list[Attempt] = []
    failures_in_a_row = 0
    while True:
        plan = solve(limits)
        outcome = run(plan)
        status = outcome.status if outcome.status != OK or outcome.peak <= budget else OVER
        lowest = int(np.min(limits))
        attempts.append(Attempt(lowest, status, outcome.peak, plan.predicted_seconds))
        if log is not None:
            log(f"attempt {len(attempts) - 1}: limit {lowest / 2**30:.2f} GiB -> {status}, "
                f"peak {outcome.peak / 2**30:.2f} GiB")
        if status == OK or len(attempts) > max_retries:
            return Fitted(plan, outcome, tuple(attempts))
        per_kernel = np.broadcast_to(np.asarray(limits, dtype=np.int64), (num_kernels,))
        overshoot = outcome.peak / budget - 1 if status == OVER else None
        repeats = failures_in_a_row if status == OUT_OF_MEMORY else 0
        limits, where, cut = next_limits(trace(outcome), per_kernel, budget, overshoot, repeats)
        failures_in_a_row = repeats + 1 if status == OUT_OF_MEMORY else 0
        attempts[-1] = Attempt(lowest, status, outcome.peak, plan.predicted_seconds, cut, tuple(where[:50]))


# ---- the CUDA stages -------------------------------------------------------------------------
def hold_device_memory(fraction: float | None) -> None:
    """Hold the caching allocator to `fraction` of the device (None: all of it), from an empty
    cache and a fresh peak counter."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    # PyTorch's host cache keeps every pinned block a run used; across the cases of the GPU
    # comparison they added up past the host's memory (an H200 host of 128 GiB, third case)
    if hasattr(torch._C, "_host_emptyCache"):
        torch._C._host_emptyCache()
    torch.cuda.set_per_process_memory_fraction(1.0 if fraction is None else fraction)
    torch.cuda.reset_peak_memory_stats()


def _fraction(budget: int) -> float:
    return min(1.0, budget / torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)


def cuda_outcome(call: Callable[[], Any], steps: int, budget: int) -> RunOutcome:
    """Run one planned step `call` once, then `steps` times timed, with the caching allocator
    held to `budget` bytes; the payload is the step times (None where it ran out of memory)."""
    hold_device_memory(_fraction(budget))
    try:
        times = time_steps(call, steps, torch.device("cuda"))
        return RunOutcome(OK, torch.cuda.max_memory_allocated(), times)
    except torch.OutOfMemoryError:
        return RunOutcome(OUT_OF_MEMORY, torch.cuda.max_memory_allocated(), None)
    finally:
        hold_device_memory(None)


def cuda_trace(step: Any, inputs: Any, target: Any, budget: int) -> MemoryTrace | None:
    """The memory trace of a planned CUDA step under `budget` bytes, None where it cannot be
    taken. It follows one plain step, so that it finds the allocator's cache as a step before
    it leaves it, as the measured steps did: on an H200 (DenseNet201 batch 128 under 13 GiB) a
    plan ran out of memory in those steps and its trace, from an empty cache, named no kernel."""
    hold_device_memory(_fraction(budget))
    try:
        try:
            step(inputs, target)
            torch.cuda.synchronize()
        except torch.OutOfMemoryError:
            pass  # the trace's step then shows where
        return kernel_memory_trace(step, inputs, target)
    except Exception:  # noqa: BLE001 - without a trace the repair is the global one
        return None
    finally:
        hold_device_memory(None)
