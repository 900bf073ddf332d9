"""The objects the rewritten graph calls to move storages between tiers.

A *version* of a storage is a tensor holding all of its bytes in one tier; kernels read
views of a version rebuilt with the shape, stride and offset the kernel expects. Synchronous
copies run on the compute stream; asynchronous ones on a dedicated copy stream, ordered by
events around the kernel they overlap.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


def storage_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 tensor over the whole storage of `t` (no copy)."""
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())


def view_of(version: torch.Tensor, shape: tuple[int, ...], stride: tuple[int, ...], offset: int,
            dtype: torch.dtype) -> torch.Tensor:
    """The kernel's view (shape, stride, element offset, dtype) over a version: a flat uint8
    tensor holding the storage's bytes, possibly at an offset inside a larger block."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    base, rest = divmod(version.storage_offset(), itemsize)
    assert rest == 0, "versions are allocated aligned"
    return torch.empty(0, dtype=dtype, device=version.device).set_(
        version.untyped_storage(), base + offset, shape, stride)


def _bytes(src: torch.Tensor, original: bool) -> torch.Tensor:
    return storage_bytes(src) if original else src


@dataclass
class MoveStats:
    """What the moves of one step did (bytes by direction and kind, unplanned copies)."""

    bytes_to_fast: int = 0
    bytes_to_slow: int = 0
    bytes_async: int = 0
    copies: int = 0
    unplanned_copies: int = 0
    slow_bytes_live_peak: int = 0

    def reset(self) -> None:
        self.bytes_to_fast = self.bytes_to_slow = self.bytes_async = 0
        self.copies = self.unplanned_copies = self.slow_bytes_live_peak = 0


class SlowArena:
    """Slow-tier memory for one step: a bump allocator over one block of the backend's
    memory (the pmem mapping, the NUMA node, or a separate DRAM arena for the modeled tier),
    reset at the start of each step. Sized from the plan: the sum of every slow version."""

    def __init__(self, tier: Any, nbytes: int) -> None:
        self._stack = contextlib.ExitStack()
        alloc = self._stack.enter_context(tier.arena(nbytes))
        self._block = alloc(nbytes)
        self._used = 0

    def alloc(self, nbytes: int) -> torch.Tensor:
        n = (max(nbytes, 1) + 63) // 64 * 64  # keep versions 64-byte aligned for vector copies
        if self._used + n > self._block.numel():
            raise MemoryError(f"slow-tier arena of {self._block.numel()} bytes is full")
        out = self._block[self._used:self._used + n]
        self._used += n
        return out[:nbytes]

    @property
    def used(self) -> int:
        return self._used

    def reset(self) -> None:
        self._used = 0

    def contains(self, storage: torch.UntypedStorage) -> bool:
        lo = self._block.data_ptr()
        return lo <= storage.data_ptr() < lo + self._block.numel()

    def close(self) -> None:
        self._block = torch.empty(0, dtype=torch.uint8)
        self._stack.close()


class Mover(nn.Module):
    """Base: the rewritten graph calls `copy`, `start`, `wait` and `view` on this module."""

    def __init__(self) -> None:
        super().__init__()
        self.stats = MoveStats()

    def view(self, version: torch.Tensor, shape: list[int], stride: list[int], offset: int,
             dtype: torch.dtype) -> torch.Tensor:
        return view_of(version, tuple(shape), tuple(stride), offset, dtype)

    def begin_step(self) -> None:
        self.stats.reset()

    def holds_fast(self, storage: torch.UntypedStorage) -> bool:
        """Whether `storage` lies in fast memory (for counting what a step holds there)."""
        raise NotImplementedError

    def in_flight(self) -> list[torch.Tensor]:
        """Tensors kept referenced between an asynchronous copy's start and its wait."""
        return []

    def _count(self, nbytes: int, to: str, planned: bool, asynchronous: bool = False) -> None:
        self.stats.copies += 1
        if not planned:
            self.stats.unplanned_copies += 1
        self._count_bytes(nbytes, to, asynchronous)

    def _count_bytes(self, nbytes: int, to: str, asynchronous: bool = False) -> None:
        s = self.stats
        if to == "fast":
            s.bytes_to_fast += nbytes
        else:
            s.bytes_to_slow += nbytes
        if asynchronous:
            s.bytes_async += nbytes


