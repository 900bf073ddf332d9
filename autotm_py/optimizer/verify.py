"""Static verifier for any Plan (no execution): the plan is re-derived from the Graph and
the Profile and every claim in it is checked.

* every storage has exactly one placement path, and it is a path of the formulation's flow
  graph (gadgets at the right kernels, only allowed transitions); the moves are exactly the
  paid edges of those paths; fixed tensors stay in fast memory unless state may move;
* kernel IO is resident where required: on CUDA every input and output of every kernel is
  in device memory; on CPU the kernel's mask is the one the placements imply and it was
  profiled (baselines may use unprofiled masks, priced by `plan.kernel_seconds`);
* fast-memory use recomputed at every kernel, async fetches in flight included, plus the
  kernel's workspace (CUDA), stays within that kernel's limit (per-kernel limits when the
  plan has them); the tensors' part equals `fast_bytes`;
* the predicted time recomputed from the plan matches the plan and the solver objective.
"""

from __future__ import annotations

import math

import numpy as np

from ..graph.types import Graph
from ..profiler.types import Profile
from .flowgraph import NONE, READ, build_flow_graphs, candidate_seconds, edge_ids, walk
from .limits import kernel_workspace, plan_workspace
from .plan import FAST, PLAN_SCHEMA, SLOW, Plan, held_bytes_per_kernel, placement_mask, predict_seconds

REL_TOL = 1e-6
SLICED_REL_TOL = 1e-4


