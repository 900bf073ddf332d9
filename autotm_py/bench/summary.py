"""Markdown tables of bench records (for docs and `autotm bench summary`): every number says
whether it was measured or modeled."""

from __future__ import annotations

import math
from typing import Iterable

from .results import RunRecord, geomean

PAPER_FOUR = ("inception_v4", "resnet200", "vgg19", "densenet264")
FORMS = ("static", "synchronous", "asynchronous", "numa", "2lm")


def _ratio_order(ratio: str) -> float:
    fast, slow = (float(x) for x in ratio.split(":"))
    return fast / (fast + slow)


def _x(v: float) -> str:
    return "-" if not math.isfinite(v) else f"x{v:.3f}"


def _solve_note(r: RunRecord) -> str:
    s = r.solver
    if s.get("status") in (None, "none"):
        return ""
    gap = s.get("gap")
    note = f"{s.get('solve_seconds', 0):.0f} s"
    if s.get("status") != "optimal":
        note += f", {s.get('status')}" + (f" gap {100 * gap:.1f}%" if isinstance(gap, (int, float)) and math.isfinite(gap) else "")
    return note


def conventional_markdown(records: Iterable[RunRecord], paper_sized: bool = True) -> str:
    """Slowdown against all fast memory per network, formulation and ratio, and geomeans."""
    recs = [r for r in records if r.experiment == "conventional" and r.ratio is not None]
    if not recs:
        return ""
    ratios = sorted({r.ratio for r in recs}, key=_ratio_order)  # type: ignore[arg-type]
    forms = [f for f in FORMS if any(r.formulation == f for r in recs)]
    workloads = sorted({(r.model, r.batch) for r in recs})
    head = "| network | formulation | " + " | ".join(f"{q} ({q.split(':')[1]}:{q.split(':')[0]})" for q in ratios) + " |"
    lines = ["Predicted slowdown against all fast memory (modeled); ratio fast:slow (paper PMM:DRAM); "
             "solve time and, where not optimal, the status and gap in brackets.", "", head,
             "|---|---|" + "---:|" * len(ratios)]
    at = {(r.model, r.batch, r.formulation, r.ratio): r for r in recs}
    for m, b in workloads:
        for f in forms:
            cells = []
            for q in ratios:
                r = at.get((m, b, f, q))
                if r is None:
                    cells.append("")
                elif not r.ok:
                    cells.append(r.status)
                else:
                    note = _solve_note(r)
                    cells.append(_x(r.slowdown) + (f" ({note})" if note and "gap" in note else ""))
            lines.append(f"| {m} {b} | {f} | " + " | ".join(cells) + " |")
    lines += ["", "Geometric mean of the predicted slowdown (modeled):", "",
              "| formulation | networks | " + " | ".join(ratios) + " |", "|---|---|" + "---:|" * len(ratios)]
    sets = [("all", None)]
    if paper_sized and any(m not in PAPER_FOUR for m, _ in workloads):
        sets.append(("the paper's four", PAPER_FOUR))
    for label, only in sets:
        for f in forms:
            cells = []
            for q in ratios:
                xs = [r.slowdown for r in recs if r.ok and r.formulation == f and r.ratio == q
                      and (only is None or r.model in only)]
                g = geomean(xs)
                cells.append("-" if not xs else f"{_x(g)} ({100 * (g - 1):.1f}%, {len(xs)})")
            lines.append(f"| {f} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def measured_markdown(records: Iterable[RunRecord]) -> str:
    """Measured step time against the prediction, per measured run."""
    recs = sorted((r for r in records if r.ok and r.measured), key=lambda r: (r.model, r.batch, r.formulation,
                                                                            -_ratio_order(r.ratio or "1:0")))
    if not recs:
        return ""
    lines = ["| network | formulation | ratio (paper) | measured | measured all fast | measured slowdown | "
             "predicted (modeled) | prediction error |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in recs:
        m, f = r.measured_seconds or math.nan, r.measured_all_fast_seconds or math.nan
        lines.append(f"| {r.model} {r.batch} | {r.formulation} | {r.ratio} ({r.paper_ratio}) | {m:.2f} s | {f:.2f} s | "
                     f"{_x(m / f)} | {r.predicted_seconds:.2f} s | {100 * (r.predicted_seconds - m) / m:+.0f}% |")
    return "\n".join(lines) + "\n"


def large_markdown(records: Iterable[RunRecord]) -> str:
    """Predicted step time per large network and formulation, and the speedup over 2LM."""
    recs = [r for r in records if r.experiment == "large"]
    if not recs:
        return ""
    workloads = sorted({(r.model, r.batch) for r in recs})
    lines = ["| network | peak | limit | static | synchronous | 2LM | static vs 2LM | synchronous vs 2LM |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m, b in workloads:
        by = {r.formulation: r for r in recs if (r.model, r.batch) == (m, b)}

        def t(f: str) -> str:
            r = by.get(f)
            if r is None:
                return ""
            if not r.ok:
                return r.status
            note = _solve_note(r)
            return f"{r.predicted_seconds:.0f} s" + (f" ({note})" if note and "gap" in note else "")

        def sp(f: str) -> str:
            r, two = by.get(f), by.get("2lm")
            if r is None or two is None or not (r.ok and two.ok):
                return "-"
            return f"{two.predicted_seconds / r.predicted_seconds:.2f}x"

        any_r = next(iter(by.values()))
        lines.append(f"| {m} {b} | {any_r.peak_live_bytes / 1e9:.0f} GB | {any_r.limit_bytes / 1e9:.0f} GB | "
                     f"{t('static')} | {t('synchronous')} | {t('2lm')} | {sp('static')} | {sp('synchronous')} |")
    return "\n".join(lines) + "\n"


def case_study_markdown(records: Iterable[RunRecord]) -> str:
    """Slowdown and bytes moved per limit of the case study."""
    recs = [r for r in records if r.experiment == "case-study"]
    if not recs:
        return ""
    limits = sorted({(r.limit_bytes, r.ratio) for r in recs})
    forms = [f for f in FORMS if any(r.formulation == f for r in recs)]
    lines = ["| limit (GB) | ratio (paper) | " + " | ".join(f"{f} slowdown" for f in forms) + " | sync GB moved |",
             "|---:|---|" + "---:|" * (len(forms) + 1)]
    at = {(r.formulation, r.limit_bytes): r for r in recs}
    for lim, q in limits:
        cells = []
        for f in forms:
            r = at.get((f, lim))
            cells.append("" if r is None else (_x(r.slowdown) if r.ok else r.status))
        s = at.get(("synchronous", lim))
        moved = f"{s.bytes_moved / 1e9:.0f}" if s is not None and s.ok else ""
        paper = f"{q.split(':')[1]}:{q.split(':')[0]}" if q else ""
        lines.append(f"| {lim / 1e9:.1f} | {q} ({paper}) | " + " | ".join(cells) + f" | {moved} |")
    return "\n".join(lines) + "\n"


def markdown(records: Iterable[RunRecord]) -> str:
    """Every section that has records."""
    recs = list(records)
    parts = []
    ran = {(r.model, r.batch) for r in recs if r.measured}
    paper = [r for r in recs if (r.model, r.batch) not in ran]
    for title, body in (("Conventional networks", conventional_markdown(paper)),
                        ("Measured runs", measured_markdown(recs)),
                        ("Large networks against 2LM (modeled)", large_markdown(recs)),
                        ("Case study", case_study_markdown(recs))):
        if body:
            parts.append(f"### {title}\n\n{body}")
    return "\n".join(parts)
