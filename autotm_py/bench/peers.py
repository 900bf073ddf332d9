"""The GPU comparison: an unconstrained step, autotm (asynchronous and synchronous plans),
PyTorch's `save_on_cpu(pin_memory=True)` and activation checkpointing, all on the same model
in one process, each under the same cap on device memory.

cuDNN keeps the algorithm it chose for each convolution shape for the rest of the process,
and under a cap it falls back to algorithms with small workspaces: a method run after another
would inherit that one's choices. Each autotm plan therefore runs in a fresh process of its
own, after the unconstrained step and before the peers, which run in this process.

The cap is enforced with `torch.cuda.set_per_process_memory_fraction` (with AUTOTM_CAP_BY=fill
also by taking the rest of the device, runtime.fit.hold_device_memory); the peak reported is
`torch.cuda.max_memory_allocated()` over the timed steps. The transfer lower bound of any
plan that only moves data is LB = max(T_f, E/B) + max(T_b, E/B), with E = unplanned peak - cap,
T_f and T_b the forward and backward(+update) times of the unconstrained step and B the
measured pinned-copy bandwidth.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..graph import capture, zoo
from ..optimizer import Infeasible, optimize
from ..optimizer.formulation import refine_asynchronous
from ..runtime import compile as compile_plan
from ..runtime.defrag import MemoryTrace, excess_over_plan, lowered_limits, next_limits, retry_kernels
from ..runtime.fit import cuda_trace, hold_device_memory
from ..runtime.step import SEARCH_STEPS, median, time_steps


# a kernel where the allocator had to free its cache gets its limit (and its neighbours')
# lowered by (RETRY_RATIO - 1) / 2: the cached blocks it could not use are of that order
RETRY_RATIO = 1.1


@dataclass(frozen=True)
class PlanRuns:
    """How each autotm plan of the comparison is solved and run (autotm_run): `retry_repairs`,
    `refine_seconds` (see there), `choose_algorithms` (runtime.algorithms, before each planned
    step's first call) and the asynchronous formulation's `async_candidates` and `copy_spans`
    (optimize)."""

    retry_repairs: int = 0
    refine_seconds: float = 0.0
    choose_algorithms: bool = False
    async_candidates: int | str | None = "auto"
    copy_spans: int = 0


@dataclass(frozen=True)
class MethodResult:
    method: str
    status: str  # "ok", "out of memory", "failed: ..."
    step_seconds: float = math.nan
    peak_bytes: int = 0
    predicted_seconds: float = math.nan
    notes: str = ""
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class CaseResult:
    model: str
    batch: int
    cap_fraction: float
    cap_bytes: int
    unconstrained_seconds: float
    unconstrained_peak: int
    forward_seconds: float
    backward_seconds: float
    bandwidth_h2d: float
    bandwidth_d2h: float
    lower_bound_seconds: float
    methods: tuple[MethodResult, ...]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["methods"] = [asdict(m) for m in self.methods]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "CaseResult":
        """The inverse of to_json (JSON writes NaN times as NaN, which reads back as such); what
        else a report says of the case (how its plans ran: "plan_runs") is left out."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**{k: v for k, v in d.items() if k in names},
                      "methods": tuple(MethodResult(**m) for m in d["methods"])})


def as_sequential(model: nn.Module) -> nn.Sequential:
    """The zoo's CNNs as one flat nn.Sequential (same modules, same order), so that
    `checkpoint_sequential` can split them into segments."""
    name = type(model).__name__
    if name == "VGG":
        return nn.Sequential(*model.features, nn.Flatten(1), *model.classifier)
    if name == "ResNet":
        return nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool, *model.layer1,
                             *model.layer2, *model.layer3, *model.layer4, model.avgpool, nn.Flatten(1),
                             model.fc)
    if name == "DenseNet":
        head = list(model.classifier) if isinstance(model.classifier, nn.Sequential) else [model.classifier]
        return nn.Sequential(*model.features, model.avgpool, nn.Flatten(1), *head)
    raise ValueError(f"no sequential form for {name}")


