"""The `autotm zoo` and `autotm graph` commands, bad input included."""

import json

import pytest
from click.testing import CliRunner

from autotm_py.cli import main_group


def _run(*args: str):
    return CliRunner().invoke(main_group, list(args))


def test_help_lists_commands() -> None:
    r = _run("--help")
    assert r.exit_code == 0 and "graph" in r.output and "zoo" in r.output


def test_python_dash_m_runs_the_command() -> None:
    """`python -m autotm_py` is the `autotm` command, for machines without the console script."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "autotm_py", "zoo", "--json"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == json.loads(_run("zoo", "--json").output)
    assert "vgg19" in [m["name"] for m in json.loads(r.stdout)]


def test_zoo_json_has_paper_batches() -> None:
    r = _run("zoo", "--json")
    assert r.exit_code == 0
    rows = {row["name"]: row for row in json.loads(r.output)}
    assert rows["vgg19"]["sets"]["conventional"] == [2048]
    assert rows["densenet264"]["sets"]["large"] == [3072]
    assert set(rows) == {"vgg19", "vgg416", "resnet50", "resnet152", "resnet200", "inception_v4",
                         "densenet264", "densenet201", "transformer"}


def test_graph_json_summary() -> None:
    r = _run("graph", "vgg19", "--batch", "2", "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    assert s["batch"] == 2 and s["kernels"] > s["compute_kernels"] > s["unique_kernels"] > 0
    # the batch: 2 x 3 x 224 x 224 float32, 2 int64 targets, one float32 loss
    assert s["io_bytes"] == 2 * 3 * 224 * 224 * 4 + 2 * 8 + 4
    assert s["peak_live_bytes"] > s["bytes_by_role"]["parameter"]
    assert len(s["fingerprint"]) == 16


def test_graph_table_and_user_workload() -> None:
    r = _run("graph", "tests.workloads:tiny_mlp")
    assert r.exit_code == 0, r.output
    assert "peak live bytes" in r.output and "fingerprint" in r.output


@pytest.mark.parametrize("args, message", [
    (("graph", "nope"), "the zoo has: vgg19"),
    (("graph", "vgg19", "--batch", "0"), "positive integer"),
    (("graph", "vgg19", "--batch", "-2"), "positive integer"),
    (("graph", "no_such_module_x:fn"), "cannot import module"),
    (("graph", "tests.workloads:bad_model"), "aten._local_scalar_dense"),
    (("graph", "tests.workloads:not_a_tuple"), "3-tuple"),
])
def test_bad_input_is_one_sentence(args, message) -> None:
    r = _run(*args)
    assert r.exit_code != 0
    assert message in r.output
    assert "Traceback" not in r.output
