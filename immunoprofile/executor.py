"""Where batch work runs: in this process, in a pool of local processes, or on a Dask cluster.

Every executor runs :func:`immunoprofile.work.run_task` on :class:`~immunoprofile.work.Task`
objects and yields :class:`~immunoprofile.work.TaskResult` objects as they complete;
the batch sorts them, so the order of completion never shows in the results.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from typing import Any

from .errors import UsageError
from .work import Task, TaskResult, init_worker, run_task

log = logging.getLogger(__name__)

EXECUTORS = ("process", "dask")
#: imported once by the fork server, so that workers start with them loaded (shared, copy-on-write)
PRELOAD = ("immunoprofile.work", "immunoprofile.pipeline", "immunoprofile.gating", "immunoprofile.stats",
           "sklearn.mixture", "scipy.stats", "scipy.signal", "scipy.ndimage", "flowutils.gating", "threadpoolctl")


def default_jobs() -> int:
    """All the cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class SerialExecutor:
    """Runs tasks one after the other in this process (``--jobs 1``)."""

    name = "serial"

    def run(self, tasks: Sequence[Task]) -> Iterator[TaskResult]:
        for t in tasks:
            yield run_task(t, capture_logs=False)

    def cancel(self) -> None:
        pass

    def close(self) -> None:
        pass


class ProcessExecutor:
    """A pool of ``jobs`` worker processes (forkserver where available, else spawn).

    The pool starts on first use and is reused for both phases of a run. Workers ignore
    Ctrl-C; :meth:`cancel` drops queued tasks and stops the workers at once.

    A worker that dies (killed by the out-of-memory killer, a crash in a C library) breaks
    the pool and loses every task in flight. Those tasks are run again, one at a time in a
    fresh single-process pool, so only the task that kills its worker fails (``WORKER_DIED``).
    As with any spawned process pool, a script that calls this must guard its entry point
    with ``if __name__ == "__main__":``.
    """

    name = "process"

    def __init__(self, jobs: int) -> None:
        self.jobs = jobs
        self._pool: Any = None
        self._pending: list[Any] = []

    def _start(self, workers: int) -> Any:
        if self._pool is None:
            from concurrent.futures import ProcessPoolExecutor

            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
            if ctx.get_start_method() == "forkserver":
                ctx.set_forkserver_preload(list(PRELOAD))
            threads = max(1, default_jobs() // workers)
            self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=init_worker,
                                             initargs=(os.getpid(), threads))
        return self._pool

    def warm_up(self) -> None:
        """Start the workers now, in a background thread, so their start-up overlaps the caller's work."""
        import threading

        pool = self._start(self.jobs)

        def spawn() -> None:
            try:
                for _ in range(self.jobs):
                    pool.submit(os.getpid)
            except RuntimeError:  # shut down meanwhile (the run was cancelled)
                pass

        threading.Thread(target=spawn, name="immunoprofile-warm-up", daemon=True).start()

    def _discard(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def run(self, tasks: Sequence[Task]) -> Iterator[TaskResult]:
        from concurrent.futures import as_completed
        from concurrent.futures.process import BrokenProcessPool

        if not tasks:
            return
        if len(tasks) == 1 and self._pool is None:  # not worth starting a pool (results are the same)
            yield run_task(tasks[0], capture_logs=False)
            return
        lost: list[Task] = []
        try:
            pool = self._start(self.jobs)
            by_future = {pool.submit(run_task, t): t for t in tasks}
        except BrokenProcessPool:
            self._discard()
            pool = self._start(self.jobs)
            by_future = {pool.submit(run_task, t): t for t in tasks}
        self._pending = list(by_future)
        for fut in as_completed(self._pending):
            try:
                res = fut.result()
            except BrokenProcessPool:
                lost.append(by_future[fut])
                continue
            except Exception as e:  # noqa: BLE001 - e.g. a result that cannot be sent back
                res = _result(fut, by_future[fut], e)
            yield res
        self._pending = []
        if not lost:
            return
        log.warning("a worker process died; running the %d sample(s) it took down again, one at a time", len(lost))
        self._discard()
        queue = sorted(lost, key=lambda t: t.index)
        while queue:  # one worker: when it dies, the task it was running is the first unfinished one
            pool = self._start(1)
            futures = [pool.submit(run_task, t) for t in queue]
            self._pending = futures
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
        self._pending = []
        self._discard()

    def cancel(self) -> None:
        for f in self._pending:
            f.cancel()
        self._pending = []
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
        self._futures: list[Any] = []

    def workers(self) -> int:
        return len(self._client.scheduler_info().get("workers", {}))

    def run(self, tasks: Sequence[Task]) -> Iterator[TaskResult]:
        from distributed import as_completed

        if not tasks:
            return
        keys = [f"immunoprofile-{t.kind}-{t.index}-{os.urandom(6).hex()}" for t in tasks]
        self._futures = self._client.map(run_task, list(tasks), key=keys, pure=False)
        by_key = {f.key: t for f, t in zip(self._futures, tasks)}
        for fut in as_completed(self._futures, loop=self._client.loop):
            res = _result(fut, by_key[fut.key])
            fut.release()
            yield res
        self._futures = []

    def cancel(self) -> None:
        if self._futures:
            self._client.cancel(self._futures)
            self._futures = []

    def close(self) -> None:
        self._client.close()


def _result(fut: Any, task: Task, error: BaseException | None = None) -> TaskResult:
    """A future's result; a worker that died (out of memory, killed) fails only its own task."""
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
