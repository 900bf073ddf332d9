"""Stage 2: profile a Graph into a Profile, through the kernel cache.

Kernels are deduplicated by signature (op overload, argument values, shapes, strides and dtypes
of every input and output, and which of them share a storage); each unique kernel is measured
once per IO configuration, and each measurement is committed to the cache as it completes.

IO configurations (bit j of a mask = storage j of `kernel.storages` in the slow tier). Fixed
storages (parameters, buffers, optimizer state, inputs) stay fast; the k non-fixed ones vary:
* k <= PRUNE_ABOVE (6): all 2^k placements;
* k >  PRUNE_ABOVE: pruned to all-fast, all-slow and each single storage slow (k + 2).
What is timed:
* every configuration's reference is the all-fast call made the way the step makes it (the op
  allocates its outputs): key `func:dram:0`;
* `model` tier: nothing else; slow placements are derived with the Optane model (`modeled`);
* `pmem`/`numa`: every configuration is timed. Outputs that no input aliases go to their tier
  through the op's out= variant; such a configuration costs
  t_func(0) + t_out(mask) - t_out(0), so the allocation the step pays stays counted once.
  Ops without an out= variant are timed with their slow outputs copied into the tier;
* CUDA: the all-fast configuration only (all inputs and outputs in device memory), and for
  kernels whose workspace is at least noworkspace.MIN_WORKSPACE, that configuration again
  with no room for the workspace (key `noworkspace:dram:0`; see noworkspace.py).
A kernel that cannot be replayed is recorded with its reason (not retried on the next run) and
costed as the bytes it touches over the measured read bandwidth (`modeled`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from ..graph.types import Graph, Kernel, kernel_signature
from . import bandwidth as bwmod
from . import noworkspace
from .cache import CacheError, KernelCache, KernelRow
from .fingerprint import device_fingerprint
from .harness import ReplayError, TimingPolicy, out_variant, release_cuda_state, resolve_op, time_kernel
from .model import OptaneModel, storage_bytes
from .tiers import ModelTier, TierError, open_slow_tier
from .types import Bandwidths, KernelCost, Profile

PRUNE_ABOVE = 6
NO_WORKSPACE = "noworkspace:dram:0"  # cache key of a CUDA kernel's time without its workspace
KERNEL_POLICY = TimingPolicy(warmup=1, min_runs=3, min_seconds=0.03, max_runs=200)


def partial_key(share: int) -> str:
    """Cache key of a CUDA kernel's time with 1/`share` of its workspace free."""
    return f"room{share}:dram:0"


def profile_signature(kernel: Kernel) -> str:
    """`kernel_signature` plus the aliasing pattern (which inputs/outputs share a storage),
    which decides what a mask over `kernel.storages` means."""
    pos = {s: j for j, s in enumerate(kernel.storages)}
    alias = [pos[m.storage] for m in kernel.inputs + kernel.outputs]
    return kernel_signature(kernel) + "|" + json.dumps(alias)


def signature_key(kernel: Kernel) -> str:
    """Compact cache key of a kernel's signature."""
    import hashlib

    return hashlib.sha256(profile_signature(kernel).encode()).hexdigest()[:32]


def kernel_masks(graph: Graph, kernel: Kernel) -> tuple[int, ...]:
    """IO configurations profiled for `kernel` (see the module docstring for the pruning)."""
    free = [j for j, s in enumerate(kernel.storages) if not graph.tensors[s].fixed]
    if len(free) <= PRUNE_ABOVE:
        masks = set()
        for sub in range(1 << len(free)):
            masks.add(sum(1 << free[i] for i in range(len(free)) if sub >> i & 1))
        return tuple(sorted(masks))
    every = sum(1 << j for j in free)
    return tuple(sorted({0, every, *(1 << j for j in free)}))


@dataclass(frozen=True)
class Job:
    """One configuration to time: `variant` 'func' or 'out', `mask` over kernel.storages."""

    variant: str
    mask: int

    def key(self, tier_key: str) -> str:
        return f"{self.variant}:{'dram' if self.mask == 0 else tier_key}:{self.mask}"


def _needs_out(kernel: Kernel, mask: int) -> bool:
    ins = set(kernel.input_storages)
    return any(mask >> j & 1 and s not in ins for j, s in enumerate(kernel.storages))


