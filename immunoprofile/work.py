"""One unit of batch work (an FMO control or a stained sample), runnable in any process.

:func:`run_task` is what the executors of :mod:`immunoprofile.executor` send to
worker processes or Dask workers: it takes a picklable :class:`Task`, never
raises, and returns a picklable :class:`TaskResult` with the sample's rows, the
error (as text) if it failed, the sha256 of the file and its state before and
after the work (so the batch can defer a file still being written and remember
the sha256 in its path index), the log records it produced, and the worker's
identity and peak memory. Results therefore do not depend on where or in which
order the work ran.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import stat
import threading
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .cache import FileState, program_fingerprint
from .errors import ImmunoprofileError

_LOGGER = "immunoprofile"
#: the code this process runs, fixed when it is imported (a later edit on disk does not change it)
FINGERPRINT = program_fingerprint()


@dataclass(frozen=True)
class Task:
    """Everything a worker needs to gate one file (no open handles, no shared state)."""

    index: int
    kind: str  # 'control' | 'sample'
    sample_id: str
    path: str
    file: str
    template: Any
    options: Any
    control: str = ""
    hints: Mapping[str, str] | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)
    fmo: Mapping[Any, Any] | None = None
    fmo_available: bool = False
    extra_columns: tuple[str, ...] = ()


@dataclass
class TaskResult:
    """What one :class:`Task` produced."""

    index: int
    output: Any = None  # SampleOutput
    fmo_values: dict[Any, Any] | None = None
    error: dict[str, str] | None = None  # sample_id, file, stage, code, message (+ traceback)
    logs: list[tuple[int, str, str, float]] = field(default_factory=list)  # level, logger, message, created
    fingerprint: str = ""
    worker: str = ""
    peak_rss: int = 0  # bytes
    seconds: float = 0.0
    #: sha256 of the bytes analysed (of the whole file when it failed); "" when it could not be read
    file_sha256: str = ""
    #: the file's (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns) before it was read; None if absent
    file_stat: FileState | None = None
    #: the same after the work (its sha256 complete)
    file_stat_after: FileState | None = None
    #: when ``file_stat`` was taken (``time.time_ns()`` of the worker)
    stat_time_ns: int = 0
    #: the file's size or modification time differed after the work from before it
    changed: bool = False
    #: ``time.time()`` when the work started and ended (to check the schedule, never in results)
    started: float = 0.0
    finished: float = 0.0


def run_task(task: Task, capture_logs: bool = True) -> TaskResult:
    """Gate one file; never raises (a failure is returned in ``error``).

    The file is stat-ed before it is read and again after its results (and its sha256)
    are complete: ``changed`` says that its size or modification time moved meanwhile (it
    was still being written; the batch defers it), and ``file_stat`` lets the batch
    remember which sha256 belongs to which state of the file (:class:`~immunoprofile.cache.PathIndex`).

    Parameters
    ----------
    capture_logs
        Collect the log records the work emits and return them (for workers in other
        processes, whose logging the parent cannot see); False when run in the parent.

    Returns
    -------
    TaskResult
        Also when the work failed: the error is in ``error`` (nothing is raised).
    """
    t0 = time.perf_counter()
    res = TaskResult(task.index, fingerprint=FINGERPRINT, worker=f"{socket.gethostname()}:{os.getpid()}",
                     started=time.time())
    handler = _Capture(res.logs) if capture_logs else None
    logger = logging.getLogger(_LOGGER)
    saved = (logger.level, logger.propagate)
    if handler is not None:
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
    try:
        _run(task, res)
    finally:
        if handler is not None:
            logger.removeHandler(handler)
            logger.setLevel(saved[0])
            logger.propagate = saved[1]
    res.seconds = time.perf_counter() - t0
    res.finished = time.time()
    res.peak_rss = peak_rss()
    return res


def file_stat(path: str) -> FileState | None:
    """``(st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns)`` of a regular file, or None (absent, a folder ...)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _sha256_file(path: str) -> str:
    """sha256 of a whole file ("" if it cannot be read): for files the reader refused."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    except OSError:
        return ""
    return h.hexdigest()


def _run(task: Task, res: TaskResult) -> None:
    from .pipeline import process_control, process_sample

    stage = "fmo" if task.kind == "control" else "gate"
    res.stat_time_ns = time.time_ns()
    before = res.file_stat = file_stat(task.path)
    try:
        if task.kind == "control":
            values, out = process_control(task.sample_id, task.path, task.control, task.template, task.options,
                                          task.hints)
            res.fmo_values, res.output = values, out
        else:
            res.output = process_sample(task.sample_id, task.path, task.meta, task.template, task.options,
                                        fmo=task.fmo or {}, fmo_available=task.fmo_available,
                                        extra_columns=task.extra_columns)
        res.file_sha256 = res.output.file_sha256
    except Exception as e:  # noqa: BLE001 - one bad sample never sinks the batch
        res.error = failure_row(task.sample_id, task.file, stage, e)
        # the failure is remembered under the file's sha256, like a result
        res.file_sha256 = _sha256_file(task.path) if before is not None else ""
    after = res.file_stat_after = file_stat(task.path)
    res.changed = before is not None and (after is None or after[2:4] != before[2:4])


def failure_row(sample_id: str, file: str, stage: str, err: BaseException) -> dict[str, str]:
    """A ``failures.csv`` row for an error (unexpected errors are named as bugs)."""
    if isinstance(err, ImmunoprofileError):
        code, msg, tb = err.code, str(err), ""
    else:
        code = "INTERNAL_ERROR"
        msg = f"{file}: unexpected {type(err).__name__}: {err} (a bug; rerun with --debug and report it)"
        tb = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    return {"sample_id": sample_id, "file": file, "stage": stage, "code": code, "message": msg, "traceback": tb}


def peak_rss() -> int:
    """Peak resident memory of this process so far, in bytes (0 where unknown).

    Linux: ``VmHWM`` of ``/proc/self/status``, which belongs to this process's own memory
    (``getrusage``'s ``ru_maxrss`` survives ``exec`` and so can report the peak of the
    program that started this one). Elsewhere: ``ru_maxrss``.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        import resource
        import sys

        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(r) if sys.platform == "darwin" else int(r) * 1024
    except (ImportError, OSError, ValueError):
        return 0


