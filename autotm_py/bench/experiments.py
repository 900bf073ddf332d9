"""The paper's CPU experiments (reference 7.2): conventional networks at the common ratios,
the Inception case study over 18 ratios, and the large (about 650 GB) networks against 2LM.

Paper-sized workloads are planned only, with roofline kernel times (`modeled`): timing
their kernels, let alone running them, does not fit a small machine. Small workloads take
their kernel times from the kernel cache and, with `measure`, run every plan for real on
the CPU (slow tensors in the chosen slow tier) and record the measured step time.

Plans are made as the original's runtime ran them, every kernel writing its outputs straight
into the slow tier (optimize(direct_outputs=True)), so that the 0:1 ratio means all of it
there. Run on this runtime, a plan's convolutions make their outputs in fast memory first and
go over its limit by them (optimizer.plan.stages_outputs).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Iterable

from ..graph.types import Graph
from .results import RunRecord, paper_ratio, write_record

#: the paper's common ratios, PMM:DRAM 1:0, 8:1, 4:1, 1:1, 0:1, as ours (fast:slow)
COMMON_RATIOS = ("0:1", "1:8", "1:4", "1:1", "1:0")
#: the case study's DRAM fractions 1/1..1/10, 1/100, 1/80, 1/60, 1/40, 1/20, 2/3, 3/4, 0 as fast:slow
CASE_STUDY_RATIOS = ("1:0", "1:1", "1:2", "1:3", "1:4", "1:5", "1:6", "1:7", "1:8", "1:9", "1:99", "1:79",
                     "1:59", "1:39", "1:19", "2:1", "3:1", "0:1")
CASE_STUDY_MODEL = ("inception_v4", 1024)
#: the large runs' absolute DRAM limit (185 GB of the paper's 192 GB machine)
LARGE_LIMIT_BYTES = 185_000_000_000
CONVENTIONAL_FORMULATIONS = ("static", "synchronous", "asynchronous", "numa")
LARGE_FORMULATIONS = ("static", "synchronous", "2lm")
#: 2LM is a model of a hardware cache: there is no plan to run
NOT_RUNNABLE = ("2lm",)

Log = Callable[[str], None]


@dataclass(frozen=True)
class Limit:
    """A fast-memory limit: a fast:slow ratio of the unplanned peak, or bytes."""

    ratio: str | None = None
    nbytes: int | None = None

    def __post_init__(self) -> None:
        if (self.ratio is None) == (self.nbytes is None):
            raise ValueError("a limit is a ratio or a number of bytes")


@dataclass(frozen=True)
class BenchConfig:
    """How to run one experiment's workloads."""

    experiment: str
    formulations: tuple[str, ...]
    limits: tuple[Limit, ...]
    estimate: bool = True  # roofline kernel times (modeled) instead of the kernel cache
    measure: bool = False  # run each plan for real on this CPU
    steps: int = 1  # timed steps per measured run (after one warm-up)
    time_limit: float = 120.0  # per ILP solve
    gap: float = 0.01
    slow_tier: str | None = "model"
    cache: str | None = None


@dataclass(frozen=True)
class Workload:
    """A zoo model or a `package.module:function` spec at a batch size."""

    model: str
    batch: int | None


def parse_workload(text: str) -> Workload:
    """'vgg19' -> (vgg19, paper batch), 'vgg19:16', 'pkg.mod:fn' or 'pkg.mod:fn:4'."""
    head, sep, tail = text.rpartition(":")
    if sep and tail.isdigit():
        return Workload(head, int(tail))
    return Workload(text, None)


def _machine() -> dict[str, Any]:
    import torch

    return {"cpus": os.cpu_count(), "platform": f"{platform.system()} {platform.machine()}", "torch": torch.__version__}


