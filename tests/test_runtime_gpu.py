"""CUDA plans (device memory fast, pinned host memory slow). Skipped without CUDA."""

import copy

import pytest
import torch

from autotm_py.graph import capture, zoo
from autotm_py.optimizer import optimize
from autotm_py.profiler import profile
from autotm_py.runtime import compile as compile_plan
from autotm_py.runtime import unplanned_step
from autotm_py.runtime.step import spec_from_optimizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("formulation,choose,spans", [("synchronous", False, 0), ("asynchronous", False, 0),
                                                      ("asynchronous", True, 0), ("asynchronous", False, 15)])
def test_cuda_plan_matches_unplanned_step(formulation: str, choose: bool, spans: int, tmp_path) -> None:
    """choose: the convolutions' algorithms chosen before the first step (runtime.algorithms).
    spans: copies in pieces over several kernels (the kernels' times cut 20-fold, so that
    copies outlast them and the plan slices some)."""
    import dataclasses

    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    entry = zoo.get("resnet50")
    model, (x,), y = zoo.workload("resnet50", 16, device="cuda")
    graph = capture(model, (x,), y, lr=entry.lr, device="cuda")
    prof = profile(graph, device="cuda", cache=str(tmp_path / "k.sqlite"), progress=False)
    assert prof.device == "cuda"
    budget = int(graph.peak_live_bytes * 0.5)
    if spans:
        prof = dataclasses.replace(prof, kernels=tuple(
            dataclasses.replace(c, times={m: t / 20 for m, t in c.times.items()},
                                time_without_workspace=None, room_without_workspace=0, partial_workspace=())
            for c in prof.kernels))
    plan = optimize(graph, prof, formulation=formulation, limit_bytes=budget, time_limit=120, copy_spans=spans)
    assert plan.moves, "half the peak cannot be met without moving tensors"
    if spans:
        assert any(m.slices for m in plan.moves), "copies that outlast their kernels are sliced"
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    step = compile_plan(plan, a, lr=entry.lr, choose_algorithms=choose)
    base = unplanned_step(b, spec_from_optimizer(None, entry.lr, "cross_entropy"), (x,), y)
    for i in range(3):
        torch.manual_seed(i)
        la = step(x, y)
        torch.manual_seed(i)
        lb = base()
        torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    stats = step.move_stats
    assert stats.bytes_to_fast + stats.bytes_to_slow > 0
    if formulation == "asynchronous":
        assert stats.bytes_async > 0