def _loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if out.dim() > 2:
        return F.cross_entropy(out.flatten(0, -2), target.flatten())
    return F.cross_entropy(out, target)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _measure(step: Callable[[], Any], steps: int, device: torch.device,
             cap: float | None, errors: list[str] | None = None,
             caught: list[int] | None = None) -> tuple[str, float, int, int]:
    """(status, median step seconds, peak bytes, allocator retries) of `step` under a memory
    fraction. A retry is the caching allocator freeing its cache to satisfy a request: a
    device-wide synchronization, the cost of fragmentation under a cap. The first line of an
    error that ended the run goes to `errors`, where given, with the step it ended (1 is the
    first warm-up step). `caught`, where given, gets the out-of-memory errors the allocator
    raised in a run that went on, warm-up included: a library caught them and fell back,
    such as cuDNN to an algorithm with a smaller workspace, kept for the rest of the process."""
    ran = [0]

    def counted() -> Any:
        ran[0] += 1
        return step()

    hold_device_memory(cap)
    ooms = torch.cuda.memory_stats().get("num_ooms", 0)
    try:
        for _ in range(SEARCH_STEPS):  # warm-up: cuDNN's algorithm search under the cap retries by design
            counted()
        torch.cuda.synchronize()
        before = torch.cuda.memory_stats().get("num_alloc_retries", 0)
        times = time_steps(counted, steps, device, warmup=0)
        peak = torch.cuda.max_memory_allocated()
        stats = torch.cuda.memory_stats()
        if caught is not None:
            caught.append(stats.get("num_ooms", 0) - ooms)
        return "ok", median(times), peak, stats.get("num_alloc_retries", 0) - before
    except Exception as exc:  # noqa: BLE001 - out-of-memory is a result here, not a crash
        if errors is not None:
            errors.append(f"step {ran[0]}: " + (str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__))
        if _is_oom(exc):
            return "out of memory", math.nan, torch.cuda.max_memory_allocated(), 0
        return f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", math.nan, 0, 0
    finally:
        torch.cuda.synchronize()
        hold_device_memory(None)


