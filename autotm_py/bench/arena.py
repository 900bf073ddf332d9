"""autotm in the GPU comparison with the planned arena (runtime.arena) for its device memory
instead of PyTorch's caching allocator: each plan runs in a fresh process that installs the
arena before anything else touches CUDA, records a step under an allocator of the cap's size
that never fragments, lays that step out, and times the steps that replay the layout within
the cap. Where the layout reaches past the cap, the plan is solved again with its limits lowered
by the measured overshoot (runtime.arena.layout_repair). Each convolution's workspace is bounded
by what its plan left room for (runtime.arena.bound_workspaces).
"""

from __future__ import annotations

import math
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


def _arena_step(arena: Arena, step: Callable[[], Any]) -> Callable[[], Any]:
    """`step` as one step of the arena's (its allocations counted from the first)."""
    def run() -> Any:
        arena.begin_step()
        return step()

    return run


def arena_autotm_run(arena: Arena, graph: Any, prof: Any, model: torch.nn.Module, lr: float, x: torch.Tensor,
                     y: torch.Tensor, formulation: str, cap: int, steps: int, time_limit: float,
                     max_retries: int = 3, runs: PlanRuns = PlanRuns(),
                     log: Callable[[str], None] = print) -> MethodResult:
    """Solve at `cap`, record a step (the last of the cuDNN search steps) with at most `cap`
    bytes live, lay it out, repair while the layout reaches past the cap, then time `steps`
    steps that replay the layout within the cap. Of `runs`, the asynchronous formulation's
    `async_candidates` and `copy_spans` apply; the arena bounds workspaces itself, so
    `choose_algorithms` does not."""
    method = f"autotm {formulation}{METHOD_SUFFIX}"
    limits: Any = cap
    attempts: list[dict[str, Any]] = []
    fitted = None
    for attempt in range(max_retries + 1):
        lowest = int(np.min(limits))
        try:
            plan = optimize(graph, prof, formulation=formulation, limit_bytes=limits, time_limit=time_limit,
                            async_candidates=runs.async_candidates, copy_spans=runs.copy_spans)
        except Infeasible as exc:
            attempts.append({"limit": lowest, "status": "infeasible", "reason": str(exc)})
            break
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
            attempts.append({"limit": lowest, "status": "out of memory", "error": str(exc).splitlines()[0][:300],
                             "predicted_seconds": plan.predicted_seconds})
            per_kernel = np.broadcast_to(np.asarray(limits, dtype=np.int64), (len(graph.kernels),))
            limits = np.floor(per_kernel * (1 - OUT_OF_MEMORY_CUT)).astype(np.int64)
            log(f"  arena {formulation} attempt {attempt}: more than the cap live at once; "
                f"lowered {OUT_OF_MEMORY_CUT:.0%}")
            continue
        layout = arena.layout()
        rec = arena.stats()
        fixed = layout.fixed_top > cap
        attempts.append({"limit": lowest, "status": "ok" if layout.top <= cap else
                         "blocks from before the step over the cap" if fixed else "layout over the cap",
                         "layout_top": layout.top, "live_peak": layout.live_peak, "fixed_top": layout.fixed_top,
                         "refused_requests": rec.failures, "predicted_seconds": plan.predicted_seconds,
                         "predicted_fast_peak": plan.peak_fast_bytes})
        log(f"  arena {formulation} attempt {attempt}: limit {lowest / 2**30:.2f} GiB, layout "
            f"{layout.top / 2**30:.3f} GiB for {layout.live_peak / 2**30:.3f} GiB live at most "
            f"(+{layout.overhead:.2%}; blocks from before the step reach {layout.fixed_top / 2**30:.3f} GiB), "
            f"{rec.failures} refused request(s)")
        if fixed or layout.top > cap:
            log("    highest blocks from before the step: " + ", ".join(
                f"{nb / 2**20:.1f} MiB at {o / 2**30:.3f} GiB{' (freed in it)' if gone else ''}"
                for o, nb, gone in layout.highest_fixed))
        if layout.top <= cap:
            fitted = (plan, step, layout)
            break
        if fixed:  # they stay where they are: no plan of this step can lay out below them
            break
        per_kernel = np.broadcast_to(np.asarray(limits, dtype=np.int64), (len(graph.kernels),))
        limits, cut = layout_repair(per_kernel, layout, cap)
        attempts[-1]["step_cut"] = cut
    if fitted is None:
        last = attempts[-1] if attempts else {"status": "not run"}
        return MethodResult(method, last["status"], notes=f"{len(attempts) - 1} re-solve(s) did not fit",
                            extra={"attempts": attempts})
    plan, step, layout = fitted
    arena.set_plan(layout)
    arena.set_span(cap)
    try:
        times = time_steps(_arena_step(arena, lambda: step(x, y)), steps, x.device)  # after one warm-up replay
    except torch.OutOfMemoryError as exc:
        return MethodResult(method, "out of memory", notes="the replayed layout was refused",
                            extra={"attempts": attempts, "error": str(exc).splitlines()[0][:300]})
    st = arena.stats()  # of the last timed step
    try:
        arena.begin_step()
        breakdown = stream_breakdown(lambda: step(x, y))
    except Exception as exc:  # noqa: BLE001 - a diagnostic; the result stands without it
        breakdown = {"error": str(exc).splitlines()[0][:200]}
    resolves = len(attempts) - 1
    extra = {"attempts": attempts, "breakdown": breakdown, "layout_top": layout.top, "live_peak": layout.live_peak,
             "layout_overhead": layout.overhead, "unplanned": st.unplanned, "refused_requests": st.failures,
             "predicted_fast_peak": plan.peak_fast_bytes, "bytes_moved": plan.bytes_moved,
             "predicted_all_fast_seconds": plan.all_fast_seconds}
    log(f"  breakdown: {breakdown}")
    return MethodResult(method, "ok" if st.top <= cap else "over the cap", median(times), st.top,
                        plan.predicted_seconds, f"{resolves} re-solve(s)" if resolves else "", extra)


