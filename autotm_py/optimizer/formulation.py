"""Model -> solve -> Plan, shared by the static, synchronous and asynchronous strategies."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Union

import numpy as np

from ..graph.types import Graph
from ..profiler.types import Profile
from .flowgraph import NONE, PMEM, READ, edge_ids, walk
from .ilp import BYTE_UNIT, Model, build_model, trace_paths
from .limits import (Limit, explain_infeasible, infeasible_kernel, is_per_kernel, kernel_limits,
                     plan_workspace)
from .plan import (FAST, PLAN_SCHEMA, SLOW, Move, Plan, SolverStats, TensorPlan, fast_bytes_per_kernel,
                   fixed_tensor_plans, held_bytes_per_kernel, kernel_seconds, plan_metrics, predict_seconds,
                   time_terms)
from .solver import Infeasible, Solution, SolverFailed, solve

# async_candidates="auto": graphs whose ±window holds more than ASYNC_FULL_BELOW overlap
# candidates keep, per interval between two uses of a tensor, the first, the last and the
# ASYNC_CANDIDATES longest kernels (flowgraph.build_flow_graphs); smaller ones keep them all.
# Chosen on the conventional set at 1:4 on 2 shared cores (benchmarks/solve_time.py): vgg19
# 2048 (1.8k candidates) solves unrestricted in seconds; transformer 512 (8.9k) took 124 s
# in one run and missed a 1% gap in 300 s in another; inception_v4 1024 (35k), resnet200 512
# (44k) and densenet264 512 (180k) stay 10-87% from their bound after 300 s unrestricted.
ASYNC_CANDIDATES = 2
ASYNC_FULL_BELOW = 5_000
# Graphs whose window holds more than ASYNC_SMALL_ABOVE candidates also take every
# candidate away from their smallest tensors, those that together hold ASYNC_SMALL_SHARE of
# the free tensors' bytes: they keep their synchronous moves (and their tiers), only the
# overlap goes. Most candidates belong to such tensors (densenet264 512: the 4,831 tensors
# under 49 MiB hold 161k of the 180k), while their copies are short and hold little of the
# fast memory. densenet264 512 at 1:4 with the 2-candidate rule alone: 358k columns, whose
# root LP takes 85 s on 2 cores and whose bound is 0.8% under this rule's solution after
# 300 s (ilp's strengthened z rows included); with this rule too: 180k columns, solved to
# 0.5% in 115 s (synchronous start included). The rule's loss is therefore at most 0.8%
# there (measured, not proven); on a 121-layer DenseNet (batch 256) that both models solve
# it cost 0.7-1.5%. Only densenet264 of the conventional set is above the threshold
# (inception_v4 35k, resnet200 44k candidates).
ASYNC_SMALL_ABOVE = 100_000
ASYNC_SMALL_SHARE = 0.1
# pieces of a spread copy: shares below this are the solver's round-off, not a piece; piece
# boundaries fall on multiples of SLICE_ALIGN bytes in copies of at least ALIGN_FROM bytes
# (each boundary moves a piece's time by at most 2 KiB of copying: 40 ns at 50 GB/s)
SHARE_EPS = 1e-6
SLICE_ALIGN = 4096
ALIGN_FROM = 1 << 20
AsyncCandidates = Union[int, None, str]


@dataclass(frozen=True)
class AsyncRestriction:
    """What an `async_candidates` argument asks of flowgraph.build_flow_graphs."""

    candidates: int | None = None  # longest candidates kept per interval (None: all)
    full_below: int | None = None  # ... only above this many candidates in the window
    small_above: int | None = None  # drop small tensors' candidates above this many
    small_share: float = 0.0  # ... those holding this share of the free bytes


def async_restriction(async_candidates: AsyncCandidates) -> AsyncRestriction:
    """The candidate restriction for an `async_candidates` argument: "auto", a number, or
    None (every candidate)."""
    if async_candidates == "auto":
        return AsyncRestriction(ASYNC_CANDIDATES, ASYNC_FULL_BELOW, ASYNC_SMALL_ABOVE, ASYNC_SMALL_SHARE)
    if async_candidates is None:
        return AsyncRestriction()
    if isinstance(async_candidates, bool) or not isinstance(async_candidates, (int, np.integer)) \
            or async_candidates < 0:
        raise ValueError(f"async_candidates must be 'auto', None or a whole number >= 0, "
                         f"got {async_candidates!r}")
    return AsyncRestriction(int(async_candidates))


def solve_formulation(graph: Graph, profile: Profile, formulation: str, limit_bytes: Limit, *,
                      ratio: str | None = None, time_limit: float = 300.0, mip_gap: float = 0.01,
                      solver: str = "highs", async_window: int = 15,
                      async_candidates: AsyncCandidates = "auto",
                      move_state: bool = False, warm_start: bool = True,
                      refine_seconds: float = 0.0, copy_spans: int = 0, direct_outputs: bool = False) -> Plan:
    """Build and solve one formulation's ILP and return its Plan. `limit_bytes`: one byte
    count, or one per kernel. The asynchronous formulation starts from the synchronous
    optimum (its solve time is included); `async_candidates` restricts its overlap
    candidates ("auto", a number or None: see async_restriction and
    flowgraph.build_flow_graphs). With `refine_seconds`, an asynchronous plan the restriction
    shaped is solved again with every candidate (refine_asynchronous). `copy_spans`
    (asynchronous): an async copy may run in pieces over up to this many kernels
    (ilp.build_model). `direct_outputs`: see Plan.direct_outputs."""
    if copy_spans < 0:
        raise ValueError(f"copy_spans must be 0 or more, got {copy_spans}")
    if formulation != "asynchronous":
        copy_spans = 0
    if copy_spans > 1:
        t0 = time.perf_counter()
        whole = solve_formulation(graph, profile, formulation, limit_bytes, ratio=ratio,
                                  time_limit=time_limit / 2, mip_gap=mip_gap, solver=solver,
                                  async_window=async_window, async_candidates=async_candidates,
                                  move_state=move_state, warm_start=warm_start,
                                  refine_seconds=refine_seconds, direct_outputs=direct_outputs)
        return spread_copies(graph, profile, whole, limit_bytes, copy_spans=copy_spans,
                             seconds=max(time_limit - (time.perf_counter() - t0), 1.0), ratio=ratio,
                             mip_gap=mip_gap, solver=solver)
    limits = kernel_limits(graph, limit_bytes)
    if infeasible_kernel(graph, profile, formulation, limit_bytes, move_state=move_state,
                         direct_outputs=direct_outputs) is not None:
        raise Infeasible(explain_infeasible(graph, profile, formulation, limit_bytes, move_state,
                                            direct_outputs=direct_outputs))
    rule = async_restriction(async_candidates)
    if formulation != "asynchronous":
        rule = AsyncRestriction()
    start = None
    t0 = time.perf_counter()
    if formulation == "asynchronous" and warm_start and solver == "highs":
        # a synchronous plan is an asynchronous one that overlaps nothing: solving it first
        # hands HiGHS an incumbent at once (large async models can otherwise run out of time
        # before their first feasible point)
        try:
            start = solve_formulation(graph, profile, "synchronous", limit_bytes, ratio=ratio,
                                      time_limit=time_limit / 3, mip_gap=mip_gap, solver=solver,
                                      async_window=async_window, move_state=move_state,
                                      direct_outputs=direct_outputs)
        except (Infeasible, SolverFailed):
            start = None
    warm_seconds = time.perf_counter() - t0
    model = build_model(graph, profile, formulation, limits, window=async_window,
                        move_state=move_state, async_candidates=rule.candidates,
                        full_below=rule.full_below, small_above=rule.small_above,
                        small_share=rule.small_share, copy_spans=copy_spans, direct_outputs=direct_outputs)
    x0 = None
    if start is not None:
        x0 = start_vector(model, graph, profile, start)
        if formulation == "asynchronous" and x0 is not None:
            # hand HiGHS the sync plan with its moves overlapped where that is clearly
            # better: large models may not get past their root LP to find such plans
            x1 = start_vector(model, graph, profile, overlap_moves(graph, profile, model, start, limits))
            if x1 is not None and is_feasible(model, x1) and model.c @ x1 < model.c @ x0:
                x0 = x1
    try:
        sol = solve(model, backend=solver, time_limit=max(time_limit - warm_seconds, 1.0),
                    mip_gap=mip_gap, start=x0)
    except Infeasible:
        raise Infeasible(explain_infeasible(graph, profile, formulation, limit_bytes, move_state,
                                            solver_said=True, direct_outputs=direct_outputs)) from None
    if warm_seconds:
        sol = dataclasses.replace(sol, solve_seconds=sol.solve_seconds + warm_seconds)
    plan = plan_from_solution(graph, profile, model, sol, limit_bytes, ratio, move_state, async_window,
                              copy_spans)
    if refine_seconds > 0 and formulation == "asynchronous":
        plan = refine_asynchronous(graph, profile, plan, limit_bytes, seconds=refine_seconds, ratio=ratio,
                                   mip_gap=mip_gap, solver=solver)
    return plan


def refine_asynchronous(graph: Graph, profile: Profile, plan: Plan, limit_bytes: Limit, *, seconds: float,
                        ratio: str | None = None, mip_gap: float = 0.01, solver: str = "highs") -> Plan:
    """An asynchronous `plan` solved with restricted overlap candidates, solved again with
    every candidate of its window for up to `seconds`, starting from it: the better of the two
    (the time spent counts in its solve seconds either way). A plan no restriction shaped is
    returned as it is. On graphs captured on a CPU with an H200's kernel times (ResNet152
    batch 256 under 24.5 GiB), the restricted plan predicted 0.799 s and the refined one
    0.742 s after 137 s on 2 cores; under 9.76 GiB, and on DenseNet201 batch 128 under 12.9
    GiB (704k columns), 150 s found nothing better (1.363 s, 0.506 s); nor did 140 s on the
    H200's own graph of ResNet152 under 24.55 GiB (0.878 s, the plan after one repair)."""
    if plan.async_candidates is None and plan.async_min_bytes is None:
        return plan
    model = build_model(graph, profile, "asynchronous", kernel_limits(graph, limit_bytes), window=plan.async_window,
                        move_state=plan.move_state, copy_spans=plan.copy_spans,
                        direct_outputs=plan.direct_outputs)
    return solve_from(graph, profile, plan, model, limit_bytes, seconds=seconds, ratio=ratio,
                      mip_gap=mip_gap, solver=solver)


