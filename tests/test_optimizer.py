"""Optimizer: ILP optima against brute force, monotonicity, orderings, verifier, files."""

from __future__ import annotations

import dataclasses
import math
import os
import sys

import pytest

from autotm_py.graph.types import Role
from autotm_py.optimizer import (Infeasible, Plan, VerificationError, limit_from_ratio,
                                 minimum_fast_bytes, optimize, parse_ratio, verify)
from autotm_py.optimizer.plan import SLOW, TensorPlan

sys.path.insert(0, os.path.dirname(__file__))
from bruteforce import brute_force, make_graph, make_profile  # noqa: E402

I, P, O, IN = Role.INTERMEDIATE, Role.PARAMETER, Role.OUTPUT, Role.INPUT


def chain_graph():
    """Forward, backward and an in-place update, with a view kernel: 6 free tensors."""
    sizes = [30, 20, 50, 60, 40, 40, 50, 10]  # w, x, a, b, c, gc, ga, loss
    roles = [P, IN, I, I, I, I, I, O]
    kernels = [((0, 1), (2,)), ((2,), (3,)), ((3,), (3,), "view"), ((3,), (4,)), ((4,), (7,)),
               ((4, 3), (5,)), ((5, 2), (6,)), ((6, 0), (0,), "inplace")]
    return make_graph(sizes, roles, kernels, "chain")


def inplace_graph():
    """An intermediate written in place by a later kernel (its slow copy goes stale)."""
    sizes = [40, 30, 50, 60, 70, 10]
    roles = [P, IN, I, I, I, O]
    kernels = [((0, 1), (2,)), ((2,), (3,)), ((3, 2), (4,)), ((4,), (4,), "inplace"),
               ((4, 3), (5,)), ((4, 0), (0,), "inplace")]
    return make_graph(sizes, roles, kernels, "inplace")


GRAPHS = {"chain": chain_graph, "inplace": inplace_graph}
LIMITS = (100, 140, 180, 220, 260)


def _solve(g, prof, form, lim, **kw):
    try:
        plan = optimize(g, prof, formulation=form, limit_bytes=lim, mip_gap=0.0, **kw)
    except Infeasible:
        return math.inf, None
    verify(plan, g, prof)
    return plan.predicted_seconds, plan


@pytest.mark.parametrize("graph", sorted(GRAPHS))
@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("form", ["static", "synchronous", "asynchronous"])
def test_ilp_equals_brute_force(graph, device, form):
    g = GRAPHS[graph]()
    prof = make_profile(g, device, seed=3, read_bw=200, write_bw=150, async_factor=0.6)
    feasible = 0
    for lim in LIMITS:
        bf = brute_force(g, prof, form, lim, window=1)
        got, plan = _solve(g, prof, form, lim, async_window=1)
        if math.isinf(bf):
            assert math.isinf(got), (lim, got)
            continue
        feasible += 1
        assert got == pytest.approx(bf, rel=1e-9), (lim, got, bf)
        assert plan.solver.objective == pytest.approx(bf, rel=1e-9)
    assert feasible


def test_ilp_equals_brute_force_movable_state():
    g = chain_graph()
    prof = make_profile(g, "cpu", seed=5, move_state=True, read_bw=300, write_bw=200)
    for form in ("static", "synchronous"):
        for lim in (60, 120, 200):
            bf = brute_force(g, prof, form, lim, move_state=True)
            got, _ = _solve(g, prof, form, lim, move_state=True)
            assert got == pytest.approx(bf, rel=1e-9) if not math.isinf(bf) else math.isinf(got)


def test_moves_pay_off_somewhere():
    """The test profiles are not degenerate: some limit makes sync strictly beat static."""
    g = chain_graph()
    prof = make_profile(g, "cpu", seed=3, read_bw=200, write_bw=150, async_factor=0.6)
    pairs = [(_solve(g, prof, "static", lim)[0], _solve(g, prof, "synchronous", lim)[0]) for lim in LIMITS]
    assert max(st - sy for st, sy in pairs if math.isfinite(st) and math.isfinite(sy)) > 0.1


@pytest.fixture(scope="module")
def mlp():
    torch = pytest.importorskip("torch")
    from torch import nn

    from autotm_py.graph import capture

    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                          nn.Linear(128, 10))
    g = capture(model, (torch.randn(32, 64),), torch.randint(0, 10, (32,)), name="mlp")
    return g, make_profile(g, "cpu", seed=7, drop=0.0, read_bw=2e6, write_bw=1.5e6)


def _fixed_bytes(g):
    return sum(t.nbytes for t in g.tensors if t.fixed)


