"""Capture, storage aliasing, liveness and fingerprints, checked against values worked out by hand."""

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from autotm_py.graph import Graph, Role, capture, capture_function
from autotm_py.graph import zoo


def _hand_function(x):
    a = x * 2              # k0: new storage s1
    b = a.view(16)         # k1: view of s1
    c = b + 1              # k2: new storage s2 (reads s1 through the view)
    c.relu_()              # k3: in place on s2
    d = a + c.view(4, 4)   # k4: view of s2; k5: new storage s3, reads s1 and s2
    return d * d           # k6: s3 used twice by one kernel; output s4


@pytest.fixture(scope="module")
def hand_graph() -> Graph:
    return capture_function(_hand_function, torch.randn(4, 4))


def test_hand_function_kernels_and_aliasing(hand_graph: Graph) -> None:
    ops = [k.op for k in hand_graph.kernels]
    assert ops == ["aten.mul.Tensor", "aten.view.default", "aten.add.Tensor", "aten.relu_.default",
                   "aten.view.default", "aten.add.Tensor", "aten.mul.Tensor"]
    assert [k.view for k in hand_graph.kernels] == [False, True, False, False, True, False, False]
    assert [k.inplace for k in hand_graph.kernels] == [False, False, False, True, False, False, False]
    # five storages: x, a (= b), c (= relu_ result = its view), d, d*d
    assert len(hand_graph.tensors) == 5
    assert [m.storage for m in hand_graph.kernels[1].outputs] == [1]
    assert [m.storage for m in hand_graph.kernels[3].outputs] == [2]
    assert [m.storage for m in hand_graph.kernels[6].inputs] == [3, 3]
    assert all(t.nbytes == 64 for t in hand_graph.tensors)


def test_hand_function_liveness(hand_graph: Graph) -> None:
    t = hand_graph.tensors
    assert [(x.producer, x.users, x.first, x.last) for x in t] == [
        (None, (0,), 0, 6),        # input: live for the whole step
        (0, (2, 5), 0, 5),         # a: the view at k1 is no use; k2 and k5 read it
        (2, (3, 5), 2, 5),         # c: written in place at k3, read at k5
        (5, (6,), 5, 6),           # d: used twice by k6, counted once
        (6, (), 6, 6),             # output
    ]
    assert [x.role for x in t] == [Role.INPUT, Role.INTERMEDIATE, Role.INTERMEDIATE,
                                   Role.INTERMEDIATE, Role.OUTPUT]
    assert list(hand_graph.live_sets()) == [
        {0, 1}, {0, 1}, {0, 1, 2}, {0, 1, 2}, {0, 1, 2}, {0, 1, 2, 3}, {0, 3, 4}]
    assert [hand_graph.live_set(i) for i in range(7)] == list(hand_graph.live_sets())
    assert hand_graph.live_bytes.tolist() == [128, 128, 192, 192, 192, 256, 192]
    assert hand_graph.peak_live_bytes == 256 and hand_graph.peak_kernel == 5
    assert hand_graph.io_bytes == 128


def test_produced_but_never_read_lives_at_its_producer() -> None:
    def f(x):
        torch.exp(x)  # result dropped
        return x + 1

    g = capture_function(f, torch.randn(8))
    dropped = g.tensors[1]
    assert (dropped.first, dropped.last, dropped.users) == (0, 0, ())
    assert g.live_bytes.tolist() == [64, 64]


def _mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), torch.randn(2, 8), torch.zeros(2, dtype=torch.long)


def test_training_step_state_aliasing_and_roles() -> None:
    net, x, y = _mlp()
    g = capture(net, (x,), y)
    by_name = {t.name: t for t in g.tensors}
    params = [t for t in g.tensors if t.role == Role.PARAMETER]
    assert [t.name for t in params] == ["param:0.weight", "param:0.bias", "param:2.weight", "param:2.bias"]
    assert [t.nbytes for t in params] == [8 * 16 * 4, 16 * 4, 16 * 4 * 4, 4 * 4]
    # SGD updates each parameter in place: the update kernel writes the parameter's own storage
    updates = [k for k in g.kernels if k.op == "aten.add_.Tensor"]
    assert [k.outputs[0].storage for k in updates] == [p.id for p in params]
    # transposed weights are views of the weight storage, not new tensors
    t_kernels = [k for k in g.kernels if k.op == "aten.t.default"]
    assert t_kernels and all(k.view and k.outputs[0].storage == k.inputs[0].storage for k in t_kernels)
    assert by_name["input:0"].role == Role.INPUT and by_name["target"].role == Role.INPUT
    outputs = [t for t in g.tensors if t.role == Role.OUTPUT]
    assert len(outputs) == 1 and outputs[0].nbytes == 4  # the scalar loss
    last = len(g.kernels) - 1
    for t in g.tensors:
        if t.role.persistent:
            assert (t.first, t.last) == (0, last)
    # peak covers state: parameters are counted, never zeroed
    assert g.peak_live_bytes >= sum(p.nbytes for p in params)


