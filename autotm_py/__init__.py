"""autotm-py: AutoTM's profile-guided tensor placement and movement, on PyTorch.

Pipeline: capture (Graph) -> profile (Profile) -> optimize (Plan) -> compile (a planned step).
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


__all__ = ["CaptureError", "Graph", "capture", "compile", "optimize", "profile", "zoo", "__version__"]