def test_monotone_in_limit_and_orderings(mlp):
    g, prof = mlp
    base = minimum_fast_bytes(g, prof, "static")[0]
    peak = g.peak_live_bytes
    limits = sorted({int(base + f * (peak - base)) for f in (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)})
    prev = {f: math.inf for f in ("static", "synchronous", "asynchronous", "numa")}
    for lim in limits:
        res = {}
        for f in ("static", "synchronous", "asynchronous", "numa"):
            plan = optimize(g, prof, formulation=f, limit_bytes=lim, mip_gap=0.0)
            verify(plan, g, prof)
            res[f] = plan.predicted_seconds
            assert res[f] <= prev[f] * (1 + 1e-9), (f, lim)
            prev[f] = res[f]
        assert res["synchronous"] <= res["static"] * (1 + 1e-9)
        assert res["asynchronous"] <= res["synchronous"] * (1 + 1e-9)
        if all(t.fixed is False or plan_fixed_fast(g, prof, lim) for t in g.tensors[:1]):
            assert res["synchronous"] <= res["numa"] * (1 + 1e-9)
    full = optimize(g, prof, formulation="synchronous", limit_bytes=peak)
    assert full.predicted_seconds == pytest.approx(prof.all_fast_seconds)


def plan_fixed_fast(g, prof, lim):
    plan = optimize(g, prof, formulation="numa", limit_bytes=lim)
    return all(plan.fast_at(t.id, t.first) for t in g.tensors if t.fixed and t.nbytes)


def test_baselines_and_2lm(mlp):
    g, prof = mlp
    lim = limit_from_ratio(g, "1:4")
    for f in ("numa", "2lm"):
        plan = optimize(g, prof, formulation=f, ratio="1:4")
        verify(plan, g, prof)
        assert plan.limit_bytes == lim and not plan.moves
        assert plan.predicted_seconds >= prof.all_fast_seconds
    assert optimize(g, prof, formulation="2lm", ratio="1:0").predicted_seconds == pytest.approx(
        prof.all_fast_seconds)
    assert optimize(g, prof, formulation="2lm", ratio="1:4").modeled


def _plan(device="cpu", form="synchronous", lim=180):
    g = chain_graph()
    prof = make_profile(g, device, seed=3, read_bw=200, write_bw=150, async_factor=0.6)
    plan = optimize(g, prof, formulation=form, limit_bytes=lim, mip_gap=0.0, async_window=1)
    verify(plan, g, prof)
    return g, prof, plan


def _rejects(plan, g, prof, words):
    with pytest.raises(VerificationError) as err:
        verify(plan, g, prof)
    assert any(words in p for p in err.value.problems), err.value.problems


def test_verifier_rejects_corrupted_plans():
    g, prof, plan = _plan()
    assert plan.moves
    _rejects(dataclasses.replace(plan, limit_bytes=plan.peak_fast_bytes - 1), g, prof, "over the limit")
    _rejects(dataclasses.replace(plan, predicted_seconds=plan.predicted_seconds * 1.01), g, prof,
             "predicts")
    _rejects(dataclasses.replace(plan, moves=plan.moves[1:]), g, prof, "lacks")
    # a tensor that turns slow with no move or free drop to explain it
    tensors = list(plan.tensors)
    i = next(i for i, t in enumerate(tensors) if len(t.segments) >= 2 and t.segments[0][1] == "fast"
             and t.segments[1][1] == "fast")
    t = tensors[i]
    segs = list(t.segments)
    segs[1] = (segs[1][0], SLOW, SLOW)
    tensors[i] = TensorPlan(t.storage, t.initial, (segs[0], segs[1]) + tuple(
        (k, SLOW, SLOW) for k, _, _ in segs[2:]))
    _rejects(dataclasses.replace(plan, tensors=tuple(tensors)), g, prof, "")
    # segments at kernels that are not the tensor's gadgets
    tensors = list(plan.tensors)
    t = tensors[i]
    tensors[i] = TensorPlan(t.storage, t.initial, tuple((k + 1, d, a) for k, d, a in t.segments))
    _rejects(dataclasses.replace(plan, tensors=tuple(tensors)), g, prof, "gadgets")


def test_verifier_rejects_slow_input_on_cuda():
    g, prof, plan = _plan("cuda", "synchronous", 220)
    tensors = list(plan.tensors)
    i = next(i for i, t in enumerate(tensors) if t.segments and t.storage == 2)
    t = tensors[i]
    tensors[i] = TensorPlan(t.storage, SLOW, tuple((k, SLOW, SLOW) for k, _, _ in t.segments))
    _rejects(dataclasses.replace(plan, tensors=tuple(tensors)), g, prof, "device memory")


def test_plan_file_roundtrip(tmp_path):
    g, prof, plan = _plan(form="asynchronous")
    path = str(tmp_path / "plan.json")
    plan.save(path)
    back = Plan.load(path, g)
    assert back == plan
    verify(back, g, prof)
    other = inplace_graph()
    with pytest.raises(ValueError, match="another graph"):
        Plan.load(path, other)
    import json

    d = json.load(open(path))
    d["schema"] = 99
    json.dump(d, open(path, "w"))
    with pytest.raises(ValueError, match="schema"):
        Plan.load(path)


