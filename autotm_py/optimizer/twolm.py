"""2LM (Optane Memory Mode) baseline, *modeled*: DRAM acts as a hardware cache in front of
the slow tier, and the program places nothing.

The model (every plan it makes has ``modeled=True``): DRAM is a direct-mapped cache of the
slow tier holding at most ``limit`` bytes. At kernel k with L bytes live (fixed tensors
included):

* if L <= limit the working set fits and the kernel runs at its all-fast time T0;
* else a fraction hit = limit / L of its accesses hit DRAM, and
  time = T0 + (1 - hit) * (Tslow - T0) + (1 - hit) * out_bytes / write bandwidth,
  where Tslow is the profiled time with all of the kernel's storages slow (the nearest
  profiled mask, see `plan.kernel_seconds`) and the last term writes back the dirty lines
  of the kernel's outputs that miss (sync write bandwidth of the profile).

The Plan lists every tensor as living in the slow tier (its home) with no moves;
`fast_bytes` is the modeled cache occupancy min(L, limit).
"""

from __future__ import annotations

import numpy as np

from ..graph.types import Graph
from ..profiler.types import Profile
from .plan import PLAN_SCHEMA, SLOW, Plan, SolverStats, TensorPlan, kernel_seconds, plan_metrics


def kernel_seconds_2lm(graph: Graph, profile: Profile, limit_bytes: int) -> np.ndarray:
    """Modeled time of every kernel (views 0)."""
    live = graph.live_bytes
    out = np.zeros(len(graph.kernels))
    for k in graph.compute_kernels:
        t0 = profile.kernels[k.index].times[0]
        L = int(live[k.index])
        if L <= limit_bytes:
            out[k.index] = t0
            continue
        miss = 1.0 - limit_bytes / L
        all_slow = (1 << len(profile.kernels[k.index].storages)) - 1
        penalty = max(kernel_seconds(profile, k.index, all_slow) - t0, 0.0)
        out_bytes = sum(graph.tensors[s].nbytes for s in k.output_storages)
        wb = profile.bandwidths.move_seconds(int(out_bytes * miss), "write", False)
        out[k.index] = t0 + miss * penalty + wb
    return out


def predict_2lm(graph: Graph, profile: Profile, limit_bytes: int) -> float:
    return float(kernel_seconds_2lm(graph, profile, limit_bytes).sum())


def optimize_2lm(graph: Graph, profile: Profile, limit_bytes: int, *, ratio: str | None = None) -> Plan:
    """The modeled 2LM plan for a DRAM cache of `limit_bytes`."""
    if profile.device == "cuda":
        raise ValueError("the 2lm baseline models Optane memory mode on the CPU; use --device cpu")
    tensors = tuple(TensorPlan(t.id, SLOW) for t in graph.tensors)
    predicted = predict_2lm(graph, profile, limit_bytes)
    occupancy = np.minimum(graph.live_bytes, limit_bytes)
    return Plan(
        PLAN_SCHEMA, graph.fingerprint, graph.name, "2lm", profile.device, int(limit_bytes), ratio,
        tensors, (), tuple(0 for _ in graph.kernels), tuple(int(b) for b in occupancy), predicted,
        profile.all_fast_seconds, True, SolverStats(backend="2lm-model"),
        plan_metrics(graph, profile, tensors, (), limit_bytes, ratio, predicted),
        direct_outputs=True,
    )
