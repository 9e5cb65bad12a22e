"""The results database: every run of ``gate`` recorded in an embedded SQLite file.

One database accumulates results across runs: a sample is identified by its
``sample_id``, and a rerun replaces (upserts) that sample's rows instead of
adding copies. ``runs`` and ``run_samples`` keep the history: which run saw
which file (sha256), with which template (sha256), options and cache key, and
what became of it. The layout is documented in ``docs/batch.md``.

Readers: :func:`load_populations` (the ``populations.csv`` layout),
:func:`load_gates`, :func:`load_intensities`, :func:`load_findings`,
:func:`load_failures`, :func:`load_runs`, :func:`load_samples`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import pandas as pd

from .errors import AbortedError, ResultsError
from .stats import GATE_COLUMNS, INTENSITY_COLUMNS, POPULATION_COLUMNS

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DEFAULT_NAME = "immunoprofile.sqlite"
FAILURE_COLUMNS = ["sample_id", "file", "stage", "code", "message"]
FINDING_COLUMNS = ["sample_id", "code", "severity", "message"]

_INTEGER = {"count", "parent_count", "n_fit_events"}
_REAL = {"pct_parent", "pct_of", "cells_per_ul", "median_raw", "rcv_raw", "median_transformed", "rcv_transformed"}


def _decl(columns: Sequence[str]) -> str:
    out = []
    for c in columns:
        t = "INTEGER" if c in _INTEGER else "REAL" if c in _REAL else "TEXT"
        out.append(f'"{c}" {t}')
    return ", ".join(out)


_ROW_TABLES: dict[str, list[str]] = {
    "populations": POPULATION_COLUMNS,
    "intensities": INTENSITY_COLUMNS,
    "gates": GATE_COLUMNS,
    "findings": FINDING_COLUMNS,
}

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, started_utc TEXT, finished_utc TEXT, status TEXT, exit_code INTEGER,
    out_dir TEXT, command_line TEXT, user TEXT, host TEXT, program_version TEXT, program_fingerprint TEXT,
    options_json TEXT, templates_json TEXT, n_samples INTEGER, n_ok INTEGER, n_skipped INTEGER,
    n_failed INTEGER, n_deferred INTEGER, n_controls INTEGER, events_gated INTEGER, wall_seconds REAL,
    message TEXT);
CREATE TABLE IF NOT EXISTS samples (
    sample_id TEXT PRIMARY KEY, kind TEXT, file TEXT, path TEXT, file_sha256 TEXT, n_events INTEGER,
    template TEXT, template_version TEXT, template_sha256 TEXT, options_sha256 TEXT, cache_key TEXT,
    status TEXT, run_id TEXT REFERENCES runs(run_id), metadata_json TEXT);
CREATE TABLE IF NOT EXISTS run_samples (
    run_id TEXT REFERENCES runs(run_id), sample_id TEXT, kind TEXT, status TEXT, file_sha256 TEXT,
    template_sha256 TEXT, cache_key TEXT, worker TEXT, seconds REAL, message TEXT,
    PRIMARY KEY (run_id, sample_id));
CREATE TABLE IF NOT EXISTS populations (row INTEGER, {_decl(POPULATION_COLUMNS)}, extra_json TEXT,
    PRIMARY KEY (sample_id, row));
CREATE TABLE IF NOT EXISTS intensities (row INTEGER, {_decl(INTENSITY_COLUMNS)}, PRIMARY KEY (sample_id, row));
CREATE TABLE IF NOT EXISTS gates (row INTEGER, {_decl(GATE_COLUMNS)}, PRIMARY KEY (sample_id, row));
CREATE TABLE IF NOT EXISTS findings (row INTEGER, {_decl(FINDING_COLUMNS)}, PRIMARY KEY (sample_id, row));
CREATE TABLE IF NOT EXISTS failures (sample_id TEXT PRIMARY KEY, file TEXT, stage TEXT, code TEXT, message TEXT,
    run_id TEXT);
CREATE INDEX IF NOT EXISTS populations_population ON populations (population);
"""


def connect(path: str | os.PathLike, *, create: bool = True) -> sqlite3.Connection:
    """Open (and if needed create) a results database.

    Raises
    ------
    ResultsError
        The file is missing (``create=False``), is not SQLite, or was written by a newer schema.
    """
    p = Path(path)
    if not create and not p.is_file():
        raise ResultsError("no such results database", path=str(p),
                           hint="give the immunoprofile.sqlite written by `immunoprofile gate` (or its --db)")
    try:
        if create:
            p.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(str(p), timeout=60.0, isolation_level=None)
        con.execute("PRAGMA synchronous=FULL")
        con.execute("PRAGMA foreign_keys=ON")
        if create:
            con.executescript(SCHEMA)
            con.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        row = con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    except sqlite3.DatabaseError as e:
        raise ResultsError(f"not a readable results database ({e})", path=str(p),
                           hint="give the immunoprofile.sqlite written by `immunoprofile gate`") from e
    if row is None or int(row[0]) > SCHEMA_VERSION:
        con.close()
        raise ResultsError(f"results database schema {row[0] if row else '?'} is not supported "
                           f"(this immunoprofile reads {SCHEMA_VERSION})", path=str(p),
                           hint="upgrade immunoprofile, or give a database it wrote")
    return con


