"""A planned device-memory arena: every allocation of the process carved out of one block, at
offsets planned from a recorded step (the original's nGraph placed each tensor at an offset it
planned; PyTorch's caching allocator does not).

Why: under a cap the caching allocator fragments. On an H200 (VGG19 batch 256 under 14.85
GiB, expandable segments) it freed its cache 11 times a step to serve requests the plan had
left room for, and each time synchronized the streams: the GPU idled 0.123 s of a 0.589 s step
and most copies ran unhidden. Without expandable segments the plans ran out of memory until
the whole step was cut by 25%. A step whose allocations repeat, as a planned step's do, can
instead be recorded once and then given a layout (`pack`) in which nothing that is live at the
same time overlaps: no fragmentation by construction, and a layout that does not fit says by
how many bytes (`Layout.top` against the budget) before the step runs.

The allocator itself is C (arena.c, built with the system's compiler on first use) behind
PyTorch's pluggable CUDA allocator (`install_cuda_arena`, which must run before anything else
touches CUDA in the process; arena_torch.cpp turns a refused request into PyTorch's
out-of-memory error and answers cuDNN's question for the largest free block). Its logic has
no device in it, so `Arena` also runs over any address range: the tests drive it on a CPU.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

ALIGN = 512  # as arena.c: every size and offset a multiple of it
EV_ALLOC, EV_FREE, EV_FAIL = 1, 2, 3
BLOCK = np.dtype([("off", np.int64), ("size", np.int64), ("serial", np.int64)])
_SOURCE = Path(__file__).with_name("arena.c")


class ArenaError(RuntimeError):
    """The arena cannot be built or installed; the message is one sentence for the user."""


def _pack_in_order(size: np.ndarray, t0: np.ndarray, t1: np.ndarray,
                   obstacles: Sequence[tuple[int, int, int, int]], order: np.ndarray) -> np.ndarray:
    """Each block in `order` at the lowest offset free over its whole life."""
    m, n = len(obstacles), len(size)
    lo = np.empty(m + n, dtype=np.int64)
    hi, s0, s1 = np.empty_like(lo), np.empty_like(lo), np.empty_like(lo)
    for j, (off, nb, a, b) in enumerate(obstacles):
        lo[j], hi[j], s0[j], s1[j] = off, off + nb, a, b
    count = m
    offsets = np.empty(n, dtype=np.int64)
    for i in order:
        live = (s0[:count] < t1[i]) & (t0[i] < s1[:count])
        off = 0
        if live.any():
            a, b = lo[:count][live], hi[:count][live]
            by_offset = np.argsort(a, kind="stable")
            a, b = a[by_offset], b[by_offset]
            reach = np.maximum.accumulate(b)
            before = np.concatenate(([0], reach[:-1]))
            fits = np.flatnonzero(a - before >= size[i])
            off = int(before[fits[0]]) if len(fits) else int(reach[-1])
        offsets[i] = off
        lo[count], hi[count], s0[count], s1[count] = off, off + size[i], t0[i], t1[i]
        count += 1
    return offsets


_NOISE = (0.3, 0.6, 1.0)  # spreads of the orders tried after greedy by size, in turn


def pack(sizes: Sequence[int], starts: Sequence[int], ends: Sequence[int],
         obstacles: Sequence[tuple[int, int, int, int]] = (), tries: int = 0, seed: int = 0) -> np.ndarray:
    """Offsets for blocks live over [start, end) of `size` bytes such that no two live at the
    same time overlap, and none overlaps an obstacle (offset, size, start, end) live with it.
    Greedy by size: the largest first, each at the lowest offset free over its whole life.
    With `tries`, as many more orders by size scaled by log-normal noise (seeded), keeping
    the layout that reaches least far: on VGG19's recorded H100 steps greedy by size spans
    9-11% more than the bytes live at the peak, the best of 180-300 orders 3.9-5.7%
    (benchmarks/recorded_layouts.py)."""
    size = np.asarray(sizes, dtype=np.int64)
    t0, t1 = np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)
    fixed_top = max((off + nb for off, nb, _, _ in obstacles), default=0)

    def reach(offsets: np.ndarray) -> int:
        return max(fixed_top, int(np.max(offsets + size))) if len(size) else fixed_top

    best = _pack_in_order(size, t0, t1, obstacles, np.lexsort((t0, -size)))
    best_top = reach(best)
    rng = np.random.default_rng(seed)
    for k in range(tries if len(size) > 1 else 0):
        key = -size * np.exp(rng.normal(0.0, _NOISE[k % len(_NOISE)], len(size)))
        offsets = _pack_in_order(size, t0, t1, obstacles, np.lexsort((t0, key)))
        top = reach(offsets)
        if top < best_top:
            best, best_top = offsets, top
    return best


def layout_tries(blocks: int) -> int:
    """Orders layout_from_log tries beyond greedy by size: 300 for a few hundred blocks, fewer
    as each try's cost grows with the square of the blocks (about 5 ms a try at 300)."""
    return int(min(300, 3e7 / max(1, blocks) ** 2))


