"""Each convolution's cuDNN algorithm chosen before a planned CUDA step runs, under the room the
plan leaves its workspace.

PyTorch keeps one cuDNN algorithm per convolution shape for the life of the process and chooses
it at the shape's first call, among the algorithms whose workspace fits the largest block the
caching allocator has free at that moment (benchmark mode), or the first of cuDNN's heuristic
list whose workspace can be allocated. On an H100 (VGG19 batch 256 under 14.85 GiB) the
capped step's backward convolutions took cuDNN's legacy zero-workspace engines, 54 ms where the
profile measured 7.9 ms, and kept them, also solved 3% below the cap and with benchmark mode on
in every step: not short of memory, so most likely short of a free block at the moment of the
choice, where the plan's room lies beside what the allocator has cached. The profiler timed
each kernel with its room free and nothing else (profiler.noworkspace); here each convolution
of the plan is called once the same way, in the step's process, so that the algorithm the step
finds cached is the one the profile timed.
"""

from __future__ import annotations

from typing import Any

import torch

from ..graph.types import Graph, Kernel
from ..optimizer.plan import Plan
from ..profiler.noworkspace import SLACK_BYTES, leave_room
from ..profiler.profile import signature_key

CONVOLUTIONS = ("aten.convolution.default", "aten.convolution_backward.default")


def algorithm_rooms(graph: Graph, plan: Plan) -> dict[str, tuple[Kernel, int]]:
    """Per convolution signature, one kernel of it and the smallest workspace room the plan
    leaves any kernel of it (cuDNN keeps one algorithm per shape: chosen within the smallest,
    it fits at all of them), at least SLACK_BYTES (the smallest room the profile times). Empty
    for plans that do not say their workspaces."""
    if plan.workspace is None:
        return {}
    rooms: dict[str, tuple[Kernel, int]] = {}
    for k in graph.kernels:
        if k.op not in CONVOLUTIONS:
            continue
        sig = signature_key(k)
        room = max(int(plan.workspace[k.index]), SLACK_BYTES)
        if sig not in rooms or room < rooms[sig][1]:
            rooms[sig] = (k, room)
    return rooms


def choose_algorithms(graph: Graph, plan: Plan, device: torch.device) -> int:
    """Call each convolution of `plan` once on scratch tensors with only its room free (see
    the module docstring); returns how many were called. The scratch memory is given back."""
    from ..profiler.harness import _quiet, prepare_call
    from ..profiler.tiers import dram_alloc

    fast = dram_alloc("cuda")
    done = 0
    for kernel, room in algorithm_rooms(graph, plan).values():
        call: Any = None
        filler: Any = None
        try:
            with _quiet():
                call = prepare_call(kernel, frozenset(), fast, fast, device)
                filler = leave_room(kernel, room, device)
                call.fn()
                torch.cuda.synchronize(device)
            done += 1
        finally:
            call = filler = None  # noqa: F841
    torch.cuda.empty_cache()
    return done
