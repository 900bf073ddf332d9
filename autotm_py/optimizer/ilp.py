"""The AutoTM ILP (reference section 4) as sparse arrays, shared by the three formulations.

Columns: one binary per flow-graph edge (x), one binary per allowed IO configuration of a
kernel that has a choice (cfg), one continuous fast-memory total per non-view kernel (M),
and in the asynchronous formulation one continuous time per kernel that async moves
overlap (z). Differences from the original, each on purpose:

* in_fast / in_fast_post are sums of mutually exclusive edge variables of one path, so
  they need no OR variables or linearisation rows (reference 8.14);
* configuration choice is one equality per (kernel, free storage):
  sum of cfg with the storage fast == in_fast(t, n), plus sum cfg == 1. This is exact and
  tighter than the original's AND linearisation. On CUDA (or where only mask 0 is
  allowed) there are no cfg variables: in_fast(t, n) == 1 directly;
* the capacity uses bytes (no MB rounding) and counts fixed tensors (parameters, inputs,
  optimizer state) as constants. It is written as a running total, M[k] = M[k-1] + the
  tensors whose in-fast expression changes at k, with M[k] <= limit[k] - fixed bytes live at k
  as a column bound. That is the same polytope as one row per kernel over its whole live
  set, with O(gadgets) instead of O(kernels x live tensors) nonzeros;
* each write edge pays its own cost (without in-place writers a path writes at most once,
  so this equals the original's write[t]);
* cuDNN workspaces (CUDA) need room beside the live tensors: a fixed room per kernel
  (limits.kernel_workspace), and where the profile holds a kernel's time without its
  workspace as well as with it, binaries w_1 >= ... >= w_n per group of kernels of one
  signature (cuDNN keeps one algorithm per convolution shape), one per larger room the
  kernel was timed with (partial rooms, then the whole workspace): w_j = 1 adds the bytes
  from room j-1 to room j at each of them (M[k] + those bytes <= the M column's bound) and
  the time saved from one to the other; all w = 0 is the small room and the time without.
  The original had no workspaces (its GPU path reserved cuDNN's once, outside the model);
* a kernel with async copies has, beside z >= T and z >= the sum of its copies, the valid
  row z >= tmin + sum of (copy - tmin) x over its copies longer than tmin (its fastest
  configuration): the convex hull of max(T, copy) for one copy. Without it the LP relaxation
  spreads a long copy in fractions over several kernels, each hiding a part, and its bound
  stays far below any plan on large graphs (densenet264 512 at 1:4: root LP 21.9 s of step
  time against 23.3 s with the row).

The objective is in seconds (the solver module may scale it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..graph.types import Graph
from ..profiler.types import Profile
from .limits import kernel_limits, kernel_workspace
from .plan import kernel_seconds, stages_outputs
from .flowgraph import (NONE, READ, WRITE, FlowGraphs, build_flow_graphs, candidate_seconds,
                        fast_expression_ids, gadget_expressions)
from .flowgraph import copy_spans as copy_span_pieces

# capacity rows count MiB (exact float division, no rounding) so that their coefficients sit
# near the flow rows' 1s; every number outside the model stays in bytes
BYTE_UNIT = float(2**20)
# the async rows z >= T and z >= copies count milliseconds (z itself stays in seconds)
ROW_TIME_UNIT = 1e3


@dataclass(frozen=True, eq=False)
class Model:
    """min c.x + offset  s.t.  row_lower <= A x <= row_upper, col bounds, integrality."""

    c: np.ndarray
    offset: float
    col_lower: np.ndarray
    col_upper: np.ndarray
    integrality: np.ndarray  # bool, True = integer
    a_start: np.ndarray  # CSR by rows
    a_index: np.ndarray
    a_value: np.ndarray
    row_lower: np.ndarray
    row_upper: np.ndarray
    # bookkeeping for decoding a solution
    fg: FlowGraphs
    cfg_kernel: np.ndarray  # per allowed configuration: kernel, mask, column (-1 = constant)
    cfg_mask: np.ndarray  # object array of Python ints
    cfg_col: np.ndarray
    m_col0: int  # first M column; M of non-view kernel j is m_col0 + j
    nonview: np.ndarray  # kernel index of each non-view position
    z_kernel: np.ndarray  # kernels with a z column, and the columns
    z_col: np.ndarray
    build_seconds: float
    ws_base: np.ndarray  # per kernel: workspace bytes always reserved
    # one entry per (kernel, room step) of a workspace choice: the kernel, its group's step
    # column, the bytes the step adds and the room the kernel has once it is taken
    ws_kernel: np.ndarray
    ws_col: np.ndarray
    ws_bytes: np.ndarray
    ws_reach: np.ndarray
    # copies that may run in pieces (copy_spans): per piece its edge, kernel and share column
    y_edge: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    y_kernel: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    y_col: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    direct_outputs: bool = False  # no staging rows (plan.Plan.direct_outputs)

    def workspace(self, x: np.ndarray) -> np.ndarray:
        """Workspace bytes a solution reserves at each kernel."""
        out = self.ws_base.copy()
        np.add.at(out, self.ws_kernel, self.ws_bytes * (x[self.ws_col] > 0.5))
        return out

    @property
    def num_cols(self) -> int:
        return len(self.c)

    @property
    def num_rows(self) -> int:
        return len(self.row_lower)

    @property
    def num_nonzeros(self) -> int:
        return len(self.a_value)


class _Rows:
    """Accumulates constraint blocks as COO arrays (no Python object per constraint)."""

    def __init__(self) -> None:
        self.n = 0
        self.r: list[np.ndarray] = []
        self.c: list[np.ndarray] = []
        self.v: list[np.ndarray] = []
        self.lo: list[np.ndarray] = []
        self.hi: list[np.ndarray] = []

    def new(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        lo = np.asarray(lo, dtype=float)
        hi = np.broadcast_to(np.asarray(hi, dtype=float), lo.shape)
        ids = np.arange(self.n, self.n + len(lo))
        self.n += len(lo)
        self.lo.append(lo)
        self.hi.append(np.array(hi))
        return ids

    def add(self, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        self.r.append(rows)
        self.c.append(np.asarray(cols, dtype=np.int64))
        self.v.append(np.broadcast_to(np.asarray(vals, dtype=float), rows.shape).copy())

    def csr(self, num_cols: int) -> tuple[np.ndarray, ...]:
        r = np.concatenate(self.r) if self.r else np.zeros(0, np.int64)
        c = np.concatenate(self.c) if self.c else np.zeros(0, np.int64)
        v = np.concatenate(self.v) if self.v else np.zeros(0)
        key = r * num_cols + c
        order = np.argsort(key, kind="stable")
        key, v = key[order], v[order]
        uniq, first = np.unique(key, return_index=True)
        vals = np.add.reduceat(v, first) if len(v) else v  # duplicate entries summed
        keep = vals != 0
        uniq, vals = uniq[keep], vals[keep]
        rows, cols = uniq // num_cols, uniq % num_cols
        start = np.zeros(self.n + 1, dtype=np.int64)
        np.add.at(start, rows + 1, 1)
        np.cumsum(start, out=start)
        lo = np.concatenate(self.lo) if self.lo else np.zeros(0)
        hi = np.concatenate(self.hi) if self.hi else np.zeros(0)
        return start, cols.astype(np.int32), vals, lo, hi


def _ranges(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every position of the ranges [lo[i], hi[i]): returns (i of each position, position)."""
    lens = np.maximum(hi - lo, 0)
    owner = np.repeat(np.arange(len(lo)), lens)
    offs = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
    return owner, lo[owner] + offs


