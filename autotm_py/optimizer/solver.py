"""Solving a Model: HiGHS through highspy (default) or CBC (the binary PuLP ships).

Both backends get the model as arrays (HiGHS: one passModel call; CBC: an MPS file written
by HiGHS), so no Python object is made per constraint. The objective is scaled to
milliseconds inside this module only. A status other than optimal or a time/gap stop with
a feasible incumbent raises Infeasible or SolverFailed.
"""

from __future__ import annotations

import dataclasses

import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from .ilp import Model

OBJ_SCALE = 1e3  # seconds -> milliseconds inside the solver


class Infeasible(ValueError):
    """No plan satisfies the limit."""


class SolverFailed(RuntimeError):
    """The solver stopped without a usable solution (time limit before any incumbent, ...)."""


@dataclass(frozen=True)
class Solution:
    x: np.ndarray
    objective: float  # seconds, offset included
    status: str  # "optimal", "time_limit", "gap_limit", ...
    gap: float
    solve_seconds: float
    backend: str


def _highs(quiet: bool = True):
    import highspy

    # the first Highs() of a process prints a banner on the C stdout; keep it off ours
    # (it would corrupt --json output)
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            h = highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    h.setOptionValue("output_flag", not quiet)
    return h


def pass_model(h, model: Model) -> None:
    """Hand the arrays to a Highs instance (one call, numpy arrays, rowwise matrix)."""
    status = h.passModel(
        int(model.num_cols), int(model.num_rows), int(model.num_nonzeros), 2, 1,
        float(model.offset * OBJ_SCALE),
        np.ascontiguousarray(model.c * OBJ_SCALE, dtype=np.float64),
        np.ascontiguousarray(model.col_lower, dtype=np.float64),
        np.ascontiguousarray(model.col_upper, dtype=np.float64),
        np.ascontiguousarray(model.row_lower, dtype=np.float64),
        np.ascontiguousarray(model.row_upper, dtype=np.float64),
        np.ascontiguousarray(model.a_start[:-1], dtype=np.int32),
        np.ascontiguousarray(model.a_index, dtype=np.int32),
        np.ascontiguousarray(model.a_value, dtype=np.float64),
        np.ascontiguousarray(model.integrality, dtype=np.int32),
    )
    if str(status) not in ("HighsStatus.kOk", "HighsStatus.kWarning"):
        raise SolverFailed(f"HiGHS rejected the model ({status})")


def write_mps(model: Model, path: str) -> None:
    """Write the model as (free) MPS; a .gz suffix compresses it."""
    h = _highs()
    pass_model(h, model)
    if not path.endswith(".gz"):
        h.writeModel(path)
        return
    import gzip
    import shutil

    with tempfile.TemporaryDirectory() as tmp:
        plain = os.path.join(tmp, "model.mps")
        h.writeModel(plain)
        with open(plain, "rb") as src, gzip.open(path, "wb", compresslevel=9) as dst:
            shutil.copyfileobj(src, dst)


def solve(model: Model, *, backend: str = "highs", time_limit: float = 300.0,
          mip_gap: float = 0.01, threads: int | None = None, verbose: bool = False,
          start: np.ndarray | None = None) -> Solution:
    """Solve and check the status; returns the best solution found within the limits.
    `start`: a feasible column vector to begin from (HiGHS only)."""
    if time_limit <= 0:
        raise ValueError(f"the time limit must be positive, got {time_limit}")
    if not 0 <= mip_gap < 1:
        raise ValueError(f"the relative gap must be in [0, 1), got {mip_gap}")
    if model.num_cols == 0:
        return Solution(np.zeros(0), model.offset, "optimal", 0.0, 0.0, backend)
    if backend == "highs":
        return _solve_highs(model, time_limit, mip_gap, threads, verbose, start)
    if backend in ("cbc", "pulp"):
        return _solve_cbc(model, time_limit, mip_gap, threads, verbose)
    raise ValueError(f"unknown solver {backend!r}; choose highs or cbc")


