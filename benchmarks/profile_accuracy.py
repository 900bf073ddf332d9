"""Profile-predicted against measured time of the whole unplanned training step.

Prediction: the sum over kernels of each kernel's all-fast time from the profile (through the
kernel cache: a profiled workload is not timed again). Measurement: the captured FX module run
with real tensors on the device, the median of several runs after a warm-up. Prints both and
their ratio; writes JSON + markdown under benchmarks/results/.

    python benchmarks/profile_accuracy.py                          # vgg19 batch 16 on CPU
    python benchmarks/profile_accuracy.py --workload resnet50:64 --device cuda
    python benchmarks/profile_accuracy.py --workload resnet50:8 --fresh    # profile now, then the step
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def _cpu_others_busy(f):  # fraction of CPU other processes used while f ran
    from autotm_py.profiler.profile import _cpu_busy

    b0, t0 = _cpu_busy(), time.perf_counter()
    out = f()
    b1, wall = _cpu_busy(), time.perf_counter() - t0
    return out, max(0.0, (b1[0] - b0[0]) - (b1[1] - b0[1])) / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", action="append", help="MODEL:BATCH (repeatable; default vgg19:16)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--runs", type=int, default=3, help="timed whole-step runs (after one warm-up)")
    ap.add_argument("--cache", default=None, help="kernel cache file or folder (default: kernels_cache/)")
    ap.add_argument("--fresh", action="store_true",
                    help="profile into a new temporary cache right before the step is timed, so both "
                         "are measured under the same machine load")
    ap.add_argument("--out", default="benchmarks/results/profile_accuracy")
    args = ap.parse_args()

    from autotm_py.cli.common import capture_workload, check_device
    from autotm_py.profiler import measure_step, profile

    check_device(args.device)
    rows = []
    for w in args.workload or ["vgg19:16"]:
        name, _, batch = w.partition(":")
        graph = capture_workload(name, int(batch) if batch else None, device=args.device)
        cache = args.cache
        if args.fresh:
            import tempfile

            cache = pathlib.Path(tempfile.mkdtemp(prefix="autotm-accuracy-")) / "profile.sqlite"
        prof = profile(graph, device=args.device, cache=cache, progress=sys.stderr.isatty())
        step, busy = _cpu_others_busy(lambda: measure_step(graph, args.device, warmup=1, runs=args.runs))
        predicted = prof.all_fast_seconds
        row = {
            "model": graph.name, "batch": graph.batch, "device": args.device,
            "device_fingerprint": prof.device_fingerprint,
            "unique_kernels": prof.stats["unique_kernels"], "kernels": len(graph.compute_kernels),
            "predicted_seconds": predicted, "measured_seconds": step.seconds,
            "measured_runs": list(step.runs), "ratio": predicted / step.seconds,
            "profile_seconds": prof.stats["seconds"], "configs_measured": prof.stats["configs_measured"],
            "other_cpu_load_during_step": round(busy, 2) if args.device == "cpu" else None,
        }
        rows.append(row)
        print(f"{graph.name} batch {graph.batch} on {args.device}: predicted {predicted:.3f} s, "
              f"measured {step.seconds:.3f} s (median of {len(step.runs)}), ratio {row['ratio']:.3f}")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    lines = ["| model | batch | device | unique kernels | predicted s | measured s | ratio |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['batch']} | {r['device']} | {r['unique_kernels']} | "
              f"{r['predicted_seconds']:.3f} | {r['measured_seconds']:.3f} | {r['ratio']:.3f} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if os.environ.get("AUTOTM_ACCURACY_STRICT"):
        bad = [r for r in rows if abs(r["ratio"] - 1) > 0.15]
        sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