def spread_copies(graph: Graph, profile: Profile, plan: Plan, limit_bytes: Limit, *, copy_spans: int,
                  seconds: float, ratio: str | None = None, mip_gap: float = 0.01,
                  solver: str = "highs") -> Plan:
    """An asynchronous `plan` (each copy beside one kernel) solved again with its copies free
    to run in pieces over up to `copy_spans` kernels, for up to `seconds`, starting from it:
    the better of the two. Solved directly, that model's LP is weaker (the chord of max(T,
    copy) no longer bounds a copy that may spread) and HiGHS can end far from the plan solved
    without spans (VGG19 batch 256 under 14.85 GiB on an H200's profile: 0.472 s at a 30% gap
    after 60 s, against 0.398 s without spans in 17 s)."""
    model = build_model(graph, profile, "asynchronous", kernel_limits(graph, limit_bytes),
                        window=plan.async_window, move_state=plan.move_state,
                        async_candidates=plan.async_candidates, async_min_bytes=plan.async_min_bytes,
                        copy_spans=copy_spans, direct_outputs=plan.direct_outputs)
    plan = dataclasses.replace(plan, copy_spans=copy_spans)
    greedy = spread_greedily(graph, profile, model, plan)
    if greedy.predicted_seconds < plan.predicted_seconds:
        plan = greedy
    return solve_from(graph, profile, plan, model, limit_bytes, seconds=seconds, ratio=ratio,
                      mip_gap=mip_gap, solver=solver)