def copy_database(src: Path, dst: Path) -> bool:
    """Copy a database consistently (SQLite backup API); False (and a warning) if ``src`` is unreadable."""
    try:
        with closing(sqlite3.connect(f"file:{src}?mode=ro", uri=True, timeout=60.0)) as a, \
                closing(sqlite3.connect(str(dst))) as b:
            a.backup(b)
        return True
    except sqlite3.DatabaseError as e:
        log.warning("%s: cannot copy the previous results database (%s); starting a new one", src, e)
        dst.unlink(missing_ok=True)
        return False


def _plain(v: Any) -> Any:
    """A value SQLite can bind: numpy scalars to Python, NaN to NULL."""
    if v is None:
        return None
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        v = v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, (bool, int, float, str, bytes)):
        return v
    return str(v)


def record_run(
    con: sqlite3.Connection,
    run: Mapping[str, Any],
    samples: Sequence[Mapping[str, Any]],
    rows: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]],
    failures: Sequence[Mapping[str, Any]],
) -> None:
    """Record one run in a single transaction.

    Parameters
    ----------
    run
        The ``runs`` row.
    samples
        One mapping per sample of the run: ``sample_id``, ``status`` (``ok``, ``skipped``,
        ``failed``, ``deferred``) and the ``samples``/``run_samples`` columns. Samples that were
        ``ok``/``skipped``/``failed`` replace their previous rows; ``deferred`` ones keep them.
    rows
        ``{"populations"|"intensities"|"gates"|"findings": {sample_id: [row, ...]}}``.
    failures
        ``failures.csv`` rows.

    Raises
    ------
    AbortedError
        The database cannot be written (disk full, read-only, locked for over a minute).
    """
    try:
        con.execute("BEGIN IMMEDIATE")
        _insert(con, "runs", [run])
        for s in samples:
            sid = s["sample_id"]
            con.execute("INSERT OR REPLACE INTO run_samples (run_id, sample_id, kind, status, file_sha256, "
                        "template_sha256, cache_key, worker, seconds, message) VALUES (?,?,?,?,?,?,?,?,?,?)",
                        [_plain(x) for x in (run["run_id"], sid, s.get("kind"), s["status"], s.get("file_sha256"),
                                             s.get("template_sha256"), s.get("cache_key"), s.get("worker"),
                                             s.get("seconds"), s.get("message"))])
            if s["status"] == "deferred":
                continue
            for table in (*_ROW_TABLES, "failures"):
                con.execute(f"DELETE FROM {table} WHERE sample_id = ?", (sid,))
            con.execute(
                "INSERT OR REPLACE INTO samples (sample_id, kind, file, path, file_sha256, n_events, template, "
                "template_version, template_sha256, options_sha256, cache_key, status, run_id, metadata_json) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                [_plain(x) for x in (sid, s.get("kind"), s.get("file"), s.get("path"), s.get("file_sha256"),
                                     s.get("n_events"), s.get("template"), s.get("template_version"),
                                     s.get("template_sha256"), s.get("options_sha256"), s.get("cache_key"),
                                     "failed" if s["status"] == "failed" else "ok", run["run_id"],
                                     json.dumps(s.get("metadata", {}), sort_keys=True, default=str))])
            for table, columns in _ROW_TABLES.items():
                recs = []
                for i, r in enumerate(rows.get(table, {}).get(sid, ())):
                    rec = {"row": i, **{c: r.get(c) for c in columns}}
                    if table == "populations":
                        extra = {k: v for k, v in r.items() if k not in columns}
                        rec["extra_json"] = json.dumps(extra, default=str) if extra else None
                    recs.append(rec)
                _insert(con, table, recs)
        _insert(con, "failures", [{**{c: f.get(c) for c in FAILURE_COLUMNS}, "run_id": run["run_id"]}
                                  for f in failures])
        con.execute("COMMIT")
    except sqlite3.Error as e:
        if con.in_transaction:
            con.execute("ROLLBACK")
        raise AbortedError(f"cannot write the results database ({e})", code="DATABASE_WRITE_FAILED",
                           hint="check free disk space and that no other program holds the database") from e


