"""autotm in the GPU comparison with the planned arena (runtime.arena) for its device memory
instead of PyTorch's caching allocator: each attempt runs in a fresh process that installs the
arena before anything else touches CUDA, solves at its limits, records a step under an
allocator of the cap's size that never fragments, lays that step out and, where the layout
fits, times the steps that replay it within the cap. Where the layout reaches past the cap, the
next attempt solves with its limits lowered by the measured overshoot
(runtime.arena.layout_repair). Each convolution's workspace is bounded by what its plan left
room for (runtime.arena.bound_workspaces).

Why a fresh process per attempt: cuDNN keeps the algorithm it chose for a convolution's shape
for the whole process, and the recording's arena refuses nothing short of the cap. A plan solved
again with less room at a convolution would run the first plan's algorithm there with its
larger workspace. On an H100 (VGG19 batch 256 under 14.85 GiB, asynchronous) that is what the
re-solves recorded: the fourth plan left kernel #10 32 MiB where the first had left 3.1 GiB,
and its step had 14.74 GB live at once for the 13.19 GB its plan counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..graph import capture, zoo
from ..optimizer import Infeasible, optimize
from ..runtime import compile as compile_plan
from ..optimizer.limits import plan_workspace
from ..runtime.arena import Arena, bound_workspaces, install_cuda_arena, layout_repair
from ..runtime.step import SEARCH_STEPS, median, time_steps
from .peers import MethodResult, PlanRuns, stream_breakdown

METHOD_SUFFIX = " (planned arena)"
# a recording that had more than the cap live at once: the plan's count fell short by an
# unknown amount (no layout was made); the next solve gets every limit this much lower
OUT_OF_MEMORY_CUT = 0.05


@dataclass(frozen=True)
class ArenaAttempt:
    """One solve at `limits`, its recorded step and layout (`record`, as the report lists
    attempts); `result` where the layout fitted and its steps were timed, else `next_limits`
    for the next solve (None: no plan of this step can fit)."""

    record: dict[str, Any]
    result: MethodResult | None = None
    next_limits: np.ndarray | None = field(default=None, compare=False)


def _arena_step(arena: Arena, step: Callable[[], Any]) -> Callable[[], Any]:
    """`step` as one step of the arena's (its allocations counted from the first)."""
    def run() -> Any:
        arena.begin_step()
        return step()

    return run


def _per_kernel(graph: Any, limits: Any) -> np.ndarray:
    return np.broadcast_to(np.asarray(limits, dtype=np.int64), (len(graph.kernels),))