def _build(w: Workload, device: str) -> tuple[Any, tuple, Any, float, int, str]:
    """(model, inputs, target, lr, batch, name) on `device` (meta: shapes only)."""
    from ..graph import zoo

    if ":" in w.model:
        net, inputs, target = zoo.load_user_workload(w.model, w.batch)
        batch = int(inputs[0].shape[0]) if inputs and inputs[0].dim() else (w.batch or 0)
        return net, tuple(inputs), target, 0.01, batch, w.model
    entry = zoo.get(w.model)
    batch = w.batch
    if batch is None:
        raise ValueError(f"give a batch size for {w.model} (write {w.model}:BATCH)")
    net, inputs, target = zoo.workload(w.model, batch, device=device)
    return net, tuple(inputs), target, entry.lr, batch, w.model


def capture_workload(w: Workload) -> tuple[Graph, float]:
    """The training step's graph (fake tensors, nothing allocated) and its learning rate."""
    from ..graph import capture

    net, inputs, target, lr, batch, name = _build(w, "meta")
    return capture(net, inputs, target, lr=lr, fake=True, device="cpu", name=name, batch=batch), lr


def _profile(graph: Graph, cfg: BenchConfig) -> tuple[Any, str]:
    if cfg.estimate:
        from ..optimizer.roofline import roofline_profile

        return roofline_profile(graph), "roofline estimate (modeled)"
    from ..profiler import profile

    prof = profile(graph, device="cpu", slow_tier=cfg.slow_tier, cache=cfg.cache, progress=False)
    return prof, f"kernel cache, slow tier {cfg.slow_tier or 'default'}" + (" (modeled)" if prof.modeled else "")


def _unplanned(w: Workload) -> Callable[[], float]:
    """A function timing one unplanned (all fast) step, warmed up once. Each measured plan is
    paired with unplanned steps timed just before it, so that load from other processes on
    a shared machine shifts both alike."""
    import torch

    from ..runtime import time_steps, unplanned_step
    from ..runtime.step import spec_from_optimizer

    net, inputs, target, lr, _, _ = _build(w, "cpu")
    run = unplanned_step(net, spec_from_optimizer(None, lr, "cross_entropy"), inputs, target)
    run()
    return lambda: time_steps(run, 1, torch.device("cpu"), warmup=0)[0]


def _measure_plan(plan: Any, w: Workload, steps: int, slow_tier: str | None) -> float:
    import torch

    from ..runtime import compile as compile_plan
    from ..runtime import time_steps
    from ..runtime.step import median

    net, inputs, target, lr, _, _ = _build(w, "cpu")
    step = compile_plan(plan, net, lr=lr, slow_tier=slow_tier)
    try:
        return median(time_steps(lambda: step(inputs, target), steps, torch.device("cpu")))
    finally:
        step.close()


