"""Where batch work runs: in this process, in a pool of local processes, or on a Dask cluster.

Every executor runs :func:`immunoprofile.work.run_task` on :class:`~immunoprofile.work.Task`
objects. Work streams: :meth:`submit` queues a task at any time (also while results are
being read), and :meth:`completed` yields :class:`~immunoprofile.work.TaskResult` objects as
tasks finish, until none is left, tasks submitted meanwhile included. So the batch queues a
batch's stained samples the moment its FMO controls are done, without a barrier; it sorts
the results, so the order of completion never shows in the outputs.

This module imports only the standard library when it is imported (:func:`prestart` runs
before anything heavy is loaded); :mod:`immunoprofile.work` is imported on first use.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from .errors import UsageError

if TYPE_CHECKING:
    from .work import Task, TaskResult

log = logging.getLogger(__name__)

EXECUTORS = ("process", "dask")
#: imported once by the fork server, so that workers start with them loaded (shared, copy-on-write):
#: what gating a file imports, measured (``immunoprofile.work`` brings the reader, templates,
#: transforms, gating and statistics; the data-driven gates need scikit-learn's mixture, which
#: brings scipy.stats and pandas, and scipy's peak finding and smoothing); :mod:`immunoprofile.preload`
#: comes last: it warms what each worker would set up on its first file and freezes the objects)
PRELOAD = ("immunoprofile.work", "immunoprofile.pipeline", "immunoprofile.gating", "immunoprofile.stats",
           "sklearn.mixture", "scipy.stats", "scipy.signal", "scipy.ndimage", "flowutils.gating",
           "flowutils.transforms", "threadpoolctl", "immunoprofile.preload")
_FROM_WORK = frozenset({"Task", "TaskResult", "run_task", "init_worker"})
#: whether :func:`prestart` started the fork server, and whether a pool has used it since
_fork_server = {"prestarted": False, "used": False}


def __getattr__(name: str) -> Any:
    """:mod:`immunoprofile.work`'s ``run_task``, ``Task``, ``TaskResult``, imported on first use."""
    if name in _FROM_WORK:
        from . import work

        value = getattr(work, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _run_here(task: Task) -> TaskResult:
    """Run a task in this process (looked up on the module, so tests can replace ``run_task``)."""
    return sys.modules[__name__].run_task(task, capture_logs=False)


def default_jobs() -> int:
    """All the cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _context() -> Any:
    """The multiprocessing context of worker pools: forkserver (with :data:`PRELOAD`) where available, else spawn."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(list(PRELOAD))
        return ctx
    return multiprocessing.get_context("spawn")


def prestart(executor: str = "process", jobs: int | None = None) -> bool:
    """Start the fork server now, so that its imports (about a second) overlap the caller's start-up.

    Call it first thing in a command that will gate with ``jobs`` > 1 local processes; it
    returns at once (the server imports :data:`PRELOAD` in its own process) and the pool of
    :class:`ProcessExecutor` forks its workers from that server later. Nothing happens for
    one job, for Dask, or where there is no fork server (then the workers start when the
    pool does). Best effort: if the server cannot be started now, the pool tries again (and
    reports the error). The server ends with this process, or at :func:`stop_prestarted`.

    Returns
    -------
    bool
        Whether a fork server is starting (or running).
    """
    if executor != "process" or (jobs if jobs is not None else default_jobs()) < 2:
        return False
    ctx = _context()
    if ctx.get_start_method() != "forkserver":
        return False
    from multiprocessing import forkserver

    try:
        forkserver.ensure_running()
    except OSError as e:
        log.debug("could not start the fork server early (%s)", e)
        return False
    _fork_server["prestarted"], _fork_server["used"] = True, False
    return True


def stop_prestarted() -> None:
    """End the fork server :func:`prestart` started if no pool used it (the run had nothing to gate).

    Otherwise it would go on importing for up to a second after this process is done, on a
    core of its own and holding this process's stdout and stderr open. A later pool in this
    process starts a new one. Never raises.
    """
    if not _fork_server["prestarted"] or _fork_server["used"]:
        return
    _fork_server["prestarted"] = False
    import signal
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    pid = getattr(server, "_forkserver_pid", None)
    if not pid:
        return
    try:
        os.kill(pid, signal.SIGTERM)  # it may be importing: it would notice our end only afterwards
        server._stop()  # reaps it and forgets it, so that ensure_running() starts a new one
    except (OSError, AttributeError, ChildProcessError) as e:
        log.debug("stopping the unused fork server: %s", e)


class SerialExecutor:
    """Runs tasks one after the other in this process (``--jobs 1``), in the order submitted."""

    name = "serial"

    def __init__(self) -> None:
        from .allocator import reuse_freed_memory

        self._queue: deque[Task] = deque()
        reuse_freed_memory()  # this process gates one file after another

    def submit(self, task: Task) -> None:
        """Queue ``task`` (run when :meth:`completed` reaches it)."""
        self._queue.append(task)

    def completed(self) -> Iterator[TaskResult]:
        """Run queued tasks and yield their results, until the queue (refilled meanwhile or not) is empty."""
        while self._queue:
            yield _run_here(self._queue.popleft())

    def run(self, tasks: Iterable[Task]) -> Iterator[TaskResult]:
        """Submit ``tasks`` and yield every result."""
        for t in tasks:
            self.submit(t)
        yield from self.completed()

    def cancel(self) -> None:
        self._queue.clear()

    def close(self) -> None:
        self._queue.clear()


class ProcessExecutor:
    """A pool of ``jobs`` worker processes (forkserver where available, else spawn).

    The pool starts on first use (:meth:`warm_up` starts it in the background) and is
    reused for the whole run. Workers ignore Ctrl-C; :meth:`cancel` drops queued tasks and
    stops the workers at once.

    A worker that dies (killed by the out-of-memory killer, a crash in a C library) breaks
    the pool and loses every task in flight. Those tasks are run again, one at a time in a
    fresh single-process pool, so only the task that kills its worker fails (``WORKER_DIED``);
    tasks submitted meanwhile wait, and then go to a fresh pool of ``jobs`` workers.
    As with any spawned process pool, a script that calls this must guard its entry point
    with ``if __name__ == "__main__":``.
    """

    name = "process"

    def __init__(self, jobs: int) -> None:
        self.jobs = jobs
        self._pool: Any = None
        self._futures: dict[Any, Task] = {}
        self._backlog: deque[Task] = deque()
        self._recovering = False

    def _start(self, workers: int) -> Any:
        if self._pool is None:
            from concurrent.futures import ProcessPoolExecutor

            from .work import init_worker

            _fork_server["used"] = True
            threads = max(1, default_jobs() // workers)
            self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=_context(), initializer=init_worker,
                                             initargs=(os.getpid(), threads))
        return self._pool

    def warm_up(self) -> None:
        """Start the workers now, in a background thread, so their start-up overlaps the caller's work."""
        pool = self._start(self.jobs)

        def spawn() -> None:
            try:
                for _ in range(self.jobs):
                    pool.submit(os.getpid)
            except RuntimeError:  # shut down meanwhile (the run was cancelled), or broken
                pass

        threading.Thread(target=spawn, name="immunoprofile-warm-up", daemon=True).start()

    def _discard(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def submit(self, task: Task) -> None:
        """Send ``task`` to a worker (or hold it while lost tasks are being run again)."""
        if self._recovering or self._backlog:
            self._backlog.append(task)
            return
        self._send(task)

    def _send(self, task: Task) -> None:
        from concurrent.futures.process import BrokenProcessPool

        from .work import run_task

        try:
            fut = self._start(self.jobs).submit(run_task, task)
        except BrokenProcessPool:  # a worker died: completed() restarts the pool, then sends it
            self._backlog.append(task)
            return
        self._futures[fut] = task

    def completed(self) -> Iterator[TaskResult]:
        """Yield results as tasks finish, until none is pending (tasks submitted meanwhile included)."""
        from concurrent.futures import FIRST_COMPLETED, wait
        from concurrent.futures.process import BrokenProcessPool

        while self._futures or self._backlog:
            if not self._futures:
                if self._pool is not None and getattr(self._pool, "_broken", False):
                    self._discard()
                while self._backlog and not self._futures:
                    self._send(self._backlog.popleft())
                if not self._futures:
                    continue
            done, _ = wait(list(self._futures), return_when=FIRST_COMPLETED)
            lost: list[Task] = []
            for fut in sorted(done, key=lambda f: self._futures[f].index):
                task = self._futures.pop(fut)
                try:
                    res = fut.result()
                except BrokenProcessPool:
                    lost.append(task)
                    self._recovering = True
                    continue
                except Exception as e:  # noqa: BLE001 - e.g. a result that cannot be sent back
                    res = _result(fut, task, e)
                yield res
            if not lost:
                continue
            # the pool is broken: every task still in it ends at once, with its result or lost
            self._recovering = True
            rest = sorted(self._futures.items(), key=lambda kv: kv[1].index)
            self._futures.clear()
            for fut, task in rest:
                try:
                    res = fut.result()
                except BrokenProcessPool:
                    lost.append(task)
                    continue
                except Exception as e:  # noqa: BLE001
                    res = _result(fut, task, e)
                yield res
            yield from self._recover(lost)

    def _recover(self, lost: list[Task]) -> Iterator[TaskResult]:
        """Run tasks a dead worker took down one at a time: the one that kills its worker fails."""
        from concurrent.futures.process import BrokenProcessPool

        from .work import run_task

        log.warning("a worker process died; running the %d sample(s) it took down again, one at a time", len(lost))
        self._recovering = True
        self._discard()
        queue = sorted(lost, key=lambda t: t.index)
        while queue:  # one worker: when it dies, the task it was running is the first unfinished one
            pool = self._start(1)
            futures = [pool.submit(run_task, t) for t in queue]
            done = 0
            for fut in futures:
                broken = False
                try:
                    res = fut.result()
                except Exception as e:  # noqa: BLE001 - BrokenProcessPool: this task killed the worker
                    broken = isinstance(e, BrokenProcessPool)
                    res = _result(fut, queue[done], e)
                yield res
                done += 1
                if broken:
                    break
            self._discard()
            queue = queue[done:]
        self._recovering = False  # completed() sends the tasks held meanwhile to a fresh pool

    def run(self, tasks: Iterable[Task]) -> Iterator[TaskResult]:
        """Submit ``tasks`` and yield every result."""
        for t in tasks:
            self.submit(t)
        yield from self.completed()

    def cancel(self) -> None:
        for f in self._futures:
            f.cancel()
        self._futures.clear()
        self._backlog.clear()
        if self._pool is not None:
            procs = list((getattr(self._pool, "_processes", None) or {}).values())
            self._pool.shutdown(wait=False, cancel_futures=True)
            for p in procs:  # running tasks are abandoned: their results would be thrown away
                try:
                    p.terminate()
                except (OSError, AttributeError):
                    pass
            for p in procs:
                p.join(timeout=5)
            self._pool = None

    def close(self) -> None:
        self._futures.clear()
        self._backlog.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


class DaskExecutor:
    """Sends tasks to an existing Dask distributed scheduler.

    The workers must have the same immunoprofile installed (checked on every result by the
    batch) and see the FCS files under the same paths (a shared file system).
    """

    name = "dask"

    def __init__(self, scheduler: str, timeout: float = 30.0) -> None:
        try:
            from distributed import Client
        except ImportError:
            raise UsageError("--executor dask needs the 'distributed' package",
                             hint="install it: pip install 'immunoprofile[dask]'") from None
        try:
            self._client = Client(scheduler, timeout=timeout, set_as_default=False)
        except (OSError, TimeoutError) as e:
            raise UsageError(f"cannot reach the Dask scheduler at {scheduler!r} ({e})", code="SCHEDULER_UNREACHABLE",
                             hint="check --scheduler (e.g. tcp://head-node:8786) and that the cluster is up") from e
        self.scheduler = scheduler
        self._tasks: dict[str, Task] = {}
        self._futures: dict[str, Any] = {}
        self._ac: Any = None

    def workers(self) -> int:
        return len(self._client.scheduler_info().get("workers", {}))

    def submit(self, task: Task) -> None:
        """Send ``task`` to the cluster."""
        from distributed import as_completed

        from .work import run_task

        key = f"immunoprofile-{task.kind}-{task.index}-{os.urandom(6).hex()}"
        fut = self._client.submit(run_task, task, key=key, pure=False)
        self._tasks[fut.key], self._futures[fut.key] = task, fut
        if self._ac is None:
            self._ac = as_completed(loop=self._client.loop)
        self._ac.add(fut)

    def completed(self) -> Iterator[TaskResult]:
        """Yield results as tasks finish, until none is pending (tasks submitted meanwhile included)."""
        while self._ac is not None and not self._ac.is_empty():
            fut = next(self._ac)
            task = self._tasks.pop(fut.key)
            self._futures.pop(fut.key, None)
            res = _result(fut, task)
            fut.release()
            yield res

    def run(self, tasks: Iterable[Task]) -> Iterator[TaskResult]:
        """Submit ``tasks`` and yield every result."""
        for t in tasks:
            self.submit(t)
        yield from self.completed()

    def cancel(self) -> None:
        if self._futures:
            self._client.cancel(list(self._futures.values()))
        self._futures.clear()
        self._tasks.clear()
        if self._ac is not None:
            self._ac.clear()
            self._ac = None

    def close(self) -> None:
        self._client.close()


def _result(fut: Any, task: Task, error: BaseException | None = None) -> TaskResult:
    """A future's result; a worker that died (out of memory, killed) fails only its own task."""
    from .work import TaskResult

    try:
        if error is not None:
            raise error
        return fut.result()
    except Exception as e:  # noqa: BLE001 - BrokenProcessPool, KilledWorker, CancelledError ...
        log.debug("task %s (%s) was lost: %r", task.index, task.sample_id, e)
        return TaskResult(task.index, error={
            "sample_id": task.sample_id, "file": task.file, "stage": "fmo" if task.kind == "control" else "gate",
            "code": "WORKER_DIED",
            "message": f"{task.path}: the worker process gating this file died ({type(e).__name__}); it may have "
                       "run out of memory: rerun with fewer --jobs", "traceback": ""})


def make_executor(kind: str, jobs: int, scheduler: str | None = None,
                  timeout: float = 30.0) -> SerialExecutor | ProcessExecutor | DaskExecutor:
    """The executor for ``--executor`` / ``--jobs`` / ``--scheduler``.

    Raises
    ------
    UsageError
        Unknown executor, ``jobs`` < 1, ``dask`` without a scheduler address or the
        ``distributed`` package, or a scheduler that cannot be reached.
    """
    if kind not in EXECUTORS:
        raise UsageError(f"unknown executor {kind!r}; choose from {', '.join(EXECUTORS)}")
    if kind == "dask":
        if not scheduler:
            raise UsageError("--executor dask needs --scheduler ADDRESS (e.g. tcp://head-node:8786)")
        return DaskExecutor(scheduler, timeout=timeout)
    if scheduler:
        raise UsageError("--scheduler is only used with --executor dask")
    if jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {jobs}")
    return SerialExecutor() if jobs == 1 else ProcessExecutor(jobs)
