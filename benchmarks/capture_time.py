"""Capture time and memory of paper-sized training steps (fake tensors: nothing allocated).

Each workload is captured in a fresh process so its max RSS is its own. Prints a table and
writes JSON + markdown under benchmarks/results/.

    python benchmarks/capture_time.py                         # vgg19 2048, resnet200 512, densenet264 512
    python benchmarks/capture_time.py --workload inception_v4:1024
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

_CHILD = """
import json, resource, sys, time
from autotm_py.cli.common import capture_workload
name, batch = sys.argv[1], int(sys.argv[2])
t = time.perf_counter()
g = capture_workload(name, batch)
s = g.summary()
print(json.dumps({"model": name, "batch": batch, "kernels": s["kernels"],
                  "unique_kernels": s["unique_kernels"], "tensors": s["tensors"],
                  "peak_live_bytes": s["peak_live_bytes"], "capture_seconds": s["capture_seconds"],
                  "build_and_capture_seconds": time.perf_counter() - t,
                  "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", action="append", help="MODEL:BATCH (repeatable)")
    ap.add_argument("--out", default="benchmarks/results/capture_time")
    args = ap.parse_args()
    workloads = args.workload or ["vgg19:2048", "resnet200:512", "densenet264:512"]
    rows = []
    for w in workloads:
        name, batch = w.split(":")
        done = subprocess.run([sys.executable, "-c", _CHILD, name, batch], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{w} failed:\n{done.stderr}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{name} batch {batch}: {r['kernels']} kernels, peak live {r['peak_live_bytes'] / 2**30:.2f} GiB, "
              f"capture {r['capture_seconds']:.1f} s, max RSS {r['max_rss_bytes'] / 2**30:.2f} GiB", flush=True)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    lines = ["| model | batch | kernels | unique | peak live bytes | capture time | max RSS |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['kernels']:,} | {r['unique_kernels']} | "
                     f"{r['peak_live_bytes']:,} ({r['peak_live_bytes'] / 2**30:.1f} GiB) | "
                     f"{r['capture_seconds']:.1f} s | {r['max_rss_bytes'] / 2**30:.2f} GiB |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
