"""CUDA kernels timed without room for their workspace, in a child process.

A plan that keeps a convolution's inputs and outputs in device memory but not its cuDNN
workspace runs it with whatever algorithm fits the memory left: cuDNN filters its candidates by
the device's free memory and falls back to ones with small workspaces. The profiler's
ordinary timing had the whole device to itself, so such a kernel is timed again here with the
device filled up to its outputs plus SLACK_BYTES, and again with partial rooms (a share of its
workspace, PARTIAL_SHARES), where cuDNN may find an algorithm nearly as fast for less memory.

Why a child process: cuDNN keeps the algorithm it chose per convolution for the life of the
process (its benchmark cache has no eviction). Timed in the profiling process, the fallback
algorithm would replace the fast one for every later step there.

The child reads a pickled list of Kernels, the room each may find free beside its outputs and
the cuDNN mode, and prints one JSON line per kernel: {"i": index, "seconds": s, "runs": n,
"workspace": bytes} or {"i": index, "error": why}.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ..graph.types import Kernel
from .harness import TimingPolicy

# what the timed kernel may find free beside its outputs: the allocator's rounding and small
# cuDNN workspaces (some algorithms need a few MiB)
SLACK_BYTES = 32 << 20
# kernels with smaller workspaces are not timed again: too little memory to be worth a choice
MIN_WORKSPACE = 16 << 20
# partial rooms, as shares 1/n of the workspace, each timed in a child of its own (one cuDNN
# choice per convolution shape and process): heuristic algorithms that fit in part of the
# workspace may be nearly as fast as the one that wants it all
PARTIAL_SHARES = (16, 4)


def partial_room(workspace: int, share: int) -> int:
    """The room 1/`share` of `workspace` leaves (2 MiB granules); 0 where that is not more
    than SLACK_BYTES, the room without workspace."""
    room = workspace // share // (2 << 20) * (2 << 20)
    return room if room > SLACK_BYTES else 0


@dataclass(frozen=True)
class Result:
    seconds: float | None
    runs: int = 0
    workspace: int = 0  # what the kernel still allocated beyond its outputs
    error: str | None = None


def measure(kernels: Sequence[Kernel], policy: TimingPolicy, cudnn_benchmark: bool,
            on_result: Callable[[int, Result], None] | None = None,
            rooms: Sequence[int] | None = None) -> list[Result]:
    """Time each kernel with the device full up to its outputs plus its room (`rooms`, one per
    kernel; default SLACK_BYTES), see the module docstring. A child that dies takes the
    kernel it was timing with it (recorded as an error); the rest go to a new child."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the child needs the memory this process keeps cached
    room_of = [SLACK_BYTES] * len(kernels) if rooms is None else [int(r) for r in rooms]
    if len(room_of) != len(kernels):
        raise ValueError("rooms must give one room per kernel")
    results: dict[int, Result] = {}
    todo = list(range(len(kernels)))
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    while todo:
        with tempfile.TemporaryDirectory() as tmp:
            job = os.path.join(tmp, "kernels.pkl")
            with open(job, "wb") as fh:
                pickle.dump({"kernels": [kernels[i] for i in todo], "rooms": [room_of[i] for i in todo],
                             "policy": policy, "cudnn_benchmark": cudnn_benchmark}, fh)
            proc = subprocess.Popen([sys.executable, "-m", __name__, job], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=env)
            assert proc.stdout is not None
            for line in proc.stdout:
                try:
                    d = json.loads(line)
                except json.JSONDecodeError:
                    continue
                i = todo[d["i"]]
                r = Result(d.get("seconds"), d.get("runs", 0), d.get("workspace", 0), d.get("error"))
                results[i] = r
                if on_result is not None:
                    on_result(i, r)
            err = proc.stderr.read() if proc.stderr is not None else ""
            proc.wait()
        left = [i for i in todo if i not in results]
        if left:
            tail = (err.strip().splitlines() or [f"exit status {proc.returncode}"])[-1][:300]
            results[left[0]] = r = Result(None, error=f"the timing process died: {tail}")
            if on_result is not None:
                on_result(left[0], r)
        todo = left[1:]
    return [results[i] for i in range(len(kernels))]


def leave_room(kernel: Kernel, room: int, device: object) -> object:
    """With `kernel`'s inputs allocated, take the device's free memory (a tensor, returned:
    the room lasts while it lives) down to what its outputs need plus `room`, from an empty
    cache, so that cuDNN's choice for it sees `room` free for a workspace. Under a per-process
    memory fraction, free is what the fraction still allows."""
    import torch

    from .harness import storage_extents

    ins = set(kernel.input_storages)
    out_bytes = sum(b for s, b in zip(kernel.storages, storage_extents(kernel)) if s not in ins)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda: 1.0)()
    free = min(free, int(fraction * total) - torch.cuda.memory_reserved())
    fill = (free - out_bytes - room) // (2 << 20) * (2 << 20)
    return torch.empty(fill, dtype=torch.uint8, device=device) if fill > 0 else None


def _child(path: str) -> None:
    import torch

    from .harness import _quiet, cuda_workspace, prepare_call, time_call
    from .tiers import dram_alloc

    with open(path, "rb") as fh:
        job = pickle.load(fh)
    torch.backends.cudnn.benchmark = job["cudnn_benchmark"]
    dev = torch.device("cuda")
    fast = dram_alloc("cuda")
    for i, (k, room) in enumerate(zip(job["kernels"], job["rooms"])):
        out: dict[str, object] = {"i": i}
        filler = call = None
        try:
            with _quiet():
                call = prepare_call(k, frozenset(), fast, fast, dev)
                filler = leave_room(k, room, dev)
                t = time_call(call.fn, job["policy"], "cuda", graphs=False)
                out.update(seconds=t.seconds, runs=t.runs, workspace=cuda_workspace(call.fn))
        except Exception as exc:  # noqa: BLE001 - a kernel that cannot run this way is recorded
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            out["error"] = f"{type(exc).__name__}: {first[:300]}"
        finally:
            filler = call = None  # noqa: F841
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    _child(sys.argv[1])
