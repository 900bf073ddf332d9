"""`autotm profile` and `autotm cache info | export | import`."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Callable

import click
from rich.table import Table

from .common import (UserError, capture_workload, check_device, console, emit_json, err_console,
                     parse_size, user_errors)


def _profiler_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Cache and slow-tier errors are the user's to fix: one sentence, non-zero exit."""
    from ..profiler import CacheError, TierError

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (CacheError, TierError) as exc:
            raise UserError(str(exc)) from None
    return wrapper


def _gbps(x: float) -> str:
    return f"{x / 1e9:.2f}"


def bandwidth_table(bw: Any, title: str) -> Table:
    table = Table(title=title)
    for col in ("size", "read sync GB/s", "write sync GB/s", "read async GB/s", "write async GB/s"):
        table.add_column(col, justify="right")
    for i, n in enumerate(bw.sizes):
        size = f"{n >> 20} MiB" if n < 1 << 30 else f"{n >> 30} GiB"
        table.add_row(size, _gbps(bw.read_sync[i]), _gbps(bw.write_sync[i]),
                      _gbps(bw.read_async[i]), _gbps(bw.write_async[i]))
    table.caption = (f"read = slow -> fast, write = fast -> slow; async = while a matmul runs, "
                     f"which slows by x{bw.async_compute_slowdown:.2f}" + ("; MODELED" if bw.modeled else ""))
    return table


@click.command("profile")
@click.argument("model")
@click.option("--batch", type=int, default=None, help="Batch size (default: the model's test batch).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--slow-tier", "slow_tier", default=None, metavar="SPEC",
              help="CPU slow tier: pmem:PATH, numa:NODE or model (default: a memory-only NUMA node "
                   "if there is one, else model).")
@click.option("--cache", default=None, metavar="PATH",
              help="Cache file or folder (default: $AUTOTM_CACHE, else the project's kernels_cache/).")
