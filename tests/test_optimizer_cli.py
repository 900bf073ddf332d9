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