def live_peak(sizes: Sequence[int], starts: Sequence[int], ends: Sequence[int]) -> int:
    """The most bytes live at once: no layout of these blocks spans less."""
    if len(sizes) == 0:
        return 0
    t = np.concatenate([np.asarray(starts), np.asarray(ends)])
    d = np.concatenate([np.asarray(sizes, dtype=np.int64), -np.asarray(sizes, dtype=np.int64)])
    order = np.lexsort((d, t))  # at one time, frees (negative) before allocations
    return int(np.max(np.cumsum(d[order])))


@dataclass(frozen=True)
class Layout:
    """Where each allocation of a step goes, in the order the step makes them."""

    sizes: np.ndarray  # bytes, as the arena rounds them
    offsets: np.ndarray  # -1: a request that failed when recorded, failed again on replay
    top: int  # how far into the arena the layout reaches (blocks live at the step's start included)
    live_peak: int  # the most bytes live at once in the recorded step (no layout spans less)
    fixed_top: int = 0  # how far the blocks live at the step's start reach: no layout reaches less
    # the blocks live at the step's start that reach furthest: (offset, bytes, freed in the step)
    highest_fixed: tuple[tuple[int, int, bool], ...] = ()

    @property
    def overhead(self) -> float:
        """How much more the layout spans than the bytes live at its peak."""
        return self.top / self.live_peak - 1 if self.live_peak else 0.0


def layout_from_log(events: np.ndarray, live_at_start: np.ndarray, tries: int | None = None) -> Layout:
    """A layout for the step the arena logged (`events`: rows of kind, serial, index in the
    step, size, offset), around the blocks that were live when it began (which stay where they
    are until the step frees them). `tries`: pack's further orders (None: layout_tries)."""
    ev = np.asarray(events, dtype=np.int64).reshape(-1, 5)
    horizon = len(ev)
    freed = {int(s): t for t, s in enumerate(ev[:, 1]) if ev[t, 0] == EV_FREE}
    requests = np.flatnonzero((ev[:, 0] == EV_ALLOC) | (ev[:, 0] == EV_FAIL))
    index = ev[requests, 2]
    if not np.array_equal(np.sort(index), np.arange(len(requests))):
        raise ArenaError("the arena's log of the step is incomplete; give it a larger log")
    sizes = np.empty(len(requests), dtype=np.int64)
    sizes[index] = ev[requests, 3]
    offsets = np.full(len(requests), -1, dtype=np.int64)
    ok = requests[ev[requests, 0] == EV_ALLOC]
    starts = ok
    ends = np.array([freed.get(int(s), horizon) for s in ev[ok, 1]], dtype=np.int64)
    obstacles = [(int(b["off"]), int(b["size"]), 0, freed.get(int(b["serial"]), horizon)) for b in live_at_start]
    tries = layout_tries(len(ok)) if tries is None else tries
    offsets[ev[ok, 2]] = pack(ev[ok, 3], starts, ends, obstacles, tries=tries)
    fixed_top = max((o + nb for o, nb, _, _ in obstacles), default=0)
    top = max([fixed_top] + [int(o + nb) for o, nb in zip(offsets[ev[ok, 2]], ev[ok, 3])])
    peak = live_peak(np.concatenate([[nb for _, nb, _, _ in obstacles], ev[ok, 3]]).astype(np.int64),
                     np.concatenate([np.zeros(len(obstacles), dtype=np.int64), starts]),
                     np.concatenate([[e for _, _, _, e in obstacles], ends]).astype(np.int64))
    highest = sorted(obstacles, key=lambda b: -(b[0] + b[1]))[:3]
    return Layout(sizes, offsets, top, peak, fixed_top,
                  tuple((o, nb, end < horizon) for o, nb, _, end in highest))