@click.option("--optimizer", type=click.Choice(["sgd", "adam"]), default="sgd", show_default=True)
@click.option("--max-copy-size", default="1GiB", show_default=True, metavar="SIZE",
              help="Largest copy of the bandwidth probe (sizes 1 MiB, 4 MiB, ... up to this).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@user_errors
@_profiler_errors
def profile_cmd(model: str, batch: int | None, device: str, slow_tier: str | None, cache: str | None,
                optimizer: str, max_copy_size: str, as_json: bool) -> None:
    """Time MODEL's kernels under every IO placement, and the copy bandwidths, into the
    kernel cache. A second run takes everything from the cache.

    MODEL is a zoo name (see `autotm zoo`) or `package.module:function`.
    """
    from ..profiler import profile

    from ..profiler.bandwidth import copy_sizes

    sizes = copy_sizes(parse_size(max_copy_size))
    check_device(device)
    if device == "cuda" and slow_tier is not None:
        raise UserError("--slow-tier applies to --device cpu; on CUDA the slow tier is pinned host memory")
    graph = capture_workload(model, batch, device=device, optimizer=optimizer)
    try:
        prof = profile(graph, device=device, slow_tier=slow_tier, cache=cache, progress=not as_json,
                       bandwidth_sizes=sizes)
    except KeyboardInterrupt:
        err_console.print("interrupted: every finished measurement is in the cache; run again to resume")
        raise SystemExit(130) from None
    s = dict(prof.stats)
    summary = {
        "model": graph.name, "batch": graph.batch, "device": device, "slow_tier": prof.slow_tier,
        "device_fingerprint": prof.device_fingerprint, "modeled": prof.modeled,
        **{k: s[k] for k in ("compute_kernels", "unique_kernels", "measured_kernels", "cached_kernels",
                             "configs_measured", "configs_cached", "pruned_kernels", "failed",
                             "seconds", "cache", "tier_note", "notices", "other_cpu_load")},
        "predicted_step_seconds": prof.all_fast_seconds,
        "bandwidths": prof.bandwidths.to_json(),
    }
    if as_json:
        emit_json(summary)
        return
    table = Table(title=f"profile of {graph.name}, batch {graph.batch}, {device} ({prof.slow_tier})",
                  show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    for what, value in (
        ("kernels (non-view)", f"{s['compute_kernels']:,}"),
        ("unique kernels", f"{s['unique_kernels']:,}"),
        ("  measured now", f"{s['measured_kernels']:,} ({s['configs_measured']:,} configurations)"),
        ("  taken from the cache", f"{s['cached_kernels']:,} ({s['configs_cached']:,} configurations)"),
        ("  pruned (> 6 free tensors)", f"{s['pruned_kernels']:,}"),
        ("  could not be replayed", f"{len(s['failed'])}"),
        ("predicted step, all fast", f"{prof.all_fast_seconds:.3f} s"),
        ("slow tier", s["tier_note"]),
        ("device", prof.device_fingerprint),
        ("cache", s["cache"]),
        ("total time", f"{s['seconds']:.1f} s"),
    ):
        table.add_row(what, value)
    console.print(table)
    for f in s["failed"]:
        err_console.print(f"[yellow]not replayed:[/] {f['op']} ({f['kernels']} kernel(s)): {f['reason']}; "
                          "costed from its bytes and the measured bandwidth", highlight=False)
    console.print(bandwidth_table(prof.bandwidths, "copy bandwidths"))


@click.group("cache")
def cache_group() -> None:
    """Inspect and share kernel caches."""


_cache_opt = click.option("--cache", default=None, metavar="PATH",
                          help="Cache file or folder (default: $AUTOTM_CACHE, else kernels_cache/).")
_device_opt = click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
                           help="Which file of a cache folder (cpu.sqlite or cuda.sqlite).")


@cache_group.command("info")
@_cache_opt
@_device_opt
@click.option("--json", "as_json", is_flag=True)
@user_errors
@_profiler_errors
def cache_info(cache: str | None, device: str, as_json: bool) -> None:
    """What a cache holds: rows per device fingerprint and the bandwidth tables."""
    from ..profiler import KernelCache

    with KernelCache.open(cache, device) as kc:
        info = kc.info()
        notice = kc.notice
    if notice:
        err_console.print(f"[yellow]note:[/] {notice}", highlight=False)
    if as_json:
        emit_json(info)
        return
    table = Table(title=f"{info['path']} ({info['bytes']:,} bytes, schema {info['schema']})")
    for col in ("device", "kernel rows", "not replayable", "bandwidth tables"):
        table.add_column(col)
    for fp, d in info["devices"].items():
        table.add_row(fp, str(d["kernel_rows"]), str(d["failed_rows"]), ", ".join(d["bandwidth_tiers"]))
    console.print(table)


@cache_group.command("export")
@click.argument("file", type=click.Path(dir_okay=False))
@_cache_opt
@_device_opt
@user_errors
@_profiler_errors
def cache_export(file: str, cache: str | None, device: str) -> None:
    """Write every row of the cache to FILE as JSON."""
    from ..profiler import KernelCache

    with KernelCache.open(cache, device) as kc:
        data = kc.export_json()
    Path(file).write_text(json.dumps(data, indent=1))
    console.print(f"exported {len(data['kernels'])} kernel rows and {len(data['bandwidths'])} "
                  f"bandwidth tables to {file}")


@cache_group.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@_cache_opt
@_device_opt
@user_errors
@_profiler_errors
def cache_import(file: str, cache: str | None, device: str) -> None:
    """Add the rows of a JSON export (FILE) to the cache; rows already there are kept."""
    from ..profiler import CacheError, KernelCache

    try:
        data = json.loads(Path(file).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CacheError(f"{file} is not JSON ({exc})") from None
    with KernelCache.open(cache, device) as kc:
        added, skipped = kc.import_json(data)
    console.print(f"imported {added} rows into {kc.path} ({skipped} already there)")
