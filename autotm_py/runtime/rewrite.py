"""Plan -> rewritten FX graph: move nodes inserted where the plan says.

Every storage the plan ever puts in the slow tier gets *versions*: the original value (in
fast memory, where the producing kernel put it) and copies made by move nodes. Each kernel
argument on such a storage is rewired to a view of the version in the tier the plan gives
for that kernel. Once the plan drops a version (a write to the slow tier, or a fast copy
released after its stretch), nothing references it any more and the generated code frees it
after its last use. Inserted nodes carry `node.meta["autotm"]` describing what they do.

A kernel's output planned straight into the slow tier is written there where the op has an
out= overload of its own (profiler.harness.direct_out_variant): the node calls it with
buffers the mover allocates, in the slow tier for those outputs.

Rules the plan cannot express are kept safe here, and counted as unplanned copies:
* any other output planned straight into the slow tier is produced in fast memory and
  copied (PyTorch kernels allocate their own outputs; the plan counts it in fast memory at
  its kernel, optimizer.plan.stages_outputs);
* an in-place write to one version makes the other stale: a later free drop to the stale
  tier becomes a copy.
"""

from __future__ import annotations

import copy
import operator
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..graph.types import Graph, Kernel
from ..optimizer.plan import FAST, SLOW, Plan
from ..profiler.harness import direct_out_variant

ORIGINAL = "original"
MOVER = "autotm_mover"


@dataclass(frozen=True)
class RewriteStats:
    planned_moves: int
    unplanned_copies: int
    views: int
    storages: int


def _tensor_leaves(node: fx.Node) -> list[fx.Node]:
    """Tensor-valued node arguments in the order the capture numbered them (args, kwargs)."""
    out: list[fx.Node] = []

    def visit(v: object) -> object:
        if isinstance(v, fx.Node) and isinstance(v.meta.get("val"), torch.Tensor):
            out.append(v)
        return v

    fx.node.map_arg((node.args, node.kwargs), visit)
    return out


def _storage_of(node: fx.Node) -> int | None:
    sids = node.meta.get("autotm_storages") or [None]
    return sids[0]


def _planned_storages(graph: Graph, plan: Plan) -> set[int]:
    moved = {m.storage for m in plan.moves}
    out = set(moved)
    for tp in plan.tensors:
        if graph.tensors[tp.storage].fixed:
            continue
        if tp.initial == SLOW or any(d == SLOW or a == SLOW for _, d, a in tp.segments):
            out.add(tp.storage)
    return out


