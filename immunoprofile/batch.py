"""Many samples: choose templates, derive FMO thresholds, run in parallel, skip finished work, publish.

A run (:func:`run_gate`) goes through these steps, each logged to ``run.log``:

1. take the output folder's lock (a second run exits at once), start the worker processes
   (they import the gating stack meanwhile) and repair what an interrupted run left
   (:func:`immunoprofile.report.recover`);
2. stat every input file: a file younger than ``min_age`` is *deferred*, not failed; a
   file's sha256 comes from the path index when its state (device, inode, size, mtime,
   ctime) is the recorded one, is computed here only when cached results could be reused
   (the cache is in use and the file was touched or changed), and otherwise comes from the
   worker that gates it;
3. one stream of work: every FMO control is looked up in the cache
   (:mod:`immunoprofile.cache`) or queued, then the stained samples that need no control;
   when the last control of a batch finishes, that batch's stained samples are queued with
   its thresholds. Work runs on the executor (this process, a process pool or a Dask
   cluster); results are sorted, so they never depend on the order in which workers finish;
4. files that changed while a worker read them, or during the run, are deferred; too many
   failures abort the run;
5. tables, ``run.log``, the database and ``manifest.json`` are written into a staging
   folder that replaces the output folder in one atomic step.

One bad file never sinks the batch: its error goes to ``failures.csv`` with a stable
code and every other sample completes (exit status 1). See ``docs/batch.md``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import shutil
import sqlite3
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from . import __version__, panel, provenance
from .cache import FileState, PathIndex, SampleCache, make_key, program_fingerprint
from .errors import EXIT_OK, EXIT_SAMPLES_FAILED, AbortedError, ImmunoprofileError, SampleError, UsageError
from .executor import make_executor
from .gating import FmoKey, FmoValue
from .lock import RunLock
from .pipeline import Options, SampleOutput, channel_hints, template_marker_for
from .progress import Progress
from .provenance import DB_NAME, RUN_LOG, TABLES
from .report import (
    MANIFEST, publish, read_manifest, recover, sha256_file, staging_dir, tables_equal_frame, utc_now, work_area,
    write_csv, write_json, write_parquet,
)
from .samplesheet import extra_columns
from .stats import GATE_COLUMNS, INTENSITY_COLUMNS, POPULATION_COLUMNS
from .templates import Template
from .work import Task, TaskResult, failure_row, file_stat

log = logging.getLogger(__name__)

FAILURE_COLUMNS = ["sample_id", "file", "stage", "code", "message"]
FINDING_COLUMNS = ["sample_id", "code", "severity", "message"]
#: error codes that may not happen again on the same inputs: never cached
TRANSIENT_CODES = frozenset({"INTERNAL_ERROR", "WORKER_DIED", "FILE_MISSING", "FILE_UNREADABLE"})
_OWN_NAMES = frozenset({*TABLES, RUN_LOG, MANIFEST, DB_NAME, f"{DB_NAME}-journal", f"{DB_NAME}-wal", f"{DB_NAME}-shm"})


@dataclass(frozen=True)
class RunSettings:
    """How a run executes; none of these change results (so none is part of a cache key).

    Attributes
    ----------
    jobs
        Worker processes (1: everything in this process).
    executor
        ``'process'`` (local processes) or ``'dask'`` (an existing Dask cluster at ``scheduler``).
    force
        Ignore the cache: gate everything again.
    db
        Results database; None: ``OUT/immunoprofile.sqlite`` (published with the folder).
    fail_fast
        Abort at the first failed sample (nothing is published).
    max_failed
        Abort when more than this fraction of the samples fails (nothing is published).
    min_age
        Defer files modified less than this many seconds ago.
    log_format
        ``'text'`` or ``'json'`` lines in ``run.log``.
    scheduler_timeout
        Seconds to wait for the Dask scheduler to answer.
    """

    jobs: int = 1
    executor: str = "process"
    scheduler: str | None = None
    force: bool = False
    db: str | None = None
    fail_fast: bool = False
    max_failed: float | None = None
    min_age: float = 0.0
    log_format: str = "text"
    scheduler_timeout: float = 30.0


@dataclass
class RunSummary:
    """What a run did, for the one-line summary and the exit status.

    ``ok``, ``skipped``, ``failed`` and ``deferred`` are disjoint and count every row of the
    sheet (FMO controls included) except controls for markers no template uses (``ignored``):
    ``ok`` were gated by this run, ``skipped`` were unchanged (results reused from the cache).
    """

    run_id: str = ""
    out_dir: str = ""
    total: int = 0
    ok: int = 0
    skipped: int = 0
    failed: int = 0
    deferred: int = 0
    ignored: int = 0
    controls: int = 0
    events: int = 0
    seconds: float = 0.0
    failures: list[dict[str, Any]] = field(default_factory=list)
    deferrals: list[dict[str, Any]] = field(default_factory=list)
    workers: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return EXIT_SAMPLES_FAILED if self.failed else EXIT_OK

    @property
    def gated(self) -> int:
        """Files actually gated by this run (ok, or failed while gating; not from the cache)."""
        return self.ok + sum(1 for f in self.failures if not f.get("cached") and f.get("stage") != "template")

    def line(self) -> str:
        rate = self.events / self.seconds if self.seconds > 0 else 0.0
        return (f"{self.total} samples: {self.ok} ok, {self.skipped} skipped (unchanged), {self.failed} failed, "
                f"{self.deferred} deferred ({self.controls} FMO controls); {self.events:,} events gated in "
                f"{self.seconds:.1f} s ({rate:,.0f} events/s)")

    def as_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "samples": self.total, "ok": self.ok, "skipped": self.skipped,
                "failed": self.failed, "deferred": self.deferred, "ignored": self.ignored,
                "controls": self.controls, "events_gated": self.events, "wall_seconds": round(self.seconds, 3),
                "events_per_second": round(self.events / self.seconds, 1) if self.seconds > 0 else 0.0}


def assign_templates(samples: pd.DataFrame, templates: Sequence[Template]) -> list[Template | None]:
    """The template for each sample: the only one, or the one whose ``panel`` matches the sheet's.

    Raises
    ------
    UsageError
        Several templates but no ``panel`` column, or two templates for one panel.
    """
    if len(templates) == 1:
        return [templates[0]] * len(samples)
    by_panel: dict[str, Template] = {}
    for t in templates:
        if not t.panel:
            raise UsageError(f"template {t.name!r} has no 'panel', so it cannot be chosen per sample",
                             hint="give one --template, or add 'panel:' to each template")
        if t.panel in by_panel:
            raise UsageError(f"templates {by_panel[t.panel].name!r} and {t.name!r} are both for panel {t.panel!r}")
        by_panel[t.panel] = t
    if (samples["panel"] == "").all():
        raise UsageError("several templates were given but the samples have no 'panel'",
                         hint="add a 'panel' column to the sample sheet (values: "
                              + ", ".join(sorted(by_panel)) + ")")
    return [by_panel.get(p) for p in samples["panel"]]


@dataclass
class _Item:
    """One row of the sheet as the run sees it."""

    index: int
    row: dict[str, Any]
    template: Any
    kind: str  # 'control' | 'sample'
    path: str
    size: int | None = None
    mtime_ns: int | None = None
    state: FileState | None = None  # (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns) when the run started
    checked_ns: int = 0  # when ``state`` was taken
    sha256: str | None = None
    status: str = ""  # ok | skipped | failed | deferred | ignored
    key: str | None = None
    key_parts: dict[str, Any] = field(default_factory=dict)  # the cache key without the file's sha256
    output: SampleOutput | None = None
    fmo_values: dict[FmoKey, FmoValue] | None = None
    failure: dict[str, Any] | None = None
    reason: str = ""
    worker: str = ""
    seconds: float = 0.0
    started: float = 0.0  # time.time() on the worker when the work started and ended
    finished: float = 0.0

    @property
    def sample_id(self) -> str:
        return str(self.row["sample_id"])

    @property
    def file(self) -> str:
        return str(self.row["file"])

    @property
    def group(self) -> tuple[str, str, str]:
        return (self.template.name if self.template is not None else "", self.row["batch"], self.row["panel"])


def run_gate(
    samples: pd.DataFrame,
    templates: Sequence[Template],
    out_dir: str | Path,
    options: Options | None = None,
    *,
    fail_fast: bool = False,
    command_options: dict[str, Any] | None = None,
    settings: RunSettings | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> RunSummary:
    """Gate every sample and publish the results folder (see the module docstring).

    Parameters
    ----------
    samples
        The sample table (:func:`immunoprofile.samplesheet.read_sheet`).
    templates
        One template, or one per panel.
    out_dir
        The results folder (replaced atomically).
    options
        Options that change results.
    fail_fast
        Same as ``settings.fail_fast``.
    command_options
        What the command line said, for ``manifest.json``.
    settings
        How to run (:class:`RunSettings`); default: in this process, with the cache.
    on_progress
        Called after each sample with the counts so far.

    Raises
    ------
    UsageError
        Impossible template selection, bad settings, an output folder that holds other
        files, an unreachable Dask scheduler (nothing processed).
    AbortedError
        Lock held, disk full, too many failures, ``fail_fast`` (the output folder unchanged).
    KeyboardInterrupt
        Interrupted (the output folder unchanged).
    """
    settings = settings or RunSettings()
    if fail_fast and not settings.fail_fast:
        settings = RunSettings(**{**asdict(settings), "fail_fast": True})
    _check_settings(settings)
    options = options or Options()
    shown = Path(out_dir)
    out = Path(os.path.abspath(shown))
    if out.exists():
        out = out.resolve()
    _check_out_dir(out, shown)
    chosen = assign_templates(samples, templates)
    executor = make_executor(settings.executor, settings.jobs, settings.scheduler, settings.scheduler_timeout)
    lock = RunLock(work_area(out) / "lock", what=str(shown))
    try:
        lock.acquire()
        run = _Run(samples, list(templates), chosen, out, shown, options, settings, command_options or {},
                   executor, on_progress)
        return run.execute()
    finally:
        executor.close()
        lock.release()


def _check_settings(s: RunSettings) -> None:
    if s.max_failed is not None and not (0.0 <= s.max_failed <= 1.0) or (
            s.max_failed is not None and math.isnan(s.max_failed)):
        raise UsageError(f"--max-failed must be a fraction between 0 and 1 (e.g. 0.2), got {s.max_failed}")
    if s.min_age < 0 or math.isnan(s.min_age):
        raise UsageError(f"--min-age must be 0 or more seconds, got {s.min_age}")
    if s.log_format not in ("text", "json"):
        raise UsageError(f"unknown log format {s.log_format!r}; choose text or json")


def _check_out_dir(out: Path, shown: Path) -> None:
    """Refuse to replace a folder that is not ours (it would be deleted)."""
    if out.exists() and not out.is_dir():
        raise UsageError("exists and is not a folder", path=str(shown), hint="choose a folder for --out")
    if not out.is_dir() or not any(out.iterdir()):
        return
    try:
        doc = read_manifest(out)
    except ImmunoprofileError:
        doc = {}
    if doc.get("program") != "immunoprofile gate":
        raise UsageError("the output folder holds other files and is not a results folder of `immunoprofile gate`; "
                         "it would be replaced", path=str(shown),
                         hint="choose a new or empty folder for --out (results folders are replaced as a whole)")


def _new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]


def _options_sha(options: Options) -> str:
    return hashlib.sha256(json.dumps(asdict(options), sort_keys=True, default=str).encode()).hexdigest()


def _is_disk_error(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class _Run:
    """The state of one run (see :func:`run_gate`)."""

    def __init__(self, samples: pd.DataFrame, templates: list[Template], chosen: list[Template | None], out: Path,
                 shown: Path, options: Options, settings: RunSettings, command_options: dict[str, Any],
                 executor: Any, on_progress: Callable[[Progress], None] | None) -> None:
        self.samples, self.templates, self.out, self.shown = samples, templates, out, shown
        self.options, self.settings, self.command_options = options, settings, command_options
        self.executor, self.on_progress = executor, on_progress
        self.run_id = _new_run_id()
        self.started = utc_now()
        self.t0 = time.perf_counter()
        self.extras = tuple(extra_columns(samples))
        self.options_sha = _options_sha(options)
        self.fingerprint = program_fingerprint()
        self.summary = RunSummary(run_id=self.run_id, out_dir=str(shown))
        self.cache = SampleCache(work_area(out) / "cache", enabled=not settings.force)
        self.index = PathIndex(self.cache.folder).load()
        self._index_pending: list[tuple[str, FileState, str, int]] = []  # (path, state, sha256, checked_ns)
        self._queued_samples = 0
        self._deferred_groups: dict[tuple[str, str, str], bool] = {}
        self.items = [_Item(i, row, chosen[i], "control" if row["control"] else "sample",
                            os.path.abspath(str(row["path"])))
                      for i, row in enumerate(samples.to_dict("records"))]
        self.template_inputs = {id(t): _template_inputs(t) for t in templates}
        self.fmo: dict[tuple[str, str, str], dict[FmoKey, FmoValue]] = {}
        self.fmo_panels: set[tuple[str, str]] = set()
        self.hints_memo: dict[tuple[str, str], dict[str, str] | None] = {}
        self._hash_pool: Any = None
        self.stage: Path | None = None
        self.log_handler: logging.Handler | None = None
        self.db_path: Path | None = None
        self.db_external = False
        self.phases: dict[str, float] = {}
        self._hash_futures: dict[int, Any] = {}

    # ------------------------------------------------------------------------------ orchestration
    def execute(self) -> RunSummary:
        logger = logging.getLogger("immunoprofile")
        saved_level = logger.level
        try:
            try:
                if self._expect_work():  # the workers start (and import) while this process prepares
                    getattr(self.executor, "warm_up", lambda: None)()
                repaired = recover(self.out)
                self.cache.clean_temporary()
                self.stage = staging_dir(self.out, self.run_id)
                logger.setLevel(logging.DEBUG)
                self._open_log()
                for msg in repaired:
                    log.warning("%s", msg)
                self._header()
                self._open_database()
                self._inspect_inputs()
                self.phases["startup"] = round(time.perf_counter() - self.t0, 3)
                self._schedule()
                self._final_checks()
                self._check_abort(final=True)
                self._finish()
            except OSError as e:
                raise _write_error(e, self.stage or self.out) from e
        except BaseException as e:
            self._abandon(e)
            raise
        finally:
            logger.setLevel(saved_level)
            self._close_log()
        return self.summary

    def _expect_work(self) -> bool:
        """Whether much gating is likely (``--force``, or fewer cache entries than samples): then the
        worker processes are started at once, while this process prepares the run."""
        if not self.cache.enabled:
            return True
        n = 0
        if self.cache.folder.is_dir():
            for n, _ in enumerate(self.cache.folder.glob("*/*.pkl"), start=1):
                if n >= len(self.items):
                    return False
        return n < len(self.items)

    def _header(self) -> None:
        s = self.settings
        log.info("run %s: %d samples -> %s", self.run_id, len(self.items), self.shown)
        log.info("immunoprofile %s (program fingerprint %s)", __version__, self.fingerprint[:16])
        where = f"scheduler {s.scheduler}" if self.executor.name == "dask" else f"jobs {s.jobs}"
        log.info("executor %s, %s, cache %s%s", self.executor.name, where, self.cache.folder,
                 " (ignored: --force)" if s.force else "")
        for t in self.templates:
            log.info("template %s %s (sha256 %s) from %s", t.name, t.version, t.sha256[:16], t.source)

    def _progress(self, current: str = "") -> None:
        if self.on_progress is None:
            return
        sm = self.summary
        done = sm.ok + sm.skipped + sm.failed + sm.deferred + sm.ignored
        try:
            self.on_progress(Progress(done, len(self.items), sm.ok, sm.skipped, sm.failed, sm.deferred, current))
        except Exception:  # noqa: BLE001 - a display problem never stops a run
            log.debug("progress callback failed", exc_info=True)

    # ------------------------------------------------------------------------------ logging
    def _open_log(self) -> None:
        assert self.stage is not None
        h = logging.FileHandler(self.stage / RUN_LOG, encoding="utf-8")
        h.setLevel(logging.DEBUG)
        if self.settings.log_format == "json":
            from .logjson import JsonFormatter

            h.setFormatter(JsonFormatter())
        else:
            fmt = logging.Formatter("%(asctime)s.%(msecs)03dZ %(levelname)-7s %(name)s: %(message)s",
                                    datefmt="%Y-%m-%dT%H:%M:%S")
            fmt.converter = time.gmtime
            h.setFormatter(fmt)
        logging.getLogger("immunoprofile").addHandler(h)
        self.log_handler = h

    def _close_log(self) -> None:
        h = self.log_handler
        if h is None:
            return
        logging.getLogger("immunoprofile").removeHandler(h)
        try:
            h.flush()
            if h.stream is not None:
                os.fsync(h.stream.fileno())
        except (OSError, ValueError):
            pass
        h.close()
        self.log_handler = None

    def _emit_worker_logs(self, res: TaskResult) -> None:
        for level, name, message, created in res.logs:
            rec = logging.makeLogRecord({"name": name, "levelno": level, "levelname": logging.getLevelName(level),
                                         "msg": message, "args": None, "created": created,
                                         "msecs": (created - int(created)) * 1000, "worker": res.worker})
            logging.getLogger(name).handle(rec)

    # ------------------------------------------------------------------------------ database
    def _open_database(self) -> None:
        from . import store

        assert self.stage is not None
        default = self.out / DB_NAME
        given = Path(os.path.abspath(self.settings.db)) if self.settings.db else None
        if given is None or given == default:
            self.db_path = self.stage / DB_NAME
            if default.is_file():
                store.copy_database(default, self.db_path)
        else:
            self.db_path, self.db_external = given, True
        try:
            store.connect(self.db_path).close()
        except sqlite3.Error as e:
            raise AbortedError(f"cannot open the results database ({e})", path=str(self.db_path),
                               code="DATABASE_WRITE_FAILED") from e
        log.info("results database: %s%s", self.db_path if self.db_external else self.out / DB_NAME,
                 " (shared)" if self.db_external else "")

    # ------------------------------------------------------------------------------ inputs
    def _inspect_inputs(self) -> None:
        """Stat every file; defer young ones; find each file's sha256 where a cache hit is possible.

        A file is hashed here only if its results could come from the cache: the cache is in
        use and the path index (:class:`~immunoprofile.cache.PathIndex`) has an entry for the
        path whose recorded state differs from the file's (touched, or changed); an entry with
        the same state gives its sha256 without reading the file. A path the index does not
        know cannot have cached results (the path is part of every key): the worker's sha256
        makes its key. Hashing runs in background threads, FMO controls first; :meth:`_hashed`
        waits for one file.
        """
        t0 = time.perf_counter()
        legacy = self.cache.enabled and not self.index.found and self.cache.has_entries()
        if legacy:
            log.info("no path index in the cache (a cache from an older immunoprofile): hashing every file")
        to_hash: list[_Item] = []
        counts = {"same": 0, "changed": 0, "unknown": 0}
        for it in sorted(self.items, key=lambda i: i.kind != "control"):
            it.checked_ns = time.time_ns()
            it.state = file_stat(it.path)
            if it.state is None:
                continue  # missing, or not a file: the worker reports it with the reader's message
            it.size, it.mtime_ns = it.state[2], it.state[3]
            age = time.time() - it.mtime_ns / 1e9
            if self.settings.min_age and age < self.settings.min_age:
                it.reason = f"modified {age:.0f} s ago, less than --min-age {self.settings.min_age:g} s"
                continue
            if not self.cache.enabled:
                continue
            what, sha = self.index.lookup(it.path, it.state)
            counts[what] += 1
            if what == "same":
                it.sha256 = sha
            elif what == "changed" or legacy:
                to_hash.append(it)
        if to_hash:
            from concurrent.futures import ThreadPoolExecutor

            self._hash_pool = ThreadPoolExecutor(max_workers=max(1, min(4, self.settings.jobs)),
                                                 thread_name_prefix="immunoprofile-hash")
            self._hash_futures = {it.index: self._hash_pool.submit(self._hash_item, it) for it in to_hash}
            self._hash_pool.shutdown(wait=False)
        for it in self.items:
            if it.reason:
                self._defer(it, it.reason)
        log.info("inputs: %d files (%.0f MB) in %.2f s; path index: %d unchanged, %d changed or touched (hashed "
                 "here), %d new (hashed by the workers)%s", len(self.items),
                 sum(it.size or 0 for it in self.items) / 1e6, time.perf_counter() - t0, counts["same"],
                 len(to_hash), counts["unknown"] - (len(to_hash) - counts["changed"]),
                 "" if self.cache.enabled else " (--force: nothing hashed here)")

    def _hashed(self, it: _Item) -> _Item:
        fut = self._hash_futures.get(it.index)
        if fut is not None:
            fut.result()
            if it.reason and it.status != "deferred":
                self._defer(it, it.reason)
        return it

    def _hash_item(self, it: _Item) -> None:
        """sha256 of a file whose cached results may be reused; records it in the path index."""
        try:
            sha = sha256_file(it.path)
        except OSError:
            return  # the worker reports the unreadable file
        after = file_stat(it.path)
        if after is None or after[2:4] != it.state[2:4]:
            it.reason = "the file changed while it was read (still being written?)"
            return
        it.sha256 = sha
        if after == it.state:
            self._index_pending.append((it.path, it.state, sha, it.checked_ns))

    def _defer(self, it: _Item, reason: str) -> None:
        if it.status == "deferred":
            return
        self._uncount(it)
        it.status, it.reason, it.output, it.failure = "deferred", reason, None, None
        self.summary.deferred += 1
        self.summary.deferrals.append({"sample_id": it.sample_id, "file": it.file, "reason": reason})
        log.warning("%s: deferred: %s", it.file, reason)
        self._progress(it.sample_id)

    def _uncount(self, it: _Item) -> None:
        sm = self.summary
        if it.status == "ok":
            sm.ok -= 1
            sm.events -= it.output.n_events if it.output else 0
        elif it.status == "skipped":
            sm.skipped -= 1
        elif it.status == "failed":
            sm.failed -= 1
            sm.failures = [f for f in sm.failures if f["sample_id"] != it.sample_id]
        if it.status in ("ok", "skipped") and it.kind == "control":
            sm.controls -= 1

    # ------------------------------------------------------------------------------ the schedule
    def _schedule(self) -> None:
        """Gate everything in one stream: FMO controls, and stained samples as soon as they can run.

        Every FMO control is queued first, then the stained samples whose batch needs no
        control; when the last control of a (template, batch, panel) group finishes, that
        group's stained samples are queued with its thresholds. ``phase_seconds`` records
        ``controls`` (until the last control finished) and ``samples`` (the rest).
        """
        t0 = time.perf_counter()
        for it in self.items:
            if it.kind == "control" and it.template is not None:
                self.fmo_panels.add((it.template.name, it.row["panel"]))  # even if deferred
        running: dict[tuple[str, str, str], int] = {}
        held: dict[tuple[str, str, str], list[_Item]] = {}
        for it in self.items:
            if it.kind == "control" and self._start_control(it):
                running[it.group] = running.get(it.group, 0) + 1
        for it in self.items:
            if it.kind != "sample" or it.status:
                continue
            if it.template is not None and running.get(it.group):
                held.setdefault(it.group, []).append(it)
            else:
                self._start_sample(it)
        self._check_abort()
        queued = sum(running.values()) + self._queued_samples
        if queued:
            log.info("gating %d FMO control(s) and %d sample(s) (%d waiting for their controls) with %s",
                     sum(running.values()), self._queued_samples + sum(len(v) for v in held.values()),
                     sum(len(v) for v in held.values()), self.executor.name)
        controls_left = sum(running.values())
        if not controls_left:
            self.phases["controls"] = round(time.perf_counter() - t0, 3)
        t_samples = time.perf_counter()
        for res in self.executor.completed():
            it = self.items[res.index]
            self._take(it, res)
            if it.kind == "control":
                running[it.group] -= 1
                controls_left -= 1
                if not running[it.group]:
                    for sample in held.pop(it.group, []):
                        self._start_sample(sample)
                if not controls_left:
                    t_samples = time.perf_counter()
                    self.phases["controls"] = round(t_samples - t0, 3)
            self._check_abort()
        self.phases["samples"] = round(time.perf_counter() - t_samples, 3)

    def _start_control(self, it: _Item) -> bool:
        """Reuse an FMO control's results or queue it; True if it was queued."""
        tpl = it.template
        if it.status == "deferred":
            return False
        if tpl is None:
            self._fail(it, failure_row(it.sample_id, it.file, "template", _panel_error(it.row, self.templates)))
            self._hash_unqueued(it)
            return False
        if template_marker_for(tpl, it.row["control"]) is None:
            it.status = "ignored"
            self.summary.ignored += 1
            log.info("%s: %s is not used by template %s; skipped", it.sample_id, it.row["control"], tpl.name)
            self._hash_unqueued(it)
            return False
        hints = self._hints_for(it)
        it.key_parts = {"path": it.path, "sample_id": it.sample_id, "control": it.row["control"],
                        "template": self._template_key(tpl), "options": self.options_sha,
                        "hints": sorted((hints or {}).items())}
        if self._lookup(it):
            return False
        self.executor.submit(Task(it.index, "control", it.sample_id, it.path, it.file, tpl, self.options,
                                  control=it.row["control"], hints=hints))
        return True

    def _start_sample(self, it: _Item) -> None:
        """Reuse a stained sample's results or queue it (its batch's FMO controls are done)."""
        tpl = it.template
        if tpl is None:
            self._fail(it, failure_row(it.sample_id, it.file, "template", _panel_error(it.row, self.templates)))
            self._hash_unqueued(it)
            return
        if self._group_deferred(it.group):
            self._defer(it, f"an FMO control of batch {it.row['batch']!r} is deferred")
            return
        meta = {k: v for k, v in it.row.items() if k != "path"}
        fmo = self._group_fmo(it.group)
        available = (tpl.name, it.row["panel"]) in self.fmo_panels
        it.key_parts = {"path": it.path, "meta": sorted(meta.items()), "extra_columns": list(self.extras),
                        "template": self._template_key(tpl), "options": self.options_sha,
                        "fmo_available": available,
                        "fmo": sorted([k[0], k[1], repr(float(v.value)), v.sample_id, int(v.n_events)]
                                      for k, v in fmo.items())}
        if self._lookup(it):
            return
        self._queued_samples += 1
        self.executor.submit(Task(it.index, "sample", it.sample_id, it.path, it.file, tpl, self.options, meta=meta,
                                  fmo=fmo, fmo_available=available, extra_columns=self.extras))

    def _group_deferred(self, group: tuple[str, str, str]) -> bool:
        """Whether an FMO control of a group whose controls are done was deferred."""
        if group not in self._deferred_groups:
            self._deferred_groups[group] = any(c.kind == "control" and c.group == group and c.status == "deferred"
                                               for c in self.items)
        return self._deferred_groups[group]

    def _group_fmo(self, group: tuple[str, str, str]) -> dict[FmoKey, FmoValue]:
        """The FMO thresholds of a group whose controls are done, merged in sheet order."""
        if group not in self.fmo:
            merged: dict[FmoKey, FmoValue] = {}
            for c in self.items:
                if c.kind == "control" and c.group == group and c.status in ("ok", "skipped") and c.fmo_values:
                    merged.update(c.fmo_values)
            self.fmo[group] = merged
        return self.fmo[group]

    def _hash_unqueued(self, it: _Item) -> None:
        """sha256 for the manifest of a file that is not gated (an unused FMO control, an unknown panel)."""
        if it.sha256 is None and it.state is not None and not it.reason:
            it.sha256 = sha256_file(it.path) if it.index not in self._hash_futures else self._hashed(it).sha256

    def _hints_for(self, control: _Item) -> dict[str, str]:
        """Channel names of the FMO markers, from the first stained sample of the same batch that has them.

        Only the samples' HEADER and TEXT are read (:func:`immunoprofile.fcs.read_fcs_metadata`).
        """
        want = panel.canonical(control.row["control"].split(":", 1)[1])
        for other in self.items:
            if (other.kind != "sample" or other.template is not control.template
                    or other.row["batch"] != control.row["batch"] or other.row["panel"] != control.row["panel"]):
                continue
            if other.reason or other.state is None:  # too young, or missing
                continue
            hints = self._hints_of(other)
            if hints is not None and any(panel.canonical(m) == want for m in hints):
                return hints
        return {}

    def _hints_of(self, it: _Item) -> dict[str, str] | None:
        """Channel hints of one stained file (None if its HEADER or TEXT cannot be read)."""
        from .fcs import read_fcs_metadata

        memo = (it.path, it.template.sha256)
        if memo not in self.hints_memo:
            try:
                meta = read_fcs_metadata(it.path, dataset=self.options.dataset)
            except ImmunoprofileError:
                self.hints_memo[memo] = None  # its own task reports the error
            else:
                self.hints_memo[memo] = channel_hints(meta, it.template)  # type: ignore[arg-type]
        return self.hints_memo[memo]

    def _template_key(self, tpl: Any) -> dict[str, Any]:
        return {"sha256": tpl.sha256, "files": self.template_inputs.get(id(tpl), [])}

    # ------------------------------------------------------------------------------ results
    def _key(self, it: _Item, sha256: str) -> str:
        return make_key(it.kind, {**it.key_parts, "file_sha256": sha256})

    def _lookup(self, it: _Item) -> bool:
        """Reuse cached results of ``it`` if its sha256 is known here and an entry exists; True if reused."""
        self._hashed(it)
        if it.status == "deferred":
            return True
        if it.sha256 is None:
            return False
        it.key = self._key(it, it.sha256)
        hit = self.cache.get(it.key)
        if hit is None:
            return False
        if hit.get("error"):
            self._fail(it, {**hit["error"], "cached": True})
            return True
        it.output, it.fmo_values = hit["output"], hit.get("fmo_values")
        it.status = "skipped"
        self.summary.skipped += 1
        if it.kind == "control":
            self.summary.controls += 1
        log.debug("%s: unchanged, results reused (cache key %s)", it.sample_id, it.key[:16])
        self._progress(it.sample_id)
        return True

    def _take(self, it: _Item, res: TaskResult) -> None:
        """One task's result: defer, fail or keep it; remember it in the cache and the path index."""
        self._check_worker(res)
        it.worker, it.seconds = res.worker, res.seconds
        it.started, it.finished = res.started, res.finished
        log.debug("%s: %s task ran on %s from %.6f to %.6f (epoch seconds)", it.sample_id, it.kind, res.worker,
                  res.started, res.finished)
        w = self.summary.workers.setdefault(res.worker or "?", {"tasks": 0, "peak_rss": 0, "seconds": 0.0})
        w["tasks"] += 1
        w["peak_rss"] = max(w["peak_rss"], res.peak_rss)
        w["seconds"] += res.seconds
        if res.file_stat is not None and res.file_sha256 and not res.changed and res.file_stat == res.file_stat_after:
            self._index_pending.append((it.path, res.file_stat, res.file_sha256, res.stat_time_ns))
        if res.changed:
            self._defer(it, "the file changed while it was read (still being written?)")
            return
        if it.sha256 is not None and res.file_sha256 and res.file_sha256 != it.sha256:
            self._defer(it, "the file changed during the run (still being written?)")
            return
        if it.sha256 is None and res.file_sha256:
            it.sha256 = res.file_sha256
            it.key = self._key(it, it.sha256)
        if res.error is not None:
            if it.key is not None and res.error["code"] not in TRANSIENT_CODES:
                self.cache.put(it.key, {"error": {k: v for k, v in res.error.items() if k != "traceback"}})
            self._fail(it, res.error)
            return
        it.output, it.fmo_values, it.status = res.output, res.fmo_values, "ok"
        self.summary.ok += 1
        self.summary.events += res.output.n_events
        if it.kind == "control":
            self.summary.controls += 1
        if it.key is not None:
            self.cache.put(it.key, {"output": res.output, "fmo_values": res.fmo_values})
        log.info("%s: %d events gated in %.2f s (%s)", it.sample_id, res.output.n_events, res.seconds, res.worker)
        self._progress(it.sample_id)

    def _check_worker(self, res: TaskResult) -> None:
        self._emit_worker_logs(res)
        if res.fingerprint and res.fingerprint != self.fingerprint:
            raise AbortedError(f"worker {res.worker} runs another immunoprofile (program fingerprint "
                               f"{res.fingerprint[:16]}, this client {self.fingerprint[:16]})",
                               code="WORKER_VERSION_MISMATCH",
                               hint="install the same immunoprofile version on the cluster's workers")

    def _fail(self, it: _Item, failure: dict[str, Any]) -> None:
        it.status, it.failure = "failed", failure
        self.summary.failed += 1
        self.summary.failures.append(failure)
        log.warning("%s [%s]%s", failure["message"], failure["code"], " (unchanged since the last run)"
                    if failure.get("cached") else "")
        if failure.get("traceback"):
            log.debug("traceback for %s:\n%s", it.sample_id, failure["traceback"])
        self._progress(it.sample_id)

    def _check_abort(self, final: bool = False) -> None:
        sm = self.summary
        if not sm.failed:
            return
        if self.settings.fail_fast:
            f = sm.failures[0]
            raise AbortedError(f"stopped at the first failed sample (--fail-fast): {f['message']} [{f['code']}]",
                               code="FAIL_FAST")
        if self.settings.max_failed is None:
            return
        considered = sum(1 for it in self.items if it.status not in ("deferred", "ignored"))
        if sm.failed > self.settings.max_failed * considered:
            codes = sorted({f["code"] for f in sm.failures})
            raise AbortedError(f"{sm.failed} of {considered} samples failed{'' if final else ' so far'}, more than "
                               f"--max-failed {self.settings.max_failed:g} (codes: {', '.join(codes)})",
                               code="TOO_MANY_FAILURES",
                               hint="check the template and the sample sheet; see failures in the log")

    def _final_checks(self) -> None:
        """Defer files whose size or mtime changed since the run stat-ed them (and what depends on them)."""
        changed_groups = set()
        for it in self.items:
            if it.size is None or it.status in ("deferred", "ignored"):
                continue
            try:
                st = os.stat(it.path)
                now = (st.st_size, st.st_mtime_ns)
            except OSError:
                now = None
            if now != (it.size, it.mtime_ns):
                self._defer(it, "the file changed during the run (still being written?)")
                if it.kind == "control":
                    changed_groups.add(it.group)
        for it in self.items:
            if it.kind == "sample" and it.group in changed_groups and it.status in ("ok", "skipped", "failed"):
                self._defer(it, f"an FMO control of batch {it.row['batch']!r} changed during the run")

    # ------------------------------------------------------------------------------ publication
    def _finish(self) -> None:
        assert self.stage is not None
        stage = self.stage
        # rows of one sample stay together and in order; samples are sorted by sample_id (unique)
        outputs = [it.output for it in self.items if it.status in ("ok", "skipped") and it.output is not None]
        failures = [{k: it.failure[k] for k in FAILURE_COLUMNS} for it in self.items
                    if it.status == "failed" and it.failure is not None]
        self.summary.total = len(self.items) - self.summary.ignored
        keep = self._foreign_entries()
        if keep:
            log.warning("carrying %d file(s) not written by immunoprofile into the new results: %s", len(keep),
                        ", ".join(keep[:5]))
        try:
            pops = _frame([r for o in outputs for r in o.populations], POPULATION_COLUMNS + list(self.extras))
            ints = _frame([r for o in outputs for r in o.intensities], INTENSITY_COLUMNS)
            gates = _frame([r for o in outputs for r in o.gates], GATE_COLUMNS)
            finds = _frame([r for o in outputs for r in o.findings], FINDING_COLUMNS)
            fails = _frame(failures, FAILURE_COLUMNS)
            write_csv(pops, stage / "populations.csv")
            write_parquet(pops, stage / "populations.parquet")
            write_csv(ints, stage / "intensities.csv")
            write_csv(gates, stage / "gates.csv")
            write_csv(finds, stage / "findings.csv")
            write_csv(fails, stage / "failures.csv")
            self.summary.seconds = time.perf_counter() - self.t0
            provenance.record_database(self, failures)
            self._log_summary()
            self._close_log()
            write_json(provenance.manifest(self), stage / MANIFEST)
        except OSError as e:
            raise _write_error(e, stage) from e
        try:
            publish(stage, self.out, keep=keep)
        except OSError as e:
            raise _write_error(e, self.out) from e
        self.stage = None
        (work_area(self.out) / "last-aborted-run.log").unlink(missing_ok=True)
        self.cache.prune(self.cache.used)
        self._save_index()

    def _save_index(self) -> None:
        """Remember the sha256 of the files hashed by this run (here or by the workers) in the path index."""
        for path, state, sha, checked_ns in self._index_pending:
            self.index.record(path, state, sha, checked_ns)
        self._index_pending = []
        try:
            self.index.save()
        except OSError as e:  # only a hint: the next run hashes the files again
            log.warning("could not write the path index %s (%s)", self.index.path, e)

    def _log_summary(self) -> None:
        sm = self.summary
        log.info("summary: %s", sm.line(), extra={"summary": sm.as_dict()})
        log.info("phases: %s", ", ".join(f"{k} {v:.2f} s" for k, v in self.phases.items()))
        for w, d in sorted(sm.workers.items()):
            log.info("worker %s: %d task(s), %.1f s, peak RSS %.0f MiB", w, d["tasks"], d["seconds"],
                     d["peak_rss"] / 2**20)

    def _foreign_entries(self) -> list[str]:
        if not self.out.is_dir():
            return []
        return sorted(p.name for p in self.out.iterdir() if p.name not in _OWN_NAMES)

    def _abandon(self, err: BaseException) -> None:
        """An aborted or interrupted run: stop the workers, keep the previous results, save the log."""
        if self._hash_pool is not None:
            self._hash_pool.shutdown(wait=False, cancel_futures=True)
        try:
            self.executor.cancel()
        except Exception:  # noqa: BLE001 - best effort while failing
            log.debug("cancelling the executor failed", exc_info=True)
        kind = "interrupted" if isinstance(err, KeyboardInterrupt) else "aborted"
        self.summary.total = len(self.items) - self.summary.ignored
        self.summary.seconds = time.perf_counter() - self.t0
        if isinstance(err, ImmunoprofileError):
            log.error("run %s %s: %s", self.run_id, kind, err)
        elif isinstance(err, KeyboardInterrupt):
            log.error("run %s interrupted", self.run_id)
        else:
            log.error("run %s failed: %s", self.run_id, err, exc_info=True)
        if self.db_external and self.db_path is not None:
            provenance.record_abandoned(self, kind, str(err))
        if not isinstance(err, KeyboardInterrupt):
            self._save_index()  # the cache entries this run wrote are found again by the next
        self._close_log()
        if self.stage is not None:
            saved = work_area(self.out) / "last-aborted-run.log"
            try:
                if (self.stage / RUN_LOG).is_file():
                    os.replace(self.stage / RUN_LOG, saved)
                    if isinstance(err, AbortedError):
                        err.hint = ((err.hint + "; ") if err.hint else "") + (
                            f"the previous results in {self.shown} are unchanged; this run's log: {saved}")
                        err.args = (str(err),)
            except OSError:
                pass
            shutil.rmtree(self.stage, ignore_errors=True)
            self.stage = None

