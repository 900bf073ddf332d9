"""Stage 1: capture a training step as a Graph (kernels, storages, liveness)."""

from .capture import CaptureError, StepSpec, capture, capture_function, graph_from_fx, trace_step
from .types import Graph, Kernel, Role, Tensor, TensorMeta, kernel_signature

__all__ = [
    "CaptureError", "Graph", "Kernel", "Role", "StepSpec", "Tensor", "TensorMeta",
    "capture", "capture_function", "graph_from_fx", "kernel_signature", "trace_step",
]
