"""The Plan: where every tensor lives at every kernel, which moves run when, and what the
optimizer predicts. Every formulation and baseline returns one; it is self-contained for a
runtime that inserts moves into the FX graph.

Move semantics: a sync ``to_fast`` runs just before ``kernel``; a sync ``to_slow`` runs just
after ``kernel`` and frees the fast copy; an async move runs concurrently with ``kernel`` and
completes by its end. An async move with ``slices`` runs in pieces instead, each concurrently
with its own kernel and complete by that kernel's end, in the order of the storage's bytes: a
fetch's pieces at ``kernel`` and the kernels after it before the storage's next use, a
write-back's at kernels after the storage was last written up to ``kernel`` (where the fast
copy is freed). A tensor whose segment says fast during a kernel and slow after it, with no
``to_slow`` move there, drops its fast copy for free (its slow copy is valid).
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..graph.types import Graph, Kernel
from ..profiler.harness import direct_out_variant
from ..profiler.types import Profile

PLAN_SCHEMA = 1
FAST, SLOW = "fast", "slow"


@dataclass(frozen=True)
class Move:
    storage: int
    direction: str  # "to_fast" (slow -> fast, a read) or "to_slow" (fast -> slow, a write)
    kind: str  # "sync" or "async"
    kernel: int
    nbytes: int
    # async only: (kernel, bytes) pieces in kernel order summing to nbytes; () = the whole
    # copy at `kernel`
    slices: tuple[tuple[int, int], ...] = ()

    def pieces(self) -> tuple[tuple[int, int], ...]:
        """(kernel, bytes) of each piece of the copy: its slices, or the whole at `kernel`."""
        return self.slices or ((self.kernel, self.nbytes),)

    def shares(self) -> tuple[tuple[int, float], ...]:
        """(kernel, share of the copy's bytes and time) of each piece."""
        return tuple((k, nb / self.nbytes if self.nbytes else 1.0) for k, nb in self.pieces())


@dataclass(frozen=True)
class TensorPlan:
    """Placement path of one storage: its tier when it comes to life, then one
    (kernel, tier during the kernel, tier after it) per gadget. Fixed tensors have no
    segments and stay in `initial` for their whole life. With movable state, a state
    tensor's last segment may sit at kernel index len(graph.kernels): its tier at the end
    of the step (equal to `initial`)."""

    storage: int
    initial: str
    segments: tuple[tuple[int, str, str], ...] = ()

    def tier_at(self, kernel: int) -> str:
        """Tier during `kernel` (the caller makes sure the tensor is live there)."""
        kernels = [s[0] for s in self.segments]
        i = bisect.bisect_right(kernels, kernel) - 1
        if i < 0:
            return self.initial
        k, during, after = self.segments[i]
        return during if k == kernel else after


@dataclass(frozen=True)
class SolverStats:
    build_seconds: float = 0.0
    solve_seconds: float = 0.0
    status: str = "none"
    gap: float = 0.0
    objective: float = 0.0
    variables: int = 0
    constraints: int = 0
    nonzeros: int = 0
    backend: str = "none"


@dataclass(frozen=True)
class Plan:
    schema: int
    graph_fingerprint: str
    graph_name: str
    formulation: str
    device: str
    limit_bytes: int
    ratio: str | None
    tensors: tuple[TensorPlan, ...]
    moves: tuple[Move, ...]
    kernel_masks: tuple[int, ...]
    fast_bytes: tuple[int, ...]  # per kernel (held_bytes_per_kernel); 2lm: its cache's occupancy
    predicted_seconds: float
    all_fast_seconds: float
    modeled: bool
    solver: SolverStats
    metrics: Mapping[str, Any] = field(default_factory=dict)
    move_state: bool = False
    async_window: int = 15
    # the asynchronous formulation's candidate restriction (None: the whole window)
    async_candidates: int | None = None
    # per-kernel fast-memory limits when the plan was made under them (limit_bytes is then
    # their maximum); None: limit_bytes at every kernel
    kernel_limits: tuple[int, ...] | None = None
    # tensors smaller than this had no asynchronous candidates (None: every tensor had them)
    async_min_bytes: int | None = None
    # bytes of kernel workspace (cuDNN) the plan leaves room for at each kernel; a kernel
    # given less than its measured workspace is predicted at its time without one. None in
    # plans made before this field: the workspace wherever it fit, at the profiled time.
    workspace: tuple[int, ...] | None = None
    # the asynchronous formulation's longest copy span in kernels (0: each copy at one kernel)
    copy_spans: int = 0
    # every kernel writes its outputs straight into the slow tier, as the original's runtime
    # did (the baselines, the paper's experiments); False: the outputs this runtime makes in
    # fast memory count there (stages_outputs)
    direct_outputs: bool = False

    # ---- queries --------------------------------------------------------------------
    def tensor_plan(self, storage: int) -> TensorPlan:
        return self._by_storage[storage]

    @property
    def _by_storage(self) -> dict[int, TensorPlan]:
        cached = self.__dict__.get("_index")
        if cached is None:
            cached = {tp.storage: tp for tp in self.tensors}
            object.__setattr__(self, "_index", cached)
        return cached

    def fast_at(self, storage: int, kernel: int) -> bool:
        """Is `storage` in fast memory during `kernel`?"""
        return self.tensor_plan(storage).tier_at(kernel) == FAST

    def limit_at(self) -> np.ndarray:
        """The fast-memory limit at each kernel (bytes)."""
        if self.kernel_limits is not None:
            return np.asarray(self.kernel_limits, dtype=np.int64)
        return np.full(len(self.kernel_masks), self.limit_bytes, dtype=np.int64)

    @property
    def slowdown(self) -> float:
        return self.predicted_seconds / self.all_fast_seconds if self.all_fast_seconds else math.nan

    @property
    def bytes_moved(self) -> int:
        return sum(m.nbytes for m in self.moves)

    @property
    def peak_fast_bytes(self) -> int:
        return max(self.fast_bytes, default=0)

    # ---- files ----------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "schema": self.schema, "graph_fingerprint": self.graph_fingerprint,
            "graph_name": self.graph_name, "formulation": self.formulation,
            "device": self.device, "limit_bytes": self.limit_bytes, "ratio": self.ratio,
            "predicted_seconds": self.predicted_seconds, "all_fast_seconds": self.all_fast_seconds,
            "modeled": self.modeled, "move_state": self.move_state,
            "async_window": self.async_window, "async_candidates": self.async_candidates,
            "kernel_limits": None if self.kernel_limits is None else list(self.kernel_limits),
            "async_min_bytes": self.async_min_bytes,
            "workspace": None if self.workspace is None else list(self.workspace),
            "copy_spans": self.copy_spans, "direct_outputs": self.direct_outputs,
            "solver": asdict(self.solver),
            "metrics": dict(self.metrics),
            "kernel_masks": list(self.kernel_masks), "fast_bytes": list(self.fast_bytes),
            "tensors": [[t.storage, t.initial, [list(s) for s in t.segments]] for t in self.tensors],
            "moves": [[m.storage, m.direction, m.kind, m.kernel, m.nbytes]
                      + ([[list(x) for x in m.slices]] if m.slices else []) for m in self.moves],
        }

    @staticmethod
    def from_json(d: Mapping[str, Any], graph: Graph | None = None) -> "Plan":
        if not isinstance(d, Mapping) or "schema" not in d:
            raise ValueError("this file is not an autotm plan")
        if d["schema"] != PLAN_SCHEMA:
            raise ValueError(f"the plan file has schema {d['schema']!r}, but this autotm-py reads "
                             f"plan schema {PLAN_SCHEMA}; optimize again to make a new plan")
        if graph is not None and d["graph_fingerprint"] != graph.fingerprint:
            raise ValueError(
                f"the plan was made for another graph ({d.get('graph_name')}, fingerprint "
                f"{d['graph_fingerprint']}), not for {graph.name} batch {graph.batch} "
                f"(fingerprint {graph.fingerprint}); optimize this workload again")
        return Plan(
            d["schema"], d["graph_fingerprint"], d.get("graph_name", ""), d["formulation"],
            d["device"], int(d["limit_bytes"]), d.get("ratio"),
            tuple(TensorPlan(int(s), i, tuple((int(a), b, c) for a, b, c in segs))
                  for s, i, segs in d["tensors"]),
            tuple(Move(int(s), di, k, int(n), int(b),
                       tuple((int(a), int(c)) for a, c in rest[0]) if rest else ())
                  for s, di, k, n, b, *rest in d["moves"]),
            tuple(int(m) for m in d["kernel_masks"]), tuple(int(b) for b in d["fast_bytes"]),
            float(d["predicted_seconds"]), float(d["all_fast_seconds"]), bool(d["modeled"]),
            SolverStats(**d["solver"]), dict(d.get("metrics", {})),
            bool(d.get("move_state", False)), int(d.get("async_window", 15)),
            # absent in plans written before these fields existed: the whole window, one limit
            None if d.get("async_candidates") is None else int(d["async_candidates"]),
            None if d.get("kernel_limits") is None else tuple(int(b) for b in d["kernel_limits"]),
            None if d.get("async_min_bytes") is None else int(d["async_min_bytes"]),
            None if d.get("workspace") is None else tuple(int(b) for b in d["workspace"]),
            int(d.get("copy_spans", 0)),
            # plans written before the field counted no output in fast memory for the slow tier
            bool(d.get("direct_outputs", True)),
        )

    def save(self, path: str) -> None:
        with open(path, "w") as fh:
            json.dump(self.to_json(), fh, separators=(",", ":"))

    @staticmethod
    def load(path: str, graph: Graph | None = None) -> "Plan":
        try:
            with open(path) as fh:
                d = json.load(fh)
        except json.JSONDecodeError:
            raise ValueError(f"{path} is not a plan file (it is not valid JSON)") from None
        return Plan.from_json(d, graph)


