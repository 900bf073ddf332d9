"""The `autotm` command. Each subcommand lives in its own module of this package."""

from __future__ import annotations

import click

from .common import main_group
from .graph_cmd import graph_cmd, zoo_cmd

main_group.add_command(zoo_cmd)
main_group.add_command(graph_cmd)

for _module, _names in (
    ("profile_cmd", ("profile_cmd", "cache_group")),
    ("optimize_cmd", ("optimize_cmd",)),
    ("run_cmd", ("run_cmd",)),
    ("bench_cmd", ("bench_group", "plot_group")),
):
    try:
        _mod = __import__(f"{__name__}.{_module}", fromlist=list(_names))
    except ModuleNotFoundError as _exc:  # a stage not built yet
        if _exc.name != f"{__name__}.{_module}":
            raise
        continue
    for _name in _names:
        main_group.add_command(getattr(_mod, _name))


def main() -> None:
    main_group(prog_name="autotm")


__all__ = ["main", "main_group", "click"]
