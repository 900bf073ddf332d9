"""`autotm optimize`: solve the AutoTM ILP (or a baseline) for a workload and a limit."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Callable

import click
from rich.table import Table

from .common import (UserError, capture_workload, check_device, check_not_negative, console, emit_json, human_bytes,
                     is_graph_file, load_graph_file, parse_async_candidates, parse_size, user_errors)

CHOICES = ("static", "synchronous", "asynchronous", "numa", "2lm", "all")


def _optimizer_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from ..optimizer import SolverFailed

        try:
            return fn(*args, **kwargs)
        except SolverFailed as exc:
            raise UserError(str(exc)) from None
        except KeyboardInterrupt:
            raise UserError("interrupted") from None
    return wrapper


def _get_profile(graph: Any, device: str, estimate: bool, slow_tier: str | None, cache: str | None,
                 quiet: bool, fingerprint: str | None = None) -> Any:
    if estimate:
        from ..optimizer.roofline import roofline_profile

        return roofline_profile(graph)
    from ..profiler import profile  # profiles what the cache lacks, with its progress bar

    try:
        return profile(graph, device=device, slow_tier=slow_tier, cache=cache, progress=not quiet,
                       fingerprint=fingerprint)
    except Exception as exc:  # cache or tier problems are the user's to fix
        from ..profiler import CacheError, TierError

        if isinstance(exc, (CacheError, TierError)):
            raise UserError(str(exc)) from None
        raise


def _summary(plan: Any, graph: Any, prof: Any) -> dict[str, Any]:
    from ..optimizer.plan import phase_seconds

    s = plan.solver
    return {
        "formulation": plan.formulation, "predicted_seconds": plan.predicted_seconds,
        "all_fast_seconds": plan.all_fast_seconds, "slowdown": plan.slowdown,
        "bytes_moved": plan.bytes_moved, "peak_fast_bytes": plan.peak_fast_bytes,
        "limit_bytes": plan.limit_bytes, "ratio": plan.ratio, "modeled": plan.modeled,
        "moves": len(plan.moves), "build_seconds": s.build_seconds, "solve_seconds": s.solve_seconds,
        "status": s.status, "gap": s.gap, "variables": s.variables, "constraints": s.constraints,
        "nonzeros": s.nonzeros, "backend": s.backend, "phases": phase_seconds(graph, prof, plan),
    }


@click.command("optimize")
@click.argument("model")
@click.option("--batch", type=int, default=None, help="Batch size (default: the model's test batch).")
@click.option("--ratio", default=None, metavar="D:S",
              help="Fast:slow memory; 1:4 = 20% of the unplanned peak in fast memory (the paper's 4:1 PMM:DRAM).")
@click.option("--dram", default=None, metavar="SIZE", help="Absolute fast-memory (DRAM) limit, e.g. 2GiB or 500MB.")
@click.option("--budget", default=None, metavar="SIZE", help="Device-memory budget for --device cuda, e.g. 10GiB.")
@click.option("--formulation", type=click.Choice(CHOICES), default="synchronous", show_default=True,
              help="ILP formulation or baseline; `all` compares them side by side.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--solver", type=click.Choice(["highs", "cbc"]), default="highs", show_default=True)
@click.option("--time-limit", type=float, default=300.0, show_default=True, help="Solver time limit, seconds.")
@click.option("--gap", type=float, default=0.01, show_default=True, help="Relative MIP gap to stop at.")
@click.option("--async-window", type=int, default=15, show_default=True,
              help="Asynchronous formulation: kernels within this many positions of a user may overlap a move.")
@click.option("--async-candidates", default="auto", show_default=True, metavar="auto|all|N",
              help="Asynchronous formulation: per interval between two uses of a tensor, the first, the "
                   "last and the N longest kernels of the window may overlap a move; all: every one; "
                   "auto: 2 on large graphs, all on small ones, and on the largest none for the "
                   "smallest tensors (10% of the bytes).")
@click.option("--refine-seconds", type=float, default=0.0, show_default=True, metavar="S",
              help="Asynchronous formulation: where auto or N restricted the candidates, up to S more "
                   "seconds solving with all of them, from the restricted plan; the better plan is kept.")
@click.option("--copy-spans", type=int, default=0, show_default=True, metavar="N",
              help="Asynchronous formulation: each copy may run in pieces beside up to N kernels (a "
                   "fetch from where it starts up to the tensor's next use, a write-back from the "
                   "tensor's last write up to where it leaves), solved from the plan without pieces; "
                   "0: each copy beside one kernel.")
@click.option("--move-state", is_flag=True, help="Let parameters, inputs and optimizer state move too.")
@click.option("--direct-outputs", is_flag=True,
              help="CPU: plan as the original's runtime ran, every kernel writing its outputs straight "
                   "into the slow tier (the paper's experiments). By default the outputs this runtime "
                   "makes in fast memory first (convolutions') count there, so the step keeps to the limit.")
@click.option("--estimate", is_flag=True,
              help="Use a roofline estimate of kernel times instead of profiling (modeled).")
@click.option("--slow-tier", default=None, metavar="SPEC", help="CPU slow tier for profiling: pmem:PATH, numa:NODE or model.")
@click.option("--cache", default=None, metavar="PATH", help="Kernel cache file or folder.")
@click.option("--fingerprint", default=None, metavar="TEXT",
              help="Plan for another machine from the cache alone: the device fingerprint whose rows to "
                   "use, or |-separated parts of it that name one (e.g. 'H200|cudnn=heuristic'; `autotm "
                   "cache info` lists them). Nothing is measured, so --device cuda needs no GPU here; "
                   "with a graph file as MODEL.")
@click.option("--optimizer", type=click.Choice(["sgd", "adam"]), default="sgd", show_default=True)
@click.option("--check", "check_plan", default=None, metavar="PLAN",
              help="Verify an existing plan file against this workload instead of optimizing.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--out", default=None, metavar="FILE",
              help="Save the plan as JSON (with `all`: FILE's stem plus .FORMULATION.json).")
@user_errors
@_optimizer_errors
def optimize_cmd(model: str, batch: int | None, ratio: str | None, dram: str | None, budget: str | None,
                 formulation: str, device: str, solver: str, time_limit: float, gap: float,
                 async_window: int, async_candidates: str, refine_seconds: float, copy_spans: int,
                 move_state: bool, direct_outputs: bool,
                 estimate: bool, slow_tier: str | None,
                 cache: str | None, fingerprint: str | None, optimizer: str, check_plan: str | None,
                 as_json: bool, out: str | None) -> None:
    """Decide where every tensor of MODEL's training step lives and when it moves.

    MODEL is a zoo name, `package.module:function`, or a graph saved by `autotm graph --out`
    (GRAPH.json or .json.gz), which needs no capture here (a CUDA graph on a machine
    without CUDA, with --fingerprint).

    \b
    Examples:
      autotm optimize vgg19 --ratio 1:4
      autotm optimize vgg19 --dram 2GiB --formulation all --json
      autotm optimize resnet50 --device cuda --budget 10GiB --formulation asynchronous
      autotm optimize r152.json.gz --device cuda --budget 24GiB --fingerprint "H200|cudnn=heuristic"
    """
    from ..optimizer import Infeasible, Plan, limit_from_ratio, optimize, parse_ratio, verify

    given = [n for n, v in (("--ratio", ratio), ("--dram", dram), ("--budget", budget)) if v is not None]
    if check_plan is None and len(given) != 1:
        raise UserError("give exactly one limit: --ratio D:S, --dram SIZE or (with --device cuda) --budget SIZE"
                        + (f"; got {' and '.join(given)}" if given else ""))
    if check_plan is not None and given:
        raise UserError("--check verifies a plan with its own limit; drop " + " and ".join(given))
    if budget is not None and device != "cuda":
        raise UserError("--budget is device memory for --device cuda; on the CPU give --dram or --ratio")
    if dram is not None and device == "cuda":
        raise UserError("--dram is the CPU's fast memory; with --device cuda give --budget or --ratio")
    if ratio is not None:
        try:
            parse_ratio(ratio)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    limit = parse_size(dram or budget) if (dram or budget) else None
    if time_limit <= 0:
        raise UserError(f"--time-limit must be positive, got {time_limit}")
    if not 0 <= gap < 1:
        raise UserError(f"--gap is a relative gap in [0, 1), got {gap}")
    if async_window < 0:
        raise UserError(f"--async-window must be >= 0, got {async_window}")
    check_not_negative("--refine-seconds", refine_seconds)
    candidates = parse_async_candidates(async_candidates)
    check_not_negative("--copy-spans", copy_spans)
    if fingerprint is not None and estimate:
        raise UserError("--fingerprint takes another machine's profile from the cache; drop --estimate")
    if is_graph_file(model):
        if batch is not None:
            raise UserError(f"{model} is a captured graph with its own batch; drop --batch")
        graph = load_graph_file(model)
        if graph.device != device:
            raise UserError(f"{model} was captured for {graph.device}; pass --device {graph.device}")
    else:
        graph = None
    if fingerprint is None:
        check_device(device)
    if graph is None:
        graph = capture_workload(model, batch, device=device, optimizer=optimizer)
    if check_plan is not None:
        plan = Plan.load(check_plan, graph)
        prof = _get_profile(graph, plan.device, estimate, slow_tier, cache, as_json, fingerprint)
        verify(plan, graph, prof)
        summary = {**_summary(plan, graph, prof), "valid": True}
        if as_json:
            emit_json(summary)
        else:
            console.print(f"{check_plan}: a valid {plan.formulation} plan for {graph.name} batch "
                          f"{graph.batch}, predicted {plan.predicted_seconds:.4g} s "
                          f"(x{plan.slowdown:.3f} of all fast memory)")
        return
    prof = _get_profile(graph, device, estimate, slow_tier, cache, as_json, fingerprint)
    limit_bytes = limit if limit is not None else limit_from_ratio(graph, ratio, move_state=move_state)  # type: ignore[arg-type]
    if formulation == "all":
        forms = ["static", "synchronous", "asynchronous"] + (["numa", "2lm"] if device == "cpu" else [])
    else:
        forms = [formulation]
    plans: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for f in forms:
        try:
            if not as_json:
                console.print(f"[dim]solving {f} ...[/]", highlight=False)
            plan = optimize(graph, prof, formulation=f, limit_bytes=limit_bytes, time_limit=time_limit,
                            mip_gap=gap, solver=solver, async_window=async_window,
                            async_candidates=candidates, move_state=move_state, refine_seconds=refine_seconds,
                            copy_spans=copy_spans, direct_outputs=direct_outputs)
            if ratio is not None:
                from dataclasses import replace

                plan = replace(plan, ratio=ratio, metrics={**plan.metrics, "ratio": ratio})
        except Infeasible as exc:
            if len(forms) == 1:
                raise UserError(str(exc)) from None
            errors[f] = str(exc)
            continue
        verify(plan, graph, prof)
        plans[f] = plan
    if not plans:
        raise UserError(next(iter(errors.values())))
    if out:
        p = Path(out)
        for f, plan in plans.items():
            plan.save(str(p if len(forms) == 1 else p.with_name(f"{p.stem}.{f}.json")))
    if as_json:
        rows = {f: _summary(pl, graph, prof) for f, pl in plans.items()}
        rows.update({f: {"formulation": f, "error": e} for f, e in errors.items()})
        emit_json({"model": graph.name, "batch": graph.batch, "device": device,
                   "limit_bytes": limit_bytes, "ratio": ratio, "peak_live_bytes": graph.peak_live_bytes,
                   "all_fast_seconds": prof.all_fast_seconds, "profile_modeled": prof.modeled,
                   "plans": rows if len(forms) > 1 else rows[forms[0]]})
        return
    _print_table(graph, prof, limit_bytes, ratio, plans, errors)


def _print_table(graph: Any, prof: Any, limit: int, ratio: str | None, plans: dict[str, Any],
                 errors: dict[str, str]) -> None:
    lim = f"{human_bytes(limit)}" + (f" (ratio {ratio})" if ratio else "")
    table = Table(title=f"{graph.name}, batch {graph.batch}, {prof.device}: fast memory {lim}, "
                        f"unplanned peak {human_bytes(graph.peak_live_bytes)}")
    for col in ("formulation", "predicted", "slowdown vs all fast", "bytes moved", "fast used",
                "solve", "gap", "status"):
        table.add_column(col, justify="left" if col == "formulation" else "right")
    for f, p in plans.items():
        s = p.solver
        gap = "-" if s.backend in ("first-touch", "2lm-model") else (
            "inf" if math.isinf(s.gap) else f"{100 * s.gap:.2f}%")
        table.add_row(
            f + (" (modeled)" if f == "2lm" else ""), f"{p.predicted_seconds:.4g} s", f"x{p.slowdown:.3f}",
            human_bytes(p.bytes_moved), human_bytes(p.peak_fast_bytes),
            "-" if s.status == "none" else f"{s.build_seconds + s.solve_seconds:.2f} s", gap, s.status)
    for f, e in errors.items():
        table.add_row(f, "infeasible", "", "", "", "", "", "")
    notes = []
    if prof.modeled:
        notes.append("times MODELED (slow tier or roofline estimate)")
    notes.append(f"all fast: {prof.all_fast_seconds:.4g} s")
    table.caption = "; ".join(notes)
    console.print(table)
    for f, e in errors.items():
        console.print(f"[yellow]{f}:[/] {e}", highlight=False)