# ---- computations shared by every strategy and by the verifier -------------------------
def fast_intervals(graph: Graph, tp: TensorPlan) -> list[tuple[int, int]]:
    """Inclusive kernel ranges during which the storage occupies fast memory."""
    t = graph.tensors[tp.storage]
    out: list[tuple[int, int]] = []

    def put(a: int, b: int, tier: str) -> None:
        a, b = max(a, t.first), min(b, t.last)
        if tier == FAST and a <= b:
            out.append((a, b))

    prev, tier = t.first, tp.initial
    for k, during, after in tp.segments:
        put(prev, k - 1, tier)
        put(k, k, during)
        prev, tier = k + 1, after
    put(prev, t.last, tier)
    return out


def fast_bytes_per_kernel(graph: Graph, tensors: Iterable[TensorPlan]) -> np.ndarray:
    """Fast-memory bytes held at each kernel (fixed tensors included via their plans)."""
    delta = np.zeros(len(graph.kernels) + 1, dtype=np.int64)
    for tp in tensors:
        nb = graph.tensors[tp.storage].nbytes
        for a, b in fast_intervals(graph, tp):
            delta[a] += nb
            delta[b + 1] -= nb
    return np.cumsum(delta[:-1])


def stages_outputs(kernel: Kernel) -> bool:
    """Whether the runtime makes `kernel`'s new outputs in fast memory whatever their tier.
    PyTorch kernels allocate their own outputs; only an op with an out= overload of its own
    (harness.direct_out_variant: matrix products, pointwise and reduction kernels) writes
    straight into a buffer in the slow tier. Convolutions and their backward do not: an
    output the plan sends to the slow tier is made in fast memory and copied after the kernel."""
    return direct_out_variant(kernel) is None