MAX_LAYOUT_CUT = 0.25  # the most one repair takes off every limit (as defrag.MAX_STEP_CUT)


def layout_repair(limits: np.ndarray, layout: Layout, budget: int, margin: float = 0.005) -> tuple[np.ndarray, float]:
    """(the next solve's per-kernel limits, the fraction they lost) after a recorded step's
    layout reached `layout.top` > `budget`: every kernel lowered by the layout's overshoot
    plus `margin`, at most MAX_LAYOUT_CUT. Unlike a failed allocation under the caching
    allocator, the overshoot is measured whole, before the step runs out of anything."""
    cut = min(MAX_LAYOUT_CUT, max(0.0, layout.top / budget - 1) + margin)
    return np.floor(np.asarray(limits, dtype=np.int64) * (1 - cut)).astype(np.int64), cut


@dataclass(frozen=True)
class ArenaStats:
    """arena.c's counters, in the order autotm_arena_stat numbers them."""

    in_use: int  # bytes live now
    peak_in_use: int  # the most bytes live at once since the step began
    top: int  # how far into the arena any block reached since the step began
    unplanned: int  # allocations of the step not at their planned offset (with a plan)
    failures: int  # requests refused (a replayed failure included)
    events: int  # log entries of the step
    live: int  # blocks live now
    lost_events: int  # events the full log could not hold
    foreign_frees: int  # frees of addresses the arena never handed out


def allocation_program(graph: Any, plan: Any = None) -> list[tuple[str, int, int]]:
    """A step's allocations from the captured graph's liveness, in the order its generated code
    makes them: ("a", block, bytes) and ("f", block, 0). Before the first kernel the state that
    outlives the step; at each kernel its new storages, then those whose last reader it was. One
    block per storage or, with a plan, per stretch of kernels the plan keeps it in fast memory
    (a kernel's workspace is left out). For sizing a layout without running the step."""
    from ..optimizer.plan import fast_intervals

    end = len(graph.kernels)
    blocks: list[tuple[int, int, int]] = []  # (first kernel, last kernel, bytes); -1: from before the step
    if plan is None:
        blocks = [(-1, end, t.nbytes) if t.fixed else (t.first, t.last, t.nbytes) for t in graph.tensors]
    else:
        for tp in plan.tensors:
            t = graph.tensors[tp.storage]
            for a, b in fast_intervals(graph, tp):
                whole = t.fixed and (a, b) == (t.first, t.last)
                blocks.append((-1, end, t.nbytes) if whole else (a, b, t.nbytes))
    born: dict[int, list[int]] = {}
    dies: dict[int, list[int]] = {}
    for i, (a, b, _) in enumerate(blocks):
        born.setdefault(a, []).append(i)
        dies.setdefault(b, []).append(i)
    program = [("a", i, blocks[i][2]) for i in born.get(-1, ())]
    for k in range(end):
        program += [("a", i, blocks[i][2]) for i in born.get(k, ())]
        program += [("f", i, 0) for i in dies.get(k, ())]
    return program


