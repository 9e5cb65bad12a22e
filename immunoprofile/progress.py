"""A one-line progress bar with ETA, for terminals only.

:class:`ProgressBar` draws on a stream that is a TTY and does nothing otherwise, so
cron jobs and log files never receive carriage returns. Log messages can be
printed above it: :meth:`ProgressBar.log_filter` clears the line before a record
is written, and the bar is redrawn on the next update.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from typing import TextIO


@dataclass(frozen=True)
class Progress:
    """One step of a run: counts so far (over every sample of the sheet)."""

    done: int
    total: int
    ok: int = 0
    skipped: int = 0
    failed: int = 0
    deferred: int = 0
    current: str = ""


def format_eta(seconds: float) -> str:
    """``'1:02:03'`` or ``'2:03'``."""
    s = max(0, int(round(seconds)))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressBar:
    """``[#######.....]  12/50  ok 10  skipped 1  failed 1  ETA 0:42``, redrawn in place.

    Parameters
    ----------
    stream
        Where to draw (default stderr); nothing is drawn unless it is a TTY.
    width
        Characters of the bar itself.
    """

    def __init__(self, stream: TextIO | None = None, width: int = 28, min_interval: float = 0.1) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.width = width
        self.min_interval = min_interval
        self._t0: float | None = None
        self._last = 0.0
        self._shown = False
        self._line = ""

    def __call__(self, p: Progress) -> None:
        self.update(p)

    def render(self, p: Progress, elapsed: float) -> str:
        """The text of the bar for ``p`` after ``elapsed`` seconds."""
        frac = p.done / p.total if p.total else 1.0
        filled = int(round(frac * self.width))
        eta = "--:--"
        if 0 < p.done < p.total and elapsed > 0:
            eta = format_eta(elapsed / p.done * (p.total - p.done))
        elif p.done >= p.total:
            eta = "0:00"
        return (f"[{'#' * filled}{'.' * (self.width - filled)}] {p.done}/{p.total}  ok {p.ok}  skipped {p.skipped}"
                f"  failed {p.failed}  deferred {p.deferred}  ETA {eta}")

    def update(self, p: Progress) -> None:
        """Redraw (at most every ``min_interval`` seconds, and always at the end)."""
        if not self.enabled:
            return
        now = time.monotonic()
        if self._t0 is None:
            self._t0 = now
        if now - self._last < self.min_interval and p.done < p.total:
            return
        self._last = now
        import shutil

        self._line = self.render(p, now - self._t0)[: max(20, shutil.get_terminal_size().columns - 1)]
        self.stream.write("\r\x1b[K" + self._line)
        self.stream.flush()
        self._shown = True

    def clear(self) -> None:
        """Erase the bar (before a log message, or at the end)."""
        if self.enabled and self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False

    def close(self) -> None:
        self.clear()

    def log_filter(self) -> logging.Filter:
        """A filter for a stderr log handler: clears the bar before each message it lets through."""
        bar = self

        class _Clear(logging.Filter):
            def filter(self, record: logging.LogRecord) -> bool:
                bar.clear()
                return True

        return _Clear()
