"""The paper's Figures 7 to 12 (reference 7.4) from bench records, as matplotlib Figures.

Every function takes the records (or the GPU report) and returns a Figure; `save` writes it
as PNG and PDF. A series drawn from predicted times says `(modeled)` in its legend when the
prediction rests on a model (roofline kernel times or the modeled slow tier); one drawn from
measured step times says `(measured)`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display on CI machines or servers
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from ..bench.results import ResultsError, RunRecord, paper_ratio  # noqa: E402

#: bar order and colours shared by every figure
ORDER = ("numa", "static", "synchronous", "asynchronous", "2lm")
LABELS = {"numa": "first-touch NUMA", "static": "static AutoTM", "synchronous": "sync AutoTM",
          "asynchronous": "async AutoTM", "2lm": "2LM"}
COLORS = {"numa": "#7f7f7f", "static": "#1f77b4", "synchronous": "#ff7f0e", "asynchronous": "#2ca02c",
          "2lm": "#9467bd"}
ALL_SLOW, ALL_FAST = "0:1", "1:0"
#: DRAM costs 2.1x PMM per GB (reference 7.4, Figure 9)
DRAM_PRICE = 2.1


def save(fig: Figure, out: str | Path, name: str) -> list[Path]:
    """Write `name`.png and `name`.pdf under `out`; returns their paths."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.png", folder / f"{name}.pdf"]
    for p in paths:
        fig.savefig(p, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return paths


def _ok(records: Iterable[RunRecord]) -> list[RunRecord]:
    return [r for r in records if r.ok and math.isfinite(r.predicted_seconds)]


def _by_workload(records: Iterable[RunRecord]) -> dict[tuple[str, int], list[RunRecord]]:
    out: dict[tuple[str, int], list[RunRecord]] = {}
    for r in records:
        out.setdefault((r.model, r.batch), []).append(r)
    return out


def _use_measured(records: Sequence[RunRecord]) -> bool:
    """Measured times for a group only when every runnable run of it was measured."""
    runnable = [r for r in records if r.formulation != "2lm"]
    return bool(runnable) and all(r.measured and r.measured_all_fast_seconds for r in runnable)


def _time(r: RunRecord, measured: bool) -> float:
    return float(r.measured_seconds) if measured and r.measured_seconds is not None else r.predicted_seconds


def _fast_time(records: Sequence[RunRecord], measured: bool) -> float:
    """All-fast step time: the fastest run at 1:0 (reference 7.4), else the profile's all-fast time."""
    at = [_time(r, measured) for r in records if r.ratio == ALL_FAST]
    if at:
        return min(at)
    r = records[0]
    return float(r.measured_all_fast_seconds) if measured and r.measured_all_fast_seconds else r.all_fast_seconds


def _kind(records: Sequence[RunRecord], measured: bool) -> str:
    if measured:
        return "measured"
    return "modeled" if any(r.modeled for r in records) else "predicted"


def _ratio_key(ratio: str) -> float:
    fast, slow = (float(x) for x in ratio.split(":"))
    return fast / (fast + slow)


def _formulations(records: Iterable[RunRecord], allowed: Sequence[str] = ORDER) -> list[str]:
    present = {r.formulation for r in records}
    return [f for f in allowed if f in present]


def _grid(n: int, width: float = 4.2, height: float = 3.2) -> tuple[Figure, list[Any]]:
    cols = 1 if n == 1 else (2 if n <= 4 else 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = [a for row in axes for a in row]
    for a in flat[n:]:
        a.remove()
    return fig, flat[:n]


def _bars(ax: Any, groups: Sequence[str], series: Sequence[tuple[str, str, Sequence[float]]]) -> None:
    """Grouped bars: one group per x label, one bar per series (label, colour, heights; NaN: no bar)."""
    n = max(len(series), 1)
    width = 0.8 / n
    cmap = plt.get_cmap("tab10")
    for i, (label, color, heights) in enumerate(series):
        xs = [g + (i - (n - 1) / 2) * width for g, h in enumerate(heights) if math.isfinite(h)]
        hs = [h for h in heights if math.isfinite(h)]
        ax.bar(xs, hs, width, label=label, color=color or cmap(i % 10))
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups)


# ---- Figure 7 ----------------------------------------------------------------------------
def speedup_figure(records: Iterable[RunRecord]) -> Figure:
    """Per network: speedup over all slow memory (all-slow time / time) at 8:1, 4:1, 1:1 PMM:DRAM,
    bars NUMA, static, synchronous (and asynchronous); dashed red line at all fast memory."""
    groups = _by_workload(r for r in _ok(records) if r.experiment == "conventional")
    panels = []
    for (model, batch), recs in groups.items():
        slow = [r for r in recs if r.ratio == ALL_SLOW]
        mid = sorted({r.ratio for r in recs if r.ratio not in (ALL_SLOW, ALL_FAST, None)}, key=_ratio_key)
        if slow and mid:
            panels.append((model, batch, recs, slow, mid))
    if not panels:
        raise ResultsError("the speedup figure needs conventional runs at 0:1 (all slow, the paper's 1:0) "
                           "and at one ratio between; run autotm bench conventional")
    fig, axes = _grid(len(panels))
    for ax, (model, batch, recs, slow, mid) in zip(axes, panels):
        measured = _use_measured(recs)
        all_slow = max(_time(r, measured) for r in slow)
        forms = _formulations(recs, ("numa", "static", "synchronous", "asynchronous"))
        kind = _kind(recs, measured)
        series = []
        for f in forms:
            by_ratio = {r.ratio: r for r in recs if r.formulation == f}
            series.append((f"{LABELS[f]} ({kind})", COLORS[f],
                           [all_slow / _time(by_ratio[q], measured) if q in by_ratio else math.nan for q in mid]))
        _bars(ax, [f"{paper_ratio(q)}\n({q})" for q in mid], series)
        top = all_slow / _fast_time(recs, measured)
        ax.axhline(top, color="red", linestyle="--", label=f"all fast memory ({kind})")
        ax.set_ylim(0, max([top] + [h for _, _, hs in series for h in hs if math.isfinite(h)]) * 1.5)  # room for the legend
        ax.set_title(f"{model} batch {batch}")
        ax.set_xlabel("PMM:DRAM (ours fast:slow)")
        ax.set_ylabel("speedup over all slow")
        ax.legend(fontsize=6, loc="upper left", ncol=2)
    fig.suptitle("Figure 7: speedup over all slow memory")
    fig.tight_layout()
    return fig


# ---- Figure 8 ----------------------------------------------------------------------------
def large_figure(records: Iterable[RunRecord]) -> Figure:
    """Per large network: speedup over 2LM (2LM time / AutoTM time), static and synchronous."""
    groups = _by_workload(r for r in _ok(records) if r.experiment == "large")
    rows = [(k, recs) for k, recs in groups.items() if any(r.formulation == "2lm" for r in recs)]
    if not rows:
        raise ResultsError("the large figure needs 2lm runs next to the AutoTM ones; run autotm bench large")
    everything = [r for _, recs in rows for r in recs]
    forms = _formulations(everything, ("static", "synchronous", "asynchronous"))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(rows) + 2), 3.6))
    series = []
    for f in forms:
        hs = []
        for _, recs in rows:
            twolm = min(r.predicted_seconds for r in recs if r.formulation == "2lm")
            mine = [r.predicted_seconds for r in recs if r.formulation == f]
            hs.append(twolm / min(mine) if mine else math.nan)
        series.append((f"{LABELS[f]} ({_kind(everything, False)})", COLORS[f], hs))
    _bars(ax, [f"{m}\n({b})" for (m, b), _ in rows], series)
    ax.axhline(1.0, color="black", linewidth=0.8, label="2LM (modeled)")
    ax.set_ylabel("speedup over 2LM")
    ax.set_xlabel("network (batch)")
    limit = everything[0].limit_bytes
    ax.set_title(f"Figure 8: large networks, {limit / 1e9:.0f} GB of fast memory")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ---- Figure 9 ----------------------------------------------------------------------------