def test_plan_contents():
    g, prof, plan = _plan(form="asynchronous")
    m = plan.metrics
    assert m["bytes_moved"] + m["bytes_async_moved"] == plan.bytes_moved
    assert m["num_kernels"] == len(g.compute_kernels)
    assert m["dram_limit"] == plan.limit_bytes
    assert len(plan.fast_bytes) == len(g.kernels)
    assert max(plan.fast_bytes) <= plan.limit_bytes
    for mv in plan.moves:
        assert mv.direction in ("to_fast", "to_slow") and mv.kind in ("sync", "async")
    s = plan.solver
    assert s.status == "optimal" and s.variables > 0 and s.constraints > 0 and s.gap <= 1e-9


def test_ratio_parsing():
    assert parse_ratio("1:4") == (1.0, 4.0)
    assert parse_ratio("0.5:1") == (0.5, 1.0)
    for bad in ("1:0:3", "-1:4", "a:b", "0:0", "14"):
        with pytest.raises(ValueError):
            parse_ratio(bad)
    g = chain_graph()
    fixed = sum(t.nbytes for t in g.tensors if t.fixed)
    assert limit_from_ratio(g, "1:4") == round(fixed + (g.peak_live_bytes - fixed) / 5)
    assert limit_from_ratio(g, "1:4", move_state=True) == round(g.peak_live_bytes / 5)
    assert limit_from_ratio(g, "1:0") == g.peak_live_bytes
    assert limit_from_ratio(g, "0:1") == fixed


def test_infeasible_limit_is_explained():
    g = chain_graph()
    prof = make_profile(g, "cuda", seed=1)
    need, k = minimum_fast_bytes(g, prof, "synchronous")
    with pytest.raises(Infeasible, match=f"kernel #{k}"):
        optimize(g, prof, formulation="synchronous", limit_bytes=need - 1)
    # parameters and inputs always count: a limit below them is infeasible on the CPU too
    cpu = make_profile(g, "cpu", seed=1)
    with pytest.raises(Infeasible, match="fixed tensors"):
        optimize(g, cpu, formulation="synchronous", limit_bytes=_fixed_bytes(g) - 1)


def test_cbc_backend_agrees():
    pytest.importorskip("pulp")
    from autotm_py.optimizer.solver import SolverFailed

    g = chain_graph()
    prof = make_profile(g, "cpu", seed=3, read_bw=200, write_bw=150, async_factor=0.6)
    a = optimize(g, prof, formulation="synchronous", limit_bytes=180, mip_gap=0.0)
    try:
        b = optimize(g, prof, formulation="synchronous", limit_bytes=180, mip_gap=0.0, solver="cbc")
    except SolverFailed as exc:
        pytest.skip(str(exc))
    verify(b, g, prof)
    assert b.predicted_seconds == pytest.approx(a.predicted_seconds, rel=1e-9)
    assert b.solver.backend == "cbc"


def test_mps_export(tmp_path):
    from autotm_py.optimizer.ilp import build_model
    from autotm_py.optimizer.solver import write_mps

    g = chain_graph()
    prof = make_profile(g, "cpu", seed=3)
    path = str(tmp_path / "m.mps.gz")
    write_mps(build_model(g, prof, "synchronous", 180), path)
    import gzip

    assert b"ROWS" in gzip.open(path).read()


def test_sync_plan_is_a_feasible_async_start():
    """The warm start: a synchronous plan maps to a feasible point of the async model with
    the same objective."""
    import numpy as np

    from autotm_py.optimizer.formulation import start_vector
    from autotm_py.optimizer.ilp import build_model

    g = chain_graph()
    prof = make_profile(g, "cpu", seed=3, read_bw=200, write_bw=150, async_factor=0.6)
    s = optimize(g, prof, formulation="synchronous", limit_bytes=180, mip_gap=0.0)
    m = build_model(g, prof, "asynchronous", 180, window=1)
    x = start_vector(m, g, prof, s)
    assert x is not None
    ax = np.array([m.a_value[m.a_start[r]:m.a_start[r + 1]] @ x[m.a_index[m.a_start[r]:m.a_start[r + 1]]]
                   for r in range(m.num_rows)])
    assert (ax >= m.row_lower - 1e-9).all() and (ax <= m.row_upper + 1e-9).all()
    assert (x >= m.col_lower - 1e-9).all() and (x <= m.col_upper + 1e-9).all()
    assert m.c @ x + m.offset == pytest.approx(s.predicted_seconds, rel=1e-9)


