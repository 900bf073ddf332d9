"""The kernel cache: an SQLite file (stdlib sqlite3) of measured kernel times and bandwidths.

Rows are keyed by (device fingerprint, kernel signature, IO placement). Every measurement is
committed as soon as it is taken, so an interrupted profile resumes where it stopped.

A file is ours when its SQLite `application_id` is APP_ID and its `meta` table holds MAGIC and
a schema version we read. On opening:
* a damaged file (not SQLite, unreadable, failed `quick_check`, our id but no meta) found where
  autotm-py keeps its caches is renamed `<file>.corrupt-<time>` with a notice, and a fresh cache
  is started; it is never used;
* a file the user named explicitly (--cache FILE, AUTOTM_CACHE=FILE) that is not ours is refused
  with a CacheError: nothing is moved, nothing is written.
Default folder: `kernels_cache/` of the project (override with --cache or AUTOTM_CACHE; a folder
there holds one file per device kind, `cpu.sqlite` and `cuda.sqlite`).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from .types import Bandwidths

MAGIC = "autotm-py kernel cache"
APP_ID = 0x41544D43  # "ATMC"
SCHEMA = 1
SQLITE_HEADER = b"SQLite format 3\x00"
ENV = "AUTOTM_CACHE"

_DDL = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS kernels (
    device_fp TEXT NOT NULL,
    signature TEXT NOT NULL,
    mask_key TEXT NOT NULL,
    op TEXT NOT NULL,
    seconds REAL,
    n_runs INTEGER NOT NULL,
    modeled INTEGER NOT NULL,
    error TEXT,
    created REAL NOT NULL,
    PRIMARY KEY (device_fp, signature, mask_key)
);
CREATE TABLE IF NOT EXISTS workspaces (
    device_fp TEXT NOT NULL,
    signature TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    PRIMARY KEY (device_fp, signature)
);
CREATE TABLE IF NOT EXISTS bandwidths (
    device_fp TEXT NOT NULL,
    tier TEXT NOT NULL,
    data TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (device_fp, tier)
);
"""
_TABLES = frozenset({"meta", "kernels", "workspaces", "bandwidths"})


class CacheError(ValueError):
    """A cache file that cannot be used; the message is one sentence for the user."""


@dataclass(frozen=True)
class KernelRow:
    """One measurement: `seconds` is None when the kernel could not be replayed (`error`)."""

    device_fp: str
    signature: str
    mask_key: str
    op: str
    seconds: float | None
    n_runs: int
    modeled: bool = False
    error: str | None = None
    created: float = 0.0


def project_cache_dir() -> Path:
    """`kernels_cache/` next to the package in a source checkout, else a per-user folder."""
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").exists():
        return root / "kernels_cache"
    return Path.home() / ".cache" / "autotm-py" / "kernels_cache"


def resolve_cache_path(cache: str | os.PathLike[str] | None, device: str = "cpu") -> tuple[Path, bool]:
    """The cache file to use and whether the user named that file explicitly."""
    given = cache if cache is not None else os.environ.get(ENV) or None
    if given is None:
        return project_cache_dir() / f"{device}.sqlite", False
    p = Path(given).expanduser()
    if p.is_dir() or str(given).endswith(os.sep):
        return p / f"{device}.sqlite", False
    return p, True


def _is_ours(conn: sqlite3.Connection) -> str:
    """'ours', 'empty' (a new database), or 'foreign'. Raises sqlite3.DatabaseError if unreadable."""
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if app_id == APP_ID:
        return "ours"
    if app_id == 0 and not tables:
        return "empty"
    return "foreign"