def memory_cost(ratio: str) -> float:
    """Memory cost relative to all DRAM for the paper's PMM:DRAM p:d: (p/2.1 + d) / (p + d)."""
    p, d = (float(x) for x in paper_ratio(ratio).split(":"))
    return (p / DRAM_PRICE + d) / (p + d)


def costs_figure(records: Iterable[RunRecord], formulation: str = "synchronous") -> Figure:
    """Performance relative to all fast memory (bars, one per network) of one formulation at
    1:0, 8:1, 4:1, 1:1 PMM:DRAM, with the relative memory cost as '$' markers."""
    ok = [r for r in _ok(records) if r.experiment == "conventional"]
    groups = _by_workload(ok)
    ratios = sorted({r.ratio for r in ok if r.formulation == formulation and r.ratio not in (None, ALL_FAST)},
                    key=_ratio_key)
    if not ratios:
        raise ResultsError(f"the costs figure needs conventional {formulation} runs; run autotm bench conventional")
    fig, ax = plt.subplots(figsize=(max(6.0, 1.8 * len(ratios) + 2), 3.8))
    series = []
    kinds = set()
    for (model, batch), recs in groups.items():
        measured = _use_measured(recs)
        kinds.add(_kind(recs, measured))
        fast = _fast_time(recs, measured)
        by_ratio = {r.ratio: r for r in recs if r.formulation == formulation}
        series.append((f"{model} {batch} ({_kind(recs, measured)})", None,
                       [fast / _time(by_ratio[q], measured) if q in by_ratio else math.nan for q in ratios]))
    _bars(ax, [f"{paper_ratio(q)}\n({q})" for q in ratios], series)
    ax.set_ylabel(f"{LABELS[formulation]} performance\nrelative to all fast memory")
    ax.set_xlabel("PMM:DRAM (ours fast:slow)")
    ax.set_ylim(0, 1.1)
    cost_ax = ax.twinx()
    cost_ax.plot(range(len(ratios)), [memory_cost(q) for q in ratios], linestyle="none", marker="$\\$$",
                 markersize=12, color="green", label="memory cost vs all DRAM")
    cost_ax.set_ylim(0, 1.1)
    cost_ax.set_ylabel("memory cost relative to all DRAM")
    handles, labels = ax.get_legend_handles_labels()
    h2, l2 = cost_ax.get_legend_handles_labels()
    ax.legend(handles + h2, labels + l2, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=3)
    ax.set_title("Figure 9: performance and memory cost")
    fig.tight_layout()
    return fig