def spread_greedily(graph: Graph, profile: Profile, model: Model, plan: Plan) -> Plan:
    """`plan` with each async copy (in kernel order) poured over the kernels the model lets it
    spread to, filling each up to its kernel's time before the next (a fetch from its
    start on, a write-back from where it leaves back), the rest where it starts: the same
    placements, never a slower step. A start for spread_copies' solve."""
    fg = model.fg
    bw = profile.bandwidths
    span: dict[tuple[int, str, int], list[int]] = {}
    for e, k in zip(model.y_edge.tolist(), model.y_kernel.tolist()):
        key = (int(fg.storages[fg.e_tensor[e]]), "to_fast" if fg.e_kind[e] == READ else "to_slow",
               int(fg.g_kernel[fg.e_gadget[e]]))
        span.setdefault(key, []).append(k)
    ws = plan_workspace(graph, profile, plan)
    room = {k.index: kernel_seconds(profile, k.index, plan.kernel_masks[k.index], int(ws[k.index]))
            for k in graph.compute_kernels}
    moves = []
    for mv in plan.moves:
        secs = bw.move_seconds(mv.nbytes, "read" if mv.direction == "to_fast" else "write", True)
        if mv.kind != "async" or mv.slices:
            if mv.kind == "async":
                for k, share in mv.shares():
                    room[k] -= secs * share
            moves.append(mv)
            continue
        ks = sorted(span.get((mv.storage, mv.direction, mv.kernel), [mv.kernel]))
        # outward from where the copy starts (a fetch) or ends (a write-back), while the
        # plan keeps the tensor in fast memory
        order = ks if mv.direction == "to_fast" else ks[::-1]
        tp = plan.tensor_plan(mv.storage)
        stop = next((i for i, k in enumerate(order) if tp.tier_at(k) != FAST), len(order))
        order = order[:stop] or [mv.kernel]
        left, share = secs, {}
        for k in order:
            put = min(left, max(room[k], 0.0))
            if put > 0:
                share[k] = put
                left -= put
        if left > 0:
            share[mv.kernel] = share.get(mv.kernel, 0.0) + left
        for k, v in share.items():
            room[k] -= v
        ks = np.array(sorted(share), dtype=np.int64)
        moves.append(dataclasses.replace(mv, slices=pieces_of(ks, np.array([share[k] for k in ks.tolist()]),
                                                              mv.nbytes, mv.kernel)))
    predicted = predict_seconds(graph, profile, plan.kernel_masks, moves, plan.workspace)
    # the solver's objective is that of this plan as a point of the model (start_vector)
    return dataclasses.replace(plan, moves=tuple(moves), predicted_seconds=predicted,
                               metrics={**plan.metrics, "predicted_runtime": predicted},
                               solver=dataclasses.replace(plan.solver, objective=predicted))


