"""Static AutoTM: each tensor picks one tier when it is produced and keeps it (no moves)."""

from __future__ import annotations

from ..graph.types import Graph
from ..profiler.types import Profile
from .formulation import solve_formulation
from .limits import Limit
from .plan import Plan


def optimize_static(graph: Graph, profile: Profile, limit_bytes: Limit, *, ratio: str | None = None,
                    time_limit: float = 300.0, mip_gap: float = 0.01, solver: str = "highs",
                    async_window: int = 15, move_state: bool = False) -> Plan:
    """Solve the static formulation under `limit_bytes` of fast memory."""
    return solve_formulation(graph, profile, "static", limit_bytes, ratio=ratio,
                             time_limit=time_limit, mip_gap=mip_gap, solver=solver,
                             async_window=async_window, move_state=move_state)