def insert_moves(gm: fx.GraphModule, graph: Graph, plan: Plan, mover: torch.nn.Module) -> tuple[fx.GraphModule, RewriteStats]:
    """A new GraphModule running `gm` with the plan's moves; `gm` is left unchanged."""
    if plan.graph_fingerprint != graph.fingerprint:
        raise ValueError("the plan was made for another graph; optimize this workload again")
    if plan.move_state:
        raise ValueError("plans that move parameters or optimizer state cannot be run yet; "
                         "optimize without --move-state")
    g = copy.deepcopy(gm.graph)
    planned = _planned_storages(graph, plan)
    tplans = {tp.storage: tp for tp in plan.tensors}
    kernels = graph.kernels
    before: dict[int, list] = defaultdict(list)
    concurrent: dict[int, list] = defaultdict(list)
    after: dict[int, list] = defaultdict(list)
    for m in plan.moves:
        if m.kind == "async":
            # one entry per piece: (move, first byte, end byte, first piece?, last piece?)
            pieces = m.pieces()
            lo = 0
            for i, (k, nb) in enumerate(pieces):
                concurrent[k].append((m, lo, lo + nb, i == 0, i == len(pieces) - 1))
                lo += nb
        elif m.direction == "to_fast":
            before[m.kernel].append(m)
        else:
            after[m.kernel].append(m)
    # kernels that write an output straight into the slow tier through their out= overload
    direct: dict[int, tuple] = {}
    if plan.device != "cuda":
        for k in kernels:
            made_slow = [s for s in graph.made_by(k) if s in planned and tplans[s].tier_at(k.index) == SLOW]
            found = direct_out_variant(k) if made_slow else None
            if found is not None:
                direct[k.index] = (found, set(made_slow))
    drops: dict[int, list[int]] = defaultdict(list)
    writes = {(m.storage, m.kernel) for m in plan.moves if m.direction == "to_slow"}
    for s in planned:
        for k, during, after_tier in tplans[s].segments:
            if during == FAST and after_tier == SLOW and (s, k) not in writes:
                drops[k].append(s)

    first = next(n for n in g.nodes if n.op != "placeholder")
    with g.inserting_before(first):
        mover_node = g.get_attr(MOVER)
    versions: dict[int, dict[str, object]] = {}  # storage -> tier -> ORIGINAL or version node
    source: dict[int, fx.Node] = {}  # storage -> latest node whose value lies on it
    counts = {"planned": 0, "unplanned": 0, "views": 0}
    pending_after: list[tuple[Kernel, list]] = []
    inflight: dict = {}  # a sliced move -> the node holding its destination between pieces
    out_buffers: dict[int, fx.Node] = {}  # storage -> the slow buffer a direct kernel writes it into

    def call(method: str, *args: object, meta: dict) -> fx.Node:
        n = g.call_method(method, (mover_node, *args))
        n.meta["autotm"] = meta
        return n

    def version_node(s: int, tier: str) -> fx.Node:
        v = versions[s][tier]
        return source[s] if v == ORIGINAL else v  # type: ignore[return-value]

    def is_original(s: int, tier: str) -> bool:
        return versions[s][tier] == ORIGINAL

    def copy_to(s: int, tier: str, planned_move: bool) -> None:
        other = SLOW if tier == FAST else FAST
        n = call("copy", version_node(s, other), tier, planned_move, is_original(s, other),
                 meta={"move": "sync", "storage": s, "to": tier, "planned": planned_move})
        versions[s][tier] = n
        counts["planned" if planned_move else "unplanned"] += 1

    def flush_after() -> None:
        """Actions after a kernel, placed after its getitem nodes (before the next kernel)."""
        while pending_after:
            k, handles = pending_after.pop(0)
            written = direct.get(k.index, (None, set()))[1]
            for s in k.output_storages:
                if s in written:
                    versions[s] = {SLOW: out_buffers.pop(s)}
                elif s in planned and s in graph.made_by(k):
                    versions[s] = {FAST: ORIGINAL}
                    if tplans[s].initial == SLOW:
                        copy_to(s, SLOW, False)
                        del versions[s][FAST]
            for m, h, last in handles:
                w = call("wait", h, meta={"move": "async-wait", "storage": m.storage})
                if not last:  # more pieces follow at later kernels
                    inflight[m] = w
                    continue
                versions[m.storage][FAST if m.direction == "to_fast" else SLOW] = w
                if m.direction == "to_slow":
                    versions[m.storage].pop(FAST, None)
            for m in after[k.index]:
                copy_to(m.storage, SLOW, True)
                versions[m.storage].pop(FAST, None)
            for s in drops[k.index]:
                if FAST in versions.get(s, {}):
                    if SLOW not in versions[s]:
                        copy_to(s, SLOW, False)  # the slow copy went stale (in-place write)
                    del versions[s][FAST]

    for node in list(g.nodes):
        if node.op == "call_function" and node.target is operator.getitem:
            s = _storage_of(node)
            if s is not None and s in planned:
                source.setdefault(s, node)
            continue
        if node.op not in ("call_function", "output"):
            continue
        with g.inserting_before(node):
            flush_after()
            k = kernels[node.meta["autotm_kernel"]] if node.op == "call_function" else None
            handles = []
            if k is not None:
                for m in before[k.index]:
                    if FAST not in versions[m.storage]:
                        copy_to(m.storage, FAST, True)
                for m, lo, hi, first_piece, last in concurrent[k.index]:
                    to = FAST if m.direction == "to_fast" else SLOW
                    src = SLOW if to == FAST else FAST
                    meta = {"move": "async", "storage": m.storage, "to": to, "bytes": (lo, hi)}
                    if first_piece:
                        h = call("start", version_node(m.storage, src), to, is_original(m.storage, src),
                                 lo, hi, meta=meta)
                        counts["planned"] += 1
                    else:
                        h = call("resume", inflight.pop(m), version_node(m.storage, src), to,
                                 is_original(m.storage, src), lo, hi, meta=meta)
                    handles.append((m, h, last))
            leaves = _tensor_leaves(node)
            metas = k.inputs if k is not None else [None] * len(leaves)
            replace: dict[int, fx.Node] = {}
            for i, (leaf, meta) in enumerate(zip(leaves, metas)):
                s = meta.storage if meta is not None else _storage_of(leaf)
                if s is None or s not in planned or s not in versions:
                    continue
                if k is None:
                    tier = FAST  # the step's outputs are handed back in fast memory
                elif k.view:
                    tier = FAST if FAST in versions[s] else SLOW
                else:
                    tier = FAST if plan.fast_at(s, k.index) or plan.device == "cuda" else SLOW
                if tier not in versions[s]:
                    copy_to(s, tier, False)
                v = versions[s][tier]
                if v == ORIGINAL:
                    continue
                if meta is None:
                    shape, stride = list(leaf.meta["val"].shape), list(leaf.meta["val"].stride())
                    offset, dtype = leaf.meta["val"].storage_offset(), leaf.meta["val"].dtype
                else:
                    shape, stride, offset = list(meta.shape), list(meta.stride), meta.offset
                    dtype = getattr(torch, meta.dtype)
                replace[i] = call("view", v, shape, stride, offset, dtype, meta={"view": s})
                counts["views"] += 1
            if replace:
                _replace_leaves(node, replace)
            if k is not None and k.index in direct:
                (out_op, names), written = direct[k.index]
                outs = {}
                for name, m in zip(names, k.outputs):
                    tier = SLOW if m.storage in written else FAST
                    buf = call("empty", graph.tensors[m.storage].nbytes, tier, meta={"buffer": m.storage, "tier": tier})
                    if tier == SLOW:
                        out_buffers[m.storage] = buf
                    outs[name] = call("view", buf, list(m.shape), list(m.stride), m.offset, getattr(torch, m.dtype),
                                      meta={"view": m.storage})
                node.target = out_op
                node.kwargs = {**node.kwargs, **outs}
            if k is not None and k.inplace:
                for s in k.output_storages:
                    if s in planned and s in versions and not k.view:
                        tier = FAST if plan.fast_at(s, k.index) or plan.device == "cuda" else SLOW
                        if tier in versions[s]:
                            versions[s] = {tier: versions[s][tier]}
        if k is not None:
            for s in k.output_storages:
                if s in planned:
                    on_original = s not in versions or versions[s].get(FAST) == ORIGINAL
                    if on_original and isinstance(node.meta.get("val"), torch.Tensor) and _storage_of(node) == s:
                        source[s] = node
            pending_after.append((k, handles))

    g.lint()
    root = torch.nn.Module()
    for name, mod in gm.named_children():
        root.add_module(name, mod)
    for name, buf in gm.named_buffers(recurse=False):
        root.register_buffer(name, buf)
    for attr in dir(gm):
        if attr.startswith("_tensor_constant"):
            setattr(root, attr, getattr(gm, attr))
    root.add_module(MOVER, mover)
    out = fx.GraphModule(root, g)
    stats = RewriteStats(counts["planned"], counts["unplanned"], counts["views"], len(planned))
    return out, stats


def _replace_leaves(node: fx.Node, replace: dict[int, fx.Node]) -> None:
    i = -1

    def swap(v: object) -> object:
        nonlocal i
        if isinstance(v, fx.Node) and isinstance(v.meta.get("val"), torch.Tensor):
            i += 1
            return replace.get(i, v)
        return v

    node.args, node.kwargs = fx.node.map_arg((node.args, node.kwargs), swap)
