"""Capture one whole training step (forward, backward, parameter update) as a Graph.

The step is written as a function of flat tensors (parameters, buffers, optimizer state,
inputs, target) and traced with make_fx. With fake tensors nothing is allocated, so a
paper-sized workload is captured on a small machine.
"""

from __future__ import annotations

import dataclasses
import operator
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.multiprocessing.reductions import StorageWeakRef

from .args import encode
from .types import Graph, Kernel, Role, Tensor, TensorMeta

LossFn = Callable[..., torch.Tensor]


class CaptureError(RuntimeError):
    """The training step could not be traced; the message names the op where possible."""


@dataclass(frozen=True)
class StepSpec:
    """What the captured step does besides the model: its loss and its optimizer."""

    loss: str | LossFn = "cross_entropy"
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


def _cross_entropy(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if out.dim() > 2:  # sequence models: (batch, seq, classes) against (batch, seq)
        return F.cross_entropy(out.flatten(0, -2), target.flatten())
    return F.cross_entropy(out, target)


_LOSSES: dict[str, LossFn] = {"cross_entropy": _cross_entropy, "mse": F.mse_loss}


def loss_function(loss: str | LossFn) -> LossFn:
    if callable(loss):
        return loss
    try:
        return _LOSSES[loss]
    except KeyError:
        raise ValueError(f"unknown loss {loss!r}; choose one of {sorted(_LOSSES)} or pass a callable") from None


def optimizer_state_names(optimizer: str, momentum: float) -> tuple[str, ...]:
    """Names of the per-parameter optimizer state tensors."""
    if optimizer == "sgd":
        return ("momentum_buffer",) if momentum else ()
    if optimizer == "adam":
        return ("exp_avg", "exp_avg_sq")
    raise ValueError(f"unknown optimizer {optimizer!r}; choose 'sgd' or 'adam'")


def _update(spec: StepSpec, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
            state: Sequence[Sequence[torch.Tensor]], step: torch.Tensor | None) -> None:
    """The optimizer step, in place, as torch.optim would do it (single-tensor path)."""
    if spec.optimizer == "sgd":
        for i, (p, g) in enumerate(zip(params, grads)):
            if spec.momentum:
                buf = state[i][0]
                buf.mul_(spec.momentum).add_(g)
                g = buf
            p.add_(g, alpha=-spec.lr)
        return
    # Adam with a tensor step count (torch.optim's capturable path), so the traced graph
    # stays valid at every step rather than baking in the first step's bias correction.
    b1, b2 = spec.betas
    assert step is not None
    step.add_(1)
    bc1 = 1 - torch.pow(b1, step)
    bc2_sqrt = (1 - torch.pow(b2, step)).sqrt()
    neg_step_size = (spec.lr / bc1).neg()
    for i, (p, g) in enumerate(zip(params, grads)):
        m, v = state[i]
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (v.sqrt() / (bc2_sqrt * neg_step_size)).add_(spec.eps / neg_step_size)
        p.addcdiv_(m, denom)


@dataclass(frozen=True)
class StepLayout:
    """Order and names of the flat tensors the traced step takes."""

    param_names: tuple[str, ...]
    buffer_names: tuple[str, ...]
    state_names: tuple[str, ...]  # "<param>.<state>" in parameter order, then "step" for adam
    num_inputs: int
    has_target: bool

    @property
    def roles(self) -> list[tuple[str, Role]]:
        out = [(f"param:{n}", Role.PARAMETER) for n in self.param_names]
        out += [(f"buffer:{n}", Role.BUFFER) for n in self.buffer_names]
        out += [(f"state:{n}", Role.OPTIMIZER_STATE) for n in self.state_names]
        out += [(f"input:{i}", Role.INPUT) for i in range(self.num_inputs)]
        if self.has_target:
            out.append(("target", Role.INPUT))
        return out


def make_step(model: nn.Module, layout: StepLayout, spec: StepSpec) -> Callable[..., tuple[torch.Tensor]]:
    """The training step as a function of flat tensors, in `layout` order."""
    loss_fn = loss_function(spec.loss)
    np_, nb, ns = len(layout.param_names), len(layout.buffer_names), len(layout.state_names)
    per_param = len(optimizer_state_names(spec.optimizer, spec.momentum))

    def step(*flat: torch.Tensor) -> tuple[torch.Tensor]:
        params = flat[:np_]
        buffers = flat[np_:np_ + nb]
        state = flat[np_ + nb:np_ + nb + ns]
        rest = flat[np_ + nb + ns:]
        inputs = rest[:layout.num_inputs]
        target = rest[layout.num_inputs] if layout.has_target else None
        tensors = dict(zip(layout.param_names, params)) | dict(zip(layout.buffer_names, buffers))
        with torch.enable_grad():
            out = torch.func.functional_call(model, tensors, tuple(inputs))
            loss = loss_fn(out, target) if target is not None else loss_fn(out)
        grads = torch.autograd.grad(loss, params)
        grouped = [state[i * per_param:(i + 1) * per_param] for i in range(np_)]
        step_count = state[-1] if spec.optimizer == "adam" else None
        with torch.no_grad():
            _update(spec, params, grads, grouped, step_count)
        return (loss.detach(),)

    return step


def initial_state(spec: StepSpec, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Fresh optimizer state (zeros), in layout order, shaped like `params`."""
    names = optimizer_state_names(spec.optimizer, spec.momentum)
    state = [torch.zeros_like(p) for p in params for _ in names]
    if spec.optimizer == "adam":
        state.append(torch.zeros((), dtype=torch.float32, device=params[0].device if params else "cpu"))
    return state


def step_layout(model: nn.Module, num_inputs: int, has_target: bool, spec: StepSpec) -> StepLayout:
    params = [n for n, p in model.named_parameters() if p.requires_grad]
    names = optimizer_state_names(spec.optimizer, spec.momentum)
    states = [f"{p}.{s}" for p in params for s in names] + (["step"] if spec.optimizer == "adam" else [])
    return StepLayout(
        tuple(params), tuple(n for n, _ in model.named_buffers()), tuple(states), num_inputs, has_target
    )


def step_arguments(model: nn.Module, state: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor],
                   target: torch.Tensor | None) -> list[torch.Tensor]:
    """The real tensors the captured step takes, in `StepLayout` order: the model's trainable
    parameters (detached: the step updates them in place), buffers, optimizer state, the
    inputs and the target."""
    params = [p.detach() for p in model.parameters() if p.requires_grad]
    buffers = [b for _, b in model.named_buffers()]
    return params + buffers + list(state) + list(inputs) + ([target] if target is not None else [])


def _fake(t: torch.Tensor, mode: FakeTensorMode, device: torch.device) -> torch.Tensor:
    with mode:
        f = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
    return f


def _failing_op(exc: BaseException) -> str | None:
    """The aten op being dispatched when tracing failed, from the traceback or the message."""
    tb = exc.__traceback__
    found = None
    while tb is not None:
        func = tb.tb_frame.f_locals.get("func")
        if isinstance(func, torch._ops.OpOverload):
            found = str(func)
        tb = tb.tb_next
    if found:
        return found
    m = re.search(r"aten\.[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?", str(exc))
    return m.group(0) if m else None


def trace_step(model: nn.Module, example_inputs: Sequence[torch.Tensor], target: torch.Tensor | None,
               spec: StepSpec, *, fake: bool = True, device: str | torch.device | None = None,
               ) -> tuple[torch.fx.GraphModule, StepLayout]:
    """Trace the step; returns the aten-level FX module and the layout of its inputs."""
    layout = step_layout(model, len(example_inputs), target is not None, spec)
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    buffers = [b for _, b in model.named_buffers()]
    dev = torch.device(device) if device is not None else _model_device(model, example_inputs)
    if dev.type == "meta":
        dev = torch.device("cpu")
    data = list(example_inputs) + ([target] if target is not None else [])
    if fake:
        mode = FakeTensorMode(allow_non_fake_inputs=False)
        params_f = [_fake(p, mode, dev).requires_grad_(True) for p in params]
        buffers_f = [_fake(b, mode, dev) for b in buffers]
        data_f = [_fake(x, mode, dev) for x in data]
        with mode:
            state_f = initial_state(spec, params_f)
        flat = params_f + buffers_f + state_f + data_f
        tracing_mode = "fake"
    else:
        if any(t.is_meta for t in params + buffers + data):
            raise CaptureError("fake=False needs real tensors, but the model or its inputs are on the meta device")
        params_r = [p.detach().clone().to(dev).requires_grad_(True) for p in params]
        flat = params_r + [b.detach().clone().to(dev) for b in buffers] + initial_state(spec, params_r)
        flat += [x.to(dev) for x in data]
        tracing_mode = "real"
    step = make_step(model, layout, spec)
    try:
        gm = make_fx(step, tracing_mode=tracing_mode)(*flat)
    except Exception as exc:  # noqa: BLE001 - any tracing failure becomes one clear sentence
        op = _failing_op(exc)
        where = f" at {op}" if op else ""
        raise CaptureError(f"the training step could not be traced{where}: {_reason(exc, op)}") from exc
    return gm, layout


def _reason(exc: BaseException, op: str | None) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    if "DataDependent" in type(exc).__name__ or op == "aten._local_scalar_dense.default":
        return ("the step reads a tensor's value (.item(), or a branch on a tensor), "
                "which a fake-tensor trace cannot know")
    if not first or first == op:
        return type(exc).__name__
    return first


def _model_device(model: nn.Module, inputs: Sequence[torch.Tensor]) -> torch.device:
    for t in list(model.parameters()) + list(inputs):
        return t.device
    return torch.device("cpu")


def _vals(node: torch.fx.Node) -> list[torch.Tensor | None]:
    v = node.meta.get("val")
    if isinstance(v, (tuple, list)):
        return [x if isinstance(x, torch.Tensor) else None for x in v]
    return [v if isinstance(v, torch.Tensor) else None]


def _written_args(target: Any) -> set[str]:
    """Names of the schema arguments an op writes (in-place and out= arguments)."""
    schema = getattr(target, "_schema", None)
    if schema is None:
        return set()
    return {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}


def _schema_aliases(target: Any, args: Any, kwargs: Any) -> dict[int, torch.fx.Node]:
    """Output index -> the input node it aliases, from the op schema's alias annotations."""
    schema = getattr(target, "_schema", None)
    if schema is None:
        return {}
    by_set: dict[frozenset[str], Any] = {}
    for i, a in enumerate(schema.arguments):
        value = args[i] if i < len(args) else kwargs.get(a.name)
        if a.alias_info is not None and isinstance(value, torch.fx.Node):
            by_set[frozenset(a.alias_info.before_set)] = value
    out = {}
    for i, r in enumerate(schema.returns):
        if r.alias_info is not None and frozenset(r.alias_info.before_set) in by_set:
            out[i] = by_set[frozenset(r.alias_info.before_set)]
    return out


def graph_from_fx(gm: torch.fx.GraphModule, layout: StepLayout, *, name: str, batch: int | None,
                  device: str, by_storage: bool = True) -> Graph:
    """Turn the traced module into a Graph: storages, kernels, users, live ranges.

    Aliasing comes from the fake tensors' shared storages (`by_storage`). A real-mode trace
    records unrelated snapshots, so there the op schemas' alias annotations are used."""
    storage_of: dict[StorageWeakRef, int] = {}
    info: list[dict[str, Any]] = []  # per storage: name, nbytes, dtype, role, producer, users

    def storage_id(t: torch.Tensor, default_name: str, role: Role, producer: int | None) -> int:
        ref = StorageWeakRef(t.untyped_storage())
        sid = storage_of.get(ref)
        if sid is None:
            sid = storage_of[ref] = len(info)
            info.append({
                "name": default_name, "nbytes": int(t.untyped_storage().nbytes()),
                "dtype": str(t.dtype).removeprefix("torch."), "role": role,
                "producer": producer, "users": [],
            })
        return sid

    def meta(t: torch.Tensor, sid: int) -> TensorMeta:
        return TensorMeta(sid, tuple(int(s) for s in t.shape), tuple(int(s) for s in t.stride()),
                          int(t.storage_offset()), str(t.dtype).removeprefix("torch."))

    node_metas: dict[torch.fx.Node, list[TensorMeta | None]] = {}
    kernel_of_node: dict[str, int] = {}
    roles = layout.roles
    kernels: list[Kernel] = []
    placeholder_i = 0
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            pname, role = roles[placeholder_i]
            placeholder_i += 1
            t = node.meta["val"]
            node_metas[node] = [meta(t, storage_id(t, pname, role, None))]
        elif node.op == "get_attr":
            t = getattr(gm, node.target)
            node_metas[node] = [meta(t, storage_id(t, f"constant:{node.target}", Role.BUFFER, None))]
        elif node.op == "call_function" and node.target is operator.getitem:
            src, idx = node.args
            node_metas[node] = [node_metas[src][idx]]
        elif node.op == "call_function":
            index = len(kernels)
            in_nodes: list[torch.fx.Node] = []

            def slot(v: Any) -> int | None:
                if isinstance(v, torch.fx.Node) and node_metas.get(v, [None])[0] is not None:
                    in_nodes.append(v)
                    return len(in_nodes) - 1
                return None

            args = {"args": encode(list(node.args), slot), "kwargs": encode(dict(node.kwargs), slot)}
            inputs = tuple(node_metas[n][0] for n in in_nodes)
            in_storages = {m.storage for m in inputs}
            outs: list[TensorMeta | None] = []
            aliased = _schema_aliases(node.target, node.args, node.kwargs) if not by_storage else {}
            for i, v in enumerate(_vals(node)):
                if v is None:
                    outs.append(None)
                    continue
                if i in aliased and aliased[i] in node_metas:
                    base = node_metas[aliased[i]][0]
                    storage_of[StorageWeakRef(v.untyped_storage())] = base.storage
                sid = storage_id(v, f"{node.name}" + (f".{i}" if len(_vals(node)) > 1 else ""),
                                 Role.INTERMEDIATE, index)
                outs.append(meta(v, sid))
            node_metas[node] = outs
            written = _written_args(node.target)
            inplace = bool(written)
            out_metas = [m for m in outs if m is not None]
            out_storages = {m.storage for m in out_metas}
            view = not inplace and bool(out_storages) and out_storages <= in_storages
            kernels.append(Kernel(index, node.name, str(node.target), inputs, tuple(out_metas),
                                  args, view, inplace))
            kernel_of_node[node.name] = index
        elif node.op == "output":
            for v in _flat(node.args[0]):
                if isinstance(v, torch.fx.Node):
                    for m in node_metas.get(v, []):
                        if m is not None and info[m.storage]["role"] == Role.INTERMEDIATE:
                            info[m.storage]["role"] = Role.OUTPUT
        else:
            raise CaptureError(f"unexpected FX node {node.op} {node.target}")

    # Annotate the FX nodes (a pass in torch.fx style) so rewrites can find storages by node.
    for node, metas in node_metas.items():
        node.meta["autotm_storages"] = [m.storage if m is not None else None for m in metas]
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is not operator.getitem:
            node.meta["autotm_kernel"] = kernel_of_node[node.name]
    n = len(kernels)
    for k in kernels:
        if k.view:
            continue
        for sid in k.storages:
            users = info[sid]["users"]
            if info[sid]["producer"] != k.index and (not users or users[-1] != k.index):
                users.append(k.index)
    tensors = []
    for sid, d in enumerate(info):
        role: Role = d["role"]
        users = tuple(d["users"])
        if role.persistent:
            first, last = 0, max(n - 1, 0)
        elif role == Role.OUTPUT:
            first, last = d["producer"], max(n - 1, 0)
        else:
            first = d["producer"]
            last = max(users) if users else first
        tensors.append(Tensor(sid, d["name"], d["nbytes"], d["dtype"], role, d["producer"],
                              users, first, last))
    return Graph(name, batch, device, tuple(kernels), tuple(tensors), module=gm)


def _flat(x: Any) -> list[Any]:
    if isinstance(x, (list, tuple)):
        return [y for v in x for y in _flat(v)]
    return [x]


def capture(model: nn.Module, example_inputs: Sequence[torch.Tensor] | torch.Tensor,
            target: torch.Tensor | None = None, *, loss: str | LossFn = "cross_entropy",
            optimizer: str = "sgd", lr: float = 0.01, fake: bool = True,
            device: str | torch.device | None = None, momentum: float = 0.0,
            name: str | None = None, batch: int | None = None) -> Graph:
    """Trace one training step of `model` (forward, backward, optimizer update) at the aten
    level. With `fake=True` (default) no tensor memory is allocated; a model built on the
    meta device is traced as if on `device` (default cpu)."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if target is None and isinstance(loss, str):
        raise ValueError(f"loss {loss!r} needs a target; pass target= or a callable loss of the output alone")
    spec = StepSpec(loss=loss, optimizer=optimizer, lr=lr, momentum=momentum)
    optimizer_state_names(optimizer, momentum)  # validates the optimizer name
    loss_function(loss)
    start = time.perf_counter()
    gm, layout = trace_step(model, example_inputs, target, spec, fake=fake, device=device)
    dev = device or _model_device(model, example_inputs)
    dev = torch.device(dev)
    dev_name = "cpu" if dev.type == "meta" else dev.type
    if batch is None and example_inputs:
        batch = int(example_inputs[0].shape[0]) if example_inputs[0].dim() else None
    graph = graph_from_fx(gm, layout, name=name or type(model).__name__, batch=batch,
                          device=dev_name, by_storage=fake)
    return dataclasses.replace(graph, capture_seconds=time.perf_counter() - start)


def capture_function(fn: Callable[..., Any], *inputs: torch.Tensor, name: str = "function",
                     fake: bool = True) -> Graph:
    """Trace any function of tensors (not a training step) into a Graph; its arguments get
    role `input` and the storages it returns role `output`. Handy for inspecting liveness."""
    layout = StepLayout((), (), (), len(inputs), False)
    start = time.perf_counter()
    try:
        gm = make_fx(fn, tracing_mode="fake" if fake else "real")(*inputs)
    except Exception as exc:  # noqa: BLE001
        op = _failing_op(exc)
        raise CaptureError(f"the function could not be traced{f' at {op}' if op else ''}: {_reason(exc, op)}") from exc
    g = graph_from_fx(gm, layout, name=name, batch=None, by_storage=fake,
                      device=str(inputs[0].device.type) if inputs else "cpu")
    return dataclasses.replace(g, capture_seconds=time.perf_counter() - start)
