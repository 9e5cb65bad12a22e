"""Imported last by the workers' fork server (:data:`immunoprofile.executor.PRELOAD`).

Importing it finishes what every worker would otherwise do on its first file, finding the
BLAS and OpenMP libraries for the thread limits, and then freezes the server's objects
(:func:`gc.freeze`, as Python's documentation advises before forking). The workers forked
from the server share those objects without the garbage collector walking them, and the
server ends in milliseconds when the run is over instead of spending about 0.3 s on a final
collection while it still holds the command's stdout and stderr open.
"""

from __future__ import annotations

import gc


def prepare() -> None:
    """Find the thread-pool libraries (best effort: a worker finds them later otherwise), then freeze."""
    try:
        from .gating import _controller

        _controller("blas")
    except Exception:  # noqa: BLE001 - never break the fork server over a warm-up
        pass
    gc.freeze()


prepare()