def test_adam_and_momentum_state_is_counted() -> None:
    net, x, y = _mlp()
    param_bytes = sum(p.numel() * 4 for p in net.parameters())
    adam = capture(net, (x,), y, optimizer="adam")
    assert adam.bytes_by_role()["optimizer_state"] == 2 * param_bytes + 4  # exp_avg, exp_avg_sq, step
    sgd_m = capture(net, (x,), y, momentum=0.9)
    assert sgd_m.bytes_by_role()["optimizer_state"] == param_bytes
    plain = capture(net, (x,), y)
    assert plain.bytes_by_role()["optimizer_state"] == 0


def test_real_trace_equals_fake_trace() -> None:
    net, x, y = _mlp()
    assert capture(net, (x,), y, fake=False).fingerprint == capture(net, (x,), y).fingerprint


def test_json_round_trip() -> None:
    net, x, y = _mlp()
    g = capture(net, (x,), y)
    back = Graph.from_json(json.loads(json.dumps(g.to_json())))
    assert back == g and back.fingerprint == g.fingerprint
    assert back.live_bytes.tolist() == g.live_bytes.tolist()
    bad = g.to_json() | {"schema": 99}
    with pytest.raises(ValueError, match="schema"):
        Graph.from_json(bad)


def test_fingerprint_stable_across_processes() -> None:
    code = ("from autotm_py.cli.common import capture_workload;"
            "print(capture_workload('resnet50', 2).fingerprint)")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    from autotm_py.cli.common import capture_workload

    here = capture_workload("resnet50", 2)
    assert other.stdout.strip() == here.fingerprint
    assert capture_workload("resnet50", 3).fingerprint != here.fingerprint


@pytest.mark.parametrize("name", zoo.names())
def test_every_zoo_model_captures(name: str) -> None:
    entry = zoo.get(name)
    model, inputs, target = zoo.workload(name, entry.small_batch)
    g = capture(model, inputs, target, lr=entry.lr, name=name, batch=entry.small_batch)
    state = sum(p.numel() * p.element_size() for p in model.parameters())
    roles = g.bytes_by_role()
    assert roles["parameter"] == state
    assert g.peak_live_bytes > state  # gradients and activations on top of the weights
    ops = {k.op for k in g.kernels}
    assert "aten.add_.Tensor" in ops  # the SGD update is in the graph
    # storages are consistent: every kernel's storages exist and lie within their live range
    for k in g.kernels:
        for sid in k.storages:
            t = g.tensors[sid]
            assert t.first <= k.index <= t.last


def test_bytes_scale_with_batch() -> None:
    from autotm_py.cli.common import capture_workload

    small, big = capture_workload("vgg19", 2), capture_workload("vgg19", 4)
    inter = lambda g: g.bytes_by_role()["intermediate"]  # noqa: E731
    # activations double with the batch; weight-sized gradients do not
    grads = sum(t.nbytes for t in small.tensors if t.role == Role.INTERMEDIATE) - 0
    assert inter(big) > inter(small)
    assert big.bytes_by_role()["parameter"] == small.bytes_by_role()["parameter"]
    assert big.io_bytes == 2 * small.io_bytes - 4  # inputs and targets double; the loss does not
    assert grads > 0


@pytest.mark.parametrize("name", ["resnet50", "transformer"])
def test_captured_step_replays_the_eager_step_bitwise(name: str) -> None:
    """Running the captured aten graph on real tensors is the eager SGD step, bit for bit
    (BatchNorm statistics and dropout included)."""
    import copy

    from autotm_py.graph.capture import StepSpec, initial_state, step_arguments

    entry = zoo.get(name)
    model, inputs, target = zoo.workload(name, 2, device="cpu")
    reference = copy.deepcopy(model)
    g = capture(model, inputs, target, lr=entry.lr)
    flat = step_arguments(model, initial_state(StepSpec(lr=entry.lr), list(model.parameters())), inputs, target)
    torch.manual_seed(1)
    with torch.no_grad():
        loss = g.module(*flat)[0]
    torch.manual_seed(1)
    opt = torch.optim.SGD(reference.parameters(), lr=entry.lr)
    out = reference(*inputs)
    eager_loss = torch.nn.functional.cross_entropy(out.flatten(0, -2), target.flatten()) if out.dim() > 2 \
        else torch.nn.functional.cross_entropy(out, target)
    eager_loss.backward()
    opt.step()
    assert torch.equal(loss, eager_loss.detach())
    for (pname, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), pname
    for (bname, b), c in zip(model.named_buffers(), reference.buffers()):
        assert torch.equal(b, c), bname