class VerificationError(ValueError):
    """The plan breaks a rule; `problems` lists every finding."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        super().__init__(f"the plan is invalid: {problems[0]}{more}")


def verify(plan: Plan, graph: Graph, profile: Profile) -> None:
    """Raise VerificationError if the plan breaks any rule."""
    problems = check(plan, graph, profile)
    if problems:
        raise VerificationError(problems)


def check(plan: Plan, graph: Graph, profile: Profile, max_problems: int = 50) -> list[str]:
    """Every rule the plan breaks, as sentences (empty list = valid)."""
    out: list[str] = []
    if plan.schema != PLAN_SCHEMA:
        return [f"plan schema {plan.schema} is not {PLAN_SCHEMA}"]
    if plan.graph_fingerprint != graph.fingerprint:
        return ["the plan was made for another graph"]
    plans = {}
    for tp in plan.tensors:
        if tp.storage in plans:
            out.append(f"storage {tp.storage} has two placement paths")
        plans[tp.storage] = tp
    missing = [t.id for t in graph.tensors if t.id not in plans]
    if missing:
        out.append(f"{len(missing)} storages have no placement path (first: {missing[0]})")
    if len(plan.kernel_masks) != len(graph.kernels) or len(plan.fast_bytes) != len(graph.kernels):
        out.append("kernel_masks and fast_bytes must have one entry per kernel")
        return out
    if out:
        return out
    for tp in plan.tensors:
        if tp.initial not in (FAST, SLOW) or any(d not in (FAST, SLOW) or a not in (FAST, SLOW)
                                                 for _, d, a in tp.segments):
            out.append(f"storage {tp.storage} has a tier that is neither fast nor slow")
            return out

    form = plan.formulation
    if form in ("static", "synchronous", "asynchronous", "numa"):
        out += _check_paths(plan, graph, profile, "static" if form == "numa" else form)
    elif form == "2lm":
        if plan.moves:
            out.append("a 2LM plan moves nothing (the hardware cache does)")
    else:
        out.append(f"unknown formulation {form!r}")
    if form in ("static", "synchronous", "asynchronous") and not plan.move_state:
        for t in graph.tensors:
            tp = plans[t.id]
            if t.fixed and (tp.initial != FAST or tp.segments):
                out.append(f"fixed tensor {t.id} ({t.name}) leaves fast memory, but state may not move")
                break

    out += _check_slices(plan, graph, plans)

    # kernel IO residency and configurations
    for k in graph.kernels:
        m = plan.kernel_masks[k.index]
        if k.view:
            if m:
                out.append(f"view kernel #{k.index} has a non-zero mask")
            continue
        if form == "2lm":
            continue
        implied = placement_mask(graph, plans, k.index)
        if profile.device == "cuda" and implied:
            slow = [s for j, s in enumerate(k.storages) if implied >> j & 1]
            out.append(f"kernel #{k.index} {k.node} ({k.op}) runs on CUDA with storage {slow[0]} "
                       "in host memory; every kernel's inputs and outputs must be in device memory")
        elif m != implied:
            out.append(f"kernel #{k.index} {k.node} has mask {m}, but the placements imply {implied}")
        elif form != "numa" and m not in profile.kernels[k.index].times:
            out.append(f"kernel #{k.index} {k.node} uses mask {m}, which was never profiled")
        if len(out) >= max_problems:
            return out

    # capacity at every kernel
    if plan.kernel_limits is not None and (len(plan.kernel_limits) != len(graph.kernels) or
                                           max(plan.kernel_limits, default=0) != plan.limit_bytes):
        out.append("kernel_limits must have one entry per kernel, and limit_bytes must be their maximum")
        return out
    if plan.workspace is not None:
        bad = [k for k, b in enumerate(plan.workspace[:len(graph.kernels)])
               if b not in (0, profile.kernels[k].workspace,
                            *(r for r, _ in profile.kernels[k].workspace_options()))]
        if len(plan.workspace) != len(graph.kernels) or bad:
            out.append("workspace must have one entry per kernel, each 0, the kernel's whole measured "
                       "workspace or a room it was timed with"
                       f"{f' (kernel #{bad[0]} has {plan.workspace[bad[0]]:,})' if bad else ''}")
            return out
        _, _, group = kernel_workspace(graph, profile, plan.formulation, plan.limit_at(),
                                       move_state=plan.move_state)
        rooms: dict[int, set[int]] = {}
        for k in np.flatnonzero(group >= 0).tolist():
            rooms.setdefault(int(group[k]), set()).add(int(plan.workspace[k]))
        split = [g for g, v in rooms.items() if len(v) > 1]
        if split:
            out.append(f"kernels of one signature (kernel #{split[0]}'s) reserve their workspace unalike; "
                       "cuDNN keeps one algorithm for all of them")
    if form != "2lm":
        limits = plan.limit_at()
        fb = held_bytes_per_kernel(graph, plan.tensors, plan.direct_outputs)
        need = fb
        if form != "numa":  # a kernel's workspace needs room while it runs (as in the ILP)
            need = fb + plan_workspace(graph, profile, plan)
        over = np.flatnonzero(need > limits)
        if len(over):
            k = int(over[0])
            out.append(f"fast memory at kernel #{k} {graph.kernels[k].node} is {int(need[k]):,} bytes "
                       f"(workspace included), over {'its' if plan.kernel_limits else 'the'} limit "
                       f"of {int(limits[k]):,} ({len(over)} kernels over)")
        if not np.array_equal(fb, np.asarray(plan.fast_bytes, dtype=np.int64)):
            k = int(np.flatnonzero(fb != np.asarray(plan.fast_bytes))[0])
            out.append(f"the plan says {plan.fast_bytes[k]:,} bytes of fast memory at kernel #{k}, "
                       f"the placements give {int(fb[k]):,}")

    # predicted time
    if form == "2lm":
        from .twolm import predict_2lm

        recomputed = predict_2lm(graph, profile, plan.limit_bytes)
    else:
        recomputed = predict_seconds(graph, profile, plan.kernel_masks, plan.moves, plan.workspace)
    if not math.isclose(recomputed, plan.predicted_seconds, rel_tol=REL_TOL, abs_tol=1e-12):
        out.append(f"the plan predicts {plan.predicted_seconds:.9g} s, the plan's own placements and "
                   f"moves give {recomputed:.9g} s")
    if form in ("static", "synchronous", "asynchronous") and plan.solver.status != "none":
        # pieces of sliced copies are the solver's shares rounded to whole (aligned) bytes
        tol = SLICED_REL_TOL if any(m.slices for m in plan.moves) else REL_TOL
        if not math.isclose(recomputed, plan.solver.objective, rel_tol=tol, abs_tol=1e-9):
            out.append(f"the solver's objective {plan.solver.objective:.9g} s differs from the time "
                       f"recomputed from the plan, {recomputed:.9g} s")
    return out[:max_problems]


def _check_slices(plan: Plan, graph: Graph, plans: dict) -> list[str]:
    """Pieces of sliced async copies (plan.Move): whole bytes summing to the copy, at non-view
    kernels in order, a fetch's from its kernel up to the storage's next use, a write-back's
    after the storage was last written up to its kernel, the storage in fast memory at each."""
    out: list[str] = []
    for mv in plan.moves:
        if not mv.slices:
            continue
        t = graph.tensors[mv.storage]
        ks = [k for k, _ in mv.slices]
        what = f"the {mv.direction} copy of storage {mv.storage} at kernel #{mv.kernel}"
        if mv.kind != "async":
            out.append(f"{what} is synchronous but has pieces")
        elif sum(nb for _, nb in mv.slices) != mv.nbytes or any(nb <= 0 for _, nb in mv.slices):
            out.append(f"{what} has pieces that do not add up to its {mv.nbytes:,} bytes")
        elif ks != sorted(set(ks)) or any(k < 0 or k >= len(graph.kernels) or graph.kernels[k].view
                                           for k in ks):
            out.append(f"{what} has pieces at kernels {ks[:6]}: each at its own non-view kernel, in order")
        else:
            users = sorted(([t.producer] if t.producer is not None else []) + list(t.users))
            if mv.direction == "to_fast":
                nxt = next((u for u in users if u > mv.kernel), len(graph.kernels))
                ok = ks[0] >= mv.kernel and ks[-1] < nxt
                where = f"from kernel #{mv.kernel} up to its next use at #{nxt}"
            else:
                writers = [u for u in users if u < mv.kernel and
                           (u == t.producer or mv.storage in graph.kernels[u].output_storages)]
                last = writers[-1] if writers else -1
                ok = ks[0] > last and ks[-1] <= mv.kernel
                where = f"after its last write at #{last} up to kernel #{mv.kernel}"
            if not ok:
                out.append(f"{what} has pieces at kernels {ks[:6]}, outside {where}")
            elif any(plans[mv.storage].tier_at(k) != FAST for k in ks):
                out.append(f"{what} has a piece at a kernel where the storage is not in fast memory")
    return out


def _check_paths(plan: Plan, graph: Graph, profile: Profile, formulation: str) -> list[str]:
    """Each free tensor's segments must trace a SOURCE -> SINK path of its flow graph."""
    out: list[str] = []
    cand = plan.async_candidates if formulation == "asynchronous" else None
    fg = build_flow_graphs(graph, formulation, window=plan.async_window, move_state=plan.move_state,
                           async_candidates=cand,
                           kernel_seconds=candidate_seconds(profile) if cand is not None else None,
                           async_min_bytes=plan.async_min_bytes if formulation == "asynchronous" else None)
    free = {int(s): p for p, s in enumerate(fg.storages)}
    plans = {tp.storage: tp for tp in plan.tensors}
    pairs: list[tuple[int, int]] = []
    owner: list[int] = []
    for t in graph.tensors:
        if t.id not in free:
            continue
        tp = plans[t.id]
        p = free[t.id]
        gk = fg.g_kernel[fg.g_ptr[p]:fg.g_ptr[p + 1]].tolist()
        if [s[0] for s in tp.segments] != gk:
            out.append(f"storage {t.id} has segments at kernels {[s[0] for s in tp.segments][:6]}, "
                       f"its {formulation} gadgets are at {gk[:6]}")
            continue
        path = walk(fg, p, tp.initial == FAST, [(d == FAST, a == FAST) for _, d, a in tp.segments])
        if path is None:
            out.append(f"storage {t.id} changes tier in a way no move explains")
            continue
        pairs += path
        owner += [t.id] * len(path)
    if not pairs:
        return out
    edges = edge_ids(fg, pairs)
    if (edges < 0).any():
        s = owner[int(np.flatnonzero(edges < 0)[0])]
        out.append(f"storage {s} takes a transition that its {formulation} flow graph does not have")
        return out
    paid = edges[fg.e_kind[edges] != NONE]
    implied = sorted(
        (int(fg.storages[fg.e_tensor[e]]), "to_fast" if fg.e_kind[e] == READ else "to_slow",
         "async" if fg.e_async[e] else "sync", int(fg.g_kernel[fg.e_gadget[e]]),
         int(fg.nbytes[fg.e_tensor[e]])) for e in paid.tolist())
    have = sorted((m.storage, m.direction, m.kind, m.kernel, m.nbytes) for m in plan.moves)
    if implied != have:
        extra = sorted(set(have) - set(implied))
        lack = sorted(set(implied) - set(have))
        what = (f"move {extra[0]} is not on any path" if extra else
                f"the paths need move {lack[0]}, which the plan lacks" if lack else
                "moves are listed more than once")
        out.append(what)
    return out
