"""`autotm bench` (the paper's experiments, run records as JSON) and `autotm plot`
(Figures 7 to 12 from those records, PNG and PDF)."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Callable

import click
from rich.table import Table

from .common import (UserError, check_device, check_not_negative, choose_algorithms_option, console,
                     copy_spans_option, emit_json, parse_async_candidates, parse_size, user_errors)

FORMULATION_NAMES = ("static", "synchronous", "asynchronous", "numa", "2lm")
DEFAULT_RESULTS = "bench-results"


def _bench_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from ..bench.results import ResultsError

        try:
            return fn(*args, **kwargs)
        except ResultsError as exc:
            raise UserError(str(exc)) from None
        except KeyboardInterrupt:
            raise UserError("interrupted; the runs finished so far are in the results folder") from None
    return wrapper


def _split(text: str | None) -> list[str]:
    return [p.strip() for p in (text or "").split(",") if p.strip()]


def _formulations(text: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    forms = tuple(_split(text)) or default
    for f in forms:
        if f not in FORMULATION_NAMES:
            raise UserError(f"unknown formulation {f!r}; choose from {', '.join(FORMULATION_NAMES)}")
    return forms


def _ratios(text: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    from ..optimizer import parse_ratio

    ratios = tuple(_split(text)) or default
    for r in ratios:
        try:
            parse_ratio(r)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    return ratios


def _workloads(text: str | None, set_name: str) -> list[Any]:
    """Workloads named on the command line (checked before anything runs), else the set's."""
    from ..bench.experiments import Workload, parse_workload
    from ..graph import zoo

    if not _split(text):
        return [Workload(m, b) for m, b in zoo.zoo_set(set_name)]
    out = []
    for spec in _split(text):
        w = parse_workload(spec)
        if ":" in w.model:
            import os
            import sys

            if os.getcwd() not in sys.path:  # a spec of the project folder, as `autotm graph` allows
                sys.path.insert(0, os.getcwd())
        else:
            entry = zoo.get(w.model)  # an unknown name is one sentence (user_errors)
            if w.batch is None:
                batches = dict(entry.sets).get(set_name) or ()
                if not batches:
                    raise UserError(f"{w.model} has no batch size in the {set_name} set; write {w.model}:BATCH")
                w = Workload(w.model, int(batches[0]))
        if w.batch is not None and w.batch <= 0:
            raise UserError(f"batch size must be a positive integer, got {w.batch} in {spec!r}")
        out.append(w)
    return out


