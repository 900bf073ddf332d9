"""`autotm run`: run a training step with a plan and show measured against predicted."""

from __future__ import annotations

import copy

import click
from rich.table import Table

from .common import (UserError, capture_workload, check_device, check_not_negative, choose_algorithms_option,
                     console, copy_spans_option, emit_json, human_bytes, parse_size, resolve_workload, user_errors)
from .optimize_cmd import _get_profile, _optimizer_errors


@click.command("run")
@click.argument("model")
@click.option("--batch", type=int, default=None, help="Batch size (default: the model's test batch).")
@click.option("--plan", "plan_path", default=None, metavar="FILE", help="A plan saved by `autotm optimize --out`.")
@click.option("--ratio", default=None, metavar="D:S", help="Solve first with this fast:slow ratio.")
@click.option("--dram", default=None, metavar="SIZE", help="Solve first with this CPU fast-memory limit.")
@click.option("--budget", default=None, metavar="SIZE", help="Solve first with this device-memory budget (CUDA).")
@click.option("--formulation", type=click.Choice(["static", "synchronous", "asynchronous", "numa", "2lm"]),
              default="synchronous", show_default=True)
@click.option("--steps", type=int, default=3, show_default=True, help="Timed steps (after one warm-up).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--slow-tier", default=None, metavar="SPEC",
              help="CPU slow tier the slow tensors live in: pmem:PATH, numa:NODE or model (a DRAM arena).")
@click.option("--cache", default=None, metavar="PATH", help="Kernel cache file or folder.")
@click.option("--time-limit", type=float, default=300.0, show_default=True, help="Solver time limit, seconds.")
@click.option("--max-retries", type=int, default=3, show_default=True, metavar="N",
              help="CUDA, when solving: re-solve up to N times with lower limits where the planned "
                   "step runs out of memory under the budget or its peak goes over it.")
