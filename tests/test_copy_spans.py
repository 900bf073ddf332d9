"""Async copies in pieces over several kernels (optimize(copy_spans=N), plan.Move.slices)."""

import dataclasses

import pytest
import torch

from autotm_py.graph import capture
from autotm_py.optimizer import Plan, VerificationError, optimize, verify

from .bruteforce import make_profile
from .test_runtime import _check_equal_after_steps, _small_cnn


@pytest.fixture(scope="module")
def sliced():
    """The small CNN at 60% of its peak with copies slow beside its kernels (10 kB/s against
    1 to 3 s kernels), solved with and without spans."""
    model = _small_cnn()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)
    graph = capture(model, (x,), y, lr=0.05)
    prof = make_profile(graph, "cpu", seed=0, read_bw=1e4, write_bw=1e4, async_factor=0.9)
    limit = int(graph.peak_live_bytes * 0.6)
    whole = optimize(graph, prof, formulation="asynchronous", limit_bytes=limit, time_limit=60)
    spans = optimize(graph, prof, formulation="asynchronous", limit_bytes=limit, time_limit=60, copy_spans=15)
    return model, x, y, graph, prof, whole, spans


def test_spans_slice_copies_and_predict_less(sliced) -> None:
    model, x, y, graph, prof, whole, spans = sliced
    assert not any(m.slices for m in whole.moves)
    cut = [m for m in spans.moves if m.slices]
    assert cut, "copies longer than their kernels are sliced"
    # the pieces' time is the copy's, spread: the spans plan is a strictly faster step
    assert spans.predicted_seconds < whole.predicted_seconds - 1e-3
    verify(spans, graph, prof)
    for m in cut:
        assert m.kind == "async" and sum(nb for _, nb in m.slices) == m.nbytes
        if m.direction == "to_fast":
            assert m.slices[0][0] >= m.kernel
        else:
            assert m.slices[-1][0] <= m.kernel


def test_sliced_plan_runs_bitwise_equal(sliced) -> None:
    model, x, y, graph, prof, whole, spans = sliced
    info = _check_equal_after_steps(model, x, y, spans, lr=0.05)
    assert info["rewrite"].planned_moves == len(spans.moves)


def test_sliced_plan_survives_its_file(sliced, tmp_path) -> None:
    *_, graph, prof, whole, spans = sliced
    path = str(tmp_path / "plan.json")
    spans.save(path)
    back = Plan.load(path, graph)
    assert back.moves == spans.moves and back.copy_spans == 15
    verify(back, graph, prof)


def test_a_piece_at_or_after_the_next_use_is_refused(sliced) -> None:
    *_, graph, prof, whole, spans = sliced
    fetch = next(m for m in spans.moves if m.slices and m.direction == "to_fast")
    t = graph.tensors[fetch.storage]
    nxt = min(u for u in t.users if u > fetch.kernel)
    late = dataclasses.replace(fetch, slices=fetch.slices[:-1] + ((nxt, fetch.slices[-1][1]),))
    bad = dataclasses.replace(spans, moves=tuple(late if m is fetch else m for m in spans.moves))
    with pytest.raises(VerificationError, match="outside from kernel"):
        verify(bad, graph, prof)
    short = dataclasses.replace(fetch, slices=fetch.slices[:-1] + ((fetch.slices[-1][0], 1),))
    bad = dataclasses.replace(spans, moves=tuple(short if m is fetch else m for m in spans.moves))
    with pytest.raises(VerificationError, match="do not add up"):
        verify(bad, graph, prof)


def test_negative_spans_are_refused(sliced) -> None:
    *_, graph, prof, whole, spans = sliced
    with pytest.raises(ValueError, match="copy_spans"):
        optimize(graph, prof, formulation="asynchronous", limit_bytes=whole.limit_bytes, copy_spans=-1)
