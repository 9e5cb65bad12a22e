"""Fuzzing the FCS reader: mutated valid files give a typed error or consistent data, never a crash.

Each example takes a valid file (several layouts), changes a few bytes (mostly in TEXT, as in
the issue's FlowIO measurement), inserts, deletes or truncates, and checks that the reader:

- raises :class:`FcsError`, or returns events of shape ($TOT, $PAR) whose values equal an
  independent, value-by-value decode of the DATA bytes under the keywords the file states
  (``fcs_cases.reference_raw`` + ``fcs_cases.flowio_preprocess``);
- never raises anything else, never hangs (a watchdog alarm), and never traces more memory
  than a small multiple of the file size (tracemalloc).

``IMMUNOPROFILE_FUZZ_EXAMPLES`` sets the number of examples (300 by default; ``make fuzz``: 20000).
"""

from __future__ import annotations

import os
import signal
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from immunoprofile.errors import FcsError
from immunoprofile.fcs import parse_fcs

import fcs_cases as fc

EXAMPLES = int(os.environ.get("IMMUNOPROFILE_FUZZ_EXAMPLES", "300"))
WATCHDOG_SECONDS = 20


def _bases() -> list[bytes]:
    n = 1500
    v = fc.base_values(n=n, p=4)
    small = fc.base_values(n=60, p=3, seed=7)
    return [
        fc.build(v + 0.25).blob,  # float, little-endian, FCS 3.1
        fc.build(v, datatype="I", bits=[16] * 4, byteord="4,3,2,1", version="FCS3.0",
                 names=["Time", "FSC-A", "SSC-A", "CD3"],
                 keywords={"$TIMESTEP": "0.01", "$P3E": "4,1", "$P3R": "1024", "$P2G": "2", "$P4R": "128"}).blob,
        fc.build(v, datatype="I", bits=[24] * 4, byteord="4,3,2,1").blob,
        fc.build(v, datatype="I", bits=[9] * 4, packed=True, version="FCS2.0", delim=b"\\",
                 keywords={"$P2E": "3.84, 0.2", "$P2R": "512"}).blob,
        fc.build(v, datatype="D", version="FCS3.2", kinds=["D", "I", "D", "F"], bits=[64, 8, 64, 32],
                 delim=b"\x0c", keywords={"$SPILLOVER": "2,CH1,CH3,1,0.05,0.1,1"}).blob,
        fc.multi(lambda nx: fc.build(small, nextdata=nx, version="FCS3.0"),
                 lambda nx: fc.build(small[:20], nextdata=nx, version="FCS3.0")),
    ]


BASES = _bases()
INTERESTING = b"0123456789/\\,. $-+eE*|\x0c\x00\xff"


def _text_span(blob: bytes) -> tuple[int, int]:
    try:
        return int(blob[10:18]), int(blob[18:26])
    except ValueError:
        return 58, len(blob) - 1


def apply(k: int, ops: list[tuple[str, int, int]]) -> bytes:
    """Base file ``k`` with the mutations ``ops`` ((op, position, byte)) applied in order."""
    blob = bytearray(BASES[k])
    for op, pos, byte in ops:
        if op == "replace" and pos < len(blob):
            blob[pos] = byte
        elif op == "insert":
            blob.insert(min(pos, len(blob)), byte)
        elif op == "delete" and pos < len(blob):
            del blob[pos]
        elif op == "truncate":
            del blob[pos:]
    return bytes(blob)


@st.composite
def mutations(draw: st.DrawFn) -> tuple[int, list[tuple[str, int, int]]]:
    """A base file index and a few mutations, mostly in TEXT (small, readable examples when shrunk)."""
    k = draw(st.integers(0, len(BASES) - 1))
    size = len(BASES[k])
    t0, t1 = _text_span(BASES[k])
    ops = []
    for _ in range(draw(st.integers(1, 4))):
        region = draw(st.sampled_from(["text"] * 7 + ["header", "data", "anywhere"]))
        lo, hi = {"text": (t0, t1), "header": (0, 57), "data": (t1 + 1, size - 1), "anywhere": (0, size - 1)}[region]
        pos = draw(st.integers(lo, max(lo, hi)))
        op = draw(st.sampled_from(["replace"] * 6 + ["insert", "delete", "truncate"]))
        byte = draw(st.one_of(st.sampled_from(list(INTERESTING)), st.integers(0, 255)))
        ops.append((op, pos, byte))
    return k, ops


class _Hang(Exception):
    pass


def _alarm(signum, frame):  # noqa: ANN001, ANN202
    raise _Hang(f"parse_fcs did not return within {WATCHDOG_SECONDS} s")


def check_one(blob: bytes, dataset: int = 0) -> str:
    """Parse ``blob``; return 'error' or 'ok' after checking the result, or fail the test."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(WATCHDOG_SECONDS)
    tracemalloc.start()
    try:
        sample = parse_fcs(blob, "fuzz.fcs", dataset=dataset)
    except FcsError as e:
        assert e.code.startswith("FCS_") and str(e).startswith("fuzz.fcs: ")
        return "error"
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    # a few copies of the file at most (events as float64 can be 2x the DATA, plus the hash and text)
    assert peak <= 6 * len(blob) + 512 * 1024, f"peak {peak} bytes for a {len(blob)}-byte file"
    t = sample.text
    p = int(t["$PAR"])
    if "$TOT" in t:
        n = int(t["$TOT"])
    else:  # FCS 2.0 allows it: the count comes from the DATA length, and the reader says so
        assert "FCS_TOT_MISSING" in sample.finding_codes
        n = (sample.data_offsets[1] - sample.data_offsets[0] + 1) * 8 // sum(sample.bits)
    assert sample.events.shape == (n, p)
    begin = sample.data_offsets[0]
    if sample.dataset == 0:
        assert begin in _stated_begins(blob, t)
    raw = fc.reference_raw(blob, t, begin, n)
    expected = fc.flowio_preprocess(raw, t)
    with np.errstate(invalid="ignore"):  # a changed DATA byte can make a signalling NaN
        ours = sample.events.astype(np.float64)
    np.testing.assert_array_equal(ours, expected)
    return "ok"


def _stated_begins(blob: bytes, text: dict) -> set[int]:
    """DATA begin offsets the file states (HEADER and $BEGINDATA): the reader must use one of them."""
    out = set()
    try:
        out.add(int(blob[26:34]))
    except ValueError:
        pass
    try:
        out.add(int(text.get("$BEGINDATA", "").strip()))
    except ValueError:
        pass
    return out


def test_every_base_file_is_valid() -> None:
    for blob in BASES:
        assert check_one(blob) == "ok"
    assert check_one(BASES[-1], dataset=1) == "ok"


@settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 1000, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mutations())
def test_mutated_files_give_typed_errors_or_consistent_data(case: tuple[int, list[tuple[str, int, int]]]) -> None:
    check_one(apply(*case))


@pytest.mark.parametrize("k", range(len(BASES)))
def test_single_byte_text_mutations_never_load_silently_wrong_data(k: int) -> None:
    """Every position of TEXT changed to a digit or a delimiter: error, or data equal to the independent decode."""
    base = BASES[k]
    t0, t1 = _text_span(base)
    outcomes = {"ok": 0, "error": 0}
    for pos in range(t0, t1 + 1, 3):
        for byte in (b"7", base[t0:t0 + 1]):
            blob = base[:pos] + byte + base[pos + 1:]
            outcomes[check_one(blob)] += 1
    assert outcomes["error"] > 0 and outcomes["ok"] > 0
