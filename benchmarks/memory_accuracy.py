"""Predicted peak live bytes of the captured graph against the real, unplanned step on CUDA.

For each workload: capture the step with fake CUDA tensors (nothing allocated) and read
`peak_live_bytes`; then run the same step for real twice, (a) eagerly with torch.optim.SGD
and (b) as the captured aten graph with real tensors, and read
`torch.cuda.max_memory_allocated()` of the second step of each. Prints a table and writes
JSON + markdown under benchmarks/results/.

    python benchmarks/memory_accuracy.py                      # vgg19 64, resnet50 64
    python benchmarks/memory_accuracy.py --workload vgg19:64 --workload resnet200:32
"""

from __future__ import annotations

import argparse
import json
import pathlib

import torch

from autotm_py.graph import capture, zoo
from autotm_py.graph.capture import StepSpec, initial_state, step_arguments, step_layout


def _gib(n: float) -> str:
    return f"{n / 2**30:.3f} GiB"


def eager_peak(name: str, batch: int) -> int:
    """max_memory_allocated of an eager SGD training step (the second of two)."""
    entry = zoo.get(name)
    model, inputs, target = zoo.workload(name, batch, device="cuda")
    opt = torch.optim.SGD(model.parameters(), lr=entry.lr)
    loss_fn = torch.nn.functional.cross_entropy
    for i in range(2):
        if i == 1:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        out = model(*inputs)
        loss = loss_fn(out.flatten(0, -2), target.flatten()) if out.dim() > 2 else loss_fn(out, target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        del out, loss
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del model, opt, inputs, target
    torch.cuda.empty_cache()
    return peak


def graph_peak(name: str, batch: int) -> tuple[int, int]:
    """(predicted peak_live_bytes, measured peak of running the captured aten graph)."""
    entry = zoo.get(name)
    model, inputs, target = zoo.workload(name, batch, device="cuda")
    g = capture(model, inputs, target, lr=entry.lr, device="cuda", name=name, batch=batch)
    spec = StepSpec(lr=entry.lr)
    layout = step_layout(model, len(inputs), True, spec)
    params = [p for p in model.parameters() if p.requires_grad]
    flat = step_arguments(model, initial_state(spec, params), inputs, target)
    assert len(flat) == len(layout.roles)
    for i in range(2):
        if i == 1:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            out = g.module(*flat)
        del out
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del model, flat, params, inputs, target
    torch.cuda.empty_cache()
    return g.peak_live_bytes, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", action="append", help="MODEL:BATCH (repeatable)")
    ap.add_argument("--out", default="benchmarks/results/memory_accuracy")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("memory_accuracy needs a CUDA device")
    workloads = [w.split(":") for w in (args.workload or ["vgg19:64", "resnet50:64"])]
    rows = []
    for name, b in workloads:
        batch = int(b)
        predicted, fx_peak = graph_peak(name, batch)
        eager = eager_peak(name, batch)
        rows.append({
            "model": name, "batch": batch, "predicted_peak_live_bytes": predicted,
            "fx_graph_max_memory_allocated": fx_peak, "eager_max_memory_allocated": eager,
            "error_vs_fx": (predicted - fx_peak) / fx_peak, "error_vs_eager": (predicted - eager) / eager,
            "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        })
        r = rows[-1]
        print(f"{name} batch {batch}: predicted {_gib(predicted)}, captured graph run {_gib(fx_peak)} "
              f"({r['error_vs_fx']:+.1%}), eager step {_gib(eager)} ({r['error_vs_eager']:+.1%})", flush=True)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    lines = ["| model | batch | predicted peak | captured graph, measured | error | eager step, measured | error |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {_gib(r['predicted_peak_live_bytes'])} | "
                     f"{_gib(r['fx_graph_max_memory_allocated'])} | {r['error_vs_fx']:+.1%} | "
                     f"{_gib(r['eager_max_memory_allocated'])} | {r['error_vs_eager']:+.1%} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