def test_async_candidate_selection_rule():
    """Per interval between consecutive users: the first, the last and the L longest."""
    import numpy as np

    from autotm_py.optimizer.flowgraph import select_candidates

    secs = np.zeros(40)
    secs[[12, 14, 15, 17]] = [5.0, 9.0, 9.0, 7.0]
    secs[[31, 33]] = [2.0, 1.0]
    users = np.array([10, 20, 30])
    cand = np.array([11, 12, 13, 14, 15, 16, 17, 18, 19, 31, 32, 33, 34, 35])
    # interval 10..20: ends 11 and 19, longest 14 and 15 (tie 9.0: both, earlier first)
    assert select_candidates(cand, users, secs, 2).tolist() == [11, 14, 15, 19, 31, 33, 35]
    assert select_candidates(cand, users, secs, 3).tolist() == [11, 14, 15, 17, 19, 31, 32, 33, 35]
    assert select_candidates(cand, users, secs, 0).tolist() == [11, 19, 31, 35]
    assert select_candidates(cand, users, secs, 9).tolist() == cand.tolist()


def test_restricted_async_candidates_equal_brute_force():
    """With a window wide enough for the restriction to drop candidates, the ILP still finds
    the brute-force optimum of the restricted flow graphs, which is no better than the
    unrestricted one; with window 1 the restriction drops nothing."""
    from autotm_py.optimizer.flowgraph import build_flow_graphs, candidate_seconds

    g = chain_graph()
    prof = make_profile(g, "cpu", seed=3, read_bw=200, write_bw=150, async_factor=0.6)
    secs = candidate_seconds(prof)
    full = build_flow_graphs(g, "asynchronous", window=3)
    cut = build_flow_graphs(g, "asynchronous", window=3, async_candidates=0, kernel_seconds=secs)
    assert cut.g_async.sum() < full.g_async.sum()
    one = build_flow_graphs(g, "asynchronous", window=1, async_candidates=0, kernel_seconds=secs)
    assert one.g_kernel.tolist() == build_flow_graphs(g, "asynchronous", window=1).g_kernel.tolist()
    for lim in (140, 180):
        bf_cut = brute_force(g, prof, "asynchronous", lim, window=3, async_candidates=0)
        bf_full = brute_force(g, prof, "asynchronous", lim, window=3)
        got, plan = _solve(g, prof, "asynchronous", lim, async_window=3, async_candidates=0)
        assert got == pytest.approx(bf_cut, rel=1e-9)
        assert bf_full <= bf_cut * (1 + 1e-12)
        assert plan.async_candidates == 0
        full_plan = _solve(g, prof, "asynchronous", lim, async_window=3, async_candidates=None)[1]
        assert full_plan.predicted_seconds == pytest.approx(bf_full, rel=1e-9)
        assert full_plan.async_candidates is None
        # refined: the restricted plan solved again with every candidate reaches the full optimum
        refined = _solve(g, prof, "asynchronous", lim, async_window=3, async_candidates=0, refine_seconds=30)[1]
        assert refined.predicted_seconds == pytest.approx(bf_full, rel=1e-9)


def test_refine_reaches_the_unrestricted_optimum_on_vgg19():
    """VGG19 (batch 2, roofline times) at 1:4: the ends-only restriction costs 4.3%; refining
    its plan with every candidate finds the unrestricted plan's time (both within the 1% gap)."""
    from autotm_py.bench.experiments import Workload, capture_workload
    from autotm_py.optimizer.roofline import roofline_profile

    g, _ = capture_workload(Workload("vgg19", 2))
    prof = roofline_profile(g)
    kw = dict(formulation="asynchronous", ratio="1:4", time_limit=60)
    cut = optimize(g, prof, async_candidates=0, **kw)
    refined = optimize(g, prof, async_candidates=0, refine_seconds=60, **kw)
    full = optimize(g, prof, async_candidates=None, **kw)
    assert cut.async_candidates == 0 and refined.async_candidates is None
    assert refined.predicted_seconds < 0.97 * cut.predicted_seconds
    assert refined.predicted_seconds == pytest.approx(full.predicted_seconds, rel=0.02)
    verify(refined, g, prof)
    with pytest.raises(ValueError, match="refine_seconds"):
        optimize(g, prof, refine_seconds=-1, **kw)


@pytest.mark.parametrize("form", ["static", "synchronous", "asynchronous"])
def test_per_kernel_limit_equals_brute_force(form):
    import numpy as np

    g = chain_graph()
    prof = make_profile(g, "cpu", seed=3, read_bw=200, write_bw=150, async_factor=0.6)
    uniform = _solve(g, prof, form, 220, async_window=1)[1]
    # lower the limit at the kernel where the uniform plan holds the most
    k = int(np.argmax(uniform.fast_bytes))
    lims = np.full(len(g.kernels), 220)
    lims[k] = uniform.fast_bytes[k] - 1
    bf = brute_force(g, prof, form, lims, window=1)
    assert bf > uniform.predicted_seconds  # the lowered kernel really constrains the plan
    got, plan = _solve(g, prof, form, lims, async_window=1)
    assert got == pytest.approx(bf, rel=1e-9)
    assert plan.kernel_limits == tuple(int(x) for x in lims) and plan.limit_bytes == 220
    assert plan.fast_bytes[k] <= lims[k]
    # the verifier holds each kernel to its own limit
    _rejects(dataclasses.replace(uniform, kernel_limits=tuple(int(x) for x in lims)), g, prof,
             f"kernel #{k}")
    # a limit below what the kernel itself needs is refused naming that kernel
    need = __import__("autotm_py.optimizer.limits", fromlist=["kernel_needs"]).kernel_needs(
        g, prof, form)[0]
    j = int(np.flatnonzero(np.array([not kk.view for kk in g.kernels]))[1])
    low = np.full(len(g.kernels), 10**6)
    low[j] = need[j] - 1
    with pytest.raises(Infeasible, match=f"kernel #{j} "):
        optimize(g, prof, formulation=form, limit_bytes=low)


