"""autotm against what GPU users do today, on one CUDA device, in one process.

For each case MODEL:BATCH:CAP (CAP a fraction of the unconstrained step's peak memory, or a
size such as 14.85GiB):
the unconstrained eager step, autotm asynchronous and synchronous plans, save_on_cpu
(pinned) and checkpoint_sequential(4), all on the same model under the same cap; step time,
ratio to unconstrained and to the transfer lower bound, peak memory, prediction error.
An OVERSIZED case MODEL:BATCH:BUDGET_GIB (--oversized) trains a step larger than the GPU.

    python benchmarks/gpu_peers.py --case vgg19:256:14.85GiB --case resnet152:256:0.5
    python benchmarks/gpu_peers.py --oversized vgg19:1024:74       # budget in GiB
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib

# Every method runs with expandable segments, so that allocator fragmentation, which no plan
# models, costs each of them as little as it can (must be set before CUDA starts).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

from autotm_py.bench.gpu import DEFAULT_CASES, parse_case  # noqa: E402
from autotm_py.bench.peers import PlanRuns, markdown, run_case, run_oversized  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append", help="MODEL:BATCH:CAP, CAP 0.5 or 14.85GiB (repeatable)")
    ap.add_argument("--oversized", action="append", default=[], help="MODEL:BATCH:BUDGET_GIB (repeatable)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--time-limit", type=float, default=120.0, help="ILP time limit per solve (s)")
    ap.add_argument("--formulations", default="asynchronous,synchronous")
    ap.add_argument("--cache", default=None, help="kernel cache file (default: the project's)")
    ap.add_argument("--cudnn-benchmark", action="store_true", help="Let cuDNN benchmark algorithms (all methods).")
    ap.add_argument("--retry-repairs", type=int, default=0,
                    help="re-solves around the kernels where a fitting step made the allocator free its cache")
    ap.add_argument("--refine-seconds", type=float, default=0.0,
                    help="asynchronous plans with restricted overlap candidates: seconds more with all of them")
    ap.add_argument("--choose-algorithms", action="store_true",
                    help="choose each convolution's cuDNN algorithm before a plan's first step (runtime.algorithms)")
    ap.add_argument("--out", default="benchmarks/results/gpu_peers")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_peers needs a CUDA device")
    # cuDNN's benchmark mode picks algorithms by speed alone, with workspaces of several GiB
    # that no memory cap leaves room for; every method here uses the heuristic choice.
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    cases = [parse_case(c) for c in (args.case if args.case is not None else ([] if args.oversized else DEFAULT_CASES))]
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results, oversized = [], []
    for c in cases:
        results.append(run_case(c.model, c.batch, c.cap_fraction, cap_bytes=c.cap_bytes, steps=args.steps,
                                time_limit=args.time_limit, formulations=tuple(args.formulations.split(",")),
                                cache=args.cache,
                                runs=PlanRuns(args.retry_repairs, args.refine_seconds, args.choose_algorithms)))
        out.with_suffix(".json").write_text(json.dumps({"cases": [r.to_json() for r in results]}, indent=2))
    for c in args.oversized:
        name, batch, budget = c.split(":")
        oversized.append(run_oversized(name, int(batch), int(float(budget) * 2**30), steps=args.steps,
                                       time_limit=args.time_limit, cache=args.cache))
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "cases": [r.to_json() for r in results], "oversized": oversized}
    out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    md = markdown(results) if results else ""
    for o in oversized:
        md += (f"\n{o['model']} batch {o['batch']} (unplanned peak {o['predicted_peak'] / 2**30:.1f} GiB) under "
               f"{o['budget'] / 2**30:.0f} GiB: {o['status']}, {o['step_seconds']:.3f} s/step, "
               f"{o['samples_per_second']:.0f} samples/s, peak {o['peak_bytes'] / 2**30:.1f} GiB, "
               f"lower bound {o['lower_bound_seconds']:.3f} s\n")
    out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
