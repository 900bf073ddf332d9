"""A *modeled* (estimated, never measured) Profile from a roofline of each kernel.

For benchmarks of the optimizer on paper-sized graphs, where timing every kernel for real
is too slow on a small machine. All-fast time of a kernel:

    t0 = LAUNCH + max(flops / PEAK_FLOPS, bytes / DRAM_BW)

with flops counted for convolutions (and their backward: twice the forward), mm, addmm
and bmm, one flop per output element otherwise; bytes are the elements the kernel reads
and writes. Slow placements use the profiler's Optane model (`profiler.model.OptaneModel`),
over the masks the profiler would profile (`profiler.profile.kernel_masks`). Machine
figures: a 24-core second-generation Xeon (AutoTM's machine), about 2 TFLOP/s fp32
sustained and 105 GB/s of DRAM; copies between the tiers at the Optane bandwidths
(sync and async alike; the original's single-thread async copies are slower, see
reference 2.5). Every Profile from here has ``modeled=True``.
"""

from __future__ import annotations

import math

from ..graph.types import Graph, Kernel
from ..profiler.types import Bandwidths, KernelCost, Profile

PEAK_FLOPS = 2.0e12
LAUNCH_SECONDS = 5e-6
DRAM_COPY_BW = 20e9  # one-thread-pool memcpy between tiers is capped by the Optane figures below


def kernel_flops(k: Kernel) -> float:
    def numel(shape: tuple[int, ...]) -> int:
        return math.prod(shape) if shape else 1

    out = numel(k.outputs[0].shape) if k.outputs else 0
    op = k.op
    try:
        if op.startswith("aten.convolution.") and len(k.inputs) >= 2:
            return 2.0 * out * numel(k.inputs[1].shape[1:])
        if op.startswith("aten.convolution_backward") and len(k.inputs) >= 3:
            return 4.0 * numel(k.inputs[0].shape) * numel(k.inputs[2].shape[1:])
        if op.startswith("aten.mm.") and len(k.inputs) >= 2:
            (m, kk), n = k.inputs[0].shape, k.inputs[1].shape[-1]
            return 2.0 * m * kk * n
        if op.startswith("aten.addmm.") and len(k.inputs) >= 3:
            (m, kk), n = k.inputs[1].shape, k.inputs[2].shape[-1]
            return 2.0 * m * kk * n
        if op.startswith("aten.bmm.") and len(k.inputs) >= 2:
            b, m, kk = k.inputs[0].shape
            return 2.0 * b * m * kk * k.inputs[1].shape[-1]
    except (ValueError, IndexError):
        pass
    return float(out)


def roofline_profile(graph: Graph) -> Profile:
    """Estimated kernel times and Optane-model move bandwidths (modeled)."""
    from ..profiler.model import OptaneModel, storage_bytes
    from ..profiler.profile import kernel_masks

    model = OptaneModel()
    costs = []
    for k in graph.kernels:
        if k.view:
            costs.append(KernelCost(k.index, k.storages, {0: 0.0}, modeled=True))
            continue
        reads, writes = storage_bytes(k)
        t0 = LAUNCH_SECONDS + max(kernel_flops(k) / PEAK_FLOPS, (sum(reads) + sum(writes)) / model.dram_bw)
        times = {m: model.kernel_seconds(t0, k, m) for m in kernel_masks(graph, k)}
        times[0] = t0
        costs.append(KernelCost(k.index, k.storages, times, modeled=True))
    dram = Bandwidths((1,), (DRAM_COPY_BW,), (DRAM_COPY_BW,), (DRAM_COPY_BW,), (DRAM_COPY_BW,))
    return Profile(graph.fingerprint, "cpu", "roofline", "model", tuple(costs),
                   model.bandwidths(dram), modeled=True, stats={"source": "roofline estimate"})