def test_per_kernel_limit_file_and_input_checks(tmp_path):
    import json

    import numpy as np

    g = chain_graph()
    prof = make_profile(g, "cpu", seed=3, read_bw=200, write_bw=150, async_factor=0.6)
    lims = [200] * len(g.kernels)
    lims[3] = 150
    plan = optimize(g, prof, formulation="synchronous", limit_bytes=np.array(lims), mip_gap=0.0)
    path = str(tmp_path / "plan.json")
    plan.save(path)
    back = Plan.load(path, g)
    assert back == plan and back.kernel_limits == tuple(lims) and back.limit_bytes == 200
    verify(back, g, prof)
    # plans written before per-kernel limits existed load with one limit everywhere
    d = json.load(open(path))
    uniform = optimize(g, prof, formulation="asynchronous", limit_bytes=200, mip_gap=0.0,
                       async_window=1)
    d = uniform.to_json()
    del d["kernel_limits"], d["async_candidates"]
    old = Plan.from_json(d, g)
    assert old.kernel_limits is None and old.async_candidates is None
    assert old.limit_at().tolist() == [200] * len(g.kernels)
    verify(old, g, prof)
    # and before staged outputs were counted: every output went straight into the slow tier
    assert not uniform.direct_outputs and Plan.from_json(uniform.to_json()) == uniform
    del d["direct_outputs"]
    assert Plan.from_json(d, g).direct_outputs
    with pytest.raises(ValueError, match="one value per kernel"):
        optimize(g, prof, formulation="synchronous", limit_bytes=[200, 200])
    with pytest.raises(ValueError, match="non-negative"):
        optimize(g, prof, formulation="synchronous", limit_bytes=[-1] + lims[1:])
    with pytest.raises(ValueError, match="one fast-memory limit"):
        optimize(g, prof, formulation="numa", limit_bytes=lims)


def test_overlapped_sync_plan_is_a_better_feasible_async_start():
    """The greedy start: sync moves turned async where they fit stay a feasible point of the
    async model, cost no more than the sync plan, and trace valid async paths."""
    import numpy as np

    from autotm_py.optimizer.formulation import is_feasible, overlap_moves, start_vector
    from autotm_py.optimizer.ilp import build_model

    g = chain_graph()
    prof = make_profile(g, "cpu", seed=3, read_bw=200, write_bw=150, async_factor=1.0)
    lims = np.full(len(g.kernels), 180)
    s = optimize(g, prof, formulation="synchronous", limit_bytes=180, mip_gap=0.0)
    assert any(mv.kind == "sync" for mv in s.moves)
    m = build_model(g, prof, "asynchronous", 180, window=3)
    x0 = start_vector(m, g, prof, s)
    greedy = overlap_moves(g, prof, m, s, lims)
    x1 = start_vector(m, g, prof, greedy)
    assert x1 is not None and is_feasible(m, x1)
    assert m.c @ x1 < m.c @ x0 - 1e-9  # with async copies as fast as sync ones, something overlaps
    assert any(mv.kind == "async" for mv in greedy.moves)
    # a point that breaks a row is refused
    bad = x1.copy()
    bad[np.flatnonzero(x1 > 0.5)[0]] = 0.0
    assert not is_feasible(m, bad)


def test_async_candidates_auto_restricts_only_large_windows():
    from autotm_py.optimizer import formulation as F
    from autotm_py.optimizer.flowgraph import build_flow_graphs, candidate_seconds

    g = chain_graph()
    prof = make_profile(g, "cpu", seed=3)
    secs = candidate_seconds(prof)
    full = build_flow_graphs(g, "asynchronous", window=3)
    n = int(full.g_async.sum())
    small = build_flow_graphs(g, "asynchronous", window=3, async_candidates=0, kernel_seconds=secs,
                              full_below=n)
    assert small.async_candidates is None and small.g_kernel.tolist() == full.g_kernel.tolist()
    large = build_flow_graphs(g, "asynchronous", window=3, async_candidates=0, kernel_seconds=secs,
                              full_below=n - 1)
    assert large.async_candidates == 0 and int(large.g_async.sum()) < n
    assert F.async_restriction("auto") == F.AsyncRestriction(
        F.ASYNC_CANDIDATES, F.ASYNC_FULL_BELOW, F.ASYNC_SMALL_ABOVE, F.ASYNC_SMALL_SHARE)
    assert F.async_restriction(None) == F.AsyncRestriction()
    assert F.async_restriction(3) == F.AsyncRestriction(3)
    for bad in ("all", -1, 1.5, True):
        with pytest.raises(ValueError, match="async_candidates"):
            F.async_restriction(bad)
    plan = optimize(g, prof, formulation="asynchronous", limit_bytes=180, async_window=3)
    assert plan.async_candidates is None  # "auto" on a graph this small
    assert plan.async_min_bytes is None


