"""immunoprofile.allocator: freed memory is reused by the next sample instead of faulted in anew."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]

_CODE = """
import resource, sys
sys.path.insert(0, {root!r})
import numpy as np
if {tune}:
    from immunoprofile.allocator import reuse_freed_memory
    assert reuse_freed_memory() and reuse_freed_memory()  # once, then a no-op
    get = getattr(np._core.multiarray, "_get_madvise_hugepage", None)
    assert get is None or get() is False  # no huge-page advice once memory is kept
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
a = np.ones(80_000_000 // 8); del a  # the first buffer is always new memory
before = faults()
for _ in range(5):
    a = np.ones(80_000_000 // 8)  # 80 MB: above glibc's default limit for reusing freed blocks
    del a
print(faults() - before)
"""


def _faults(tune: bool) -> int:
    out = subprocess.run([sys.executable, "-c", _CODE.format(root=str(ROOT), tune=tune)], capture_output=True,
                         text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_large_buffers_are_reused_without_page_faults() -> None:
    import ctypes

    try:
        ctypes.CDLL(None).mallopt  # noqa: B018
    except AttributeError:
        pytest.skip("the C library has no mallopt (not glibc)")
    default, tuned = _faults(False), _faults(True)
    # default: five fresh 80 MB blocks, each faulted in (>= 40 faults even with 2 MB huge pages);
    # kept: the freed block is handed out again, already resident
    assert default >= 5 * 40
    assert tuned < default / 10
