"""The modeled slow tier: Optane DC persistent memory (App Direct) simulated on DRAM.

Used on a machine with neither a DAX-mapped PMM file nor a memory-only NUMA node. Only the
all-fast configuration of a kernel is timed (on DRAM); every slow placement is *derived* from
that time and the bytes the kernel moves, and is marked ``modeled``.

Kernel model. For a kernel timed at ``t_dram`` with storage j placed in the slow tier, where
``R_j`` / ``W_j`` are the bytes the kernel reads from / writes to storage j:

    extra  = sum over slow j of  R_j * (1/PMM_READ_BW  - 1/DRAM_BW)
                               + W_j * (1/PMM_WRITE_BW - 1/DRAM_BW)
    t(mask) = t_dram + max(0, extra)

Each term is non-negative (PMM is slower than DRAM in both directions), so moving more bytes to
the slow tier never makes a kernel faster.

Move model. A copy between the tiers cannot beat what this machine's DRAM copy achieves (measured,
same sizes, sync and while a compute kernel runs) nor the PMM bandwidth in its direction:
``bw = min(measured_dram_copy_bw, PMM_READ_BW)`` for slow -> fast (read) and
``min(measured_dram_copy_bw, PMM_WRITE_BW)`` for fast -> slow (write).

Figures (Izraelevitz et al., "Basic Performance Measurements of the Intel Optane DC Persistent
Memory Module", arXiv:1903.05714, 2019): one DIMM reads at about 6.6 GB/s and writes at about
2.3 GB/s; six DIMMs interleaved on one socket about 39.6 GB/s read and 13.8 GB/s write; the
socket's six DDR4 channels about 105 GB/s.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ..graph.types import Kernel
from .types import Bandwidths

PMM_READ_BW_PER_DIMM = 6.6e9  # bytes/s, sequential read, one DIMM (Izraelevitz et al. 2019)
PMM_WRITE_BW_PER_DIMM = 2.3e9  # bytes/s, sequential non-temporal write, one DIMM
PMM_DIMMS = 6  # interleaved per socket, as in the paper's and AutoTM's machine
DRAM_BW = 105e9  # bytes/s, six DDR4-2666 channels


@dataclass(frozen=True)
class OptaneModel:
    """Bandwidth figures of the modeled slow tier (bytes/second)."""

    read_bw: float = PMM_READ_BW_PER_DIMM * PMM_DIMMS
    write_bw: float = PMM_WRITE_BW_PER_DIMM * PMM_DIMMS
    dram_bw: float = DRAM_BW

    def extra_seconds(self, read_bytes: int, written_bytes: int) -> float:
        """Added time of a kernel that reads/writes these bytes from/to the slow tier."""
        extra = (read_bytes * (1 / self.read_bw - 1 / self.dram_bw)
                 + written_bytes * (1 / self.write_bw - 1 / self.dram_bw))
        return max(0.0, extra)

    def kernel_seconds(self, t_dram: float, kernel: Kernel, mask: int) -> float:
        """Modeled time of `kernel` with the storages of `mask` (bits over kernel.storages) slow."""
        if not mask:
            return t_dram
        reads, writes = storage_bytes(kernel)
        r = sum(reads[j] for j in range(len(kernel.storages)) if mask >> j & 1)
        w = sum(writes[j] for j in range(len(kernel.storages)) if mask >> j & 1)
        return t_dram + self.extra_seconds(r, w)

    def bandwidths(self, dram: Bandwidths) -> Bandwidths:
        """Move bandwidths of the modeled tier from this machine's measured DRAM copies."""
        def cap(values: tuple[float, ...], limit: float) -> tuple[float, ...]:
            return tuple(min(v, limit) for v in values)

        return Bandwidths(
            dram.sizes, cap(dram.read_sync, self.read_bw), cap(dram.write_sync, self.write_bw),
            cap(dram.read_async, self.read_bw), cap(dram.write_async, self.write_bw),
            dram.async_compute_slowdown, modeled=True,
        )


@functools.lru_cache(maxsize=None)
def itemsize(dtype: str) -> int:
    """Bytes per element of a dtype named as in TensorMeta ("float32")."""
    return torch.empty((), dtype=getattr(torch, dtype)).element_size()


def meta_nbytes(shape: tuple[int, ...], dtype: str) -> int:
    """Bytes of the elements a view addresses (not its storage)."""
    return math.prod(shape) * itemsize(dtype)


def storage_bytes(kernel: Kernel) -> tuple[list[int], list[int]]:
    """Bytes read from and written to each of `kernel.storages` (in that order)."""
    pos = {s: j for j, s in enumerate(kernel.storages)}
    reads = [0] * len(kernel.storages)
    writes = [0] * len(kernel.storages)
    for m in kernel.inputs:
        reads[pos[m.storage]] += meta_nbytes(m.shape, m.dtype)
    for m in kernel.outputs:
        writes[pos[m.storage]] += meta_nbytes(m.shape, m.dtype)
    return reads, writes
