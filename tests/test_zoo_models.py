"""Tests of the model zoo (autotm_py.graph.zoo): sizes, shapes, registry, user workloads."""

from __future__ import annotations

import dataclasses
import textwrap

import pytest
import torch

from autotm_py.graph import zoo

# published parameter counts with 1000 classes
EXPECTED_PARAMS = {
    "vgg19": 143.7e6,
    "resnet50": 25.6e6,
    "resnet152": 60.2e6,
    "densenet201": 20.0e6,
    "resnet200": 64.7e6,
    "inception_v4": 42.7e6,
    "densenet264": 33.3e6,
}

# too slow to run for real on a CI CPU: forward on meta (shapes only)
META_FORWARD = {"vgg416"}


def _numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_parameter_count(name: str) -> None:
    with torch.device("meta"):
        model = zoo.get(name).build()
    assert _numel(model) == pytest.approx(EXPECTED_PARAMS[name], rel=0.02)


def test_vgg416_depth() -> None:
    with torch.device("meta"):
        model = zoo.get("vgg416").build()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert (len(convs), len(linears)) == (409, 3)


@pytest.mark.parametrize("name", zoo.names())
def test_forward_shape(name: str) -> None:
    entry = zoo.get(name)
    device = "meta" if name in META_FORWARD else "cpu"
    batch = entry.small_batch
    model, inputs, target = zoo.workload(name, batch, device=device)
    assert len(inputs) == 1
    x = inputs[0]
    assert x.shape == (batch, *entry.sample_shape) and x.dtype == entry.input_dtype
    assert x.device.type == device and target.device.type == device
    assert target.dtype == torch.int64
    model.eval()
    with torch.no_grad():
        out = model(x)
    if entry.is_tokens:
        assert target.shape == x.shape
        assert out.shape == (batch, *entry.sample_shape, entry.num_classes)
    else:
        assert target.shape == (batch,)
        assert out.shape == (batch, entry.num_classes)
    if device != "meta":
        assert torch.isfinite(out).all()
        assert int(target.min()) >= 0 and int(target.max()) < entry.num_classes
        if entry.is_tokens:
            assert int(x.min()) >= 0 and int(x.max()) < entry.num_classes


def test_meta_workload_is_paper_sized_and_free() -> None:
    model, (x,), target = zoo.workload("inception_v4", 6144)
    assert x.is_meta and target.is_meta
    assert all(p.is_meta for p in model.parameters())
    assert model(x).shape == (6144, 1000)


def test_transformer_backward() -> None:
    model, (x,), target = zoo.workload("transformer", 1, device="cpu")
    logits = model(x[:, :16])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target[:, :16].flatten())
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_transformer_is_causal() -> None:
    model, (x,), _ = zoo.workload("transformer", 1, device="cpu")
    model.eval()
    y = x[:, :12].clone()
    y[0, -1] = (int(y[0, -1]) + 1) % 20000
    with torch.no_grad():
        a, b = model(x[:, :12]), model(y)
    assert torch.allclose(a[:, :-1], b[:, :-1], atol=1e-5)
    assert not torch.allclose(a[:, -1], b[:, -1])


def test_workload_is_reproducible() -> None:
    rng = torch.random.get_rng_state()
    m1, (x1,), t1 = zoo.workload("resnet50", 2, device="cpu", seed=7)
    m2, (x2,), t2 = zoo.workload("resnet50", 2, device="cpu", seed=7)
    _, (x3,), _ = zoo.workload("resnet50", 2, device="cpu", seed=8)
    assert torch.equal(x1, x2) and torch.equal(t1, t2) and not torch.equal(x1, x3)
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    assert torch.equal(rng, torch.random.get_rng_state())  # global RNG untouched