class CpuMover(Mover):
    """DRAM is fast; slow versions live in a `SlowArena` of the chosen backend."""

    def __init__(self, arena: SlowArena) -> None:
        super().__init__()
        self.arena = arena

    def begin_step(self) -> None:
        super().begin_step()
        self.arena.reset()

    def holds_fast(self, storage: torch.UntypedStorage) -> bool:
        return not self.arena.contains(storage)

    def empty(self, nbytes: int, tier: str) -> torch.Tensor:
        """A flat uint8 buffer of `nbytes` in `tier`, for a kernel to write its output into."""
        return self.arena.alloc(nbytes) if tier == "slow" else torch.empty(nbytes, dtype=torch.uint8)

    def copy(self, src: torch.Tensor, to: str, planned: bool = True, original: bool = False) -> torch.Tensor:
        data = _bytes(src, original)
        n = data.numel()
        dst = self.arena.alloc(n) if to == "slow" else torch.empty(n, dtype=torch.uint8)
        dst.copy_(data)
        self._count(n, to, planned)
        self.stats.slow_bytes_live_peak = max(self.stats.slow_bytes_live_peak, self.arena.used)
        return dst

    # CPU copies have no second engine to overlap with: an "async" move runs at its kernel.
    def start(self, src: torch.Tensor, to: str, original: bool = False, lo: int = 0,
              hi: int | None = None) -> torch.Tensor:
        """An async move's destination, with bytes [lo, hi) of `src` copied (all by default)."""
        n = _bytes(src, original).numel()
        dst = self.arena.alloc(n) if to == "slow" else torch.empty(n, dtype=torch.uint8)
        self.stats.slow_bytes_live_peak = max(self.stats.slow_bytes_live_peak, self.arena.used)
        self.stats.copies += 1
        return self.resume(dst, src, to, original, lo, n if hi is None else hi)

    def resume(self, handle: torch.Tensor, src: torch.Tensor, to: str, original: bool, lo: int,
               hi: int) -> torch.Tensor:
        """Copy bytes [lo, hi) of `src` into the destination `handle` (the next piece)."""
        handle[lo:hi].copy_(_bytes(src, original)[lo:hi])
        self._count_bytes(hi - lo, to, asynchronous=True)
        return handle

    def wait(self, handle: torch.Tensor) -> torch.Tensor:
        return handle


@dataclass
class _Pending:
    src: torch.Tensor
    dst: torch.Tensor
    done: torch.cuda.Event = field(repr=False)


class CudaMover(Mover):
    """Device memory is fast; pinned host memory is slow. Pinned buffers come from PyTorch's
    caching host allocator, which reuses freed blocks and records the streams that still use
    a block, so a buffer is never handed out again while a copy reads or writes it."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.copy_stream = torch.cuda.Stream(device=device)
        self._pending: dict[int, _Pending] = {}
        self._slow_live = 0

    def _alloc(self, n: int, to: str) -> torch.Tensor:
        if to == "fast":
            return torch.empty(n, dtype=torch.uint8, device=self.device)
        try:
            return torch.empty(n, dtype=torch.uint8, pin_memory=True)
        except RuntimeError as exc:
            raise MemoryError(f"could not allocate {n} bytes of pinned host memory: {exc}") from None

    def copy(self, src: torch.Tensor, to: str, planned: bool = True, original: bool = False) -> torch.Tensor:
        data = _bytes(src, original)
        dst = self._alloc(data.numel(), to)
        dst.copy_(data, non_blocking=True)  # on the compute stream: ordered with the kernels
        self._count(data.numel(), to, planned)
        return dst

    def start(self, src: torch.Tensor, to: str, original: bool = False, lo: int = 0,
              hi: int | None = None) -> torch.Tensor:
        """Begin a copy (of bytes [lo, hi) of `src`; all by default) on the copy stream, after
        everything issued so far on the compute stream (the source is ready and the
        destination's memory is free there)."""
        data = _bytes(src, original)
        dst = self._alloc(data.numel(), to)
        self.stats.copies += 1
        return self.resume(dst, src, to, original, lo, data.numel() if hi is None else hi)

    def resume(self, handle: torch.Tensor, src: torch.Tensor, to: str, original: bool, lo: int,
               hi: int) -> torch.Tensor:
        """Copy bytes [lo, hi) of `src` into `handle` on the copy stream, after everything
        issued so far on the compute stream (the next piece of a sliced move)."""
        data = _bytes(src, original)
        dst = handle
        compute = torch.cuda.current_stream(self.device)
        self.copy_stream.wait_stream(compute)
        with torch.cuda.stream(self.copy_stream):
            dst[lo:hi].copy_(data[lo:hi], non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.copy_stream)
        # Both ends stay referenced here until `wait` has made the compute stream wait for the
        # copy, so that when the graph drops them their blocks return to the compute stream's
        # pool at once. record_stream would instead keep each block from every stream until
        # the allocator sees the copy's event complete; with the copy stream running behind,
        # that memory piles up, the cap is reached and the allocator synchronizes the device
        # to free its cache (a retry), which ends all overlap.
        self._pending[id(dst)] = _Pending(data, dst, done)
        self._count_bytes(hi - lo, to, asynchronous=True)
        return dst

    def wait(self, handle: torch.Tensor) -> torch.Tensor:
        """Make the compute stream wait for the copy that produced `handle`; from here on the
        source and destination may be freed and reused on the compute stream."""
        p = self._pending.pop(id(handle), None)
        if p is not None:
            torch.cuda.current_stream(self.device).wait_event(p.done)
        return handle

    def holds_fast(self, storage: torch.UntypedStorage) -> bool:
        return storage.device.type == "cuda"

    def in_flight(self) -> list[torch.Tensor]:
        return [t for p in self._pending.values() for t in (p.src, p.dst)]

    def begin_step(self) -> None:
        super().begin_step()
        if self._pending:  # a step that failed mid-way: its copies must end before memory is reused
            self.copy_stream.synchronize()
            self._pending.clear()
