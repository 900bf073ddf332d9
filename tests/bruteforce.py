"""Tiny hand-built graphs and profiles, and a brute-force optimum to check the ILP against.

The brute force enumerates every SOURCE -> SINK path of every free tensor's flow graph
(DFS), takes the Cartesian product, and evaluates each combination from the *meaning* of a
path (tier at each kernel, which moves it pays) with its own code, not the ILP's rows:
capacity at every kernel (on CPU an output counts at its producer in either tier: the runtime
makes it in fast memory and copies it), a profiled configuration per kernel (CUDA: all IO
fast), and the cost sum of kernel times + sync moves, with async moves hidden behind their
kernel.
"""

from __future__ import annotations

import random
from typing import Sequence

import numpy as np

from autotm_py.graph.types import Graph, Kernel, Role, Tensor, TensorMeta
from autotm_py.optimizer.flowgraph import NONE, PMEM, READ, build_flow_graphs, candidate_seconds
from autotm_py.optimizer.plan import stages_outputs
from autotm_py.profiler.types import Bandwidths, KernelCost, Profile


def make_graph(sizes: Sequence[int], roles: Sequence[Role], kernels: Sequence[tuple],
               name: str = "tiny") -> Graph:
    """kernels: (inputs, outputs) storage tuples, or (inputs, outputs, "view"|"inplace")."""
    n = len(kernels)
    ks: list[Kernel] = []
    producer: dict[int, int] = {}
    users: dict[int, list[int]] = {i: [] for i in range(len(sizes))}
    for i, spec in enumerate(kernels):
        ins, outs = spec[0], spec[1]
        flag = spec[2] if len(spec) > 2 else ""
        meta = lambda s: TensorMeta(s, (max(sizes[s] // 4, 1),), (1,), 0, "float32")  # noqa: E731
        k = Kernel(i, f"k{i}", "aten.fake.default", tuple(meta(s) for s in ins),
                   tuple(meta(s) for s in outs), {}, flag == "view", flag == "inplace")
        ks.append(k)
        for s in outs:
            if s not in ins and not roles[s].persistent and s not in producer:
                producer[s] = i
        if not k.view:
            for s in k.storages:
                if producer.get(s) != i and (not users[s] or users[s][-1] != i):
                    users[s].append(i)
    tensors = []
    for s, nb in enumerate(sizes):
        role = roles[s]
        u = tuple(users[s])
        if role.persistent:
            first, last = 0, n - 1
        elif role == Role.OUTPUT:
            first, last = producer[s], n - 1
        else:
            first = producer[s]
            last = max(u) if u else first
        tensors.append(Tensor(s, f"t{s}", nb, "float32", role, producer.get(s), u, first, last))
    return Graph(name, 1, "cpu", tuple(ks), tuple(tensors))


def make_profile(graph: Graph, device: str = "cpu", seed: int = 0, drop: float = 0.2,
                 move_state: bool = False, read_bw: float = 100.0, write_bw: float = 80.0,
                 async_factor: float = 0.5) -> Profile:
    """Random but plausible kernel times for every mask (some dropped as 'not profiled')."""
    rng = random.Random(seed)
    costs = []
    for k in graph.kernels:
        if k.view:
            costs.append(KernelCost(k.index, k.storages, {0: 0.0}))
            continue
        t0 = rng.uniform(1.0, 3.0)
        if device == "cuda":
            costs.append(KernelCost(k.index, k.storages, {0: t0}))
            continue
        pen = [rng.uniform(0.2, 2.0) for _ in k.storages]
        slowable = [move_state or not graph.tensors[s].fixed for s in k.storages]
        times = {}
        for m in range(1 << len(k.storages)):
            if any(m >> j & 1 and not slowable[j] for j in range(len(k.storages))):
                continue
            if m and rng.random() < drop:
                continue
            times[m] = t0 + sum(pen[j] for j in range(len(k.storages)) if m >> j & 1)
        costs.append(KernelCost(k.index, k.storages, times))
    bw = Bandwidths((1,), (read_bw,), (write_bw,), (read_bw * async_factor,), (write_bw * async_factor,))
    return Profile(graph.fingerprint, device, "test", "model", tuple(costs), bw)


def _paths(fg, p: int) -> list[list[int]]:
    out_edges: dict[int, list[int]] = {}
    for e in np.flatnonzero(fg.e_tensor == p):
        out_edges.setdefault(int(fg.e_src[e]), []).append(int(e))
    sink = int(fg.sink(p))
    paths: list[list[int]] = []

    def dfs(v: int, acc: list[int]) -> None:
        if v == sink:
            paths.append(list(acc))
            return
        for e in out_edges.get(v, ()):
            acc.append(e)
            dfs(int(fg.e_dst[e]), acc)
            acc.pop()

    dfs(int(fg.source(p)), [])
    return paths


def brute_force(graph: Graph, profile: Profile, formulation: str, limit, *,
                window: int = 15, move_state: bool = False,
                async_candidates: int | None = None, async_min_bytes: int | None = None) -> float:
    """Minimum predicted seconds over all combinations of paths; inf if none is feasible.
    `limit`: bytes at every kernel, or a sequence with one per kernel."""
    fg = build_flow_graphs(graph, formulation, window=window, move_state=move_state,
                           async_candidates=async_candidates,
                           kernel_seconds=candidate_seconds(profile),
                           async_min_bytes=async_min_bytes)
    K = len(graph.kernels)
    Q = fg.num_gadgets
    bw = profile.bandwidths
    free = set(int(s) for s in fg.storages)
    fixed_live = np.zeros(K)
    for t in graph.tensors:
        if t.id not in free:
            fixed_live[t.first:t.last + 1] += t.nbytes
    nonview = [k.index for k in graph.kernels if not k.view]
    limit = np.broadcast_to(np.asarray(limit, dtype=float), (K,))[nonview]
    per_tensor = []
    for p, s in enumerate(fg.storages.tolist()):
        t = graph.tensors[s]
        options = []
        for path in _paths(fg, p):
            fast = np.zeros(K, dtype=bool)  # tier during each kernel
            sync = 0.0
            load = np.zeros(K)
            verts = [int(fg.e_dst[e]) for e in path]
            tier = "slow" if verts[0] % 3 == PMEM else "fast"
            initial = tier
            # tier during the kernel of each gadget: of the last vertex of that gadget
            during: dict[int, str] = {}
            after: dict[int, str] = {}
            for i, v in enumerate(verts[:-1]):
                q = v // 3
                during[q] = "slow" if v % 3 == PMEM else "fast"
                w = verts[i + 1]
                after[q] = ("fast" if w < 3 * Q and w % 3 != PMEM else
                            during[q] if w >= 3 * Q else "slow")
            gks = {int(fg.g_kernel[q]): q for q in during}
            cur = initial
            for k in range(t.first, t.last + 1):
                if k in gks:
                    q = gks[k]
                    fast[k] = during[q] == "fast"
                    cur = after[q]
                else:
                    fast[k] = cur == "fast"
            final = during[max(during)] if int(fg.g_kernel[max(during)]) >= K else cur
            if t.producer is None and final != initial:
                continue  # state must end the step where it started
            for e in path:
                if fg.e_kind[e] == NONE:
                    continue
                d = "read" if fg.e_kind[e] == READ else "write"
                secs = bw.move_seconds(t.nbytes, d, bool(fg.e_async[e]))
                if fg.e_async[e]:
                    load[int(fg.g_kernel[fg.e_gadget[e]])] += secs
                else:
                    sync += secs
            bits = np.zeros(K, dtype=np.int64)
            for k in graph.compute_kernels:
                for j, st in enumerate(k.storages):
                    if st == s and not fast[k.index]:
                        bits[k.index] |= 1 << j
            held = fast * float(t.nbytes)
            if t.producer is not None and profile.device != "cuda" and stages_outputs(graph.kernels[t.producer]):
                held[t.producer] = t.nbytes  # an output made for the slow tier is made in fast memory
            options.append((held, bits, sync, load))
        per_tensor.append(options)
    if not per_tensor:
        per_tensor = [[(np.zeros(K), np.zeros(K, dtype=np.int64), 0.0, np.zeros(K))]]
    # vectorised over every combination of tensors 1.., one chunk per option of tensor 0
    used = np.zeros((1, K)) + fixed_live
    bits = np.zeros((1, K), dtype=np.int64)
    sync = np.zeros(1)
    load = np.zeros((1, K))
    for options in per_tensor[1:]:
        u = np.array([o[0] for o in options])
        b = np.array([o[1] for o in options])
        sc = np.array([o[2] for o in options])
        ld = np.array([o[3] for o in options])
        used = (used[:, None, :] + u[None]).reshape(-1, K)
        bits = (bits[:, None, :] | b[None]).reshape(-1, K)
        sync = (sync[:, None] + sc[None]).reshape(-1)
        load = (load[:, None, :] + ld[None]).reshape(-1, K)
        ok = (used[:, nonview] <= limit).all(axis=1)  # adding tensors only adds bytes
        used, bits, sync, load = used[ok], bits[ok], sync[ok], load[ok]
    tables = []
    for k in graph.compute_kernels:
        times = profile.kernels[k.index].times
        tab = np.full(1 << len(k.storages), np.inf)
        for m, v in times.items():
            if profile.device != "cuda" or m == 0:
                tab[m] = v
        tables.append((k.index, tab))
    best = float("inf")
    for u0, b0, s0, l0 in per_tensor[0]:
        uu = used + u0
        ok = (uu[:, nonview] <= limit).all(axis=1)
        if not ok.any():
            continue
        bb = bits[ok] | b0
        total = sync[ok] + s0
        ll = load[ok] + l0
        for k, tab in tables:
            total = total + np.maximum(tab[bb[:, k]], ll[:, k])
        best = min(best, float(total.min()))
    return best
