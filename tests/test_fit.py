"""The loop that fits a plan to a device budget, with fake stages: the limits each solve gets
after a step ran out of memory or went over, worked out by hand."""

from types import SimpleNamespace

import numpy as np
import pytest

from autotm_py.runtime.defrag import MemoryTrace
from autotm_py.runtime.fit import OK, OUT_OF_MEMORY, OVER, RunOutcome, fit_to_budget

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

    def fit(self, max_retries: int = 3):
        return fit_to_budget(self.solve, self.run, self.trace, BUDGET, K, max_retries)


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


def test_fits_at_once_without_a_note() -> None:
    st = _Stages([RunOutcome(OK, 9_999)], [])
    fitted = st.fit()
    assert fitted.fits and fitted.resolves == 0 and fitted.summary() == "" and len(st.limits) == 1