def _jobs(kernel: Kernel, masks: set[int], real_tier: bool) -> list[Job]:
    jobs = [Job("func", 0)]
    if not real_tier:
        return jobs
    has_out = None
    for m in sorted(masks - {0}):
        if _needs_out(kernel, m):
            if has_out is None:
                try:
                    has_out = out_variant(resolve_op(kernel.op)) is not None
                except ReplayError:
                    has_out = False
            if has_out:
                if Job("out", 0) not in jobs:
                    jobs.append(Job("out", 0))
                jobs.append(Job("out", m))
                continue
        jobs.append(Job("func", m))
    return jobs


@contextlib.contextmanager
def _progress(enabled: bool, total: int, what: str = "") -> Iterator[Callable[[str], None]]:
    if not enabled or total == 0:
        yield lambda desc: None
        return
    from rich.console import Console
    from rich.progress import (BarColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    cols = (TextColumn(f"profiling{' ' + what if what else ''}"), BarColumn(), TextColumn("kernel {task.completed}/{task.total}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.description}"))
    with Progress(*cols, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task("", total=total)

        def advance(desc: str) -> None:
            bar.update(task, advance=1, description=desc)

        yield advance


def _cpu_busy() -> tuple[float, float]:
    """(seconds of CPU all processes used, seconds this process used) so far; (0, 0) off Linux."""
    import os

    try:
        with open("/proc/stat") as fh:
            f = [int(x) for x in fh.readline().split()[1:]]
        idle = f[3] + (f[4] if len(f) > 4 else 0)
        tick = os.sysconf("SC_CLK_TCK")
        t = os.times()
        return (sum(f[:8]) - idle) / tick, t.user + t.system
    except (OSError, ValueError, IndexError):
        return 0.0, 0.0


def _failure_estimate(kernel: Kernel, bw: Bandwidths) -> float:
    reads, writes = storage_bytes(kernel)
    n = sum(reads) + sum(writes)
    return bw.move_seconds(n, "read") if n else 0.0


def profile(graph: Graph, device: str = "cpu", slow_tier: str | None = None, cache: Any = None, *,
            progress: bool = True, policy: TimingPolicy = KERNEL_POLICY,
            on_measurement: Callable[[int], None] | None = None,
            bandwidth_sizes: tuple[int, ...] = bwmod.DEFAULT_SIZES, cudnn_benchmark: bool = True,
            fingerprint: str | None = None) -> Profile:
    """Time every kernel of `graph` under its IO configurations, through the kernel cache.

    `slow_tier`: "model", "pmem:PATH" or "numa:NODE" on CPU (None: a memory-only NUMA node if
    there is one, else "model"); CUDA uses pinned host memory. `cache`: a cache file or folder,
    an open KernelCache, or None for AUTOTM_CACHE / the project's kernels_cache/.
    `on_measurement(n)` is called after the n-th new measurement is committed.
    `cudnn_benchmark=False` profiles cuDNN's heuristic algorithm choice instead of the
    benchmarked one (smaller workspaces); its rows are kept apart in the cache.
    `fingerprint`: the profile of another machine, from the rows the cache holds under that
    device fingerprint (or the one in the cache that contains each |-separated part of it,
    such as "H200|cudnn=heuristic"); nothing is
    measured, so it needs no such device here, and a row the cache lacks is a CacheError."""
    start = time.perf_counter()
    busy0 = _cpu_busy()
    if device not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; use cpu or cuda")
    if fingerprint is not None:
        return _cached_profile(graph, device, slow_tier, cache, fingerprint, bandwidth_sizes, start)
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device cuda was asked for, but this machine has no usable CUDA device")
        if slow_tier not in (None, "pinned"):
            raise ValueError("on CUDA the slow tier is pinned host memory; drop --slow-tier")
        torch.backends.cudnn.benchmark = cudnn_benchmark
        tier: Any = _pinned_tier()
    else:
        tier = open_slow_tier(slow_tier)
    real_tier = device == "cpu" and not tier.modeled
    own_cache = not isinstance(cache, KernelCache)
    kc = KernelCache.open(cache, device) if own_cache else cache
    try:
        fp = device_fingerprint(device) + ("" if cudnn_benchmark or device != "cuda" else "|cudnn=heuristic")
        prof = _profile(graph, device, tier, real_tier, kc, progress, policy, on_measurement,
                        bandwidth_sizes, start, fp)
    finally:
        if own_cache:
            kc.close()
        tier.close()
        if device == "cuda":
            release_cuda_state()
    # Other processes on the same cores inflate every timing (a 2-thread parallel region
    # waits a whole scheduler slice for a busy core): say so rather than hide it.
    busy1 = _cpu_busy()
    wall = time.perf_counter() - start
    others = max(0.0, (busy1[0] - busy0[0]) - (busy1[1] - busy0[1])) / wall if wall > 0 else 0.0
    stats = dict(prof.stats, other_cpu_load=round(others, 2))
    if prof.stats["configs_measured"] and wall > 1 and others > 0.25:
        stats["notices"] = [*stats["notices"], f"other processes kept {others:.1f} CPU cores busy "
                            "while profiling: the timings taken now are inflated"]
    if progress and stats["notices"]:
        from rich.console import Console

        for n in stats["notices"]:
            Console(stderr=True).print(f"[yellow]note:[/] {n}", highlight=False)
    return dataclasses.replace(prof, stats=stats)


def _pinned_tier() -> ModelTier:
    """CUDA's slow tier: pinned host memory, its copies measured (no model)."""
    return ModelTier(spec="pinned", key="pinned", modeled=False, note="pinned host memory")


def _cached_profile(graph: Graph, device: str, slow_tier: str | None, cache: Any, fingerprint: str,
                    bandwidth_sizes: tuple[int, ...], start: float) -> Profile:
    """profile(..., fingerprint=...): another machine's profile, from the cache alone."""
    if device == "cuda" and slow_tier not in (None, "pinned"):
        raise ValueError("on CUDA the slow tier is pinned host memory; drop --slow-tier")
    own_cache = not isinstance(cache, KernelCache)
    kc = KernelCache.open(cache, device) if own_cache else cache
    try:
        known = sorted(kc.info()["devices"])
        fp = fingerprint if fingerprint in known else None
        if fp is None:
            parts = fingerprint.split("|")
            hits = [f for f in known if all(p in f for p in parts)]
            if len(hits) != 1:
                which = "no device fingerprint" if not hits else f"{len(hits)} device fingerprints"
                raise CacheError(f"{kc.path} holds {which} containing every part of {fingerprint!r}; "
                                 f"it holds: {'; '.join(known) or 'none'}")
            fp = hits[0]
        if device == "cuda":
            tier: Any = _pinned_tier()
        else:
            tier = ModelTier() if slow_tier in (None, "model") else None
            if tier is None:
                raise ValueError("a CPU profile from the cache alone models its slow tier; "
                                 "drop --slow-tier or give model")
        return _profile(graph, device, tier, False, kc, False, KERNEL_POLICY, None, bandwidth_sizes,
                        start, fp, measure=False)
    finally:
        if own_cache:
            kc.close()


def _missing(what: str, fp: str, kc: KernelCache) -> CacheError:
    return CacheError(f"{kc.path} lacks {what} for {fp}: profile this workload on that machine "
                      "(or import its rows with autotm cache import)")


def _profile(graph: Graph, device: str, tier: Any, real_tier: bool, kc: KernelCache, progress: bool,
             policy: TimingPolicy, on_measurement: Callable[[int], None] | None,
             bandwidth_sizes: tuple[int, ...], start: float, fp: str, measure: bool = True) -> Profile:
    notices = [n for n in (kc.notice,) if n]
    # ---- bandwidths (cached per device and tier) -----------------------------------------
    bw_tier = "dram" if tier.key == "model" else tier.key
    bw = kc.bandwidths(fp, bw_tier)
    if bw is not None and measure and bw.sizes[-1] < bandwidth_sizes[-1]:
        bw = None  # cached by a shorter probe: measure the sizes asked for
    bandwidths_measured = bw is None
    bw_start = time.perf_counter()
    if bw is None and not measure:
        raise _missing(f"the {bw_tier} copy bandwidths", fp, kc)
    if bw is None:
        if progress:
            from rich.console import Console

            Console(stderr=True).print(f"measuring copy bandwidths ({bw_tier}, 1 MiB to "
                                       f"{bandwidth_sizes[-1] >> 20} MiB) ...")
        bw = bwmod.measure_cuda(bandwidth_sizes) if device == "cuda" else bwmod.measure_cpu(tier, bandwidth_sizes)
        kc.put_bandwidths(fp, bw_tier, bw)
    bandwidth_seconds = time.perf_counter() - bw_start
    model = OptaneModel()
    if tier.modeled:
        bw = model.bandwidths(bw)

    # ---- unique kernels and the configurations each needs ---------------------------------
    groups: dict[str, list[Kernel]] = {}
    for k in graph.compute_kernels:
        groups.setdefault(signature_key(k), []).append(k)
    # CUDA: one configuration, every input and output in device memory (as AutoTM's GPU path)
    masks_of = {k.index: kernel_masks(graph, k) if device == "cpu" else (0,) for k in graph.kernels}
    rows = kc.kernel_rows(fp)
    todo: list[tuple[str, Kernel, list[Job]]] = []
    jobs_of: dict[str, list[Job]] = {}
    cached_jobs = 0
    pruned = 0
    for sig, ks in groups.items():
        masks = set().union(*(masks_of[k.index] for k in ks))
        pruned += any(len([s for s in k.storages if not graph.tensors[s].fixed]) > PRUNE_ABOVE for k in ks)
        jobs = _jobs(ks[0], masks, real_tier)
        jobs_of[sig] = jobs
        missing = [j for j in jobs if (sig, j.key(tier.key)) not in rows]
        cached_jobs += len(jobs) - len(missing)
        if missing:
            todo.append((sig, ks[0], missing))

    if todo and not measure:
        raise _missing(f"{sum(len(m) for _, _, m in todo)} timings of {len(todo)} of this graph's "
                       f"{len(groups)} unique kernels", fp, kc)
    # ---- measure what the cache lacks, committing each result -----------------------------
    measured = 0
    workspaces = kc.workspaces(fp) if device == "cuda" else {}
    with _progress(progress, len(todo)) as advance:
        for sig, k, missing in todo:
            for job in missing:
                slow = frozenset(j for j in range(len(k.storages)) if job.mask >> j & 1)
                try:
                    t = time_kernel(k, slow, tier, device, policy, use_out=job.variant == "out")
                    row = KernelRow(fp, sig, job.key(tier.key), k.op, t.seconds, t.runs)
                    if device == "cuda" and job.mask == 0:
                        kc.put_workspace(fp, sig, t.workspace)
                        workspaces[sig] = t.workspace
                except ReplayError as exc:
                    row = KernelRow(fp, sig, job.key(tier.key), k.op, None, 0, error=str(exc))
                except TierError:
                    raise
                kc.put_kernel(row)
                rows[(sig, row.mask_key)] = row
                measured += 1
                if on_measurement is not None:
                    on_measurement(measured)
            advance(k.op)

    # ---- CUDA: kernels with large workspaces, timed again with less room -----------------
    # without workspace (32 MiB), then each partial share; every pass in child processes of
    # its own (cuDNN keeps one choice per convolution shape and process)
    timed_with_room: dict[str, set[str]] = {}
    if device == "cuda":
        passes: list[tuple[str, str, Callable[[int], int]]] = [
            (NO_WORKSPACE, "without workspace", lambda ws: noworkspace.SLACK_BYTES)]
        passes += [(partial_key(n), f"with 1/{n} of the workspace",
                    lambda ws, n=n: noworkspace.partial_room(ws, n)) for n in noworkspace.PARTIAL_SHARES]
        for key, what, room_of in passes:
            short = [(sig, groups[sig][0]) for sig in groups
                     if workspaces.get(sig, 0) >= noworkspace.MIN_WORKSPACE and (sig, key) not in rows
                     and room_of(workspaces[sig]) > 0]
            if not short:
                continue
            if not measure:
                raise _missing(f"the times {what} of {len(short)} kernels", fp, kc)
            with _progress(progress, len(short), what) as advance:
                def record(i: int, r: noworkspace.Result) -> None:  # called within this iteration
                    nonlocal measured
                    sig, k = short[i]
                    row = KernelRow(fp, sig, key, k.op, r.seconds, r.runs, error=r.error)
                    kc.put_kernel(row)
                    rows[(sig, key)] = row
                    timed_with_room.setdefault(key, set()).add(sig)
                    measured += 1
                    if on_measurement is not None:
                        on_measurement(measured)
                    advance(k.op)

                noworkspace.measure([k for _, k in short], policy, bool(torch.backends.cudnn.benchmark), record,
                                    rooms=[room_of(workspaces[sig]) for sig, _ in short])

    # ---- assemble --------------------------------------------------------------------------
    failed: dict[str, dict[str, Any]] = {}
    costs: list[KernelCost] = []
    any_modeled = tier.modeled and device == "cpu"
    for k in graph.kernels:
        masks = masks_of[k.index]
        if k.view:
            costs.append(KernelCost(k.index, k.storages, {m: 0.0 for m in masks}))
            continue
        sig = signature_key(k)
        base = rows[(sig, Job("func", 0).key(tier.key))]
        modeled = False
        if base.seconds is None:
            failed.setdefault(sig, {"op": k.op, "reason": base.error, "kernels": 0})["kernels"] += 1
            t0 = _failure_estimate(k, bw)
            modeled = any_modeled = True
        else:
            t0 = base.seconds
        times: dict[int, float] = {0: t0}
        for m in masks:
            if m == 0:
                continue
            if not real_tier:
                times[m] = model.kernel_seconds(t0, k, m)
                modeled = True
                continue
            times[m], est = _real_time(rows, sig, tier.key, m, t0, k, bw)
            modeled = modeled or est
            any_modeled = any_modeled or est
        tight = rows.get((sig, NO_WORKSPACE)) if device == "cuda" else None
        ws = workspaces.get(sig, 0)
        partial = []
        for share in noworkspace.PARTIAL_SHARES if tight is not None else ():
            row = rows.get((sig, partial_key(share)))
            if row is not None and row.seconds is not None:
                partial.append((noworkspace.partial_room(ws, share), row.seconds))
        costs.append(KernelCost(k.index, k.storages, times, modeled=modeled, workspace=ws,
                                time_without_workspace=None if tight is None else tight.seconds,
                                room_without_workspace=noworkspace.SLACK_BYTES if tight is not None else 0,
                                partial_workspace=tuple(sorted(partial))))
    unique = len(groups)
    stats = {
        "compute_kernels": len(graph.compute_kernels),
        "view_kernels": len(graph.kernels) - len(graph.compute_kernels),
        "unique_kernels": unique,
        "measured_kernels": len(todo),
        "cached_kernels": unique - len(todo),
        "configs_measured": measured,
        "timed_without_workspace": len(timed_with_room.get(NO_WORKSPACE, ())),
        "timed_with_partial_workspace": len(set().union(*(v for k, v in timed_with_room.items() if k != NO_WORKSPACE))),
        "configs_cached": cached_jobs,
        "configs_per_kernel_max": max((len(v) for v in masks_of.values()), default=0),
        "pruned_kernels": pruned,
        "failed": list(failed.values()),
        "bandwidths_measured": bandwidths_measured,
        "bandwidth_seconds": bandwidth_seconds,
        "seconds": time.perf_counter() - start,
        "cache": str(kc.path),
        "tier_note": tier.note,
        "notices": notices,
        "predicted_step_seconds": sum(c.times[0] for c in costs),
    }
    return Profile(graph.fingerprint, device, fp, tier.spec, tuple(costs), bw,
                   modeled=any_modeled or bw.modeled, stats=stats)


def _real_time(rows: dict[tuple[str, str], KernelRow], sig: str, tier_key: str, mask: int, t0: float,
               k: Kernel, bw: Bandwidths) -> tuple[float, bool]:
    """A measured slow configuration, relative to the step-like all-fast call (see docstring),
    and whether it had to be estimated instead."""
    out = rows.get((sig, Job("out", mask).key(tier_key)))
    if out is not None:
        ref = rows.get((sig, Job("out", 0).key(tier_key)))
        if out.seconds is not None and ref is not None and ref.seconds is not None:
            return max(0.0, t0 + out.seconds - ref.seconds), False
    else:
        r = rows.get((sig, Job("func", mask).key(tier_key)))
        if r is not None and r.seconds is not None:
            return r.seconds, False
    # not replayable in this placement: the all-fast time plus moving its slow bytes
    reads, writes = storage_bytes(k)
    slow_r = sum(b for j, b in enumerate(reads) if mask >> j & 1)
    slow_w = sum(b for j, b in enumerate(writes) if mask >> j & 1)
    return t0 + bw.move_seconds(slow_r, "read") + bw.move_seconds(slow_w, "write"), True
