"""Fast-memory limits: `--ratio D:S` parsing, per-kernel limits, and the smallest limit any
plan can meet.

A limit is either one byte count for every kernel or a sequence of byte counts, one per
kernel of the graph (the capacity at kernel i is limit[i]; a runtime that finds its
allocator fragmenting at some kernels lowers the limit only there).

A ratio D:S is fast:slow memory, so `1:4` puts 20% of the unplanned peak
(`graph.peak_live_bytes`, parameters and inputs included) in fast memory: the paper's
4:1 PMM:DRAM.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Sequence, Union

import numpy as np

from ..graph.types import Graph, Kernel, kernel_signature
from ..profiler.types import Profile
from .plan import staged_outputs

if TYPE_CHECKING:
    from ..profiler.types import KernelCost
    from .plan import Plan

_NUM = r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*"


def parse_ratio(text: str) -> tuple[float, float]:
    """'1:4' -> (1.0, 4.0). Both parts non-negative, not both zero."""
    parts = str(text).split(":")
    if len(parts) != 2:
        raise ValueError(f"the ratio {text!r} must have two parts, fast:slow, like 1:4")
    vals = []
    for part in parts:
        if not re.fullmatch(_NUM, part):
            raise ValueError(f"the ratio {text!r} must be two non-negative numbers, fast:slow, like 1:4")
        vals.append(float(part))
    if vals[0] + vals[1] <= 0:
        raise ValueError(f"the ratio {text!r} has no memory at all; give fast:slow like 1:4")
    return vals[0], vals[1]


def limit_from_ratio(graph: Graph, ratio: str, *, move_state: bool = False) -> int:
    """Fast-memory bytes for a fast:slow ratio of the unplanned peak. The ratio splits what a
    plan can place: state that stays in fast memory (parameters, buffers, optimizer state, the
    batch; live throughout, so part of the peak) is added whole unless `move_state`. This is
    the paper's ratio, whose limit covered the movable tensors only."""
    fast, slow = parse_ratio(ratio)
    fixed = 0 if move_state else sum(t.nbytes for t in graph.tensors if t.fixed)
    movable = max(graph.peak_live_bytes - fixed, 0)
    return int(round(fixed + movable * fast / (fast + slow)))


Limit = Union[int, Sequence[int], np.ndarray]


def kernel_limits(graph: Graph, limit: Limit) -> np.ndarray:
    """The limit as one int64 byte count per kernel (validated)."""
    K = len(graph.kernels)
    if np.ndim(limit) == 0:
        value = limit.item() if isinstance(limit, np.generic) else limit
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"the fast-memory limit must be a whole number of bytes, got {limit!r}")
        if value < 0:
            raise ValueError(f"the fast-memory limit must be non-negative, got {value}")
        return np.full(K, int(value), dtype=np.int64)
    arr = np.asarray(limit)
    if arr.ndim != 1 or len(arr) != K:
        raise ValueError(f"a per-kernel fast-memory limit needs one value per kernel ({K}), "
                         f"got shape {arr.shape}")
    if arr.dtype.kind not in "iu" and not (arr.dtype.kind == "f" and np.all(arr == np.round(arr))):
        raise ValueError("a per-kernel fast-memory limit must hold whole numbers of bytes")
    if K and arr.min() < 0:
        raise ValueError(f"the fast-memory limit must be non-negative; kernel #{int(arr.argmin())} "
                         f"has {int(arr.min())}")
    return arr.astype(np.int64)


def is_per_kernel(limit: Limit) -> bool:
    return np.ndim(limit) != 0


def _fixed_live(graph: Graph, free: set[int]) -> np.ndarray:
    delta = np.zeros(len(graph.kernels) + 1, dtype=np.int64)
    for t in graph.tensors:
        if t.id not in free and t.nbytes:
            delta[t.first] += t.nbytes
            delta[t.last + 1] -= t.nbytes
    return np.cumsum(delta[:-1])


def _allowed(profile: Profile, kernel: int, slowable: int) -> list[int]:
    if profile.device == "cuda":
        return [0]
    return [m for m in profile.kernels[kernel].masks if m & ~slowable == 0]