def replay_program(arena: "Arena", program: list[tuple[str, int, int]]) -> None:
    """Run `program` (allocation_program) through `arena` as one step; what outlives the step
    is freed after it. Raises ArenaError where a request is refused."""
    arena.begin_step()
    addr: dict[int, int] = {}
    for op, ident, nbytes in program:
        if op == "a":
            a = arena.alloc(nbytes)
            if a is None:
                raise ArenaError(f"the arena refused {nbytes} bytes")
            addr[ident] = a
        else:
            arena.free(addr.pop(ident))
    for a in addr.values():
        arena.free(a)


def bound_workspaces(workspace: Sequence[int], set_room: Callable[[int], None]) -> Callable[[Any], Any]:
    """An fx pass (GraphModule -> GraphModule) for a planned step: before each kernel, a call
    of `set_room` with the workspace bytes the plan left room for there (`workspace[k]`, as
    optimizer.limits.plan_workspace gives them). With the arena's `set_room`, cuDNN picks each
    convolution's algorithm within what the plan reserved, as the profile measured it, rather
    than within whatever the cap has left. Unbounded, on an H100 (VGG19 batch 256 under 14.85
    GiB, asynchronous), the recorded step had 0.16 GB more live at once than its plan counted
    and, solved again 8% lower, 0.71 GB more: the room the cut freed was taken again, most
    likely by larger workspaces."""
    room = [int(b) for b in workspace]

    def workspace_room(nbytes: int) -> None:  # a plain function: fx's generated code names it
        set_room(nbytes)

    def apply(gm: Any) -> Any:
        g = gm.graph
        for node in list(g.nodes):
            k = node.meta.get("autotm_kernel") if node.op == "call_function" else None
            if k is None:
                continue
            with g.inserting_before(node):
                g.call_function(workspace_room, (room[k],)).meta["workspace_room"] = k
        gm.recompile()
        return gm

    return apply


def _build(source: Path, compiler: str | None, flags: list[str], deps: list[Path], cache_dir) -> Path:
    """`source` compiled into a shared library, once per content of it and `deps` and `flags`
    (kept in `cache_dir`, default AUTOTM_BUILD_DIR or the user's cache folder)."""
    h = hashlib.sha256(" ".join(flags).encode())
    for f in (source, *deps):
        h.update(f.read_bytes())
    folder = Path(cache_dir or os.environ.get("AUTOTM_BUILD_DIR")
                  or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "autotm-py")
    out = folder / f"{source.stem}-{h.hexdigest()[:16]}.so"
    if out.exists():
        return out
    if compiler is None:
        raise ArenaError("the planned arena needs a C and C++ compiler (cc and c++, or CC= and CXX=) to build its allocator")
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    r = subprocess.run([compiler, "-O2", "-Wall", "-Werror=return-type", "-shared", "-fPIC", "-o", tmp, str(source), *flags],
                       capture_output=True, text=True)
    if r.returncode != 0:
        os.unlink(tmp)
        last = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
        raise ArenaError(f"building the arena's allocator from {source.name} failed: {last}")
    os.replace(tmp, out)  # atomic: a concurrent build finds a whole library or none
    return out


