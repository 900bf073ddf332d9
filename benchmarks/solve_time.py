"""Solve time and predicted slowdown of every formulation on the conventional set at 1:4.

For each network of the zoo's conventional set (inception_v4 1024, resnet200 512, vgg19 2048,
densenet264 512, transformer 512): build time, solve time, gap and model size per
formulation, and the predicted slowdown against all fast memory. Kernel times are a
*roofline estimate* (autotm_py.optimizer.roofline, modeled: timing paper-sized kernels for
real is too slow on a small machine) with the profiler's Optane model for slow placements.
Writes benchmarks/results/solve_time.json and solve_time.md.

The asynchronous formulation runs with the optimizer's default candidate restriction
(`async_candidates="auto"`); `asynchronous-all` is the same formulation with every kernel of
the window as a candidate and `asynchronous-2` with the restriction forced, to measure what
the restriction gives up where the unrestricted model solves (`--variant-models` names the
networks they run on).

    python benchmarks/solve_time.py [--models vgg19:2048,...] [--formulations ...]
        [--variant-models vgg19,transformer]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

from autotm_py.cli.common import capture_workload
from autotm_py.optimizer import (ASYNC_CANDIDATES, ASYNC_FULL_BELOW, ASYNC_SMALL_ABOVE,
                                 ASYNC_SMALL_SHARE, optimize, verify)
from autotm_py.optimizer.roofline import roofline_profile

CONVENTIONAL = (("inception_v4", 1024), ("resnet200", 512), ("vgg19", 2048), ("densenet264", 512),
                ("transformer", 512))
FORMS = ("static", "synchronous", "asynchronous", "numa", "2lm")
# formulation label -> (optimizer formulation, async_candidates)
VARIANTS = {"asynchronous-all": ("asynchronous", None), "asynchronous-2": ("asynchronous", 2)}


def _load() -> list[float] | None:
    """1, 5 and 15 minute load averages (other jobs share the cores)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else math.nan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(f"{m}:{b}" for m, b in CONVENTIONAL))
    ap.add_argument("--formulations", default=",".join(FORMS))
    ap.add_argument("--ratio", default="1:4")
    ap.add_argument("--time-limit", type=float, default=300.0)
    ap.add_argument("--gap", type=float, default=0.01)
    ap.add_argument("--async-candidates", type=lambda v: v if v == "auto" else None if v == "all" else int(v),
                    default="auto",
                    help="Longest overlap candidates kept per interval between uses ('all': no "
                         "restriction; 'auto': the optimizer's default).")
    ap.add_argument("--variant-models", default=None,
                    help="Networks (comma-separated names) on which the asynchronous-all and "
                         "asynchronous-2 variants run; default: every network.")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--merge", action="store_true",
                    help="Keep the rows of other (network, formulation) pairs from an earlier solve_time.json.")
    args = ap.parse_args()
    forms = args.formulations.split(",")
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    load0 = _load()
    rows = []
    for spec in args.models.split(","):
        name, batch = spec.split(":")
        t0 = time.perf_counter()
        graph = capture_workload(name, int(batch))
        prof = roofline_profile(graph)
        print(f"{name} {batch}: {len(graph.kernels)} kernels, {len(graph.tensors)} tensors, "
              f"captured in {time.perf_counter() - t0:.1f} s", flush=True)
        for f in forms:
            if f in VARIANTS and args.variant_models and name not in args.variant_models.split(","):
                continue
            t1 = time.perf_counter()
            row = {"model": name, "batch": int(batch), "formulation": f, "ratio": args.ratio,
                   "kernels": len(graph.kernels), "peak_live_bytes": graph.peak_live_bytes}
            form, cand = VARIANTS.get(f, (f, args.async_candidates))
            try:
                plan = optimize(graph, prof, formulation=form, ratio=args.ratio, time_limit=args.time_limit,
                                mip_gap=args.gap, async_candidates=cand)
                verify(plan, graph, prof)
                s = plan.solver
                row.update(status=s.status, build_seconds=s.build_seconds, solve_seconds=s.solve_seconds,
                           gap=s.gap, variables=s.variables, constraints=s.constraints,
                           nonzeros=s.nonzeros, predicted_seconds=plan.predicted_seconds,
                           all_fast_seconds=plan.all_fast_seconds, slowdown=plan.slowdown,
                           bytes_moved=plan.bytes_moved, limit_bytes=plan.limit_bytes,
                           async_candidates=plan.async_candidates,
                           async_min_bytes=plan.async_min_bytes, objective=s.objective,
                           wall_seconds=time.perf_counter() - t1, verified=True)
            except Exception as exc:  # record and go on: one network must not sink the table
                row.update(status="error", error=str(exc)[:300], wall_seconds=time.perf_counter() - t1)
            row["load"] = _load()
            rows.append(row)
            print(f"  {f:13s} {row.get('status')}: build {row.get('build_seconds', 0):.2f} s, solve "
                  f"{row.get('solve_seconds', 0):.2f} s, gap {row.get('gap', math.nan):.4f}, slowdown "
                  f"x{row.get('slowdown', math.nan):.3f}", flush=True)
    old_path = os.path.join(args.out, "solve_time.json")
    if args.merge and os.path.exists(old_path):
        ran = {(r["model"], r["formulation"]) for r in rows}
        with open(old_path) as fh:
            rows = [r for r in json.load(fh)["rows"] if (r["model"], r["formulation"]) not in ran] + rows
    order = FORMS + tuple(VARIANTS)
    models = list(dict.fromkeys(r["model"] for r in rows))
    rows.sort(key=lambda r: (models.index(r["model"]),
                             order.index(r["formulation"]) if r["formulation"] in order else len(order)))
    geo = {}
    present = {r["formulation"] for r in rows}
    for f in [f for f in FORMS + tuple(VARIANTS) if f in present]:
        xs = [r["slowdown"] for r in rows if r["formulation"] == f and "slowdown" in r]
        geo[f] = {"geomean_slowdown": geomean(xs), "networks": len(xs)}
    result = {
        "benchmark": "solve_time", "ratio": args.ratio, "time_limit": args.time_limit, "gap": args.gap,
        "async_candidates": args.async_candidates, "load_before": load0, "load_after": _load(), "started": started,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "profile": "roofline estimate (modeled)", "machine": {"cpus": os.cpu_count(),
                                                              "python": sys.version.split()[0],
                                                              "platform": platform.platform()},
        "rows": rows, "geomean": geo,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "solve_time.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    with open(os.path.join(args.out, "solve_time.md"), "w") as fh:
        fh.write(markdown(result))
    print(markdown(result))


def _load_range(rows: list[dict]) -> str:
    loads = [r["load"][0] for r in rows if r.get("load")]
    return f"{min(loads):.1f} to {max(loads):.1f}" if loads else "not recorded"


def markdown(result: dict) -> str:
    lines = [f"# Solve time and predicted slowdown at {result['ratio']} (fast:slow)", "",
             f"Kernel times: {result['profile']}. HiGHS, time limit {result['time_limit']:.0f} s, "
             f"relative gap {result['gap']:.0%}, {result['machine']['cpus']} cores shared with other "
             f"jobs (1-minute load average after each row: {_load_range(result['rows'])}).", "",
             "The gap is relative to the objective, the predicted step time (every kernel's time "
             "included). The asynchronous formulation runs with `async_candidates="
             f"{result.get('async_candidates')!r}`: "
             f"a graph whose ±15 window holds more than {ASYNC_FULL_BELOW:,} overlap candidates keeps, "
             "per interval between two uses of a tensor, the first, the last and the "
             f"{ASYNC_CANDIDATES} longest kernels (column `candidates`: kept per interval beside "
             "the ends, `all` = unrestricted), and one whose window holds more than "
             f"{ASYNC_SMALL_ABOVE:,} also gives no candidate to its smallest tensors, those holding "
             f"{ASYNC_SMALL_SHARE:.0%} of the free bytes (`none < N MiB`: they keep synchronous "
             "moves only); its gap is relative to that model. "
             "`asynchronous-all` keeps every candidate, `asynchronous-2` restricts whatever the "
             "size. The slowdown is against the all-fast "
             "time, which with these kernel times (no slow placement is faster) bounds every "
             "plan from below.", "",
             "| network | formulation | candidates | status | build s | solve s | gap | variables | "
             "constraints | nonzeros | slowdown vs all fast | GB moved |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        if r["status"] == "error":
            lines.append(f"| {r['model']} {r['batch']} | {r['formulation']} | | error: {r['error'][:80]} "
                         "| | | | | | | | |")
            continue
        ilp = r["formulation"].startswith(("static", "synchronous", "asynchronous"))
        cand = ("-" if not r["formulation"].startswith("asynchronous") else
                "all" if r.get("async_candidates") is None else str(r["async_candidates"]))
        if r.get("async_min_bytes"):
            cand += f", none < {r['async_min_bytes'] / 2**20:.0f} MiB"
        lines.append(
            f"| {r['model']} {r['batch']} | {r['formulation']} | {cand} | {r['status']} | "
            + (f"{r['build_seconds']:.2f} | {r['solve_seconds']:.2f} | {100 * r['gap']:.2f}% | "
               f"{r['variables']:,} | {r['constraints']:,} | {r['nonzeros']:,} | " if ilp else "- | - | - | - | - | - | ")
            + f"x{r['slowdown']:.3f} | {r['bytes_moved'] / 1e9:.1f} |")
    lines += ["", "Geometric mean of the predicted slowdown against all fast memory:", "",
              "| formulation | geomean slowdown | networks |", "|---|---:|---:|"]
    for f, g in result["geomean"].items():
        lines.append(f"| {f} | x{g['geomean_slowdown']:.3f} ({100 * (g['geomean_slowdown'] - 1):.1f}%) "
                     f"| {g['networks']} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