def test_small_tensor_bytes():
    import numpy as np

    from autotm_py.optimizer.flowgraph import small_tensor_bytes

    sizes = np.array([10, 50, 20, 20, 100, 800])  # total 1000
    assert small_tensor_bytes(sizes, 0.0) == 0
    assert small_tensor_bytes(sizes, 0.009) == 10  # not even the smallest fits: none below
    assert small_tensor_bytes(sizes, 0.01) == 20  # 10 fits, the 20s (50 in all) do not
    assert small_tensor_bytes(sizes, 0.05) == 50  # 10 + 20 + 20
    assert small_tensor_bytes(sizes, 0.1) == 100  # ... + 50
    assert small_tensor_bytes(sizes, 1.0) == 801  # every tensor


def test_small_tensors_lose_async_candidates_and_equal_brute_force(monkeypatch):
    """Above `small_above` candidates the smallest tensors (a share of the bytes) keep no
    asynchronous candidate; the ILP finds the brute-force optimum of those flow graphs, no
    better than the unrestricted one, and the plan says what was dropped."""
    import numpy as np

    from autotm_py.optimizer import formulation as F
    from autotm_py.optimizer.flowgraph import build_flow_graphs

    g = chain_graph()
    prof = make_profile(g, "cpu", seed=3, read_bw=200, write_bw=150, async_factor=0.6)
    full = build_flow_graphs(g, "asynchronous", window=3)
    n = int(full.g_async.sum())
    assert build_flow_graphs(g, "asynchronous", window=3, small_above=n,
                             small_share=0.5).async_min_bytes is None  # not above: untouched
    cut = build_flow_graphs(g, "asynchronous", window=3, small_above=n - 1, small_share=0.4)
    assert cut.async_min_bytes == 50  # free tensors 50, 60, 40, 40, 50, 10: 10 + 40 + 40 fit
    small = cut.nbytes < 50
    per_tensor = np.add.reduceat(cut.g_async.astype(int), cut.g_ptr[:-1])
    assert (per_tensor[small] == 0).all() and per_tensor[~small].sum() > 0
    assert 0 < int(cut.g_async.sum()) < n
    again = build_flow_graphs(g, "asynchronous", window=3, async_min_bytes=50)  # what verify does
    assert again.g_kernel.tolist() == cut.g_kernel.tolist()
    monkeypatch.setattr(F, "ASYNC_SMALL_ABOVE", n - 1)  # "auto" applies the rule to this graph
    monkeypatch.setattr(F, "ASYNC_SMALL_SHARE", 0.4)
    for lim in (140, 180):
        bf_cut = brute_force(g, prof, "asynchronous", lim, window=3, async_min_bytes=50)
        bf_full = brute_force(g, prof, "asynchronous", lim, window=3)
        got, plan = _solve(g, prof, "asynchronous", lim, async_window=3)
        assert plan.async_min_bytes == 50
        assert got == pytest.approx(bf_cut, rel=1e-9)
        assert bf_full <= bf_cut * (1 + 1e-12)
        assert Plan.from_json(plan.to_json()).async_min_bytes == 50


@pytest.mark.parametrize("form", ["synchronous", "asynchronous"])
def test_workspace_is_reserved_whole_or_not_at_all(form):
    """A cuDNN workspace gets all its bytes beside what its kernel needs, or none: the plan
    then equals brute force with that kernel's limit lowered by the whole workspace (or not
    lowered at all)."""
    import numpy as np

    from autotm_py.optimizer.limits import kernel_needs, kernel_workspace

    g = chain_graph()
    prof = make_profile(g, "cuda", seed=3, read_bw=200, write_bw=150, async_factor=0.6)
    need = kernel_needs(g, prof, form)[0]
    k = int(np.argmax(need))
    ws = 45
    costs = list(prof.kernels)
    costs[k] = dataclasses.replace(costs[k], workspace=ws)
    with_ws = dataclasses.replace(prof, kernels=tuple(costs))
    reserved_somewhere = dropped_somewhere = False
    for lim in (int(need[k]) + 10, int(need[k]) + ws, 220, 260):
        base, extra, _ = kernel_workspace(g, with_ws, form, lim)
        got_ws = base + extra
        expected = ws if need[k] + ws <= lim else 0
        assert got_ws[k] == expected and got_ws.sum() == expected, (lim, got_ws)
        reserved_somewhere |= expected > 0
        dropped_somewhere |= expected == 0
        lims = np.full(len(g.kernels), lim)
        lims[k] -= expected
        bf = brute_force(g, prof, form, lims, window=1)
        got, plan = _solve(g, with_ws, form, lim, async_window=1)
        assert got == pytest.approx(bf, rel=1e-9) if not math.isinf(bf) else math.isinf(got)
        if plan is not None:
            assert plan.fast_bytes[k] + expected <= lim
    assert reserved_somewhere and dropped_somewhere