def _eager(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
           mode: str) -> Callable[[], None]:
    seq = as_sequential(model) if mode == "checkpoint" else None

    def step() -> None:
        if mode == "save_on_cpu":
            with torch.autograd.graph.save_on_cpu(pin_memory=True):
                loss = _loss(model(x), y)
        elif mode == "checkpoint":
            from torch.utils.checkpoint import checkpoint_sequential

            # An in-place ReLU at a segment boundary would overwrite a checkpointed input.
            relus = [m for m in model.modules() if isinstance(m, nn.ReLU) and m.inplace]
            for m in relus:
                m.inplace = False
            try:
                loss = _loss(checkpoint_sequential(seq, 4, x, use_reentrant=False), y)
            finally:
                for m in relus:
                    m.inplace = True
        else:
            loss = _loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def forward_backward_seconds(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
                             y: torch.Tensor, runs: int = 5) -> tuple[float, float]:
    """Median forward time and backward+update time of the eager, unconstrained step."""
    fwd, bwd = [], []
    for i in range(runs + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = _loss(model(x), y)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        if i:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
        del loss
    return median(fwd), median(bwd)


def stream_breakdown(step: Callable[[], Any]) -> dict[str, Any]:
    """Where one step's GPU time goes, from a torch.profiler trace (breakdown_from_events).
    When the planned step is slower than predicted, this says whether its kernels ran slower
    than profiled, waited on copies, or waited on the host."""
    from ..runtime.timing import trace_events

    return breakdown_from_events(trace_events(step))


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for lo, hi in sorted(intervals):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(hi - lo for lo, hi in intervals)


def _intersection(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The intersection of two sorted unions of disjoint intervals."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo < hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def breakdown_from_events(events: list[dict[str, Any]], top: int = 6) -> dict[str, Any]:
    """Seconds of compute kernels and of host<->device copies (sums over the trace's GPU
    events), the step's span on the GPU, how long some kernel ran (`kernel_busy`), some copy
    ran (`copy_busy`), both at once (`overlap`) and neither (`idle`: the GPU waited on the
    host), and the host's CUDA API calls that took longest in all (`host_calls`: name,
    seconds, count), where an allocator freeing its cache or pinning host memory shows."""
    out: dict[str, Any] = {"kernel_seconds": 0.0, "h2d_seconds": 0.0, "d2h_seconds": 0.0,
                           "other_copy_seconds": 0.0}
    kernels, copies = [], []
    calls: dict[str, list[float]] = {}
    for e in events:
        cat, dur = e.get("cat", ""), float(e.get("dur", 0.0)) * 1e-6
        if cat in ("cuda_runtime", "cuda_driver"):
            c = calls.setdefault(e.get("name", "?"), [0.0, 0])
            c[0] += dur
            c[1] += 1
            continue
        if cat not in ("kernel", "gpu_memcpy", "gpu_memset"):
            continue
        span = (e["ts"] * 1e-6, e["ts"] * 1e-6 + dur)
        name = e.get("name", "")
        if cat == "kernel":
            out["kernel_seconds"] += dur
            kernels.append(span)
        elif "HtoD" in name or "DtoH" in name:
            out["h2d_seconds" if "HtoD" in name else "d2h_seconds"] += dur
            copies.append(span)
        else:
            out["other_copy_seconds"] += dur
            kernels.append(span)  # device-to-device copies and memsets occupy the compute stream
    k, c = _union(kernels), _union(copies)
    both = _union(kernels + copies)
    out["gpu_span_seconds"] = both[-1][1] - both[0][0] if both else 0.0
    out["kernel_busy_seconds"] = _length(k)
    out["copy_busy_seconds"] = _length(c)
    out["overlap_seconds"] = _length(_intersection(k, c))
    out["idle_seconds"] = out["gpu_span_seconds"] - _length(both)
    longest = sorted(calls.items(), key=lambda kv: -kv[1][0])[:top]
    out["host_calls"] = [[name, round(sec, 6), int(n)] for name, (sec, n) in longest]
    return out


def lower_bound(peak: int, cap: int, t_f: float, t_b: float, bandwidth: float) -> float:
    """Transfer lower bound of any data-moving plan: E bytes out before the peak, back after."""
    e = max(peak - cap, 0)
    return max(t_f, e / bandwidth) + max(t_b, e / bandwidth)


def autotm_run(graph: Any, prof: Any, model: nn.Module, lr: float, x: torch.Tensor, y: torch.Tensor,
               formulation: str, cap: int, total: int, steps: int, time_limit: float,
               max_retries: int = 3, runs: PlanRuns = PlanRuns(),
               log: Callable[[str], None] = print) -> MethodResult:
    """Solve, run, and where the step does not fit under the cap (allocator fragmentation,
    workspaces), trace its memory per kernel, lower the limit around the kernels that went
    over (runtime.defrag) and solve again, up to `max_retries` times. With `runs.retry_repairs`,
    a step that fits but makes the allocator free its cache during the timed steps (a
    device-wide synchronization each time) is repaired the same way around the kernels where
    that happened, up to that many times; the fastest step that fitted is the result. Off by
    default: on an H200 (VGG19 batch 256 under 14.85 GiB, heuristic cuDNN) three such repairs
    cut the retries from 37 to 8 but made every step slower (0.560 s, then 0.738, 0.696 and
    0.713 s), the lower limits costing cuDNN its large-workspace algorithms. `runs.refine_seconds`:
    once a plan fits, an asynchronous plan whose overlap candidates were restricted is solved
    again at its limits with every candidate (optimizer.formulation.refine_asynchronous) and
    run; the faster of the two that fit is the result. Refining only the plan that fitted, not
    every solve, spends those seconds once: the first plans at the cap ran out of memory on an
    H200 in every case of ResNet152 and DenseNet201."""
    limit: Any = cap
    attempts: list[dict[str, Any]] = []
    best: MethodResult | None = None
    fitted: tuple[Any, Any] | None = None  # (plan, limits) of the best result
    for attempt in range(max_retries + 1):
        lowest = int(np.min(limit))  # per-kernel limits after a repair: report the lowest
        t0 = time.perf_counter()
        try:
            plan = optimize(graph, prof, formulation=formulation, limit_bytes=limit, time_limit=time_limit,
                            async_candidates=runs.async_candidates, copy_spans=runs.copy_spans)
        except Infeasible as exc:
            attempts.append({"limit": lowest, "status": "infeasible", "reason": str(exc)})
            log(f"  autotm {formulation} attempt {attempt}: limit {lowest / 2**30:.2f} GiB is infeasible")
            break
        solve = time.perf_counter() - t0
        step = compile_plan(plan, model, lr=lr, choose_algorithms=runs.choose_algorithms)
        errors: list[str] = []
        caught: list[int] = []
        status, secs, peak, retries = _measure(lambda: step(x, y), steps, x.device, cap / total, errors, caught)
        attempts.append({"limit": lowest, "status": status, "peak": peak, "solve_seconds": solve,
                         "gap": plan.solver.gap, "solver_status": plan.solver.status,
                         "predicted_seconds": plan.predicted_seconds})
        if errors:
            attempts[-1]["error"] = errors[0]
        if caught:
            attempts[-1]["caught_ooms"] = caught[0]
        fallbacks = f", {caught[0]} out-of-memory errors caught by libraries" if caught and caught[0] else ""
        log(f"  autotm {formulation} attempt {attempt}: limit {lowest / 2**30:.2f} GiB -> {status}, "
            f"{secs:.3f} s, peak {peak / 2**30:.2f} GiB, {retries} allocator retries{fallbacks} "
            f"(solve {solve:.1f} s, gap {plan.solver.gap:.3%})")
        attempts[-1]["alloc_retries"] = retries
        if status == "ok" and peak <= cap:
            result = _fitted_result(step, plan, x, y, cap, total, secs, peak, retries, formulation,
                                    f"{attempt} re-solve(s)" if attempt else "", log)
            if best is None or secs < best.step_seconds:
                best, fitted = result, (plan, limit)
            fitted_repairs = sum(1 for a in attempts[:-1] if a["status"] == "ok" and a.get("peak", 0) <= cap)
            if retries == 0 or attempt == max_retries or fitted_repairs >= runs.retry_repairs:
                break
        per_kernel = np.broadcast_to(np.asarray(limit, dtype=np.int64), (len(graph.kernels),))
        repeats = _oom_streak(attempts) - 1
        fix = _repaired(step, x, y, per_kernel, cap, peak, status, max(repeats, 0))
        limit, where = fix.limits, fix.where
        if fix.trace is not None:
            attempts[-1].update(_trace_notes(fix.trace, plan, graph))
        if status == "ok" and peak <= cap and not where:
            break  # retries the trace cannot place: keep what ran
        attempts[-1]["lowered_at"] = where[:50]
        attempts[-1]["step_cut"] = fix.step_cut
        everywhere = f"the whole step by {fix.step_cut:.2%}"
        if repeats > 0 and where:
            log(f"  out of memory again (kernel {where[0]}): lowered {everywhere}")
        elif where:
            log(f"  lowered the limit around {len(where)} kernel(s)" + (f" and {everywhere}" if fix.step_cut else ""))
        else:
            log(f"  lowered {everywhere}")
        step = None  # its buffers go before the next solve's
    step = None
    if best is not None and fitted is not None and runs.refine_seconds > 0 and formulation == "asynchronous":
        best = _refine_fitted(graph, prof, model, lr, x, y, fitted[0], fitted[1], best, cap, total, steps,
                              runs, attempts, log)
    if best is not None:
        return dataclasses.replace(best, extra=dict(best.extra, attempts=attempts))
    last = attempts[-1]
    return MethodResult(f"autotm {formulation}", last["status"] if last["status"] != "ok" else "over the cap",
                        math.nan, last.get("peak", 0), math.nan,
                        f"{len(attempts) - 1} re-solve(s) did not fit", {"attempts": attempts})


def _fitted_result(step: Any, plan: Any, x: torch.Tensor, y: torch.Tensor, cap: int, total: int, secs: float,
                   peak: int, retries: int, formulation: str, notes: str,
                   log: Callable[[str], None]) -> MethodResult:
    """The result of a planned step that fitted under the cap, with its stream breakdown (one
    more step) and what the plan predicted."""
    hold_device_memory(cap / total)
    try:
        step(x, y)  # hold_device_memory emptied the pinned host cache: refill it, untraced
        breakdown = stream_breakdown(lambda: step(x, y))
    except Exception as exc:  # noqa: BLE001 - a diagnostic; the result stands without it
        breakdown = {"error": str(exc).splitlines()[0][:200]}
    finally:
        hold_device_memory(None)
    log(f"  breakdown: {breakdown}")
    stats = step.move_stats
    extra = {"breakdown": breakdown, "predicted_all_fast_seconds": plan.all_fast_seconds,
             "alloc_retries": retries, "bytes_moved": plan.bytes_moved, "moves": len(plan.moves),
             "unplanned_copies": stats.unplanned_copies if stats else None,
             "predicted_fast_peak": plan.peak_fast_bytes}
    if retries:
        extra["retries_where"] = _retries_where(cuda_trace(step, x, y, cap), step.graph)
        log(f"  allocator retries: {extra['retries_where']}")
    return MethodResult(f"autotm {formulation}", "ok", secs, peak, plan.predicted_seconds, notes, extra)


def _retries_where(trace: MemoryTrace | None, graph: Any, top: int = 20) -> dict[str, Any]:
    """Where one traced step made the allocator free its cache: the kernels (most first) and
    how many times outside them (the moves' buffers)."""
    if trace is None or trace.retries is None:
        return {"error": "no trace"}
    order = [int(k) for k in np.argsort(-trace.retries, kind="stable")[:top] if trace.retries[k] > 0]
    return {"kernels": [{"kernel": k, "op": graph.kernels[k].op if graph is not None else None,
                         "retries": int(trace.retries[k])} for k in order],
            "in_kernels": int(trace.retries.sum()), "between_kernels": trace.retries_between}


def _refine_fitted(graph: Any, prof: Any, model: nn.Module, lr: float, x: torch.Tensor, y: torch.Tensor,
                   plan: Any, limit: Any, best: MethodResult, cap: int, total: int, steps: int,
                   runs: PlanRuns, attempts: list[dict[str, Any]], log: Callable[[str], None]) -> MethodResult:
    """`best` or, where refining the asynchronous `plan` that gave it finds a plan predicted
    faster and that plan fits and runs faster, that plan's result."""
    t0 = time.perf_counter()
    refined = refine_asynchronous(graph, prof, plan, limit, seconds=runs.refine_seconds)
    solve = time.perf_counter() - t0
    if refined is plan:
        return best  # no restriction shaped it: there was nothing to refine
    if refined.predicted_seconds >= plan.predicted_seconds:
        attempts.append({"refine": True, "status": "nothing better", "solve_seconds": solve})
        log(f"  refine: nothing better than {plan.predicted_seconds:.3f} s in {solve:.0f} s")
        return best
    step = compile_plan(refined, model, lr=lr, choose_algorithms=runs.choose_algorithms)
    status, secs, peak, retries = _measure(lambda: step(x, y), steps, x.device, cap / total)
    attempts.append({"refine": True, "limit": int(np.min(limit)), "status": status, "peak": peak,
                     "solve_seconds": solve, "gap": refined.solver.gap, "alloc_retries": retries,
                     "predicted_seconds": refined.predicted_seconds})
    log(f"  refine: predicted {refined.predicted_seconds:.3f} s (was {plan.predicted_seconds:.3f} s) -> {status}, "
        f"{secs:.3f} s, peak {peak / 2**30:.2f} GiB (solve {solve:.0f} s)")
    if status != "ok" or peak > cap or not secs < best.step_seconds:
        return best
    notes = "; ".join(n for n in (best.notes, "refined") if n)
    return _fitted_result(step, refined, x, y, cap, total, secs, peak, retries, best.method.split()[-1], notes, log)


def _oom_streak(attempts: list[dict[str, Any]]) -> int:
    """How many of the last attempts in a row ran out of memory."""
    n = 0
    for a in reversed(attempts):
        if a["status"] != "out of memory":
            break
        n += 1
    return n


@dataclass(frozen=True)
class _Repair:
    limits: np.ndarray  # per kernel, for the next solve
    where: list[int]  # the kernels that went over the cap (or made the allocator retry)
    trace: MemoryTrace | None  # the memory trace it was worked out from, if one was taken
    step_cut: float  # the fraction every kernel's limit lost


def _repaired(step: Any, x: torch.Tensor, y: torch.Tensor, limits: np.ndarray, cap: int, peak: int, status: str,
              repeats: int = 0) -> _Repair:
    """The next solve's limits from a memory trace of `step`. A step that ran out of memory is
    cut as defrag.repair_limits says (`repeats`: the out-of-memory attempts before it in a row);
    one that fitted with allocator retries, around the kernels where the allocator had to free
    its cache. A step that went over between kernels, or whose trace failed otherwise, gets its
    limit lowered everywhere (runtime.fit.cuda_trace takes the trace)."""
    trace = cuda_trace(step, x, y, cap)
    if trace is not None and status == "ok" and peak <= cap:  # it fitted, with allocator retries
        where = retry_kernels(trace)
        return _Repair(lowered_limits(limits, where, RETRY_RATIO), where.tolist(), trace, 0.0)
    lim, where, cut = next_limits(trace, limits, cap, (peak / cap - 1) if status == "ok" else None, repeats)
    return _Repair(lim, where, trace, cut)


def _trace_notes(trace: MemoryTrace, plan: Any, graph: Any, top: int = 5) -> dict[str, Any]:
    """What a repair's trace says, for the report: what a failed allocation needed, and the
    kernels that held most beyond the plan (defrag.excess_over_plan)."""
    notes: dict[str, Any] = {}
    if trace.failed_need is not None:
        notes["failed_need"] = trace.failed_need
    if trace.failed_held is not None:
        notes["failed_held"] = trace.failed_held
    excess = excess_over_plan(trace, plan)
    notes["excess_over_plan"] = [{"kernel": int(k), "op": graph.kernels[k].op, "bytes": int(excess[k])}
                                 for k in np.argsort(-excess, kind="stable")[:top] if excess[k] > 0]
    return notes


def run_case(name: str, batch: int, cap_fraction: float | None, *, cap_bytes: int | None = None,
             steps: int = 5, time_limit: float = 120.0,
             formulations: tuple[str, ...] = ("asynchronous", "synchronous"),
             peers: tuple[str, ...] = ("save_on_cpu", "checkpoint"), cache: Any = None,
             runs: PlanRuns = PlanRuns(), arena: bool = False, arena_recordings: Any = None,
             log: Callable[[str], None] = print) -> CaseResult:
    """One row of the comparison (the model is built once and shared by every method), under
    `cap_bytes` of device memory or, without it, `cap_fraction` of the unconstrained peak.
    With `arena`, each formulation also runs with the planned arena (bench.arena) for its
    device memory, its recorded steps kept in the folder `arena_recordings` (None: not kept)."""
    from ..profiler import profile

    device = torch.device("cuda")
    total = torch.cuda.get_device_properties(device).total_memory
    entry = zoo.get(name)
    model, (x,), y = zoo.workload(name, batch, device=device)
    opt = torch.optim.SGD(model.parameters(), lr=entry.lr)
    base = _eager(model, opt, x, y, "plain")
    status, t_u, peak, _ = _measure(base, steps, device, None)
    if status != "ok":
        raise RuntimeError(f"the unconstrained {name} batch {batch} step does not run: {status}")
    t_f, t_b = forward_backward_seconds(model, opt, x, y)
    cap = cap_bytes if cap_bytes is not None else int(cap_fraction * peak)
    cap_fraction = cap / peak
    log(f"{name} batch {batch}: unconstrained {t_u:.3f} s, peak {peak / 2**30:.2f} GiB, "
        f"cap {cap / 2**30:.2f} GiB ({cap_fraction:.0%}); T_f {t_f:.3f} s, T_b {t_b:.3f} s")
    graph = capture(model, (x,), y, lr=entry.lr, device=device, name=name, batch=batch)
    t0 = time.perf_counter()
    prof = profile(graph, device="cuda", cache=cache, progress=False,
                   cudnn_benchmark=torch.backends.cudnn.benchmark)
    log(f"  profile: {time.perf_counter() - t0:.1f} s, predicted all-fast step {prof.all_fast_seconds:.3f} s, "
        f"largest workspace {max(c.workspace for c in prof.kernels) / 2**30:.2f} GiB")
    big = 1 << 30
    h2d = prof.bandwidths.bandwidth(big, "read")
    d2h = prof.bandwidths.bandwidth(big, "write")
    lb = lower_bound(peak, cap, t_f, t_b, min(h2d, d2h))
    log(f"  pinned copies: H2D {h2d / 1e9:.1f} GB/s, D2H {d2h / 1e9:.1f} GB/s; lower bound {lb:.3f} s")
    # autotm first, each plan in a child process, while this one holds no pinned host memory
    # yet (save_on_cpu's pinned blocks stay in PyTorch's host cache: beside a child's pinned
    # slow tier they exceed the host's memory at ResNet152 batch 256); the peers then run
    # here, where only the unconstrained step chose cuDNN algorithms before them
    hold_device_memory(None)
    methods = []
    for form in formulations:
        methods.append(isolated_autotm_run(name, batch, form, cap, steps, time_limit, cache,
                                           torch.backends.cudnn.benchmark, runs))
        log(f"  {methods[-1].method}: {methods[-1].status}, {methods[-1].step_seconds:.3f} s, "
            f"predicted {methods[-1].predicted_seconds:.3f} s, peak {methods[-1].peak_bytes / 2**30:.2f} GiB")
        if arena:
            from .arena import isolated_arena_run

            methods.append(isolated_arena_run(name, batch, form, cap, steps, time_limit, cache,
                                              torch.backends.cudnn.benchmark, runs, recordings=arena_recordings))
            log(f"  {methods[-1].method}: {methods[-1].status}, {methods[-1].step_seconds:.3f} s, "
                f"predicted {methods[-1].predicted_seconds:.3f} s, footprint {methods[-1].peak_bytes / 2**30:.2f} GiB")
    for peer in peers:
        if peer == "checkpoint":
            try:
                as_sequential(model)
            except ValueError:
                methods.append(MethodResult("checkpoint_sequential(4)", "not applicable"))
                continue
        st, secs, pk, _ = _measure(_eager(model, opt, x, y, peer), steps, device, cap / total)
        label = "checkpoint_sequential(4)" if peer == "checkpoint" else "save_on_cpu(pin_memory=True)"
        methods.append(MethodResult(label, st if st == "ok" and pk <= cap else (st if st != "ok" else "over the cap"),
                                    secs, pk))
        log(f"  {label}: {st}, {secs:.3f} s, peak {pk / 2**30:.2f} GiB")
    del model, opt, x, y
    hold_device_memory(None)
    result = CaseResult(name, batch, cap_fraction, cap, t_u, peak, t_f, t_b, h2d, d2h, lb, tuple(methods))
    del graph
    return result


def isolated_autotm_run(name: str, batch: int, formulation: str, cap: int, steps: int, time_limit: float,
                        cache: Any, cudnn_benchmark: bool, runs: PlanRuns = PlanRuns()) -> MethodResult:
    """autotm_run in a fresh process (see the module docstring): the workload is built,
    captured and profiled (from the cache) again there."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_autotm_child, name, batch, formulation, cap, steps, time_limit,
                           None if cache is None else str(cache), cudnn_benchmark, runs).result()


def _autotm_child(name: str, batch: int, formulation: str, cap: int, steps: int, time_limit: float,
                  cache: str | None, cudnn_benchmark: bool, runs: PlanRuns = PlanRuns()) -> MethodResult:
    from ..profiler import profile

    torch.backends.cudnn.benchmark = cudnn_benchmark
    device = torch.device("cuda")
    total = torch.cuda.get_device_properties(device).total_memory
    entry = zoo.get(name)
    model, (x,), y = zoo.workload(name, batch, device=device)
    graph = capture(model, (x,), y, lr=entry.lr, device=device, name=name, batch=batch)
    prof = profile(graph, device="cuda", cache=cache, progress=False, cudnn_benchmark=cudnn_benchmark)
    return autotm_run(graph, prof, model, entry.lr, x, y, formulation, cap, total, steps, time_limit,
                      runs=runs, log=lambda m: print(m, flush=True))


def _predicted(m: MethodResult) -> str:
    if m.status != "ok" or math.isnan(m.predicted_seconds):
        return ""
    return f"{m.predicted_seconds:.3f} s ({abs(m.predicted_seconds - m.step_seconds) / m.step_seconds:.1%})"


def markdown(results: list[CaseResult]) -> str:
    """One table: every method per case, time, ratio to unconstrained and to LB, peak."""
    lines = ["| model, batch | cap | method | step time | x unconstrained | x LB | peak | predicted (error) | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.model}, {r.batch} | {r.cap_fraction:.0%} ({r.cap_bytes / 2**30:.1f} GiB) | "
                     f"unconstrained | {r.unconstrained_seconds:.3f} s | 1.00 | | "
                     f"{r.unconstrained_peak / 2**30:.1f} GiB | | ok |")
        lines.append(f"| | | transfer lower bound | {r.lower_bound_seconds:.3f} s | "
                     f"{r.lower_bound_seconds / r.unconstrained_seconds:.2f} | 1.00 | | | |")
        for m in r.methods:
            ok = m.status == "ok"
            lines.append(
                f"| | | {m.method} | {f'{m.step_seconds:.3f} s' if ok else '-'} | "
                f"{f'{m.step_seconds / r.unconstrained_seconds:.2f}' if ok else '-'} | "
                f"{f'{m.step_seconds / r.lower_bound_seconds:.2f}' if ok else '-'} | "
                f"{m.peak_bytes / 2**30:.1f} GiB | {_predicted(m)} | {m.status}{'; ' + m.notes if m.notes else ''} |")
    return "\n".join(lines) + "\n"


def run_oversized(name: str, batch: int, budget: int, *, steps: int = 3, time_limit: float = 120.0,
                  cache: Any = None, formulation: str = "asynchronous", reference_batch: int = 256,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """A step whose unplanned peak exceeds the device: trained under `budget` bytes with an
    autotm plan; compared per sample with the unconstrained step at `reference_batch`."""
    from ..profiler import profile

    device = torch.device("cuda")
    total = torch.cuda.get_device_properties(device).total_memory
    entry = zoo.get(name)
    model, (x,), y = zoo.workload(name, batch, device=device)
    graph = capture(model, (x,), y, lr=entry.lr, device=device, name=name, batch=batch)
    log(f"{name} batch {batch}: unplanned peak {graph.peak_live_bytes / 2**30:.1f} GiB, "
        f"device {total / 2**30:.1f} GiB, budget {budget / 2**30:.1f} GiB")
    prof = profile(graph, device="cuda", cache=cache, progress=False,
                   cudnn_benchmark=torch.backends.cudnn.benchmark)
    r = autotm_run(graph, prof, model, entry.lr, x, y, formulation, budget, total, steps, time_limit, log=log)
    del model, x, y
    hold_device_memory(None)
    ref, (rx,), ry = zoo.workload(name, reference_batch, device=device)
    opt = torch.optim.SGD(ref.parameters(), lr=entry.lr)
    _, t_ref, _, _ = _measure(_eager(ref, opt, rx, ry, "plain"), steps, device, None)
    t_f, t_b = forward_backward_seconds(ref, opt, rx, ry)
    scale = batch / reference_batch
    bw = min(prof.bandwidths.bandwidth(1 << 30, "read"), prof.bandwidths.bandwidth(1 << 30, "write"))
    lb = lower_bound(graph.peak_live_bytes, budget, t_f * scale, t_b * scale, bw)
    del ref, opt, rx, ry
    hold_device_memory(None)
    out = {
        "model": name, "batch": batch, "budget": budget, "predicted_peak": graph.peak_live_bytes,
        "status": r.status, "step_seconds": r.step_seconds, "peak_bytes": r.peak_bytes,
        "predicted_seconds": r.predicted_seconds, "samples_per_second": batch / r.step_seconds,
        "reference_batch": reference_batch, "reference_step_seconds": t_ref,
        "reference_samples_per_second": reference_batch / t_ref, "lower_bound_seconds": lb,
        "formulation": formulation, "extra": r.extra,
    }
    log(f"  {r.status}: {r.step_seconds:.3f} s/step = {out['samples_per_second']:.0f} samples/s against "
        f"{out['reference_samples_per_second']:.0f} unconstrained at batch {reference_batch}; LB {lb:.3f} s")
    return out
