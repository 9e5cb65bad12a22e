"""One run at a time per output folder: an advisory lock that dies with its process.

The lock is an ``flock`` on a small file in the folder's work area. The kernel
releases it when the holding process ends, however it ends (``kill -9``
included), so a lock left by a dead process is never in the way: the next run
takes it and says so. The file also records who holds it (pid, host, user,
start time), for the message a second run prints.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

from .errors import AbortedError

log = logging.getLogger(__name__)

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


class RunLock:
    """An exclusive, non-blocking lock on ``path`` (created if needed).

    Use as a context manager, or call :meth:`acquire` and :meth:`release`.

    Parameters
    ----------
    path
        The lock file.
    what
        What the lock protects, for messages (e.g. the output folder).
    """

    def __init__(self, path: str | os.PathLike, what: str = "") -> None:
        self.path = Path(path)
        self.what = what or str(self.path.parent)
        self._fd: int | None = None
        #: what the file said about a previous holder that is gone (None when it was clean)
        self.recovered: dict[str, Any] | None = None

    def acquire(self) -> RunLock:
        """Take the lock or fail at once.

        Raises
        ------
        AbortedError
            Another live process holds the lock (code ``LOCKED``), or the lock file cannot be
            created (code ``LOCK_FAILED``).
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise AbortedError(f"cannot create the lock file ({e.strerror})", path=str(self.path),
                               code="LOCK_FAILED", hint="check that the output folder's parent is writable") from e
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise AbortedError(f"another run is using this output folder ({_describe(holder)})", path=self.what,
                               code="LOCKED",
                               hint="wait for it to finish, or choose another --out; nothing was changed") from None
        except OSError as e:
            os.close(fd)
            raise AbortedError(f"cannot lock the output folder ({e.strerror})", path=self.what, code="LOCK_FAILED",
                               hint="the file system may not support locks; use a local folder") from e
        previous = _read_holder(fd)
        if previous:
            self.recovered = previous
            log.warning("recovered a stale lock on %s (%s; that process is gone)", self.what, _describe(previous))
        info = {"pid": os.getpid(), "host": socket.gethostname(), "user": _user(),
                "since_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Let go of the lock (the file is emptied, so the next run finds a clean lock)."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass
        finally:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        raw = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        return json.loads(raw) if raw else {}
    except (OSError, ValueError):
        return {"unreadable": True}


def _describe(holder: dict[str, Any]) -> str:
    if not holder or holder.get("unreadable"):
        return "holder unknown"
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, user {holder.get('user', '?')}, "
            f"since {holder.get('since_utc', '?')}")


def _user() -> str:
    try:
        import getpass

        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid()) if hasattr(os, "getuid") else "unknown"
