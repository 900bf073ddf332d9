"""Figures of the paper's experiments (matplotlib, Agg backend) from `autotm bench` results."""

from .figures import (case_study_figure, costs_figure, error_figure, gpu_figure, large_figure, memory_cost, save,
                      speedup_figure)

__all__ = ["case_study_figure", "costs_figure", "error_figure", "gpu_figure", "large_figure", "memory_cost",
           "save", "speedup_figure"]
