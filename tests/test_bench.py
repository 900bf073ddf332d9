"""`autotm bench`: every experiment end to end on a tiny workload, the records against what
optimize returns, the ratio conventions, and bad input as one sentence."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from autotm_py.bench.experiments import CASE_STUDY_RATIOS, COMMON_RATIOS, Workload, capture_workload
from autotm_py.bench.results import (SCHEMA, ResultsError, RunRecord, fast_fraction, geomean_slowdowns,
                                     load_records, paper_ratio, ratio_from_paper, write_record)
from autotm_py.cli import main_group

TINY = "tests.workloads:tiny_mlp:64"


def _bench(*args: str):
    return CliRunner().invoke(main_group, ["bench", *args])


def _json(output: str):
    return json.loads(output[output.index("["):])


@pytest.fixture(scope="module")
def conventional(tmp_path_factory):
    """The tiny conventional bench, planned with roofline times, as CLI JSON and as files."""
    out = tmp_path_factory.mktemp("results")
    r = _bench("conventional", "--models", TINY, "--ratios", "0:1,1:4,1:0",
               "--formulations", "static,synchronous,numa,2lm", "--results", str(out), "--json")
    assert r.exit_code == 0, r.output
    return out, _json(r.output)


def test_paper_ratio_conventions() -> None:
    assert [paper_ratio(r) for r in COMMON_RATIOS] == ["1:0", "8:1", "4:1", "1:1", "0:1"]
    assert ratio_from_paper("4:1") == "1:4" and fast_fraction("1:4") == pytest.approx(0.2)
    # the case study's DRAM fractions 1/1..1/10, 1/100, 1/80, 1/60, 1/40, 1/20, 2/3, 3/4, 0
    want = [1 / n for n in range(1, 11)] + [1 / 100, 1 / 80, 1 / 60, 1 / 40, 1 / 20, 2 / 3, 3 / 4, 0.0]
    assert len(CASE_STUDY_RATIOS) == 18
    assert [fast_fraction(r) for r in CASE_STUDY_RATIOS] == pytest.approx(want)


def test_conventional_records_match_optimize(conventional) -> None:
    from autotm_py.optimizer import optimize
    from autotm_py.optimizer.roofline import roofline_profile

    folder, rows = conventional
    assert len(rows) == 3 * 4 and all(r["status"] == "ok" for r in rows)
    records = load_records(folder, "conventional")
    assert len(records) == 12
    rec = next(r for r in records if r.formulation == "synchronous" and r.ratio == "1:4")
    assert rec.paper_ratio == "4:1" and rec.modeled and rec.measured_seconds is None
    graph, _ = capture_workload(Workload("tests.workloads:tiny_mlp", 64))
    plan = optimize(graph, roofline_profile(graph), formulation="synchronous", ratio="1:4", time_limit=120,
                    direct_outputs=True)  # the paper's experiments: the original's runtime
    assert rec.slowdown == pytest.approx(plan.slowdown, rel=1e-9)
    assert rec.predicted_seconds == pytest.approx(plan.predicted_seconds, rel=1e-9)
    assert rec.limit_bytes == plan.limit_bytes and rec.bytes_moved == plan.bytes_moved
    # the metrics of reference 7.3 travel with each record
    assert rec.metrics["dram_limit"] == plan.limit_bytes
    assert rec.metrics["bytes_moved"] + rec.metrics["bytes_async_moved"] == plan.bytes_moved
    assert rec.metrics["num_kernels"] == len(graph.compute_kernels)
    # all fast memory is no slower than all slow memory, and 1:0 costs nothing
    at = {(r.formulation, r.ratio): r for r in records}
    assert at["static", "1:0"].slowdown == pytest.approx(1.0)
    assert at["static", "0:1"].predicted_seconds >= at["static", "1:0"].predicted_seconds
    geo = geomean_slowdowns(records)
    assert geo["synchronous", "1:4"] == (pytest.approx(rec.slowdown), 1)


def test_measured_run_on_the_test_set(tmp_path) -> None:
    out = tmp_path / "res"
    r = _bench("conventional", "--set", "test", "--models", TINY, "--ratios", "1:4",
               "--formulations", "static,2lm", "--cache", str(tmp_path / "k.sqlite"), "--results", str(out))
    assert r.exit_code == 0, r.output
    assert "measured" in r.output
    recs = {r.formulation: r for r in load_records(out)}
    static = recs["static"]
    assert static.measured_seconds is not None and static.measured_seconds > 0
    assert static.measured_all_fast_seconds is not None and static.measured_all_fast_seconds > 0
    assert static.slow_tier == "model" and static.measured_steps == 1
    assert static.profile.startswith("kernel cache")
    assert recs["2lm"].measured_seconds is None  # a model of a hardware cache: nothing to run


def test_case_study_and_large_end_to_end(tmp_path) -> None:
    r = _bench("case-study", "--model", TINY, "--ratios", "1:0,1:4,0:1", "--results", str(tmp_path))
    assert r.exit_code == 0, r.output
    cs = load_records(tmp_path, "case-study")
    assert {(r.formulation, r.ratio) for r in cs} == {(f, q) for f in ("static", "synchronous")
                                                      for q in ("1:0", "1:4", "0:1")}
    r = _bench("large", "--models", TINY, "--limit", "4000B", "--results", str(tmp_path), "--json")
    assert r.exit_code == 0, r.output
    large = load_records(tmp_path, "large")
    assert sorted(r.formulation for r in large) == ["2lm", "static", "synchronous"]
    assert all(r.limit_bytes == 4000 and r.ratio is None and r.ok for r in large)


def test_records_round_trip_and_older_schema(tmp_path) -> None:
    rec = RunRecord("conventional", "m", 2, "static", "1:4", "4:1", 10, "ok", "p", True, 100, 1, 1, 3,
                    predicted_seconds=2.0, all_fast_seconds=1.0, slowdown=2.0)
    bad = RunRecord("conventional", "m", 2, "numa", "1:4", "4:1", 10, "error", "p", True, 100, 1, 1, 3)
    write_record(tmp_path, rec)
    path = write_record(tmp_path, bad)
    assert "NaN" not in path.read_text()  # NaN is written as null (strict JSON)
    back = {r.formulation: r for r in load_records(tmp_path)}
    assert back["static"] == rec
    assert math.isnan(back["numa"].predicted_seconds) and back["numa"].status == "error"
    old = json.loads(path.read_text())
    old["schema"] = SCHEMA - 1
    path.write_text(json.dumps(old))
    with pytest.raises(ResultsError, match="schema"):
        load_records(tmp_path)


@pytest.mark.parametrize("args, words", [
    (("conventional", "--models", "vgg99"), "unknown model 'vgg99'"),
    (("conventional", "--formulations", "static,magic"), "unknown formulation 'magic'"),
    (("conventional", "--ratios", "1:4,x"), "ratio 'x'"),
    (("conventional", "--models", "vgg19:0"), "positive"),
    (("conventional", "--models", "resnet50"), "no batch size in the conventional set"),
    (("large", "--limit", "lots"), "cannot read the size"),
    (("case-study", "--time-limit", "0"), "--time-limit must be positive"),
    (("gpu", "--case", "vgg99:256:0.5"), "unknown model 'vgg99'"),
    (("gpu", "--case", "vgg19:256:1.5"), "cap in (0, 1]"),
    (("gpu", "--case", "vgg19:256:0GiB"), "positive size"),
    (("gpu", "--case", "vgg19:256:lots"), "a size (14.85GiB)"),
    (("gpu", "--refine-seconds", "-1"), "--refine-seconds must be 0 or more"),
    (("gpu", "--copy-spans", "-1"), "--copy-spans must be 0 or more"),
    (("gpu", "--async-candidates", "some"), "--async-candidates must be auto, all or a whole number"),
])
def test_bench_bad_input(args, words) -> None:
    r = _bench(*args)
    assert r.exit_code == 2, r.output
    assert words in r.output and "Traceback" not in r.output


def test_gpu_case_caps() -> None:
    from autotm_py.bench.gpu import DEFAULT_CASES, GpuCase, parse_case

    assert parse_case("vgg19:256:0.5") == GpuCase("vgg19", 256, 0.5, None)
    assert parse_case("vgg19:256:14.85GiB") == GpuCase("vgg19", 256, None, 15945066086)
    assert parse_case("resnet152:256:1gib").cap_bytes == 2**30
    assert [parse_case(c).cap_bytes for c in DEFAULT_CASES][:2] == [15945066086, 26360361779]


def test_bench_gpu_without_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for extra in ((), ("--arena",)):
        r = _bench("gpu", "--case", "vgg19:256:0.5", *extra)
        assert r.exit_code == 2 and "no usable CUDA device" in r.output and "Traceback" not in r.output


def test_plot_bad_results(tmp_path) -> None:
    runner = CliRunner()
    r = runner.invoke(main_group, ["plot", "speedup", "--results", str(tmp_path), "--out", str(tmp_path / "f")])
    assert r.exit_code == 2 and "holds no conventional bench results" in r.output
    (tmp_path / "old.json").write_text(json.dumps({"kind": "autotm-bench-run", "schema": 0}))
    r = runner.invoke(main_group, ["plot", "costs", "--results", str(tmp_path), "--out", str(tmp_path / "f")])
    assert r.exit_code == 2 and "schema 0" in r.output and "Traceback" not in r.output
    (tmp_path / "old.json").write_text("{not json")
    r = runner.invoke(main_group, ["plot", "error", "--results", str(tmp_path)])
    assert r.exit_code == 2 and "not valid JSON" in r.output
    r = runner.invoke(main_group, ["plot", "gpu", "--results", str(tmp_path / "nope.json")])
    assert r.exit_code == 2 and "does not exist" in r.output


def test_summary_tables(conventional) -> None:
    folder, rows = conventional
    r = _bench("summary", "--results", str(folder))
    assert r.exit_code == 0, r.output
    sync = next(x for x in rows if x["formulation"] == "synchronous" and x["ratio"] == "1:4")
    assert "### Conventional networks" in r.output
    assert "| tests.workloads:tiny_mlp 64 | synchronous | x" in r.output
    # the geomean of one network is its own slowdown
    assert f"x{sync['slowdown']:.3f} ({100 * (sync['slowdown'] - 1):.1f}%, 1)" in r.output
    r = _bench("summary", "--results", str(folder), "--json")
    g = json.loads(r.output)["predicted"]["synchronous"]["1:4"]
    assert g == {"geomean_slowdown": pytest.approx(sync["slowdown"]), "networks": 1}


def test_gpu_case_result_round_trips_through_json() -> None:
    from autotm_py.bench.peers import CaseResult, MethodResult, markdown

    case = CaseResult("resnet152", 256, 0.57, 26360361779, 0.247, 45945372672, 0.083, 0.166, 54.1e9, 55.3e9,
                      0.725, (MethodResult("autotm asynchronous", "ok", 0.944, 25880058880, 0.879, "1 re-solve(s)",
                                           {"attempts": [{"limit": 1, "status": "out of memory"}]}),
                              MethodResult("checkpoint_sequential(4)", "out of memory", peak_bytes=10)))
    back = CaseResult.from_json(json.loads(json.dumps(case.to_json())))
    assert back.methods[0] == case.methods[0] and back.lower_bound_seconds == 0.725
    assert math.isnan(back.methods[1].step_seconds) and back.methods[1].status == "out of memory"
    table = markdown([back])
    assert "| | | autotm asynchronous | 0.944 s | 3.82 | 1.30 | 24.1 GiB | 0.879 s (6.9%) | ok; 1 re-solve(s) |" in table


def test_gpu_reports_merge_case_by_case(tmp_path) -> None:
    import copy
    import pathlib

    shipped = json.loads((pathlib.Path(__file__).parents[1] / "benchmarks/results/gpu_peers_h200.json").read_text())
    first, second = copy.deepcopy(shipped), copy.deepcopy(shipped)
    first["cases"] = shipped["cases"][:3]
    second["cases"] = copy.deepcopy(shipped["cases"][1:])  # the second and third again, and the rest
    async_ = next(m for m in second["cases"][0]["methods"] if m["method"] == "autotm asynchronous")
    async_["step_seconds"] = 1.234  # a rerun of the second case
    del second["notes"]
    a, b = tmp_path / "a.json", tmp_path / "b" / "gpu"
    a.write_text(json.dumps(first))
    b.mkdir(parents=True)
    (b / "gpu_peers.json").write_text(json.dumps(second))
    out = tmp_path / "merged.json"
    r = _bench("gpu-merge", str(a), str(tmp_path / "b"), "--out", str(out))
    assert r.exit_code == 0, r.output
    merged = json.loads(out.read_text())
    key = [(c["model"], c["batch"], c["cap_bytes"]) for c in merged["cases"]]
    assert key == [(c["model"], c["batch"], c["cap_bytes"]) for c in shipped["cases"]]  # the first order
    assert merged["cases"][1]["methods"] == second["cases"][0]["methods"]  # the later one wins
    assert merged["cases"][0] == shipped["cases"][0] and merged["notes"] == shipped["notes"]
    table = out.with_suffix(".md").read_text()
    assert "| | | autotm asynchronous | 1.234 s |" in table and table.count("| unconstrained |") == 5
    # a report that names its allocator setting merges with an older one that does not
    second["alloc_conf"] = "expandable_segments:True"
    (b / "gpu_peers.json").write_text(json.dumps(second))
    assert _bench("gpu-merge", str(a), str(tmp_path / "b"), "--out", str(out)).exit_code == 0
    assert json.loads(out.read_text())["alloc_conf"] == "expandable_segments:True"
    # runs of another setup are refused, in one sentence
    second["cudnn_benchmark"] = True
    (b / "gpu_peers.json").write_text(json.dumps(second))
    r = _bench("gpu-merge", str(a), str(tmp_path / "b"), "--out", str(out))
    assert r.exit_code != 0 and "differ in cudnn_benchmark" in r.output and "Traceback" not in r.output
    # so are runs held to their caps another way
    second["cudnn_benchmark"], second["cap_by"] = shipped["cudnn_benchmark"], "fill"
    first["cap_by"] = "fraction"
    a.write_text(json.dumps(first))
    (b / "gpu_peers.json").write_text(json.dumps(second))
    r = _bench("gpu-merge", str(a), str(tmp_path / "b"), "--out", str(out))
    assert r.exit_code != 0 and "differ in cap_by" in r.output


def test_out_of_memory_streak_counts_the_last_attempts_in_a_row() -> None:
    from autotm_py.bench.peers import _oom_streak

    oom, ok = {"status": "out of memory"}, {"status": "ok"}
    assert _oom_streak([oom, ok]) == 0 and _oom_streak([oom]) == 1
    assert _oom_streak([oom, ok, oom, oom]) == 2 and _oom_streak([]) == 0


def test_stream_breakdown_overlap_and_idle_by_hand() -> None:
    from autotm_py.bench.peers import breakdown_from_events

    def ev(cat: str, name: str, ts_us: float, dur_us: float) -> dict:
        return {"cat": cat, "name": name, "ts": ts_us, "dur": dur_us}

    # kernels over [0,40) and [60,100) µs; an H2D copy over [30,70), a D2H one over [120,130);
    # a memset over [100,110) counts with the compute stream; host calls of two names
    events = [ev("kernel", "k1", 0, 40), ev("kernel", "k2", 60, 40), ev("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 30, 40),
              ev("gpu_memcpy", "Memcpy DtoH (Device -> Pinned)", 120, 10), ev("gpu_memset", "Memset (Device)", 100, 10),
              ev("cuda_runtime", "cudaMemcpyAsync", 0, 3), ev("cuda_runtime", "cudaMemcpyAsync", 50, 4),
              ev("cuda_driver", "cuMemUnmap", 10, 20), ev("cpu_op", "aten::add", 0, 500)]
    b = breakdown_from_events(events, top=1)
    us = 1e-6
    assert b["kernel_seconds"] == pytest.approx(80 * us) and b["other_copy_seconds"] == pytest.approx(10 * us)
    assert b["h2d_seconds"] == pytest.approx(40 * us) and b["d2h_seconds"] == pytest.approx(10 * us)
    assert b["gpu_span_seconds"] == pytest.approx(130 * us)
    assert b["kernel_busy_seconds"] == pytest.approx(90 * us)  # [0,40) + [60,110)
    assert b["copy_busy_seconds"] == pytest.approx(50 * us)
    assert b["overlap_seconds"] == pytest.approx(20 * us)  # [30,40) + [60,70)
    assert b["idle_seconds"] == pytest.approx(10 * us)  # [110,120)
    assert b["host_calls"] == [["cuMemUnmap", pytest.approx(20 * us), 1]]
    assert breakdown_from_events([])["gpu_span_seconds"] == 0.0


def test_a_case_read_back_leaves_out_how_its_plans_ran() -> None:
    """A report's case carries its plans' options ("plan_runs"); reading it back gives the
    same CaseResult as without them."""
    import dataclasses
    import json
    from pathlib import Path

    from autotm_py.bench.peers import CaseResult, PlanRuns

    report = json.loads((Path(__file__).parents[1] / "benchmarks/results/gpu_peers_h100_fill.json").read_text())
    case = report["cases"][0]
    plain = CaseResult.from_json(case)
    with_runs = CaseResult.from_json({**case, "plan_runs": dataclasses.asdict(PlanRuns(async_candidates=8))})
    assert with_runs.to_json() == plain.to_json()
    assert plain.model == "vgg19" and [m.method for m in plain.methods][:2] == ["autotm asynchronous",
                                                                               "autotm synchronous"]