def arena_child(name: str, batch: int, formulation: str, cap: int, steps: int, time_limit: float,
                cache: str | None, cudnn_benchmark: bool, runs: PlanRuns = PlanRuns()) -> MethodResult:
    """arena_autotm_run in this (fresh) process: the arena first, then the workload."""
    arena = install_cuda_arena(limit=cap)
    from ..profiler import profile

    torch.backends.cudnn.benchmark = cudnn_benchmark
    entry = zoo.get(name)
    model, (x,), y = zoo.workload(name, batch, device="cuda")
    graph = capture(model, (x,), y, lr=entry.lr, device="cuda", name=name, batch=batch)
    prof = profile(graph, device="cuda", cache=cache, progress=False, cudnn_benchmark=cudnn_benchmark)
    if prof.stats.get("configs_measured"):
        return MethodResult(f"autotm {formulation}{METHOD_SUFFIX}", "failed: the kernel cache lacked kernels "
                            "of this workload; profile it first without the arena", math.nan)
    return arena_autotm_run(arena, graph, prof, model, entry.lr, x, y, formulation, cap, steps, time_limit,
                            runs=runs, log=lambda m: print(m, flush=True))


def isolated_arena_run(name: str, batch: int, formulation: str, cap: int, steps: int, time_limit: float,
                       cache: Any, cudnn_benchmark: bool, runs: PlanRuns = PlanRuns()) -> MethodResult:
    """arena_child in a fresh process (the arena must be the process's first use of CUDA)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(arena_child, name, batch, formulation, cap, steps, time_limit,
                               None if cache is None else str(cache), cudnn_benchmark, runs).result()
        except Exception as exc:  # noqa: BLE001 - the comparison's other methods stand without it
            return MethodResult(f"autotm {formulation}{METHOD_SUFFIX}",
                                f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