def solve_from(graph: Graph, profile: Profile, plan: Plan, model: Model, limit_bytes: Limit, *,
               seconds: float, ratio: str | None, mip_gap: float, solver: str) -> Plan:
    """`model` solved for up to `seconds` from `plan` (where its paths are the model's): the
    better plan of the two, with the time spent counted in its solver stats either way."""
    x0 = start_vector(model, graph, profile, plan)
    start = x0 if x0 is not None and is_feasible(model, x0) else None
    t0 = time.perf_counter()
    try:
        sol = solve(model, backend=solver, time_limit=seconds, mip_gap=mip_gap, start=start)
    except (SolverFailed, Infeasible):  # nothing found in time (a start only HiGHS takes)
        sol = None
    spent = dict(build_seconds=plan.solver.build_seconds + model.build_seconds,
                 solve_seconds=plan.solver.solve_seconds + time.perf_counter() - t0)
    keep = plan
    if sol is not None:
        better = plan_from_solution(graph, profile, model, sol, limit_bytes, ratio, plan.move_state,
                                    plan.async_window, plan.copy_spans)
        if better.predicted_seconds < plan.predicted_seconds:
            keep = better
    return dataclasses.replace(keep, solver=dataclasses.replace(keep.solver, **spent))


def start_vector(model: Model, graph: Graph, profile: Profile, plan: Plan) -> np.ndarray | None:
    """The model's column values for an existing plan whose paths exist in this model's
    flow graphs (e.g. a synchronous plan in the asynchronous model); None if they do not."""
    fg = model.fg
    x = np.zeros(model.num_cols)
    pairs: list[tuple[int, int]] = []
    for p, s in enumerate(fg.storages.tolist()):
        tp = plan.tensor_plan(s)
        tiers = []
        for k in fg.g_kernel[fg.g_ptr[p]:fg.g_ptr[p + 1]].tolist():
            seg = next((sg for sg in tp.segments if sg[0] == k), None)
            if seg is None:  # a gadget the plan does not have: nothing happens there
                t = tp.tier_at(k) == FAST
                tiers.append((t, t))
            else:
                tiers.append((seg[1] == FAST, seg[2] == FAST))
        path = walk(fg, p, tp.initial == FAST, tiers)
        if path is None:
            return None
        pairs += path
    edges = edge_ids(fg, pairs)
    if (edges < 0).any():
        return None
    x[edges] = 1.0
    choice = model.cfg_col >= 0
    for k, m, c in zip(model.cfg_kernel[choice].tolist(), model.cfg_mask[choice].tolist(),
                       model.cfg_col[choice].tolist()):
        x[c] = 1.0 if plan.kernel_masks[k] == m else 0.0
    free_plans = [plan.tensor_plan(int(s)) for s in fg.storages]
    fb = fast_bytes_per_kernel(graph, free_plans)
    x[model.m_col0:model.m_col0 + len(model.nonview)] = fb[model.nonview] / BYTE_UNIT
    ws = plan_workspace(graph, profile, plan)
    x[model.ws_col] = 1.0  # a group takes a room step only where all its kernels have that room
    np.minimum.at(x, model.ws_col, (ws[model.ws_kernel] >= model.ws_reach) * 1.0)
    _, load, _ = time_terms(graph, profile, plan.kernel_masks, plan.moves, ws)
    if len(model.y_col):
        # a spread edge's shares: the plan's pieces, or the whole copy at its own kernel
        share = {}
        for mv in plan.moves:
            if mv.kind == "async":
                for k, part in mv.shares():
                    share[(mv.storage, mv.direction, mv.kernel, k)] = part
        for e, k, col in zip(model.y_edge.tolist(), model.y_kernel.tolist(), model.y_col.tolist()):
            if x[e] > 0.5:
                key = (int(fg.storages[fg.e_tensor[e]]), "to_fast" if fg.e_kind[e] == READ else "to_slow",
                       int(fg.g_kernel[fg.e_gadget[e]]), k)
                x[col] = share.get(key, 0.0)
        got = np.zeros(fg.num_edges)
        np.add.at(got, model.y_edge, x[model.y_col])
        if not np.allclose(got[model.y_edge], x[model.y_edge]):
            return None  # pieces this model does not allow
    for k, c in zip(model.z_kernel.tolist(), model.z_col.tolist()):
        x[c] = max(kernel_seconds(profile, k, plan.kernel_masks[k], int(ws[k])), load.get(k, 0.0))
    return x


