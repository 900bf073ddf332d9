"""Stage 4: run a Plan: the FX graph rewritten with moves, on CPU tiers or CUDA streams."""

from .defrag import MemoryTrace, kernel_memory_trace, lowered_limits
from .movers import CpuMover, CudaMover, MoveStats, SlowArena
from .rewrite import RewriteStats, insert_moves
from .step import PlannedStep, RunError, compile, time_steps, unplanned_step
from .timing import GpuWork, kernel_gpu_trace, kernel_time_trace

__all__ = ["CpuMover", "CudaMover", "GpuWork", "MemoryTrace", "MoveStats", "PlannedStep", "RewriteStats", "RunError",
           "SlowArena", "compile", "insert_moves", "kernel_gpu_trace", "kernel_memory_trace", "kernel_time_trace", "lowered_limits", "time_steps",
           "unplanned_step"]
