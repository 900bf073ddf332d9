"""Asynchronous AutoTM: as synchronous, plus moves that overlap a kernel within `window`
non-view positions of a user; each such kernel costs max(its time, its async copies)."""

from __future__ import annotations

from ..graph.types import Graph
from ..profiler.types import Profile
from .formulation import AsyncCandidates, solve_formulation
from .limits import Limit
from .plan import Plan


def optimize_asynchronous(graph: Graph, profile: Profile, limit_bytes: Limit, *, ratio: str | None = None,
                          time_limit: float = 300.0, mip_gap: float = 0.01, solver: str = "highs",
                          async_window: int = 15, async_candidates: AsyncCandidates = "auto",
                          move_state: bool = False, refine_seconds: float = 0.0) -> Plan:
    """Solve the asynchronous formulation under `limit_bytes` of fast memory."""
    return solve_formulation(graph, profile, "asynchronous", limit_bytes, ratio=ratio,
                             time_limit=time_limit, mip_gap=mip_gap, solver=solver,
                             async_window=async_window, async_candidates=async_candidates,
                             move_state=move_state, refine_seconds=refine_seconds)
