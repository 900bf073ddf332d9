"""The repair loop's parts: a step run node by node is the same step, and limits are lowered
in windows around the kernels that went over, as worked out by hand."""

import copy

import numpy as np
import pytest
import torch
from torch import fx

from autotm_py.optimizer import optimize
from autotm_py.runtime import compile as compile_plan
from autotm_py.runtime.defrag import (MAX_CUT, MAX_STEP_CUT, MIN_CUT, STEP_MARGIN, MemoryTrace,
                                      kernel_memory_trace, lowered_limits, measured_fragmentation,
                                      measured_shortfall, offending_kernels, oom_request_bytes, repair_limits,
                                      step_cut)
from autotm_py.runtime.step import RunError

from .test_runtime import small  # noqa: F401 - the shared tiny CNN, its graph and profile


class _Visits(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.kernels: list[int] = []

    def run_node(self, n: fx.Node):
        if n.op == "call_function" and "autotm_kernel" in n.meta:
            self.kernels.append(n.meta["autotm_kernel"])
        return super().run_node(n)


def test_interpreted_step_equals_the_step_and_visits_every_kernel(small) -> None:  # noqa: F811
    model, x, y, graph, prof, cache = small
    plan = optimize(graph, prof, formulation="synchronous", limit_bytes=int(graph.peak_live_bytes * 0.6))
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    step_a, step_b = compile_plan(plan, a, lr=0.05), compile_plan(plan, b, lr=0.05)
    seen: list[_Visits] = []

    def make(gm: fx.GraphModule) -> fx.Interpreter:
        seen.append(_Visits(gm))
        return seen[-1]

    for i in range(2):
        torch.manual_seed(7 + i)
        loss_a = step_a(x, y)
        torch.manual_seed(7 + i)
        loss_b = step_b.run_interpreted(x, y, make)
        assert torch.equal(loss_a, loss_b)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert seen[0].kernels == list(range(len(graph.kernels)))  # each kernel once, in order
    with pytest.raises(RunError, match="CUDA plan"):
        kernel_memory_trace(step_b, x, y)
    step_a.close()
    step_b.close()


def test_lowered_limits_cut_windows_once() -> None:
    lim = np.full(30, 1000, dtype=np.int64)
    # 10% over at kernel 5: a 5% cut on kernels 0..15 (window 10), the rest untouched
    out = lowered_limits(lim, np.array([5]), 1.10)
    assert out[:16].tolist() == [950] * 16 and out[16:].tolist() == [1000] * 14
    # two overlapping windows still cut once; a large overshoot is capped at MAX_CUT
    out = lowered_limits(lim, np.array([12, 14]), 3.0)
    assert out[2:25].tolist() == [int(1000 * (1 - MAX_CUT))] * 23 and out[:2].tolist() == [1000, 1000]
    assert out[25:].tolist() == [1000] * 5
    # a tiny overshoot still makes progress: MIN_CUT, window clipped at both ends
    out = lowered_limits(lim, np.array([0, 29]), 1.001, window=2)
    assert out.tolist() == [980] * 3 + [1000] * 24 + [980] * 3
    assert lowered_limits(lim, np.array([], dtype=np.int64), 2.0).tolist() == lim.tolist()


def test_repair_cuts_windows_then_the_whole_step_by_the_shortfall() -> None:
    lim = np.full(40, 10_000, dtype=np.int64)
    lim[30] = 5_000  # a kernel an earlier repair already lowered
    # out of memory at kernel 20, 0.3% short: its window (kernels 10..30) loses 0.3% + MIN_CUT
    # (10_000 -> 9_770, 5_000 -> 4_885), then every kernel 0.3% + STEP_MARGIN = 0.8%
    worst = 1 + 2 * (0.003 + MIN_CUT)
    first = repair_limits(lim, np.array([20]), worst, 0, 0.003)
    assert STEP_MARGIN == 0.005 and step_cut(0.003, 0) == pytest.approx(0.008)
    assert first[:10] == pytest.approx([9_920] * 10, abs=1) and first[31:] == pytest.approx([9_920] * 9, abs=1)
    assert first[10:30] == pytest.approx([9_691] * 20, abs=1) and first[30] == pytest.approx(4_845, abs=1)
    # out of memory again, elsewhere, 0.5% short: no window, the whole step by 0.5% + 4 x STEP_MARGIN
    again = repair_limits(first, np.array([33]), 1 + 2 * (0.005 + MIN_CUT), 1, 0.005)
    assert again[:10] == pytest.approx([9_672] * 10, abs=1) and again[35:] == pytest.approx([9_672] * 5, abs=1)
    assert again[10:30] == pytest.approx([9_448] * 20, abs=1) and again[30] == pytest.approx(4_723, abs=1)
    # a third failure in a row: 0.5% + 16 x STEP_MARGIN; a fourth is held at MAX_CUT
    assert step_cut(0.005, 2) == pytest.approx(0.085) and step_cut(0.005, 3) == MAX_CUT
    # shortfall unknown: the window takes the largest cut, the rest of a first repair none
    blind = repair_limits(lim, np.array([20]), 1 + 2 * MAX_CUT, 0, None)
    assert blind[10:31].tolist() == [9_000] * 20 + [4_500]
    assert blind[:10].tolist() == [10_000] * 10 and blind[31:].tolist() == [10_000] * 9
    # ... and a repeated one cuts every kernel by the largest cut
    assert repair_limits(blind, np.array([33]), 1.0, 1, None)[:12].tolist() == [9_000] * 10 + [8_100] * 2


def test_repair_cuts_the_whole_step_by_the_fragmentation_where_it_is_larger() -> None:
    lim = np.full(40, 10_000, dtype=np.int64)
    # out of memory at kernel 20, 0.3% short, while the allocator held 5% of the cap free that
    # the request could not use: the window (10..30) loses 0.3% + MIN_CUT (10_000 -> 9_770),
    # then every kernel 5% + STEP_MARGIN (9_770 -> 9_232, 10_000 -> 9_450)
    first = repair_limits(lim, np.array([20]), 1 + 2 * (0.003 + MIN_CUT), 0, 0.003, 0.05)
    assert step_cut(0.003, 0, 0.05) == pytest.approx(0.055)
    assert first[:10].tolist() == [9_450] * 10 and first[31:].tolist() == [9_450] * 9
    assert first[10:31].tolist() == [9_232] * 21
    # fragmentation smaller than the shortfall's cut changes nothing
    assert step_cut(0.003, 0, 0.001) == pytest.approx(0.008)
    assert repair_limits(lim, np.array([20]), 1.05, 0, 0.003, 0.001).tolist() == \
        repair_limits(lim, np.array([20]), 1.05, 0, 0.003).tolist()
    # on a repeated failure the larger of the escalated margin and the fragmentation
    assert step_cut(0.005, 1, 0.062) == pytest.approx(0.067) and step_cut(0.005, 2, 0.01) == pytest.approx(0.085)
    # past MAX_CUT where the fragmentation says so, never past MAX_STEP_CUT
    assert step_cut(0.003, 0, 0.108) == pytest.approx(0.113) and MAX_CUT < 0.113 < MAX_STEP_CUT
    assert step_cut(0.003, 0, 0.4) == MAX_STEP_CUT
    # the shortfall unknown: as without a fragmentation
    assert step_cut(None, 0, 0.05) == 0.0 and step_cut(None, 1, 0.05) == MAX_CUT


def test_measured_fragmentation() -> None:
    peaks = np.array([90, 95, 70, 0])
    assert measured_fragmentation(MemoryTrace(peaks, 3, failed_need=101, failed_held=7), 100) == pytest.approx(0.07)
    assert measured_fragmentation(MemoryTrace(peaks, 3, failed_need=101), 100) is None


def test_measured_shortfall() -> None:
    peaks = np.array([90, 95, 70, 0])
    assert measured_shortfall(MemoryTrace(peaks, 3, failed_need=101), 100) == pytest.approx(0.01)
    assert measured_shortfall(MemoryTrace(peaks, 3, failed_need=90), 100) == 0.0
    assert measured_shortfall(MemoryTrace(peaks, 3), 100) is None


def test_offending_kernels_from_a_trace() -> None:
    lim = np.array([100, 100, 80, 100])
    k, worst = offending_kernels(MemoryTrace(np.array([90, 120, 84, 0]), None), lim)
    assert k.tolist() == [1, 2] and worst == pytest.approx(1.2)
    # out of memory at kernel 3 (it never finished): offending, at least the largest cut's overshoot
    k, worst = offending_kernels(MemoryTrace(np.array([90, 95, 70, 0]), 3), lim)
    assert k.tolist() == [3] and worst == pytest.approx(1 + 2 * MAX_CUT)
    assert MIN_CUT < MAX_CUT
    # the failed allocation needed 101 of kernel 3's 100: a cut of 1% + MIN_CUT covers it
    k, worst = offending_kernels(MemoryTrace(np.array([90, 95, 70, 0]), 3, failed_need=101), lim)
    assert k.tolist() == [3] and worst == pytest.approx(1 + 2 * (0.01 + MIN_CUT))
    cut = lowered_limits(np.full(4, 10_000), k, worst, window=0)
    assert cut.tolist() == [10_000, 10_000, 10_000, 10_000 - 100 - int(MIN_CUT * 10_000)]
    # a measured peak over the limit elsewhere still counts when it is worse
    k, worst = offending_kernels(MemoryTrace(np.array([90, 130, 70, 0]), 3, failed_need=101), lim)
    assert k.tolist() == [1, 3] and worst == pytest.approx(1.3)


def test_oom_request_size_from_the_allocator_message() -> None:
    msg = ("CUDA out of memory. Tried to allocate 44.00 MiB. GPU 0 has a total capacity of 139.80 GiB "
           "of which 132.83 GiB is free.")
    assert oom_request_bytes(msg) == 44 << 20
    assert oom_request_bytes("Tried to allocate 1.50 GiB. GPU 0") == 3 << 29
    assert oom_request_bytes("Tried to allocate 512 bytes.") == 512
    assert oom_request_bytes("Tried to allocate 2.00 KiB.") == 2048
    assert oom_request_bytes("CUDA error: an illegal memory access") is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_trace_peak_matches_the_allocator() -> None:
    from autotm_py.graph import capture, zoo
    from autotm_py.profiler import profile

    model, (x,), y = zoo.workload("resnet50", 8, device="cuda")
    graph = capture(model, (x,), y, lr=0.01, device="cuda")
    prof = profile(graph, device="cuda", progress=False)
    plan = optimize(graph, prof, formulation="synchronous", limit_bytes=int(graph.peak_live_bytes * 0.7))
    step = compile_plan(plan, model, lr=0.01)
    step(x, y)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step(x, y)
    torch.cuda.synchronize()
    whole = torch.cuda.max_memory_allocated()
    trace = kernel_memory_trace(step, x, y)
    assert trace.failed_kernel is None and trace.failed_need is None
    assert abs(int(trace.peaks.max()) - whole) <= 0.02 * whole
    # under a cap of half the plan's peak the step runs out of memory: the trace names the
    # kernel, and what the failed allocation needed is about the cap or more (the allocator
    # maps memory in pages of up to 20 MiB, so a request a little smaller than the room left
    # can fail)
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(whole / 2 / total)
    try:
        failed = kernel_memory_trace(step, x, y)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert failed.failed_kernel is not None
    assert failed.failed_need is not None and failed.failed_need > 0.9 * whole / 2
    # the free memory the allocator held then is part of what it held: at most the cap
    assert failed.failed_held is not None and 0 <= failed.failed_held <= whole / 2


def _fails_to_allocate(x: torch.Tensor) -> torch.Tensor:
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB. GPU 0 has a total capacity of 1 GiB")


def test_probe_measures_what_the_failed_allocation_needed() -> None:
    from autotm_py.runtime.defrag import _PeakProbe

    g = fx.Graph()
    x = g.placeholder("x")
    g.output(g.call_function(_fails_to_allocate, (g.call_function(torch.neg, (x,)),)))
    probe = _PeakProbe(fx.GraphModule(torch.nn.Module(), g), 1)
    with pytest.raises(torch.OutOfMemoryError):
        probe.run(torch.ones(3))
    # what the allocator holds (nothing, on a machine without CUDA) plus the request, and what
    # it held beyond the tensors
    assert probe.failed_need == torch.cuda.memory_reserved() + (2 << 20)
    assert probe.failed_held == torch.cuda.memory_reserved() - torch.cuda.memory_allocated()


def test_excess_over_the_plan_per_kernel(small) -> None:  # noqa: F811
    from autotm_py.runtime.defrag import excess_over_plan

    model, x, y, graph, prof, cache = small
    plan = optimize(graph, prof, formulation="synchronous", limit_bytes=int(graph.peak_live_bytes * 0.6))
    held = np.asarray(plan.fast_bytes, dtype=np.int64)
    if plan.workspace is not None:
        held = held + np.asarray(plan.workspace, dtype=np.int64)
    peaks = held.copy()
    peaks[3] += 4096  # a kernel that held 4 KiB more than the plan
    peaks[5] -= 512  # one that held less
    peaks[-1] = 0  # one that did not run (the step failed before it)
    excess = excess_over_plan(MemoryTrace(peaks, len(peaks) - 1), plan)
    expected = np.zeros(len(peaks), dtype=np.int64)
    expected[3], expected[5] = 4096, -512
    assert excess.tolist() == expected.tolist()


def test_probe_counts_allocator_retries_in_kernels_and_between_them(monkeypatch) -> None:
    from autotm_py.runtime.defrag import _PeakProbe

    calls = {"n": 0}

    def stats():  # every query finds one more retry: each node run between two queries gets one
        calls["n"] += 1
        return {"num_alloc_retries": calls["n"]}

    monkeypatch.setattr(torch.cuda, "memory_stats", stats)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 7)
    g = fx.Graph()
    x = g.placeholder("x")
    k0 = g.call_function(torch.neg, (x,))
    k0.meta["autotm_kernel"] = 0
    move = g.call_function(torch.relu, (k0,))  # no kernel index: a move node of the rewrite
    k1 = g.call_function(torch.exp, (move,))
    k1.meta["autotm_kernel"] = 1
    g.output(k1)
    probe = _PeakProbe(fx.GraphModule(torch.nn.Module(), g), 2)
    probe.run(torch.ones(3))
    assert probe.retries.tolist() == [1, 1] and probe.retries_between == 1 and probe.peaks.tolist() == [7, 7]


def test_where_the_allocator_retried() -> None:
    from types import SimpleNamespace

    from autotm_py.bench.peers import _retries_where

    graph = SimpleNamespace(kernels=[SimpleNamespace(op=f"op{i}") for i in range(4)])
    trace = MemoryTrace(np.zeros(4), None, retries=np.array([0, 3, 0, 1]), retries_between=2)
    assert _retries_where(trace, graph) == {
        "kernels": [{"kernel": 1, "op": "op1", "retries": 3}, {"kernel": 3, "op": "op3", "retries": 1}],
        "in_kernels": 4, "between_kernels": 2}
    assert _retries_where(None, graph) == {"error": "no trace"}