def _expand(ptr: np.ndarray, items: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each id, the CSR items: returns (index into ids for each item, item)."""
    owner, at = _ranges(ptr[ids], ptr[ids + 1])
    return owner, items[at]


def allowed_masks(graph: Graph, profile: Profile, kernel: int, free: set[int]) -> list[int]:
    """Profiled masks of a kernel in which only free storages are slow (CUDA: mask 0)."""
    kc = profile.kernels[kernel]
    if profile.device == "cuda":
        return [0]
    slowable = 0
    for j, s in enumerate(kc.storages):
        if s in free:
            slowable |= 1 << j
    return [m for m in kc.masks if m & ~slowable == 0]


def fixed_live_bytes(graph: Graph, free: np.ndarray) -> np.ndarray:
    """Bytes of non-free (fixed) tensors live at each kernel."""
    mask = np.ones(len(graph.tensors), dtype=bool)
    mask[free] = False
    delta = np.zeros(len(graph.kernels) + 1, dtype=np.int64)
    for t in graph.tensors:
        if mask[t.id] and t.nbytes:
            delta[t.first] += t.nbytes
            delta[t.last + 1] -= t.nbytes
    return np.cumsum(delta[:-1])


def move_costs(fg: FlowGraphs, profile: Profile) -> np.ndarray:
    """Seconds of the copy each edge stands for (0 for plain edges)."""
    bw = profile.bandwidths
    cost = np.zeros(fg.num_edges)
    for kind, direction in ((READ, "read"), (WRITE, "write")):
        for asy in (False, True):
            sel = np.flatnonzero((fg.e_kind == kind) & (fg.e_async == asy))
            if len(sel):
                per_tensor = {}
                for p in np.unique(fg.e_tensor[sel]).tolist():
                    per_tensor[p] = bw.move_seconds(int(fg.nbytes[p]), direction, asy)
                cost[sel] = [per_tensor[p] for p in fg.e_tensor[sel].tolist()]
    return cost


def _staging_rows(graph: Graph, fg: FlowGraphs, rows: _Rows, nonview: np.ndarray, m_col0: int,
                  m_hi: np.ndarray, eptr: np.ndarray, eitems: np.ndarray) -> None:
    """On CPU most kernels make their outputs in fast memory, and the runtime copies one the
    plan sends to the slow tier after the kernel (plan.stages_outputs): at its producer it
    takes fast memory in either tier. Per such kernel: M[k] + the sum over its new outputs of
    bytes x (1 - in_fast) <= the M column's bound."""
    producer = np.array([-1 if graph.tensors[int(s)].producer is None else graph.tensors[int(s)].producer
                         for s in fg.storages], dtype=np.int64)
    p = np.flatnonzero((producer >= 0) & (fg.nbytes > 0))
    p = p[np.isin(producer[p], nonview)]
    p = p[[stages_outputs(graph.kernels[int(k)]) for k in producer[p]]]
    if not len(p):
        return
    k = producer[p]
    kernels, which = np.unique(k, return_inverse=True)
    pos = np.searchsorted(nonview, kernels)
    nb = fg.nbytes[p] / BYTE_UNIT
    staged = np.bincount(which, weights=nb, minlength=len(kernels))
    srow = rows.new(np.full(len(kernels), -np.inf), m_hi[pos] - staged)
    rows.add(srow, m_col0 + pos, 1.0)
    owner, edges = _expand(eptr, eitems, fast_expression_ids(fg, p, k, len(graph.kernels)))
    rows.add(srow[which[owner]], edges, -nb[owner])


def build_model(graph: Graph, profile: Profile, formulation: str,
                limit_bytes: int | Sequence[int] | np.ndarray, *, window: int = 15,
                move_state: bool = False, async_candidates: int | None = None,
                full_below: int | None = None, async_min_bytes: int | None = None,
                small_above: int | None = None, small_share: float = 0.0,
                copy_spans: int = 0, direct_outputs: bool = False) -> Model:
    """The whole ILP for one formulation and fast-memory limit (bytes, one for every kernel
    or one per kernel). `copy_spans` (asynchronous): each async copy may run in pieces over
    up to this many kernels (flowgraph.copy_spans); 0 or 1: at its one kernel.
    `direct_outputs`: every kernel writes its outputs straight into the slow tier (no
    staging rows; plan.Plan.direct_outputs)."""
    t0 = time.perf_counter()
    limits = kernel_limits(graph, limit_bytes)
    fg = build_flow_graphs(graph, formulation, window=window, move_state=move_state,
                           async_candidates=async_candidates, full_below=full_below,
                           async_min_bytes=async_min_bytes, small_above=small_above,
                           small_share=small_share,
                           kernel_seconds=candidate_seconds(profile) if async_candidates is not None else None)
    K = len(graph.kernels)
    P, Q, E = len(fg.storages), fg.num_gadgets, fg.num_edges
    pos_of = {int(s): p for p, s in enumerate(fg.storages)}
    free = set(pos_of)
    eptr, eitems = gadget_expressions(fg)
    rows = _Rows()

    # ---- flow conservation: SOURCE out = 1, every inner vertex out - in = 0 --------
    V = fg.num_vertices
    vrow = np.full(V, -1, dtype=np.int64)
    touched = np.unique(np.concatenate([fg.e_src, fg.e_dst]))
    inner = touched[touched < 3 * Q]
    src_v = fg.source(np.arange(P))
    vrow[inner] = rows.new(np.zeros(len(inner)), 0.0)
    vrow[src_v] = rows.new(np.ones(P), 1.0)
    e = np.arange(E)
    rows.add(vrow[fg.e_src], e, 1.0)
    has = vrow[fg.e_dst] >= 0
    rows.add(vrow[fg.e_dst[has]], e[has], -1.0)

    col_lo: list[np.ndarray] = [np.zeros(E)]
    col_hi: list[np.ndarray] = [np.ones(E)]
    integ: list[np.ndarray] = [np.ones(E, dtype=bool)]
    cost: list[np.ndarray] = [np.zeros(E)]
    ncols = E
    offset = 0.0

    # ---- IO configurations ---------------------------------------------------------
    ws_base, ws_extra, ws_group = kernel_workspace(graph, profile, formulation, limits, move_state=move_state)
    is_view = np.array([k.view for k in graph.kernels], dtype=bool)
    nonview = np.flatnonzero(~is_view)
    cfg_k: list[int] = []
    cfg_m: list[int] = []
    cfg_c: list[int] = []
    kernel_time_terms: dict[int, tuple[list[int], list[float], float]] = {}
    link_p: list[int] = []  # (free tensor, kernel, storage bit) needing a link row
    link_k: list[int] = []
    link_j: list[int] = []
    for k in nonview:
        kc = profile.kernels[k]
        masks = allowed_masks(graph, profile, int(k), free)
        if not masks:
            raise ValueError(f"kernel {k} ({graph.kernels[k].op}) has no profiled configuration "
                             "with its fixed tensors in fast memory")
        for j, s in enumerate(kc.storages):
            if s in free:
                link_p.append(pos_of[s]); link_k.append(int(k)); link_j.append(j)
        if len(masks) == 1:
            cfg_k.append(int(k)); cfg_m.append(masks[0]); cfg_c.append(-1)
            # a workspace that cannot fit: the kernel's time without one (where profiled)
            kernel_time_terms[int(k)] = ([], [], kernel_seconds(profile, int(k), masks[0], int(ws_base[k])))
        else:
            cols = list(range(ncols, ncols + len(masks)))
            ncols += len(masks)
            cfg_k += [int(k)] * len(masks); cfg_m += masks; cfg_c += cols
            kernel_time_terms[int(k)] = (cols, [kc.times[m] for m in masks], 0.0)
    cfg_kernel = np.array(cfg_k, dtype=np.int64)
    cfg_mask = np.array(cfg_m, dtype=object)  # Python ints: a concat may touch > 63 storages
    cfg_col = np.array(cfg_c, dtype=np.int64)
    nvar = cfg_col >= 0
    col_lo.append(np.zeros(nvar.sum())); col_hi.append(np.ones(nvar.sum()))
    integ.append(np.ones(nvar.sum(), dtype=bool)); cost.append(np.zeros(nvar.sum()))
    # sum cfg == 1 for kernels with a choice
    choice_k = np.unique(cfg_kernel[nvar])
    krow = np.full(K, -1, dtype=np.int64)
    krow[choice_k] = rows.new(np.ones(len(choice_k)), 1.0)
    rows.add(krow[cfg_kernel[nvar]], cfg_col[nvar], 1.0)
    # link: sum of cfg with bit j clear - in_fast(t, k) == 0  (constant config: in_fast == const)
    if link_p:
        lp, lk, lj = np.array(link_p), np.array(link_k), np.array(link_j)
        single = np.zeros(K, dtype=bool)
        single_mask = np.zeros(K, dtype=object)
        single[cfg_kernel[~nvar]] = True
        single_mask[cfg_kernel[~nvar]] = cfg_mask[~nvar]
        const = np.where(single[lk], 1 - ((single_mask[lk] >> lj) & 1), 0).astype(float)
        lrow = rows.new(-const, -const)  # -in_fast == -constant for a fixed configuration
        ids = fast_expression_ids(fg, lp, lk, K)
        owner, edges = _expand(eptr, eitems, ids)
        rows.add(lrow[owner], edges, -1.0)
        # cfg terms: for each link row of a choice kernel, the cfg columns with bit j clear
        order = np.argsort(cfg_kernel, kind="stable")
        ck, cm, cc = cfg_kernel[order], cfg_mask[order], cfg_col[order]
        kstart = np.searchsorted(ck, lk)
        kend = np.searchsorted(ck, lk, side="right")
        own, idx = _ranges(kstart, np.where(~single[lk], kend, kstart))
        clear = (((cm[idx] >> lj[own]) & 1) == 0).astype(bool)
        rows.add(lrow[own[clear]], cc[idx[clear]], 1.0)

    # ---- capacity as a running total over non-view kernels -------------------------
    N = len(nonview)
    m_col0 = ncols
    ncols += N
    # a kernel's workspace needs room next to everything live at it: always, or where the
    # time it saves is worth the bytes (a w column)
    fixed = (fixed_live_bytes(graph, fg.storages) + ws_base)[nonview]
    m_hi = (limits[nonview] - fixed) / BYTE_UNIT
    col_lo.append(np.zeros(N))
    col_hi.append(m_hi)
    integ.append(np.zeros(N, dtype=bool)); cost.append(np.zeros(N))
    mrow = rows.new(np.zeros(N), 0.0)
    rows.add(mrow, m_col0 + np.arange(N), 1.0)
    rows.add(mrow[1:], m_col0 + np.arange(N - 1), -1.0)
    # A group's rooms r_0 (base) < r_1 < ... < r_n get step columns w_1 >= ... >= w_n: the
    # kernel reserves r_j where w_j is the last one set, at the time it was timed with there.
    # Each step adds (r_j - r_{j-1}) bytes and (t_j - t_{j-1}) seconds (negative) per kernel.
    choosing = np.flatnonzero(ws_extra > 0)
    step_k: list[int] = []
    step_c: list[int] = []
    step_b: list[int] = []
    step_reach: list[int] = []
    ws_saves: dict[int, list[tuple[int, float]]] = {}
    order_rows: list[tuple[int, int]] = []
    for g in np.unique(ws_group[choosing]).tolist():
        ks = choosing[ws_group[choosing] == g].tolist()
        lo, hi = int(ws_base[ks[0]]), int(ws_base[ks[0]] + ws_extra[ks[0]])
        steps = [r for r, _ in profile.kernels[ks[0]].workspace_options() if lo < r <= hi]
        prev_col = -1
        for j, r in enumerate(steps):
            col = ncols
            ncols += 1
            prev_r = lo if j == 0 else steps[j - 1]
            for k in ks:
                kc = profile.kernels[k]
                before = kernel_time_terms[k][2] if j == 0 else kc.seconds_with_room(prev_r)
                step_k.append(k); step_c.append(col); step_b.append(r - prev_r); step_reach.append(r)
                ws_saves.setdefault(k, []).append((col, kc.seconds_with_room(r) - before))
            if prev_col >= 0:
                order_rows.append((col, prev_col))
            prev_col = col
    n_steps = ncols - (m_col0 + N)
    col_lo.append(np.zeros(n_steps)); col_hi.append(np.ones(n_steps))
    integ.append(np.ones(n_steps, dtype=bool)); cost.append(np.zeros(n_steps))
    ws_kernel = np.array(step_k, dtype=np.int64)
    ws_col = np.array(step_c, dtype=np.int64)
    ws_bytes = np.array(step_b, dtype=np.int64)
    if len(ws_kernel):
        wk = np.unique(ws_kernel)
        wpos = np.searchsorted(nonview, wk)
        wrow = rows.new(np.full(len(wk), -np.inf), m_hi[wpos])  # M[k] + sum of its steps' bytes <= bound
        rows.add(wrow, m_col0 + wpos, 1.0)
        rows.add(wrow[np.searchsorted(wk, ws_kernel)], ws_col, ws_bytes / BYTE_UNIT)
    if profile.device != "cuda" and not direct_outputs:
        _staging_rows(graph, fg, rows, nonview, m_col0, m_hi, eptr, eitems)
    if order_rows:
        later, earlier = (np.array(v, dtype=np.int64) for v in zip(*order_rows))
        orow = rows.new(np.full(len(later), -np.inf), 0.0)  # w_j - w_{j-1} <= 0
        rows.add(orow, later, 1.0)
        rows.add(orow, earlier, -1.0)
    # segments of each tensor's in-fast expression along non-view positions
    npos = np.searchsorted(nonview, np.arange(K + 1))  # kernel -> first non-view position >= it
    first = np.array([graph.tensors[s].first for s in fg.storages], dtype=np.int64)
    last = np.array([graph.tensors[s].last for s in fg.storages], dtype=np.int64)
    a = npos[first]
    b = np.searchsorted(nonview, last, side="right") - 1
    gpos = npos[fg.g_kernel]
    gq = np.arange(Q)
    seg_p, seg_start, seg_expr = [], [], []
    lead = (gpos[fg.g_ptr[:-1]] > a)  # kernels before the first gadget: the initial tier
    seg_p.append(np.flatnonzero(lead)); seg_start.append(a[lead]); seg_expr.append(2 * Q + np.flatnonzero(lead))
    seg_p.append(fg.g_tensor); seg_start.append(gpos); seg_expr.append(gq)
    nxt = np.where(np.arange(Q) + 1 < fg.g_ptr[fg.g_tensor + 1], np.roll(gpos, -1), b[fg.g_tensor] + 1)
    gap = gpos + 1 < nxt
    seg_p.append(fg.g_tensor[gap]); seg_start.append(gpos[gap] + 1); seg_expr.append(Q + gq[gap])
    sp = np.concatenate(seg_p); ss = np.concatenate(seg_start); se = np.concatenate(seg_expr)
    inside = ss < N  # the terminal gadget of state tensors lies after the last kernel
    sp, ss, se = sp[inside], ss[inside], se[inside]
    order = np.lexsort((ss, sp))
    sp, ss, se = sp[order], ss[order], se[order]
    send = np.where(np.r_[sp[1:] == sp[:-1], False], np.r_[ss[1:], 0], b[sp] + 1)
    nb = fg.nbytes / BYTE_UNIT
    owner, edges = _expand(eptr, eitems, se)
    rows.add(mrow[ss[owner]], edges, -nb[sp[owner]])  # M[k] - (terms entering at k) ...
    ends = send < N
    owner, edges = _expand(eptr, eitems, se[ends])
    rows.add(mrow[send[ends][owner]], edges, nb[sp[ends][owner]])  # ... + (terms leaving at k)

    # ---- state tensors end in the tier they started in (steady state across steps) ---
    state = np.flatnonzero(~fg.has_producer)
    if len(state):
        srow = rows.new(np.zeros(len(state)), 0.0)
        o1, e1 = _expand(eptr, eitems, 2 * Q + state)
        rows.add(srow[o1], e1, 1.0)
        lastq = fg.g_ptr[state + 1] - 1
        # tier at the end: during the terminal gadget, or after the only gadget in static
        end_expr = np.where(fg.g_kernel[lastq] == K, lastq, Q + lastq)
        o2, e2 = _expand(eptr, eitems, end_expr)
        rows.add(srow[o2], e2, -1.0)

    # ---- objective: kernel times, sync moves, async overlap -------------------------
    mc = move_costs(fg, profile)
    c = np.concatenate(cost)
    sync = (fg.e_kind != NONE) & ~fg.e_async
    c[:E][sync] = mc[sync]
    asy = np.flatnonzero((fg.e_kind != NONE) & fg.e_async)
    async_k = fg.g_kernel[fg.e_gadget[asy]]
    # copies that may spread over several kernels get one share column per kernel (the
    # shares sum to the edge); the rest stay whole at their own kernel
    spans = copy_span_pieces(graph, fg, asy, copy_spans) if copy_spans > 1 and len(asy) else None
    spread = np.zeros(len(asy), dtype=bool)
    if spans is not None:
        of = np.searchsorted(asy, spans.p_edge)  # each piece's copy, as a position in asy
        spread = np.bincount(of, minlength=len(asy)) > 1
        keep = spread[of]
        y_edge, y_kernel = spans.p_edge[keep], spans.p_kernel[keep]
    else:
        y_edge = y_kernel = np.zeros(0, dtype=np.int64)
    y_col = np.arange(ncols, ncols + len(y_edge))
    ncols += len(y_edge)
    if len(y_edge):
        yrow = rows.new(np.zeros(int(spread.sum())), 0.0)  # sum of shares - x == 0
        yr = np.full(fg.num_edges, -1, dtype=np.int64)
        yr[asy[spread]] = yrow
        rows.add(yr[y_edge], y_col, 1.0)
        rows.add(yrow, asy[spread], -1.0)
        # a fetch's pieces after a gadget of its tensor need the path to stay fast there
        ce, ca, cs = spans.c_edge, spans.c_after, spans.c_stay
        if len(ce):
            crow = rows.new(np.full(len(ce), -np.inf), 0.0)  # sum of later shares - stay <= 0
            key = y_edge * (K + 2) + y_kernel
            order = np.argsort(key, kind="stable")
            lo = np.searchsorted(key[order], ce * (K + 2) + ca + 1)
            hi = np.searchsorted(key[order], ce * (K + 2) + K + 1)
            owner, at = _ranges(lo, hi)
            rows.add(crow[owner], y_col[order[at]], 1.0)
            rows.add(crow, cs, -1.0)
    col_lo.append(np.zeros(len(y_edge))); col_hi.append(np.ones(len(y_edge)))
    integ.append(np.zeros(len(y_edge), dtype=bool))
    c = np.concatenate([c, np.zeros(len(y_edge))])
    whole = asy[~spread]
    z_kernel = np.unique(np.concatenate([async_k[~spread], y_kernel]))
    z_col = np.arange(ncols, ncols + len(z_kernel))
    ncols += len(z_kernel)
    zc = np.ones(len(z_kernel))
    has_z = set(z_kernel.tolist())
    for k, (cols, times, const) in kernel_time_terms.items():
        if k in has_z:
            continue
        offset += const
        if cols:
            c[cols] = times
        for col, dt in ws_saves.get(k, ()):
            c[col] += dt
    if len(z_kernel):
        # rows in milliseconds: a small tensor's copy takes well under a nanosecond, which a
        # row in seconds would carry as a coefficient below the solver's zero tolerance
        zt_lo = np.array([kernel_time_terms[k][2] for k in z_kernel.tolist()]) * ROW_TIME_UNIT
        zrow_t = rows.new(zt_lo, np.inf)  # z - T >= constant part of T
        zrow_m = rows.new(np.zeros(len(z_kernel)), np.inf)  # z - async moves >= 0
        for i, k in enumerate(z_kernel.tolist()):
            cols, times, _ = kernel_time_terms[k]
            if cols:
                rows.add(np.full(len(cols), zrow_t[i]), cols, -np.array(times) * ROW_TIME_UNIT)
            for col, dt in ws_saves.get(k, ()):
                rows.add(zrow_t[i:i + 1], [col], -dt * ROW_TIME_UNIT)
        rows.add(zrow_t, z_col, ROW_TIME_UNIT)
        rows.add(zrow_m, z_col, ROW_TIME_UNIT)
        zi = np.searchsorted(z_kernel, fg.g_kernel[fg.e_gadget[whole]])
        rows.add(zrow_m[zi], whole, -mc[whole] * ROW_TIME_UNIT)
        rows.add(zrow_m[np.searchsorted(z_kernel, y_kernel)], y_col, -mc[y_edge] * ROW_TIME_UNIT)
        # z >= tmin + sum over copies longer than tmin of (copy - tmin) x, tmin = the
        # kernel's fastest configuration: valid (no copy: z >= T >= tmin; any copies: z >=
        # their sum, which is at least the right side), and for one copy the convex hull of
        # max(T, copy x). Without it the LP hides a long copy in fractions under several
        # kernels at once, which no plan can do (the weak bound of large models).
        tmin = np.array([min(kernel_time_terms[k][1]) if kernel_time_terms[k][0]
                         else kernel_time_terms[k][2] + sum(dt for _, dt in ws_saves.get(k, ()))
                         for k in z_kernel.tolist()])
        # (whole copies only: a share of a spread copy may be anywhere in [0, 1], where
        # the chord of max(T, copy) over-states its cost)
        longer = mc[whole] > tmin[zi]
        if longer.any():
            zk = np.unique(zi[longer])
            zrow_h = np.full(len(z_kernel), -1, dtype=np.int64)
            zrow_h[zk] = rows.new(tmin[zk] * ROW_TIME_UNIT, np.inf)
            rows.add(zrow_h[zk], z_col[zk], ROW_TIME_UNIT)
            rows.add(zrow_h[zi[longer]], whole[longer],
                     -(mc[whole][longer] - tmin[zi[longer]]) * ROW_TIME_UNIT)
    c = np.concatenate([c, zc])
    col_lo.append(np.zeros(len(z_kernel))); col_hi.append(np.full(len(z_kernel), np.inf))
    integ.append(np.zeros(len(z_kernel), dtype=bool))

    start, index, value, rlo, rhi = rows.csr(ncols)
    return Model(
        c, offset, np.concatenate(col_lo), np.concatenate(col_hi), np.concatenate(integ),
        start, index, value, rlo, rhi, fg, cfg_kernel, cfg_mask, cfg_col, m_col0, nonview,
        z_kernel, z_col, time.perf_counter() - t0, ws_base, ws_kernel, ws_col, ws_bytes,
        np.array(step_reach, dtype=np.int64), y_edge, y_kernel, y_col, direct_outputs,
    )


def trace_paths(model: Model, x: np.ndarray) -> list[np.ndarray]:
    """Per free tensor, the edges of its SOURCE -> SINK path in a solution."""
    fg = model.fg
    on = np.flatnonzero(x[: fg.num_edges] > 0.5)
    by_src = {int(fg.e_src[e]): int(e) for e in on}
    paths = []
    for p in range(len(fg.storages)):
        v, path = int(fg.source(p)), []
        sink = int(fg.sink(p))
        while v != sink:
            e = by_src.get(v)
            if e is None:
                raise RuntimeError(f"solution has no path for storage {fg.storages[p]}")
            path.append(e)
            v = int(fg.e_dst[e])
        paths.append(np.array(path, dtype=np.int64))
    return paths