@pytest.mark.parametrize("form", ["synchronous", "asynchronous"])
def test_workspace_is_a_choice_where_its_time_without_is_known(form):
    """With a kernel's time without its workspace profiled (timed with a small room left),
    the plan either reserves the whole workspace (the kernel at its profiled time) or the
    small room (the slower time): it equals the better of two brute forces, the kernel's
    limit lowered by the workspace with the profiled time, or lowered by the small room
    with the slower time."""
    import numpy as np

    from autotm_py.optimizer.limits import kernel_needs

    g = chain_graph()
    prof = make_profile(g, "cuda", seed=3, read_bw=200, write_bw=150, async_factor=0.6)
    need = kernel_needs(g, prof, form)[0]
    k = int(np.argmax(need))
    ws, small = 45, 5
    t0 = prof.kernels[k].times[0]
    reserved, left_out = set(), set()
    for extra in (0.05, 0.6, 3.0):
        costs = list(prof.kernels)
        costs[k] = dataclasses.replace(costs[k], workspace=ws, time_without_workspace=t0 + extra,
                                       room_without_workspace=small)
        with_ws = dataclasses.replace(prof, kernels=tuple(costs))
        costs[k] = dataclasses.replace(costs[k], workspace=0, times={0: t0 + extra},
                                       time_without_workspace=None)
        slower = dataclasses.replace(prof, kernels=tuple(costs))
        for lim in (int(need[k]) + 10, int(need[k]) + ws, 220, 260):
            lims = np.full(len(g.kernels), lim)
            lims[k] -= small
            options = [brute_force(g, slower, form, lims, window=1)]
            if need[k] + ws <= lim:
                lims[k] = lim - ws
                options.append(brute_force(g, prof, form, lims, window=1))
            bf = min(options)
            got, plan = _solve(g, with_ws, form, lim, async_window=1)
            if math.isinf(bf):
                assert math.isinf(got)
                continue
            assert got == pytest.approx(bf, rel=1e-9), (extra, lim, options, got)
            assert plan.workspace[k] in (small, ws) and sum(plan.workspace) == plan.workspace[k]
            assert plan.fast_bytes[k] + plan.workspace[k] <= lim
            (reserved if plan.workspace[k] == ws else left_out).add(extra)
            assert Plan.from_json(plan.to_json()).workspace == plan.workspace
    # cheap workspaces are left out where bytes are short, dear ones kept
    assert left_out and reserved and 3.0 in reserved


@pytest.mark.parametrize("form", ["synchronous", "asynchronous"])
def test_workspace_rooms_between_none_and_all(form):
    """With a partial room profiled too (cuDNN's first algorithm that fits in it), the plan
    reserves the small room, the partial one or the whole workspace: it equals the best of
    three brute forces, each with the kernel's limit lowered by that room and the kernel at
    the time it was timed with there. A partial room no faster than a smaller one is no option."""
    import numpy as np

    from autotm_py.optimizer.limits import kernel_needs

    g = chain_graph()
    prof = make_profile(g, "cuda", seed=3, read_bw=200, write_bw=150, async_factor=0.6)
    need = kernel_needs(g, prof, form)[0]
    k = int(np.argmax(need))
    t0 = prof.kernels[k].times[0]
    rooms = {5: t0 + 3.0, 20: t0 + 0.3, 45: t0}
    costs = list(prof.kernels)
    costs[k] = dataclasses.replace(costs[k], workspace=45, time_without_workspace=rooms[5], room_without_workspace=5,
                                   partial_workspace=((20, rooms[20]), (30, rooms[20])))
    with_rooms = dataclasses.replace(prof, kernels=tuple(costs))
    assert with_rooms.kernels[k].workspace_options() == ((5, rooms[5]), (20, rooms[20]), (45, t0))
    chosen = set()
    for lim in (int(need[k]) + 10, int(need[k]) + 25, int(need[k]) + 45, 220, 260):
        options = []
        for room, t in rooms.items():
            if need[k] + room > lim:
                continue
            timed = list(prof.kernels)
            timed[k] = dataclasses.replace(timed[k], times={0: t})
            lims = np.full(len(g.kernels), lim)
            lims[k] -= room
            options.append(brute_force(g, dataclasses.replace(prof, kernels=tuple(timed)), form, lims, window=1))
        got, plan = _solve(g, with_rooms, form, lim, async_window=1)
        if not options or math.isinf(min(options)):
            assert math.isinf(got)
            continue
        assert got == pytest.approx(min(options), rel=1e-9), (lim, options, got)
        assert plan.workspace[k] in rooms and plan.fast_bytes[k] + plan.workspace[k] <= lim
        chosen.add(plan.workspace[k])
    assert 20 in chosen and len(chosen) >= 2


