"""Each convolution's cuDNN algorithm chosen before a planned CUDA step runs, within the room the
plan leaves its workspace.

PyTorch keeps one cuDNN algorithm per convolution shape for the life of the process and chooses
it at the shape's first call: in benchmark mode among the algorithms whose workspace fits the
larger of the device's free memory and the largest block the caching allocator has free at that
moment, else the first of cuDNN's heuristic list whose workspace can be allocated. A later call
first tries the kept algorithm and, where its workspace cannot be allocated, chooses again.

On an H100 (VGG19 batch 256 under 14.85 GiB, benchmark mode) backward convolutions whose
801 MiB workspaces the plan reserved chose cuDNN's legacy zero-workspace engines at their first
call in the step, 54 ms where the profile measured 7.95 ms: most likely the largest free block
was small there, the plan's room lying beside what the allocator had cached. Chosen before the
step with the device left 801 MiB free beside their outputs, the step was slower still (0.846 s
against 0.720 s), most likely the same engines again. So each
convolution is first called with the device free, as the profile timed it (cuDNN keeps the
profiled algorithm, whose workspace the plan reserves at the step's kernels where it reserves
the whole workspace); where that algorithm took more workspace than the plan's room, it is
called again with only the room free (profiler.noworkspace.leave_room, as the profile timed
its rooms): the kept algorithm's workspace then cannot be allocated and cuDNN chooses within
the room.
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
    """Call each convolution of `plan` on scratch tensors, first with the device free, then,
    where the algorithm it chose takes more workspace than the plan's room (beyond the
    allocator's rounding, SLACK_BYTES), again with only that room free (see the module
    docstring); returns how many were called within their room. The workspace is measured on
    a call after the choice, as the profiler measures it. The scratch memory is given back."""
    from ..profiler.harness import _quiet, cuda_workspace, prepare_call
    from ..profiler.tiers import dram_alloc

    fast = dram_alloc("cuda")
    narrowed = 0
    for kernel, room in algorithm_rooms(graph, plan).values():
        call: Any = None
        filler: Any = None
        try:
            with _quiet():
                call = prepare_call(kernel, frozenset(), fast, fast, device)
                call.fn()  # the choice: in benchmark mode it also allocates the candidates' workspace
                if cuda_workspace(call.fn) > room + SLACK_BYTES:
                    filler = leave_room(kernel, room, device)
                    call.fn()
                    torch.cuda.synchronize(device)
                    narrowed += 1
        finally:
            call = filler = None  # noqa: F841
    torch.cuda.empty_cache()
    return narrowed
