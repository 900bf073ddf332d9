"""Fast memory a CPU step holds against its plan's limit, with outputs planned straight into the
slow tier counted as the original's runtime would (every kernel writes them there directly:
`optimize(direct_outputs=True)`) and as this runtime makes them (convolutions make theirs in
fast memory first, and the plan counts them there: the default), side by side in one process.

Each plan is solved with roofline kernel times (modeled), compiled and run for one step node by
node (`Step.run_probing_fast`), which counts at every kernel the bytes of live tensors outside
the slow tier's arena; the slow tier is the modeled one (a separate DRAM arena).

    python benchmarks/cpu_fast_peak.py                        # resnet50 batch 2, vgg19 batch 2
    python benchmarks/cpu_fast_peak.py --workload resnet50:4 --share 0.3
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib

from autotm_py.graph import capture, zoo
from autotm_py.optimizer import Infeasible, optimize
from autotm_py.optimizer.plan import staged_bytes_per_kernel
from autotm_py.optimizer.roofline import roofline_profile
from autotm_py.runtime import compile as compile_plan

FORMULATIONS = ("static", "synchronous", "asynchronous", "numa")


def measure(name: str, batch: int, share: float) -> list[dict]:
    entry = zoo.get(name)
    model, (x,), y = zoo.workload(name, batch, device="cpu")
    graph = capture(model, (x,), y, lr=entry.lr, name=name, batch=batch)
    prof = roofline_profile(graph)
    limit = int(graph.peak_live_bytes * share)
    rows = []
    for form in FORMULATIONS:
        for direct in ((True,) if form == "numa" else (True, False)):
            row = {"workload": f"{name} {batch}", "formulation": form, "limit": limit,
                   "outputs": "straight to slow (reference)" if direct else "counted where made"}
            try:
                plan = optimize(graph, prof, formulation=form, limit_bytes=limit, time_limit=120,
                                direct_outputs=direct)
            except Infeasible as exc:
                rows.append({**row, "status": "infeasible", "error": str(exc)})
                print(f"{row['workload']} {form}, {row['outputs']}: infeasible", flush=True)
                continue
            step = compile_plan(plan, copy.deepcopy(model), lr=entry.lr)
            _, seen = step.run_probing_fast(x, y)
            step.close()
            peak = max(seen.values(), default=0)
            row.update(status="ok", predicted_seconds=plan.predicted_seconds, plan_peak=plan.peak_fast_bytes,
                       measured_peak=peak, measured_over_limit=peak / limit - 1,
                       staged_bytes=int(staged_bytes_per_kernel(graph, plan.tensors).sum()),
                       copies_outside_plan=step.rewrite.unplanned_copies)
            rows.append(row)
            print(f"{row['workload']} {form}, {row['outputs']}: predicted {plan.predicted_seconds * 1e3:.2f} ms "
                  f"(modeled); measured peak {peak / 2**20:.1f} MiB for a limit of {limit / 2**20:.1f} MiB "
                  f"({row['measured_over_limit']:+.2%}), plan counts {plan.peak_fast_bytes / 2**20:.1f} MiB; "
                  f"{row['copies_outside_plan']} copies outside the plan", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", action="append", metavar="MODEL:BATCH",
                    help="repeatable; default resnet50:2 and vgg19:2")
    ap.add_argument("--share", type=float, default=0.5, help="the limit as a share of the unplanned peak")
    ap.add_argument("--out", default="benchmarks/results/cpu_fast_peak.json")
    args = ap.parse_args()
    rows = []
    for w in args.workload or ["resnet50:2", "vgg19:2"]:
        name, batch = w.split(":")
        rows += measure(name, int(batch), args.share)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"kind": "cpu_fast_peak", "share": args.share, "rows": rows}, indent=1) + "\n")
    md = ["| workload | formulation | outputs for the slow tier | predicted (modeled) | measured peak / limit | "
          "plan counts | copies outside the plan |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            md.append(f"| {r['workload']} | {r['formulation']} | {r['outputs']} | {r['status']} | | | |")
            continue
        md.append(f"| {r['workload']} | {r['formulation']} | {r['outputs']} | {r['predicted_seconds'] * 1e3:.2f} ms | "
                  f"{r['measured_peak'] / 2**20:.1f} / {r['limit'] / 2**20:.1f} MiB ({r['measured_over_limit']:+.2%}) | "
                  f"{r['plan_peak'] / 2**20:.1f} MiB | {r['copies_outside_plan']} |")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
