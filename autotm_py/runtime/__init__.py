"""Stage 4: run a Plan: the FX graph rewritten with moves, on CPU tiers or CUDA streams."""

from .movers import CpuMover, CudaMover, MoveStats, SlowArena
from .rewrite import RewriteStats, insert_moves
from .step import PlannedStep, RunError, compile, time_steps, unplanned_step

__all__ = ["CpuMover", "CudaMover", "MoveStats", "PlannedStep", "RewriteStats", "RunError",
           "SlowArena", "compile", "insert_moves", "time_steps", "unplanned_step"]
