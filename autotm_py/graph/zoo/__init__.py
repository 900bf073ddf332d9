"""Model zoo: the AutoTM (ASPLOS 2020) benchmark networks and their batch sizes.

``workload(name, batch)`` builds a model with example inputs and a target;
by default on the ``meta`` device, so even paper-sized workloads cost nothing.
``load_user_workload("pkg.mod:fn", batch)`` does the same for user code.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
from torch import nn

from .densenet import densenet201, densenet264
from .inception import inception_v4
from .resnet import resnet50, resnet152, resnet200
from .transformer import transformer
from .vgg import vgg19, vgg416

__all__ = [
    "SET_NAMES",
    "UnknownModelError",
    "UserWorkloadError",
    "ZooEntry",
    "get",
    "load_user_workload",
    "names",
    "workload",
    "zoo_set",
]

#: named batch-size sets (AutoTM, section 7.1)
SET_NAMES: tuple[str, ...] = ("test", "conventional", "large", "gpu")
#: the GPU comparison against save_on_cpu and checkpointing (ours, not the paper's)
PEER_SET = "peers"


class UnknownModelError(KeyError):
    """Raised by :func:`get` for a name that is not in the zoo."""

    def __str__(self) -> str:  # KeyError would show the message quoted
        return str(self.args[0]) if self.args else ""


class UserWorkloadError(ValueError):
    """Raised by :func:`load_user_workload` for a bad spec or a bad return value."""


@dataclass(frozen=True)
class ZooEntry:
    """One zoo model: how to build it, its input, learning rate and batch sets."""

    name: str
    description: str
    build: Callable[[], nn.Module]
    sample_shape: tuple[int, ...]
    input_dtype: torch.dtype
    num_classes: int
    lr: float
    sets: Mapping[str, tuple[int, ...]] = field(hash=False)
    small_batch: int

    @property
    def is_tokens(self) -> bool:
        """True when the input is integer tokens (target per position)."""
        return not self.input_dtype.is_floating_point


def _entry(
    name: str,
    description: str,
    build: Callable[[], nn.Module],
    sample_shape: tuple[int, ...],
    lr: float,
    sets: dict[str, tuple[int, ...]],
    small_batch: int,
    *,
    input_dtype: torch.dtype = torch.float32,
    num_classes: int = 1000,
) -> ZooEntry:
    unknown = set(sets) - set(SET_NAMES) - {PEER_SET}
    assert not unknown, f"{name}: unknown set names {sorted(unknown)}"
    return ZooEntry(
        name=name,
        description=description,
        build=build,
        sample_shape=sample_shape,
        input_dtype=input_dtype,
        num_classes=num_classes,
        lr=lr,
        sets=MappingProxyType(dict(sets)),
        small_batch=small_batch,
    )


_IMAGE = (3, 224, 224)
_SEQ_LEN = 150
_VOCAB = 20000

_ENTRIES: tuple[ZooEntry, ...] = (
    _entry(
        "vgg19",
        "VGG-19 without batch norm (143.7M parameters), 3x224x224 images.",
        vgg19,
        _IMAGE,
        0.05,
        {"test": (16,), "conventional": (2048,), "gpu": (64, 128), PEER_SET: (256, 1024)},
        1,
    ),
    _entry(
        "vgg416",
        "VGG-416: VGG with (80, 81, 82, 83, 83) 3x3 convolutions per stage, 3x224x224 images.",
        vgg416,
        _IMAGE,
        0.05,
        {"large": (320,)},
        1,
    ),
    _entry(
        "resnet50",
        "ResNet-50 bottleneck network (25.6M parameters), 3x224x224 images; "
        "not in the paper, its batch sets (test 8, gpu 64) are ours.",
        resnet50,
        _IMAGE,
        0.001,
        {"test": (8,), "gpu": (64,)},
        2,
    ),
    _entry(
        "resnet152",
        "ResNet-152 bottleneck network (60.2M parameters), 3x224x224 images; not in the paper: "
        "used by the GPU comparison (set 'peers', batch 256).",
        resnet152,
        _IMAGE,
        0.001,
        {PEER_SET: (256,)},
        1,
    ),
    _entry(
        "resnet200",
        "ResNet-200 bottleneck network (64.7M parameters), 3x224x224 images.",
        resnet200,
        _IMAGE,
        0.001,
        {"conventional": (512,), "large": (2560,), "gpu": (32, 64, 128)},
        1,
    ),
    _entry(
        "inception_v4",
        "Inception-v4 (42.7M parameters), 3x299x299 images.",
        inception_v4,
        (3, 299, 299),
        0.05,
        {"conventional": (1024,), "large": (6144,), "gpu": (64, 128, 256)},
        1,
    ),
    _entry(
        "densenet264",
        "DenseNet-264 (growth 32, blocks 6/12/64/48; 33.3M parameters), 3x224x224 images.",
        densenet264,
        _IMAGE,
        0.001,
        {"conventional": (512,), "large": (3072,), "gpu": (32, 64, 128)},
        1,
    ),
    _entry(
        "densenet201",
        "DenseNet-201 (growth 32, blocks 6/12/48/32; 20.0M parameters), 3x224x224 images; not in "
        "the paper: used by the GPU comparison (set 'peers', batch 128).",
        densenet201,
        _IMAGE,
        0.001,
        {PEER_SET: (128,)},
        1,
    ),
    _entry(
        "transformer",
        "Language-model Transformer: 8 pre-norm layers, d_model 512, 8 heads, d_ff 2048, "
        f"vocabulary {_VOCAB}, sequences of {_SEQ_LEN} int64 tokens.",
        functools.partial(transformer, _VOCAB, _SEQ_LEN),
        (_SEQ_LEN,),
        0.001,
        {"conventional": (512,)},
        2,
        input_dtype=torch.int64,
        num_classes=_VOCAB,
    ),
)

_REGISTRY: Mapping[str, ZooEntry] = MappingProxyType({e.name: e for e in _ENTRIES})


def names() -> list[str]:
    """Names of the zoo models, in registry order."""
    return list(_REGISTRY)


def get(name: str) -> ZooEntry:
    """The zoo entry called ``name``; raises :class:`UnknownModelError` otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}; the zoo has: {', '.join(_REGISTRY)}."
        ) from None