def staged_outputs(graph: Graph, kernel: Kernel) -> tuple[int, ...]:
    """The storages `kernel` makes in fast memory whatever their tier (stages_outputs)."""
    return graph.made_by(kernel) if stages_outputs(kernel) else ()


def staged_bytes_per_kernel(graph: Graph, tensors: Iterable[TensorPlan]) -> np.ndarray:
    """Bytes of the outputs each kernel sends to the slow tier through fast memory
    (stages_outputs): they hold fast memory while it runs (CPU; on CUDA every output is made
    in device memory anyway)."""
    out = np.zeros(len(graph.kernels), dtype=np.int64)
    for tp in tensors:
        t = graph.tensors[tp.storage]
        if t.producer is not None and tp.tier_at(t.producer) == SLOW and stages_outputs(graph.kernels[t.producer]):
            out[t.producer] += t.nbytes
    return out


def held_bytes_per_kernel(graph: Graph, tensors: Iterable[TensorPlan], direct_outputs: bool = False) -> np.ndarray:
    """Fast memory a plan counts at each kernel: the tensors in fast memory and, unless every
    kernel writes its outputs straight into the slow tier, the outputs made there for it."""
    tensors = list(tensors)
    held = fast_bytes_per_kernel(graph, tensors)
    return held if direct_outputs else held + staged_bytes_per_kernel(graph, tensors)