@copy_spans_option
@choose_algorithms_option
@click.option("--no-compare", is_flag=True, help="Skip timing the unplanned step.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@user_errors
@_optimizer_errors
def run_cmd(model: str, batch: int | None, plan_path: str | None, ratio: str | None, dram: str | None,
            budget: str | None, formulation: str, steps: int, device: str, slow_tier: str | None,
            cache: str | None, time_limit: float, max_retries: int, copy_spans: int, choose_algorithms: bool,
            no_compare: bool, as_json: bool) -> None:
    """Run MODEL's training step with a plan: measured step time, predicted time, prediction
    error, peak memory per tier and bytes moved.

    On CUDA, a plan solved here runs with the caching allocator held to the budget; where the
    step runs out of memory or its measured peak goes over (fragmentation, workspaces the plan
    does not count), its memory is traced per kernel, the limits are lowered where it went over
    and the plan is solved again (--max-retries), and the report says so. Device memory the
    process holds outside the step when it starts stays out of the plan's limit.

    \b
    Examples:
      autotm run vgg19 --batch 16 --ratio 1:4 --formulation synchronous --slow-tier pmem:/mnt/pmem
      autotm optimize resnet50 --device cuda --budget 4GiB --out plan.json
      autotm run resnet50 --device cuda --plan plan.json
      autotm run resnet50 --device cuda --budget 4GiB --formulation asynchronous --max-retries 3
    """
    import torch

    from ..optimizer import Plan, limit_from_ratio, optimize, parse_ratio
    from ..runtime import compile as compile_plan
    from ..runtime import time_steps, unplanned_step
    from ..runtime.report import RunReport
    from ..runtime.step import RunError, median, spec_from_optimizer

    given = [n for n, v in (("--ratio", ratio), ("--dram", dram), ("--budget", budget)) if v is not None]
    if (plan_path is None) == (len(given) == 0) or len(given) > 1:
        raise UserError("give either --plan FILE or exactly one limit (--ratio, --dram or --budget)")
    if steps <= 0:
        raise UserError(f"--steps must be positive, got {steps}")
    check_not_negative("--max-retries", max_retries)
    check_not_negative("--copy-spans", copy_spans)
    if choose_algorithms and device != "cuda":
        raise UserError("--choose-algorithms chooses cuDNN's convolution algorithms: it needs --device cuda")
    if budget is not None and device != "cuda":
        raise UserError("--budget is device memory for --device cuda; on the CPU give --dram or --ratio")
    check_device(device)
    if ratio is not None:
        parse_ratio(ratio)
    graph = capture_workload(model, batch, device=device)
    plan: Plan | None = None
    if plan_path is not None:
        plan = Plan.load(plan_path, graph)
        if plan.device != device:
            raise UserError(f"the plan is for --device {plan.device}, not {device}")
        limit = plan.limit_bytes
    else:
        limit = parse_size(dram or budget) if (dram or budget) else limit_from_ratio(graph, ratio)  # type: ignore[arg-type]
    if device == "cuda" and limit > torch.cuda.mem_get_info()[0]:
        raise UserError(f"the budget {human_bytes(limit)} is more than the "
                        f"{human_bytes(torch.cuda.mem_get_info()[0])} this device has free")
    if plan is None:
        prof = _get_profile(graph, device, False, slow_tier, cache, as_json)

        def solve(limits):
            return optimize(graph, prof, formulation=formulation, limit_bytes=limits, time_limit=time_limit,
                            copy_spans=copy_spans)

        if device != "cuda":
            plan = solve(limit)
    w = resolve_workload(model, graph.batch, device=device)
    net = w.model.to(device)
    inputs = tuple(x.to(device) for x in w.inputs)
    target = w.target.to(device) if w.target is not None else None
    dev = torch.device(device)
    unplanned = None
    if not no_compare:
        try:
            ref = copy.deepcopy(net)
            base = unplanned_step(ref, spec_from_optimizer(None, w.lr, "cross_entropy"), inputs, target)
            unplanned = median(time_steps(base, steps, dev))
            del ref, base
        except torch.OutOfMemoryError:
            unplanned = None
        if device == "cuda":
            torch.cuda.empty_cache()
    notes = ""
    resolves = 0
    try:
        if plan is None:  # CUDA, solved here: fit the plan to the budget
            fitted = _fit_cuda(solve, net, w.lr, inputs, target, steps, limit, len(graph.kernels), max_retries,
                               choose_algorithms)
            plan, step = fitted.plan, fitted.outcome.payload[0]
            if not fitted.fits:
                raise UserError(f"the step did not fit the budget {human_bytes(limit)}: "
                                f"{fitted.summary() or 'it ran out of memory or went over'}; give a larger "
                                f"--budget or more --max-retries")
            times, fast_peak, notes = fitted.outcome.payload[1], fitted.outcome.peak, fitted.summary()
            resolves = fitted.resolves
        else:
            step = compile_plan(plan, net, lr=w.lr, slow_tier=slow_tier, choose_algorithms=choose_algorithms)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                times = time_steps(lambda: step(inputs, target), steps, dev)
                fast_peak = torch.cuda.max_memory_allocated()
            else:  # no allocator counts DRAM apart: the warm-up step counts the live tensors
                _, held = step.run_probing_fast(inputs, target)
                fast_peak = max(held.values(), default=0)
                times = time_steps(lambda: step(inputs, target), steps, dev, warmup=0)
            if fast_peak > plan.limit_bytes:
                notes = f"the measured peak is over the plan's budget by {human_bytes(fast_peak - plan.limit_bytes)}"
                if device == "cpu" and plan.direct_outputs:
                    notes += (" (the plan counts no output in fast memory for the slow tier, as with "
                              "--direct-outputs; this runtime makes convolutions' outputs there first)")
    except (RunError, MemoryError) as exc:
        raise UserError(str(exc)) from None
    except torch.OutOfMemoryError:
        raise UserError(f"the step ran out of device memory under the plan's budget "
                        f"{human_bytes(limit)}; optimize with a lower --budget") from None
    stats = step.move_stats
    report = RunReport(
        graph.name, graph.batch, device, plan.formulation, steps, median(times), plan.predicted_seconds,
        unplanned, fast_peak, plan.peak_fast_bytes, stats.slow_bytes_live_peak,
        stats.bytes_to_fast, stats.bytes_to_slow, stats.bytes_async, stats.unplanned_copies,
        plan.limit_bytes, plan.modeled, notes=notes, resolves=resolves)
    step.close()
    if as_json:
        emit_json(report.to_json())
        return
    t = Table(title=f"{graph.name}, batch {graph.batch}, {plan.formulation} plan, {device}", show_header=False)
    t.add_column("what")
    t.add_column("value", justify="right")
    rows = [
        ("measured step time (median)", f"{report.step_seconds:.4f} s"),
        ("predicted step time" + (" (modeled)" if plan.modeled else ""), f"{report.predicted_seconds:.4f} s"),
        ("prediction error", f"{report.prediction_error:.1%}"),
    ]
    if unplanned is not None:
        rows.append(("unplanned step (all fast)", f"{unplanned:.4f} s (x{report.step_seconds / unplanned:.2f})"))
    rows += [
        ("fast-memory limit", human_bytes(plan.limit_bytes)),
        ("fast peak, measured" + (" (live tensors)" if device == "cpu" else ""), human_bytes(fast_peak)),
        ("fast peak, predicted", human_bytes(plan.peak_fast_bytes)),
        ("slow-tier peak", human_bytes(report.slow_peak_bytes)),
        ("bytes moved to fast / to slow", f"{human_bytes(report.bytes_to_fast)} / {human_bytes(report.bytes_to_slow)}"),
        ("  of which asynchronous", human_bytes(report.bytes_async)),
        ("copies outside the plan", str(report.unplanned_copies)),
    ]
    if report.notes:
        rows.append(("notes", report.notes))
    for a, b in rows:
        t.add_row(a, b)
    console.print(t)


def _fit_cuda(solve, net, lr: float, inputs, target, steps: int, budget: int, num_kernels: int, max_retries: int,
              choose_algorithms: bool = False):
    """runtime.fit.fit_to_budget with the CUDA stages; each outcome's payload is (the compiled
    step, its step times)."""
    from ..runtime import compile as compile_plan
    from ..runtime.fit import BudgetError, cuda_stages, fit_to_budget, held_outside

    run, trace = cuda_stages(lambda plan: compile_plan(plan, net, lr=lr, choose_algorithms=choose_algorithms),
                             inputs, target, steps, budget)
    try:
        return fit_to_budget(solve, run, trace, budget, num_kernels, max_retries,
                             held=held_outside(net, None, (*inputs, target)))
    except BudgetError as exc:
        raise UserError(str(exc)) from None
