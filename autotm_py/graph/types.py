"""The Graph of one training step: kernels in execution order and tensors per storage.

A *tensor* here is a storage: views and in-place results share their base's storage, so
bytes, liveness and placement are per storage. Liveness follows AutoTM (reference 1.3) in
bytes: an intermediate lives from its producer to its last reader (both inclusive); state
that exists before and after the step (parameters, buffers, optimizer state, inputs) is
live at every kernel; outputs live from their producer to the last kernel.
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any, Iterator

import numpy as np

SCHEMA_VERSION = 1


class Role(str, enum.Enum):
    PARAMETER = "parameter"
    BUFFER = "buffer"  # model state without gradient (BatchNorm running statistics)
    INPUT = "input"  # the batch and its target
    OPTIMIZER_STATE = "optimizer_state"
    INTERMEDIATE = "intermediate"
    OUTPUT = "output"

    @property
    def persistent(self) -> bool:
        """State that exists before the step starts and after it ends."""
        return self in (Role.PARAMETER, Role.BUFFER, Role.INPUT, Role.OPTIMIZER_STATE)


@dataclass(frozen=True)
class TensorMeta:
    """How a kernel sees one tensor argument: a view (shape, stride, offset) of a storage."""

    storage: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    dtype: str

    @staticmethod
    def from_json(d: dict[str, Any]) -> "TensorMeta":
        return TensorMeta(d["storage"], tuple(d["shape"]), tuple(d["stride"]), d["offset"], d["dtype"])


@dataclass(frozen=True)
class Tensor:
    """One storage. `producer` is None for state that exists before the step."""

    id: int
    name: str
    nbytes: int
    dtype: str
    role: Role
    producer: int | None
    users: tuple[int, ...]  # kernels reading or writing it after its creation, ascending
    first: int  # live range, kernel indices, inclusive
    last: int

    @property
    def fixed(self) -> bool:
        """Persistent state: fixed to the fast tier unless the optimizer is told otherwise."""
        return self.role.persistent

    @staticmethod
    def from_json(d: dict[str, Any]) -> "Tensor":
        return Tensor(
            d["id"], d["name"], d["nbytes"], d["dtype"], Role(d["role"]), d["producer"],
            tuple(d["users"]), d["first"], d["last"],
        )


@dataclass(frozen=True)
class Kernel:
    """One aten call. `args` is the call's arguments as JSON values with every tensor
    replaced by {"$t": i}, i indexing `inputs`. `view` marks calls that only alias their
    input (no data is read or written); `inplace` marks calls that write into an input."""

    index: int
    node: str  # the FX node name, the handle the runtime rewrite uses
    op: str  # aten overload, e.g. "aten.convolution.default"
    inputs: tuple[TensorMeta, ...]
    outputs: tuple[TensorMeta, ...]
    args: Any
    view: bool
    inplace: bool

    @cached_property
    def input_storages(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys(m.storage for m in self.inputs))

    @cached_property
    def output_storages(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys(m.storage for m in self.outputs))

    @cached_property
    def storages(self) -> tuple[int, ...]:
        """Every storage the kernel touches, inputs first, without repeats."""
        return tuple(dict.fromkeys(self.input_storages + self.output_storages))

    @staticmethod
    def from_json(d: dict[str, Any]) -> "Kernel":
        return Kernel(
            d["index"], d["node"], d["op"],
            tuple(TensorMeta.from_json(m) for m in d["inputs"]),
            tuple(TensorMeta.from_json(m) for m in d["outputs"]),
            d["args"], d["view"], d["inplace"],
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index, "node": self.node, "op": self.op,
            "inputs": [asdict(m) for m in self.inputs],
            "outputs": [asdict(m) for m in self.outputs],
            "args": self.args, "view": self.view, "inplace": self.inplace,
        }


@dataclass(frozen=True)
class Graph:
    """A captured training step. Frozen and JSON-serialisable; the FX module it was
    captured from rides along in `module` (not serialised, not compared)."""

    name: str
    batch: int | None
    device: str
    kernels: tuple[Kernel, ...]
    tensors: tuple[Tensor, ...]
    capture_seconds: float = 0.0
    module: Any = field(default=None, compare=False, repr=False)

    # ---- liveness -------------------------------------------------------------------
    @cached_property
    def live_bytes(self) -> np.ndarray:
        """Bytes live at each kernel (int64 array, one entry per kernel)."""
        delta = np.zeros(len(self.kernels) + 1, dtype=np.int64)
        for t in self.tensors:
            delta[t.first] += t.nbytes
            delta[t.last + 1] -= t.nbytes
        return np.cumsum(delta[:-1])

    def live_set(self, index: int) -> frozenset[int]:
        """Storage ids live at kernel `index`: created there, dying there, or in between."""
        return frozenset(t.id for t in self.tensors if t.first <= index <= t.last)

    def live_sets(self) -> Iterator[frozenset[int]]:
        """Live sets of every kernel in order, built incrementally (reference 1.3)."""
        starts: dict[int, list[int]] = {}
        ends: dict[int, list[int]] = {}
        for t in self.tensors:
            starts.setdefault(t.first, []).append(t.id)
            ends.setdefault(t.last, []).append(t.id)
        live: set[int] = set()
        for i in range(len(self.kernels)):
            live.difference_update(ends.get(i - 1, ()))
            live.update(starts.get(i, ()))
            yield frozenset(live)

    @property
    def peak_live_bytes(self) -> int:
        return int(self.live_bytes.max()) if len(self.kernels) else 0

    @property
    def peak_kernel(self) -> int:
        """Index of the first kernel where the live bytes peak."""
        return int(self.live_bytes.argmax()) if len(self.kernels) else 0

    # ---- summaries ------------------------------------------------------------------
    def bytes_by_role(self) -> dict[str, int]:
        out = {r.value: 0 for r in Role}
        for t in self.tensors:
            out[t.role.value] += t.nbytes
        return out

    @property
    def io_bytes(self) -> int:
        """Bytes of the step's inputs (batch, target) and outputs (the loss)."""
        return sum(t.nbytes for t in self.tensors if t.role in (Role.INPUT, Role.OUTPUT))

    @property
    def compute_kernels(self) -> tuple[Kernel, ...]:
        """Kernels that read or write data (views excluded): what the profiler times."""
        return tuple(k for k in self.kernels if not k.view)

    def tensor(self, storage: int) -> Tensor:
        return self.tensors[storage]

    def made_by(self, kernel: Kernel) -> tuple[int, ...]:
        """The storages `kernel` creates (its outputs it does not write into)."""
        return tuple(s for s in kernel.output_storages if self.tensors[s].producer == kernel.index)

    # ---- identity and files ---------------------------------------------------------
    def _content(self) -> dict[str, Any]:
        return {
            "kernels": [k.to_json() for k in self.kernels],
            "tensors": [
                {**asdict(t), "role": t.role.value, "users": list(t.users)} for t in self.tensors
            ],
        }

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the kernels and tensors (names of the run excluded); stable across
        processes for the same model, batch, loss, optimizer and device."""
        blob = json.dumps(self._content(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION, "name": self.name, "batch": self.batch,
            "device": self.device, "fingerprint": self.fingerprint,
            "capture_seconds": self.capture_seconds, **self._content(),
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> "Graph":
        if d.get("schema") != SCHEMA_VERSION:
            raise ValueError(
                f"graph file has schema {d.get('schema')!r}, this autotm-py reads schema {SCHEMA_VERSION}"
            )
        g = Graph(
            d["name"], d["batch"], d["device"],
            tuple(Kernel.from_json(k) for k in d["kernels"]),
            tuple(Tensor.from_json(t) for t in d["tensors"]),
            d.get("capture_seconds", 0.0),
        )
        if d.get("fingerprint") not in (None, g.fingerprint):
            raise ValueError("graph file is damaged: its fingerprint does not match its content")
        return g

    def summary(self) -> dict[str, Any]:
        peak = self.peak_kernel
        return {
            "name": self.name,
            "batch": self.batch,
            "device": self.device,
            "kernels": len(self.kernels),
            "compute_kernels": len(self.compute_kernels),
            "unique_kernels": len({kernel_signature(k) for k in self.compute_kernels}),
            "tensors": len(self.tensors),
            "peak_live_bytes": self.peak_live_bytes,
            "peak_kernel": peak,
            "peak_op": self.kernels[peak].op if self.kernels else None,
            "peak_node": self.kernels[peak].node if self.kernels else None,
            "io_bytes": self.io_bytes,
            "bytes_by_role": self.bytes_by_role(),
            "fingerprint": self.fingerprint,
            "capture_seconds": self.capture_seconds,
        }


def kernel_signature(k: Kernel) -> str:
    """Identity of a kernel's work: op, argument values and the views it reads and writes."""
    metas = [(m.shape, m.stride, m.dtype) for m in k.inputs + k.outputs]
    return json.dumps([k.op, k.args, metas], sort_keys=True, default=str)
