"""`autotm plot`: each figure's bars, lines and labels from known records, and the files the
CLI writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from matplotlib.collections import LineCollection

from autotm_py.bench.gpu import load_gpu_report
from autotm_py.bench.results import RunRecord, paper_ratio, write_record
from autotm_py.cli import main_group
from autotm_py.viz import (case_study_figure, costs_figure, error_figure, gpu_figure, large_figure, memory_cost,
                           speedup_figure)

GPU_REPORT = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "gpu_peers.json"


def rec(formulation: str, ratio: str | None, seconds: float, *, experiment: str = "conventional",
        model: str = "net", batch: int = 8, limit: int = 100, measured: float | None = None,
        metrics: dict | None = None) -> RunRecord:
    return RunRecord(experiment, model, batch, formulation, ratio, paper_ratio(ratio) if ratio else None, limit,
                     "ok", "roofline estimate (modeled)", True, 1000, 10, 10, 5, predicted_seconds=seconds,
                     all_fast_seconds=1.0, slowdown=seconds, measured_seconds=measured,
                     measured_all_fast_seconds=1.5 if measured is not None else None,
                     slow_tier="model" if measured is not None else None, metrics=metrics or {})


TIMES = {"numa": 3.0, "static": 2.5, "synchronous": 2.0}


def conventional(model: str = "net", measured: bool = False) -> list[RunRecord]:
    out = []
    for f, t in TIMES.items():
        for q, tt in (("0:1", 4.0), ("1:4", t), ("1:0", 1.0)):
            out.append(rec(f, q, tt, model=model, measured=tt + 0.5 if measured else None))
    return out


def heights(ax) -> list[float]:
    return [p.get_height() for p in ax.patches]


def test_speedup_bars_line_and_labels() -> None:
    fig = speedup_figure(conventional("a") + conventional("b", measured=True))
    assert len(fig.axes) == 2
    modeled, measured = fig.axes
    assert [t.get_text() for t in modeled.get_xticklabels()] == ["4:1\n(1:4)"]
    # all slow 4.0 s over each formulation's time at 1:4
    assert heights(modeled) == pytest.approx([4.0 / 3.0, 4.0 / 2.5, 4.0 / 2.0])
    labels = [t.get_text() for t in modeled.get_legend().get_texts()]
    assert "first-touch NUMA (modeled)" in labels and "all fast memory (modeled)" in labels
    assert modeled.lines[0].get_ydata()[0] == pytest.approx(4.0)  # all slow / all fast
    assert heights(measured) == pytest.approx([4.5 / 3.5, 4.5 / 3.0, 4.5 / 2.5])
    assert all("(measured)" in t.get_text() for t in measured.get_legend().get_texts())


def test_large_speedup_over_2lm() -> None:
    rs = []
    for m in ("vgg416", "resnet200"):
        rs += [rec("static", None, 5.0, experiment="large", model=m), rec("synchronous", None, 4.0,
               experiment="large", model=m), rec("2lm", None, 8.0, experiment="large", model=m)]
    ax = large_figure(rs).axes[0]
    assert heights(ax) == pytest.approx([8 / 5, 8 / 5, 8 / 4, 8 / 4])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["vgg416\n(8)", "resnet200\n(8)"]
    assert all("(modeled)" in t.get_text() for t in ax.get_legend().get_texts())


def test_costs_bars_and_price_markers() -> None:
    fig = costs_figure(conventional("a") + conventional("b"))
    ax, cost_ax = fig.axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1:0\n(0:1)", "4:1\n(1:4)"]
    assert heights(ax) == pytest.approx([1 / 4.0, 1 / 2.0] * 2)
    assert list(cost_ax.lines[0].get_ydata()) == pytest.approx([1 / 2.1, (4 / 2.1 + 1) / 5])
    assert memory_cost("1:0") == 1.0


def test_case_study_three_panels() -> None:
    rs = []
    for f in ("static", "synchronous"):
        for lim, t in ((100, 1.0), (50, 1.5), (10, 3.0)):
            rs.append(rec(f, f"{lim}:{100 - lim}" if lim < 100 else "1:0", t, experiment="case-study", limit=lim * 10**9,
                          metrics={"bytes_dram_input_tensors": lim, "bytes_input_tensors": 100,
                                   "bytes_dram_output_tensors": lim, "bytes_output_tensors": 100,
                                   "bytes_moved_pmem": 2e9, "bytes_moved_dram": 1e9}))
    a, b, c = case_study_figure(rs).axes
    assert len(a.lines) == 2 and list(a.lines[0].get_xdata()) == [10, 50, 100]
    assert list(a.lines[1].get_ydata()) == pytest.approx([3.0, 1.5, 1.0])
    assert len(b.lines) == 4 + 1 and list(b.lines[0].get_ydata()) == pytest.approx([0.1, 0.5, 1.0])
    assert len(c.lines) == 2 + 1 and list(c.lines[0].get_ydata()) == pytest.approx([2.0] * 3)
    assert b.lines[-1].get_xdata()[0] == pytest.approx(1000 / 1e9)  # the unplanned peak


def test_error_bars_from_measured_runs() -> None:
    ax, rel = error_figure(conventional("a", measured=True) + conventional("b")).axes
    # only the measured network, static and synchronous, at three ratios
    assert len(ax.patches) == len(rel.patches) == 2 * 3
    assert heights(ax)[:3] == pytest.approx([100 * (4.0 - 4.5) / 4.5, 100 * (2.5 - 3.0) / 3.0, 100 * (1 - 1.5) / 1.5])
    # predicted slowdown (seconds / 1.0) against measured (measured / 1.5 s unplanned)
    assert heights(rel)[:3] == pytest.approx([100 * (t - (t + 0.5) / 1.5) / ((t + 0.5) / 1.5) for t in (4.0, 2.5, 1.0)])


@pytest.mark.parametrize("name", ["gpu_peers.json", "gpu_peers_h200.json"])
def test_gpu_bars_and_lower_bound_from_the_committed_report(name: str) -> None:
    report = load_gpu_report(GPU_REPORT.with_name(name))
    ax = gpu_figure(report).axes[0]
    ok = sum(1 + sum(m["status"] == "ok" for m in c["methods"]) for c in report["cases"])
    assert ok >= 3 and len(ax.patches) == ok
    lb = [c for c in ax.collections if isinstance(c, LineCollection)]
    assert len(lb) == len(report["cases"])
    assert lb[0].get_segments()[0][0][1] == pytest.approx(report["cases"][0]["lower_bound_seconds"])
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "transfer lower bound" in legend
    ran = {m["method"] for c in report["cases"] for m in c["methods"] if m["status"] == "ok"}
    assert set(legend) == {"transfer lower bound", "unconstrained"} | ran  # no entry without bars


def test_plot_commands_write_png_and_pdf(tmp_path) -> None:
    res, out = tmp_path / "res", tmp_path / "fig"
    for r in conventional("a", measured=True) + conventional("b"):
        write_record(res, r)
    for f in ("static", "synchronous", "2lm"):
        write_record(res, rec(f, None, 2.0 if f != "2lm" else 3.0, experiment="large", limit=185))
    for f in ("static", "synchronous"):
        for q in ("1:0", "1:4", "0:1"):
            write_record(res, rec(f, q, 1.0, experiment="case-study"))
    runner = CliRunner()
    for name, file in (("speedup", "speedup"), ("large", "large"), ("costs", "costs"),
                       ("case-study", "case_study"), ("error", "error")):
        r = runner.invoke(main_group, ["plot", name, "--results", str(res), "--out", str(out)])
        assert r.exit_code == 0, r.output
        for ext in ("png", "pdf"):
            assert (out / f"{file}.{ext}").stat().st_size > 1000
    r = runner.invoke(main_group, ["plot", "gpu", "--results", str(GPU_REPORT), "--out", str(out), "--json"])
    assert r.exit_code == 0 and (out / "gpu.png").stat().st_size > 1000, r.output
    assert json.loads(r.output)["files"] == [str(out / "gpu.png"), str(out / "gpu.pdf")]


def test_gpu_report_of_another_schema(tmp_path) -> None:
    d = json.loads(GPU_REPORT.read_text())
    (tmp_path / "gpu_peers.json").write_text(json.dumps({**d, "schema": 99}))
    r = CliRunner().invoke(main_group, ["plot", "gpu", "--results", str(tmp_path), "--out", str(tmp_path)])
    assert r.exit_code == 2 and "schema 99" in r.output and "Traceback" not in r.output


def test_plot_models_filter(tmp_path) -> None:
    for r in conventional("a") + conventional("b"):
        write_record(tmp_path, r)
    runner = CliRunner()
    r = runner.invoke(main_group, ["plot", "speedup", "--results", str(tmp_path), "--models", "a:8",
                                   "--out", str(tmp_path / "f"), "--name", "only_a"])
    assert r.exit_code == 0 and (tmp_path / "f" / "only_a.png").exists(), r.output
    r = runner.invoke(main_group, ["plot", "speedup", "--results", str(tmp_path), "--models", "zzz"])
    assert r.exit_code == 2 and "no conventional runs of zzz" in r.output
