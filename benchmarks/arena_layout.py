"""How much memory a training step's tensors need under an online first-fit allocator against
the planned arena's layout of the same allocations (runtime.arena), both against the most
bytes live at once (no layout needs less). No GPU and no run needed: the step is captured with
fake tensors.

The allocations are the captured graph's, in the order its generated code makes them: before
the first kernel the state that outlives the step (parameters, buffers, optimizer state, the
batch); at each kernel its new storages, then the storages whose last reader it was (AutoTM's
liveness; workspaces inside a kernel are left out). They are run through the arena's allocator
(arena.c) over a made-up address range: first with no plan (the lowest fit, as an allocator
that never moves anything), then replaying the layout laid out from that run, within its span.

    python benchmarks/arena_layout.py                       # the GPU comparison's three networks
    python benchmarks/arena_layout.py --workload resnet50:16
"""

from __future__ import annotations

import argparse
import json
import pathlib

from autotm_py.graph import capture, zoo
from autotm_py.optimizer import optimize
from autotm_py.optimizer.roofline import roofline_profile
from autotm_py.runtime.arena import Arena, allocation_program, replay_program

BASE = 1 << 40  # the replay's addresses: never dereferenced


def measure(name: str, batch: int, plan_spec: str | None) -> dict:
    model, (x,), y = zoo.workload(name, batch, device="meta")
    graph = capture(model, (x,), y, lr=zoo.get(name).lr, name=name, batch=batch)
    plan = None
    if plan_spec:
        formulation, ratio = plan_spec.split(":", 1)
        plan = optimize(graph, roofline_profile(graph), formulation=formulation, ratio=ratio, time_limit=120)
    program = allocation_program(graph, plan)
    big = sum(n for op, _, n in program if op == "a") * 2 + (1 << 30)
    arena = Arena(BASE, big)
    replay_program(arena, program)
    first_fit = arena.stats()
    layout = arena.layout()
    arena.set_plan(layout)
    arena.set_span(layout.top)
    replay_program(arena, program)
    planned = arena.stats()
    row = {"workload": f"{name} {batch}", "plan": f"{plan_spec} (modeled times)" if plan_spec else "none", "allocations": sum(op == "a" for op, _, _ in program),
           "live_peak": layout.live_peak, "first_fit_top": first_fit.top, "layout_top": layout.top,
           "first_fit_over_live": first_fit.top / layout.live_peak - 1, "layout_over_live": layout.overhead,
           "replay_unplanned": planned.unplanned, "replay_top": planned.top}
    print(f"{row['workload']}, plan {row['plan']}: {row['allocations']} allocations, live peak {layout.live_peak / 2**20:.1f} MiB; "
          f"first fit spans {first_fit.top / 2**20:.1f} MiB (+{row['first_fit_over_live']:.1%}), "
          f"the layout {layout.top / 2**20:.1f} MiB (+{layout.overhead:.1%}); replayed: "
          f"{planned.unplanned} unplanned, span {planned.top / 2**20:.1f} MiB", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", action="append", metavar="MODEL:BATCH",
                    help="repeatable; default vgg19:256, resnet152:256, densenet201:128")
    ap.add_argument("--plan", action="append", metavar="FORMULATION:RATIO",
                    help="also the fast-memory allocations of this plan (roofline profile: modeled "
                         "kernel times); repeatable; default synchronous:1:1; 'none' for none")
    ap.add_argument("--out", default="benchmarks/results/arena_layout.json")
    args = ap.parse_args()
    plans = [p for p in (args.plan or ["synchronous:1:1"]) if p != "none"]
    rows = []
    for w in args.workload or ["vgg19:256", "resnet152:256", "densenet201:128"]:
        name, batch = w.split(":")
        for p in [None, *plans]:
            rows.append(measure(name, int(batch), p))
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"kind": "arena_layout", "rows": rows}, indent=1) + "\n")
    md = ["| workload | plan | allocations | live peak | first fit | layout | layout replayed |",
          "|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['workload']} | {r['plan']} | {r['allocations']} | {r['live_peak'] / 2**20:.1f} MiB | "
                  f"{r['first_fit_top'] / 2**20:.1f} MiB (+{r['first_fit_over_live']:.1%}) | "
                  f"{r['layout_top'] / 2**20:.1f} MiB (+{r['layout_over_live']:.1%}) | "
                  f"{r['replay_unplanned']} unplanned |")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
