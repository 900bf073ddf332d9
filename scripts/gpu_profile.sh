#!/usr/bin/env bash
# Profile the `gpu` zoo set on a CUDA machine into kernels_cache/cuda.sqlite, print the
# pinned-host <-> device bandwidth table and how long resnet200 batch 32 took to profile
# (profiled first, on a cold cache for this GPU), then check the prediction of the whole step.
#
#   bash scripts/gpu_profile.sh                  # the whole gpu set
#   MODELS="resnet200:32 vgg19:64" bash scripts/gpu_profile.sh
#   SKIP_ACCURACY=1 bash scripts/gpu_profile.sh  # profiles only
set -euo pipefail
cd "$(dirname "$0")/.."
# the scripts under benchmarks/ import the package from this checkout where it is not installed
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
mkdir -p benchmarks/results

"$PY" - "${MODELS:-}" <<'EOF'
import json, sys, time

import torch

from autotm_py.cli.common import capture_workload
from autotm_py.cli.profile_cmd import bandwidth_table
from autotm_py.graph import zoo
from autotm_py.profiler import profile
from rich.console import Console

if not torch.cuda.is_available():
    sys.exit("this script needs a CUDA device")
wanted = sys.argv[1].split() if len(sys.argv) > 1 and sys.argv[1] else None
pairs = [(m, int(b)) for m, b in (w.split(":") for w in wanted)] if wanted else zoo.zoo_set("gpu")
# resnet200 batch 32 first: its time is a cold-cache profile of a big network
pairs.sort(key=lambda p: p != ("resnet200", 32))
console = Console()
rows, prof = [], None
for name, batch in pairs:
    t0 = time.perf_counter()
    g = capture_workload(name, batch, device="cuda")
    capture_s = time.perf_counter() - t0
    prof = profile(g, device="cuda", progress=sys.stderr.isatty())
    s = prof.stats
    row = {"model": name, "batch": batch, "kernels": s["compute_kernels"], "unique": s["unique_kernels"],
           "measured": s["measured_kernels"], "cached": s["cached_kernels"], "failed": len(s["failed"]),
           "capture_s": round(capture_s, 2), "profile_s": round(s["seconds"], 2),
           "predicted_step_s": round(prof.all_fast_seconds, 5)}
    rows.append(row)
    print(json.dumps(row), flush=True)
    for f in s["failed"]:
        print(f"  not replayed: {f['op']}: {f['reason']}")
    torch.cuda.empty_cache()
print(f"device: {prof.device_fingerprint}")
for r in rows:
    if (r["model"], r["batch"]) == ("resnet200", 32):
        print(f"resnet200 batch 32: profiled in {r['profile_s']} s "
              f"({r['unique']} unique kernels, {r['measured']} measured now) after {r['capture_s']} s of capture")
console.print(bandwidth_table(prof.bandwidths, "pinned host <-> H100 bandwidths"))
with open("benchmarks/results/gpu_profile.json", "w") as fh:
    json.dump({"device": prof.device_fingerprint, "rows": rows,
               "bandwidths": prof.bandwidths.to_json()}, fh, indent=2)
EOF

if [ -z "${SKIP_ACCURACY:-}" ]; then
  "$PY" benchmarks/profile_accuracy.py --device cuda --workload resnet50:64 --workload vgg19:64 \
      --runs 5 --out benchmarks/results/profile_accuracy_cuda
fi
