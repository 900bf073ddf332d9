"""The loop that fits a plan to a device budget, with fake stages: the limits each solve gets
after a step ran out of memory or went over, worked out by hand."""

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from autotm_py.graph import capture
from autotm_py.optimizer import optimize
from autotm_py.profiler import profile
from autotm_py.runtime import compile as compile_plan
from autotm_py.runtime import unplanned_step
from autotm_py.runtime.defrag import MemoryTrace
from autotm_py.runtime.fit import OK, OUT_OF_MEMORY, OVER, BudgetError, RunOutcome, _restore, _snapshot, fit_step, fit_to_budget
from autotm_py.runtime.step import spec_from_optimizer

from .test_runtime import SMALL_PROBE, small  # noqa: F401 - the shared tiny CNN, its graph and profile

K, BUDGET = 40, 10_000


class _Stages:
    """solve records its limits; run and trace play back the given outcomes and traces."""

    def __init__(self, outcomes, traces) -> None:
        self.limits: list = []
        self.outcomes, self.traces = list(outcomes), list(traces)

    def solve(self, limits):
        self.limits.append(np.broadcast_to(np.asarray(limits, dtype=np.int64), (K,)).copy())
        return SimpleNamespace(predicted_seconds=1.0 + len(self.limits))

    def run(self, plan):
        return self.outcomes.pop(0)

    def trace(self, outcome):
        return self.traces.pop(0)

    def fit(self, max_retries: int = 3, held: int = 0):
        return fit_to_budget(self.solve, self.run, self.trace, BUDGET, K, max_retries, held=held)


def _failed_at(kernel: int, need: int, held: int | None = None) -> MemoryTrace:
    return MemoryTrace(np.zeros(K, dtype=np.int64), kernel, failed_need=need, failed_held=held)


def test_out_of_memory_then_fits_after_the_repair() -> None:
    # out of memory at kernel 20, 0.3% short, with 5% of the budget held free the request could
    # not use: kernels 10..30 lose 0.3% + 2% (10_000 -> 9_770), then every kernel 5% + 0.5%
    st = _Stages([RunOutcome(OUT_OF_MEMORY, 9_900), RunOutcome(OK, 9_400, "the step")],
                 [_failed_at(20, 10_030, 500)])
    fitted = st.fit()
    assert st.limits[0].tolist() == [BUDGET] * K
    assert st.limits[1][:10].tolist() == [9_450] * 10 and st.limits[1][31:].tolist() == [9_450] * 9
    assert st.limits[1][10:31].tolist() == [9_232] * 21
    assert fitted.fits and fitted.resolves == 1 and fitted.outcome.payload == "the step"
    first, last = fitted.attempts
    assert (first.status, first.peak, first.lowered_at) == (OUT_OF_MEMORY, 9_900, (20,))
    assert first.step_cut == pytest.approx(0.055)
    assert (last.limit, last.status, last.step_cut) == (9_232, OK, 0.0)
    assert fitted.plan.predicted_seconds == 3.0
    assert fitted.summary().startswith("1 re-solve(s)") and "7.7% under it" in fitted.summary()


def test_repeated_out_of_memory_cuts_the_whole_step_more() -> None:
    # 0.3% short at kernel 20 (window 0.3% + 2%, then all 0.8%), then 0.5% short at kernel 33:
    # no window, every kernel 0.5% + 4 x 0.5% (as test_defrag works out)
    st = _Stages([RunOutcome(OUT_OF_MEMORY, 9_900), RunOutcome(OUT_OF_MEMORY, 9_800), RunOutcome(OK, 9_500)],
                 [_failed_at(20, 10_030), _failed_at(33, 10_050)])
    fitted = st.fit()
    assert st.limits[1][:10] == pytest.approx([9_920] * 10, abs=1)
    assert st.limits[1][10:31] == pytest.approx([9_691] * 21, abs=1)
    assert st.limits[2][:10] == pytest.approx([9_672] * 10, abs=1)
    assert st.limits[2][10:31] == pytest.approx([9_448] * 21, abs=1)
    assert [a.status for a in fitted.attempts] == [OUT_OF_MEMORY, OUT_OF_MEMORY, OK]


def test_a_peak_over_the_budget_without_a_trace_lowers_every_kernel() -> None:
    # fitted the allocator, but its peak went 6% over the budget; no trace: every kernel by 3%
    st = _Stages([RunOutcome(OK, 10_600), RunOutcome(OK, 9_800)], [None])
    fitted = st.fit()
    assert st.limits[1].tolist() == [9_700] * K
    assert [a.status for a in fitted.attempts] == [OVER, OK] and fitted.attempts[0].step_cut == pytest.approx(0.03)


def test_gives_up_after_max_retries() -> None:
    # out of memory every time, no trace: the largest cut (10%) each time, three solves
    st = _Stages([RunOutcome(OUT_OF_MEMORY, 9_000)] * 3, [None] * 2)
    fitted = st.fit(max_retries=2)
    assert [int(lim[0]) for lim in st.limits] == [10_000, 9_000, 8_100]
    assert not fitted.fits and fitted.resolves == 2 and "did not fit" in fitted.summary()
    with pytest.raises(ValueError, match="max_retries"):
        st.fit(max_retries=-1)


