"""Copy bandwidths between the tiers, measured over sizes from 1 MiB to 1 GiB.

CPU: fast -> slow (write, evict) and slow -> fast (read, fetch), synchronous (nothing else
running) and asynchronous (the copy runs while a matmul loop runs in another thread; the copy's
bandwidth and the matmul's slowdown are both measured). CUDA: pinned host <-> device copies on a
side stream, alone and while a matmul loop runs on the default stream.
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any, Callable, Sequence

import torch

from .harness import TimingPolicy, time_call
from .types import Bandwidths

MiB = 1 << 20
DEFAULT_SIZES: tuple[int, ...] = tuple(MiB * 4**i for i in range(6))  # 1 MiB .. 1 GiB


def copy_sizes(largest: int = 1 << 30) -> tuple[int, ...]:
    """1 MiB, 4 MiB, 16 MiB, ... up to `largest` (at least 1 MiB)."""
    sizes = [MiB]
    while sizes[-1] * 4 <= largest:
        sizes.append(sizes[-1] * 4)
    return tuple(sizes)


POLICY = TimingPolicy(warmup=1, min_runs=3, min_seconds=0.05, max_runs=50)


def _with_compute(copy: Callable[[], Any], compute: Callable[[], Any], policy: TimingPolicy
                  ) -> tuple[float, list[float]]:
    """Median copy time while `compute` loops in another thread, and the compute times seen."""
    stop = threading.Event()
    seen: list[float] = []
    started = threading.Event()

    def loop() -> None:
        with torch.no_grad():
            while not stop.is_set():
                t0 = time.perf_counter()
                compute()
                seen.append(time.perf_counter() - t0)
                started.set()

    th = threading.Thread(target=loop, daemon=True)
    th.start()
    started.wait(timeout=30)
    try:
        t = time_call(copy, policy).seconds
    finally:
        stop.set()
        th.join()
    return t, seen


def measure_cpu(tier: Any, sizes: Sequence[int] = DEFAULT_SIZES, policy: TimingPolicy = POLICY) -> Bandwidths:
    """Bandwidths between DRAM and `tier` (a slow-tier backend; the model tier is DRAM)."""
    a = torch.randn(512, 512)
    b = torch.randn(512, 512)
    c = torch.empty(512, 512)

    def compute() -> None:
        for _ in range(4):
            torch.mm(a, b, out=c)

    base = time_call(compute, TimingPolicy(warmup=2, min_runs=5, min_seconds=0.2, max_runs=100)).seconds
    rs, ws, ra, wa, slow = [], [], [], [], []
    for n in sizes:
        fast = torch.ones(n, dtype=torch.uint8)  # touched: page faults stay out of the timing
        with tier.arena(n) as alloc:
            s = alloc(n)
            s.fill_(1)
            rs.append(n / time_call(lambda: fast.copy_(s), policy).seconds)
            ws.append(n / time_call(lambda: s.copy_(fast), policy).seconds)
            t, seen_r = _with_compute(lambda: fast.copy_(s), compute, policy)
            ra.append(n / t)
            t, seen_w = _with_compute(lambda: s.copy_(fast), compute, policy)
            wa.append(n / t)
            seen = seen_r + seen_w
            if seen:
                slow.append(statistics.median(seen) / base)
            del s
        del fast
    slowdown = statistics.median(slow) if slow else 1.0
    return Bandwidths(tuple(sizes), tuple(rs), tuple(ws), tuple(ra), tuple(wa), max(1.0, slowdown))


def measure_cuda(sizes: Sequence[int] = DEFAULT_SIZES, policy: TimingPolicy = POLICY) -> Bandwidths:
    """Pinned host <-> device bandwidths, alone and concurrent with a matmul on another stream."""
    dev = torch.device("cuda")
    side = torch.cuda.Stream()
    a = torch.randn(4096, 4096, device=dev)
    c = torch.empty_like(a)

    def mm_batch(n: int) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            torch.mm(a, a, out=c)
        end.record()
        return start, end  # type: ignore[return-value]

    for _ in range(3):
        torch.mm(a, a, out=c)
    torch.cuda.synchronize()
    s, e = mm_batch(20)
    e.synchronize()
    per_mm = s.elapsed_time(e) / 1000 / 20

    def timed_copies(dst: torch.Tensor, src: torch.Tensor, reps: int) -> float:
        times = []
        with torch.cuda.stream(side):
            for _ in range(reps):
                s0, e0 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s0.record(side)
                dst.copy_(src, non_blocking=True)
                e0.record(side)
                times.append((s0, e0))
        side.synchronize()
        return statistics.median(s0.elapsed_time(e0) / 1000 for s0, e0 in times)

    rs, ws, ra, wa, slow = [], [], [], [], []
    for n in sizes:
        host = torch.ones(n, dtype=torch.uint8, pin_memory=True)
        devb = torch.ones(n, dtype=torch.uint8, device=dev)
        reps = max(policy.min_runs, min(policy.max_runs, int(policy.min_seconds / max(n / 20e9, 1e-6)) + 1))
        timed_copies(devb, host, 1)  # warm-up
        timed_copies(host, devb, 1)
        rs.append(n / timed_copies(devb, host, reps))
        ws.append(n / timed_copies(host, devb, reps))
        for direction, (dst, src) in (("read", (devb, host)), ("write", (host, devb))):
            # enough matmuls on the default stream to cover every copy of the side stream
            est = reps * n / (rs[-1] if direction == "read" else ws[-1])
            n_mm = max(5, int(est / per_mm * 1.5) + 2)
            torch.cuda.current_stream().synchronize()
            s, e = mm_batch(n_mm)
            t = timed_copies(dst, src, reps)
            e.synchronize()
            (ra if direction == "read" else wa).append(n / t)
            slow.append(s.elapsed_time(e) / 1000 / n_mm / per_mm)
        del host, devb
    slowdown = statistics.median(slow) if slow else 1.0
    return Bandwidths(tuple(sizes), tuple(rs), tuple(ws), tuple(ra), tuple(wa), max(1.0, slowdown))