def test_registry_entries() -> None:
    assert zoo.names() == [
        "vgg19", "vgg416", "resnet50", "resnet152", "resnet200", "inception_v4", "densenet264",
        "densenet201", "transformer"
    ]
    lrs = {n: zoo.get(n).lr for n in zoo.names()}
    assert lrs == {
        "vgg19": 0.05, "vgg416": 0.05, "resnet50": 0.001, "resnet152": 0.001, "resnet200": 0.001,
        "inception_v4": 0.05, "densenet264": 0.001, "densenet201": 0.001, "transformer": 0.001,
    }
    assert zoo.zoo_set("peers") == [("vgg19", 256), ("vgg19", 1024), ("resnet152", 256), ("densenet201", 128)]
    tr = zoo.get("transformer")
    assert (tr.sample_shape, tr.input_dtype, tr.num_classes) == ((150,), torch.int64, 20000)
    assert zoo.get("inception_v4").sample_shape == (3, 299, 299)
    assert all(zoo.get(n).small_batch in (1, 2) for n in zoo.names())
    assert "ours" in zoo.get("resnet50").description
    entry = zoo.get("vgg19")
    with pytest.raises(dataclasses.FrozenInstanceError):
        entry.lr = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        entry.sets["test"] = (1,)  # type: ignore[index]


def test_unknown_model() -> None:
    with pytest.raises(zoo.UnknownModelError) as info:
        zoo.get("nope")
    assert isinstance(info.value, KeyError)
    assert "vgg19" in str(info.value) and "nope" in str(info.value)
    with pytest.raises(KeyError):
        zoo.workload("nope", 1)


@pytest.mark.parametrize("batch", [0, -3])
def test_bad_batch(batch: int) -> None:
    with pytest.raises(ValueError, match="batch"):
        zoo.workload("vgg19", batch)


def test_sets() -> None:
    assert zoo.SET_NAMES == ("test", "conventional", "large", "gpu")
    assert sorted(zoo.zoo_set("conventional")) == sorted(
        [("inception_v4", 1024), ("resnet200", 512), ("vgg19", 2048),
         ("densenet264", 512), ("transformer", 512)]
    )
    assert sorted(zoo.zoo_set("large")) == sorted(
        [("inception_v4", 6144), ("vgg416", 320), ("resnet200", 2560), ("densenet264", 3072)]
    )
    assert sorted(zoo.zoo_set("test")) == [("resnet50", 8), ("vgg19", 16)]
    gpu = zoo.zoo_set("gpu")
    assert sorted(b for n, b in gpu if n == "inception_v4") == [64, 128, 256]
    assert sorted(b for n, b in gpu if n == "vgg19") == [64, 128]
    assert ("resnet50", 64) in gpu and len(gpu) == 12
    with pytest.raises(ValueError, match="conventional"):
        zoo.zoo_set("huge")


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("nomodule:fn", "nomodule"),
        ("os:nofn", "nofn"),
        ("badspec", "malformed"),
        ("a:b:c", "malformed"),
        (":fn", "malformed"),
    ],
)
def test_user_workload_errors(spec: str, needle: str) -> None:
    with pytest.raises(zoo.UserWorkloadError, match=needle) as info:
        zoo.load_user_workload(spec, None)
    assert isinstance(info.value, ValueError)


def test_user_workload(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_zoo_wl.py").write_text(
        textwrap.dedent(
            """
            import torch

            def with_batch(batch=3):
                model = torch.nn.Linear(4, 2)
                return model, torch.zeros(batch, 4), torch.zeros(batch, dtype=torch.long)

            def no_batch():
                return torch.nn.Linear(4, 2), (torch.zeros(5, 4),), torch.zeros(5)

            def bad():
                return torch.nn.Linear(4, 2), torch.zeros(5, 4)

            def bad_model():
                return 1, torch.zeros(5, 4), torch.zeros(5)
            """
        )
    )
    (tmp_path / "my_zoo_broken.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model, inputs, target = zoo.load_user_workload("my_zoo_wl:with_batch", 6)
    assert isinstance(inputs, tuple) and inputs[0].shape == (6, 4) and target.shape == (6,)
    _, inputs, _ = zoo.load_user_workload("my_zoo_wl:with_batch", None)
    assert inputs[0].shape == (3, 4)
    _, inputs, _ = zoo.load_user_workload("my_zoo_wl:no_batch", 6)
    assert inputs[0].shape == (5, 4)
    with pytest.raises(zoo.UserWorkloadError, match="3-tuple"):
        zoo.load_user_workload("my_zoo_wl:bad", None)
    with pytest.raises(zoo.UserWorkloadError, match="nn.Module"):
        zoo.load_user_workload("my_zoo_wl:bad_model", None)
    with pytest.raises(zoo.UserWorkloadError, match="boom"):
        zoo.load_user_workload("my_zoo_broken:fn", None)