class KernelCache:
    """An open cache file. Use `KernelCache.open(...)`; close() when done (or `with`)."""

    def __init__(self, path: Path, conn: sqlite3.Connection, notice: str | None = None) -> None:
        self.path = path
        self.conn = conn
        self.notice = notice  # set when a damaged file was moved aside

    # ---- opening --------------------------------------------------------------------------
    @classmethod
    def open(cls, cache: str | os.PathLike[str] | None = None, device: str = "cpu") -> "KernelCache":
        path, explicit = resolve_cache_path(cache, device)
        notice = None
        problem = _check_file(path)
        if problem is not None:
            kind, why = problem
            if explicit and kind == "foreign":
                raise CacheError(f"{path} is not an autotm-py kernel cache ({why}); it was left untouched, "
                                 "pick another --cache path")
            if kind == "newer":
                raise CacheError(f"{path} {why}; upgrade autotm-py or pick another --cache path")
            aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(path, aside)
            notice = f"the kernel cache {path} is damaged ({why}); moved it to {aside.name} and started a new one"
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), timeout=30)
        try:
            # Lay out only what is missing: writing the header again on every open would change
            # a shipped cache file each time it is merely read.
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if conn.execute("PRAGMA application_id").fetchone()[0] != APP_ID or not _TABLES <= tables:
                conn.executescript(_DDL)
                conn.execute(f"PRAGMA application_id = {APP_ID}")
                conn.execute("INSERT OR IGNORE INTO meta VALUES ('magic', ?)", (MAGIC,))
                conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA),))
                conn.commit()
        except sqlite3.Error as exc:
            conn.close()
            raise CacheError(f"cannot write the kernel cache {path}: {exc}") from None
        return cls(path, conn, notice)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "KernelCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- kernels --------------------------------------------------------------------------
    def kernel_rows(self, device_fp: str) -> dict[tuple[str, str], KernelRow]:
        """Every row of one device, keyed by (signature, mask_key)."""
        cur = self.conn.execute(
            "SELECT device_fp, signature, mask_key, op, seconds, n_runs, modeled, error, created "
            "FROM kernels WHERE device_fp = ?", (device_fp,))
        return {(r[1], r[2]): KernelRow(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6]), r[7], r[8]) for r in cur}

    def put_kernel(self, row: KernelRow) -> None:
        """Store one measurement and commit it at once (an interrupt loses nothing)."""
        with self.conn:
            self.conn.execute(
                "INSERT OR REPLACE INTO kernels VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (row.device_fp, row.signature, row.mask_key, row.op, row.seconds, row.n_runs,
                 int(row.modeled), row.error, row.created or time.time()))

    def workspaces(self, device_fp: str) -> dict[str, int]:
        """Transient device bytes per kernel signature (CUDA)."""
        cur = self.conn.execute("SELECT signature, bytes FROM workspaces WHERE device_fp = ?", (device_fp,))
        return {r[0]: int(r[1]) for r in cur}

    def put_workspace(self, device_fp: str, signature: str, nbytes: int) -> None:
        with self.conn:
            self.conn.execute("INSERT OR REPLACE INTO workspaces VALUES (?, ?, ?)", (device_fp, signature, int(nbytes)))

    def count_kernels(self, device_fp: str | None = None) -> int:
        if device_fp is None:
            return self.conn.execute("SELECT COUNT(*) FROM kernels").fetchone()[0]
        return self.conn.execute("SELECT COUNT(*) FROM kernels WHERE device_fp = ?", (device_fp,)).fetchone()[0]

    # ---- bandwidths -----------------------------------------------------------------------
    def bandwidths(self, device_fp: str, tier: str) -> Bandwidths | None:
        r = self.conn.execute("SELECT data FROM bandwidths WHERE device_fp = ? AND tier = ?",
                              (device_fp, tier)).fetchone()
        return Bandwidths.from_json(json.loads(r[0])) if r else None

    def put_bandwidths(self, device_fp: str, tier: str, bw: Bandwidths) -> None:
        with self.conn:
            self.conn.execute("INSERT OR REPLACE INTO bandwidths VALUES (?, ?, ?, ?)",
                              (device_fp, tier, json.dumps(bw.to_json()), time.time()))

    # ---- inspection and sharing -----------------------------------------------------------
    def info(self) -> dict[str, Any]:
        devices: dict[str, dict[str, Any]] = {}
        for fp, n, failed, modeled in self.conn.execute(
                "SELECT device_fp, COUNT(*), SUM(seconds IS NULL), SUM(modeled) FROM kernels GROUP BY device_fp"):
            devices[fp] = {"kernel_rows": n, "failed_rows": failed or 0, "modeled_rows": modeled or 0,
                           "bandwidth_tiers": []}
        for fp, tier in self.conn.execute("SELECT device_fp, tier FROM bandwidths ORDER BY tier"):
            devices.setdefault(fp, {"kernel_rows": 0, "failed_rows": 0, "modeled_rows": 0,
                                    "bandwidth_tiers": []})["bandwidth_tiers"].append(tier)
        return {"path": str(self.path), "bytes": self.path.stat().st_size, "schema": SCHEMA,
                "kernel_rows": self.count_kernels(), "devices": devices}

    def export_json(self) -> dict[str, Any]:
        kernels = [asdict(KernelRow(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6]), r[7], r[8]))
                   for r in self.conn.execute("SELECT device_fp, signature, mask_key, op, seconds, n_runs, "
                                              "modeled, error, created FROM kernels ORDER BY 1, 2, 3")]
        bws = [{"device_fp": r[0], "tier": r[1], "bandwidths": json.loads(r[2]), "created": r[3]}
               for r in self.conn.execute("SELECT device_fp, tier, data, created FROM bandwidths ORDER BY 1, 2")]
        ws = [{"device_fp": r[0], "signature": r[1], "bytes": r[2]}
              for r in self.conn.execute("SELECT device_fp, signature, bytes FROM workspaces")]
        return {"format": MAGIC, "schema": SCHEMA, "kernels": kernels, "bandwidths": bws, "workspaces": ws}

    def import_json(self, data: Mapping[str, Any]) -> tuple[int, int]:
        """Add the rows of an export; rows already here are kept. Returns (added, skipped)."""
        if not isinstance(data, Mapping) or data.get("format") != MAGIC:
            raise CacheError("the file is not an autotm-py cache export")
        if data.get("schema") != SCHEMA:
            raise CacheError(f"the export has schema {data.get('schema')!r}, this autotm-py reads {SCHEMA}")
        added = skipped = 0
        try:
            rows: Iterable[Mapping[str, Any]] = data.get("kernels", [])
            with self.conn:
                for d in rows:
                    cur = self.conn.execute(
                        "INSERT OR IGNORE INTO kernels VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (str(d["device_fp"]), str(d["signature"]), str(d["mask_key"]), str(d["op"]),
                         None if d["seconds"] is None else float(d["seconds"]), int(d["n_runs"]),
                         int(bool(d["modeled"])), d.get("error"), float(d.get("created") or time.time())))
                    added += cur.rowcount
                    skipped += 1 - cur.rowcount
                for d in data.get("workspaces", []):
                    cur = self.conn.execute("INSERT OR IGNORE INTO workspaces VALUES (?, ?, ?)",
                                            (str(d["device_fp"]), str(d["signature"]), int(d["bytes"])))
                    added += cur.rowcount
                    skipped += 1 - cur.rowcount
                for d in data.get("bandwidths", []):
                    bw = Bandwidths.from_json(d["bandwidths"])  # validates the table
                    cur = self.conn.execute("INSERT OR IGNORE INTO bandwidths VALUES (?, ?, ?, ?)",
                                            (str(d["device_fp"]), str(d["tier"]), json.dumps(bw.to_json()),
                                             float(d.get("created") or time.time())))
                    added += cur.rowcount
                    skipped += 1 - cur.rowcount
        except (KeyError, TypeError, ValueError) as exc:
            raise CacheError(f"the export is malformed ({type(exc).__name__}: {exc}); nothing was imported") from None
        return added, skipped