# ---- Figure 10 ---------------------------------------------------------------------------
def case_study_figure(records: Iterable[RunRecord]) -> Figure:
    """(a) slowdown against all fast memory, (b) fraction of kernel input and output bytes in
    fast memory, (c) GB moved by synchronous plans, each against the fast-memory limit (GB)."""
    ok = [r for r in _ok(records) if r.experiment == "case-study"]
    if not ok:
        raise ResultsError("no finished case-study runs; run autotm bench case-study")
    (model, batch), recs = next(iter(_by_workload(ok).items()))
    measured = _use_measured(recs)
    kind = _kind(recs, measured)
    fast = _fast_time(recs, measured)
    peak = recs[0].peak_live_bytes / 1e9
    forms = _formulations(recs, ("static", "synchronous", "asynchronous"))
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(14, 3.8))
    for f in forms:
        rs = sorted((r for r in recs if r.formulation == f), key=lambda r: r.limit_bytes)
        xs = [r.limit_bytes / 1e9 for r in rs]
        a.plot(xs, [_time(r, measured) / fast for r in rs], marker="o", color=COLORS[f],
               label=f"{LABELS[f]} ({kind})")
        for side, style in (("input", "-"), ("output", ":")):
            fr = [r.metrics.get(f"bytes_dram_{side}_tensors", 0) / max(r.metrics.get(f"bytes_{side}_tensors", 0), 1)
                  for r in rs]
            b.plot(xs, fr, linestyle=style, marker=".", color=COLORS[f], label=f"{LABELS[f]}: {side}s in fast")
    sync = sorted((r for r in recs if r.formulation == "synchronous"), key=lambda r: r.limit_bytes)
    xs = [r.limit_bytes / 1e9 for r in sync]
    c.plot(xs, [r.metrics.get("bytes_moved_pmem", 0) / 1e9 for r in sync], marker="o", label="fast -> slow")
    c.plot(xs, [r.metrics.get("bytes_moved_dram", 0) / 1e9 for r in sync], marker="s", label="slow -> fast")
    for ax in (b, c):
        ax.axvline(peak, color="black", linestyle="--", linewidth=0.8, label="unplanned peak")
    a.set_ylabel("slowdown vs all fast memory")
    b.set_ylabel("fraction of kernel IO bytes in fast memory")
    c.set_ylabel("GB moved per step (synchronous)")
    for ax, t in ((a, "(a) performance"), (b, "(b) IO in fast memory"), (c, "(c) data movement")):
        ax.set_xlabel("fast-memory limit (GB)")
        ax.set_title(t)
        ax.legend(fontsize=7)
    fig.suptitle(f"Figure 10: {model} batch {batch} case study")
    fig.tight_layout()
    return fig