class _Capture(logging.Handler):
    """Collects this thread's records as plain tuples (picklable, formatted once)."""

    def __init__(self, sink: list[tuple[int, str, str, float]]) -> None:
        super().__init__(logging.DEBUG)
        self.sink = sink
        self.thread = threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread != self.thread:
            return
        try:
            self.sink.append((record.levelno, record.name, record.getMessage(), record.created))
        except Exception:  # noqa: BLE001 - logging must never break the work
            self.handleError(record)


def init_worker(parent_pid: int | None = None, threads: int | None = None) -> None:
    """Process-pool initializer: leave Ctrl-C to the parent, and die with it.

    Ctrl-C is ignored (the parent cancels the run and cleans up). A thread waits for the
    parent process to end and then ends this worker: without it, the workers of a run
    killed with ``kill -9`` would wait for work forever (each holds the others' queue pipes).
    The worker keeps freed memory for the next file (:mod:`immunoprofile.allocator`).
    ``threads`` sets ``IMMUNOPROFILE_THREADS`` (threads per sample, see
    :func:`immunoprofile.gating.worker_threads`) unless the user set it, so that workers
    times threads does not exceed the cores.
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from .allocator import reuse_freed_memory

    reuse_freed_memory()  # a worker gates one file after another
    if threads:
        os.environ.setdefault("IMMUNOPROFILE_THREADS", str(threads))
    if parent_pid:
        threading.Thread(target=_exit_with_parent, args=(parent_pid,), name="immunoprofile-parent-watch",
                         daemon=True).start()


def _exit_with_parent(pid: int) -> None:
    import select

    try:
        fd = os.pidfd_open(pid)  # Linux >= 5.3: readable once the process has ended
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        select.select([fd], [], [])
    else:
        while True:
            time.sleep(1.0)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            except PermissionError:
                continue
    os._exit(1)
