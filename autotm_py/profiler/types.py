"""The Profile: what each kernel costs under each placement of its tensors, and what a
move costs. The optimizer reads only this type (and the Graph).

An IO configuration of a kernel is a bit mask over `KernelCost.storages` (the storages the
kernel reads or writes, in `Kernel.storages` order): bit j set means storage j is in the
slow tier while the kernel runs. Mask 0 is everything in fast memory. Units: seconds, bytes.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any, Mapping

FAST, SLOW = 0, 1


@dataclass(frozen=True)
class KernelCost:
    """Measured (or modeled) time of one kernel for each profiled IO configuration."""

    kernel: int
    storages: tuple[int, ...]
    times: Mapping[int, float]  # mask -> seconds; always holds mask 0
    modeled: bool = False
    workspace: int = 0  # bytes the kernel allocates and frees while it runs (cuDNN workspaces)
    # mask-0 time when the kernel finds no room for that workspace, only `room_without_workspace`
    # bytes (cuDNN then falls back to algorithms with small ones); None where not measured
    time_without_workspace: float | None = None
    room_without_workspace: int = 0
    # mask-0 (room, seconds) timed with rooms between those two: cuDNN takes the first
    # algorithm whose workspace fits, and one with part of the workspace may be nearly as fast
    partial_workspace: tuple[tuple[int, float], ...] = ()

    def time(self, mask: int = 0) -> float:
        return self.times[mask]

    def workspace_options(self) -> tuple[tuple[int, float], ...]:
        """(room, mask-0 seconds) a plan can choose from, smallest room first: the room the
        time without workspace was taken with, the partial rooms, the whole workspace. A
        room that is not faster than a smaller one is left out; () where no choice is known.

        A room is taken to be no faster than any larger one short of the whole workspace
        (each time is the most measured with that room or more): cuDNN, given more room,
        chooses among a superset of algorithms. On an H100 (VGG19 batch 256, benchmark mode)
        profiles had timed backward convolutions at 7.9 ms without workspace but 54 ms with
        1/16 and 1/4 of it, and a plan that left them no room ran them at 54 ms."""
        if self.time_without_workspace is None or not self.workspace:
            return ()
        fast = self.times[0]
        short = sorted({(min(self.room_without_workspace, self.workspace), max(self.time_without_workspace, fast)),
                        *((r, max(t, fast)) for r, t in self.partial_workspace if r < self.workspace)})
        worst = fast
        for i in range(len(short) - 1, -1, -1):
            worst = max(worst, short[i][1])
            short[i] = (short[i][0], worst)
        points = [*short, (self.workspace, fast)]
        out: list[tuple[int, float]] = []
        for r, t in points:
            if out and (r == out[-1][0] or t >= out[-1][1]):
                continue
            out.append((r, t))
        return tuple(out)

    def seconds_with_room(self, room: int) -> float:
        """Mask-0 time with `room` bytes free for the workspace (all it wants: the profiled
        time; less: the best option that fits, or the smallest's time where none does)."""
        opts = self.workspace_options()
        if room >= self.workspace or not opts:
            return self.times[0]
        fit = [t for r, t in opts if r <= room]
        return fit[-1] if fit else opts[0][1]

    @property
    def workspace_saves(self) -> float:
        """Seconds the workspace saves over running without it (0 where unknown)."""
        opts = self.workspace_options()
        return max(0.0, opts[0][1] - self.times[0]) if opts else 0.0

    @property
    def masks(self) -> tuple[int, ...]:
        return tuple(sorted(self.times))

    def slow_storages(self, mask: int) -> tuple[int, ...]:
        return tuple(s for j, s in enumerate(self.storages) if mask >> j & 1)


@dataclass(frozen=True)
class Bandwidths:
    """Copy bandwidths in bytes/second by transfer size. `read` is slow -> fast (fetch),
    `write` is fast -> slow (evict). Asynchronous figures are measured while a compute
    kernel runs; `async_compute_slowdown` is how much that kernel slowed (1.0 = not at all)."""

    sizes: tuple[int, ...]
    read_sync: tuple[float, ...]
    write_sync: tuple[float, ...]
    read_async: tuple[float, ...]
    write_async: tuple[float, ...]
    async_compute_slowdown: float = 1.0
    modeled: bool = False

    def bandwidth(self, nbytes: int, direction: str, asynchronous: bool = False) -> float:
        table = {
            ("read", False): self.read_sync, ("write", False): self.write_sync,
            ("read", True): self.read_async, ("write", True): self.write_async,
        }[(direction, asynchronous)]
        i = bisect.bisect_left(self.sizes, nbytes)
        if i <= 0:
            return table[0]
        if i >= len(self.sizes):
            return table[-1]
        lo, hi = self.sizes[i - 1], self.sizes[i]
        w = (nbytes - lo) / (hi - lo)
        return table[i - 1] * (1 - w) + table[i] * w

    def move_seconds(self, nbytes: int, direction: str, asynchronous: bool = False) -> float:
        """Time to copy `nbytes` one way."""
        return nbytes / self.bandwidth(nbytes, direction, asynchronous) if nbytes else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "sizes": list(self.sizes), "read_sync": list(self.read_sync),
            "write_sync": list(self.write_sync), "read_async": list(self.read_async),
            "write_async": list(self.write_async),
            "async_compute_slowdown": self.async_compute_slowdown, "modeled": self.modeled,
        }

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> "Bandwidths":
        return Bandwidths(
            tuple(d["sizes"]), tuple(d["read_sync"]), tuple(d["write_sync"]),
            tuple(d["read_async"]), tuple(d["write_async"]),
            d.get("async_compute_slowdown", 1.0), d.get("modeled", False),
        )


@dataclass(frozen=True)
class Profile:
    """Costs of one Graph on one device and slow tier. `kernels[i]` is kernel i's cost
    (view kernels cost 0 in every configuration)."""

    graph_fingerprint: str
    device: str  # "cpu" or "cuda"
    device_fingerprint: str
    slow_tier: str  # "model", "pmem:PATH", "numa:NODE" or "pinned" (CUDA host memory)
    kernels: tuple[KernelCost, ...]
    bandwidths: Bandwidths
    modeled: bool = False  # some number in here comes from the bandwidth model
    stats: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def time(self, kernel: int, mask: int = 0) -> float:
        return self.kernels[kernel].times[mask]

    @property
    def all_fast_seconds(self) -> float:
        """Predicted step time with every tensor in fast memory."""
        return sum(k.times[0] for k in self.kernels)