def _common(fn: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option("--formulations", default=None, metavar="F,F",
                     help=f"Comma-separated, from {', '.join(FORMULATION_NAMES)}."),
        click.option("--time-limit", type=float, default=120.0, show_default=True,
                     help="Solver time limit per ILP, seconds (the gap reached is recorded)."),
        click.option("--gap", type=float, default=0.01, show_default=True, help="Relative MIP gap to stop at."),
        click.option("--estimate/--profile", "estimate", default=None,
                     help="Roofline kernel times (modeled; default for paper-sized sets) or the kernel cache "
                          "(default for the test set)."),
        click.option("--measure/--plan-only", "measure", default=None,
                     help="Run every plan for real on this CPU (default only for the test set)."),
        click.option("--steps", type=int, default=1, show_default=True, help="Timed steps per measured run."),
        click.option("--slow-tier", default="model", show_default=True, metavar="SPEC",
                     help="CPU slow tier for profiling and measured runs: model, pmem:PATH or numa:NODE."),
        click.option("--cache", default=None, metavar="PATH", help="Kernel cache file or folder."),
        click.option("--results", default=DEFAULT_RESULTS, show_default=True, metavar="DIR",
                     help="Folder the run records (one JSON per run) go to."),
        click.option("--json", "as_json", is_flag=True, help="Print the records as JSON."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _run(experiment: str, workloads: list[Any], make_config: Callable[..., Any], forms: tuple[str, ...],
         paper_sized: bool, time_limit: float, gap: float, estimate: bool | None, measure: bool | None,
         steps: int, slow_tier: str, cache: str | None, results: str, as_json: bool, **cfg_kw: Any) -> None:
    from ..bench.experiments import run_workload

    if time_limit <= 0:
        raise UserError(f"--time-limit must be positive, got {time_limit}")
    if not 0 <= gap < 1:
        raise UserError(f"--gap is a relative gap in [0, 1), got {gap}")
    if steps <= 0:
        raise UserError(f"--steps must be positive, got {steps}")
    est = paper_sized if estimate is None else estimate
    meas = (not paper_sized) if measure is None else measure
    cfg = make_config(formulations=forms, estimate=est, measure=meas, steps=steps, time_limit=time_limit,
                      gap=gap, slow_tier=slow_tier, cache=cache, **cfg_kw)
    log = (lambda s: None) if as_json else (lambda s: console.print(s, highlight=False))
    records = []
    for w in workloads:
        records += run_workload(w, cfg, results=results, log=log)
    if as_json:
        emit_json([r.to_json() for r in records])
        return
    _summary_table(experiment, records, results)


def _summary_table(experiment: str, records: list[Any], results: str) -> None:
    from ..bench.results import geomean_slowdowns

    bad = [r for r in records if not r.ok]
    console.print(f"{len(records)} runs ({len(bad)} not ok) recorded under {results}/{experiment}/", highlight=False)
    for measured in (False, True):
        geo = geomean_slowdowns(records, measured=measured)
        if not geo:
            continue
        ratios = list(dict.fromkeys(r for _, r in geo))
        forms = list(dict.fromkeys(f for f, _ in geo))
        kind = "measured" if measured else ("predicted, modeled" if any(r.modeled for r in records) else "predicted")
        t = Table(title=f"geomean slowdown against all fast memory ({kind}), (networks)")
        t.add_column("fast:slow (paper PMM:DRAM)")
        for f in forms:
            t.add_column(f, justify="right")
        for r in ratios:
            fast, slow = r.split(":")
            cells = []
            for f in forms:
                g = geo.get((f, r))
                cells.append("-" if g is None or math.isnan(g[0]) else f"x{g[0]:.3f} ({g[1]})")
            t.add_row(f"{r} ({slow}:{fast})", *cells)
        console.print(t)


@click.group("bench")
def bench_group() -> None:
    """The paper's experiments: run records (JSON, one per run) for `autotm plot`.

    \b
    Examples:
      autotm bench conventional                        # paper batches, planned with roofline times (modeled)
      autotm bench conventional --set test             # small batches, run for real on this CPU
      autotm bench case-study                          # Inception at the 18 ratios
      autotm bench large                               # the four ~650 GB networks against 2LM (modeled)
      autotm bench gpu --case vgg19:256:0.5            # the GPU comparison (needs CUDA)
    """


@bench_group.command("conventional")
@click.option("--models", default=None, metavar="M[:B],...",
              help="Zoo models (with an optional :BATCH) or package.module:function specs; default: the set's.")
@click.option("--set", "set_name", type=click.Choice(["conventional", "test"]), default="conventional",
              show_default=True, help="Batch sizes: the paper's (planned only) or the small test set (run for real).")
@click.option("--ratios", default=None, metavar="D:S,...",
              help="Fast:slow ratios; default 0:1,1:8,1:4,1:1,1:0 = the paper's PMM:DRAM 1:0,8:1,4:1,1:1,0:1.")
@_common
@user_errors
@_bench_errors
def conventional_cmd(models: str | None, set_name: str, ratios: str | None, formulations: str | None,
                     **kw: Any) -> None:
    """Every network of a set, each formulation at each common ratio (Figures 7, 9, 11)."""
    from ..bench.experiments import COMMON_RATIOS, CONVENTIONAL_FORMULATIONS, conventional_config

    forms = _formulations(formulations, CONVENTIONAL_FORMULATIONS)
    rs = _ratios(ratios, COMMON_RATIOS)
    workloads = _workloads(models, set_name)
    _run("conventional", workloads, functools.partial(conventional_config, ratios=rs), forms,
         set_name != "test", **kw)


@bench_group.command("case-study")
@click.option("--model", "models", default="inception_v4:1024", show_default=True, metavar="M:B",
              help="The workload of the case study.")
@click.option("--ratios", default=None, metavar="D:S,...", help="Fast:slow ratios; default the paper's 18.")
@_common
@user_errors
@_bench_errors
def case_study_cmd(models: str, ratios: str | None, formulations: str | None, **kw: Any) -> None:
    """Inception-v4 at the 18 ratios of the paper's case study (Figure 10)."""
    from ..bench.experiments import CASE_STUDY_RATIOS, case_study_config

    forms = _formulations(formulations, ("static", "synchronous"))
    rs = _ratios(ratios, CASE_STUDY_RATIOS)
    workloads = _workloads(models, "conventional")
    _run("case-study", workloads, functools.partial(case_study_config, ratios=rs), forms, True, **kw)


@bench_group.command("large")
@click.option("--models", default=None, metavar="M[:B],...", help="Default: the zoo's large set (about 650 GB each).")
@click.option("--limit", default="185GB", show_default=True, metavar="SIZE",
              help="Absolute fast-memory limit (the paper: 185 GB of a 192 GB machine).")
@_common
@user_errors
@_bench_errors
def large_cmd(models: str | None, limit: str, formulations: str | None, **kw: Any) -> None:
    """The large networks, static and synchronous against the 2LM model, planned only (Figure 8)."""
    from ..bench.experiments import LARGE_FORMULATIONS, large_config

    forms = _formulations(formulations, LARGE_FORMULATIONS)
    workloads = _workloads(models, "large")
    _run("large", workloads, functools.partial(large_config, limit_bytes=parse_size(limit)), forms, True, **kw)


@bench_group.command("gpu")
@click.option("--case", "cases", multiple=True, metavar="MODEL:BATCH:CAP",
              help="CAP is a fraction of the unconstrained peak (0.5) or a size (14.85GiB); repeatable. "
                   "Default: the comparison's five cases, at the reference measurements' caps.")
@click.option("--steps", type=int, default=5, show_default=True)
@click.option("--time-limit", type=float, default=120.0, show_default=True, help="ILP time limit per solve, seconds.")
@click.option("--formulations", default="asynchronous,synchronous", show_default=True)
@click.option("--cudnn-benchmark", is_flag=True,
              help="Let cuDNN benchmark algorithms (every method). Off by default: its search takes "
                   "whatever memory is free at the time, so no memory plan controls the workspaces.")
@click.option("--cache", default=None, metavar="PATH", help="Kernel cache file or folder.")
@click.option("--retry-repairs", type=int, default=0, show_default=True, metavar="N",
              help="Also re-solve up to N times around the kernels where a step that fits made the "
                   "allocator free its cache (a device-wide synchronization).")
@click.option("--refine-seconds", type=float, default=0.0, show_default=True, metavar="S",
              help="Once an asynchronous plan whose overlap candidates were restricted (large graphs) "
                   "fits, solve it again for up to S seconds with every candidate and run that too; "
                   "the faster one that fits counts.")
@click.option("--async-candidates", default="auto", show_default=True, metavar="auto|all|N",
              help="The asynchronous formulation's overlap candidates per interval (see autotm optimize "
                   "--help); more hide copies better on graphs of many short kernels and solve longer.")
@copy_spans_option
@choose_algorithms_option
@click.option("--arena", is_flag=True,
              help="Also run each formulation with the planned arena for its device memory: a step "
                   "recorded, laid out so that nothing live at once overlaps, and replayed within the "
                   "cap (no allocator fragmentation; needs a C++ compiler). Each recorded step is kept in "
                   "RESULTS/gpu/arena_recordings.")
@click.option("--cap-by", type=click.Choice(["fraction", "fill"]), default=None,
              help="How every method is held to the cap: PyTorch's per-process memory fraction "
                   "(as the reference measurements), or that and the rest of the device taken, so "
                   "that cuDNN sees as free what the cap leaves. Default: $AUTOTM_CAP_BY, else fraction.")
@click.option("--results", default=DEFAULT_RESULTS, show_default=True, metavar="DIR",
              help="The report goes to DIR/gpu/gpu_peers.json (and .md).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@user_errors
@_bench_errors
def gpu_cmd(cases: tuple[str, ...], steps: int, time_limit: float, formulations: str, cudnn_benchmark: bool,
            cache: str | None, retry_repairs: int, refine_seconds: float, async_candidates: str,
            copy_spans: int, choose_algorithms: bool, arena: bool, cap_by: str | None, results: str, as_json: bool) -> None:
    """The GPU comparison: autotm against save_on_cpu and checkpointing under a memory cap (Figure 12's
    counterpart)."""
    from ..bench.gpu import DEFAULT_CASES, parse_case, run_gpu
    from ..bench.peers import PlanRuns

    parsed = [parse_case(c) for c in (cases or DEFAULT_CASES)]  # bad input fails before CUDA is touched
    forms = _formulations(formulations, ("asynchronous", "synchronous"))
    if any(f in ("numa", "2lm") for f in forms):
        raise UserError("the GPU comparison runs the ILP formulations only (static, synchronous, asynchronous)")
    if steps <= 0:
        raise UserError(f"--steps must be positive, got {steps}")
    check_not_negative("--retry-repairs", retry_repairs)
    check_not_negative("--refine-seconds", refine_seconds)
    candidates = parse_async_candidates(async_candidates)
    check_not_negative("--copy-spans", copy_spans)
    if cap_by is not None:
        import os

        from ..runtime.fit import CAP_BY_ENV

        os.environ[CAP_BY_ENV] = cap_by  # the plans' child processes hold their caps alike
    check_device("cuda")
    path = run_gpu(parsed, Path(results) / "gpu", steps=steps, time_limit=time_limit, formulations=forms,
                   cudnn_benchmark=cudnn_benchmark, cache=cache,
                   runs=PlanRuns(retry_repairs, refine_seconds, choose_algorithms, candidates, copy_spans), arena=arena,
                   log=(lambda s: None) if as_json else (lambda s: console.print(s, highlight=False)))
    if as_json:
        click.echo(path.read_text())
        return
    console.print(f"report: {path}", highlight=False)


@bench_group.command("gpu-merge")
@click.argument("reports", nargs=-1, required=True, metavar="REPORT...")
@click.option("--out", required=True, metavar="FILE", help="The merged report (JSON; its table beside it, .md).")
@click.option("--notes", default=None, metavar="TEXT", help="The merged report's notes (default: the first's).")
@click.option("--json", "as_json", is_flag=True, help="Print the merged report as JSON.")
@user_errors
@_bench_errors
def gpu_merge_cmd(reports: tuple[str, ...], out: str, notes: str | None, as_json: bool) -> None:
    """Merge GPU comparison reports (files or results folders) of one device and setup into
    one: a later report's case replaces an earlier one of the same model, batch and cap."""
    from ..bench.gpu import load_gpu_report, merge_gpu_reports, write_gpu_report

    merged = merge_gpu_reports([load_gpu_report(r) for r in reports], notes)
    write_gpu_report(merged, Path(out))
    if as_json:
        emit_json(merged)
        return
    console.print(f"{len(merged['cases'])} case(s): {out}", highlight=False)


@bench_group.command("summary")
@click.option("--results", default=DEFAULT_RESULTS, show_default=True, metavar="DIR", help="Folder of run records.")
@click.option("--json", "as_json", is_flag=True, help="Print the geometric-mean slowdowns as JSON.")
@user_errors
@_bench_errors
def summary_cmd(results: str, as_json: bool) -> None:
    """Markdown tables of every experiment in a results folder (measured and modeled numbers marked)."""
    from ..bench.results import geomean_slowdowns, load_records
    from ..bench.summary import markdown

    records = load_records(results)
    if as_json:
        out: dict[str, Any] = {}
        for kind, measured in (("predicted", False), ("measured", True)):
            for (f, q), (g, n) in geomean_slowdowns(records, measured=measured).items():
                out.setdefault(kind, {}).setdefault(f, {})[q] = {"geomean_slowdown": g, "networks": n}
        emit_json(out)
        return
    click.echo(markdown(records))


# ---- plots -------------------------------------------------------------------------------
def _plot_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--json", "as_json", is_flag=True, help="Print the written files as JSON.")(fn)
    fn = click.option("--name", default=None, metavar="STEM", help="File name without extension (default: the figure's).")(fn)
    fn = click.option("--out", default="figures", show_default=True, metavar="DIR",
                      help="Folder for the PNG and PDF.")(fn)
    fn = click.option("--results", default=DEFAULT_RESULTS, show_default=True, metavar="DIR",
                      help="Folder of `autotm bench` records (for gpu: the folder or the report file).")(fn)
    return fn


def _save(fig: Any, out: str, name: str, as_json: bool) -> None:
    from ..viz import save

    paths = save(fig, out, name)
    if as_json:
        emit_json({"files": [str(p) for p in paths]})
    else:
        console.print("wrote " + ", ".join(str(p) for p in paths), highlight=False)


@click.group("plot")
def plot_group() -> None:
    """The paper's Figures 7 to 12 from `autotm bench` records (PNG and PDF).

    \b
    Examples:
      autotm plot speedup --results bench-results --out figures      # Figure 7
      autotm plot case-study                                          # Figure 10 a, b, c
      autotm plot gpu --results benchmarks/results/gpu_peers.json     # the GPU comparison
    """


def _records_plot(experiment: str, name: str, figure: str, help_text: str) -> None:
    @plot_group.command(name, help=help_text)
    @click.option("--models", default=None, metavar="M[:B],...",
                  help="Only these workloads (a name alone: every batch of it).")
    @_plot_options
    @user_errors
    @_bench_errors
    def cmd(models: str | None, results: str, out: str, name: str | None, as_json: bool) -> None:
        from .. import viz
        from ..bench.experiments import parse_workload
        from ..bench.results import ResultsError, load_records

        records = load_records(results, experiment)
        if _split(models):
            wanted = [parse_workload(m) for m in _split(models)]
            records = [r for r in records if any(r.model == w.model and w.batch in (None, r.batch) for w in wanted)]
            if not records:
                raise ResultsError(f"the results folder {results} holds no {experiment} runs of {models}")
        _save(getattr(viz, f"{figure}_figure")(records), out, name or figure, as_json)

    cmd.__name__ = f"plot_{figure}_cmd"


_records_plot("conventional", "speedup", "speedup",
              "Figure 7: speedup over all slow memory per network at 8:1, 4:1, 1:1 (PMM:DRAM).")
_records_plot("large", "large", "large", "Figure 8: large networks, speedup over the 2LM model.")
_records_plot("conventional", "costs", "costs",
              "Figure 9: synchronous performance against all fast memory, with relative memory cost.")
_records_plot("case-study", "case-study", "case_study",
              "Figure 10: the Inception case study: slowdown, IO bytes in DRAM, bytes moved.")
_records_plot("conventional", "error", "error",
              "Figure 11: prediction error of the measured runs per ratio.")


@plot_group.command("gpu")
@_plot_options
@user_errors
@_bench_errors
def plot_gpu_cmd(results: str, out: str, name: str | None, as_json: bool) -> None:
    """Figure 12's counterpart: step time per method per case, with the transfer lower bound."""
    from ..bench.gpu import load_gpu_report
    from ..viz import gpu_figure

    _save(gpu_figure(load_gpu_report(results)), out, name or "gpu", as_json)


__all__ = ["bench_group", "plot_group"]