def build_library(cache_dir: str | os.PathLike | None = None) -> Path:
    """arena.c alone (the allocator's logic, no PyTorch in it): what `Arena` drives on any
    machine."""
    return _build(_SOURCE, os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc"), [], [], cache_dir)


def build_torch_library(cache_dir: str | os.PathLike | None = None) -> Path:
    """arena_torch.cpp with arena.c, against this PyTorch's c10: the library PyTorch's
    pluggable allocator loads (install_cuda_arena)."""
    import torch
    from torch.utils import cpp_extension

    libs = cpp_extension.library_paths()
    includes = list(cpp_extension.include_paths())
    if cpp_extension.CUDA_HOME:  # the CUDA runtime's headers, which PyTorch's CUDA headers include
        includes.append(os.path.join(cpp_extension.CUDA_HOME, "include"))
    flags = ["-std=c++17", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
             f"-I{_SOURCE.parent}", *(f"-I{d}" for d in includes),
             *(f"-L{d}" for d in libs), *(f"-Wl,-rpath,{d}" for d in libs), "-ltorch_cuda", "-lc10_cuda", "-lc10"]
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    return _build(_SOURCE.with_name("arena_torch.cpp"), cxx, flags, [_SOURCE], cache_dir)


class Arena:
    """The C arena over `cap` bytes at address `base` (on CUDA, the block install_cuda_arena
    allocated). `limit`: the most bytes live at once (default `cap`); with a larger block than
    the limit, a step is recorded as under an allocator of `limit` bytes that never fragments.
    The library holds one arena per process: a new Arena over it starts afresh."""

    def __init__(self, base: int, cap: int, *, limit: int | None = None, max_live: int = 1 << 16,
                 log_events: int = 1 << 20, library: str | os.PathLike | None = None) -> None:
        lib = ctypes.CDLL(str(library or build_library()))
        i64, p = ctypes.c_int64, ctypes.c_void_p
        lib.autotm_arena_attach.argtypes = [i64, i64, i64, i64]
        lib.autotm_arena_set_limit.argtypes = [i64]
        lib.autotm_arena_set_span.argtypes = [i64]
        lib.autotm_arena_set_plan.argtypes = [p, p, i64]
        lib.autotm_arena_live.restype = p
        lib.autotm_arena_log.restype = p
        lib.autotm_arena_stat.argtypes = [ctypes.c_int]
        lib.autotm_arena_stat.restype = i64
        lib.autotm_try_alloc.argtypes = [ctypes.c_size_t, ctypes.c_int, p]
        lib.autotm_try_alloc.restype = p
        lib.autotm_free.argtypes = [p, ctypes.c_size_t, ctypes.c_int, p]
        lib.autotm_arena_set_room.argtypes = [i64]
        lib.autotm_arena_largest.restype = i64
        if lib.autotm_arena_attach(base, cap, max_live, log_events) != 0:
            raise ArenaError("the arena's bookkeeping could not be allocated")
        self.lib, self.base, self.cap = lib, base, cap
        # views of the C side's own buffers (they live as long as the process)
        self._live = np.frombuffer((ctypes.c_char * (BLOCK.itemsize * max_live)).from_address(lib.autotm_arena_live()),
                                   dtype=BLOCK)
        self._log = np.frombuffer((ctypes.c_char * (40 * log_events)).from_address(lib.autotm_arena_log()),
                                  dtype=np.int64).reshape(log_events, 5)
        self._live_at_start = self._live[:0].copy()
        if limit is not None:
            self.set_limit(limit)

    @property
    def library(self) -> str:
        return self.lib._name

    def stats(self) -> ArenaStats:
        return ArenaStats(*(self.lib.autotm_arena_stat(i) for i in range(len(dataclasses.fields(ArenaStats)))))

    def begin_step(self) -> None:
        """A step begins: its allocations count from the first again, with a fresh log."""
        self._live_at_start = self._live[:self.lib.autotm_arena_stat(6)].copy()
        self.lib.autotm_arena_begin_step()

    def events(self) -> np.ndarray:
        """The step's log so far (a copy): rows of kind, serial, index, size, offset."""
        return self._log[:self.lib.autotm_arena_stat(5)].copy()

    def live_at_start(self) -> np.ndarray:
        """The blocks live when the step began (a copy; BLOCK rows)."""
        return self._live_at_start.copy()

    def layout(self) -> Layout:
        """A layout for the step just logged (layout_from_log)."""
        if self.lib.autotm_arena_stat(7):
            raise ArenaError("the arena's log overflowed during the step; give it more log_events")
        return layout_from_log(self.events(), self._live_at_start)

    def set_plan(self, layout: Layout | None) -> None:
        """Replay `layout` in the steps from the next one on (None: no plan)."""
        if layout is None:
            self.lib.autotm_arena_set_plan(None, None, 0)
            return
        sizes = np.ascontiguousarray(layout.sizes, dtype=np.int64)
        offsets = np.ascontiguousarray(layout.offsets, dtype=np.int64)
        if self.lib.autotm_arena_set_plan(sizes.ctypes.data, offsets.ctypes.data, len(sizes)) != 0:
            raise ArenaError(f"the arena could not keep a plan of {len(sizes)} allocations")

    def set_limit(self, limit: int) -> None:
        """At most `limit` bytes live at once from now on (at most the block's size)."""
        self.lib.autotm_arena_set_limit(limit)

    def set_span(self, span: int) -> None:
        """Every allocation from now on within the block's first `span` bytes: where a layout
        fits a budget, replaying it with span = budget keeps the step's footprint honest."""
        self.lib.autotm_arena_set_span(span)

    def set_room(self, nbytes: int | None) -> None:
        """From now on a query for the largest free block (cuDNN's, before it picks a
        convolution's algorithm) is told at most `nbytes` (None: what the limit allows)."""
        self.lib.autotm_arena_set_room(-1 if nbytes is None else int(nbytes))

    def largest(self) -> int:
        """What a query for the largest free block is told now."""
        return self.lib.autotm_arena_largest()

    def alloc(self, nbytes: int) -> int | None:
        """An allocation as PyTorch makes it: the address, or None where refused."""
        return self.lib.autotm_try_alloc(nbytes, 0, None)

    def free(self, address: int) -> None:
        self.lib.autotm_free(address, 0, 0, None)


def _cuda_driver() -> ctypes.CDLL:
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError:
        raise ArenaError("the planned arena needs the CUDA driver (libcuda.so.1), which this machine lacks") from None


def _check(result: int, what: str) -> None:
    if result != 0:
        raise ArenaError(f"the CUDA driver refused {what} (error {result})")


def driver_alloc(nbytes: int, what: str) -> int:
    """`nbytes` of device memory from the CUDA driver in the current context, outside
    PyTorch's allocator and its accounting; the device pointer."""
    ptr = ctypes.c_uint64()
    _check(_cuda_driver().cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(nbytes)), what)
    return int(ptr.value)


