"""The malformed-file suite: every broken rule gives its exact error code, or a finding with correct values.

Files are generated at test time by :mod:`tests.fcs_cases` (no binary blobs in git).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from immunoprofile.errors import FcsError
from immunoprofile.fcs import ERROR_CODES, FINDING_CODES, FcsSample, parse_fcs, read_fcs

#: every case is read both ways: from bytes in memory, and from a file (the reader's own buffer)
WAYS = ("bytes", "file")


def _load(blob: bytes, way: str, folder: Path, dataset: int = 0) -> FcsSample:
    if way == "bytes":
        return parse_fcs(blob, "case.fcs", dataset=dataset)
    path = folder / "case.fcs"
    path.write_bytes(blob)
    return read_fcs(path, dataset=dataset)


def _name(way: str, folder: Path) -> str:
    return "case.fcs" if way == "bytes" else str(folder / "case.fcs")

from fcs_cases import CASES, VALID, Case, Valid


def test_suite_is_large_and_covers_every_code() -> None:
    assert len(CASES) >= 50
    names = [c.name for c in CASES] + [v.name for v in VALID]
    assert len(names) == len(set(names))
    covered = {c.code for c in CASES}
    # every error code but none is exercised here (the real-file table adds more)
    assert set(ERROR_CODES) - covered == set()
    assert set(FINDING_CODES) - covered == set()


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("case", [c for c in CASES if c.kind == "error"], ids=lambda c: c.name)
def test_malformed_file_raises_its_code(case: Case, way: str, tmp_path: Path) -> None:
    blob = case.make()
    with pytest.raises(FcsError) as info:
        _load(blob, way, tmp_path, case.dataset)
    err = info.value
    assert err.code == case.code, str(err)
    assert err.code in ERROR_CODES
    # <file>: <what is wrong>; <what to do>
    assert str(err).startswith(_name(way, tmp_path) + ": ")
    assert err.hint and str(err).endswith(err.hint)


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("case", [c for c in CASES if c.kind == "finding"], ids=lambda c: c.name)
def test_deviating_file_is_read_correctly_with_its_finding(case: Case, way: str, tmp_path: Path) -> None:
    sample = _load(case.make(), way, tmp_path, case.dataset)
    assert case.code in sample.finding_codes
    assert set(sample.finding_codes) <= set(FINDING_CODES)
    assert case.expect is not None
    expected = case.expect()
    assert sample.events.shape == expected.shape == (int(sample.text["$TOT"]) if "$TOT" in sample.text
                                                     else expected.shape[0], int(sample.text["$PAR"]))
    np.testing.assert_array_equal(sample.events.astype(np.float64), expected)


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("valid", VALID, ids=lambda v: v.name)
def test_legal_layout_reads_back_exactly(valid: Valid, way: str, tmp_path: Path) -> None:
    built = valid.make()
    sample = _load(built.blob, way, tmp_path)
    assert sample.findings == ()
    np.testing.assert_array_equal(sample.events.astype(np.float64), valid.expect())
    assert sample.data_offsets == built.data
