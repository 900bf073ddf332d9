"""`autotm run`: a plan solved on the spot or loaded from a file, run, and bad input."""

import json

import pytest
from click.testing import CliRunner

from autotm_py.cli import main_group


def _run(*args: str):
    return CliRunner().invoke(main_group, list(args))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("cache") / "k.sqlite")


def test_run_solves_runs_and_reports(cache: str) -> None:
    r = _run("run", "tests.workloads:tiny_mlp", "--dram", "700B", "--formulation", "synchronous",
             "--steps", "2", "--cache", cache, "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output[r.output.index("{"):])
    assert rep["formulation"] == "synchronous" and rep["steps"] == 2 and rep["limit_bytes"] == 700
    assert rep["step_seconds"] > 0 and rep["predicted_seconds"] > 0
    assert rep["fast_peak_predicted"] <= 700
    # measured from the live tensors: the plan's bytes, plus any output made in fast memory
    # on its way to the slow tier (costs profiled here decide whether the plan has one)
    assert rep["fast_peak_bytes"] >= rep["fast_peak_predicted"] > 0
    assert (rep["fast_peak_bytes"] > 700) == ("over the plan's budget" in rep["notes"])
    assert rep["resolves"] == 0  # only a CUDA budget is fitted by re-solving


def test_run_a_saved_plan_and_refuse_another_graphs(cache: str, tmp_path) -> None:
    plan = str(tmp_path / "plan.json")
    r = _run("optimize", "tests.workloads:tiny_mlp", "--dram", "700B", "--cache", cache, "--out", plan, "--json")
    assert r.exit_code == 0, r.output
    r = _run("run", "tests.workloads:tiny_mlp", "--plan", plan, "--steps", "1", "--no-compare")
    assert r.exit_code == 0, r.output
    assert "measured step time" in r.output
    r = _run("run", "tests.workloads:tiny_mlp", "--batch", "3", "--plan", plan)
    assert r.exit_code != 0 and "another graph" in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("args, message", [
    (("run", "vgg19"), "--plan FILE or exactly one limit"),
    (("run", "vgg19", "--ratio", "1:4", "--dram", "1GiB"), "exactly one limit"),
    (("run", "vgg19", "--budget", "1GiB"), "--budget is device memory"),
    (("run", "vgg19", "--ratio", "1:4", "--steps", "0"), "--steps must be positive"),
    (("run", "vgg19", "--ratio", "1:4", "--max-retries", "-1"), "--max-retries must be 0 or more"),
    (("run", "vgg19", "--ratio", "1:4", "--copy-spans", "-1"), "--copy-spans must be 0 or more"),
    (("run", "vgg19", "--ratio", "1:4", "--choose-algorithms"), "it needs --device cuda"),
])
def test_run_bad_input(args, message) -> None:
    r = _run(*args)
    assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output