def placement_mask(graph: Graph, plans: Mapping[int, TensorPlan], kernel: int) -> int:
    """IO configuration implied by the placements: bit j set = storage j slow."""
    mask = 0
    for j, s in enumerate(graph.kernels[kernel].storages):
        tp = plans.get(s)
        if tp is not None and tp.tier_at(kernel) == SLOW:
            mask |= 1 << j
    return mask


def kernel_seconds(profile: Profile, kernel: int, mask: int, workspace: int | None = None) -> float:
    """Time of a kernel under a placement. Unprofiled masks (only baselines produce them)
    use the profiled mask with the fewest extra slow bits among those with at least these
    slow bits (ties: the slower); with none, the slowest profiled mask. `workspace`: bytes
    the kernel gets for its workspace (None: all it wants); with less, the time of the
    profiled room it covers (KernelCost.seconds_with_room) where the profile has one."""
    kc = profile.kernels[kernel]
    times = kc.times
    if (workspace is not None and mask == 0 and workspace < kc.workspace
            and kc.time_without_workspace is not None):
        return kc.seconds_with_room(workspace)
    if mask in times:
        return times[mask]
    supersets = [m for m in times if m & mask == mask]
    if supersets:
        best = min(supersets, key=lambda m: (bin(m).count("1"), -times[m]))
        return times[best]
    return max(times.values())


def time_terms(graph: Graph, profile: Profile, masks: Iterable[int], moves: Iterable[Move],
                workspace: Sequence[int] | None) -> tuple[dict[int, float], dict[int, float], dict[int, float]]:
    """Per kernel: its time under its mask and workspace, the async copy seconds that overlap
    it (pieces of sliced copies at their own kernels), and the sync copy seconds issued at it."""
    bw = profile.bandwidths
    kt = {k: kernel_seconds(profile, k, m, None if workspace is None else int(workspace[k]))
          for k, m in enumerate(masks) if not graph.kernels[k].view}
    async_load: dict[int, float] = {}
    sync: dict[int, float] = {}
    for mv in moves:
        direction = "read" if mv.direction == "to_fast" else "write"
        secs = bw.move_seconds(mv.nbytes, direction, mv.kind == "async")
        if mv.kind != "async":
            sync[mv.kernel] = sync.get(mv.kernel, 0.0) + secs
            continue
        # a piece costs its share of the whole copy's time (as the ILP prices it)
        for k, share in mv.shares():
            async_load[k] = async_load.get(k, 0.0) + secs * share
    return kt, async_load, sync


def predict_seconds(graph: Graph, profile: Profile, masks: Iterable[int], moves: Iterable[Move],
                    workspace: Sequence[int] | None = None) -> float:
    """Step time: kernels under their masks (and with the workspace each gets; None: all it
    wants), plus sync moves, with async moves hidden behind the kernel they overlap (each
    such kernel costs max(its time, its async traffic))."""
    kt, async_load, sync = time_terms(graph, profile, masks, moves, workspace)
    return sum(sync.values()) + sum(max(t, async_load.get(k, 0.0)) for k, t in kt.items())