# ---- Figure 11 ---------------------------------------------------------------------------
def error_figure(records: Iterable[RunRecord]) -> Figure:
    """Left, the paper's figure: relative prediction error 100 (predicted - measured) / measured
    of the measured runs per ratio, one bar series per network and formulation (static,
    synchronous, asynchronous). Right: the same for the slowdown against all fast memory
    (predicted / profile's all fast against measured / unplanned step timed alongside), which
    load from other processes on a shared machine moves much less than absolute times."""
    ok = [r for r in _ok(records) if r.experiment == "conventional" and r.measured
          and r.formulation in ("static", "synchronous", "asynchronous")]
    if not ok:
        raise ResultsError("the error figure needs measured runs; run autotm bench conventional --set test")
    ratios = sorted({r.ratio for r in ok if r.ratio is not None}, key=_ratio_key)
    fig, (ax, rel) = plt.subplots(1, 2, figsize=(2 * max(6.0, 1.6 * len(ratios) + 2), 3.8))
    series, slow_series = [], []
    for (model, batch), recs in _by_workload(ok).items():
        for f in _formulations(recs, ("static", "synchronous", "asynchronous")):
            by_ratio = {r.ratio: r for r in recs if r.formulation == f}
            errs, serrs = [], []
            for q in ratios:
                r = by_ratio.get(q)
                if r is None or not r.measured_seconds:
                    errs.append(math.nan)
                    serrs.append(math.nan)
                    continue
                errs.append(100 * (r.predicted_seconds - r.measured_seconds) / r.measured_seconds)
                measured_slowdown = r.measured_seconds / r.measured_all_fast_seconds if r.measured_all_fast_seconds \
                    else math.nan
                serrs.append(100 * (r.slowdown - measured_slowdown) / measured_slowdown)
            series.append((f"{model} {batch} {f}", None, errs))
            slow_series.append((f"{model} {batch} {f}", None, serrs))
    _bars(ax, [f"{paper_ratio(q)}\n({q})" for q in ratios], series)
    _bars(rel, [f"{paper_ratio(q)}\n({q})" for q in ratios], slow_series)
    tiers = sorted({r.slow_tier or "?" for r in ok})
    ax.set_ylabel("prediction error of the step time (%)")
    rel.set_ylabel("prediction error of the slowdown (%)")
    ax.set_title(f"Figure 11: predicted against measured (slow tier: {', '.join(tiers)})")
    rel.set_title("slowdown against all fast memory, predicted against measured")
    for a in (ax, rel):
        a.axhline(0, color="black", linewidth=0.8)
        a.set_xlabel("PMM:DRAM (ours fast:slow)")
        a.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ---- Figure 12's counterpart: the GPU comparison -------------------------------------------
def gpu_figure(report: Mapping[str, Any]) -> Figure:
    """Step time per method per case (unconstrained first), with the transfer lower bound as a
    dashed line over each case's bars; methods without a time (out of memory, not applicable)
    are named under the axis."""
    cases = report["cases"]
    methods: list[str] = ["unconstrained"]
    for c in cases:
        for m in c["methods"]:
            if m["method"] not in methods:
                methods.append(m["method"])
    fig, ax = plt.subplots(figsize=(max(6.0, 2.6 * len(cases) + 2), 4.2))
    cmap = plt.get_cmap("tab10")
    n = len(methods)
    width = 0.8 / n
    missing: list[str] = []
    for j, method in enumerate(methods):
        xs, hs = [], []
        for i, c in enumerate(cases):
            if method == "unconstrained":
                t = c["unconstrained_seconds"]
            else:
                m = next((m for m in c["methods"] if m["method"] == method), None)
                t = m["step_seconds"] if m is not None and m["status"] == "ok" else None
                if m is not None and m["status"] != "ok":
                    missing.append(f"{c['model']} {c['batch']}: {method} {m['status']}")
            if isinstance(t, (int, float)) and math.isfinite(t):
                xs.append(i + (j - (n - 1) / 2) * width)
                hs.append(t)
        if xs:  # a method that ran nowhere is named under the axis, not in the legend
            ax.bar(xs, hs, width, label=method, color=cmap(j % 10))
    for i, c in enumerate(cases):
        lb = c.get("lower_bound_seconds")
        if isinstance(lb, (int, float)) and math.isfinite(lb):
            ax.hlines(lb, i - 0.45, i + 0.45, colors="black", linestyles="--",
                      label="transfer lower bound" if i == 0 else None)
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([f"{c['model']} {c['batch']}\ncap {c['cap_bytes'] / 2**30:.1f} GiB ({c['cap_fraction']:.0%})"
                        if c.get("cap_bytes") else f"{c['model']} {c['batch']}\ncap {c['cap_fraction']:.0%}"
                        for c in cases])
    ax.set_ylabel("step time (s, measured)")
    ax.set_title(f"GPU comparison under a memory cap ({report.get('device', 'GPU')})")
    ax.legend(fontsize=7)
    if missing:
        fig.text(0.01, -0.02, "no time: " + "; ".join(missing), fontsize=7, va="top", wrap=True)
    fig.tight_layout()
    return fig