def arena_attempt(arena: Arena, graph: Any, prof: Any, model: torch.nn.Module, lr: float, x: torch.Tensor,
                  y: torch.Tensor, formulation: str, cap: int, limits: Any, steps: int, time_limit: float,
                  runs: PlanRuns = PlanRuns(), log: Callable[[str], None] = print,
                  keep_recording: Path | None = None) -> ArenaAttempt:
    """Solve at `limits` (bytes, or bytes per kernel), record a step (the last of the cuDNN
    search steps) with at most `cap` bytes live, lay it out and, where the layout fits within
    `cap`, time `steps` steps that replay it. Of `runs`, the asynchronous formulation's
    `async_candidates` and `copy_spans` apply; the arena bounds workspaces itself, so
    `choose_algorithms` does not. `keep_recording`: an .npz file for the recorded step's log
    and the blocks live when it began (runtime.arena.layout_from_log lays them out again)."""
    method = f"autotm {formulation}{METHOD_SUFFIX}"
    lowest = int(np.min(limits))
    try:
        plan = optimize(graph, prof, formulation=formulation, limit_bytes=limits, time_limit=time_limit,
                        async_candidates=runs.async_candidates, copy_spans=runs.copy_spans)
    except Infeasible as exc:
        return ArenaAttempt({"limit": lowest, "status": "infeasible", "reason": str(exc)})
    room = bound_workspaces(plan_workspace(graph, prof, plan), arena.set_room)
    step = compile_plan(plan, model, lr=lr, passes=(room,))
    arena.set_plan(None)
    arena.set_span(arena.cap)
    arena.set_limit(cap)
    try:
        # the cuDNN search steps, then the one recorded
        time_steps(_arena_step(arena, lambda: step(x, y)), SEARCH_STEPS + 1, x.device, warmup=0)
    except torch.OutOfMemoryError as exc:
        # more than the cap live at once: no layout can help; the plan's own count is short
        log(f"  arena {formulation}: limit {lowest / 2**30:.2f} GiB, more than the cap live at once; "
            f"lowered {OUT_OF_MEMORY_CUT:.0%}")
        return ArenaAttempt({"limit": lowest, "status": "out of memory", "error": str(exc).splitlines()[0][:300],
                             "predicted_seconds": plan.predicted_seconds},
                            next_limits=np.floor(_per_kernel(graph, limits) * (1 - OUT_OF_MEMORY_CUT)).astype(np.int64))
    layout = arena.layout()
    rec = arena.stats()
    if keep_recording is not None:
        keep_recording.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(keep_recording, events=arena.events(), live_at_start=arena.live_at_start(),
                            cap=cap, limits=np.asarray(limits, dtype=np.int64))
    fixed = layout.fixed_top > cap
    record = {"limit": lowest, "status": "ok" if layout.top <= cap else
              "blocks from before the step over the cap" if fixed else "layout over the cap",
              "layout_top": layout.top, "live_peak": layout.live_peak, "fixed_top": layout.fixed_top,
              "refused_requests": rec.failures, "predicted_seconds": plan.predicted_seconds,
              "predicted_fast_peak": plan.peak_fast_bytes}
    log(f"  arena {formulation}: limit {lowest / 2**30:.2f} GiB, layout "
        f"{layout.top / 2**30:.3f} GiB for {layout.live_peak / 2**30:.3f} GiB live at most "
        f"(+{layout.overhead:.2%}; blocks from before the step reach {layout.fixed_top / 2**30:.3f} GiB), "
        f"{rec.failures} refused request(s)")
    if layout.top > cap:
        log("    highest blocks from before the step: " + ", ".join(
            f"{nb / 2**20:.1f} MiB at {o / 2**30:.3f} GiB{' (freed in it)' if gone else ''}"
            for o, nb, gone in layout.highest_fixed))
        if fixed:  # they stay where they are: no plan of this step can lay out below them
            return ArenaAttempt(record)
        next_limits, cut = layout_repair(_per_kernel(graph, limits), layout, cap)
        record["step_cut"] = cut
        return ArenaAttempt(record, next_limits=next_limits)
    arena.set_plan(layout)
    arena.set_span(cap)
    try:
        times = time_steps(_arena_step(arena, lambda: step(x, y)), steps, x.device)  # after one warm-up replay
    except torch.OutOfMemoryError as exc:
        return ArenaAttempt(record, MethodResult(method, "out of memory", notes="the replayed layout was refused",
                                                 extra={"error": str(exc).splitlines()[0][:300]}))
    st = arena.stats()  # of the last timed step
    try:
        arena.begin_step()
        breakdown = stream_breakdown(lambda: step(x, y))
    except Exception as exc:  # noqa: BLE001 - a diagnostic; the result stands without it
        breakdown = {"error": str(exc).splitlines()[0][:200]}
    extra = {"breakdown": breakdown, "layout_top": layout.top, "live_peak": layout.live_peak,
             "layout_overhead": layout.overhead, "unplanned": st.unplanned, "refused_requests": st.failures,
             "predicted_fast_peak": plan.peak_fast_bytes, "bytes_moved": plan.bytes_moved,
             "predicted_all_fast_seconds": plan.all_fast_seconds}
    log(f"  breakdown: {breakdown}")
    return ArenaAttempt(record, MethodResult(method, "ok" if st.top <= cap else "over the cap", median(times), st.top,
                                             plan.predicted_seconds, "", extra))


def retry_layouts(attempt: Callable[[Any], ArenaAttempt], cap: int, max_retries: int) -> list[ArenaAttempt]:
    """`attempt(limits)` from `cap` on, then at each attempt's `next_limits` while it has
    them, at most `max_retries` more times; every attempt, in order."""
    attempts = [attempt(cap)]
    while attempts[-1].next_limits is not None and len(attempts) <= max_retries:
        attempts.append(attempt(attempts[-1].next_limits))
    return attempts