def _insert(con: sqlite3.Connection, table: str, recs: Iterable[Mapping[str, Any]]) -> None:
    recs = list(recs)
    if not recs:
        return
    cols = list(recs[0])
    sql = (f"INSERT OR REPLACE INTO {table} ({', '.join(chr(34) + c + chr(34) for c in cols)}) "
           f"VALUES ({', '.join('?' * len(cols))})")
    con.executemany(sql, [[_plain(r.get(c)) for c in cols] for r in recs])


# ------------------------------------------------------------------------------------------- readers
def _read(path: str | os.PathLike, sql: str) -> pd.DataFrame:
    with closing(connect(path, create=False)) as con:
        return pd.read_sql_query(sql, con)


def _numeric(df: pd.DataFrame, columns: Iterable[str]) -> pd.DataFrame:
    for c in columns:
        if c in df.columns:
            df[c] = pd.to_numeric(df[c], errors="coerce").astype("float64")
    return df


def _text(df: pd.DataFrame, columns: Iterable[str]) -> pd.DataFrame:
    for c in columns:
        if c in df.columns:
            df[c] = df[c].astype(object).where(df[c].notna(), "").astype(str)
    return df


def _rows(path: str | os.PathLike, table: str, columns: Sequence[str]) -> pd.DataFrame:
    cols = ", ".join(f'"{c}"' for c in columns)
    extra = ", extra_json" if table == "populations" else ""
    df = _read(path, f"SELECT {cols}{extra} FROM {table} ORDER BY sample_id, row")
    num = [c for c in columns if c in _INTEGER or c in _REAL]
    df = _numeric(df, num)
    df = _text(df, [c for c in columns if c not in num])
    if table == "populations":
        extras = df.pop("extra_json")
        parsed = [json.loads(x) if isinstance(x, str) and x else {} for x in extras]
        names = list(dict.fromkeys(k for d in parsed for k in d))
        for n in names:
            df[n] = [str(d.get(n, "")) for d in parsed]
    return df


def load_populations(db_path: str | os.PathLike) -> pd.DataFrame:
    """Every sample's populations, in the ``populations.csv`` layout.

    Columns are :data:`immunoprofile.stats.POPULATION_COLUMNS` then the sheets' extra columns;
    rows are sorted by ``sample_id`` and then in template order, as in ``populations.csv``.
    Text columns are ``str`` (empty when missing); ``count``, ``parent_count``, ``pct_parent``,
    ``pct_of``, ``cells_per_ul`` are float (NaN when empty). Only the latest result of each
    sample is held (reruns replace rows).

    Raises
    ------
    ResultsError
        The file is missing or is not a results database.
    """
    return _rows(db_path, "populations", POPULATION_COLUMNS)


def load_gates(db_path: str | os.PathLike) -> pd.DataFrame:
    """Every sample's gates, in the ``gates.csv`` layout (see :func:`load_populations`).

    Raises
    ------
    ResultsError
        The file is missing or is not a results database.
    """
    return _rows(db_path, "gates", GATE_COLUMNS)


def load_intensities(db_path: str | os.PathLike) -> pd.DataFrame:
    """Every sample's intensities, in the ``intensities.csv`` layout.

    Raises
    ------
    ResultsError
        The file is missing or is not a results database.
    """
    return _rows(db_path, "intensities", INTENSITY_COLUMNS)


def load_findings(db_path: str | os.PathLike) -> pd.DataFrame:
    """Every sample's findings, in the ``findings.csv`` layout.

    Raises
    ------
    ResultsError
        The file is missing or is not a results database.
    """
    return _rows(db_path, "findings", FINDING_COLUMNS)


def load_failures(db_path: str | os.PathLike) -> pd.DataFrame:
    """Samples whose latest run failed, in the ``failures.csv`` layout.

    Raises
    ------
    ResultsError
        The file is missing or is not a results database.
    """
    cols = ", ".join(FAILURE_COLUMNS)
    return _text(_read(db_path, f"SELECT {cols} FROM failures ORDER BY sample_id"), FAILURE_COLUMNS)


def load_runs(db_path: str | os.PathLike) -> pd.DataFrame:
    """One row per recorded run, in the order they were recorded.

    Raises
    ------
    ResultsError
        The file is missing or is not a results database.
    """
    return _read(db_path, "SELECT * FROM runs ORDER BY rowid")


def load_samples(db_path: str | os.PathLike) -> pd.DataFrame:
    """One row per sample: its file and template hashes, cache key, status and the run that wrote it.

    Raises
    ------
    ResultsError
        The file is missing or is not a results database.
    """
    return _read(db_path, "SELECT * FROM samples ORDER BY sample_id")
