"""autotm-py: AutoTM's profile-guided tensor placement and movement, on PyTorch.

Pipeline: capture (Graph) -> profile (Profile) -> optimize (Plan) -> compile (a planned step);
on CUDA, fit solves, runs and repairs until a step stays within a device-memory budget.
"""

from __future__ import annotations

from typing import Any

from .graph import CaptureError, Graph, capture
from .graph import zoo

__version__ = "0.1.0"


def profile(graph: Graph, device: str = "cpu", slow_tier: str | None = None, cache: Any = None, **kwargs: Any):
    """Profile every kernel of `graph` (see autotm_py.profiler.profile)."""
    from .profiler import profile as _profile

    return _profile(graph, device=device, slow_tier=slow_tier, cache=cache, **kwargs)


def optimize(graph: Graph, profile: Any, **kwargs: Any):
    """Solve the placement problem for `graph` under `profile` (see autotm_py.optimizer.optimize)."""
    from .optimizer import optimize as _optimize

    return _optimize(graph, profile, **kwargs)


def compile(plan: Any, model: Any, optimizer: Any = None, **kwargs: Any):
    """A training step for `model` that runs `plan`: `loss = step(inputs, target)` updates the
    model's parameters (and `optimizer`'s state) in place (see autotm_py.runtime.compile)."""
    from .runtime import compile as _compile

    return _compile(plan, model, optimizer, **kwargs)


def fit(graph: Graph, profile: Any, model: Any, inputs: Any, target: Any = None, *, budget: int,
        optimizer: Any = None, formulation: str = "asynchronous", max_retries: int = 3,
        time_limit: float = 120.0, copy_spans: int = 0, **kwargs: Any):
    """CUDA: a training step whose measured peak stays within `budget` bytes of device memory,
    and the record of how it was found: the plan is solved, run on `inputs` under the budget,
    and where the step runs out of memory or goes over (allocator fragmentation, workspaces),
    repaired and solved again, up to `max_retries` times (autotm_py.runtime.fit). Device
    memory allocated when it is called that the step does not own stays out of the plan's
    limit. The model's parameters and buffers and the optimizer's state are left as they
    were. Returns (step, fitted); raises runtime.fit.BudgetError where no plan fitted.
    `copy_spans` goes to optimize, `kwargs` to compile."""
    import torch

    from .optimizer import optimize as _optimize
    from .runtime import compile as _compile
    from .runtime.fit import cuda_stages, fit_step, held_outside

    if graph.device != "cuda" or not torch.cuda.is_available():
        raise ValueError("fit holds a CUDA device to a budget: capture the graph with device='cuda' on a CUDA machine")
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)

    def solve(limits: Any):
        return _optimize(graph, profile, formulation=formulation, limit_bytes=limits, time_limit=time_limit,
                         copy_spans=copy_spans)

    def make_step(plan: Any):
        return _compile(plan, model, optimizer, **kwargs)

    held = held_outside(model, optimizer, (*inputs, target))
    return fit_step(solve, make_step, lambda mk: cuda_stages(mk, inputs, target, 1, budget), model, optimizer,
                    budget, len(graph.kernels), max_retries, held)


__all__ = ["CaptureError", "Graph", "capture", "compile", "fit", "optimize", "profile", "zoo", "__version__"]
