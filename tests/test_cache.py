"""Tests of the kernel cache: round trip, resume after an interrupt, damaged and foreign files."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from autotm_py.graph import capture
from autotm_py.profiler import CacheError, KernelCache, KernelRow, TimingPolicy, profile
from autotm_py.profiler.cache import APP_ID

POLICY = TimingPolicy(warmup=0, min_runs=1, min_seconds=0.0, max_runs=1)
SIZES = (1 << 20,)


@pytest.fixture(scope="module")
def graph():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    return capture(net, (torch.randn(4, 6),), torch.zeros(4, dtype=torch.long))


def _run(graph, cache, **kw):
    return profile(graph, cache=cache, progress=False, policy=POLICY, bandwidth_sizes=SIZES, **kw)


def _rows(path: Path) -> list[tuple]:
    con = sqlite3.connect(path)
    try:
        return con.execute("SELECT device_fp, signature, mask_key FROM kernels").fetchall()
    finally:
        con.close()


class Interrupt(Exception):
    pass


def test_interrupted_profile_resumes_without_lost_or_duplicated_rows(graph, tmp_path):
    path = tmp_path / "c.sqlite"

    def stop_after(n: int) -> None:
        if n == 4:
            raise Interrupt

    with pytest.raises(Interrupt):
        _run(graph, path, on_measurement=stop_after)
    assert len(_rows(path)) == 4  # each measurement was committed as it completed
    seen: list[int] = []
    p = _run(graph, path, on_measurement=seen.append)
    unique = p.stats["unique_kernels"]
    assert p.stats["configs_measured"] == unique - 4 == len(seen)
    assert p.stats["configs_cached"] == 4
    rows = _rows(path)
    assert len(rows) == unique and len(set(rows)) == unique
    again = _run(graph, path)
    assert again.stats["configs_measured"] == 0 and len(_rows(path)) == unique
    assert again.all_fast_seconds == pytest.approx(p.all_fast_seconds)


def test_round_trip_through_export_and_import(graph, tmp_path):
    a = tmp_path / "a.sqlite"
    p = _run(graph, a)
    with KernelCache.open(a) as kc:
        data = kc.export_json()
    assert data["format"] == "autotm-py kernel cache" and len(data["kernels"]) == p.stats["unique_kernels"]
    assert data["bandwidths"][0]["tier"] == "dram"
    exported = tmp_path / "share.json"
    exported.write_text(json.dumps(data))
    b = tmp_path / "b.sqlite"
    with KernelCache.open(b) as kc:
        added, skipped = kc.import_json(json.loads(exported.read_text()))
    assert (added, skipped) == (len(data["kernels"]) + 1, 0)
    q = _run(graph, b)
    assert q.stats["configs_measured"] == 0 and not q.stats["bandwidths_measured"]
    assert [c.times for c in q.kernels] == [c.times for c in p.kernels]
    assert q.bandwidths == p.bandwidths
    with KernelCache.open(b) as kc:
        assert kc.import_json(data) == (0, len(data["kernels"]) + 1)  # rows already there are kept
        with pytest.raises(CacheError, match="not an autotm-py cache export"):
            kc.import_json({"kernels": []})


def test_row_values_survive(tmp_path):
    with KernelCache.open(tmp_path / "r.sqlite") as kc:
        kc.put_kernel(KernelRow("fp", "sig", "func:dram:0", "aten.mm.default", 0.125, 7))
        kc.put_kernel(KernelRow("fp", "sig2", "func:dram:0", "aten.x.default", None, 0, error="why"))
        rows = kc.kernel_rows("fp")
    assert rows[("sig", "func:dram:0")].seconds == 0.125 and rows[("sig", "func:dram:0")].n_runs == 7
    assert rows[("sig2", "func:dram:0")].seconds is None and rows[("sig2", "func:dram:0")].error == "why"


def test_reading_a_cache_leaves_its_file_unchanged(tmp_path):
    """A shipped cache opened only to read (as every optimize and test run does) keeps its
    bytes: nothing is written unless a row is."""
    path = tmp_path / "r.sqlite"
    with KernelCache.open(path) as kc:
        kc.put_kernel(KernelRow("fp", "sig", "func:dram:0", "aten.mm.default", 0.125, 7))
    before = path.read_bytes()
    with KernelCache.open(path) as kc:
        assert len(kc.kernel_rows("fp")) == 1
    assert path.read_bytes() == before
    with KernelCache.open(path) as kc:  # a write still lands
        kc.put_kernel(KernelRow("fp", "sig2", "func:dram:0", "aten.mm.default", 0.25, 7))
    assert path.read_bytes() != before


def test_damaged_file_in_the_cache_folder_is_moved_aside(graph, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOTM_CACHE", str(tmp_path) + "/")
    bad = tmp_path / "cpu.sqlite"
    bad.write_bytes(b"this is not a database\n" * 100)
    p = _run(graph, None)
    aside = [f for f in tmp_path.iterdir() if f.name.startswith("cpu.sqlite.corrupt-")]
    assert len(aside) == 1 and aside[0].read_bytes() == b"this is not a database\n" * 100
    assert any("damaged" in n and aside[0].name in n for n in p.stats["notices"])
    assert len(_rows(bad)) == p.stats["unique_kernels"]  # a fresh cache took its place


def test_our_file_with_damaged_pages_is_moved_aside_even_when_named(graph, tmp_path):
    path = tmp_path / "mine.sqlite"
    _run(graph, path)
    raw = bytearray(path.read_bytes())
    page = 4096
    for i in range(page + 16, len(raw)):  # keep the header (our application id), wreck the rest
        raw[i] = 0xA5
    path.write_bytes(bytes(raw))
    with KernelCache.open(path) as kc:
        assert kc.notice is not None and "damaged" in kc.notice
        assert kc.count_kernels() == 0
    assert any(f.name.startswith("mine.sqlite.corrupt-") for f in tmp_path.iterdir())


def test_foreign_file_named_explicitly_is_refused_and_untouched(tmp_path):
    f = tmp_path / "other.sqlite"
    con = sqlite3.connect(f)
    con.execute("CREATE TABLE kernels (x)")  # same table name, another application
    con.commit()
    con.close()
    before = f.read_bytes()
    with pytest.raises(CacheError, match="not an autotm-py kernel cache"):
        KernelCache.open(f)
    text = tmp_path / "readme.txt"
    text.write_text("hello")
    with pytest.raises(CacheError, match="not an SQLite database"):
        KernelCache.open(text)
    assert f.read_bytes() == before and text.read_text() == "hello"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.sqlite", "readme.txt"]


def test_cache_file_carries_application_id_and_schema(tmp_path):
    path = tmp_path / "n.sqlite"
    KernelCache.open(path).close()
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA application_id").fetchone()[0] == APP_ID
    assert dict(con.execute("SELECT key, value FROM meta")) == {"magic": "autotm-py kernel cache", "schema": "1"}
    con.close()


def test_cli_cache_info_export_import(graph, tmp_path):
    from autotm_py.cli import main_group

    path = tmp_path / "c.sqlite"
    p = _run(graph, path)
    runner = CliRunner()
    r = runner.invoke(main_group, ["cache", "info", "--cache", str(path), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["kernel_rows"] == p.stats["unique_kernels"]
    assert list(info["devices"]) == [p.device_fingerprint]
    out = tmp_path / "e.json"
    r = runner.invoke(main_group, ["cache", "export", str(out), "--cache", str(path)])
    assert r.exit_code == 0 and out.exists()
    r = runner.invoke(main_group, ["cache", "import", str(out), "--cache", str(tmp_path / "d.sqlite")])
    assert r.exit_code == 0 and f"imported {p.stats['unique_kernels'] + 1} rows" in r.output
    junk = tmp_path / "junk.json"
    junk.write_text("{not json")
    r = runner.invoke(main_group, ["cache", "import", str(junk), "--cache", str(path)])
    assert r.exit_code == 2 and "not JSON" in r.output
