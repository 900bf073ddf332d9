"""Model -> solve -> Plan, shared by the static, synchronous and asynchronous strategies."""

from __future__ import annotations

import numpy as np

from ..graph.types import Graph
from ..profiler.types import Profile
from .flowgraph import NONE, PMEM, READ
from .ilp import Model, build_model, trace_paths
from .limits import explain_infeasible, minimum_fast_bytes
from .plan import (FAST, PLAN_SCHEMA, SLOW, Move, Plan, SolverStats, TensorPlan,
                   fast_bytes_per_kernel, fixed_tensor_plans, plan_metrics, predict_seconds)
from .solver import Infeasible, Solution, solve


def solve_formulation(graph: Graph, profile: Profile, formulation: str, limit_bytes: int, *,
                      ratio: str | None = None, time_limit: float = 300.0, mip_gap: float = 0.01,
                      solver: str = "highs", async_window: int = 15,
                      move_state: bool = False) -> Plan:
    """Build and solve one formulation's ILP and return its Plan."""
    need, _ = minimum_fast_bytes(graph, profile, formulation, move_state=move_state)
    if limit_bytes < need:
        raise Infeasible(explain_infeasible(graph, profile, formulation, limit_bytes, move_state))
    model = build_model(graph, profile, formulation, limit_bytes, window=async_window,
                        move_state=move_state)
    try:
        sol = solve(model, backend=solver, time_limit=time_limit, mip_gap=mip_gap)
    except Infeasible:
        raise Infeasible(explain_infeasible(graph, profile, formulation, limit_bytes, move_state,
                                            solver_said=True)) from None
    return plan_from_solution(graph, profile, model, sol, limit_bytes, ratio, move_state, async_window)


def plan_from_solution(graph: Graph, profile: Profile, model: Model, sol: Solution,
                       limit_bytes: int, ratio: str | None, move_state: bool,
                       async_window: int) -> Plan:
    fg = model.fg
    x = np.round(sol.x)
    paths = trace_paths(model, x)
    tensors: list[TensorPlan] = []
    moves: list[Move] = []
    Q = fg.num_gadgets
    for p, path in enumerate(paths):
        storage = int(fg.storages[p])
        nb = int(fg.nbytes[p])
        dst = fg.e_dst[path]
        src = fg.e_src[path]
        initial = SLOW if dst[0] % 3 == PMEM else FAST
        segs: list[tuple[int, str, str]] = []
        # the during-vertex of gadget q is the last path vertex of q; its out-edge says "after"
        for i in range(len(path) - 1):
            v, w = int(dst[i]), int(dst[i + 1])
            if v // 3 == w // 3 and w < 3 * Q:
                continue  # a read inside the gadget: PMEM(q) -> DRAM(q)
            q = v // 3
            during = SLOW if v % 3 == PMEM else FAST
            after = FAST if (w < 3 * Q and w % 3 != PMEM) or (w >= 3 * Q and during == FAST) else SLOW
            segs.append((int(fg.g_kernel[q]), during, after))
        tensors.append(TensorPlan(storage, initial, tuple(segs)))
        for e in path[fg.e_kind[path] != NONE]:
            moves.append(Move(storage, "to_fast" if fg.e_kind[e] == READ else "to_slow",
                              "async" if fg.e_async[e] else "sync",
                              int(fg.g_kernel[fg.e_gadget[e]]), nb))
        del src
    masks = [0] * len(graph.kernels)
    chosen = model.cfg_col < 0
    chosen[~chosen] = x[model.cfg_col[~chosen]] > 0.5
    for k, m in zip(model.cfg_kernel[chosen].tolist(), model.cfg_mask[chosen].tolist()):
        masks[k] = m
    free = set(int(s) for s in fg.storages)
    all_plans = tuple(sorted(tensors + fixed_tensor_plans(graph, free), key=lambda t: t.storage))
    moves.sort(key=lambda mv: (mv.kernel, mv.storage))
    predicted = predict_seconds(graph, profile, masks, moves)
    stats = SolverStats(model.build_seconds, sol.solve_seconds, sol.status, sol.gap, sol.objective,
                        model.num_cols, model.num_rows, model.num_nonzeros, sol.backend)
    return Plan(
        PLAN_SCHEMA, graph.fingerprint, graph.name, fg.formulation, profile.device, int(limit_bytes),
        ratio, all_plans, tuple(moves), tuple(masks),
        tuple(int(b) for b in fast_bytes_per_kernel(graph, all_plans)), predicted,
        profile.all_fast_seconds, bool(profile.modeled), stats,
        plan_metrics(graph, profile, all_plans, moves, limit_bytes, ratio, predicted),
        move_state, async_window,
    )
