"""Actual against predicted, kernel by kernel, for one capped GPU case (CUDA only).

Two plans of one formulation under the same cap, side by side in one process:
* `choice`: the profile as measured, where a kernel's cuDNN workspace is the plan's choice
  wherever its time without the workspace was profiled;
* `fitting`: the same profile without those times, so every workspace that fits is reserved
  and the others are left out at the profiled time (the rule before the choice existed);
* `uncapped`: the `choice` plan run without the cap (does the cap itself slow the kernels?);
* `nomoves`: a plan for the whole device (no moves), run without the cap (does the planned
  graph's execution match the profile at all?).
Each is solved, run for a few steps under the cap, then traced once (runtime.kernel_time_trace),
in a fresh process of its own (cuDNN keeps its algorithm choices per process); printed: step
time, predicted, the kernels' sum measured against predicted, and the kernels furthest from
their prediction.

    python benchmarks/kernel_times.py --case vgg19:256:0.5 --cudnn-benchmark
    python benchmarks/kernel_times.py --case vgg19:256:14.85GiB --plans choice,uncapped
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from autotm_py.bench.gpu import parse_case  # noqa: E402
from autotm_py.bench.peers import _eager, _measure  # noqa: E402
from autotm_py.graph import capture, zoo  # noqa: E402
from autotm_py.optimizer import optimize  # noqa: E402
from autotm_py.optimizer.limits import plan_workspace  # noqa: E402
from autotm_py.optimizer.plan import kernel_seconds  # noqa: E402
from autotm_py.profiler import profile  # noqa: E402
from autotm_py.runtime import compile as compile_plan  # noqa: E402
from autotm_py.runtime import kernel_gpu_trace, kernel_time_trace  # noqa: E402
from autotm_py.runtime.fit import hold_device_memory  # noqa: E402
from autotm_py.runtime.step import SEARCH_STEPS  # noqa: E402
from autotm_py.runtime.timing import trace_events  # noqa: E402


def run_plan(args: argparse.Namespace, label: str) -> dict:
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    case = parse_case(args.case)
    name, batch = case.model, case.batch
    entry = zoo.get(name)
    model, (x,), y = zoo.workload(name, batch, device="cuda")
    total = torch.cuda.get_device_properties(0).total_memory
    cap = total if label == "nomoves" else args.cap
    run_cap = None if label in ("nomoves", "uncapped") else args.cap / total
    graph = capture(model, (x,), y, lr=entry.lr, device="cuda", name=name, batch=batch)
    measured = profile(graph, device="cuda", progress=False, cudnn_benchmark=args.cudnn_benchmark)
    prof = measured if label != "fitting" else dataclasses.replace(measured, kernels=tuple(
        dataclasses.replace(c, time_without_workspace=None, room_without_workspace=0, partial_workspace=())
        for c in measured.kernels))
    limit = cap if label == "nomoves" else int(cap * (1 - args.margin))
    plan = optimize(graph, prof, formulation=args.formulation, limit_bytes=limit, time_limit=args.time_limit)
    step = compile_plan(plan, model, lr=entry.lr, search_steps=args.search_steps,
                        choose_algorithms=args.choose_algorithms)
    caught: list[int] = []
    st, secs, pk, retries = _measure(lambda: step(x, y), args.steps, x.device, run_cap, caught=caught)
    if st != "ok":
        print(f"  {label}: {st} (peak {pk / 2**30:.2f} GiB)", flush=True)
        return {"status": st}
    hold_device_memory(run_cap)
    try:
        before = torch.cuda.memory_stats()
        got = kernel_time_trace(step, x, y)
        after = torch.cuda.memory_stats()
        work = kernel_gpu_trace(step, x, y)
        allocator = {k: after.get(k, 0) - before.get(k, 0) for k in
                     ("num_alloc_retries", "num_ooms", "num_device_alloc", "num_device_free", "num_sync_all_streams")}
        names = gpu_kernel_names(lambda: step(x, y))
    finally:
        hold_device_memory(None)
    ws = plan_workspace(graph, measured, plan)
    pred = np.array([0.0 if k.view else kernel_seconds(measured, k.index, plan.kernel_masks[k.index], int(ws[k.index]))
                     for k in graph.kernels])
    rows = []
    for k in graph.compute_kernels:
        c = measured.kernels[k.index]
        rows.append({"kernel": k.index, "op": k.op, "workspace": c.workspace, "reserved": int(ws[k.index]),
                     "with_ws": c.times[0], "without_ws": c.time_without_workspace,
                     "predicted": float(pred[k.index]), "measured": float(got[k.index]),
                     "gpu_busy": work[k.index].seconds if k.index in work else 0.0,
                     "gpu_launches": list(work[k.index].launches) if k.index in work else []})
    # the kernels furthest from their prediction, timed again alone in this process (fresh
    # inputs, no cap): slow here too means the process (its cuDNN choices, its device state),
    # fast here means the step's own tensors or its order
    worst = sorted(rows, key=lambda r: -abs(r["measured"] - r["predicted"]))[:args.top]
    for r in worst:
        r["isolated"], r["isolated_launches"] = isolated_seconds(graph.kernels[r["kernel"]])
    lines = [f"  {label}: step {secs:.3f} s (predicted {plan.predicted_seconds:.3f} s), peak {pk / 2**30:.2f} GiB, "
             f"allocator retries {retries}, out-of-memory errors caught by libraries {caught[0]}; "
             f"kernels measured {got.sum():.3f} s (GPU busy in them "
             f"{sum(r['gpu_busy'] for r in rows):.3f} s), predicted {pred.sum():.3f} s; "
             f"workspaces reserved whole at {sum(int(w) == c.workspace > 0 for w, c in zip(ws, measured.kernels))} "
             f"of {sum(c.workspace > 0 for c in measured.kernels)} kernels; allocator in the traced step {allocator}"]
    for r in worst:
        wo = "-" if r["without_ws"] is None else f"{r['without_ws'] * 1e3:7.2f}"
        alone = "-" if r["isolated"] is None else f"{r['isolated'] * 1e3:7.2f}"
        lines.append(f"    #{r['kernel']:<5} {r['op'][5:40]:35} ws {r['workspace'] / 2**20:7.0f} MiB "
                     f"reserved {r['reserved'] / 2**20:7.0f} MiB  with {r['with_ws'] * 1e3:7.2f} ms  "
                     f"without {wo} ms  predicted {r['predicted'] * 1e3:7.2f}  measured {r['measured'] * 1e3:7.2f}  "
                     f"GPU busy {r['gpu_busy'] * 1e3:7.2f}  alone now {alone}")
        for where, launches in (("in step", r["gpu_launches"]), ("alone", r["isolated_launches"])):
            lines.append(f"        {where:8} " + "; ".join(f"{n[:70]} {sec * 1e3:.2f} ms" for n, sec in launches[:4]))
    lines += [f"    {n['seconds'] * 1e3:8.2f} ms  x{n['count']:<4} {n['name'][:110]}" for n in names[:args.top]]
    print("\n".join(lines), flush=True)
    return {"status": st, "step_seconds": secs, "predicted_seconds": plan.predicted_seconds,
            "peak": pk, "alloc_retries": retries, "caught_ooms": caught[0],
            "allocator": allocator, "gpu_kernels": names[:40],
            "kernels": rows}


def isolated_seconds(kernel) -> tuple[float | None, list]:
    """`kernel` timed alone on fresh inputs, as the profiler times it, and the GPU kernels one
    such call ran ((name, seconds)); (None, []) where it cannot run."""
    from autotm_py.profiler.harness import TimingPolicy, prepare_call, time_call
    from autotm_py.profiler.tiers import dram_alloc

    fast = dram_alloc("cuda")
    try:
        call = prepare_call(kernel, frozenset(), fast, fast, torch.device("cuda"))
        secs = time_call(call.fn, TimingPolicy(warmup=1, min_runs=3, min_seconds=0.03, max_runs=50),
                         "cuda", graphs=False).seconds
        return secs, [(n["name"], n["seconds"]) for n in gpu_kernel_names(call.fn)]
    except Exception as exc:  # noqa: BLE001 - a diagnostic: report and go on
        print(f"    #{kernel.index}: not timed alone ({type(exc).__name__}: {str(exc)[:120]})", flush=True)
        return None, []
    finally:
        call = None  # noqa: F841
        torch.cuda.empty_cache()


def gpu_kernel_names(step) -> list[dict]:
    """GPU kernels of one step by name (which cuDNN algorithms ran), longest total first."""
    by: dict[str, list[float]] = {}
    for e in trace_events(step):
        if e.get("cat") == "kernel":
            by.setdefault(e.get("name", "?"), []).append(float(e.get("dur", 0.0)) * 1e-6)
    return sorted(({"name": n, "seconds": sum(v), "count": len(v)} for n, v in by.items()),
                  key=lambda r: -r["seconds"])


def main() -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", default="vgg19:256:0.5", help="MODEL:BATCH:CAP, CAP 0.5 or 14.85GiB")
    ap.add_argument("--formulation", default="asynchronous")
    ap.add_argument("--plans", default="choice,fitting", help="any of choice, fitting, uncapped, nomoves")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--cudnn-benchmark", action="store_true")
    ap.add_argument("--search-steps", type=int, default=SEARCH_STEPS,
                    help="planned calls in which cuDNN may search algorithms (runtime.compile)")
    ap.add_argument("--choose-algorithms", action="store_true",
                    help="choose each convolution's cuDNN algorithm before the first step (runtime.algorithms)")
    ap.add_argument("--margin", type=float, default=0.0,
                    help="solve capped plans this share below the cap (run them at the cap)")
    ap.add_argument("--out", default=None, help="write the per-kernel table as JSON here")
    args = ap.parse_args()
    try:
        case = parse_case(args.case)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    if not torch.cuda.is_available():
        raise SystemExit("kernel_times needs a CUDA device")
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    entry = zoo.get(case.model)
    model, (x,), y = zoo.workload(case.model, case.batch, device="cuda")
    opt = torch.optim.SGD(model.parameters(), lr=entry.lr)
    status, t_u, peak, _ = _measure(_eager(model, opt, x, y, "plain"), args.steps, x.device, None)
    args.cap = case.cap_bytes if case.cap_bytes is not None else int(case.cap_fraction * peak)
    del model, opt, x, y
    hold_device_memory(None)
    print(f"{args.case}: unconstrained {t_u:.3f} s, peak {peak / 2**30:.2f} GiB, cap {args.cap / 2**30:.2f} GiB",
          flush=True)
    report = {"case": args.case, "unconstrained_seconds": t_u, "cap": args.cap, "plans": {}}
    for label in args.plans.split(","):
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            report["plans"][label] = pool.submit(run_plan, args, label).result()
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