def test_kernels_of_one_signature_reserve_their_workspace_alike(monkeypatch):
    """cuDNN keeps one algorithm per convolution shape: two kernels of one signature both get
    their whole workspace (both at the profiled time) or both the small room (both slower),
    whatever would suit each alone. The plan equals the better of the two brute forces, and
    where the workspace fits beside only one of them, neither reserves it."""
    import numpy as np

    import autotm_py.optimizer.limits as L
    from autotm_py.optimizer.limits import kernel_needs

    g = chain_graph()
    prof = make_profile(g, "cuda", seed=3, read_bw=200, write_bw=150, async_factor=0.6)
    need = kernel_needs(g, prof, "synchronous")[0]
    twins = (1, 5)  # both compute kernels; given one signature below
    monkeypatch.setattr(L, "kernel_signature", lambda k: "twin" if k.index in twins else str(k.index))
    ws, small, extra = 45, 5, 0.6
    costs, slow_costs = list(prof.kernels), list(prof.kernels)
    for k in twins:
        t0 = prof.kernels[k].times[0]
        costs[k] = dataclasses.replace(costs[k], workspace=ws, time_without_workspace=t0 + extra,
                                       room_without_workspace=small)
        slow_costs[k] = dataclasses.replace(slow_costs[k], times={0: t0 + extra})
    with_ws = dataclasses.replace(prof, kernels=tuple(costs))
    slower = dataclasses.replace(prof, kernels=tuple(slow_costs))
    outcomes = set()
    for lim in (int(max(need[list(twins)])) + 30, 200, 240, 300):
        lims = np.full(len(g.kernels), lim)
        lims[list(twins)] -= small
        options = [brute_force(g, slower, "synchronous", lims, window=1)]
        if all(need[k] + ws <= lim for k in twins):
            lims[list(twins)] = lim - ws
            options.append(brute_force(g, prof, "synchronous", lims, window=1))
        got, plan = _solve(g, with_ws, "synchronous", lim)
        if math.isinf(min(options)):
            assert math.isinf(got)
            continue
        assert got == pytest.approx(min(options), rel=1e-9), (lim, options, got)
        assert plan.workspace[twins[0]] == plan.workspace[twins[1]] in (small, ws)
        outcomes.add(plan.workspace[twins[0]])
    assert outcomes == {small, ws}


def test_phase_seconds_split_the_prediction_at_the_peak():
    """Two hand-placed moves on an all-fast plan of the chain graph: an async write-back
    overlapping kernel 1 (longer than the kernel), a sync fetch at kernel 6."""
    from autotm_py.optimizer.plan import Move, phase_seconds, predict_seconds

    g = chain_graph()
    prof = make_profile(g, "cpu", seed=3, read_bw=200, write_bw=150, async_factor=0.6)
    base = optimize(g, prof, formulation="synchronous", limit_bytes=10_000, mip_gap=0.0)
    assert not base.moves
    peak = g.peak_kernel
    assert 1 < peak <= 6
    t = {k.index: prof.kernels[k.index].times[0] for k in g.kernels if not k.view}
    bw = prof.bandwidths
    w = bw.move_seconds(50_000, "write", True)
    r = bw.move_seconds(50, "read", False)
    assert w > t[1]
    plan = dataclasses.replace(base, moves=(Move(2, "to_slow", "async", 1, 50_000), Move(2, "to_fast", "sync", 6, 50)))
    ph = phase_seconds(g, prof, plan)
    before = sum(v for k, v in t.items() if k < peak)
    after = sum(v for k, v in t.items() if k >= peak)
    assert ph["before_peak"]["kernel_seconds"] == pytest.approx(before)
    assert ph["before_peak"]["copy_seconds"] == pytest.approx(w)
    assert ph["before_peak"]["predicted_seconds"] == pytest.approx(before - t[1] + w)
    assert ph["before_peak"]["copy_idle_seconds"] == pytest.approx(before - t[1])
    assert ph["from_peak"]["kernel_seconds"] == pytest.approx(after)
    assert ph["from_peak"]["copy_seconds"] == pytest.approx(r)
    assert ph["from_peak"]["predicted_seconds"] == pytest.approx(after + r)
    total = predict_seconds(g, prof, plan.kernel_masks, plan.moves, plan.workspace)
    assert ph["before_peak"]["predicted_seconds"] + ph["from_peak"]["predicted_seconds"] == pytest.approx(total)