def overlap_moves(graph: Graph, profile: Profile, model: Model, plan: Plan,
                  limits: np.ndarray) -> Plan:
    """A greedy asynchronous version of a synchronous `plan`: each sync move, costliest
    first, becomes an async move at the candidate kernel of its interval (between the
    neighbouring uses) that saves the most time, if the tensor then fits in fast memory at
    every kernel it newly occupies (a fetch brought forward, a write-back put off).
    Only a start for the solver; the returned Plan carries tensors and moves, nothing else
    is updated."""
    fg = model.fg
    bw = profile.bandwidths
    pos_of = {int(s): p for p, s in enumerate(fg.storages)}
    K = len(graph.kernels)
    ws = plan_workspace(graph, profile, plan)
    room = limits - ws - held_bytes_per_kernel(graph, plan.tensors, plan.direct_outputs)  # bytes free at each kernel
    ktime = np.zeros(K)
    for k in graph.compute_kernels:
        ktime[k.index] = kernel_seconds(profile, k.index, plan.kernel_masks[k.index], int(ws[k.index]))
    load = np.zeros(K)
    added: dict[int, list[tuple[int, int]]] = {}  # storage -> kernel ranges made fast
    kept: list[Move] = []
    new: list[Move] = []
    order = sorted(plan.moves, key=lambda mv: -bw.move_seconds(
        mv.nbytes, "read" if mv.direction == "to_fast" else "write", mv.kind == "async"))
    for mv in order:
        p = pos_of.get(mv.storage)
        if mv.kind != "sync" or p is None or not fg.has_producer[p]:
            kept.append(mv)
            continue
        gk = fg.g_kernel[fg.g_ptr[p]:fg.g_ptr[p + 1]]
        ga = fg.g_async[fg.g_ptr[p]:fg.g_ptr[p + 1]]
        users = gk[~ga]
        read = mv.direction == "to_fast"
        d = "read" if read else "write"
        saved = bw.move_seconds(mv.nbytes, d, False)
        lag = bw.move_seconds(mv.nbytes, d, True)
        i = int(np.searchsorted(users, mv.kernel))
        lo, hi = (users[i - 1], mv.kernel) if read else (mv.kernel, users[i + 1] if i + 1 < len(users) else K)
        best = None
        for j in gk[ga & (gk > lo) & (gk < hi)].tolist():
            a, b = (j, mv.kernel - 1) if read else (mv.kernel + 1, j)  # newly fast kernels
            if any(x <= b and a <= y for x, y in added.get(mv.storage, ())):
                continue
            if room[a:b + 1].min(initial=np.iinfo(np.int64).max) < mv.nbytes:
                continue
            gain = saved - (max(ktime[j], load[j] + lag) - max(ktime[j], load[j]))
            if gain > 1e-12 and (best is None or gain > best[0] + 1e-15):
                best = (gain, j, a, b)
        if best is None:
            kept.append(mv)
            continue
        _, j, a, b = best
        room[a:b + 1] -= mv.nbytes
        load[j] += lag
        added.setdefault(mv.storage, []).append((a, b))
        new.append(Move(mv.storage, mv.direction, "async", j, mv.nbytes))
    tensors = []
    for tp in plan.tensors:
        ranges = added.get(tp.storage)
        if not ranges:
            tensors.append(tp)
            continue
        t = graph.tensors[tp.storage]
        p = pos_of[tp.storage]

        def fast(k: int) -> bool:
            return tp.tier_at(k) == FAST or any(x <= k <= y for x, y in ranges)

        segs = []
        for k in fg.g_kernel[fg.g_ptr[p]:fg.g_ptr[p + 1]].tolist():
            during = fast(k)
            after = fast(k + 1) if k + 1 <= t.last else during
            segs.append((k, FAST if during else SLOW, FAST if after else SLOW))
        tensors.append(TensorPlan(tp.storage, tp.initial, tuple(segs)))
    return dataclasses.replace(plan, formulation="asynchronous", tensors=tuple(tensors),
                               moves=tuple(sorted(kept + new, key=lambda mv: (mv.kernel, mv.storage))))


