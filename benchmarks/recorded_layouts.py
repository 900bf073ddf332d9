"""Layouts of recorded GPU steps: greedy by size alone against the arena's search over orders
(runtime.arena.pack with layout_tries), both against the most bytes live at once (no layout
spans less). No GPU needed: the steps are the planned arena's recordings (bench.arena keeps one
per attempt), laid out again on this machine.

    python benchmarks/recorded_layouts.py                       # the committed H100 recordings
    python benchmarks/recorded_layouts.py --recordings RESULTS/gpu/arena_recordings
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np

from autotm_py.runtime.arena import layout_from_log, layout_tries

HERE = pathlib.Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recordings", type=pathlib.Path, default=HERE / "results" / "arena_recordings",
                    help="a folder of the arena's recorded steps (*.npz)")
    ap.add_argument("--out", type=pathlib.Path, default=HERE / "results" / "recorded_layouts.json")
    args = ap.parse_args()
    files = sorted(args.recordings.glob("*.npz"))
    if not files:
        raise SystemExit(f"no recorded steps (*.npz) in {args.recordings}")
    rows = []
    for f in files:
        d = np.load(f)
        greedy = layout_from_log(d["events"], d["live_at_start"], tries=0).top
        t0 = time.perf_counter()
        layout = layout_from_log(d["events"], d["live_at_start"])
        seconds = time.perf_counter() - t0
        row = {"recording": f.name, "cap": int(d["cap"]), "allocations": len(layout.sizes),
               "tries": layout_tries(int(np.sum(layout.offsets >= 0))), "live_peak": layout.live_peak,
               "greedy_top": greedy, "searched_top": layout.top, "search_seconds": seconds}
        rows.append(row)
        print(f"{f.name}: {row['allocations']} allocations, live peak {layout.live_peak / 2**30:.3f} GiB; "
              f"greedy by size {greedy / 2**30:.3f} GiB ({greedy / layout.live_peak - 1:+.2%}), "
              f"best of {row['tries'] + 1} orders {layout.top / 2**30:.3f} GiB ({layout.overhead:+.2%}, "
              f"{seconds:.1f} s); cap {row['cap'] / 2**30:.2f} GiB: "
              f"{'fits' if layout.top <= row['cap'] else 'over'} (greedy: {'fits' if greedy <= row['cap'] else 'over'})",
              flush=True)
    args.out.write_text(json.dumps({"kind": "recorded_layouts", "rows": rows}, indent=1))
    lines = ["| recording | allocations | live peak | greedy by size | best of the orders tried | cap |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lp = r["live_peak"]
        lines.append(f"| {r['recording']} | {r['allocations']} | {lp / 2**30:.3f} GiB "
                     f"| {r['greedy_top'] / 2**30:.3f} GiB ({r['greedy_top'] / lp - 1:+.1%}) "
                     f"| {r['searched_top'] / 2**30:.3f} GiB ({r['searched_top'] / lp - 1:+.1%}, {r['tries'] + 1} orders) "
                     f"| {r['cap'] / 2**30:.2f} GiB |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
