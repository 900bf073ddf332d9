"""`autotm bench gpu`: the GPU comparison of `peers` (autotm against save_on_cpu and
checkpointing under a memory cap) as one versioned report, and reading such reports back
(also the unversioned ones `benchmarks/gpu_peers.py` writes) for `autotm plot gpu`."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from .results import ResultsError

GPU_SCHEMA = 1
GPU_KIND = "autotm-bench-gpu"
# The reference measurements' caps: 50% and 20% of the unconstrained peaks measured with cuDNN
# in benchmark mode (29.7, 49.1 and 26.0 GiB). Those peaks hold the workspaces of cuDNN's
# algorithm search; with its heuristic choice (the default here) the same steps peak lower,
# so a fraction of the peak measured here would be a harder case than the reference's.
DEFAULT_CASES = ("vgg19:256:14.85GiB", "resnet152:256:24.55GiB", "resnet152:256:9.82GiB",
                 "densenet201:128:13GiB", "densenet201:128:5.2GiB")
_GIB = re.compile(r"^([0-9]*\.?[0-9]+)GiB$", re.IGNORECASE)
REPORT_NAME = "gpu_peers.json"


@dataclass(frozen=True)
class GpuCase:
    """A model and batch under a cap: a fraction of the unconstrained peak, or `cap_bytes`."""

    model: str
    batch: int
    cap_fraction: float | None
    cap_bytes: int | None = None


def parse_case(text: str) -> GpuCase:
    """'vgg19:256:0.5' (half the unconstrained peak) or 'vgg19:256:14.85GiB' -> GpuCase; an
    unknown model, or a cap that is neither a fraction in (0, 1] nor a positive size in GiB,
    is a ValueError."""
    from ..graph import zoo

    parts = text.split(":")
    if len(parts) != 3:
        raise ValueError(f"the case {text!r} must be MODEL:BATCH:CAP, like vgg19:256:0.5 or vgg19:256:14.85GiB")
    name, batch, cap = parts
    zoo.get(name)
    size = _GIB.match(cap.strip())
    try:
        b = int(batch)
        c = float(size.group(1)) if size else float(cap)
    except ValueError:
        raise ValueError(f"the case {text!r} must be MODEL:BATCH:CAP with an integer batch and a cap "
                         "that is a fraction of the peak (0.5) or a size (14.85GiB)") from None
    if b <= 0 or c <= 0 or (not size and c > 1):
        raise ValueError(f"the case {text!r} needs a positive batch and a cap in (0, 1] or a positive size")
    return GpuCase(name, b, None, int(c * 2**30)) if size else GpuCase(name, b, c)


def run_gpu(cases: list[GpuCase], folder: Path, *, steps: int = 5, time_limit: float = 120.0,
            formulations: tuple[str, ...] = ("asynchronous", "synchronous"), cudnn_benchmark: bool = False,
            cache: str | None = None, runs: Any = None, arena: bool = False,
            log: Callable[[str], None] = print) -> Path:
    """Run every case (peers.run_case, its plans run as `runs`, a peers.PlanRuns; None: the
    default) and write the report after each one; with `arena`, the planned arena's recorded
    steps go to `folder`/arena_recordings."""
    import os

    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before CUDA starts
    import torch

    from ..runtime.fit import cap_by
    from .peers import PlanRuns, run_case

    runs = runs or PlanRuns()

    torch.backends.cudnn.benchmark = cudnn_benchmark
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / REPORT_NAME
    results = []
    for c in cases:
        results.append(run_case(c.model, c.batch, c.cap_fraction, cap_bytes=c.cap_bytes, steps=steps, time_limit=time_limit,
                                formulations=formulations, cache=cache, runs=runs,
                                arena=arena, arena_recordings=folder / "arena_recordings" if arena else None, log=log))
        report = {"kind": GPU_KIND, "schema": GPU_SCHEMA, "device": torch.cuda.get_device_name(),
                  "torch": torch.__version__, "cudnn_benchmark": cudnn_benchmark,
                  "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""), "cap_by": cap_by(),
                  "cases": [{**r.to_json(), "plan_runs": dataclasses.asdict(runs)} for r in results],
                  "oversized": []}
        write_gpu_report(report, path)
    return path


def merge_gpu_reports(reports: list[Mapping[str, Any]], notes: str | None = None) -> dict[str, Any]:
    """One report from several of the same device, torch and cuDNN mode (one invocation per
    case keeps each case's pinned host memory to itself): the cases in the order first seen, a
    later report's case replacing an earlier one of the same model, batch and cap; `notes`, or
    else the first report's."""
    if not reports:
        raise ResultsError("give at least one GPU comparison report to merge")
    first = reports[0]
    for key in ("device", "torch", "cudnn_benchmark", "alloc_conf", "cap_by"):
        seen = {str(r[key]) for r in reports if key in r}  # an older report may not say
        if len(seen) > 1:
            raise ResultsError(f"the reports differ in {key} ({', '.join(sorted(seen))}); merge only runs of one setup")
    cases: dict[tuple[Any, Any, Any], Mapping[str, Any]] = {}
    for r in reports:
        for c in r["cases"]:
            cases[(c.get("model"), c.get("batch"), c.get("cap_bytes"))] = c
    out = {k: next(r[k] for r in reports if k in r) for k in ("kind", "schema", "device", "torch", "cudnn_benchmark",
                                                             "alloc_conf", "cap_by") if any(k in r for r in reports)}
    out["cases"] = list(cases.values())
    out["oversized"] = [o for r in reports for o in r.get("oversized", [])]
    if notes is not None or "notes" in first:
        out["notes"] = notes if notes is not None else first["notes"]
    return out


def write_gpu_report(report: Mapping[str, Any], path: Path) -> None:
    """The report as JSON at `path` and its table as markdown beside it."""
    from .peers import CaseResult, markdown

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str))
    path.with_suffix(".md").write_text(markdown([CaseResult.from_json(c) for c in report["cases"]]))


def load_gpu_report(where: str | Path) -> Mapping[str, Any]:
    """A GPU comparison report: a file, or a folder holding gpu/gpu_peers.json or gpu_peers.json."""
    p = Path(where)
    if p.is_dir():
        found = [q for q in (p / "gpu" / REPORT_NAME, p / REPORT_NAME) if q.is_file()]
        if not found:
            raise ResultsError(f"the results folder {where} holds no GPU comparison ({REPORT_NAME}); "
                               "run autotm bench gpu on a CUDA machine first")
        p = found[0]
    elif not p.is_file():
        raise ResultsError(f"the GPU comparison report {where} does not exist")
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ResultsError(f"{p} is not valid JSON") from None
    if not isinstance(d, Mapping) or not isinstance(d.get("cases"), list):
        raise ResultsError(f"{p} is not a GPU comparison report (it has no cases)")
    if "schema" in d and d["schema"] != GPU_SCHEMA:
        raise ResultsError(f"{p} was written with GPU report schema {d['schema']!r}, but this autotm-py reads "
                           f"schema {GPU_SCHEMA}; run autotm bench gpu again to refresh it")
    if not d["cases"]:
        raise ResultsError(f"{p} holds no cases to plot")
    return d
