"""RunReport: what running a plan measured, next to what the plan predicted."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class RunReport:
    model: str
    batch: int | None
    device: str
    formulation: str
    steps: int
    step_seconds: float  # median over the timed steps
    predicted_seconds: float
    unplanned_seconds: float | None  # the same step with every tensor in fast memory
    fast_peak_bytes: int | None  # measured: CUDA max_memory_allocated, CPU the live tensors outside the slow arena
    fast_peak_predicted: int
    slow_peak_bytes: int  # slow-tier bytes held at once (CPU arena / pinned copies made)
    bytes_to_fast: int
    bytes_to_slow: int
    bytes_async: int
    unplanned_copies: int
    limit_bytes: int
    modeled: bool
    notes: str = ""
    resolves: int = 0  # CUDA: re-solves it took to fit the budget (runtime.fit)

    @property
    def prediction_error(self) -> float:
        """|predicted - measured| / measured."""
        if not self.step_seconds or math.isnan(self.step_seconds):
            return math.nan
        return abs(self.predicted_seconds - self.step_seconds) / self.step_seconds

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "prediction_error": self.prediction_error}
