"""Pieces every subcommand shares: workload resolution, sizes, errors, output."""

from __future__ import annotations

import functools
import json
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable

import click
from rich.console import Console

# Rich folds tables to 80 columns when output is not a terminal (make, CI, pipes): allow wider.
console = Console(stderr=False, width=None if sys.stdout.isatty() else 120)
err_console = Console(stderr=True)


class UserError(click.ClickException):
    """A mistake of the user's: printed as one sentence, exit code 2, no traceback."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        err_console.print(f"[bold red]error:[/] {self.message}", highlight=False, soft_wrap=True)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the library's documented errors into one clear sentence and a non-zero exit."""
    from ..graph.capture import CaptureError
    from ..graph.zoo import UnknownModelError, UserWorkloadError

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UnknownModelError as exc:
            raise UserError(exc.args[0] if exc.args else str(exc)) from None
        except (UserWorkloadError, CaptureError, ValueError, FileNotFoundError) as exc:
            raise UserError(str(exc)) from None

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="autotm-py")
def main_group() -> None:
    """autotm: place every tensor of a training step in fast or slow memory, and move it
    at the right time (AutoTM, profile-guided ILP, on PyTorch).

    \b
    Typical use:
      autotm zoo                                 # models and the paper's batch sizes
      autotm graph vgg19 --batch 16              # kernels, tensors, peak live bytes
      autotm profile vgg19 --batch 16            # kernel timings into the cache
      autotm optimize vgg19 --ratio 1:4          # DRAM:slow = 1:4 (the paper's 4:1 PMM:DRAM)
      autotm run vgg19 --plan plan.json          # run a plan: measured against predicted
    """


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """'2GiB' -> 2147483648, '500MB' -> 500000000, '123' -> 123 bytes."""
    m = _SIZE.match(text)
    if not m:
        raise UserError(f"cannot read the size {text!r}; write it like 2GiB, 500MB or 1073741824")
    value = float(m.group(1)) * _UNITS[(m.group(2) or "B").lower()]
    if value <= 0:
        raise UserError(f"the size {text!r} must be positive")
    return int(value)


def human_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


@dataclass(frozen=True)
class Workload:
    name: str
    batch: int
    lr: float
    model: Any
    inputs: tuple
    target: Any


def resolve_workload(model: str, batch: int | None, device: str = "meta") -> Workload:
    """A zoo name or a `package.module:function` spec -> model, example batch and target."""
    from ..graph import zoo

    if batch is not None and batch <= 0:
        raise UserError(f"batch size must be a positive integer, got {batch}")
    if ":" in model:
        import os

        if os.getcwd() not in sys.path:  # `autotm graph mypkg.mod:fn` run from the project folder
            sys.path.insert(0, os.getcwd())
        net, inputs, target = zoo.load_user_workload(model, batch)
        b = int(inputs[0].shape[0]) if inputs and inputs[0].dim() else (batch or 0)
        return Workload(model, b, 0.01, net, tuple(inputs), target)
    entry = zoo.get(model)
    b = batch if batch is not None else default_batch(entry)
    net, inputs, target = zoo.workload(model, b, device=device)
    return Workload(model, b, entry.lr, net, tuple(inputs), target)


def default_batch(entry: Any) -> int:
    """The paper's test batch where there is one, else the model's smallest paper batch."""
    sets = dict(entry.sets)
    if sets.get("test"):
        return int(sets["test"][0])
    return int(min(b for v in sets.values() for b in v))


def capture_workload(model: str, batch: int | None, device: str = "cpu", optimizer: str = "sgd"):
    """Capture the training step of a workload with fake tensors (nothing allocated)."""
    from ..graph import capture

    w = resolve_workload(model, batch)
    return capture(w.model, w.inputs, w.target, lr=w.lr, optimizer=optimizer, fake=True,
                   device=device, name=w.name, batch=w.batch)


def check_not_negative(option: str, value: float) -> None:
    """One sentence for an option that must be 0 or more."""
    if value < 0:
        raise UserError(f"{option} must be 0 or more, got {value}")


# the options `autotm run` and `autotm bench gpu` share with `autotm optimize` (whose --help
# says more of --copy-spans)
copy_spans_option = click.option(
    "--copy-spans", type=int, default=0, show_default=True, metavar="N",
    help="Asynchronous formulation: each copy may run in pieces beside up to N kernels (see autotm "
         "optimize --help); 0: each beside one kernel.")
choose_algorithms_option = click.option(
    "--choose-algorithms", is_flag=True,
    help="CUDA: before a plan's first step, choose every convolution's cuDNN algorithm as the profile "
         "timed it: with the device free, and again within the room the plan leaves its workspace "
         "where that choice takes more.")


def parse_async_candidates(text: str) -> int | str | None:
    """An --async-candidates value: "auto", "all" (None: every candidate) or a whole number."""
    if text not in ("auto", "all") and not text.isdigit():
        raise UserError(f"--async-candidates must be auto, all or a whole number >= 0, got {text}")
    return None if text == "all" else text if text == "auto" else int(text)


def load_graph_file(path: str):
    """A graph saved by `autotm graph --out` (plain or gzipped JSON)."""
    import gzip
    import json

    from ..graph.types import Graph

    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt") as fh:
            return Graph.from_json(json.load(fh))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path} is not a graph saved by `autotm graph --out`: {exc}") from None


def is_graph_file(model: str) -> bool:
    import os

    return model.endswith((".json", ".json.gz")) and os.path.isfile(model)


def check_device(device: str) -> None:
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for, but this machine has no usable CUDA device")
