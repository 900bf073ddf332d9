"""Bench results: one JSON file per run (a formulation at a limit on a workload), versioned.

A run's record holds the metrics of reference 7.3 (`Plan.metrics`), the prediction, the
solver's statistics and, where the plan was run for real, the measured step time. Plots
read a folder of them back with `load_records`.

Ratios: ours are fast:slow (DRAM:slow, `1:4` = 20% fast), the paper's PMM:DRAM is the same
pair the other way round (`4:1`); every record stores both.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping

#: bump when a field changes meaning or goes away; plots refuse other versions
SCHEMA = 1
KIND = "autotm-bench-run"
EXPERIMENTS = ("conventional", "case-study", "large")


class ResultsError(ValueError):
    """A results folder or file that plots cannot use; the message is one sentence."""


@dataclass(frozen=True)
class RunRecord:
    """One formulation at one fast-memory limit on one workload."""

    experiment: str
    model: str
    batch: int
    formulation: str
    ratio: str | None  # ours, fast:slow; None for an absolute limit
    paper_ratio: str | None  # PMM:DRAM, the paper's notation
    limit_bytes: int
    status: str  # "ok", "infeasible" or "error"
    profile: str  # where kernel times came from
    modeled: bool  # the prediction rests on a model (roofline and/or modeled slow tier)
    peak_live_bytes: int
    io_bytes: int
    fixed_bytes: int
    kernels: int
    predicted_seconds: float = math.nan
    all_fast_seconds: float = math.nan
    slowdown: float = math.nan
    bytes_moved: int = 0
    peak_fast_bytes: int = 0
    measured_seconds: float | None = None  # median of the timed steps, when run for real
    measured_all_fast_seconds: float | None = None  # the unplanned step, timed just before the plan
    measured_steps: int = 0
    slow_tier: str | None = None  # where slow tensors lived in a measured run
    solver: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    error: str = ""
    wall_seconds: float = 0.0
    machine: Mapping[str, Any] = field(default_factory=dict)
    schema: int = SCHEMA

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def measured(self) -> bool:
        return self.measured_seconds is not None

    @property
    def seconds(self) -> float:
        """The step time figures use: measured where the plan ran, else predicted."""
        return self.measured_seconds if self.measured_seconds is not None else self.predicted_seconds

    @property
    def fast_seconds(self) -> float:
        """The all-fast step time of the same kind as `seconds`."""
        if self.measured_seconds is not None and self.measured_all_fast_seconds is not None:
            return self.measured_all_fast_seconds
        return self.all_fast_seconds

    @property
    def workload(self) -> str:
        return f"{self.model} {self.batch}"

    def to_json(self) -> dict[str, Any]:
        return {"kind": KIND, **asdict(self)}


def paper_ratio(ratio: str) -> str:
    """Ours fast:slow -> the paper's PMM:DRAM ('1:4' -> '4:1')."""
    fast, slow = ratio.split(":")
    return f"{slow}:{fast}"


def ratio_from_paper(text: str) -> str:
    """The paper's PMM:DRAM -> ours fast:slow ('4:1' -> '1:4')."""
    return paper_ratio(text)


def fast_fraction(ratio: str) -> float:
    """Share of the movable bytes a fast:slow ratio puts in fast memory."""
    fast, slow = (float(x) for x in ratio.split(":"))
    return fast / (fast + slow)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def record_path(folder: Path, rec: RunRecord) -> Path:
    """<folder>/<experiment>/<model>-<batch>/<formulation>@<ratio or limit>.json"""
    where = f"r{_slug(rec.ratio)}" if rec.ratio is not None else f"b{rec.limit_bytes}"
    return Path(folder) / rec.experiment / f"{_slug(rec.model)}-{rec.batch}" / f"{rec.formulation}@{where}.json"


def _finite(x: Any) -> Any:
    """JSON has no NaN: write null, read it back as NaN."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def write_record(folder: str | Path, rec: RunRecord) -> Path:
    path = record_path(Path(folder), rec)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(rec.to_json()), indent=1, sort_keys=True))
    return path


_FLOATS = ("predicted_seconds", "all_fast_seconds", "slowdown")


def record_from_json(d: Mapping[str, Any], source: str = "the record") -> RunRecord:
    """A record, or ResultsError for a file of another kind or another schema."""
    if not isinstance(d, Mapping) or d.get("kind") != KIND:
        raise ResultsError(f"{source} is not an autotm bench result")
    if d.get("schema") != SCHEMA:
        raise ResultsError(f"{source} was written with bench schema {d.get('schema')!r}, but this autotm-py "
                           f"reads schema {SCHEMA}; run autotm bench again to refresh it")
    names = {f.name for f in fields(RunRecord)}
    missing = sorted(f.name for f in fields(RunRecord)
                     if f.name not in d and f.default is MISSING and f.default_factory is MISSING)
    if missing:
        raise ResultsError(f"{source} lacks fields of bench schema {SCHEMA} ({', '.join(missing)}); "
                           "run autotm bench again to refresh it")
    kw = {k: v for k, v in d.items() if k in names}
    for k in _FLOATS:
        if kw.get(k) is None:
            kw[k] = math.nan
    return RunRecord(**kw)


def load_records(folder: str | Path, experiment: str | None = None) -> list[RunRecord]:
    """Every run record under `folder` (recursively), optionally of one experiment.
    An empty folder, a file of an older schema or a broken file is a ResultsError."""
    root = Path(folder)
    if not root.is_dir():
        raise ResultsError(f"the results folder {folder} does not exist")
    files = sorted(p for p in root.rglob("*.json"))
    out: list[RunRecord] = []
    for p in files:
        try:
            d = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ResultsError(f"{p} is not valid JSON") from None
        if isinstance(d, Mapping) and d.get("kind") not in (KIND, None) and "schema" in d:
            continue  # another tool's versioned file (e.g. a GPU comparison) sharing the folder
        if isinstance(d, Mapping) and "cases" in d:
            continue  # a GPU comparison file
        out.append(record_from_json(d, str(p)))
    if experiment is not None:
        out = [r for r in out if r.experiment == experiment]
    if not out:
        what = f"{experiment} " if experiment else ""
        raise ResultsError(f"the results folder {folder} holds no {what}bench results; run "
                           f"`autotm bench {experiment or 'conventional'} --results {folder}` first")
    return out


def geomean(xs: Iterable[float]) -> float:
    xs = [x for x in xs if x > 0 and math.isfinite(x)]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else math.nan


def geomean_slowdowns(records: Iterable[RunRecord], *, measured: bool = False) -> dict[tuple[str, str], tuple[float, int]]:
    """(formulation, ratio) -> (geometric-mean slowdown against all fast memory, networks),
    predicted or, with `measured`, from the measured step times."""
    groups: dict[tuple[str, str], list[float]] = {}
    for r in records:
        if not r.ok or r.ratio is None:
            continue
        if measured:
            if r.measured_seconds is None or not r.measured_all_fast_seconds:
                continue
            x = r.measured_seconds / r.measured_all_fast_seconds
        else:
            x = r.slowdown
        groups.setdefault((r.formulation, r.ratio), []).append(x)
    return {k: (geomean(v), len(v)) for k, v in groups.items()}