def zoo_set(set_name: str) -> list[tuple[str, int]]:
    """The ``(model, batch)`` pairs of a named batch set, in registry order."""
    if set_name not in SET_NAMES + (PEER_SET,):
        raise ValueError(f"unknown set {set_name!r}; the sets are: {', '.join(SET_NAMES)}.")
    return [(e.name, b) for e in _ENTRIES for b in e.sets.get(set_name, ())]


@contextlib.contextmanager
def _seeded_init(device: torch.device, seed: int) -> Iterator[None]:
    """Seed parameter initialisation on ``device`` without leaking RNG state."""
    if device.type == "meta":
        yield
        return
    cuda = []
    if device.type == "cuda":
        cuda = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        torch.default_generator.manual_seed(seed)
        for idx in cuda:
            with torch.cuda.device(idx):
                torch.cuda.manual_seed(seed)
        yield


def workload(
    name: str, batch: int, *, device: str | torch.device = "meta", seed: int = 0
) -> tuple[nn.Module, tuple[torch.Tensor, ...], torch.Tensor]:
    """Build ``(model, (x,), target)`` for a zoo model at batch size ``batch``.

    Everything is created on ``device`` (``meta`` by default: shapes only).
    On a real device parameters and data are reproducible from ``seed``.
    Targets are int64 class indices, ``(batch,)``, or ``(batch, seq)`` for tokens.
    """
    entry = get(name)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch <= 0:
        raise ValueError(f"batch size must be a positive integer, got {batch!r}.")
    dev = torch.device(device)
    with _seeded_init(dev, seed), torch.device(dev):
        model = entry.build()
    shape = (batch, *entry.sample_shape)
    target_shape = shape if entry.is_tokens else (batch,)
    gen = None
    if dev.type != "meta":
        gen = torch.Generator(device=dev)
        gen.manual_seed(seed)
    if entry.is_tokens:
        x = torch.randint(
            0, entry.num_classes, shape, generator=gen, device=dev, dtype=entry.input_dtype
        )
    else:
        x = torch.randn(shape, generator=gen, device=dev, dtype=entry.input_dtype)
    target = torch.randint(
        0, entry.num_classes, target_shape, generator=gen, device=dev, dtype=torch.int64
    )
    return model, (x,), target


def _accepts_batch(fn: Callable[..., object]) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    p = params.get("batch")
    return p is not None and p.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.KEYWORD_ONLY,
    )


def load_user_workload(
    spec: str, batch: int | None
) -> tuple[nn.Module, tuple[object, ...], torch.Tensor]:
    """Call ``fn`` of a ``"package.module:fn"`` spec and check its result.

    ``fn`` gets ``batch=batch`` only when ``batch`` is given and ``fn`` has a
    ``batch`` parameter. It must return ``(model, example_inputs, target)``;
    a single tensor as ``example_inputs`` is wrapped in a tuple. The module is
    imported with the current ``sys.path``.
    """
    mod_name, sep, fn_name = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if (
        not sep
        or ":" in fn_name
        or not all(part.isidentifier() for part in mod_name.split("."))
        or not fn_name.isidentifier()
    ):
        raise UserWorkloadError(
            f"workload spec {spec!r} is malformed; expected 'package.module:function'."
        )
    try:
        module = importlib.import_module(mod_name)
    except Exception as exc:  # noqa: BLE001 - any failure while importing user code
        raise UserWorkloadError(
            f"cannot import module {mod_name!r} of workload spec {spec!r}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    fn = getattr(module, fn_name, None)
    if fn is None or not callable(fn):
        raise UserWorkloadError(f"module {mod_name!r} has no callable {fn_name!r} (spec {spec!r}).")
    result = fn(batch=batch) if batch is not None and _accepts_batch(fn) else fn()
    if not isinstance(result, (tuple, list)) or len(result) != 3:
        raise UserWorkloadError(
            f"{spec} must return a 3-tuple (model, example_inputs, target), "
            f"got {type(result).__name__}."
        )
    model, inputs, target = result
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if not isinstance(model, nn.Module):
        raise UserWorkloadError(
            f"{spec} returned a {type(model).__name__} as model; expected a torch.nn.Module."
        )
    if not isinstance(inputs, (tuple, list)):
        raise UserWorkloadError(
            f"{spec} returned a {type(inputs).__name__} as example_inputs; "
            "expected a tensor or a tuple of them."
        )
    if not isinstance(target, torch.Tensor):
        raise UserWorkloadError(
            f"{spec} returned a {type(target).__name__} as target; expected a torch.Tensor."
        )
    return model, tuple(inputs), target
