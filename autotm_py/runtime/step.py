"""`compile(plan, model)`: a callable training step that runs the plan.

The step is captured from the model on the first call (fake tensors: nothing allocated),
checked against the plan's graph fingerprint, rewritten with the plan's moves and then run
on the model's own parameters, buffers and optimizer state, which it updates in place.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import fx, nn

from ..graph.capture import StepSpec, capture, initial_state, optimizer_state_names, step_arguments
from ..graph.types import Graph
from ..optimizer.plan import Plan
from .movers import CpuMover, CudaMover, Mover, SlowArena
from .rewrite import RewriteStats, insert_moves


# Calls in which cuDNN (in benchmark mode) may search algorithms. The first chooses under
# that call's memory; where a choice's workspace cannot be had in the next (the plan's
# steady state), the second searches again among the algorithms that fit there, and picks
# fast small-workspace ones. Without that second search, cuDNN's heuristic fallback takes
# the first algorithm that fits, often a legacy engine several times slower.
SEARCH_STEPS = 2


class RunError(RuntimeError):
    """The planned step cannot run; the message is one sentence for the user."""


def make_library_workspaces(device: torch.device) -> None:
    """Have cuBLAS and cuBLASLt make the workspaces they keep per stream for the process's
    life, for the current stream, now. Made by a step's first matrix product they lie wherever
    the lowest gap was then (in VGG19's forward under a full cap, high up), a block no later
    step can use or move (in a planned arena of 14.85 GiB, every layout of VGG19's asynchronous
    step had to go around a 32 MiB one at 14.06 GiB). Profiling clears them (it releases what
    its CUDA-graph warm-ups left), so the step makes them again before its first call."""
    if device.type != "cuda":
        return
    a = torch.ones(64, 64, device=device)
    torch.nn.functional.linear(a, a, a[0])  # addmm with a bias: cuBLASLt
    torch.mm(a, a)  # cuBLAS; the workspaces are taken at launch, so nothing waits here


def spec_from_optimizer(optimizer: torch.optim.Optimizer | None, lr: float | None,
                        loss: Any) -> StepSpec:
    if optimizer is None:
        return StepSpec(loss=loss, optimizer="sgd", lr=0.01 if lr is None else lr)
    if len(optimizer.param_groups) != 1:
        raise RunError("autotm steps support one parameter group per optimizer")
    g = optimizer.param_groups[0]
    if isinstance(optimizer, torch.optim.SGD):
        if g.get("nesterov") or g.get("dampening") or g.get("weight_decay"):
            raise RunError("autotm steps support plain SGD with momentum (no nesterov, dampening or weight decay)")
        return StepSpec(loss=loss, optimizer="sgd", lr=g["lr"], momentum=g.get("momentum", 0.0))
    if isinstance(optimizer, torch.optim.Adam):
        if g.get("weight_decay") or g.get("amsgrad"):
            raise RunError("autotm steps support Adam without weight decay or amsgrad")
        return StepSpec(loss=loss, optimizer="adam", lr=g["lr"], betas=tuple(g["betas"]), eps=g["eps"])
    raise RunError(f"optimizer {type(optimizer).__name__} is not supported; use torch.optim.SGD or Adam")


def _slow_bytes(graph: Graph, plan: Plan) -> int:
    """Upper bound of slow-tier bytes one step writes: each storage copied to slow at most
    once per planned write or birth, plus unplanned copies (bounded by the storage size)."""
    total = 0
    for tp in plan.tensors:
        if tp.initial == "slow" or any(a == "slow" or d == "slow" for _, d, a in tp.segments):
            total += 2 * graph.tensors[tp.storage].nbytes + 64
    return total + (1 << 20)


@dataclass
class PlannedStep:
    """One training step that runs a plan; call it with (inputs, target)."""

    plan: Plan
    model: nn.Module
    spec: StepSpec
    optimizer: torch.optim.Optimizer | None = None
    slow_tier: str | None = None
    search_steps: int = SEARCH_STEPS
    choose_algorithms: bool = False  # CUDA: runtime.algorithms.choose_algorithms before the first call
    passes: tuple[Callable[[Any], Any], ...] = ()  # fx passes on the rewritten step, in order
    graph: Graph | None = None
    rewrite: RewriteStats | None = None
    _module: Any = field(default=None, repr=False)
    _mover: Mover | None = field(default=None, repr=False)
    _state: list[torch.Tensor] = field(default_factory=list, repr=False)
    _calls: int = field(default=0, repr=False)

    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def _params(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def prepare(self, inputs: Sequence[torch.Tensor], target: torch.Tensor | None) -> None:
        """Capture, check the fingerprint, rewrite, allocate the slow tier."""
        dev = self.device
        if self.plan.device == "cuda" and dev.type != "cuda":
            raise RunError("the plan is for CUDA but the model is not on a CUDA device")
        if self.plan.device == "cpu" and dev.type != "cpu":
            raise RunError(f"the plan is for the CPU but the model is on {dev}")
        graph = capture(self.model, tuple(inputs), target, loss=self.spec.loss, optimizer=self.spec.optimizer,
                        lr=self.spec.lr, momentum=self.spec.momentum, fake=True, device=dev,
                        name=self.plan.graph_name, batch=int(inputs[0].shape[0]) if inputs else None)
        if graph.fingerprint != self.plan.graph_fingerprint:
            raise RunError(
                f"the plan was made for another graph (fingerprint {self.plan.graph_fingerprint}), "
                f"not for this model, batch, loss and optimizer (fingerprint {graph.fingerprint}); "
                "optimize this workload again")
        if dev.type == "cuda":
            make_library_workspaces(dev)
            if self.choose_algorithms:
                from .algorithms import choose_algorithms

                choose_algorithms(graph, self.plan, dev)
            mover: Mover = CudaMover(dev)
        else:
            from ..profiler.tiers import open_slow_tier

            tier = open_slow_tier(self.slow_tier or "model")
            mover = CpuMover(SlowArena(tier, _slow_bytes(graph, self.plan)))
        module, stats = insert_moves(graph.module, graph, self.plan, mover)
        for apply in self.passes:
            module = apply(module)
        self.graph, self._module, self._mover, self.rewrite = graph, module, mover, stats
        self._state = self._optimizer_state()

    def _optimizer_state(self) -> list[torch.Tensor]:
        """The optimizer's state tensors in the captured order, created (zeros) if missing
        and shared with `self.optimizer` so both see the same values."""
        params = self._params()
        names = optimizer_state_names(self.spec.optimizer, self.spec.momentum)
        fresh = initial_state(self.spec, params)
        if self.optimizer is None:
            return fresh
        out: list[torch.Tensor] = []
        i = 0
        for p in params:
            st = self.optimizer.state[p]
            for name in names:
                if name not in st or st[name] is None:
                    st[name] = fresh[i]
                out.append(st[name])
                i += 1
        if self.spec.optimizer == "adam":
            first = self.optimizer.state[params[0]] if params else {}
            step = first.get("step")
            if not isinstance(step, torch.Tensor):
                step = torch.tensor(float(step or 0.0), dtype=torch.float32, device=fresh[-1].device)
            step = step.to(device=fresh[-1].device, dtype=torch.float32)
            for p in params:
                self.optimizer.state[p]["step"] = step
            out.append(step)
        return out

    def _begin(self, inputs: Sequence[torch.Tensor] | torch.Tensor, target: torch.Tensor | None) -> list:
        """The step's flat arguments; prepares on the first call and opens the mover's step."""
        if isinstance(inputs, torch.Tensor):
            inputs = (inputs,)
        if self._module is None:
            self.prepare(inputs, target)
        assert self._mover is not None
        flat = step_arguments(self.model, self._state, inputs, target)
        self._mover.begin_step()
        return flat

    def _run(self, inputs: Sequence[torch.Tensor] | torch.Tensor, target: torch.Tensor | None,
             run: Callable[[list], Any]) -> torch.Tensor:
        flat = self._begin(inputs, target)
        with torch.no_grad(), _algorithms_kept(self._calls >= self.search_steps and self.device.type == "cuda"):
            (loss,) = run(flat)
        self._calls += 1
        return loss

    def __call__(self, inputs: Sequence[torch.Tensor] | torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """Run one training step with the plan; returns the loss (a 0-d tensor)."""
        return self._run(inputs, target, lambda flat: self._module(*flat))

    def run_interpreted(self, inputs: Sequence[torch.Tensor] | torch.Tensor, target: torch.Tensor | None,
                        make: Callable[[Any], Any]) -> torch.Tensor:
        """Run one step through the fx.Interpreter `make(module)` returns (to observe each node
        as it runs, as the memory trace does); otherwise like calling the step."""
        return self._run(inputs, target, lambda flat: make(self._module).run(*flat))

    def run_probing_fast(self, inputs: Sequence[torch.Tensor] | torch.Tensor,
                         target: torch.Tensor | None) -> tuple[torch.Tensor, dict[int, int]]:
        """Run one training step (it updates the parameters, as a call does) through
        FastBytesProbe; returns the loss and, per kernel index, the fast-memory bytes the
        step's tensors held while that kernel ran."""
        box: list[FastBytesProbe] = []

        def make(gm: Any) -> FastBytesProbe:
            assert self._mover is not None
            box.append(FastBytesProbe(gm, self._mover))
            return box[0]

        loss = self.run_interpreted(inputs, target, make)
        return loss, box[0].at_kernel

    @property
    def move_stats(self):
        return self._mover.stats if self._mover is not None else None

    def close(self) -> None:
        if isinstance(self._mover, CpuMover):
            self._mover.arena.close()


class StepInterpreter(fx.Interpreter):
    """An fx.Interpreter that frees values when the step's generated code does. Both free a
    value after its last user, but a value no node uses the generated code frees at once,
    where fx.Interpreter keeps it to the end of the run. A rewritten step has many (a view
    of a storage whose readers now read another version): kept, each holds its whole storage,
    and a probe measures memory the step never holds (on CPU, up to 46 MiB more than the plan
    of ResNet-50 batch 2 at half its peak, where the generated code holds exactly the plan).
    `free_unused=False` keeps fx.Interpreter's behaviour (to show the difference)."""

    def __init__(self, gm: fx.GraphModule, free_unused: bool = True) -> None:
        super().__init__(gm)
        if not free_unused:
            return
        for n in self.graph.nodes:
            if not n.users and n.op not in ("placeholder", "output"):
                self.user_to_last_uses.setdefault(n, []).append(n)


class FastBytesProbe(StepInterpreter):
    """Runs a rewritten step node by node and records, at each kernel, the bytes of the
    distinct fast-memory storages alive: the kernel's arguments and results, every other
    value the step still holds, the step's own arguments (parameters, optimizer state,
    inputs) and both ends of copies in flight. That is what a plan's `fast_bytes` counts,
    read off the tensors themselves: on CPU no allocator tells the fast tier's bytes apart."""

    def __init__(self, gm: fx.GraphModule, mover: Mover, free_unused: bool = True) -> None:
        super().__init__(gm, free_unused)
        self.mover = mover
        self.at_kernel: dict[int, int] = {}  # kernel index -> fast bytes live while it ran
        self._args: tuple = ()

    def run(self, *args: Any, **kwargs: Any) -> Any:
        self._args = args
        return super().run(*args, **kwargs)

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        k = n.meta.get("autotm_kernel") if n.op == "call_function" else None
        if k is not None:
            self.at_kernel[k] = max(self.at_kernel.get(k, 0), self._live(out))
        return out

    def _live(self, out: Any) -> int:
        seen: dict[int, int] = {}
        todo = [list(self.env.values()), out, self._args, self.mover.in_flight()]
        while todo:
            v = todo.pop()
            if isinstance(v, torch.Tensor):
                st = v.untyped_storage()
                if st.nbytes() and self.mover.holds_fast(st):
                    seen[st.data_ptr()] = st.nbytes()
            elif isinstance(v, (list, tuple)):
                todo.extend(v)
        return sum(seen.values())


def run_with_probe(step: PlannedStep, inputs: Sequence[torch.Tensor] | torch.Tensor,
                   target: torch.Tensor | None, factory: Callable[[Any], Any],
                   catch: tuple[type[BaseException], ...] = ()) -> tuple[Any, BaseException | None]:
    """Run one planned CUDA step through the fx.Interpreter `factory(module)` builds (a probe
    that observes each node) and return that probe with the exception of type `catch` that
    ended the step early, if one did."""
    box: list[Any] = []

    def make(gm: Any) -> Any:
        box.append(factory(gm))
        return box[0]

    err = None
    try:
        step.run_interpreted(inputs, target, make)
        torch.cuda.synchronize()
    except catch as exc:
        err = exc
    if not box:
        raise RunError("the planned step did not start")
    return box[0], err


@contextlib.contextmanager
def _algorithms_kept(active: bool) -> Iterator[None]:
    """cuDNN benchmark mode off for the duration (when `active`): the step keeps the
    algorithms its first run chose. Where a cached algorithm's workspace cannot be allocated
    under the plan's memory, benchmark mode would time every candidate algorithm again inside
    the step, each time it happens (kernels the plan does not count, and a synchronizing
    allocator retry for each candidate); the heuristic fallback takes one at once."""
    if not active or not torch.backends.cudnn.benchmark:
        yield
        return
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = True


def compile(plan: Plan, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
            lr: float | None = None, loss: str | Callable[..., torch.Tensor] = "cross_entropy",
            slow_tier: str | None = None, search_steps: int = SEARCH_STEPS,
            passes: Sequence[Callable[[Any], Any]] = (), choose_algorithms: bool = False) -> PlannedStep:
    """A training step for `model` that runs `plan`. `optimizer` (torch.optim.SGD or Adam)
    gives the update rule and keeps its state; without one, SGD with `lr`. On CUDA with
    `torch.backends.cudnn.benchmark` on, the first `search_steps` calls let cuDNN search
    algorithms; later calls keep them. `passes`: fx passes (GraphModule -> GraphModule) run
    on the step once its moves are inserted, such as runtime.arena.bound_workspaces.
    `choose_algorithms`: on CUDA, before the first call, each convolution's cuDNN algorithm
    is chosen with the device free and, where it takes more workspace than the plan leaves
    it, again within that room (runtime.algorithms)."""
    return PlannedStep(plan, model, spec_from_optimizer(optimizer, lr, loss), optimizer, slow_tier,
                       search_steps, choose_algorithms, tuple(passes))


def unplanned_step(model: nn.Module, spec: StepSpec, inputs: Sequence[torch.Tensor],
                   target: torch.Tensor | None) -> Callable[[], torch.Tensor]:
    """The captured step without a plan (everything in fast memory), for comparisons."""
    graph = capture(model, tuple(inputs), target, loss=spec.loss, optimizer=spec.optimizer, lr=spec.lr,
                    momentum=spec.momentum, fake=True, device=next(model.parameters()).device)
    params = [p for p in model.parameters() if p.requires_grad]
    state = initial_state(spec, params)
    gm = graph.module

    def run() -> torch.Tensor:
        flat = step_arguments(model, state, inputs, target)
        with torch.no_grad():
            return gm(*flat)[0]

    return run


def time_steps(fn: Callable[[], Any], steps: int, device: torch.device, warmup: int = 1) -> list[float]:
    """Wall time of each of `steps` calls after `warmup` calls (CUDA synchronised)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return times


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")
