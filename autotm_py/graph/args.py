"""Encoding of aten call arguments as JSON values, and back.

Tensors become {"$t": i} (i indexes the kernel's tensor inputs in order of appearance);
dtypes, devices, layouts and memory formats become tagged strings so a call can be rebuilt
exactly (the profiler replays kernels from these).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

_TAGS = {
    torch.dtype: "$dtype",
    torch.device: "$device",
    torch.layout: "$layout",
    torch.memory_format: "$memory_format",
}


def encode(value: Any, tensor_index: Callable[[Any], int | None]) -> Any:
    """Encode an FX argument tree. `tensor_index` maps a tensor-valued leaf (an FX node)
    to its input slot, or returns None for a leaf that is not a tensor."""
    if isinstance(value, (list, tuple)):
        return [encode(v, tensor_index) for v in value]
    if isinstance(value, dict):
        return {str(k): encode(v, tensor_index) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    for typ, tag in _TAGS.items():
        if isinstance(value, typ):
            return {tag: str(value)}
    slot = tensor_index(value)
    if slot is not None:
        return {"$t": slot}
    if isinstance(value, torch.SymInt | torch.SymFloat | torch.SymBool):
        raise TypeError(f"symbolic value {value} in a static-shape capture")
    return {"$repr": repr(value)}


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


def _memory_format(name: str) -> torch.memory_format:
    return getattr(torch, name.removeprefix("torch."))


def _layout(name: str) -> torch.layout:
    return getattr(torch, name.removeprefix("torch."))


_DECODERS: dict[str, Callable[[str], Any]] = {
    "$dtype": _dtype,
    "$device": torch.device,
    "$layout": _layout,
    "$memory_format": _memory_format,
}


def decode(value: Any, tensors: list[torch.Tensor], device: torch.device | None = None) -> Any:
    """Rebuild an argument tree, substituting `tensors` for {"$t": i}. Devices are replaced
    by `device` when given, so a call captured for one device replays on another."""
    if isinstance(value, list):
        return [decode(v, tensors, device) for v in value]
    if isinstance(value, dict):
        if len(value) == 1:
            (tag, payload), = value.items()
            if tag == "$t":
                return tensors[payload]
            if tag == "$device":
                return device if device is not None else torch.device(payload)
            if tag in _DECODERS:
                return _DECODERS[tag](payload)
            if tag == "$repr":
                raise ValueError(f"argument {payload} cannot be rebuilt")
        return {k: decode(v, tensors, device) for k, v in value.items()}
    return value