def _solve_highs(model: Model, time_limit: float, mip_gap: float, threads: int | None,
                 verbose: bool, start: np.ndarray | None = None) -> Solution:
    h = _highs(quiet=not verbose)
    h.setOptionValue("time_limit", float(time_limit))
    h.setOptionValue("mip_rel_gap", float(mip_gap))
    # integral flows must not exceed the byte limit after rounding
    h.setOptionValue("mip_feasibility_tolerance", 1e-9)
    h.setOptionValue("primal_feasibility_tolerance", 1e-9)
    if threads:
        h.setOptionValue("threads", int(threads))
    pass_model(h, model)
    if start is not None:
        import highspy

        hs = highspy.HighsSolution()
        hs.col_value = np.asarray(start, dtype=np.float64)
        hs.value_valid = True
        h.setSolution(hs)
    t0 = time.perf_counter()
    h.run()
    seconds = time.perf_counter() - t0
    ms = str(h.getModelStatus())
    info = h.getInfo()
    has_sol = info.primal_solution_status == 2  # kSolutionStatusFeasible
    name = {
        "HighsModelStatus.kOptimal": "optimal",
        "HighsModelStatus.kTimeLimit": "time_limit",
        "HighsModelStatus.kInterrupt": "interrupted",
        "HighsModelStatus.kSolutionLimit": "solution_limit",
        "HighsModelStatus.kIterationLimit": "iteration_limit",
        "HighsModelStatus.kInfeasible": "infeasible",
        "HighsModelStatus.kUnboundedOrInfeasible": "infeasible",
    }.get(ms, ms)
    if name == "infeasible":
        raise Infeasible("the ILP is infeasible")
    if not has_sol:
        raise SolverFailed(f"HiGHS stopped ({name}) after {seconds:.1f} s without a feasible plan; "
                           "raise the time limit")
    x = np.array(h.getSolution().col_value)
    obj = info.objective_function_value / OBJ_SCALE
    gap = float(info.mip_gap) if np.isfinite(info.mip_gap) else float("inf")
    own = model.offset + float(model.c @ x)
    # relative: a CPU test workload's whole step is 1e-4 s, where 1e-6 s is 1%
    if start is not None and own > obj + 1e-7 * abs(obj) + 1e-12:
        # HiGHS 1.16 can report a better objective than the columns it hands back: its
        # presolve finds a start better in the reduced space than in the original one, and
        # the postsolved solution is the start itself (seen with a workspace column on a
        # tiny graph). The columns are what the plan is made of: solve again without the
        # start, and keep whichever columns are better.
        again = _solve_highs(model, max(time_limit - seconds, 1.0), mip_gap, threads, verbose)
        if again.objective < own:
            return dataclasses.replace(again, solve_seconds=again.solve_seconds + seconds)
        bound = info.mip_dual_bound / OBJ_SCALE
        obj, gap = own, (own - bound) / abs(own) if np.isfinite(bound) and own else float("inf")
    return Solution(x, obj, name, max(gap, 0.0), seconds, "highs")


def cbc_path() -> str:
    import warnings

    from pulp import apis

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = apis.PULP_CBC_CMD().path
    if not path or not os.path.exists(path):
        raise SolverFailed("PuLP's CBC binary is not available on this machine")
    return path


def _solve_cbc(model: Model, time_limit: float, mip_gap: float, threads: int | None,
               verbose: bool) -> Solution:
    with tempfile.TemporaryDirectory() as tmp:
        mps = os.path.join(tmp, "model.mps")
        sol = os.path.join(tmp, "model.sol")
        write_mps(model, mps)
        cmd = [cbc_path(), mps, "-sec", str(time_limit), "-ratioGap", str(mip_gap)]
        if threads:
            cmd += ["-threads", str(threads)]
        cmd += ["-solve", "-solu", sol]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if verbose:
            print(out.stdout)
        x, status, obj = read_cbc_solution(sol, model.num_cols)
    if status == "infeasible":
        raise Infeasible("the ILP is infeasible")
    if x is None:
        raise SolverFailed(f"CBC stopped ({status}) after {seconds:.1f} s without a feasible plan")
    bound = _cbc_bound(out.stdout)
    objective = model.offset + float(model.c @ x)
    gap = 0.0 if status == "optimal" else (
        abs(obj - bound) / max(abs(obj), 1e-12) if bound is not None else float("inf"))
    return Solution(x, objective, status, gap, seconds, "cbc")


def read_cbc_solution(path: str, num_cols: int) -> tuple[np.ndarray | None, str, float]:
    """Parse CBC's solution file: (values or None, status, objective in solver units)."""
    if not os.path.exists(path):
        return None, "failed", float("nan")
    with open(path) as fh:
        head = fh.readline()
        low = head.lower()
        status = ("optimal" if low.startswith("optimal") else
                  "infeasible" if "infeasible" in low else
                  "time_limit" if "stopped on time" in low else
                  "gap_limit" if "stopped on ratio" in low or "stopped on gap" in low else low.strip())
        m = re.search(r"objective value\s+([-+0-9.eE]+)", head)
        obj = float(m.group(1)) if m else float("nan")
        x = np.zeros(num_cols)
        for line in fh:
            parts = line.replace("**", " ").split()
            if len(parts) >= 3 and parts[1].startswith("c"):
                x[int(parts[1][1:])] = float(parts[2])
    if status == "infeasible" or not np.isfinite(obj):
        return None, status, obj
    return x, status, obj


def _cbc_bound(stdout: str) -> float | None:
    m = re.findall(r"best possible\s+([-+0-9.eE]+)", stdout) or re.findall(
        r"Lower bound:\s+([-+0-9.eE]+)", stdout)
    return float(m[-1]) if m else None