def is_feasible(model: Model, x: np.ndarray, tol: float = 1e-9) -> bool:
    """Does x satisfy every row and column bound of the model?"""
    ax = np.zeros(model.num_rows)
    rows = np.repeat(np.arange(model.num_rows), np.diff(model.a_start))
    np.add.at(ax, rows, model.a_value * x[model.a_index])
    scale = np.maximum(1.0, np.abs(ax))
    return bool(((ax >= model.row_lower - tol * scale) & (ax <= model.row_upper + tol * scale)).all()
                and ((x >= model.col_lower - tol) & (x <= model.col_upper + tol)).all())


def slices_of(model: Model, x: np.ndarray, sel: np.ndarray, edge: int,
              nbytes: int) -> tuple[tuple[int, int], ...]:
    """The (kernel, bytes) pieces of a spread copy edge from its share columns in x (`sel`:
    the edge's entries of model.y_edge); () when it runs whole at its own kernel. Shares
    under SHARE_EPS are left out and the rest rescaled; bytes are whole SLICE_ALIGN
    multiples, the last piece takes the remainder."""
    if not len(sel):
        return ()
    shares = np.clip(x[model.y_col[sel]], 0.0, None)
    keep = shares >= SHARE_EPS
    return pieces_of(model.y_kernel[sel][keep], shares[keep], nbytes,
                     int(model.fg.g_kernel[model.fg.e_gadget[edge]]))


