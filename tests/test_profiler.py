"""Tests of the kernel profiler: signatures and dedup, IO configurations, the modeled tier,
replay failures, slow-tier backends and the `autotm profile` command."""

from __future__ import annotations

import ctypes.util
import dataclasses
import itertools
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from autotm_py.graph import capture, kernel_signature
from autotm_py.profiler import (OptaneModel, PRUNE_ABOVE, TierError, TimingPolicy, device_fingerprint,
                                kernel_masks, open_slow_tier, profile, profile_signature)
from autotm_py.profiler.harness import out_variant, resolve_op, time_kernel
from autotm_py.profiler.model import storage_bytes

FAST_POLICY = TimingPolicy(warmup=1, min_runs=2, min_seconds=0.0, max_runs=2)
SIZES = (1 << 20,)


def _run(graph, tmp_path: Path, **kw):
    kw.setdefault("cache", tmp_path / "c.sqlite")
    return profile(graph, progress=False, policy=FAST_POLICY, bandwidth_sizes=SIZES, **kw)


@pytest.fixture(scope="module")
def twin_conv_graph():
    """Two identical convolutions (3x3, padding 1) and a classifier."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(4 * 8 * 8, 5))
    return capture(net, (torch.randn(2, 4, 8, 8),), torch.zeros(2, dtype=torch.long))


class Cat7(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return torch.cat([torch.relu(h + i) for i in range(7)], dim=1)


# ---- signatures and dedup ------------------------------------------------------------------
def _convs(graph):
    return [k for k in graph.kernels if k.op == "aten.convolution.default"]


def test_convolutions_differing_only_in_padding_are_two_kernels(twin_conv_graph):
    conv = _convs(twin_conv_graph)[0]
    args = conv.args["args"]
    assert args[4] == [1, 1]  # padding
    other = dataclasses.replace(conv, args={"args": [*args[:4], [0, 0], *args[5:]], "kwargs": conv.args["kwargs"]})
    assert kernel_signature(conv) != kernel_signature(other)
    assert profile_signature(conv) != profile_signature(other)
    strided = dataclasses.replace(conv, args={"args": [*args[:3], [2, 2], *args[4:]], "kwargs": {}})
    assert len({profile_signature(k) for k in (conv, other, strided)}) == 3


def test_identical_kernels_are_measured_once(twin_conv_graph, tmp_path):
    g = twin_conv_graph
    fwd = _convs(g)
    assert len(fwd) == 2 and profile_signature(fwd[0]) == profile_signature(fwd[1])
    p = _run(g, tmp_path)
    unique = len({profile_signature(k) for k in g.compute_kernels})
    assert unique < len(g.compute_kernels)
    assert p.stats["unique_kernels"] == unique
    assert p.stats["configs_measured"] == unique  # model tier: the all-fast call only
    assert p.time(fwd[0].index) == p.time(fwd[1].index)
    assert p.stats["failed"] == []


def test_aliasing_is_part_of_the_signature(twin_conv_graph):
    add = next(k for k in twin_conv_graph.kernels if k.op == "aten.add_.Tensor")
    m0, m1 = add.inputs[0], add.inputs[1]
    same = dataclasses.replace(add, inputs=(m0, dataclasses.replace(m1, storage=m0.storage)))
    if m0.shape == m1.shape and m0.stride == m1.stride:
        assert kernel_signature(same) == kernel_signature(add)
    assert profile_signature(same) != profile_signature(add)


# ---- IO configurations ----------------------------------------------------------------------
def test_masks_vary_only_non_fixed_storages(twin_conv_graph):
    g = twin_conv_graph
    conv = _convs(g)[0]  # input (fixed), weight, bias (fixed), output (free)
    free = [j for j, s in enumerate(conv.storages) if not g.tensors[s].fixed]
    assert kernel_masks(g, conv) == tuple(sorted(sum(1 << free[i] for i in range(len(free)) if b >> i & 1)
                                                 for b in range(1 << len(free))))
    for k in g.kernels:
        masks = kernel_masks(g, k)
        assert masks[0] == 0
        k_free = [j for j, s in enumerate(k.storages) if not g.tensors[s].fixed]
        assert len(masks) == 2 ** len(k_free)
        for m in masks:
            assert all(not (m >> j & 1) or j in k_free for j in range(len(k.storages)))


def test_pruning_above_six_free_tensors():
    g = capture(Cat7(), (torch.randn(3, 4),), torch.zeros(3, dtype=torch.long))
    cat = next(k for k in g.kernels if k.op == "aten.cat.default")
    free = [j for j, s in enumerate(cat.storages) if not g.tensors[s].fixed]
    assert len(free) == 8 > PRUNE_ABOVE  # seven inputs and the output
    masks = kernel_masks(g, cat)
    every = sum(1 << j for j in free)
    assert set(masks) == {0, every, *(1 << j for j in free)}
    assert len(masks) == len(free) + 2


# ---- the modeled tier -----------------------------------------------------------------------
def test_modeled_tier_never_makes_a_kernel_faster(twin_conv_graph, tmp_path):
    g = twin_conv_graph
    p = _run(g, tmp_path)
    assert p.modeled and p.slow_tier == "model" and p.bandwidths.modeled
    checked = 0
    for cost in p.kernels:
        k = g.kernels[cost.kernel]
        assert cost.storages == k.storages
        for a, b in itertools.product(cost.masks, repeat=2):
            if a & b == a:  # b puts a superset of a's storages in the slow tier
                assert cost.time(b) >= cost.time(a)
                checked += 1
        if not k.view:
            assert cost.time(0) > 0
            reads, writes = storage_bytes(k)
            for m in cost.masks:
                if m and any((reads[j] or writes[j]) for j in range(len(k.storages)) if m >> j & 1):
                    assert cost.time(m) > cost.time(0)
                    assert cost.modeled
    assert checked > 50


def test_optane_model_monotone_in_bytes():
    m = OptaneModel()
    assert m.read_bw == pytest.approx(39.6e9) and m.write_bw == pytest.approx(13.8e9)
    prev = 0.0
    for r, w in [(0, 0), (1 << 20, 0), (1 << 20, 1 << 10), (1 << 24, 1 << 20), (1 << 30, 1 << 30)]:
        e = m.extra_seconds(r, w)
        assert e >= prev
        prev = e
    # a 1 GiB write to PMM costs about 1 GiB / 13.8 GB/s minus the DRAM time
    assert m.extra_seconds(0, 1 << 30) == pytest.approx((1 << 30) * (1 / 13.8e9 - 1 / 105e9))


def test_modeled_bandwidths_capped_by_pmm(twin_conv_graph, tmp_path):
    p = _run(twin_conv_graph, tmp_path)
    bw = p.bandwidths
    assert bw.sizes == SIZES
    assert all(0 < x <= 39.6e9 for x in bw.read_sync + bw.read_async)
    assert all(0 < x <= 13.8e9 for x in bw.write_sync + bw.write_async)
    assert bw.async_compute_slowdown >= 1.0


# ---- replay ---------------------------------------------------------------------------------
def test_out_variant_found_for_common_ops():
    for name, outs in (("aten.convolution.default", ("out",)), ("aten.mm.default", ("out",)),
                       ("aten.convolution_backward.default", ("out0", "out1", "out2"))):
        found = out_variant(resolve_op(name))
        assert found is not None and found[1] == outs


def test_kernel_that_cannot_be_replayed_is_recorded_not_fatal(twin_conv_graph, tmp_path):
    g = twin_conv_graph
    i = next(k.index for k in g.kernels if k.op == "aten.mm.default")
    bad = dataclasses.replace(g.kernels[i], op="aten.no_such_op.default")
    g2 = dataclasses.replace(g, kernels=g.kernels[:i] + (bad,) + g.kernels[i + 1:])
    p = _run(g2, tmp_path)
    assert [f["op"] for f in p.stats["failed"]] == ["aten.no_such_op.default"]
    assert "does not exist" in p.stats["failed"][0]["reason"]
    assert p.time(i) > 0 and p.kernels[i].modeled
    again = _run(g2, tmp_path)
    assert again.stats["configs_measured"] == 0  # the failure is cached, not retried
    assert again.time(i) == p.time(i)


def test_integer_inputs_are_valid_indices(twin_conv_graph):
    nll = next(k for k in twin_conv_graph.kernels if k.op == "aten.nll_loss_forward.default")
    t = time_kernel(nll, frozenset(), open_slow_tier("model"), "cpu", FAST_POLICY)
    assert t.seconds > 0 and t.runs == 2


def test_device_fingerprint_names_cpu_threads_torch():
    fp = device_fingerprint("cpu")
    assert fp.startswith("cpu|") and f"threads={torch.get_num_threads()}" in fp
    assert f"torch={torch.__version__}" in fp


# ---- slow-tier backends ---------------------------------------------------------------------
def test_numa_node_that_does_not_exist():
    if ctypes.util.find_library("numa") is None:
        pytest.skip("libnuma not installed")
    with pytest.raises(TierError, match="NUMA node 97 does not exist"):
        open_slow_tier("numa:97")
    with pytest.raises(TierError, match="not a NUMA node number"):
        open_slow_tier("numa:x")


def test_pmem_path_that_cannot_be_mapped(tmp_path):
    if ctypes.util.find_library("pmem") is None:
        with pytest.raises(TierError, match="libpmem"):
            open_slow_tier(f"pmem:{tmp_path}")
        return
    with pytest.raises(TierError, match="does not exist"):
        open_slow_tier(f"pmem:{tmp_path}/missing/dir/pool")
    existing = tmp_path / "precious.bin"
    existing.write_bytes(b"keep me")
    with pytest.raises(TierError, match="will not overwrite"):
        open_slow_tier(f"pmem:{existing}")
    assert existing.read_bytes() == b"keep me"
    with pytest.raises(TierError, match="unknown slow tier"):
        open_slow_tier("tape:0")


def test_pmem_on_an_ordinary_file_times_every_configuration(tmp_path):
    if ctypes.util.find_library("pmem") is None:
        pytest.skip("libpmem (Debian libpmem1) not installed")
    g = capture(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)), (torch.randn(4, 8),),
                torch.zeros(4, dtype=torch.long))
    pool = tmp_path / "pool"
    pool.mkdir()
    p = _run(g, tmp_path, slow_tier=f"pmem:{pool}")
    assert p.slow_tier == f"pmem:{pool}" and not p.modeled
    assert "not persistent memory" in p.stats["tier_note"]
    assert p.stats["failed"] == []
    # every slow placement is timed: more configurations than unique kernels
    n_slow = sum(len(c.times) - 1 for c in p.kernels if not g.kernels[c.kernel].view)
    assert n_slow > 0 and p.stats["configs_measured"] > p.stats["unique_kernels"]
    import sqlite3

    con = sqlite3.connect(tmp_path / "c.sqlite")
    keys = [r[0] for r in con.execute("SELECT mask_key FROM kernels")]
    con.close()
    assert len(keys) == p.stats["configs_measured"]
    assert sum(k.startswith("func:dram:0") for k in keys) == p.stats["unique_kernels"]
    assert any(":pmem-file:" in k for k in keys) and any(k.startswith("out:") for k in keys)
    for c in p.kernels:
        assert set(c.times) == set(kernel_masks(g, g.kernels[c.kernel]))
        assert all(t >= 0 for t in c.times.values())
    assert list(pool.iterdir()) == []  # the pool file is gone


def test_numa_node_zero_allocates_bound_memory(tmp_path):
    if ctypes.util.find_library("numa") is None or not Path("/sys/devices/system/node/node0").exists():
        pytest.skip("no libnuma or no NUMA node 0")
    tier = open_slow_tier("numa:0")
    with tier.arena(3 << 20) as alloc:
        a = alloc(1 << 20)
        b = alloc(1 << 20)
        a.fill_(7)
        b.copy_(a)
        assert int(b.sum()) == 7 << 20
        assert a.data_ptr() % 4096 == 0 and b.data_ptr() - a.data_ptr() >= 1 << 20
        del a, b


# ---- the command ----------------------------------------------------------------------------
def _cli(args, env=None):
    from autotm_py.cli import main_group

    return CliRunner().invoke(main_group, args, env=env)


def test_cli_profile_twice_second_run_measures_nothing(tmp_path):
    env = {"AUTOTM_CACHE": str(tmp_path) + "/"}
    r = _cli(["profile", "tests.workloads:tiny_mlp", "--json", "--max-copy-size", "4MiB"], env)
    assert r.exit_code == 0, r.output
    import json

    first = json.loads(r.output)
    assert first["bandwidths"]["sizes"] == [1 << 20, 4 << 20]
    assert first["unique_kernels"] > 5 and first["measured_kernels"] == first["unique_kernels"]
    r2 = _cli(["profile", "tests.workloads:tiny_mlp", "--json"], env)
    second = json.loads(r2.output)
    assert second["measured_kernels"] == 0 and second["configs_measured"] == 0
    assert second["cached_kernels"] == first["unique_kernels"]
    assert second["predicted_step_seconds"] == pytest.approx(first["predicted_step_seconds"])
    assert (tmp_path / "cpu.sqlite").exists()


def test_cli_bad_input_is_one_sentence(tmp_path):
    if not torch.cuda.is_available():
        r = _cli(["profile", "tests.workloads:tiny_mlp", "--device", "cuda"])
        assert r.exit_code == 2 and "no usable CUDA device" in r.output
    r = _cli(["profile", "tests.workloads:tiny_mlp", "--slow-tier", "numa:97", "--cache", str(tmp_path / "x.sqlite")])
    assert r.exit_code == 2 and "does not exist" in r.output and "Traceback" not in r.output
    foreign = tmp_path / "notes.db"
    import sqlite3

    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE notes (t TEXT)")
    con.execute("INSERT INTO notes VALUES ('mine')")
    con.commit()
    con.close()
    before = foreign.read_bytes()
    r = _cli(["profile", "tests.workloads:tiny_mlp", "--cache", str(foreign)])
    assert r.exit_code == 2 and "not an autotm-py kernel cache" in r.output
    assert foreign.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.db"]


# ---- CUDA kernels timed without their workspace ---------------------------------------
def test_no_workspace_child_reports_every_kernel_in_order(twin_conv_graph):
    """The child process answers one result per kernel, in order; on a machine without
    CUDA each is an error naming why, and nothing is lost or duplicated."""
    from autotm_py.profiler import noworkspace

    convs = _convs(twin_conv_graph)
    seen = []
    results = noworkspace.measure(convs, FAST_POLICY, True, lambda i, r: seen.append(i))
    assert sorted(seen) == list(range(len(convs))) and len(results) == len(convs)
    if not torch.cuda.is_available():
        assert all(r.seconds is None and r.error for r in results)


def test_partial_rooms_go_to_the_child_one_per_kernel(twin_conv_graph):
    """Rooms travel with their kernels (one each, in order), and a list of the wrong length is
    refused; partial rooms are shares of the workspace in 2 MiB granules, none at or below the
    room without workspace."""
    from autotm_py.profiler import noworkspace

    convs = _convs(twin_conv_graph)
    results = noworkspace.measure(convs, FAST_POLICY, True, rooms=[64 << 20] * len(convs))
    assert len(results) == len(convs)
    with pytest.raises(ValueError, match="one room per kernel"):
        noworkspace.measure(convs, FAST_POLICY, True, rooms=[1])
    assert noworkspace.partial_room(1 << 30, 4) == 256 << 20
    assert noworkspace.partial_room(1000 << 20, 16) == 62 << 20  # 62.5 MiB down to a 2 MiB granule
    assert noworkspace.partial_room(256 << 20, 16) == 0  # 16 MiB: not more than the 32 MiB slack


def test_workspace_options_drop_rooms_that_buy_nothing() -> None:
    """Smallest room first, each faster than the one before; a partial room timed faster than
    the whole workspace counts at the whole workspace's time, which then buys nothing more."""
    from autotm_py.profiler import KernelCost

    c = KernelCost(0, (), {0: 1.0}, workspace=1000, time_without_workspace=5.0, room_without_workspace=32,
                   partial_workspace=((100, 4.0), (250, 2.0), (400, 2.0)))
    assert c.workspace_options() == ((32, 5.0), (100, 4.0), (250, 2.0), (1000, 1.0))
    assert [c.seconds_with_room(r) for r in (0, 31, 32, 99, 100, 249, 250, 999, 1000)] == \
        [5.0, 5.0, 5.0, 5.0, 4.0, 4.0, 2.0, 2.0, 1.0]
    noisy = KernelCost(0, (), {0: 1.0}, workspace=1000, time_without_workspace=5.0, room_without_workspace=32,
                       partial_workspace=((250, 0.9),))
    assert noisy.workspace_options() == ((32, 5.0), (250, 1.0))
    assert KernelCost(0, (), {0: 1.0}, workspace=1000).workspace_options() == ()


