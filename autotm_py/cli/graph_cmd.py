"""`autotm zoo` and `autotm graph`."""

from __future__ import annotations

import click
from rich.table import Table

from .common import capture_workload, check_device, console, emit_json, human_bytes, user_errors


@click.command("zoo")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def zoo_cmd(as_json: bool) -> None:
    """List the built-in models and the paper's batch-size sets."""
    from ..graph import zoo

    rows = []
    for name in zoo.names():
        e = zoo.get(name)
        rows.append({"name": name, "description": e.description,
                     "sets": {k: list(v) for k, v in dict(e.sets).items()}, "lr": e.lr})
    if as_json:
        emit_json(rows)
        return
    sets = zoo.SET_NAMES + (zoo.PEER_SET,)
    table = Table(title="autotm zoo: the paper's batch sets, and ours for the GPU comparison (peers)")
    for col in ("model", *sets, "lr"):
        table.add_column(col)
    for r in rows:
        s = r["sets"]
        table.add_row(r["name"],
                      *(", ".join(map(str, s.get(k, []))) or "-" for k in sets), str(r["lr"]))
    console.print(table)
    console.print("Descriptions: autotm zoo --json")


@click.command("graph")
@click.argument("model")
@click.option("--batch", type=int, default=None, help="Batch size (default: the model's smallest paper batch).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Device the step is captured for (fake tensors: nothing is allocated).")
@click.option("--optimizer", type=click.Choice(["sgd", "adam"]), default="sgd", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also save the whole graph as JSON.")
@user_errors
def graph_cmd(model: str, batch: int | None, device: str, optimizer: str, as_json: bool, out: str | None) -> None:
    """Capture MODEL's training step and summarise its graph.

    MODEL is a zoo name (see `autotm zoo`) or `package.module:function` returning
    (model, example_inputs, target).
    """
    if device == "cuda":
        check_device(device)
    graph = capture_workload(model, batch, device=device, optimizer=optimizer)
    summary = graph.summary()
    if out:
        import json

        with open(out, "w") as fh:
            json.dump(graph.to_json(), fh)
    if as_json:
        emit_json(summary)
        return
    table = Table(title=f"{graph.name}, batch {graph.batch}, {graph.device}", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    roles = summary["bytes_by_role"]
    for what, value in (
        ("kernels (aten calls)", f"{summary['kernels']:,}"),
        ("  that move data (non-view)", f"{summary['compute_kernels']:,}"),
        ("unique kernels", f"{summary['unique_kernels']:,}"),
        ("tensors (storages)", f"{summary['tensors']:,}"),
        ("peak live bytes", f"{summary['peak_live_bytes']:,} ({human_bytes(summary['peak_live_bytes'])})"),
        ("  at kernel", f"#{summary['peak_kernel']} {summary['peak_node']} ({summary['peak_op']})"),
        ("IO bytes (batch, target, loss)", f"{summary['io_bytes']:,} ({human_bytes(summary['io_bytes'])})"),
        ("parameters + buffers", human_bytes(roles["parameter"] + roles["buffer"])),
        ("optimizer state", human_bytes(roles["optimizer_state"])),
        ("fingerprint", summary["fingerprint"]),
        ("capture time", f"{summary['capture_seconds']:.2f} s"),
    ):
        table.add_row(what, value)
    console.print(table)
