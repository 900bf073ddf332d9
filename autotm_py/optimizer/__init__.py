"""Stage 3: Graph + Profile -> Plan. The AutoTM ILP in three formulations (static,
synchronous, asynchronous) solved with HiGHS (or CBC), and two baselines (first-touch NUMA,
2LM memory mode), all returning the same Plan."""

from __future__ import annotations

from ..graph.types import Graph
from ..profiler.types import Profile
from .formulation import (ASYNC_CANDIDATES, ASYNC_FULL_BELOW, ASYNC_SMALL_ABOVE, ASYNC_SMALL_SHARE,
                          AsyncCandidates)
from .limits import Limit, is_per_kernel, kernel_limits, limit_from_ratio, minimum_fast_bytes, parse_ratio
from .plan import Move, Plan, SolverStats, TensorPlan
from .solver import Infeasible, SolverFailed
from .verify import VerificationError, verify

ILP_FORMULATIONS = ("static", "synchronous", "asynchronous")
FORMULATIONS = ILP_FORMULATIONS + ("numa", "2lm")


def optimize(graph: Graph, profile: Profile, *, formulation: str = "synchronous",
             limit_bytes: Limit | None = None, ratio: str | None = None, time_limit: float = 300.0,
             mip_gap: float = 0.01, solver: str = "highs", async_window: int = 15,
             async_candidates: AsyncCandidates = "auto", move_state: bool = False,
             refine_seconds: float = 0.0, copy_spans: int = 0, direct_outputs: bool = False) -> Plan:
    """Place and move every tensor of `graph` under a fast-memory limit: bytes (an int for
    every kernel, or a sequence with one int per kernel of `graph`, for the ILP
    formulations), or a fast:slow `ratio` of the unplanned peak such as "1:4".
    `async_candidates`: the asynchronous formulation's overlap candidates per interval
    between two uses of a tensor: the first, the last and this many longest kernels of the
    window; None: every kernel of the window; "auto": ASYNC_CANDIDATES on graphs whose
    window holds more than ASYNC_FULL_BELOW candidates, else every one; above
    ASYNC_SMALL_ABOVE candidates, also none for the smallest tensors holding
    ASYNC_SMALL_SHARE of the free bytes (Plan.async_min_bytes). `refine_seconds`: where that
    restriction shaped an asynchronous plan, up to this many more seconds solving with every
    candidate, from that plan (formulation.refine_asynchronous). `copy_spans`: in the
    asynchronous formulation, each async copy may run in pieces beside up to this many
    kernels (a fetch from its start up to the tensor's next use, a write-back from the
    tensor's last write up to where it leaves), instead of beside one kernel (0).
    `direct_outputs`: plan as if every kernel wrote its outputs straight into the slow tier,
    as the original's runtime did (the paper's experiments). This runtime makes the outputs of
    convolutions and other ops without an out= overload of their own in fast memory and
    copies them (plan.stages_outputs); by default a CPU plan counts them there, so its step
    stays within the limit."""
    if profile.graph_fingerprint != graph.fingerprint:
        raise ValueError("the profile was made for another graph; profile this workload again")
    if (limit_bytes is None) == (ratio is None):
        raise ValueError("give exactly one fast-memory limit: limit_bytes or ratio")
    if refine_seconds < 0:
        raise ValueError(f"refine_seconds must be 0 or more, got {refine_seconds}")
    if ratio is not None:
        limit_bytes = limit_from_ratio(graph, ratio, move_state=move_state)
    assert limit_bytes is not None
    kernel_limits(graph, limit_bytes)  # validates: whole, non-negative, one per kernel
    if formulation in ILP_FORMULATIONS:
        from .formulation import solve_formulation

        return solve_formulation(graph, profile, formulation, limit_bytes, ratio=ratio,
                                 time_limit=time_limit, mip_gap=mip_gap, solver=solver,
                                 async_window=async_window, async_candidates=async_candidates,
                                 move_state=move_state, refine_seconds=refine_seconds,
                                 copy_spans=copy_spans, direct_outputs=direct_outputs)
    if formulation in ("numa", "2lm") and is_per_kernel(limit_bytes):
        raise ValueError(f"the {formulation} baseline takes one fast-memory limit, not one per "
                         "kernel; per-kernel limits apply to static, synchronous and asynchronous")
    if formulation == "numa":
        from .numa import optimize_numa

        return optimize_numa(graph, profile, int(limit_bytes), ratio=ratio)  # type: ignore[arg-type]
    if formulation == "2lm":
        from .twolm import optimize_2lm

        return optimize_2lm(graph, profile, int(limit_bytes), ratio=ratio)  # type: ignore[arg-type]
    raise ValueError(f"unknown formulation {formulation!r}; choose one of {', '.join(FORMULATIONS)}")


__all__ = [
    "ASYNC_CANDIDATES", "ASYNC_FULL_BELOW", "ASYNC_SMALL_ABOVE", "ASYNC_SMALL_SHARE", "FORMULATIONS", "ILP_FORMULATIONS", "Infeasible", "Move",
    "Plan", "SolverFailed",
    "SolverStats", "TensorPlan", "VerificationError", "limit_from_ratio", "minimum_fast_bytes",
    "optimize", "parse_ratio", "verify",
]