def arena_result(formulation: str, attempts: list[ArenaAttempt]) -> MethodResult:
    """The comparison's row for attempts (retry_layouts): the last one's result, with every
    attempt's record and the number of re-solves."""
    method = f"autotm {formulation}{METHOD_SUFFIX}"
    records = [a.record for a in attempts]
    r, resolves = attempts[-1].result, len(attempts) - 1
    if r is None:
        return MethodResult(method, records[-1]["status"], notes=f"{resolves} re-solve(s) did not fit" if resolves else "",
                            extra={"attempts": records})
    notes = "; ".join(s for s in (r.notes, f"{resolves} re-solve(s)" if resolves else "") if s)
    return MethodResult(r.method, r.status, r.step_seconds, r.peak_bytes, r.predicted_seconds, notes,
                        {"attempts": records, **r.extra})


def arena_autotm_run(arena: Arena, graph: Any, prof: Any, model: torch.nn.Module, lr: float, x: torch.Tensor,
                     y: torch.Tensor, formulation: str, cap: int, steps: int, time_limit: float,
                     max_retries: int = 3, runs: PlanRuns = PlanRuns(),
                     log: Callable[[str], None] = print) -> MethodResult:
    """arena_attempt from `cap` on, re-solving in this process while the layout reaches past
    the cap. Re-solves here run the algorithms cuDNN chose for the first plan (see the module
    docstring); isolated_arena_run gives each attempt a fresh process."""
    return arena_result(formulation, retry_layouts(
        lambda limits: arena_attempt(arena, graph, prof, model, lr, x, y, formulation, cap, limits, steps, time_limit,
                                     runs, log), cap, max_retries))


def arena_child(name: str, batch: int, formulation: str, cap: int, limits: Any, steps: int, time_limit: float,
                cache: str | None, cudnn_benchmark: bool, runs: PlanRuns = PlanRuns(),
                keep_recording: Path | None = None) -> ArenaAttempt:
    """arena_attempt in this (fresh) process: the arena first, then the workload."""
    arena = install_cuda_arena(limit=cap)
    from ..profiler import profile

    torch.backends.cudnn.benchmark = cudnn_benchmark
    entry = zoo.get(name)
    model, (x,), y = zoo.workload(name, batch, device="cuda")
    graph = capture(model, (x,), y, lr=entry.lr, device="cuda", name=name, batch=batch)
    prof = profile(graph, device="cuda", cache=cache, progress=False, cudnn_benchmark=cudnn_benchmark)
    if prof.stats.get("configs_measured"):
        return ArenaAttempt({"limit": int(np.min(limits)), "status": "failed: the kernel cache lacked kernels "
                             "of this workload; profile it first without the arena"})
    return arena_attempt(arena, graph, prof, model, entry.lr, x, y, formulation, cap, limits, steps, time_limit,
                         runs=runs, log=lambda m: print(m, flush=True), keep_recording=keep_recording)


def isolated_arena_run(name: str, batch: int, formulation: str, cap: int, steps: int, time_limit: float,
                       cache: Any, cudnn_benchmark: bool, runs: PlanRuns = PlanRuns(),
                       max_retries: int = 3, recordings: Path | None = None) -> MethodResult:
    """arena_child for each attempt, each in a fresh process (the arena must be the process's
    first use of CUDA, and a re-solved plan must not inherit the first plan's algorithms).
    `recordings`: a folder for each attempt's recorded step (arena_attempt's keep_recording)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    def attempt(limits: Any) -> ArenaAttempt:
        # each attempt solves lower than the one before: its lowest limit names it
        keep = None if recordings is None else recordings / f"{name}_{batch}_{formulation}_{int(np.min(limits))}.npz"
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            try:
                return pool.submit(arena_child, name, batch, formulation, cap, limits, steps, time_limit,
                                   None if cache is None else str(cache), cudnn_benchmark, runs, keep).result()
            except Exception as exc:  # noqa: BLE001 - the comparison's other methods stand without it
                detail = str(exc).splitlines()[0][:200] if str(exc) else ""
                return ArenaAttempt({"limit": int(np.min(limits)), "status": f"failed: {type(exc).__name__}: {detail}"})

    return arena_result(formulation, retry_layouts(attempt, cap, max_retries))
