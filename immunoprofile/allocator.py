"""Keep freed memory in the process for the next sample, instead of handing it back to the kernel.

Gating one sample allocates a few large buffers (the file, the compensated channels, the
masks) and frees them at the end. By default glibc gives every block above 32 MB back to the
kernel when it is freed (and trims the heap), so the next sample's buffers are new pages that
the kernel must fault in and zero: about 5,000-8,000 page faults and 25-55 ms of system time per
1 M-event file, 10-20 % of its time, and memory traffic that two workers then compete for. The
processes that gate many files in a row (the ``gate`` command, batch workers) therefore ask glibc
to keep freed memory and reuse it. The peak memory is the same; it is simply not returned
between samples. Nothing changes where the C library is not glibc. Such processes also stop numpy
asking for huge pages (see :func:`_no_huge_page_advice`).
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_LIMIT = 1 << 30  # 1 GiB: blocks below this come from the heap, which is not trimmed below it
_done = False


def reuse_freed_memory() -> bool:
    """Tell glibc's malloc to keep and reuse freed blocks (once per process); True if it took effect."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        ok = mallopt(_M_MMAP_THRESHOLD, _LIMIT) == 1 and mallopt(_M_TRIM_THRESHOLD, _LIMIT) == 1
    except (OSError, AttributeError, ImportError):  # not glibc, or no ctypes
        return False
    _done = ok
    if ok:
        _no_huge_page_advice()
    log.debug("malloc keeps freed memory for reuse: %s", ok)
    return ok


def _no_huge_page_advice() -> None:
    """Stop numpy advising the kernel to back large arrays with huge pages (as ``NUMPY_MADVISE_HUGEPAGE=0``).

    Once freed memory is kept, only the first file's buffers are ever faulted in. Where the
    kernel compacts memory on demand to find huge pages (transparent huge pages with
    ``defrag=madvise``, a common default), that first file costs a worker 0.1-0.3 s of system
    time with the advice, and the later files gain nothing from it: ``gate --jobs 2`` on 20
    files of 1 M events took 3.69-3.85 s without it against 3.91-3.96 s with it (``--jobs 1``:
    no difference). numpy's own switch is private; where it is missing, nothing changes.
    """
    import numpy as np

    core = getattr(np, "_core", None) or getattr(np, "core", None)
    setter = getattr(getattr(core, "multiarray", None), "_set_madvise_hugepage", None)
    if callable(setter):
        setter(False)
