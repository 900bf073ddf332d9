"""Slow-tier backends on CPU: where the profiler puts the bytes a configuration marks slow.

* ``pmem:PATH`` - memory carved out of a file mapped with PMDK's libpmem (Debian: libpmem1),
  through ctypes. PATH is a directory (autotm-py maps its own unnamed or temporary pool file
  there and removes it), a path that does not exist yet (created and removed), or a Device-DAX
  node (/dev/daxX.Y). On a file system without DAX the mapping works but is ordinary page
  cache; the tier is then labelled "not persistent memory".
* ``numa:NODE`` - memory allocated with libnuma bound to NODE (a CXL expander or a remote
  socket appears as one).
* ``model`` - DRAM; slow placements are derived with the Optane model (see `model.py`).

An existing regular file is never mapped: mapping it would truncate or extend a file that is not
ours.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

Allocator = Callable[[int], torch.Tensor]  # nbytes -> uint8 tensor in the tier
ALIGN = 4096  # tensors carved from a mapping start on a page boundary


class TierError(ValueError):
    """A slow tier that cannot be used; the message is one sentence for the user."""


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def dram_alloc(device: str = "cpu") -> Allocator:
    def alloc(nbytes: int) -> torch.Tensor:
        return torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
    return alloc


def _carve(base: int, size: int) -> Allocator:
    """Bump allocator over [base, base + size): tensors that alias the mapping."""
    used = [0]

    def alloc(nbytes: int) -> torch.Tensor:
        n = _align(max(nbytes, 1))
        if used[0] + n > size:
            raise MemoryError(f"slow-tier arena of {size} bytes is full")
        addr = base + used[0]
        used[0] += n
        buf = (ctypes.c_ubyte * n).from_address(addr)
        return torch.frombuffer(buf, dtype=torch.uint8)

    return alloc


@dataclass
class ModelTier:
    """DRAM standing in for Optane PMM; slow timings come from the model."""

    spec: str = "model"
    key: str = "model"
    modeled: bool = True
    note: str = "modeled: DRAM timings plus the Optane DC PMM bandwidth model"

    @contextlib.contextmanager
    def arena(self, nbytes: int) -> Iterator[Allocator]:
        yield dram_alloc("cpu")

    def close(self) -> None:
        pass


# ---- pmem --------------------------------------------------------------------------------
PMEM_FILE_CREATE = 1 << 0
PMEM_FILE_TMPFILE = 1 << 3


def _load_libpmem() -> ctypes.CDLL:
    name = ctypes.util.find_library("pmem") or "libpmem.so.1"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        raise TierError("the pmem slow tier needs PMDK's libpmem, which is not installed "
                        "(Debian/Ubuntu: apt-get install libpmem1)") from None
    lib.pmem_map_file.restype = ctypes.c_void_p
    lib.pmem_map_file.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_uint,
                                  ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_int)]
    lib.pmem_unmap.restype = ctypes.c_int
    lib.pmem_unmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    lib.pmem_errormsg.restype = ctypes.c_char_p
    lib.pmem_errormsg.argtypes = []
    return lib


@dataclass
class PmemTier:
    """Memory of a file mapped through libpmem."""

    path: str
    spec: str = ""
    key: str = ""
    modeled: bool = False
    note: str = ""
    is_pmem: bool = False
    _lib: ctypes.CDLL | None = field(default=None, repr=False)
    _tmpfile_ok: bool = field(default=True, repr=False)

    def __post_init__(self) -> None:
        self._lib = _load_libpmem()
        p = Path(self.path)
        self.spec = f"pmem:{self.path}"
        if p.exists() and not p.is_dir() and not str(p).startswith("/dev/dax"):
            raise TierError(f"pmem:{self.path} names an existing file, which autotm-py will not "
                            "overwrite; give a directory on the DAX mount or a path that does not exist yet")
        if not p.exists() and not p.parent.is_dir():
            raise TierError(f"pmem:{self.path} cannot be mapped: its folder {p.parent} does not exist")
        with self.arena(2 << 20):  # probe: fail now, with libpmem's reason, not mid-profile
            pass
        self.key = "pmem" if self.is_pmem else "pmem-file"
        self.note = ("persistent memory (DAX)" if self.is_pmem
                     else "file mapped with libpmem, not persistent memory (no DAX): timings are DRAM/page cache")

    def _map(self, nbytes: int) -> tuple[int, int, str | None]:
        assert self._lib is not None
        p = Path(self.path)
        mapped, is_pmem = ctypes.c_size_t(0), ctypes.c_int(0)
        named: str | None = None
        if str(p).startswith("/dev/dax"):
            addr = self._lib.pmem_map_file(str(p).encode(), 0, 0, 0, ctypes.byref(mapped), ctypes.byref(is_pmem))
        elif p.is_dir():
            addr = None
            if self._tmpfile_ok:
                addr = self._lib.pmem_map_file(str(p).encode(), nbytes, PMEM_FILE_CREATE | PMEM_FILE_TMPFILE,
                                               0o600, ctypes.byref(mapped), ctypes.byref(is_pmem))
                self._tmpfile_ok = bool(addr)
            if not addr:  # file systems without O_TMPFILE: a named pool file we remove
                named = str(p / f"autotm-slow-tier-{os.getpid()}.pool")
                addr = self._lib.pmem_map_file(named.encode(), nbytes, PMEM_FILE_CREATE, 0o600,
                                               ctypes.byref(mapped), ctypes.byref(is_pmem))
        else:
            named = str(p)
            addr = self._lib.pmem_map_file(named.encode(), nbytes, PMEM_FILE_CREATE, 0o600,
                                           ctypes.byref(mapped), ctypes.byref(is_pmem))
        if not addr:
            reason = (self._lib.pmem_errormsg() or b"unknown error").decode(errors="replace").strip()
            if named:
                with contextlib.suppress(OSError):
                    os.unlink(named)
            raise TierError(f"pmem:{self.path} cannot be mapped with libpmem: {reason}")
        if mapped.value < nbytes:
            self._lib.pmem_unmap(addr, mapped.value)
            raise TierError(f"pmem:{self.path} maps only {mapped.value} bytes, {nbytes} are needed")
        self.is_pmem = bool(is_pmem.value)
        return int(addr), int(mapped.value), named

    @contextlib.contextmanager
    def arena(self, nbytes: int) -> Iterator[Allocator]:
        """A fresh mapping big enough for `nbytes` (plus alignment); unmapped on exit, so
        tensors carved from it must not outlive the block."""
        size = _align(max(nbytes, 1)) + 64 * ALIGN
        addr, mapped, named = self._map(size)
        try:
            yield _carve(addr, mapped)
        finally:
            assert self._lib is not None
            self._lib.pmem_unmap(ctypes.c_void_p(addr), mapped)
            if named:
                with contextlib.suppress(OSError):
                    os.unlink(named)

    def close(self) -> None:
        pass


# ---- numa --------------------------------------------------------------------------------
def _load_libnuma() -> ctypes.CDLL:
    name = ctypes.util.find_library("numa") or "libnuma.so.1"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        raise TierError("the numa slow tier needs libnuma, which is not installed "
                        "(Debian/Ubuntu: apt-get install libnuma1)") from None
    lib.numa_available.restype = ctypes.c_int
    lib.numa_max_node.restype = ctypes.c_int
    lib.numa_node_size64.restype = ctypes.c_longlong
    lib.numa_node_size64.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_longlong)]
    lib.numa_alloc_onnode.restype = ctypes.c_void_p
    lib.numa_alloc_onnode.argtypes = [ctypes.c_size_t, ctypes.c_int]
    lib.numa_free.restype = None
    lib.numa_free.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return lib


def numa_nodes() -> list[int]:
    """NUMA nodes with memory, from sysfs."""
    base = Path("/sys/devices/system/node")
    return sorted(int(m.group(1)) for d in base.glob("node*") if (m := re.fullmatch(r"node(\d+)", d.name)))


@dataclass
class NumaTier:
    """Memory bound to one NUMA node with libnuma (numa_alloc_onnode = mmap + mbind)."""

    node: int
    spec: str = ""
    key: str = ""
    modeled: bool = False
    note: str = ""
    _lib: ctypes.CDLL | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.spec = self.key = f"numa:{self.node}"
        lib = _load_libnuma()
        if lib.numa_available() < 0:
            raise TierError(f"numa:{self.node} cannot be used: this kernel has no NUMA support")
        nodes = numa_nodes()
        if self.node < 0 or self.node > lib.numa_max_node() or (nodes and self.node not in nodes):
            raise TierError(f"NUMA node {self.node} does not exist on this machine "
                            f"(nodes: {', '.join(map(str, nodes)) or 'none'})")
        if lib.numa_node_size64(self.node, None) <= 0:
            raise TierError(f"NUMA node {self.node} has no memory")
        self._lib = lib
        self.note = f"memory bound to NUMA node {self.node}"

    def _free_bytes(self) -> int:
        assert self._lib is not None
        free = ctypes.c_longlong(0)
        self._lib.numa_node_size64(self.node, ctypes.byref(free))
        return int(free.value)

    @contextlib.contextmanager
    def arena(self, nbytes: int) -> Iterator[Allocator]:
        assert self._lib is not None
        size = _align(max(nbytes, 1)) + 64 * ALIGN
        # Bound memory that a node cannot supply faults with SIGBUS on first touch: check first.
        if size > self._free_bytes():
            raise TierError(f"NUMA node {self.node} has {self._free_bytes()} bytes free, {size} are needed")
        addr = self._lib.numa_alloc_onnode(size, self.node)
        if not addr:
            raise TierError(f"numa_alloc_onnode could not allocate {size} bytes on node {self.node}")
        try:
            yield _carve(int(addr), size)
        finally:
            self._lib.numa_free(ctypes.c_void_p(addr), size)

    def close(self) -> None:
        pass


SlowTier = ModelTier | PmemTier | NumaTier


def default_slow_tier() -> str:
    """`numa:N` for a memory-only NUMA node, else `model` (a DAX mount is used only when named:
    its directory is the user's to choose)."""
    base = Path("/sys/devices/system/node")
    try:
        with_cpu = _node_list((base / "has_cpu").read_text())
        with_mem = _node_list((base / "has_memory").read_text())
    except OSError:
        return "model"
    cpuless = sorted(with_mem - with_cpu)
    return f"numa:{cpuless[0]}" if cpuless else "model"


def _node_list(text: str) -> set[int]:
    out: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def open_slow_tier(spec: str | None) -> SlowTier:
    """Parse a `--slow-tier` spec ("model", "pmem:PATH", "numa:NODE"; None: the default)."""
    spec = spec or default_slow_tier()
    if spec == "model":
        return ModelTier()
    kind, _, arg = spec.partition(":")
    if kind == "pmem" and arg:
        return PmemTier(arg)
    if kind == "numa":
        if not re.fullmatch(r"\d+", arg):
            raise TierError(f"numa:{arg} is not a NUMA node number; write it like numa:1")
        return NumaTier(int(arg))
    raise TierError(f"unknown slow tier {spec!r}; use model, pmem:PATH or numa:NODE")
