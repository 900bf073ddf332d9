"""First-touch NUMA baseline (reference 6.1): tensors go to fast memory while it has room,
the rest to the slow tier, and nothing ever moves.

The fast tier is modelled by the original's allocator: a best-fit list of blocks over
`limit` bytes with 4096-byte alignment (a request of 0 becomes 4096); a split keeps the
used part at the front; freeing merges neighbouring free blocks. Fixed tensors
(parameters, buffers, inputs, optimizer state) are touched first, since they exist before
the step. Then kernels run in order: each new tensor is allocated when its producer runs
and freed after its last use. Empty tensors take no memory and count as fast.

Kernel times come from the profile under the masks the placements imply; a mask that was
not profiled is priced by `plan.kernel_seconds` (the nearest profiled mask with at least
those slow storages). NUMA is a CPU baseline: on CUDA a kernel cannot run on host memory.
"""

from __future__ import annotations

from ..graph.types import Graph
from ..profiler.types import Profile
from .plan import (FAST, PLAN_SCHEMA, SLOW, Plan, SolverStats, TensorPlan, fast_bytes_per_kernel,
                   placement_mask, plan_metrics, predict_seconds)

ALIGN = 4096


class BestFitAllocator:
    """The reference allocator model; blocks are [offset, size, free]."""

    def __init__(self, limit: int) -> None:
        self.blocks: list[list[int]] = [[0, int(limit), 1]] if limit > 0 else []

    @staticmethod
    def aligned(nbytes: int) -> int:
        return max(ALIGN, -(-nbytes // ALIGN) * ALIGN)

    def allocate(self, nbytes: int) -> int | None:
        """Offset of the new block, or None when no free block is large enough."""
        req = self.aligned(nbytes)
        best, best_left = None, None
        for i, (_, size, free) in enumerate(self.blocks):
            if free and size >= req and (best_left is None or size - req < best_left):
                best, best_left = i, size - req
        if best is None:
            return None
        off, size, _ = self.blocks[best]
        if size == req:
            self.blocks[best][2] = 0
        else:
            self.blocks[best] = [off + req, size - req, 1]
            self.blocks.insert(best, [off, req, 0])
        return off

    def free(self, offset: int) -> None:
        for i, b in enumerate(self.blocks):
            if b[0] == offset:
                b[2] = 1
                break
        else:
            raise KeyError(f"no block at offset {offset}")
        merged: list[list[int]] = []
        for b in self.blocks:
            if merged and merged[-1][2] and b[2]:
                merged[-1][1] += b[1]
            else:
                merged.append(list(b))
        self.blocks = merged


def first_touch(graph: Graph, limit_bytes: int) -> dict[int, str]:
    """Tier of every storage under first-touch allocation."""
    alloc = BestFitAllocator(limit_bytes)
    tier: dict[int, str] = {}
    offset: dict[int, int] = {}

    def touch(t) -> None:
        if t.nbytes == 0:
            tier[t.id] = FAST
            return
        off = alloc.allocate(t.nbytes)
        tier[t.id] = SLOW if off is None else FAST
        if off is not None:
            offset[t.id] = off

    for t in graph.tensors:
        if t.fixed:
            touch(t)
    born: dict[int, list] = {}
    dies: dict[int, list] = {}
    for t in graph.tensors:
        if not t.fixed:
            born.setdefault(t.first, []).append(t)
            dies.setdefault(t.last, []).append(t)
    for k in range(len(graph.kernels)):
        for t in born.get(k, ()):
            touch(t)
        for t in dies.get(k, ()):
            if t.id in offset:
                alloc.free(offset.pop(t.id))
    return tier


def optimize_numa(graph: Graph, profile: Profile, limit_bytes: int, *, ratio: str | None = None) -> Plan:
    """The first-touch NUMA plan for a fast-memory limit."""
    if profile.device == "cuda":
        raise ValueError("the numa baseline models CPU memory tiers; on CUDA every kernel's "
                         "inputs and outputs must be in device memory, so use --device cpu")
    tier = first_touch(graph, limit_bytes)
    tensors = tuple(
        TensorPlan(t.id, tier[t.id],
                   () if t.fixed or t.nbytes == 0 else
                   ((t.producer if t.producer is not None else t.first, tier[t.id], tier[t.id]),))
        for t in graph.tensors)
    plans = {tp.storage: tp for tp in tensors}
    masks = tuple(0 if k.view else placement_mask(graph, plans, k.index) for k in graph.kernels)
    predicted = predict_seconds(graph, profile, masks, ())
    return Plan(
        PLAN_SCHEMA, graph.fingerprint, graph.name, "numa", profile.device, int(limit_bytes), ratio,
        tensors, (), masks, tuple(int(b) for b in fast_bytes_per_kernel(graph, tensors)), predicted,
        profile.all_fast_seconds, bool(profile.modeled), SolverStats(backend="first-touch"),
        plan_metrics(graph, profile, tensors, (), limit_bytes, ratio, predicted),
        direct_outputs=True,  # a model of the operating system's placement: pages, not PyTorch's outputs
    )