def kernel_needs(graph: Graph, profile: Profile, formulation: str, *,
                 move_state: bool = False, direct_outputs: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per kernel: (bytes of tensors that must be in fast memory there whatever the plan,
    of which bytes are fixed tensors). Synchronous and asynchronous plans can move any free
    tensor out between kernels, so only the kernel's own IO that no profiled configuration
    lets be slow counts (on CUDA: all of it), and the outputs it makes in fast memory in
    either tier (plan.stages_outputs; none with `direct_outputs`). Static
    plans cannot move, so a tensor that must be fast at one of its kernels is fast for its
    whole life."""
    free = {t.id for t in graph.tensors if t.nbytes > 0 and (move_state or not t.fixed)}
    fixed = _fixed_live(graph, free)
    need = fixed.copy()
    forced: set[int] = set()
    io_need = np.zeros(len(graph.kernels), dtype=np.int64)
    for k in graph.compute_kernels:
        st = profile.kernels[k.index].storages
        slowable = sum(1 << j for j, s in enumerate(st) if s in free)
        masks = _allowed(profile, k.index, slowable)
        if not masks:
            continue
        made = () if direct_outputs else staged_outputs(graph, k)
        best = None
        for m in masks:
            b = sum(graph.tensors[s].nbytes for j, s in enumerate(st)
                    if s in free and (not m >> j & 1 or s in made))
            best = b if best is None else min(best, b)
        io_need[k.index] = best or 0
        if formulation == "static":
            for j, s in enumerate(st):
                if s in free and all(not m >> j & 1 for m in masks):
                    forced.add(s)
    if formulation == "static":
        delta = np.zeros(len(graph.kernels) + 1, dtype=np.int64)
        for s in forced:
            t = graph.tensors[s]
            delta[t.first] += t.nbytes
            delta[t.last + 1] -= t.nbytes
        forced_live = np.cumsum(delta[:-1])
        # IO that is not forced still needs its cheapest configuration
        for k in graph.compute_kernels:
            st = profile.kernels[k.index].storages
            slowable = sum(1 << j for j, s in enumerate(st) if s in free and s not in forced)
            masks = _allowed(profile, k.index, slowable) or [0]
            made = () if direct_outputs else staged_outputs(graph, k)
            io_need[k.index] = min(
                sum(graph.tensors[s].nbytes for j, s in enumerate(st)
                    if s in free and s not in forced and (not m >> j & 1 or s in made)) for m in masks)
        need = fixed + forced_live + io_need
    else:
        need = fixed + io_need
    is_view = np.array([k.view for k in graph.kernels], dtype=bool)
    need[is_view] = fixed[is_view]
    return need, fixed


def kernel_workspace(graph: Graph, profile: Profile, formulation: str, limit_bytes: Limit, *,
                     move_state: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bytes every plan leaves free at each kernel for its transient allocations, i.e. cuDNN
    workspaces (0 on CPU); bytes more a plan may leave there; the choice group of each
    kernel, -1 for none). The profiled time is that of the algorithm that had its whole
    workspace; part of it buys nothing (cuDNN then picks another algorithm, whose time the
    profile does not know). So:

    * a kernel whose profile holds its time without the workspace (timed with only
      `room_without_workspace` bytes free) always gets that small room, where it fits beside
      what the kernel needs in any case; more room, up to one of the rooms it was timed with
      (KernelCost.workspace_options: partial rooms, the whole workspace), is the plan's choice
      where that saves time. cuDNN keeps one algorithm per convolution shape for the whole
      process, the last one that fit, so kernels with the same signature form one group that
      reserves alike, up to the largest of those rooms that fits at every one of them;
    * any other kernel gets its whole workspace where it fits, else none (it then runs with
      what cuDNN finds, at a time the profile does not know)."""
    K = len(profile.kernels)
    ws = np.array([c.workspace for c in profile.kernels], dtype=np.int64)
    group = np.full(K, -1, dtype=np.int64)
    if not ws.any():
        return ws, np.zeros(K, dtype=np.int64), group
    need, _ = kernel_needs(graph, profile, formulation, move_state=move_state)
    room = kernel_limits(graph, limit_bytes) - need
    small = np.array([c.room_without_workspace if _has_choice(c) else -1 for c in profile.kernels],
                     dtype=np.int64)
    small = np.minimum(small, ws)
    known = small >= 0
    base = np.where(known, np.where(small <= room, small, 0), np.where(ws <= room, ws, 0))
    extra = np.zeros(K, dtype=np.int64)
    members: dict[str, list[int]] = {}
    for k in np.flatnonzero(known).tolist():
        if profile.kernels[k].workspace_saves > 0:
            members.setdefault(kernel_signature(graph.kernels[k]), []).append(k)
    for ks in members.values():
        fits = [r for r, _ in profile.kernels[ks[0]].workspace_options() if all(r <= room[k] for k in ks)]
        top = max(fits, default=0)
        if top > max(base[k] for k in ks):
            extra[ks] = top - base[ks]
            group[ks] = ks[0]
    return base, extra, group


def _has_choice(cost: "KernelCost") -> bool:
    return cost.time_without_workspace is not None and cost.workspace > 0 and len(cost.times) == 1


def plan_workspace(graph: Graph, profile: Profile, plan: "Plan") -> np.ndarray:
    """Bytes of workspace `plan` leaves room for at each kernel. Plans made before the choice
    existed reserved it wherever it fit."""
    if plan.workspace is not None:
        return np.asarray(plan.workspace, dtype=np.int64)
    base, extra, _ = kernel_workspace(graph, profile, plan.formulation, plan.limit_at(),
                                      move_state=plan.move_state)
    return base + extra


def minimum_fast_bytes(graph: Graph, profile: Profile, formulation: str = "synchronous", *,
                       move_state: bool = False, direct_outputs: bool = False) -> tuple[int, int]:
    """(smallest fast memory any plan of this formulation needs, the kernel that sets it).
    Baselines spill what does not fit, so they need nothing."""
    if formulation in ("numa", "2lm") or not graph.kernels:
        return 0, 0
    need, _ = kernel_needs(graph, profile, formulation, move_state=move_state, direct_outputs=direct_outputs)
    k = int(np.argmax(need))
    return int(need[k]), k


def infeasible_kernel(graph: Graph, profile: Profile, formulation: str, limit_bytes: Limit, *,
                      move_state: bool = False, direct_outputs: bool = False) -> int | None:
    """The kernel whose limit is furthest below what any plan needs there; None if every
    kernel's limit covers its need."""
    if formulation in ("numa", "2lm") or not graph.kernels:
        return None
    need, _ = kernel_needs(graph, profile, formulation, move_state=move_state, direct_outputs=direct_outputs)
    short = need - kernel_limits(graph, limit_bytes)
    k = int(np.argmax(short))
    return k if short[k] > 0 else None


def explain_infeasible(graph: Graph, profile: Profile, formulation: str, limit_bytes: Limit,
                       move_state: bool = False, solver_said: bool = False, direct_outputs: bool = False) -> str:
    """One sentence: the limit, the smallest feasible one, and the kernel that sets it."""
    from ..cli.common import human_bytes

    need, fixed = kernel_needs(graph, profile, formulation, move_state=move_state, direct_outputs=direct_outputs)
    limits = kernel_limits(graph, limit_bytes)
    per_kernel = is_per_kernel(limit_bytes)
    short = infeasible_kernel(graph, profile, formulation, limit_bytes, move_state=move_state,
                              direct_outputs=direct_outputs)
    k = short if short is not None else int(np.argmax(need))
    kern = graph.kernels[k]
    lim = int(limits[k]) if len(limits) else 0
    what = (f"kernel #{k} {kern.node} ({kern.op}) needs {int(need[k]):,} bytes "
            f"({human_bytes(int(need[k]))}) in fast memory: {int(fixed[k]):,} of fixed tensors live "
            f"there (parameters, inputs, optimizer state) plus {int(need[k] - fixed[k]):,} that "
            f"{'its inputs and outputs' if formulation != 'static' else 'its tensors and the ones a static plan cannot move'} "
            "must keep there")
    made = 0 if direct_outputs or profile.device == "cuda" or kern.view else \
        sum(graph.tensors[s].nbytes for s in staged_outputs(graph, kern))
    if made:
        what += (f", its new outputs ({made:,} bytes) among them, which this runtime makes in fast memory "
                 "(direct_outputs, --direct-outputs: plan as if written straight into the slow tier)")
    where = f" at kernel #{k}" if per_kernel else ""
    if solver_said and short is None:
        if per_kernel:
            return (f"no {formulation} plan fits under the per-kernel fast-memory limits (between "
                    f"{int(limits.min()):,} and {int(limits.max()):,} bytes), though every kernel's "
                    f"limit covers what it needs itself; kernel #{k} {kern.node} needs the most, "
                    f"{int(need[k]):,} bytes: raise the lowest limits")
        return (f"no {formulation} plan fits in {lim:,} bytes ({human_bytes(lim)}) of "
                f"fast memory; at least {int(need[k]):,} bytes are needed, since {what}")
    hint = ("; let that state move (move_state, --move-state) or raise the limit"
            if fixed[k] > lim and not move_state else "")
    return (f"the fast-memory limit of {lim:,} bytes ({human_bytes(lim)}){where} is below "
            f"the {int(need[k]):,} bytes any {formulation} plan needs: {what}{hint}")