def test_workspace_options_take_a_room_as_slow_as_any_larger_one() -> None:
    """A time measured with a small room below one measured with more room (short of the
    whole workspace) is not believed: cuDNN given more room chooses among more algorithms.
    The numbers are an H100 backward convolution of VGG19 batch 256 (ms; rooms in MiB): 7.95
    with its 801 MiB workspace, 7.89 timed without it, 54.43 and 54.42 with 1/16 and 1/4 of
    it; planned without room, it ran at 54.0 inside the step."""
    from autotm_py.profiler import KernelCost

    c = KernelCost(0, (), {0: 7.95}, workspace=801, time_without_workspace=7.89, room_without_workspace=32,
                   partial_workspace=((50, 54.43), (200, 54.42)))
    assert c.workspace_options() == ((32, 54.43), (200, 54.42), (801, 7.95))
    assert [c.seconds_with_room(r) for r in (32, 50, 200, 800, 801)] == [54.43, 54.43, 54.42, 54.42, 7.95]
    assert c.workspace_saves == 54.43 - 7.95
    mixed = KernelCost(0, (), {0: 1.0}, workspace=1000, time_without_workspace=3.0, room_without_workspace=32,
                       partial_workspace=((100, 6.0), (250, 2.0), (400, 2.5)))
    assert mixed.workspace_options() == ((32, 6.0), (250, 2.5), (1000, 1.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_workspace_times_leave_this_process_algorithms_alone(tmp_path):
    """Convolutions with large cuDNN workspaces get a second time, taken in a child with the
    device full: it uses at most the slack the child left, and this process keeps the
    algorithm (and the time) it had."""
    from autotm_py.profiler import noworkspace
    from autotm_py.profiler.harness import prepare_call, time_call
    from autotm_py.profiler.tiers import dram_alloc

    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(64, 256, 3, padding=1), nn.ReLU(), nn.Conv2d(256, 256, 5, padding=2),
                        nn.ReLU(), nn.Flatten(), nn.Linear(256 * 56 * 56, 10)).cuda()
    x = torch.randn(64, 64, 56, 56, device="cuda")
    g = capture(net, (x,), torch.zeros(64, dtype=torch.long, device="cuda"), device="cuda")
    prof = profile(g, device="cuda", cache=tmp_path / "c.sqlite", progress=False)
    big = [c for c in prof.kernels if c.workspace >= noworkspace.MIN_WORKSPACE]
    assert big, "5x5 convolutions of this size pick algorithms with large workspaces"
    assert all(c.time_without_workspace is not None for c in big)
    assert prof.stats["timed_without_workspace"] == len({profile_signature(g.kernels[c.kernel]) for c in big})
    k = g.kernels[big[0].kernel]
    fast = dram_alloc("cuda")
    call = prepare_call(k, frozenset(), fast, fast, torch.device("cuda"))
    again = time_call(call.fn, FAST_POLICY, "cuda").seconds
    assert again < 1.5 * big[0].times[0], "this process still runs the fast algorithm"
    res = noworkspace.measure([k], FAST_POLICY, True)[0]
    assert res.seconds is not None and res.workspace <= noworkspace.SLACK_BYTES, res
    # partial rooms: each taken with less than the whole workspace, the child using at most it
    shared = [c for c in big if noworkspace.partial_room(c.workspace, 4)]
    assert prof.stats["timed_with_partial_workspace"] == len({profile_signature(g.kernels[c.kernel]) for c in shared})
    assert all(0 < r < c.workspace for c in big for r, _ in c.partial_workspace)
    if shared:
        room = noworkspace.partial_room(shared[0].workspace, 4)
        part = noworkspace.measure([g.kernels[shared[0].kernel]], FAST_POLICY, True, rooms=[room])[0]
        assert part.seconds is not None and part.workspace <= room, part
    # a second profile reads both times from the cache
    again_prof = profile(g, device="cuda", cache=tmp_path / "c.sqlite", progress=False)
    assert again_prof.stats["configs_measured"] == 0
    assert [c.time_without_workspace for c in again_prof.kernels] == [c.time_without_workspace for c in prof.kernels]


# ---- another machine's profile, from the cache alone ---------------------------------------
def test_a_profile_from_the_cache_alone_is_the_profiled_one_and_measures_nothing(twin_conv_graph, tmp_path):
    import sqlite3

    from autotm_py.profiler import CacheError

    g = twin_conv_graph
    measured = _run(g, tmp_path, slow_tier="model")
    rows = sqlite3.connect(tmp_path / "c.sqlite").execute("SELECT COUNT(*) FROM kernels").fetchone()[0]
    fp = measured.device_fingerprint
    # parts of the fingerprint that name one device are enough
    for name in (fp, fp.split("|")[1], "|".join(fp.split("|")[2:0:-1])):
        again = profile(g, cache=tmp_path / "c.sqlite", progress=False, fingerprint=name)
        assert again.device_fingerprint == fp and again.stats["configs_measured"] == 0
        assert [c.times for c in again.kernels] == [c.times for c in measured.kernels]
        assert again.bandwidths == measured.bandwidths
    assert sqlite3.connect(tmp_path / "c.sqlite").execute("SELECT COUNT(*) FROM kernels").fetchone()[0] == rows
    with pytest.raises(CacheError, match="no device fingerprint containing every part of 'no such machine'"):
        profile(g, cache=tmp_path / "c.sqlite", progress=False, fingerprint="no such machine")
    # a kernel the cache has no row for: an error naming what is missing, and nothing timed
    i = next(k.index for k in g.kernels if k.op == "aten.mm.default")
    other = dataclasses.replace(g.kernels[i], args={**g.kernels[i].args, "kwargs": {"x": 1}})
    g2 = dataclasses.replace(g, kernels=g.kernels[:i] + (other,) + g.kernels[i + 1:])
    with pytest.raises(CacheError, match=r"lacks 1 timings of 1 of this graph's \d+ unique kernels"):
        profile(g2, cache=tmp_path / "c.sqlite", progress=False, fingerprint=fp)
    assert sqlite3.connect(tmp_path / "c.sqlite").execute("SELECT COUNT(*) FROM kernels").fetchone()[0] == rows