def test_memory_held_outside_the_step_stays_out_of_every_limit() -> None:
    # 1_000 of the 10_000 are held by the caller: the first solve gets 9_000; the measured peak
    # (held included) 10_600 is 6% over the budget, no trace: every kernel 3% lower, 8_730
    st = _Stages([RunOutcome(OK, 10_600), RunOutcome(OK, 9_950)], [None])
    fitted = st.fit(held=1_000)
    assert [int(lim[0]) for lim in st.limits] == [9_000, 8_730] and fitted.fits
    assert fitted.held == 1_000 and "held outside the step" in fitted.summary()
    assert "held outside" in _Stages([RunOutcome(OK, 9_999)], []).fit(held=10).summary()
    with pytest.raises(BudgetError, match="leaves nothing of the budget"):
        _Stages([], []).fit(held=BUDGET)


def test_fits_at_once_without_a_note() -> None:
    st = _Stages([RunOutcome(OK, 9_999)], [])
    fitted = st.fit()
    assert fitted.fits and fitted.resolves == 0 and fitted.summary() == "" and len(st.limits) == 1


def test_fit_step_leaves_the_model_and_optimizer_as_they_were(small) -> None:  # noqa: F811
    """Real CPU steps in the fitting (its run stage trains the model), a fake out-of-memory
    outcome for the first plan: the parameters and optimizer state are put back, and the step
    returned then trains exactly as the unplanned step does."""
    model, x, y, _, _, cache = small
    net, ref = copy.deepcopy(model), copy.deepcopy(model)
    graph = capture(net, (x,), y, lr=0.05, momentum=0.9)
    prof = profile(graph, progress=False, cache=cache, bandwidth_sizes=SMALL_PROBE)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    before = [p.detach().clone() for p in net.parameters()]
    budget = int(graph.peak_live_bytes * 0.6)
    solved = []

    def solve(limits):
        solved.append(np.asarray(limits))
        return optimize(graph, prof, formulation="synchronous", limit_bytes=limits, time_limit=60)

    stages_ran: list[bool] = []

    def stages(make_step):
        ran = stages_ran

        def run(plan):
            step = make_step(plan)
            for i in range(2):
                torch.manual_seed(i)
                step(x, y)
            ran.append(not torch.equal(next(net.parameters()), before[0]))  # they trained it
            return RunOutcome(OUT_OF_MEMORY, budget) if len(ran) == 1 else RunOutcome(OK, plan.peak_fast_bytes)

        def trace(outcome):
            return MemoryTrace(np.zeros(len(graph.kernels), dtype=np.int64), 3, failed_need=int(budget * 1.003))

        return run, trace

    step, fitted = fit_step(solve, lambda plan: compile_plan(plan, net, opt), stages, net, opt, budget,
                            len(graph.kernels))
    assert fitted.resolves == 1 and len(solved) == 2 and solved[1].min() < budget
    assert stages_ran == [True, True]
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before))
    assert len(opt.state) == 0  # the momentum buffers the fitting's steps made are gone
    base = unplanned_step(ref, spec_from_optimizer(torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9), None,
                                                   "cross_entropy"), (x,), y)
    for i in range(3):
        torch.manual_seed(100 + i)
        loss_a = step(x, y)
        torch.manual_seed(100 + i)
        assert torch.equal(loss_a, base()), f"loss differs at step {i}"
    for p, q in zip(net.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_snapshot_and_restore_put_existing_optimizer_state_back(small) -> None:  # noqa: F811
    model = copy.deepcopy(small[0])
    x, y = small[1], small[2]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def eager_step():
        torch.manual_seed(3)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    eager_step()  # now every parameter has a momentum buffer
    params = [p.detach().clone() for p in model.parameters()]
    bufs = {p: opt.state[p]["momentum_buffer"] for p in model.parameters()}
    values = [b.clone() for b in bufs.values()]
    saved = _snapshot(model, opt)
    eager_step()
    opt.state[next(model.parameters())]["extra"] = 1  # a key a step added
    _restore(model, opt, saved)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    for (p, b), v in zip(bufs.items(), values):
        assert opt.state[p]["momentum_buffer"] is b and torch.equal(b, v)  # the same tensor, in place
    assert "extra" not in opt.state[next(model.parameters())]


def test_the_fill_leaves_free_what_the_cap_allows_plus_the_slack() -> None:
    from autotm_py.runtime.fit import fill_bytes

    G, M = 1 << 30, 1 << 20
    # an 80 GiB device with 70 GiB free, a 25% cap (20 GiB) of which the allocator holds 2 GiB:
    # 18 GiB may still be allocated, so 70 - 18 GiB less the slack is taken, in 2 MiB granules
    assert fill_bytes(70 * G, 80 * G, 0.25, 2 * G, slack=256 * M) == 52 * G - 256 * M
    assert fill_bytes(70 * G, 80 * G, 0.25, 2 * G, slack=3 * M) == 52 * G - 4 * M  # rounded down
    # the allocator already holds more than the cap: everything free but the slack goes
    assert fill_bytes(10 * G, 80 * G, 0.25, 30 * G, slack=0) == 10 * G
    # a cap the free memory already meets: nothing to take
    assert fill_bytes(10 * G, 80 * G, 0.5, 0, slack=0) == 0


def test_the_way_a_cap_is_held_is_checked(monkeypatch) -> None:
    from autotm_py.runtime.fit import CAP_BY_ENV, cap_by
    from autotm_py.runtime.step import RunError

    monkeypatch.delenv(CAP_BY_ENV, raising=False)
    assert cap_by() == "fraction"
    monkeypatch.setenv(CAP_BY_ENV, "fill")
    assert cap_by() == "fill"
    monkeypatch.setenv(CAP_BY_ENV, "pad")
    with pytest.raises(RunError, match="must be one of fraction, fill"):
        cap_by()
