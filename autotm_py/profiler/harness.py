"""Timing harness: replay one captured kernel on real tensors placed per an IO configuration.

Tensors are rebuilt from the kernel's TensorMeta (shape, stride, offset, dtype) on storages
allocated in the tier the configuration names; floats get random values, integers zeros (valid
class indices, pooling indices and token ids). The op is resolved from its name
("aten.convolution.default" -> torch.ops.aten.convolution.default) and called with the decoded
arguments. Warm-up runs are excluded; the median of repeated runs is kept, repeating until both a
minimum run count and a minimum measured time are reached. On CUDA, CUDA events time blocks of
runs (cudnn benchmark mode on, so the warm-up picks the algorithm the step will use); kernels
shorter than GRAPH_BELOW_SECONDS are replayed from a CUDA graph so that Python's launch cost,
which the step hides, is not counted.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from ..graph.args import decode
from ..graph.types import Kernel, TensorMeta
from .model import itemsize
from .tiers import Allocator, dram_alloc


class ReplayError(RuntimeError):
    """A kernel that cannot be replayed in isolation; the message says why."""


@dataclass(frozen=True)
class TimingPolicy:
    """How long to time one configuration. Runs after `warmup` repeat until at least
    `min_runs` and `min_seconds` of measured time (or `max_runs`)."""

    warmup: int = 1
    min_runs: int = 3
    min_seconds: float = 0.03
    max_runs: int = 200


@dataclass(frozen=True)
class Timing:
    seconds: float  # median of the timed runs
    runs: int
    workspace: int = 0  # transient device bytes beyond inputs and outputs (CUDA only)


def time_call(fn: Callable[[], Any], policy: TimingPolicy, device: str = "cpu", *,
              graphs: bool = True) -> Timing:
    """Median wall time of `fn`. On CUDA, CUDA events around blocks of back-to-back calls
    (about a millisecond each), per call; short kernels are replayed from a CUDA graph
    (unless `graphs` is False: a capture allocates memory of its own)."""
    for _ in range(policy.warmup):
        fn()
    if device == "cuda":
        return _time_cuda(fn, policy, graphs)
    times: list[float] = []
    total = 0.0
    while len(times) < policy.min_runs or (total < policy.min_seconds and len(times) < policy.max_runs):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        times.append(dt)
        total += dt
    return Timing(statistics.median(times), len(times))


# Below this, a kernel's time measured from Python launches is mostly the launch itself (tens of
# microseconds of dispatch): in a training step the CPU runs ahead of the GPU and hides it, so
# such kernels are timed from a CUDA graph replay, which is GPU time alone.
GRAPH_BELOW_SECONDS = 2e-3


def _time_cuda(fn: Callable[[], Any], policy: TimingPolicy, graphs: bool = True) -> Timing:
    def block(run: Callable[[], Any], n: int) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0

    torch.cuda.synchronize()
    one = block(fn, 1)
    inner = max(1, min(100, int(1e-3 / max(one, 1e-7))))
    graph = _graph_of(fn, inner) if graphs and one < GRAPH_BELOW_SECONDS else None
    run, reps = (graph.replay, 1) if graph is not None else (fn, inner)
    times: list[float] = []
    total, runs = 0.0, 0
    while len(times) < policy.min_runs or (total < policy.min_seconds and runs < policy.max_runs):
        dt = block(run, reps)
        times.append(dt / inner)
        total += dt
        runs += inner
    del graph
    return Timing(statistics.median(times), runs)


def _graph_of(fn: Callable[[], Any], n: int) -> "torch.cuda.CUDAGraph | None":
    """`n` back-to-back calls of `fn` captured as one CUDA graph, or None where the op cannot
    be captured (it synchronizes with the host, say); such ops keep the launch timing."""
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(side):
            fn()  # libraries set up per-stream state (cuBLAS workspaces) outside the capture
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            for _ in range(n):
                fn()
    except Exception:  # noqa: BLE001 - capture is an optimisation of the measurement only
        with contextlib.suppress(Exception):
            torch.cuda.synchronize()
        return None
    return graph


def release_cuda_state() -> None:
    """Give back what measuring left allocated on the device. After profiling ResNet-50 batch
    16 from an empty cache on an H200, 171 MB stayed allocated that no tensor held (none after
    profiling from a full cache), and a step fitted to a budget in the same process ran out of
    memory. The likely holder is cuBLAS, which keeps a workspace, allocated through the caching
    allocator, per stream it ran on (each CUDA-graph warm-up runs on a side stream from
    PyTorch's pool)."""
    torch.cuda.synchronize()
    if hasattr(torch._C, "_cuda_clearCublasWorkspaces"):
        torch._C._cuda_clearCublasWorkspaces()
    torch.cuda.empty_cache()


def cuda_workspace(fn: Callable[[], Any]) -> int:
    """Device bytes a call needs beyond what it returns: its peak allocation minus what is
    still allocated once it is done (its outputs). cuDNN convolutions choose algorithms with
    large workspaces, which a plan must leave room for."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()
    del out
    return max(int(extra), 0)


def resolve_op(name: str) -> torch._ops.OpOverload:
    """'aten.convolution.default' -> torch.ops.aten.convolution.default."""
    parts = name.split(".")
    if len(parts) != 3:
        raise ReplayError(f"{name} is not an op overload name")
    try:
        return getattr(getattr(getattr(torch.ops, parts[0]), parts[1]), parts[2])
    except (AttributeError, RuntimeError):
        raise ReplayError(f"op {name} does not exist in this torch") from None


def out_variant(op: torch._ops.OpOverload) -> tuple[torch._ops.OpOverload, tuple[str, ...]] | None:
    """The out= overload of a functional op (same arguments plus one out tensor per return)."""
    schema = op._schema
    want = [(a.name, str(a.type)) for a in schema.arguments]
    packet = op.overloadpacket
    for name in packet.overloads():
        cand = getattr(packet, name)
        cs = cand._schema
        outs = [a.name for a in cs.arguments if a.is_out]
        if not outs or len(outs) != len(schema.returns):
            continue
        if [(a.name, str(a.type)) for a in cs.arguments if not a.is_out] == want:
            return cand, tuple(outs)
    return None


@functools.lru_cache(maxsize=None)
def _direct_out(name: str) -> tuple[torch._ops.OpOverload, tuple[str, ...]] | None:
    try:
        found = out_variant(resolve_op(name))
    except ReplayError:
        return None
    # an out= overload without a CPU kernel of its own is generated around the functional
    # one: it makes the result in a temporary and copies it into `out`
    if found is None or not torch._C._dispatch_has_kernel_for_dispatch_key(found[0].name(), "CPU"):
        return None
    return found


def direct_out_variant(kernel: Kernel) -> tuple[torch._ops.OpOverload, tuple[str, ...]] | None:
    """The out= overload through which `kernel` writes its outputs straight into buffers the
    caller allocates (on CPU, in the slow tier's memory), or None: its op has none, only one
    generated around the functional op, or an output of the call is not a new storage."""
    if kernel.view or kernel.inplace or set(kernel.output_storages) & set(kernel.input_storages) \
            or len(kernel.output_storages) != len(kernel.outputs):
        return None
    found = _direct_out(kernel.op)
    return found if found is not None and len(found[1]) == len(kernel.outputs) else None


def _extent_bytes(metas: Sequence[TensorMeta]) -> int:
    """Bytes a storage needs so that every view of it in `metas` fits."""
    need = 1
    for m in metas:
        elems = m.offset + (1 + sum((s - 1) * st for s, st in zip(m.shape, m.stride)) if all(m.shape) else 0)
        need = max(need, elems * itemsize(m.dtype))
    return need


def storage_extents(kernel: Kernel) -> list[int]:
    """Bytes needed per storage of `kernel.storages`."""
    by: dict[int, list[TensorMeta]] = {}
    for m in kernel.inputs + kernel.outputs:
        by.setdefault(m.storage, []).append(m)
    return [_extent_bytes(by[s]) for s in kernel.storages]


def _fill(buf: torch.Tensor, dtype: torch.dtype, pattern: torch.Tensor) -> None:
    """Fill a byte buffer: floats from a random pattern (cheaper than randn on 100s of MB),
    everything else zeros."""
    n = buf.numel() // torch.empty((), dtype=dtype).element_size()
    if not dtype.is_floating_point or n == 0:
        buf.zero_()
        return
    flat = buf[: n * torch.empty((), dtype=dtype).element_size()].view(dtype)
    p = pattern.to(dtype=dtype, device=buf.device)
    full = n - n % p.numel()
    if full:
        flat[:full].view(-1, p.numel()).copy_(p.expand(full // p.numel(), -1))
    if n - full:
        flat[full:].copy_(p[: n - full])


def _view(buf: torch.Tensor, m: TensorMeta) -> torch.Tensor:
    dtype = getattr(torch, m.dtype)
    t = torch.empty(0, dtype=dtype, device=buf.device)
    return t.set_(buf.untyped_storage(), m.offset, m.shape, m.stride)


@dataclass(frozen=True)
class Call:
    """A ready-to-time kernel call and the buffers it keeps alive."""

    fn: Callable[[], Any]
    buffers: tuple[torch.Tensor, ...]


def prepare_call(kernel: Kernel, slow: frozenset[int], fast: Allocator, slow_alloc: Allocator,
                 device: torch.device, *, use_out: bool = False) -> Call:
    """Build `kernel`'s call with the storages at positions `slow` (of kernel.storages) allocated
    by `slow_alloc`, the rest by `fast`. Outputs that no input aliases are written into their
    tier through the op's out= variant (`use_out`), or else copied there after the call."""
    op = resolve_op(kernel.op)
    extents = storage_extents(kernel)
    pattern = torch.randn(1 << 16, generator=torch.Generator().manual_seed(0))
    pos = {s: j for j, s in enumerate(kernel.storages)}
    in_storages = set(kernel.input_storages)
    bufs: dict[int, torch.Tensor] = {}
    first_dtype: dict[int, str] = {}
    for m in kernel.inputs + kernel.outputs:
        first_dtype.setdefault(m.storage, m.dtype)
    for s in kernel.storages:
        j = pos[s]
        if s not in in_storages and not (use_out or j in slow):
            continue  # the op allocates it, as in the step
        buf = (slow_alloc if j in slow else fast)(extents[j])
        if s in in_storages:
            _fill(buf, getattr(torch, first_dtype[s]), pattern)
        bufs[s] = buf
    inputs = [_view(bufs[m.storage], m) for m in kernel.inputs]
    try:
        args = decode(kernel.args.get("args", []), inputs, device)
        kwargs = decode(kernel.args.get("kwargs", {}), inputs, device)
    except (ValueError, IndexError, AttributeError, TypeError) as exc:
        raise ReplayError(f"arguments cannot be rebuilt: {exc}") from None
    new_outputs = [(i, m) for i, m in enumerate(kernel.outputs) if m.storage not in in_storages]
    if use_out and new_outputs:
        found = out_variant(op)
        if found is None or len(found[1]) != len(kernel.outputs):
            raise ReplayError(f"{kernel.op} has no out= variant")
        out_op, names = found
        outs = {n: _view(bufs[m.storage], m) for n, m in zip(names, kernel.outputs)}

        def fn() -> Any:
            return out_op(*args, **kwargs, **outs)
    else:
        copies = [(i, _view(bufs[m.storage], m)) for i, m in new_outputs if pos[m.storage] in slow]

        def fn() -> Any:
            res = op(*args, **kwargs)
            if copies:
                flat = [r for r in _flatten(res) if isinstance(r, torch.Tensor)]
                for i, dst in copies:
                    dst.copy_(flat[i])
            return res
    return Call(fn, tuple(bufs.values()))


def _flatten(x: Any) -> list[Any]:
    if isinstance(x, (list, tuple)):
        return [y for v in x for y in _flatten(v)]
    return [x]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            yield


def time_kernel(kernel: Kernel, slow: frozenset[int], tier: Any, device: str, policy: TimingPolicy,
                *, use_out: bool = False) -> Timing:
    """Time `kernel` with the storages at positions `slow` in `tier` (a slow-tier backend; for
    an all-fast configuration it is not touched). Raises ReplayError if it cannot be replayed."""
    dev = torch.device(device)
    fast = dram_alloc(device)
    extents = storage_extents(kernel)
    need = sum(extents[j] + 8192 for j in slow)
    arena = tier.arena(need) if slow else contextlib.nullcontext(fast)
    with arena as slow_alloc, _quiet():
        try:
            call = prepare_call(kernel, slow, fast, slow_alloc, dev, use_out=use_out)
            timing = time_call(call.fn, policy, device)
            if device == "cuda":
                timing = Timing(timing.seconds, timing.runs, cuda_workspace(call.fn))
        except ReplayError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failing kernel becomes a recorded reason
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ReplayError(f"{type(exc).__name__}: {first[:300]}") from None
        finally:
            call = None  # noqa: F841 - drop the views before the arena is unmapped
    return timing