def phase_seconds(graph: Graph, profile: Profile, plan: "Plan") -> dict[str, dict[str, float]]:
    """The plan's predicted time before the unplanned peak (the forward pass, where data
    leaves) and from it on (backward and update, where data comes back): its kernels' time,
    its copies' time, and the time in which no copy runs (copy engine idle), by the rule of
    predict_seconds. A phase bound by its copies is at their time only where every kernel
    runs beside one; each async copy stays with the one kernel it overlaps."""
    kt, async_load, sync = time_terms(graph, profile, plan.kernel_masks, plan.moves, plan.workspace)
    peak = graph.peak_kernel
    out: dict[str, dict[str, float]] = {}
    for name, inside in (("before_peak", lambda k: k < peak), ("from_peak", lambda k: k >= peak)):
        ks = [k for k in kt if inside(k)]
        waits = sum(v for k, v in sync.items() if inside(k))
        copies = sum(async_load.get(k, 0.0) for k in ks) + waits
        predicted = sum(max(kt[k], async_load.get(k, 0.0)) for k in ks) + waits
        out[name] = {"kernel_seconds": sum(kt[k] for k in ks), "copy_seconds": copies,
                     "predicted_seconds": predicted, "copy_idle_seconds": predicted - copies}
    return out


def fixed_tensor_plans(graph: Graph, free: set[int]) -> list[TensorPlan]:
    """Plans of the tensors the optimizer did not decide: fast for their whole life."""
    return [TensorPlan(t.id, FAST) for t in graph.tensors if t.id not in free]


def plan_metrics(graph: Graph, profile: Profile, tensors: Iterable[TensorPlan],
                 moves: Iterable[Move], limit_bytes: int, ratio: str | None,
                 predicted: float) -> dict[str, Any]:
    """The metrics of reference 7.3 (bytes and seconds; dram = fast tier, pmem = slow)."""
    plans = {tp.storage: tp for tp in tensors}
    moves = list(moves)
    bw = profile.bandwidths
    m: dict[str, Any] = {}
    for kind, pre in (("sync", ""), ("async", "async_")):
        sel = [mv for mv in moves if mv.kind == kind]
        m[f"num_{pre}move_nodes"] = len(sel)
        m[f"num_pmem_{pre}move_nodes"] = sum(mv.direction == "to_slow" for mv in sel)
        m[f"num_dram_{pre}move_nodes"] = sum(mv.direction == "to_fast" for mv in sel)
        m[f"bytes_{pre}moved"] = sum(mv.nbytes for mv in sel)
        m[f"bytes_{pre}moved_pmem"] = sum(mv.nbytes for mv in sel if mv.direction == "to_slow")
        m[f"bytes_{pre}moved_dram"] = sum(mv.nbytes for mv in sel if mv.direction == "to_fast")
    counts = dict(num_input_tensors=0, num_output_tensors=0, num_dram_input_tensors=0,
                  num_dram_output_tensors=0, bytes_input_tensors=0, bytes_output_tensors=0,
                  bytes_dram_input_tensors=0, bytes_dram_output_tensors=0)
    for k in graph.compute_kernels:
        for side, storages in (("input", k.input_storages), ("output", k.output_storages)):
            for s in storages:
                nb = graph.tensors[s].nbytes
                counts[f"num_{side}_tensors"] += 1
                counts[f"bytes_{side}_tensors"] += nb
                tp = plans.get(s)
                if tp is None or tp.tier_at(k.index) == FAST:
                    counts[f"num_dram_{side}_tensors"] += 1
                    counts[f"bytes_dram_{side}_tensors"] += nb
    m["num_kernels"] = len(graph.compute_kernels)
    m.update(counts)
    m["move_time"] = sum(
        bw.move_seconds(mv.nbytes, "read" if mv.direction == "to_fast" else "write", False)
        for mv in moves if mv.kind == "sync")
    m["io_size"] = graph.io_bytes
    m["dram_limit"] = int(limit_bytes)
    m["ratio"] = ratio
    m["predicted_runtime"] = predicted
    return m