def _template_inputs(t: Any) -> list[tuple[str, str]]:
    """Files a template reads besides itself (a compensation matrix), with their sha256."""
    comp = getattr(t, "compensation", "")
    if comp and comp not in ("auto", "file", "none", "document"):
        p = Path(comp)
        if not p.is_absolute():
            p = Path(t.source).parent / p if Path(t.source).parent.joinpath(p).exists() else p
        if p.is_file():
            return [(str(p), sha256_file(p))]
    return []


def _write_error(e: OSError, where: Path) -> AbortedError:
    if _is_disk_error(e):
        return AbortedError(f"the disk is full ({e.strerror})", path=str(where), code="DISK_FULL",
                            hint="free some space and run again; the previous results are unchanged")
    what = f" on {e.filename}" if getattr(e, "filename", None) else ""
    return AbortedError(f"stopped by a system error{what} ({e.strerror or e})", path=str(where), code="SYSTEM_ERROR",
                        hint="check permissions, free space and the file system; the previous results are unchanged")


def _panel_error(row: dict[str, Any], templates: Sequence[Template]) -> ImmunoprofileError:
    have = ", ".join(sorted(t.panel or "?" for t in templates))
    return SampleError(f"panel {row['panel']!r} matches none of the templates (panels: {have})", path=row["file"],
                       code="PANEL_UNKNOWN", hint="fix the sheet's 'panel' value or add a template for it")


def _frame(rows: list[dict[str, Any]], columns: Sequence[str]) -> pd.DataFrame:
    df = tables_equal_frame(rows, columns)
    if len(df):
        df = df.sort_values(["sample_id"], kind="stable").reset_index(drop=True)
    return df
