"""Time HiGHS and CBC on the exported AutoTM instances (solvers/*.mps.gz).

    python solvers/time_solvers.py [--time-limit 300] [--gap 0.01] [--only PATTERN]

Prints and writes solvers/timings.md: status, objective (ms), gap and wall time per solver.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import os
import re
import shutil
import subprocess
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def run_highs(path: str, time_limit: float, gap: float) -> dict:
    import highspy

    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("time_limit", time_limit)
    h.setOptionValue("mip_rel_gap", gap)
    h.readModel(path)
    t0 = time.perf_counter()
    h.run()
    info = h.getInfo()
    return {"status": str(h.getModelStatus()).split(".")[-1], "seconds": time.perf_counter() - t0,
            "objective": info.objective_function_value, "gap": info.mip_gap}


def run_cbc(path: str, time_limit: float, gap: float) -> dict:
    from pulp import apis

    cbc = apis.PULP_CBC_CMD().path
    t0 = time.perf_counter()
    out = subprocess.run([cbc, path, "-sec", str(time_limit), "-ratioGap", str(gap), "-solve"],
                         capture_output=True, text=True).stdout
    secs = time.perf_counter() - t0
    status = re.search(r"Result - (.*)", out)
    obj = re.search(r"Objective value:\s+([-+0-9.eE]+)", out)
    gapm = re.search(r"Gap:\s+([-+0-9.eE]+)", out)
    return {"status": status.group(1).strip() if status else "unknown", "seconds": secs,
            "objective": float(obj.group(1)) if obj else float("nan"),
            "gap": float(gapm.group(1)) if gapm else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time-limit", type=float, default=300.0)
    ap.add_argument("--gap", type=float, default=0.01)
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    lines = ["| instance | solver | status | objective (ms) | gap | seconds | time limit s |",
             "|---|---|---|---:|---:|---:|---:|"]
    for gz in sorted(glob.glob(os.path.join(HERE, "*.mps.gz"))):
        if args.only and args.only not in gz:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            mps = os.path.join(tmp, os.path.basename(gz)[:-3])
            with gzip.open(gz, "rb") as src, open(mps, "wb") as dst:
                shutil.copyfileobj(src, dst)
            for name, fn in (("highs", run_highs), ("cbc", run_cbc)):
                r = fn(mps, args.time_limit, args.gap)
                line = (f"| {os.path.basename(gz)} | {name} | {r['status']} | {r['objective']:.6g} | "
                        f"{r['gap']:.4f} | {r['seconds']:.1f} | {args.time_limit:.0f} |")
                print(line, flush=True)
                lines.append(line)
    # keep earlier rows of instances not timed in this run
    path = os.path.join(HERE, "timings.md")
    done = {tuple(x.split("|")[1:3]) for x in lines[2:]}
    if os.path.exists(path):
        with open(path) as fh:
            old = [x.rstrip("\n") for x in fh if x.startswith("| ") and ".mps.gz" in x and x.count("|") == 8]
        lines += [x for x in old if tuple(x.split("|")[1:3]) not in done]
    with open(path, "w") as fh:
        fh.write(f"# HiGHS and CBC on the AutoTM instances\n\nRelative gap {args.gap:.0%}, "
                 f"{os.cpu_count()} cores (1-minute load average {os.getloadavg()[0]:.1f} at the end "
                 "of the last run: other jobs may share them); objective in ms of predicted step "
                 "time; cold starts (no warm start, unlike `autotm optimize`).\n\n"
                 + "\n".join(lines[:2] + sorted(lines[2:])) + "\n")


if __name__ == "__main__":
    main()
