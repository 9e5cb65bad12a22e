"""Side work of a sample (hashing its file, compensating) on the cores the main thread leaves free.

One process-wide pool of ``cores - 1`` threads (at least one) runs these jobs in the order
they were submitted. On a 2-core machine that is one thread, so the side work of a sample
runs one job after the other beside the gating instead of three threads competing for two
cores. A job never waits for another job, so the pool cannot deadlock; the caller waits for
a job's result with :meth:`Job.wait`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

_POOL: ThreadPoolExecutor | None = None
_PID = 0
_LOCK = threading.Lock()


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def submit(fn: Callable[..., Any], *args: Any) -> Future:
    """Run ``fn(*args)`` on the shared side-work pool (made on first use, and anew after a fork)."""
    global _POOL, _PID
    with _LOCK:
        if _POOL is None or _PID != os.getpid():
            _POOL = ThreadPoolExecutor(max_workers=max(1, _cores() - 1), thread_name_prefix="immunoprofile-side")
            _PID = os.getpid()
        return _POOL.submit(fn, *args)