def pieces_of(kernels: np.ndarray, shares: np.ndarray, nbytes: int, own: int) -> tuple[tuple[int, int], ...]:
    """Move.slices for a copy of `nbytes` split over `kernels` in proportion to `shares`: in
    kernel order, boundaries on SLICE_ALIGN multiples (copies of ALIGN_FROM bytes or more);
    () when everything lands at the copy's own kernel."""
    if not len(kernels):
        return ()
    order = np.argsort(kernels)
    ks, shares = kernels[order], shares[order] / shares.sum()
    align = SLICE_ALIGN if nbytes >= ALIGN_FROM else 1
    cuts = np.round(np.cumsum(shares)[:-1] * nbytes / align).astype(np.int64) * align
    bounds = np.r_[0, np.clip(cuts, 0, nbytes), nbytes]
    out = tuple((int(k), int(b - a)) for k, a, b in zip(ks, bounds[:-1], bounds[1:]) if b > a)
    return () if len(out) == 1 and out[0][0] == own else out


def plan_from_solution(graph: Graph, profile: Profile, model: Model, sol: Solution,
                       limit_bytes: Limit, ratio: str | None, move_state: bool,
                       async_window: int, copy_spans: int = 0) -> Plan:
    fg = model.fg
    x = np.round(sol.x)
    paths = trace_paths(model, x)
    tensors: list[TensorPlan] = []
    moves: list[Move] = []
    Q = fg.num_gadgets
    by_edge = np.argsort(model.y_edge, kind="stable")
    edge_lo = np.searchsorted(model.y_edge[by_edge], np.arange(fg.num_edges))
    edge_hi = np.searchsorted(model.y_edge[by_edge], np.arange(fg.num_edges), side="right")
    for p, path in enumerate(paths):
        storage = int(fg.storages[p])
        nb = int(fg.nbytes[p])
        dst = fg.e_dst[path]
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
                              int(fg.g_kernel[fg.e_gadget[e]]), nb,
                              slices_of(model, sol.x, by_edge[edge_lo[e]:edge_hi[e]], int(e), nb)
                              if fg.e_async[e] else ()))
    masks = [0] * len(graph.kernels)
    chosen = model.cfg_col < 0
    chosen[~chosen] = x[model.cfg_col[~chosen]] > 0.5
    for k, m in zip(model.cfg_kernel[chosen].tolist(), model.cfg_mask[chosen].tolist()):
        masks[k] = m
    free = set(int(s) for s in fg.storages)
    all_plans = tuple(sorted(tensors + fixed_tensor_plans(graph, free), key=lambda t: t.storage))
    moves.sort(key=lambda mv: (mv.kernel, mv.storage))
    workspace = model.workspace(x)
    predicted = predict_seconds(graph, profile, masks, moves, workspace)
    stats = SolverStats(model.build_seconds, sol.solve_seconds, sol.status, sol.gap, sol.objective,
                        model.num_cols, model.num_rows, model.num_nonzeros, sol.backend)
    limits = kernel_limits(graph, limit_bytes)
    top = int(limits.max()) if len(limits) else int(np.max(limit_bytes, initial=0))
    return Plan(
        PLAN_SCHEMA, graph.fingerprint, graph.name, fg.formulation, profile.device, top,
        ratio, all_plans, tuple(moves), tuple(masks),
        tuple(int(b) for b in held_bytes_per_kernel(graph, all_plans, model.direct_outputs)), predicted,
        profile.all_fast_seconds, bool(profile.modeled), stats,
        plan_metrics(graph, profile, all_plans, moves, top, ratio, predicted),
        move_state, async_window, fg.async_candidates,
        tuple(int(b) for b in limits) if is_per_kernel(limit_bytes) else None,
        fg.async_min_bytes, tuple(int(b) for b in workspace), copy_spans, model.direct_outputs,
    )