def _check_file(path: Path) -> tuple[str, str] | None:
    """None if `path` is absent, empty or a healthy cache of ours; else (kind, reason) with
    kind 'foreign' (not ours, or unreadable: can't tell), 'corrupt' (ours, damaged) or 'newer'."""
    if not path.exists() or (path.is_file() and path.stat().st_size == 0):
        return None
    if not path.is_file():
        return "foreign", "it is not a regular file"
    with open(path, "rb") as fh:
        head = fh.read(len(SQLITE_HEADER))
    if head != SQLITE_HEADER:
        return "foreign", "not an SQLite database"
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        return "foreign", f"unreadable: {exc}"
    try:
        try:
            state = _is_ours(conn)
        except sqlite3.DatabaseError as exc:
            return "foreign", f"unreadable SQLite file: {exc}"
        if state == "foreign":
            return "foreign", "an SQLite database of another application"
        if state == "empty":
            return None
        try:
            ok = conn.execute("PRAGMA quick_check").fetchone()[0]
            if ok != "ok":
                return "corrupt", f"integrity check failed: {ok}"
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as exc:
            return "corrupt", str(exc)
        if meta.get("magic") != MAGIC:
            return "corrupt", "its meta table lacks the autotm-py magic"
        try:
            schema = int(meta.get("schema", "-1"))
        except ValueError:
            return "corrupt", "its schema version is unreadable"
        if schema > SCHEMA:
            return "newer", f"was written by a newer autotm-py (schema {schema}, this one reads {SCHEMA})"
        if schema != SCHEMA:
            return "corrupt", f"it has the old schema {schema}"
        return None
    finally:
        conn.close()
