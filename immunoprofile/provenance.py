"""What a run leaves behind besides the tables: its records in the results database and its manifest.

Functions of a run in progress (:class:`immunoprofile.batch._Run`): they read its items,
summary and settings and return (or store) plain records. ``manifest.json`` is described in
``docs/batch.md``; everything in it but the keys listed under ``volatile`` is a function of
the inputs, the options and the program.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from . import __version__
from .errors import ImmunoprofileError
from .report import file_entry, run_context, sha256_file, utc_now
from .work import peak_rss

log = logging.getLogger(__name__)

RUN_LOG = "run.log"
DB_NAME = "immunoprofile.sqlite"
TABLES = ("populations.csv", "populations.parquet", "intensities.csv", "gates.csv", "findings.csv", "failures.csv")


def sample_records(run: Any) -> list[dict[str, Any]]:
    """One record per sample the run looked at (``samples`` and ``run_samples`` of the database)."""
    recs = []
    for it in run.items:
        if it.status in ("", "ignored"):
            continue
        tpl = it.template
        recs.append({
            "sample_id": it.sample_id, "kind": it.kind, "status": it.status, "file": it.file, "path": it.path,
            "file_sha256": it.sha256, "n_events": it.output.n_events if it.output else None,
            "template": getattr(tpl, "name", None), "template_version": getattr(tpl, "version", None),
            "template_sha256": getattr(tpl, "sha256", None), "options_sha256": run.options_sha,
            "cache_key": it.key, "worker": it.worker or None, "seconds": it.seconds or None,
            "message": (it.failure or {}).get("message") or it.reason or None,
            "metadata": {k: v for k, v in it.row.items() if k != "path"},
        })
    return recs


def run_record(run: Any, status: str, exit_code: int, message: str = "") -> dict[str, Any]:
    """The ``runs`` row of the database."""
    ctx = run_context()
    sm = run.summary
    return {"run_id": run.run_id, "started_utc": run.started, "finished_utc": utc_now(), "status": status,
            "exit_code": exit_code, "out_dir": str(run.out), "command_line": json.dumps(ctx["command_line"]),
            "user": ctx["user"], "host": ctx["host"], "program_version": __version__,
            "program_fingerprint": run.fingerprint, "options_json": json.dumps(options_doc(run), default=str),
            "templates_json": json.dumps(templates_doc(run), default=str),
            "n_samples": len(run.items), "n_ok": sm.ok, "n_skipped": sm.skipped, "n_failed": sm.failed,
            "n_deferred": sm.deferred, "n_controls": sm.controls, "events_gated": sm.events,
            "wall_seconds": time.perf_counter() - run.t0, "message": message or None}


def record_database(run: Any, failures: list[dict[str, Any]]) -> None:
    """Record a finished run (results of every sample) in one transaction.

    Raises
    ------
    AbortedError
        The database cannot be written.
    """
    from . import store

    assert run.db_path is not None
    rows: dict[str, dict[str, list[dict[str, Any]]]] = {t: {} for t in ("populations", "intensities", "gates",
                                                                         "findings")}
    for it in run.items:
        if it.status in ("ok", "skipped") and it.output is not None:
            rows["populations"][it.sample_id] = it.output.populations
            rows["intensities"][it.sample_id] = it.output.intensities
            rows["gates"][it.sample_id] = it.output.gates
            rows["findings"][it.sample_id] = it.output.findings
    status = "failed_samples" if run.summary.failed else "ok"
    con = store.connect(run.db_path)
    try:
        store.record_run(con, run_record(run, status, run.summary.exit_code), sample_records(run), rows,
                         failures)
    finally:
        con.close()


def record_abandoned(run: Any, kind: str, message: str) -> None:
    """Record an aborted or interrupted run in a shared database (best effort: a failure is logged)."""
    from . import store

    try:
        con = store.connect(run.db_path)  # type: ignore[arg-type]
        try:
            exit_code = 130 if kind == "interrupted" else 3
            store.record_run(con, run_record(run, kind, exit_code, message),
                             [s for s in sample_records(run) if s["status"] == "deferred"], {}, [])
        finally:
            con.close()
    except (ImmunoprofileError, sqlite3.Error, OSError) as e:
        log.warning("could not record the %s run in %s (%s)", kind, run.db_path, e)

# ---------------------------------------------------------------------------------------- manifest

def options_doc(run: Any) -> dict[str, Any]:
    """What the command line said, and the options that change results."""
    o = run.options
    return {**run.command_options, "dataset": o.dataset, "require_fmo": o.require_fmo,
            "intensity_markers": o.intensity_markers, "compensation_override": o.compensation is not None}


def templates_doc(run: Any) -> list[dict[str, Any]]:
    """Name, version, sha256, source and panel of each template."""
    return [{"name": t.name, "version": t.version, "sha256": t.sha256, "source": t.source, "panel": t.panel}
            for t in run.templates]


def manifest(run: Any) -> dict[str, Any]:
    """The content of ``manifest.json`` (written last, into the staging folder)."""
    assert run.stage is not None
    ctx = run_context()
    sm = run.summary
    others: list[dict[str, Any]] = []
    sheet = run.command_options.get("samples")
    if sheet and Path(sheet).is_file():
        others.append({"role": "sample_sheet", **file_entry(Path(sheet), os.path.abspath(sheet))})
    comp = run.command_options.get("compensation")
    if comp and Path(comp).is_file():
        others.append({"role": "compensation", **file_entry(Path(comp), os.path.abspath(comp))})
    seen: set[str] = set()
    for t in run.templates:
        for path, sha in [(t.source, None), *run.template_inputs.get(id(t), [])]:
            if path in seen or not Path(path).is_file():
                continue
            seen.add(path)
            others.append({"role": "template", "path": os.path.abspath(path),
                           "bytes": Path(path).stat().st_size, "sha256": sha or sha256_file(path)})
    inputs = [{"sample_id": it.sample_id, "file": it.file, "sha256": it.sha256,
               "events": it.output.n_events if it.output is not None else None, "path": it.path,
               "bytes": it.size, "status": "ok" if it.status == "skipped" else it.status}
              for it in run.items]
    log_entry = file_entry(run.stage / RUN_LOG, RUN_LOG) if (run.stage / RUN_LOG).is_file() else None
    db: dict[str, Any]
    if run.db_external:
        db = {"path": str(run.db_path), "shared": True}
    else:
        db = file_entry(run.stage / DB_NAME, DB_NAME)
    return {
        "program": "immunoprofile gate",
        "manifest_version": 2,
        "run_id": run.run_id,
        **ctx,
        "started_utc": run.started,
        "finished_utc": utc_now(),
        "options": options_doc(run),
        "templates": templates_doc(run),
        "summary": {"samples": len(run.items), "succeeded": sm.ok + sm.skipped, "failed": sm.failed,
                    "deferred": sm.deferred, "ignored": sm.ignored, "controls": sm.controls,
                    "events": sum(it.output.n_events for it in run.items
                                  if it.status in ("ok", "skipped") and it.output is not None)},
        "inputs": inputs,
        "other_inputs": others,
        "outputs": [file_entry(run.stage / n, n) for n in TABLES],
        "deferred": sorted(sm.deferrals, key=lambda d: d["sample_id"]),
        "run": {
            **sm.as_dict(),
            "execution": {"executor": run.executor.name, "jobs": run.settings.jobs,
                          "scheduler": run.settings.scheduler, "force": run.settings.force,
                          "fail_fast": run.settings.fail_fast, "max_failed": run.settings.max_failed,
                          "min_age": run.settings.min_age},
            "program_fingerprint": run.fingerprint,
            "phase_seconds": run.phases,
            "peak_rss_bytes": peak_rss(),  # of this (the coordinating) process
            "workers": [{"worker": w, "tasks": d["tasks"], "seconds": round(d["seconds"], 3),
                         "peak_rss_bytes": d["peak_rss"]} for w, d in sorted(sm.workers.items())],
            "log": log_entry,
            "database": db,
        },
        "volatile": ["run_id", "command_line", "user", "host", "platform", "started_utc", "finished_utc", "run"],
    }
