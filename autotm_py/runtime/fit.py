"""Fit a plan to a device budget (reference 5.2): solve, run the step under the budget, and
where it runs out of memory or its measured peak goes over, trace its memory per kernel, lower
the limits where it went over (defrag.next_limits) and solve again, up to a number of times.

The loop takes its three stages as functions (`autotm run --device cuda` and the library's
`autotm_py.fit` give the CUDA ones, cuda_stages; a test gives fakes, with no GPU):
`solve(limits)` returns a plan, `run(plan)` a RunOutcome, `trace(outcome)` the MemoryTrace of
the failed step (or None). The GPU comparison (bench.peers) keeps a loop of its own, which also
times every fitting plan and keeps the fastest; both repair as defrag.next_limits says.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from ..optimizer.plan import Plan
from .defrag import MemoryTrace, kernel_memory_trace, next_limits
from .step import PlannedStep, RunError, time_steps

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
    held: int = 0  # device bytes outside the step that every solve left room for

    @property
    def fits(self) -> bool:
        return self.attempts[-1].status == OK

    @property
    def resolves(self) -> int:
        return len(self.attempts) - 1

    def summary(self) -> str:
        """One line for a report: how many re-solves, and how far the limit came down."""
        held = f"{self.held / 2**20:.1f} MiB of the budget held outside the step" if self.held else ""
        if not self.resolves:
            return held
        cut = 1 - self.attempts[-1].limit / max(self.attempts[0].limit, 1)
        fitted = "fitted" if self.fits else "did not fit"
        return "; ".join(n for n in (f"{self.resolves} re-solve(s) after the step went over the budget "
                                     f"(lowest limit {cut:.1%} under it); the last plan {fitted}", held) if n)


class BudgetError(RuntimeError):
    """No plan fitted the budget within the re-solves allowed."""


def fit_to_budget(solve: Callable[[Any], Plan], run: Callable[[Plan], RunOutcome],
                  trace: Callable[[RunOutcome], MemoryTrace | None], budget: int, num_kernels: int,
                  max_retries: int = 3, log: Callable[[str], None] | None = None, held: int = 0) -> Fitted:
    """Solve at `budget`, run, and repair up to `max_retries` times; returns the last attempt
    (the first that fitted, or the last that did not). `held`: device bytes allocated outside
    the step for all of it (tensors the caller keeps, library workspaces; held_outside): they
    count in the measured peak, so every solve leaves them room."""
    if max_retries < 0:
        raise ValueError(f"max_retries must be 0 or more, got {max_retries}")
    if held >= budget:
        raise BudgetError(f"{held} bytes of device memory are held outside the step, which leaves nothing "
                          f"of the budget of {budget} bytes; free them or give a larger budget")
    limits: Any = budget - held
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
            return Fitted(plan, outcome, tuple(attempts), held)
        per_kernel = np.broadcast_to(np.asarray(limits, dtype=np.int64), (num_kernels,))
        overshoot = outcome.peak / budget - 1 if status == OVER else None
        repeats = failures_in_a_row if status == OUT_OF_MEMORY else 0
        limits, where, cut = next_limits(trace(outcome), per_kernel, budget, overshoot, repeats)
        failures_in_a_row = repeats + 1 if status == OUT_OF_MEMORY else 0
        attempts[-1] = Attempt(lowest, status, outcome.peak, plan.predicted_seconds, cut, tuple(where[:50]))


def fit_step(solve: Callable[[Any], Plan], make_step: Callable[[Plan], PlannedStep],
             stages: Callable[[Callable[[Plan], PlannedStep]], tuple[Callable, Callable]], model: torch.nn.Module,
             optimizer: torch.optim.Optimizer | None, budget: int, num_kernels: int,
             max_retries: int = 3, held: int = 0) -> tuple[PlannedStep, Fitted]:
    """(a fresh step of the plan that fitted `budget`, the record of the fitting), with
    `model`'s parameters and buffers and `optimizer`'s state as they were before: fitting runs
    training steps (`stages(make_step)` gives fit_to_budget's run and trace), and what they
    updated is put back, in place. Raises BudgetError where no plan fitted."""
    saved = _snapshot(model, optimizer)
    try:
        run, trace = stages(make_step)
        fitted = fit_to_budget(solve, run, trace, budget, num_kernels, max_retries, held=held)
    finally:
        _restore(model, optimizer, saved)
    if not fitted.fits:
        raise BudgetError(f"no plan fitted the budget of {budget} bytes: {fitted.summary() or 'the step went over'}")
    return make_step(fitted.plan), fitted


def held_outside(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, tensors: Any) -> int:
    """Device bytes allocated now that the step will not own: all the caching allocator has
    handed out less the storages of the model's parameters and buffers, the optimizer's state
    and `tensors` (the step's inputs and target), which the plan counts itself."""
    own: dict[int, int] = {}
    state = [v for st in (optimizer.state.values() if optimizer is not None else ()) for v in st.values()]
    for t in (*model.parameters(), *model.buffers(), *state, *tensors):
        if isinstance(t, torch.Tensor) and t.is_cuda:
            st = t.untyped_storage()
            own[st.data_ptr()] = st.nbytes()
    return max(0, torch.cuda.memory_allocated() - sum(own.values()))


def _snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[list, dict]:
    """Host copies of the model's parameters and buffers and of the optimizer's state."""
    tensors = [t.detach().to("cpu", copy=True) for t in (*model.parameters(), *model.buffers())]
    state: dict[torch.Tensor, dict[str, Any]] = {}
    if optimizer is not None:
        for p, st in optimizer.state.items():
            state[p] = {k: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v for k, v in st.items()}
    return tensors, state


@torch.no_grad()
def _restore(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, saved: tuple[list, dict]) -> None:
    """Put back what _snapshot copied, in place (a step holds these very tensors); optimizer
    state a step created is dropped, as if it had never run."""
    tensors, state = saved
    for t, s in zip((*model.parameters(), *model.buffers()), tensors):
        t.copy_(s)
    if optimizer is None:
        return
    for p in list(optimizer.state):
        if p not in state:
            del optimizer.state[p]
            continue
        st = optimizer.state[p]
        for k in [k for k in st if k not in state[p]]:
            del st[k]
        for k, v in state[p].items():
            if isinstance(v, torch.Tensor) and isinstance(st.get(k), torch.Tensor):
                st[k].copy_(v)
            else:
                st[k] = v


# ---- the CUDA stages -------------------------------------------------------------------------
# How a cap is held (AUTOTM_CAP_BY): "fraction", PyTorch's per-process memory fraction alone,
# as the reference measurements did; or "fill", the fraction and a block taken from the device
# through the driver, so that the device's free memory is what the cap leaves. cuDNN sizes its
# workspaces by the device's free memory (and the allocator's largest cached block), which the
# fraction does not lower: under it cuDNN asks for workspaces the cap refuses, and each refusal
# is an allocator retry (the cache freed, the device synchronized) before a smaller request.
CAP_BY_ENV = "AUTOTM_CAP_BY"
CAP_BY = ("fraction", "fill")
# memory the fill leaves beyond what the cap allows: what cuDNN and cuBLAS take outside
# PyTorch's allocator (handles, their own scratch)
FILL_SLACK = 256 << 20
# the block the fill holds, by device: process-wide like the fraction it goes with
_fills: dict[int, int] = {}


def fill_bytes(free: int, total: int, fraction: float, reserved: int, slack: int = FILL_SLACK) -> int:
    """Bytes to take from a device with `free` bytes free (of `total`) so that what stays free
    is what a `fraction` cap still allows the allocator (which holds `reserved`), plus `slack`;
    in 2 MiB granules, 0 where nothing need be taken."""
    allowed = int(fraction * total) - reserved
    return max(0, (free - max(allowed, 0) - slack) // (2 << 20) * (2 << 20))


def cap_by() -> str:
    how = os.environ.get(CAP_BY_ENV, "fraction")
    if how not in CAP_BY:
        raise RunError(f"{CAP_BY_ENV} must be one of {', '.join(CAP_BY)}, not {how!r}")
    return how


def hold_device_memory(fraction: float | None) -> None:
    """Hold the caching allocator to `fraction` of the device (None: all of it), from an empty
    cache and a fresh peak counter; with AUTOTM_CAP_BY=fill also take from the device what the
    cap does not allow (CAP_BY_ENV above)."""
    from .arena import driver_alloc, driver_free

    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    # PyTorch's host cache keeps every pinned block a run used; across the cases of the GPU
    # comparison they added up past the host's memory (an H200 host of 128 GiB, third case)
    if hasattr(torch._C, "_host_emptyCache"):
        torch._C._host_emptyCache()
    dev = torch.cuda.current_device()
    if dev in _fills:
        driver_free(_fills.pop(dev))
    torch.cuda.set_per_process_memory_fraction(1.0 if fraction is None else fraction)
    torch.cuda.reset_peak_memory_stats()
    if fraction is not None and cap_by() == "fill":
        free, total = torch.cuda.mem_get_info()
        n = fill_bytes(free, total, fraction, torch.cuda.memory_reserved())
        if n:
            _fills[dev] = driver_alloc(n, f"a fill of {n} bytes")


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


def cuda_stages(make_step: Callable[[Plan], Any], inputs: Any, target: Any, steps: int,
                budget: int) -> tuple[Callable[[Plan], RunOutcome], Callable[[RunOutcome], MemoryTrace | None]]:
    """fit_to_budget's run and trace on CUDA: run compiles a plan with `make_step` and times
    it under the budget (the outcome's payload: the step and its step times); trace takes the
    memory trace of that step."""
    def run(plan: Plan) -> RunOutcome:
        step = make_step(plan)
        out = cuda_outcome(lambda: step(inputs, target), steps, budget)
        return RunOutcome(out.status, out.peak, (step, out.payload))

    def trace(outcome: RunOutcome) -> MemoryTrace | None:
        return cuda_trace(outcome.payload[0], inputs, target, budget)

    return run, trace