def run_workload(w: Workload, cfg: BenchConfig, *, results: str | None = None,
                 log: Log = lambda s: None) -> list[RunRecord]:
    """Every formulation at every limit of `cfg` on one workload; each record is written to
    `results` as soon as it exists (an interrupted bench keeps what it finished)."""
    from ..optimizer import Infeasible, optimize, verify

    t0 = time.perf_counter()
    graph, _ = capture_workload(w)
    w = Workload(w.model, graph.batch)
    prof, source = _profile(graph, cfg)
    fixed = sum(t.nbytes for t in graph.tensors if t.fixed)
    log(f"{graph.name} {graph.batch}: {len(graph.kernels)} kernels, peak {graph.peak_live_bytes / 1e9:.2f} GB, "
        f"{source}, ready in {time.perf_counter() - t0:.1f} s")
    unplanned = _unplanned(w) if cfg.measure else None
    machine = _machine()
    base = RunRecord(cfg.experiment, graph.name, graph.batch, "", None, None, 0, "ok", source, prof.modeled,
                     graph.peak_live_bytes, graph.io_bytes, fixed, len(graph.kernels),
                     all_fast_seconds=prof.all_fast_seconds, machine=machine)
    out: list[RunRecord] = []
    for lim in cfg.limits:
        for form in cfg.formulations:
            t1 = time.perf_counter()
            rec = replace(base, formulation=form, ratio=lim.ratio,
                          paper_ratio=paper_ratio(lim.ratio) if lim.ratio else None)
            try:
                plan = optimize(graph, prof, formulation=form, ratio=lim.ratio, limit_bytes=lim.nbytes,
                                time_limit=cfg.time_limit, mip_gap=cfg.gap, direct_outputs=True)
                verify(plan, graph, prof)
                rec = replace(rec, limit_bytes=plan.limit_bytes, predicted_seconds=plan.predicted_seconds,
                              all_fast_seconds=plan.all_fast_seconds, slowdown=plan.slowdown,
                              bytes_moved=plan.bytes_moved, peak_fast_bytes=plan.peak_fast_bytes,
                              modeled=plan.modeled, solver=asdict(plan.solver), metrics=dict(plan.metrics))
                if unplanned is not None and form not in NOT_RUNNABLE:
                    fast = statistics.median(unplanned() for _ in range(cfg.steps))
                    rec = replace(rec, measured_seconds=_measure_plan(plan, w, cfg.steps, cfg.slow_tier),
                                  measured_all_fast_seconds=fast, measured_steps=cfg.steps,
                                  slow_tier=cfg.slow_tier)
            except Infeasible as exc:
                rec = replace(rec, status="infeasible", error=str(exc), limit_bytes=_limit(graph, lim))
            except Exception as exc:  # noqa: BLE001 - one failed run must not end the bench; it is recorded
                rec = replace(rec, status="error", error=f"{type(exc).__name__}: {exc}"[:500],
                              limit_bytes=_limit(graph, lim))
            rec = replace(rec, wall_seconds=time.perf_counter() - t1)
            if results is not None:
                write_record(results, rec)
            out.append(rec)
            log(describe(rec))
    return out


def _limit(graph: Graph, lim: Limit) -> int:
    from ..optimizer import limit_from_ratio

    return lim.nbytes if lim.nbytes is not None else limit_from_ratio(graph, lim.ratio)  # type: ignore[arg-type]


def describe(rec: RunRecord) -> str:
    """One line per run for progress logs."""
    where = f"{rec.ratio} (paper {rec.paper_ratio})" if rec.ratio else f"{rec.limit_bytes / 1e9:.0f} GB"
    if not rec.ok:
        return f"  {rec.formulation:12s} at {where}: {rec.status}: {rec.error[:160]}"
    s = rec.solver
    solve = f", solve {s.get('solve_seconds', 0):.1f} s, gap {s.get('gap', 0):.2%}" if s.get("status") != "none" else ""
    meas = f", measured {rec.measured_seconds:.3f} s" if rec.measured else ""
    return (f"  {rec.formulation:12s} at {where}: predicted {rec.predicted_seconds:.4g} s "
            f"(x{rec.slowdown:.3f}{', modeled' if rec.modeled else ''}){meas}{solve}")


def conventional_config(formulations: Iterable[str] = CONVENTIONAL_FORMULATIONS,
                        ratios: Iterable[str] = COMMON_RATIOS, **kw: Any) -> BenchConfig:
    return BenchConfig("conventional", tuple(formulations), tuple(Limit(ratio=r) for r in ratios), **kw)


def case_study_config(formulations: Iterable[str] = ("static", "synchronous"),
                      ratios: Iterable[str] = CASE_STUDY_RATIOS, **kw: Any) -> BenchConfig:
    return BenchConfig("case-study", tuple(formulations), tuple(Limit(ratio=r) for r in ratios), **kw)


def large_config(formulations: Iterable[str] = LARGE_FORMULATIONS, limit_bytes: int = LARGE_LIMIT_BYTES,
                 **kw: Any) -> BenchConfig:
    return BenchConfig("large", tuple(formulations), (Limit(nbytes=limit_bytes),), **kw)