def test_cuda_run_cli_fits_the_budget(tmp_path) -> None:
    """`autotm run --device cuda --budget B`: the measured peak of the step it reports stays
    within B, re-solving where the first plan did not fit (what it did is in the notes)."""
    import json

    from click.testing import CliRunner

    from autotm_py.cli import main_group

    model, (x,), y = zoo.workload("resnet50", 16, device="cuda")
    peak = capture(model, (x,), y, lr=zoo.get("resnet50").lr, device="cuda").peak_live_bytes
    budget = int(peak * 0.55)
    r = CliRunner().invoke(main_group, ["run", "resnet50", "--batch", "16", "--device", "cuda", "--budget",
                                        f"{budget}B", "--formulation", "asynchronous", "--steps", "2",
                                        "--cache", str(tmp_path / "k.sqlite"), "--no-compare", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output[r.output.index("{"):])
    assert rep["fast_peak_bytes"] <= budget and rep["limit_bytes"] <= budget
    assert (rep["resolves"] > 0) == ("re-solve" in rep["notes"])


def test_cuda_fit_gives_a_step_within_the_budget(tmp_path) -> None:
    """autotm_py.fit: the step it returns runs under the budget with its peak within it, and the
    fitting left the parameters as they were."""
    import autotm_py
    from autotm_py.runtime.fit import hold_device_memory

    entry = zoo.get("resnet50")
    model, (x,), y = zoo.workload("resnet50", 16, device="cuda")
    graph = capture(model, (x,), y, lr=entry.lr, device="cuda")
    prof = profile(graph, device="cuda", cache=str(tmp_path / "k.sqlite"), progress=False)
    budget = int(graph.peak_live_bytes * 0.55)
    before = [p.detach().clone() for p in model.parameters()]
    step, fitted = autotm_py.fit(graph, prof, model, x, y, budget=budget, lr=entry.lr)
    assert fitted.fits and all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    hold_device_memory(budget / torch.cuda.get_device_properties(0).total_memory)
    try:
        for _ in range(2):
            step(x, y)
        torch.cuda.synchronize()
        assert torch.cuda.max_memory_allocated() <= budget
    finally:
        hold_device_memory(None)


def test_profiling_leaves_no_device_memory_allocated(tmp_path) -> None:
    """Measuring kernels (cuBLAS among them, each CUDA-graph warm-up on a side stream) leaves
    nothing allocated that a later step's budget would have to hold: after profiling
    ResNet-50 batch 16 from an empty cache, 171 MB had stayed allocated on an H200."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 512), torch.nn.ReLU(),
                                torch.nn.Linear(512, 10)).cuda()
    x, y = torch.randn(64, 3, 32, 32, device="cuda"), torch.randint(0, 10, (64,), device="cuda")
    graph = capture(model, (x,), y, lr=0.01, device="cuda")
    before = torch.cuda.memory_allocated()
    profile(graph, device="cuda", cache=str(tmp_path / "k.sqlite"), progress=False)
    assert torch.cuda.memory_allocated() == before


def test_held_outside_counts_what_the_step_does_not_own() -> None:
    from autotm_py.runtime.fit import held_outside

    model = torch.nn.Linear(1024, 1024).cuda()
    x = torch.randn(256, 1024, device="cuda")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(x).sum().backward()
    opt.step()  # momentum buffers: the optimizer's state, owned by the step
    model.zero_grad(set_to_none=True)
    base = held_outside(model, opt, (x,))
    other = torch.empty(16 << 20, dtype=torch.uint8, device="cuda")  # the caller's own 16 MiB
    assert held_outside(model, opt, (x,)) - base == other.numel()
    assert held_outside(model, opt, (x, other)) == base


_ARENA_CHILD = r"""
import json, sys
import torch
from autotm_py.runtime.arena import install_cuda_arena
cache, budget, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
arena = install_cuda_arena(limit=budget)
from autotm_py.bench.arena import arena_autotm_run
from autotm_py.graph import capture, zoo
from autotm_py.profiler import profile
torch.backends.cudnn.deterministic = True
entry = zoo.get("resnet50")
model, (x,), y = zoo.workload("resnet50", 16, device="cuda")
graph = capture(model, (x,), y, lr=entry.lr, device="cuda")
prof = profile(graph, device="cuda", cache=cache, progress=False)
r = arena_autotm_run(arena, graph, prof, model, entry.lr, x, y, "asynchronous", budget, steps=1, time_limit=120,
                     log=lambda m: print(m, flush=True))  # flushed: a crash leaves how far it got
attempts = r.extra["attempts"]
torch.save([p.detach().cpu() for p in model.parameters()], out)
# the steps the model took: per attempt 2 search steps and the recording, then 2 replays (one
# warm-up, one timed) and the breakdown's
print(json.dumps({"status": r.status, "top": r.peak_bytes, "unplanned": r.extra.get("unplanned"),
                  "attempts": [a["status"] for a in attempts], "steps": 3 * len(attempts) + 3, "notes": r.notes}),
      flush=True)  # before the process's teardown, which must also end cleanly (the return code)
"""


def test_planned_arena_step_fits_its_budget_and_matches_the_unplanned_step(tmp_path) -> None:
    """In a fresh process with the planned arena as PyTorch's allocator: ResNet-50 batch 16 at
    55% of its peak lays out within the budget, replays with every allocation where planned,
    and after its steps the parameters match those of as many unplanned steps."""
    import json
    import subprocess
    import sys

    torch.backends.cudnn.deterministic = True
    entry = zoo.get("resnet50")
    model, (x,), y = zoo.workload("resnet50", 16, device="cuda")  # the child's model: the same seed
    graph = capture(model, (x,), y, lr=entry.lr, device="cuda")
    cache = str(tmp_path / "k.sqlite")
    profile(graph, device="cuda", cache=cache, progress=False)  # here, under the caching allocator
    budget = int(graph.peak_live_bytes * 0.55)
    params = tmp_path / "params.pt"
    # faulthandler: a crash in the child still names the Python line it was on
    r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", _ARENA_CHILD, cache, str(budget), str(params)],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        print(r.stdout, r.stderr, sep="\n")  # whole, under "Captured stdout" (the assertion's message is shortened)
    assert r.returncode == 0, (r.returncode, r.stdout[-1000:], r.stderr[-3000:])
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["status"] == "ok" and out["top"] <= budget and out["unplanned"] == 0, out
    assert "out of memory" not in out["attempts"], out  # every step ran whole: the counts compare
    base = unplanned_step(model, spec_from_optimizer(None, entry.lr, "cross_entropy"), (x,), y)
    for _ in range(out["steps"]):
        base()
    # a refused workspace request makes cuDNN take another algorithm than here: close, not equal
    for p, q in zip(model.parameters(), torch.load(params)):
        torch.testing.assert_close(p.detach().cpu(), q, rtol=1e-3, atol=1e-4)


def test_a_steps_first_call_makes_the_library_workspaces_profiling_cleared(tmp_path) -> None:
    """Profiling clears cuBLAS's per-stream workspaces; a planned step's first call makes them
    again before it runs (they then lie below the step's tensors), and only once."""
    from autotm_py.profiler.harness import release_cuda_state
    from autotm_py.runtime.step import make_library_workspaces

    dev = torch.device("cuda")
    release_cuda_state()
    before = torch.cuda.memory_allocated()
    make_library_workspaces(dev)
    torch.cuda.synchronize()
    made = torch.cuda.memory_allocated() - before
    assert made >= 1 << 20  # cuBLAS's workspace is MiBs (32 MiB on Hopper); the operands are freed
    make_library_workspaces(dev)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - before == made

    model, (x,), y = zoo.workload("resnet50", 4, device="cuda")
    graph = capture(model, (x,), y, lr=0.01, device="cuda")
    prof = profile(graph, device="cuda", cache=str(tmp_path / "k.sqlite"), progress=False)  # clears them again
    plan = optimize(graph, prof, formulation="synchronous", limit_bytes=graph.peak_live_bytes, time_limit=30)
    step = compile_plan(plan, model, lr=0.01)
    step.prepare((x,), y)
    torch.cuda.synchronize()
    made_again = torch.cuda.memory_allocated()
    make_library_workspaces(dev)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == made_again  # prepare made them: nothing more to make


def test_kernel_gpu_trace_gives_each_node_its_own_kernels(tmp_path) -> None:
    """Every GPU kernel of a planned step without moves ran inside some kernel node, so the
    nodes' GPU work adds up to the step's kernel time in a profiler trace of the same step,
    and each convolution node launched at least one kernel."""
    from autotm_py.bench.peers import stream_breakdown
    from autotm_py.runtime import kernel_gpu_trace

    torch.backends.cudnn.benchmark = False
    model, (x,), y = zoo.workload("resnet50", 4, device="cuda")
    graph = capture(model, (x,), y, lr=0.01, device="cuda")
    prof = profile(graph, device="cuda", cache=str(tmp_path / "k.sqlite"), progress=False)
    plan = optimize(graph, prof, formulation="synchronous", limit_bytes=graph.peak_live_bytes, time_limit=30)
    step = compile_plan(plan, model, lr=0.01)
    for _ in range(2):
        step(x, y)
    work = kernel_gpu_trace(step, x, y)
    convs = [k.index for k in graph.kernels if k.op.startswith("aten.convolution")]
    assert convs and all(work.get(k) and work[k].seconds > 0 for k in convs)
    total = stream_breakdown(lambda: step(x, y))["kernel_seconds"]
    in_nodes = sum(sec for w in work.values() for name, sec in w.launches if "Memcpy" not in name and "Memset" not in name)
    assert in_nodes == pytest.approx(total, rel=0.25)