def driver_free(ptr: int) -> None:
    _check(_cuda_driver().cuMemFree_v2(ctypes.c_uint64(ptr)), "freeing a block of its own")


def install_cuda_arena(nbytes: int | None = None, *, limit: int | None = None, reserve: int = 2 << 30,
                       **kwargs) -> Arena:
    """Make the planned arena PyTorch's allocator for CUDA device 0 of this process: one block
    of `nbytes` (default: all the device's free memory but `reserve`, which cuDNN, cuBLAS and
    the CUDA context allocate outside PyTorch), with at most `limit` bytes live at once. Must
    run before anything in the process initializes CUDA through PyTorch; PyTorch's memory
    statistics (`torch.cuda.memory_allocated` and the like) are not available afterwards:
    `Arena.stats` stands for them."""
    import torch

    if torch.cuda.is_initialized():
        raise ArenaError("install the planned arena before anything in this process uses CUDA")
    drv = _cuda_driver()
    _check(drv.cuInit(0), "initialisation")
    dev, ctx = ctypes.c_int(), ctypes.c_void_p()
    _check(drv.cuDeviceGet(ctypes.byref(dev), 0), "device 0")
    _check(drv.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "its primary context")
    _check(drv.cuCtxSetCurrent(ctx), "making that context current")
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    _check(drv.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total)), "a memory query")
    size = int(nbytes if nbytes is not None else free.value - reserve) // ALIGN * ALIGN
    if size <= 0 or size > free.value:
        raise ArenaError(f"an arena of {size} bytes cannot be had: the device has {free.value} bytes free")
    arena = Arena(driver_alloc(size, f"an arena of {size} bytes"), size, limit=limit, library=build_torch_library(), **kwargs)
    # arena_torch.cpp's allocator rather than torch.cuda.memory.CUDAPluggableAllocator, which
    # refuses cuDNN's question for the largest free block (every convolution asks it)
    arena.lib.autotm_install_error.restype = ctypes.c_char_p
    if arena.lib.autotm_install() != 0:
        raise ArenaError(f"PyTorch did not take the planned arena as its allocator: "
                         f"{arena.lib.autotm_install_error().decode()}")
    from .step import make_library_workspaces

    make_library_workspaces(torch.device("cuda"))  # at the arena's bottom
    return arena
