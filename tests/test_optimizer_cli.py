"""`autotm optimize`: a run with the roofline estimate, and bad input as one sentence."""

from __future__ import annotations

import json

from click.testing import CliRunner

from autotm_py.cli import main_group

W = "tests.workloads:tiny_mlp"


def run(*args):
    return CliRunner().invoke(main_group, ["optimize", *args])


def test_all_formulations_json(tmp_path):
    out = tmp_path / "plan.json"
    r = run(W, "--batch", "64", "--ratio", "1:1", "--move-state", "--estimate",
            "--formulation", "all", "--json", "--out", str(out))
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert set(d["plans"]) == {"static", "synchronous", "asynchronous", "numa", "2lm"}
    sync = d["plans"]["synchronous"]
    assert sync["status"] == "optimal" and sync["slowdown"] >= 1.0
    assert sync["peak_fast_bytes"] <= d["limit_bytes"]
    saved = tmp_path / "plan.synchronous.json"
    assert saved.exists()
    r = run(W, "--batch", "64", "--estimate", "--check", str(saved))
    assert r.exit_code == 0 and "valid synchronous plan" in r.output, r.output
    r = run(W, "--batch", "32", "--estimate", "--check", str(saved))
    assert r.exit_code != 0 and "another graph" in r.output


def _one_sentence(r, words):
    assert r.exit_code != 0
    assert "Traceback" not in r.output
    assert words in r.output, r.output


def test_bad_input():
    _one_sentence(run(W, "--ratio", "1:0:3", "--estimate"), "two parts")
    _one_sentence(run(W, "--ratio", "-1:4", "--estimate"), "non-negative")
    _one_sentence(run(W, "--ratio", "1:4", "--dram", "1GiB", "--estimate"), "exactly one limit")
    _one_sentence(run(W, "--estimate"), "exactly one limit")
    _one_sentence(run(W, "--budget", "1GiB", "--estimate"), "--device cuda")
    _one_sentence(run(W, "--dram", "100B", "--estimate"), "needs")


def test_plan_of_other_schema(tmp_path):
    out = tmp_path / "p.json"
    r = run(W, "--dram", "1GiB", "--estimate", "--out", str(out))
    assert r.exit_code == 0, r.output
    d = json.loads(out.read_text())
    d["schema"] = 0
    out.write_text(json.dumps(d))
    _one_sentence(run(W, "--estimate", "--check", str(out)), "schema")


def test_async_candidates_option(tmp_path):
    from autotm_py.optimizer.plan import Plan

    _one_sentence(run(W, "--ratio", "1:4", "--estimate", "--async-candidates", "x"), "--async-candidates")
    # the default (auto) keeps every candidate of a graph this small
    for value, want in (("all", None), (None, None), ("1", 1)):
        out = tmp_path / f"{value}.json"
        extra = ["--async-candidates", value] if value else []
        r = run(W, "--batch", "64", "--ratio", "1:2", "--estimate", "--formulation", "asynchronous",
                "--out", str(out), *extra)
        assert r.exit_code == 0, r.output
        assert Plan.load(str(out)).async_candidates == want
    # refined: the restricted plan solved again with every candidate, never predicted slower
    out = tmp_path / "refined.json"
    r = run(W, "--batch", "64", "--ratio", "1:2", "--estimate", "--formulation", "asynchronous",
            "--async-candidates", "1", "--refine-seconds", "30", "--out", str(out))
    assert r.exit_code == 0, r.output
    assert Plan.load(str(out)).predicted_seconds <= Plan.load(str(tmp_path / "1.json")).predicted_seconds
    _one_sentence(run(W, "--ratio", "1:4", "--estimate", "--refine-seconds", "-2"), "--refine-seconds")
    # spans: the plan without pieces solved again with them, never predicted slower
    out = tmp_path / "spans.json"
    r = run(W, "--batch", "64", "--ratio", "1:2", "--estimate", "--formulation", "asynchronous",
            "--async-candidates", "1", "--copy-spans", "8", "--out", str(out))
    assert r.exit_code == 0, r.output
    assert Plan.load(str(out)).copy_spans == 8
    assert Plan.load(str(out)).predicted_seconds <= Plan.load(str(tmp_path / "1.json")).predicted_seconds + 1e-12
    _one_sentence(run(W, "--ratio", "1:4", "--estimate", "--copy-spans", "-1"), "--copy-spans")


def test_a_saved_graph_is_planned_from_another_machines_cached_rows(tmp_path):
    """The shipped CPU cache's rows (the 2-core machine's fingerprint) give the same plan for
    a graph file as for the captured model, whatever machine runs this, and write nothing."""
    import shutil
    from pathlib import Path

    cache = tmp_path / "cpu.sqlite"
    shutil.copy(Path(__file__).parents[1] / "kernels_cache" / "cpu.sqlite", cache)
    before = cache.read_bytes()
    fp = "AMD EPYC|threads=2|torch=2.13.0+cpu"
    g = tmp_path / "vgg19.json"
    r = CliRunner().invoke(main_group, ["graph", "vgg19", "--batch", "16", "--out", str(g), "--json"])
    assert r.exit_code == 0, r.output
    common = ["--ratio", "1:4", "--formulation", "synchronous", "--cache", str(cache), "--fingerprint", fp, "--json"]
    from_file = run(str(g), *common)
    captured = run("vgg19", "--batch", "16", *common)
    assert from_file.exit_code == 0 and captured.exit_code == 0, from_file.output + captured.output
    a = json.loads(from_file.output)["plans"]
    b = json.loads(captured.output)["plans"]
    assert a["status"] == "optimal" and a["predicted_seconds"] == b["predicted_seconds"] > 0
    assert cache.read_bytes() == before
    _one_sentence(run(str(g), "--device", "cuda", "--budget", "1GiB", "--fingerprint", fp), "captured for cpu")
    _one_sentence(run(str(g), "--batch", "8", "--ratio", "1:4"), "drop --batch")
    _one_sentence(run(str(g), "--ratio", "1:4", "--cache", str(cache), "--fingerprint", "H100"),
                  "no device fingerprint containing every part of 'H100'")


def test_direct_outputs_plans_as_the_original_runtime(tmp_path):
    """All movable tensors in slow memory (0:1): no plan fits where relu makes its output in
    fast memory first, as this runtime does; with --direct-outputs (every output written
    straight into the slow tier, as the original's runtime) one does, and says so in its file;
    that file checks as valid against the same semantics."""
    _one_sentence(run(W, "--batch", "64", "--ratio", "0:1", "--estimate", "--formulation", "synchronous"),
                  "aten.relu.default")
    out = tmp_path / "direct.json"
    r = run(W, "--batch", "64", "--ratio", "0:1", "--estimate", "--formulation", "synchronous",
            "--direct-outputs", "--out", str(out))
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["direct_outputs"] is True
    r = run(W, "--batch", "64", "--estimate", "--check", str(out))
    assert r.exit_code == 0 and "valid synchronous plan" in r.output, r.output
