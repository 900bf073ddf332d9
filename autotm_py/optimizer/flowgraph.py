"""Tensor flow graphs ("gadgets", reference section 3), generated directly as numpy arrays.

For every free tensor one unit of flow runs from SOURCE to SINK; the path says where the
tensor lives over its lifetime. Gadgets are the kernels where a location decision is
modelled:

* static: the producer only (state tensors: their first user);
* synchronous: the producer and every reader (users);
* asynchronous: the users plus every non-view kernel of the live range that has a user
  within ``window`` positions (positions count non-view kernels only). With
  ``async_candidates=L`` only some of these candidates stay, per interval between two
  consecutive users (and after the last one): the first and the last candidate (a write-back
  right after a use frees fast memory soonest, a fetch right before the next use holds it
  least) and the L longest kernels (the most time to hide a copy behind; duration = the
  kernel's fastest profiled time, ties to the earlier kernel). An interval with at most
  L + 2 candidates keeps them all, so with ``window <= (L + 2) // 2`` nothing is dropped.
  This is a restriction of the formulation, not a proven-harmless reduction: the optimum
  of the restricted model can exceed the full one (measured in benchmarks/solve_time.py).
  With ``full_below=N`` the restriction applies only to graphs whose window holds more
  than N candidates in all (small models keep every candidate; ``FlowGraphs.async_candidates``
  says what was applied). With ``small_above=N`` and ``small_share=S``, a graph whose window
  holds more than N candidates also takes every candidate away from its smallest tensors,
  those that together hold at most the share S of the free bytes (``small_tensor_bytes``):
  they keep their users' gadgets, so they can still be placed and moved synchronously.
  ``FlowGraphs.async_min_bytes`` records the size below which that happened (a plan passes
  it back as ``async_min_bytes`` to rebuild the same graphs). Also a restriction.

Vertices per gadget q: PRE(q) "fast, no valid slow copy", DRAM(q) "fast and a valid slow
copy exists", PMEM(q) "slow". Edges follow the reference table (3.3), with two changes:

* a gadget whose kernel writes the tensor in place (not its producer) makes the slow copy
  stale, so DRAM(q) leaves like PRE(q): DRAM(q) -> PRE(q+1) and DRAM(q) -> PMEM(q+1) is a
  paid write. Without in-place writers a path writes at most once, as in the original;
* state tensors (no producer, only when ``move_state``) may start in either tier and be
  fetched at their first gadget; in the synchronous and asynchronous formulations they get a
  terminal gadget at kernel index ``len(graph.kernels)`` (after the step) so that they can be
  written back after their last user, and the ILP ties their tier there to their initial one
  (the next step finds them where this one did).

Edges are generated from the gadget arrays with vectorised numpy, never by testing pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..graph.types import Graph

FORMULATIONS = ("static", "synchronous", "asynchronous")

# vertex kinds (vertex id = 3*q + kind for gadget vertices)
PRE, DRAM, PMEM = 0, 1, 2
# edge kinds
NONE, READ, WRITE = 0, 1, 2


@dataclass(frozen=True, eq=False)
class FlowGraphs:
    """All free tensors' flow graphs, flattened. Gadget q belongs to tensor ``g_tensor[q]``;
    gadgets of one tensor are contiguous and ordered by kernel. Vertex ids: gadget vertices
    3*q + kind, then SOURCE(p) = 3*Q + 2*p and SINK(p) = 3*Q + 2*p + 1."""

    formulation: str
    window: int
    storages: np.ndarray  # (P,) storage id of each free tensor
    nbytes: np.ndarray  # (P,) int64
    has_producer: np.ndarray  # (P,) bool
    g_ptr: np.ndarray  # (P+1,) gadget offsets
    g_tensor: np.ndarray  # (Q,)
    g_kernel: np.ndarray  # (Q,) kernel index
    g_async: np.ndarray  # (Q,) bool: ASYNC gadget (not a user)
    g_writes: np.ndarray  # (Q,) bool: the kernel writes the tensor in place
    e_src: np.ndarray  # (E,) vertex ids
    e_dst: np.ndarray
    e_tensor: np.ndarray  # (E,) tensor position p
    e_kind: np.ndarray  # NONE / READ / WRITE
    e_async: np.ndarray  # bool
    e_gadget: np.ndarray  # gadget the move overlaps or follows (-1 for no move)
    async_candidates: int | None = None  # see build_flow_graphs
    async_min_bytes: int | None = None  # tensors smaller than this have no async candidates

    @property
    def num_gadgets(self) -> int:
        return len(self.g_kernel)

    @property
    def num_edges(self) -> int:
        return len(self.e_src)

    def source(self, p: np.ndarray | int) -> np.ndarray | int:
        return 3 * self.num_gadgets + 2 * p

    def sink(self, p: np.ndarray | int) -> np.ndarray | int:
        return 3 * self.num_gadgets + 2 * p + 1

    @property
    def num_vertices(self) -> int:
        return 3 * self.num_gadgets + 2 * len(self.storages)

    def vertex_gadget(self, v: np.ndarray) -> np.ndarray:
        """Gadget of each vertex, -1 for SOURCE, -2 for SINK."""
        v = np.asarray(v)
        q = v // 3
        out = np.where(v < 3 * self.num_gadgets, q, -1)
        is_sink = (v >= 3 * self.num_gadgets) & ((v - 3 * self.num_gadgets) % 2 == 1)
        return np.where(is_sink, -2, out)

    def vertex_kind(self, v: np.ndarray) -> np.ndarray:
        """PRE/DRAM/PMEM for gadget vertices, -1 for SOURCE and SINK."""
        v = np.asarray(v)
        return np.where(v < 3 * self.num_gadgets, v % 3, -1)


def free_storages(graph: Graph, move_state: bool) -> np.ndarray:
    """Storages the ILP decides: non-empty intermediates and outputs (and state if allowed)."""
    return np.array(
        [t.id for t in graph.tensors if t.nbytes > 0 and (move_state or not t.fixed)], dtype=np.int64
    )


def nonview_positions(graph: Graph) -> np.ndarray:
    """Position of each kernel among non-view kernels (views get their successor's)."""
    is_view = np.array([k.view for k in graph.kernels], dtype=bool)
    return np.cumsum(~is_view) - (~is_view).astype(np.int64)


def build_flow_graphs(graph: Graph, formulation: str, *, window: int = 15,
                      move_state: bool = False, async_candidates: int | None = None,
                      kernel_seconds: np.ndarray | None = None,
                      full_below: int | None = None, async_min_bytes: int | None = None,
                      small_above: int | None = None, small_share: float = 0.0) -> FlowGraphs:
    """Gadgets, vertices and edges of every free tensor for one formulation.
    `async_candidates` (asynchronous only): keep the ends and this many longest candidate
    kernels per interval between users, ranked by `kernel_seconds` (one per kernel); None
    keeps every candidate of the window. `full_below`: restrict only when the window has
    more candidates than this in all. `async_min_bytes`: tensors smaller than this get no
    candidate; `small_above`/`small_share` derive it (see the module docstring)."""
    if formulation not in FORMULATIONS:
        raise ValueError(f"unknown formulation {formulation!r}; choose one of {', '.join(FORMULATIONS)}")
    if window < 0:
        raise ValueError(f"the asynchronous window must be >= 0, got {window}")
    if async_candidates is not None:
        if async_candidates < 0:
            raise ValueError(f"async_candidates must be >= 0 or None, got {async_candidates}")
        if kernel_seconds is None or len(kernel_seconds) != len(graph.kernels):
            raise ValueError("async_candidates needs kernel_seconds, one per kernel")
    storages = free_storages(graph, move_state)
    is_view = np.array([k.view for k in graph.kernels], dtype=bool)
    nonview_idx = np.flatnonzero(~is_view)
    pos = nonview_positions(graph)
    writes_of = [set(k.output_storages) for k in graph.kernels]

    g_kernel: list[np.ndarray] = []
    g_async: list[np.ndarray] = []
    counts = np.zeros(len(storages), dtype=np.int64)
    users_of: list[np.ndarray] = []
    extras: list[np.ndarray] = []  # asynchronous candidates of each tensor
    for sid in storages:
        t = graph.tensors[sid]
        users = ([t.producer] if t.producer is not None else []) + list(t.users)
        if not users:  # state nothing touches: one decision at its first kernel
            users = [t.first]
        u = np.array(users)
        users_of.append(u)
        if formulation != "asynchronous":
            continue
        lo, hi = np.searchsorted(nonview_idx, [t.first, t.last + 1])
        cand = nonview_idx[lo:hi]
        upos = pos[u]
        cpos = pos[cand]
        j = np.searchsorted(upos, cpos)
        dist = np.full(len(cand), np.iinfo(np.int64).max)
        right = j < len(upos)
        dist[right] = upos[j[right]] - cpos[right]
        left = j > 0
        dist[left] = np.minimum(dist[left], cpos[left] - upos[j[left] - 1])
        keep = (dist <= window) & ~np.isin(cand, u)
        extras.append(cand[keep])
    total = sum(len(e) for e in extras)
    if async_candidates is not None and full_below is not None and total <= full_below:
        async_candidates = None  # small enough to keep every candidate
    if formulation != "asynchronous":
        async_min_bytes = None
    elif small_above is not None and total > small_above:
        async_min_bytes = small_tensor_bytes(np.array([graph.tensors[s].nbytes for s in storages]),
                                             small_share)
    if async_min_bytes is not None and async_min_bytes <= 0:
        async_min_bytes = None
    for p, sid in enumerate(storages):
        t = graph.tensors[sid]
        u = users_of[p]
        if formulation == "static":
            ks, asy = u[:1], np.zeros(1, dtype=bool)
        elif formulation == "synchronous":
            ks, asy = u, np.zeros(len(u), dtype=bool)
        else:
            extra = extras[p]
            if async_min_bytes is not None and t.nbytes < async_min_bytes:
                extra = extra[:0]
            if async_candidates is not None and len(extra):
                extra = select_candidates(extra, u, np.asarray(kernel_seconds), async_candidates)
            ks = np.concatenate([u, extra])
            asy = np.concatenate([np.zeros(len(u), dtype=bool), np.ones(len(extra), dtype=bool)])
            order = np.argsort(ks, kind="stable")
            ks, asy = ks[order], asy[order]
        if t.producer is None and formulation != "static":
            # state comes back where it started: a terminal gadget after the last kernel
            # (index len(kernels)) lets it be written back after its last user
            ks = np.append(ks, len(graph.kernels))
            asy = np.append(asy, False)
        g_kernel.append(ks.astype(np.int64))
        g_async.append(asy)
        counts[p] = len(ks)

    P = len(storages)
    g_ptr = np.zeros(P + 1, dtype=np.int64)
    np.cumsum(counts, out=g_ptr[1:])
    gk = np.concatenate(g_kernel) if P else np.zeros(0, dtype=np.int64)
    ga = np.concatenate(g_async) if P else np.zeros(0, dtype=bool)
    gt = np.repeat(np.arange(P), counts)
    has_prod = np.array([graph.tensors[s].producer is not None for s in storages], dtype=bool)
    nbytes = np.array([graph.tensors[s].nbytes for s in storages], dtype=np.int64)
    K = len(graph.kernels)
    gw = np.array(
        [k < K and int(storages[p]) in writes_of[k] and graph.tensors[storages[p]].producer != k
         for p, k in zip(gt, gk)], dtype=bool)
    Q = len(gk)
    q = np.arange(Q)
    local = q - g_ptr[gt]  # 0-based position of the gadget within its tensor
    last = local == counts[gt] - 1
    first = local == 0
    # DRAM(q) exists where a fetch can reach it: not the producer gadget, never in static
    has_dram = (formulation != "static") & (~first | ~has_prod[gt])

    src, dst, kind, asy, gad, ten = [], [], [], [], [], []

    def add(s, d, k, a, g, t=None):
        src.append(np.asarray(s, dtype=np.int64))
        ten.append(np.asarray(gt[np.asarray(g)] if t is None else t, dtype=np.int64))
        dst.append(np.asarray(d, dtype=np.int64))
        n = len(src[-1])
        kind.append(np.full(n, k, dtype=np.int8))
        asy.append(np.broadcast_to(np.asarray(a, dtype=bool), (n,)).copy())
        gad.append(np.broadcast_to(np.asarray(g, dtype=np.int64), (n,)).copy())

    p_all = np.arange(P)
    SRC = 3 * Q + 2 * p_all
    SNK = SRC + 1
    q0 = g_ptr[:-1]
    add(SRC, 3 * q0 + PRE, NONE, False, -1, p_all)
    add(SRC, 3 * q0 + PMEM, NONE, False, -1, p_all)
    mid = q[~last]
    nxt = mid + 1
    add(3 * mid + PRE, 3 * nxt + PRE, NONE, False, -1, gt[mid])
    add(3 * mid + PRE, 3 * nxt + PMEM, WRITE, ga[mid], mid)
    dm = mid[has_dram[mid]]
    clean, dirty = dm[~gw[dm]], dm[gw[dm]]
    add(3 * clean + DRAM, 3 * (clean + 1) + DRAM, NONE, False, -1, gt[clean])
    # drop the fast copy at no cost: the slow copy is valid
    add(3 * clean + DRAM, 3 * (clean + 1) + PMEM, NONE, False, -1, gt[clean])
    add(3 * dirty + DRAM, 3 * (dirty + 1) + PRE, NONE, False, -1, gt[dirty])
    add(3 * dirty + DRAM, 3 * (dirty + 1) + PMEM, WRITE, ga[dirty], dirty)
    add(3 * mid + PMEM, 3 * nxt + PMEM, NONE, False, -1, gt[mid])
    lq = q[last]
    add(3 * lq + PRE, SNK[gt[lq]], NONE, False, -1, gt[lq])
    ld = lq[has_dram[lq]]
    add(3 * ld + DRAM, SNK[gt[ld]], NONE, False, -1, gt[ld])
    add(3 * lq + PMEM, SNK[gt[lq]], NONE, False, -1, gt[lq])
    rq = q[has_dram & (gk < K)]  # nothing is fetched at the terminal gadget
    add(3 * rq + PMEM, 3 * rq + DRAM, READ, ga[rq], rq)

    e_src = np.concatenate(src) if src else np.zeros(0, dtype=np.int64)
    e_dst = np.concatenate(dst)
    e_kind = np.concatenate(kind)
    e_async = np.concatenate(asy)
    e_gad = np.concatenate(gad)
    e_tensor = np.concatenate(ten)
    order = np.lexsort((e_src, e_tensor))  # group edges by tensor, deterministic
    return FlowGraphs(
        formulation, window, storages, nbytes, has_prod, g_ptr, gt, gk, ga, gw,
        e_src[order], e_dst[order], e_tensor[order].astype(np.int64), e_kind[order],
        e_async[order], e_gad[order], async_candidates if formulation == "asynchronous" else None,
        async_min_bytes,
    )


def small_tensor_bytes(nbytes: np.ndarray, share: float) -> int:
    """The size below which tensors together hold at most `share` of `nbytes`' total: the
    smallest tensors in order of size, one size taken whole or not at all (0 for no share,
    the smallest size when not even it fits, one more than the largest when all do)."""
    sizes = np.sort(np.asarray(nbytes, dtype=np.int64))
    if not len(sizes) or share <= 0:
        return 0
    out = np.flatnonzero(np.cumsum(sizes) > share * sizes.sum())
    if not len(out):
        return int(sizes[-1]) + 1
    first_out = sizes[out[0]]  # every tensor below it is within the share
    return int(first_out)


def select_candidates(cand: np.ndarray, users: np.ndarray, seconds: np.ndarray,
                      longest: int) -> np.ndarray:
    """Of sorted candidate kernels, those kept in each interval between consecutive users
    (`users` sorted): the first, the last and the `longest` longest (ties: earlier)."""
    interval = np.searchsorted(users, cand)
    dur = seconds[cand]
    order = np.lexsort((cand, -dur, interval))  # by interval, longest first, then earlier
    iv = interval[order]
    rank = np.arange(len(order)) - np.searchsorted(iv, iv)
    keep = np.zeros(len(cand), dtype=bool)
    keep[order[rank < longest]] = True
    keep[np.r_[True, interval[1:] != interval[:-1]]] = True  # first of each interval
    keep[np.r_[interval[1:] != interval[:-1], True]] = True  # last of each interval
    return cand[keep]


def candidate_seconds(profile) -> np.ndarray:
    """Per kernel, the time it surely runs for (its fastest profiled configuration): what
    ranks asynchronous candidates."""
    return np.array([min(c.times.values()) if c.times else 0.0 for c in profile.kernels])


def gadget_expressions(fg: FlowGraphs) -> tuple[np.ndarray, np.ndarray]:
    """Edges whose flow says "in fast memory" for each expression, as CSR (ptr, edges).

    Expression ids: q -> in_fast(q), during gadget q (in-edges of PRE(q)/DRAM(q));
    Q + q -> in_fast_post(q), between gadget q and the next one (edges from PRE(q)/DRAM(q)
    to a fast vertex of q+1 or SINK); 2Q + p -> tensor p starts in fast memory (SOURCE ->
    PRE). Each is a sum of mutually exclusive edges of one path, so no OR variables."""
    Q, P = fg.num_gadgets, len(fg.storages)
    dq, dk = fg.vertex_gadget(fg.e_dst), fg.vertex_kind(fg.e_dst)
    sq, sk = fg.vertex_gadget(fg.e_src), fg.vertex_kind(fg.e_src)
    e = np.arange(fg.num_edges)
    fast_dst = (dq >= 0) & (dk != PMEM)
    ids = [dq[fast_dst]]
    edges = [e[fast_dst]]
    post = (sq >= 0) & (sk != PMEM) & ((dq == -2) | ((dk != PMEM) & (dq == sq + 1)))
    ids.append(Q + sq[post])
    edges.append(e[post])
    init = (sq == -1) & (dk == PRE)
    ids.append(2 * Q + fg.e_tensor[init])
    edges.append(e[init])
    ids_a = np.concatenate(ids)
    edges_a = np.concatenate(edges)
    order = np.argsort(ids_a, kind="stable")
    ptr = np.zeros(2 * Q + P + 1, dtype=np.int64)
    np.add.at(ptr, ids_a + 1, 1)
    np.cumsum(ptr, out=ptr)
    return ptr, edges_a[order]


def fast_expression_ids(fg: FlowGraphs, p: np.ndarray, k: np.ndarray, num_kernels: int) -> np.ndarray:
    """Expression id (see gadget_expressions) of "tensor p is in fast memory at kernel k"."""
    Q = fg.num_gadgets
    keys = fg.g_tensor * num_kernels + fg.g_kernel  # sorted: gadgets grouped by tensor, by kernel
    want = p * num_kernels + k
    q = np.searchsorted(keys, want, side="right") - 1
    valid = q >= 0
    qc = np.maximum(q, 0)
    valid &= fg.g_tensor[qc] == p if Q else np.zeros_like(valid)
    at = valid & (fg.g_kernel[qc] == k)
    return np.where(at, qc, np.where(valid, Q + qc, 2 * Q + p))


def walk(fg: FlowGraphs, p: int, initial_fast: bool,
         tiers: list[tuple[bool, bool]]) -> list[tuple[int, int]] | None:
    """Vertex pairs of tensor p's path given its tier (fast?) during and after each gadget;
    None when no path of this shape exists (a tier change that no edge explains)."""
    q0 = int(fg.g_ptr[p])
    if len(tiers) != int(fg.g_ptr[p + 1]) - q0:
        return None
    v = 3 * q0 + (PRE if initial_fast else PMEM)
    pairs = [(int(fg.source(p)), v)]
    for i, (during, after) in enumerate(tiers):
        q = q0 + i
        if during and v % 3 == PMEM:
            pairs.append((v, 3 * q + DRAM))  # a fetch at gadget q
            v = 3 * q + DRAM
        elif not during and v % 3 != PMEM:
            return None
        if i == len(tiers) - 1:
            if after != during:
                return None
            w = int(fg.sink(p))
        elif not after:
            w = 3 * (q + 1) + PMEM
        elif v % 3 == PMEM:
            return None
        else:
            clean = v % 3 == DRAM and not fg.g_writes[q]
            w = 3 * (q + 1) + (DRAM if clean else PRE)
        pairs.append((v, w))
        v = w
    return pairs


def edge_ids(fg: FlowGraphs, pairs: list[tuple[int, int]]) -> np.ndarray:
    """Edge id of each (src, dst) vertex pair, -1 where the flow graph has no such edge."""
    V = fg.num_vertices
    keys = fg.e_src * V + fg.e_dst
    order = np.argsort(keys)
    skeys = keys[order]
    want = np.array([a * V + b for a, b in pairs], dtype=np.int64)
    if not len(want) or not len(skeys):
        return np.full(len(want), -1, dtype=np.int64)
    idx = np.minimum(np.searchsorted(skeys, want), len(skeys) - 1)
    return np.where(skeys[idx] == want, order[idx], -1)


@dataclass(frozen=True, eq=False)
class CopySpans:
    """Where the pieces of each asynchronous copy may run (``build_model(copy_spans=N)``).

    A fetch at gadget q may run in pieces at the non-view kernels from q's kernel up to the
    tensor's next use (exclusive): the tensor is in fast memory there from q on, as the flow
    graph already counts it, and nothing reads it before that use. A write-back at gadget q
    (leaving PRE(q)) may run in pieces at the non-view kernels after the tensor was last
    written (its producer or an in-place writer, both users) up to q's kernel: a PRE vertex
    is only reached from PRE or from a writer's DRAM, so the tensor is in fast memory and
    unchanged there. At most ``span`` kernels each. Piece i of edge ``p_edge[i]`` may run at
    kernel ``p_kernel[i]``. A fetch's pieces after one of its tensor's gadgets g need the path
    to stay in fast memory past g (it could drop the copy there and fetch again later): row j
    bounds the pieces of edge ``c_edge[j]`` at kernels after ``c_after[j]`` (g's kernel) by the
    flow on edge ``c_stay[j]``, DRAM(g) -> DRAM(g+1)."""

    p_edge: np.ndarray
    p_kernel: np.ndarray
    c_edge: np.ndarray
    c_after: np.ndarray
    c_stay: np.ndarray


def copy_spans(graph: Graph, fg: FlowGraphs, edges: np.ndarray, span: int) -> CopySpans:
    """The kernels at which the pieces of the asynchronous copy edges `edges` may run (see
    CopySpans); an edge that may not spread gets one piece at its own kernel."""
    is_view = np.array([k.view for k in graph.kernels], dtype=bool)
    nonview = np.flatnonzero(~is_view)
    K = len(graph.kernels)
    p_edge: list[int] = []
    p_kernel: list[int] = []
    chains: list[tuple[int, int, int]] = []  # (edge, after kernel, stay pair index)
    stay_pairs: list[tuple[int, int]] = []
    src_kind = fg.vertex_kind(fg.e_src)
    for e in edges.tolist():
        q = int(fg.e_gadget[e])
        k = int(fg.g_kernel[q])
        p = int(fg.e_tensor[e])
        lo, hi = int(fg.g_ptr[p]), int(fg.g_ptr[p + 1])
        kernels = [k]
        if span > 1 and fg.has_producer[p]:
            if fg.e_kind[e] == READ:
                nxt = q + 1
                while nxt < hi and fg.g_async[nxt]:
                    nxt += 1
                end = int(fg.g_kernel[nxt]) if nxt < hi else K
                a, b = np.searchsorted(nonview, [k, end])
                kernels = nonview[a:min(b, a + span)].tolist()
                for g in range(q, nxt):
                    if g + 1 < hi and int(fg.g_kernel[g]) < kernels[-1]:
                        chains.append((e, int(fg.g_kernel[g]), len(stay_pairs)))
                        stay_pairs.append((3 * g + DRAM, 3 * (g + 1) + DRAM))
            elif src_kind[e] == PRE:
                w = q - 1  # the last writer: an in-place one, else the producer (gadget lo)
                while w > lo and not fg.g_writes[w]:
                    w -= 1
                start = int(fg.g_kernel[w])
                a, b = np.searchsorted(nonview, [start + 1, k + 1])
                kernels = nonview[max(a, b - span):b].tolist() or [k]
        p_edge += [e] * len(kernels)
        p_kernel += kernels
    stay = edge_ids(fg, stay_pairs) if stay_pairs else np.zeros(0, dtype=np.int64)
    if (stay < 0).any():
        raise AssertionError("a fetch's gadget lacks its DRAM -> DRAM edge")
    ch = np.array(chains, dtype=np.int64).reshape(-1, 3)
    return CopySpans(np.array(p_edge, dtype=np.int64), np.array(p_kernel, dtype=np.int64),
                     ch[:, 0], ch[:, 1], stay[ch[:, 2]] if len(ch) else np.zeros(0, dtype=np.int64))
