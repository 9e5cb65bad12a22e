"""immunoprofile.fcs: reading, event semantics (vs FlowKit), writing, and ``immunoprofile inspect``."""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from immunoprofile.cli import cli
from immunoprofile.errors import FcsError, InputFileError
from immunoprofile.fcs import (ERROR_CODES, FINDING_CODES, count_datasets, fcs_bytes, format_spillover, parse_fcs,
                               parse_spillover, read_fcs, write_fcs)

import fcs_cases as fc

DATA = Path(__file__).parents[1].parent / "shared" / "data"
DOCS = Path(__file__).parents[1] / "docs" / "fcs.md"


def _flowkit_raw(blob: bytes) -> np.ndarray:
    import flowkit

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return flowkit.Sample(io.BytesIO(blob)).get_events(source="raw")


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# --- reading ---------------------------------------------------------------------------------------


def test_write_then_read_round_trip_matches_flowkit(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    ev = rng.normal(1000, 300, size=(500, 3)).astype(np.float32)
    spill = (("FITC-A", "PE-A"), np.array([[1.0, 0.12], [0.03, 1.0]]))
    path = tmp_path / "rt.fcs"
    blob = write_fcs(path, ev, ["FSC-A", "FITC-A", "PE-A"], ["", "CD3", "PD-1"], spillover=spill,
                     keywords={"$FIL": "rt.fcs"})
    assert path.read_bytes() == blob
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary file was renamed away
    s = read_fcs(path)
    assert s.sha256 == hashlib.sha256(blob).hexdigest()
    assert s.version == "FCS3.1" and s.channels == ("FSC-A", "FITC-A", "PE-A") and s.markers == ("", "CD3", "PD-1")
    assert s.events.dtype == np.float32
    np.testing.assert_array_equal(s.events, ev)
    np.testing.assert_array_equal(s.events.astype(np.float64), _flowkit_raw(blob))
    assert s.spillover is not None and s.spillover[0] == spill[0]
    np.testing.assert_array_equal(s.spillover[1], spill[1])
    assert s.findings == () and s.n_datasets == 1 and s.bits == (32, 32, 32)


def test_fcs_bytes_is_deterministic_and_ends_with_a_blank_crc() -> None:
    ev = np.arange(12, dtype=np.float32).reshape(4, 3)
    a = fcs_bytes(ev, ["A", "B", "C"])
    assert a == fcs_bytes(ev, ["A", "B", "C"])
    assert a.endswith(b"00000000")
    with pytest.raises(ValueError):
        fcs_bytes(ev, ["A", "B"])


def test_missing_file_and_folder_are_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InputFileError) as info:
        read_fcs(tmp_path / "nope.fcs")
    assert info.value.code == "FILE_MISSING" and "nope.fcs: file not found" in str(info.value)
    with pytest.raises(InputFileError) as info:
        read_fcs(tmp_path)
    assert info.value.code == "FILE_IS_FOLDER"


def test_no_file_handle_left_open_on_success_or_error(tmp_path: Path) -> None:
    good = tmp_path / "good.fcs"
    good.write_bytes(fc.build().blob)
    bad = tmp_path / "bad.fcs"
    bad.write_bytes(fc.build().blob[:-40])
    before = _open_fds()
    for _ in range(20):
        read_fcs(good)
        with pytest.raises(FcsError):
            read_fcs(bad)
    assert _open_fds() == before


def test_event_values_equal_flowkit_raw_for_integer_data_with_pne_gain_timestep_and_mask() -> None:
    """FlowKit's raw events apply mask, Time x $TIMESTEP, $PnE and / $PnG: we must hold the same numbers."""
    v = fc.base_values(n=300, p=5, high=4000)
    blob = fc.build(v, datatype="I", bits=[16] * 5, byteord="4,3,2,1", version="FCS3.0",
                    names=["Time", "FSC-A", "FL1-H", "FL2-H", "FL3-H"],
                    keywords={"$TIMESTEP": "0.01", "$P1G": "0.01", "$P2G": "2.5", "$P3E": "4,1", "$P3R": "4096",
                              "$P4E": "3.84,0.2", "$P4R": "4096", "$P5R": "1024"}).blob
    s = parse_fcs(blob, "int.fcs")
    ref = _flowkit_raw(blob)
    assert s.events.dtype == np.float64
    np.testing.assert_array_equal(s.events, ref)
    # and by hand: Time in seconds, FSC divided by its gain, FL3 masked to 10 bits
    np.testing.assert_array_equal(s.events[:, 0], v[:, 0] * 0.01)
    np.testing.assert_array_equal(s.events[:, 1], v[:, 1] / 2.5)
    np.testing.assert_array_equal(s.events[:, 4], v[:, 4].astype(int) & 1023)
    assert "FCS_VALUES_MASKED" in s.finding_codes


def test_float32_only_where_lossless() -> None:
    v = fc.base_values()
    assert parse_fcs(fc.build(v).blob).events.dtype == np.float32
    assert parse_fcs(fc.build(v, datatype="I", bits=[24] * 4).blob).events.dtype == np.float32
    assert parse_fcs(fc.build(v, datatype="I", bits=[32] * 4).blob).events.dtype == np.float64
    assert parse_fcs(fc.build(v, datatype="D").blob).events.dtype == np.float64
    assert parse_fcs(fc.build(v, keywords={"$P2G": "2"}).blob).events.dtype == np.float64


def test_pne_on_float_data_is_ignored_unlike_flowkit() -> None:
    v = fc.base_values() + 0.5
    blob = fc.build(v, keywords={"$P2E": "4,1"}).blob
    s = parse_fcs(blob)
    np.testing.assert_array_equal(s.events.astype(np.float64), v)
    ref = _flowkit_raw(blob)
    np.testing.assert_array_equal(ref[:, [0, 2, 3]], v[:, [0, 2, 3]])
    assert not np.array_equal(ref[:, 1], v[:, 1])  # FlowKit log-decodes linear values
    assert "FCS_PNE_FLOAT" in s.finding_codes


def test_multiple_datasets_choose_with_dataset() -> None:
    a, b = fc.base_values(n=9, seed=1), fc.base_values(n=5, seed=2)
    blob = fc.multi(lambda nx: fc.build(a, nextdata=nx), lambda nx: fc.build(b, nextdata=nx))
    assert count_datasets(blob) == 2
    first, second = parse_fcs(blob, dataset=0), parse_fcs(blob, dataset=1)
    np.testing.assert_array_equal(first.events.astype(float), a)
    np.testing.assert_array_equal(second.events.astype(float), b)
    assert first.n_datasets == second.n_datasets == 2 and second.dataset == 1
    assert "FCS_MULTIPLE_DATASETS" in first.finding_codes
    with pytest.raises(FcsError) as info:
        parse_fcs(blob, "m.fcs", dataset=2)
    assert info.value.code == "FCS_DATASET_NOT_FOUND" and "--dataset between 0 and 1" in str(info.value)


@pytest.mark.slow
def test_offsets_above_99_999_999_live_in_text_only() -> None:
    """FCS 3.1 section 3.2.3: HEADER DATA offsets are 0 when DATA ends beyond byte 99,999,999."""
    ev = np.zeros((25_000_010, 1), dtype=np.float32)
    ev[::1_000_003, 0] = np.arange(25, dtype=np.float32)
    blob = fcs_bytes(ev, ["FSC-A"])
    assert blob[26:42] == b"       0       0"
    s = parse_fcs(blob, "big.fcs")
    assert s.findings == ()
    assert s.data_offsets[1] > 99_999_999
    np.testing.assert_array_equal(s.events[::1_000_003, 0], np.arange(25, dtype=np.float32))
    assert s.n_events == 25_000_010


def test_spillover_round_trip_and_rejects() -> None:
    names, m = ("A", "B"), np.array([[1.0, 0.25], [0.125, 1.0]])
    got_names, got = parse_spillover(format_spillover(names, m))
    assert got_names == names
    np.testing.assert_array_equal(got, m)
    for bad in ("2,A,B,1,0,0", "x,A,1", "2,A,A,1,0,0,1", "1,A,nan", "0"):
        with pytest.raises(ValueError):
            parse_spillover(bad)


def test_findings_have_a_severity_and_are_documented() -> None:
    s = parse_fcs(fc.build(version="FCS2.0", keywords={"$TOT": fc.DROP, "$P1E": "0,0"}).blob)
    assert {f.severity for f in s.findings} <= {"info", "warning"}
    text = DOCS.read_text(encoding="utf-8")
    for code in list(ERROR_CODES) + list(FINDING_CODES):
        assert f"`{code}`" in text, f"{code} is not documented in docs/fcs.md"


# --- immunoprofile inspect -------------------------------------------------------------------------


@pytest.fixture
def two_files(tmp_path: Path) -> tuple[Path, Path]:
    good = tmp_path / "good.fcs"
    write_fcs(good, fc.base_values(n=20, p=3).astype(np.float32), ["FSC-A", "FITC-A", "PE-A"], ["", "CD3", "PD1"],
              spillover=(("FITC-A", "PE-A"), np.eye(2)))
    bad = tmp_path / "bad.fcs"
    bad.write_bytes(good.read_bytes()[:-50])
    return good, bad


def test_inspect_reports_channels_markers_and_spillover(two_files: tuple[Path, Path]) -> None:
    good, _ = two_files
    r = CliRunner().invoke(cli, ["inspect", str(good)])
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert "version: FCS3.1" in out and "events: 20" in out and "parameters: 3" in out
    assert "FITC-A" in out and "CD3" in out and "PD1" in out
    assert "spillover: 2 channels (FITC-A, PE-A)" in out
    assert "findings: none" in out


def test_inspect_goes_on_after_a_bad_file_and_exits_1(two_files: tuple[Path, Path]) -> None:
    good, bad = two_files
    r = CliRunner().invoke(cli, ["inspect", str(bad), str(good)])
    assert r.exit_code == 1
    assert "error [FCS_TRUNCATED]" in r.stdout and f"{bad}: " in r.stdout
    assert "events: 20" in r.stdout  # the good file after the bad one is still reported
    assert "1 of 2 file(s) could not be read" in r.stderr


def test_inspect_json(two_files: tuple[Path, Path]) -> None:
    good, bad = two_files
    r = CliRunner().invoke(cli, ["inspect", "--json", str(good), str(bad)])
    assert r.exit_code == 1
    doc = json.loads(r.stdout)
    assert [d["ok"] for d in doc] == [True, False]
    assert doc[0]["events"] == 20 and [c["channel"] for c in doc[0]["channels"]] == ["FSC-A", "FITC-A", "PE-A"]
    assert doc[0]["channels"][1]["marker"] == "CD3" and doc[0]["channels"][1]["bits"] == 32
    assert doc[0]["spillover"] == ["FITC-A", "PE-A"]
    assert doc[1]["error"]["code"] == "FCS_TRUNCATED"


def test_inspect_glob_and_usage_errors(two_files: tuple[Path, Path], tmp_path: Path) -> None:
    r = CliRunner().invoke(cli, ["inspect", str(tmp_path / "g*.fcs")])
    assert r.exit_code == 0 and "good.fcs" in r.stdout and "bad.fcs" not in r.stdout
    r = CliRunner().invoke(cli, ["inspect", str(tmp_path / "none*.fcs")])
    assert r.exit_code == 2 and "no file matches" in r.stderr
    r = CliRunner().invoke(cli, ["inspect"])
    assert r.exit_code == 2 and "no FILE given" in r.stderr


def test_inspect_dataset_option(tmp_path: Path) -> None:
    path = tmp_path / "multi.fcs"
    path.write_bytes(fc.multi(lambda nx: fc.build(fc.base_values(n=9), nextdata=nx),
                              lambda nx: fc.build(fc.base_values(n=5), nextdata=nx)))
    r = CliRunner().invoke(cli, ["inspect", "--dataset", "1", str(path)])
    assert r.exit_code == 0 and "events: 5" in r.stdout and "data set: 1 (of 2" in r.stdout
    assert "FCS_MULTIPLE_DATASETS" in r.stdout
    r = CliRunner().invoke(cli, ["inspect", "--dataset", "2", str(path)])
    assert r.exit_code == 1 and "FCS_DATASET_NOT_FOUND" in r.stdout


@pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not available")
def test_inspect_real_24_bit_file() -> None:
    path = DATA / "taborlab-FlowCal/test/Data003.fcs"
    r = CliRunner().invoke(cli, ["inspect", str(path)])
    assert r.exit_code == 0
    assert "events: 25000" in r.stdout and " 24 " in r.stdout


def test_sample_hash_is_of_the_bytes_read_and_survives_pickling(tmp_path):
    """The digest (computed in a background thread for large files) equals hashlib's of the file."""
    import hashlib
    import pickle

    from immunoprofile.fcs import read_fcs, write_fcs

    ev = np.random.default_rng(0).normal(size=(400_000, 4)).astype(np.float32)  # > 4 MB: threaded hashing
    path = tmp_path / "big.fcs"
    write_fcs(path, ev, ["A", "B", "C", "D"])
    s = read_fcs(path)
    twin = pickle.loads(pickle.dumps(s))
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert s.sha256 == expected and twin.sha256 == expected
    assert np.array_equal(twin.events, ev)


# --- metadata only ---------------------------------------------------------------------------------

_TEXT_CODES = {"FCS_NOT_FCS", "FCS_VERSION_UNSUPPORTED", "FCS_HEADER_INVALID", "FCS_TEXT_OFFSETS",
               "FCS_NEXTDATA_INVALID", "FCS_DATASET_NOT_FOUND"}


@pytest.mark.parametrize("valid", fc.VALID, ids=lambda v: v.name)
def test_metadata_equals_what_the_full_reader_finds(valid: fc.Valid, tmp_path: Path) -> None:
    from immunoprofile.fcs import read_fcs_metadata

    path = tmp_path / "v.fcs"
    path.write_bytes(valid.make().blob)
    full, meta = read_fcs(path), read_fcs_metadata(path)
    assert (meta.channels, meta.markers, dict(meta.text), meta.version, meta.n_datasets) == (
        full.channels, full.markers, dict(full.text), full.version, full.n_datasets)


def test_metadata_does_not_read_the_data_segment(tmp_path: Path) -> None:
    """A file cut inside DATA: read_fcs refuses it, the channel names are still there."""
    from immunoprofile.fcs import read_fcs_metadata

    built = fc.build(fc.base_values(n=2000), names=["FSC-A", "SSC-A", "FL1-A", "FL2-A"],
                     keywords={"$P3S": "CD3", "$P4S": "PD-1"})
    path = tmp_path / "cut.fcs"
    path.write_bytes(built.blob[:built.data[0] + 100])
    with pytest.raises(FcsError) as info:
        read_fcs(path)
    assert info.value.code == "FCS_TRUNCATED"
    meta = read_fcs_metadata(path)
    assert meta.channels == ("FSC-A", "SSC-A", "FL1-A", "FL2-A") and meta.markers[2:] == ("CD3", "PD-1")


@pytest.mark.parametrize("case", [c for c in fc.CASES if c.kind == "error" and c.code in _TEXT_CODES],
                         ids=lambda c: c.name)
def test_metadata_raises_what_the_full_reader_raises_for_header_and_text(case: fc.Case, tmp_path: Path) -> None:
    from immunoprofile.fcs import read_fcs_metadata

    path = tmp_path / "case.fcs"
    path.write_bytes(case.make())
    with pytest.raises(FcsError) as full:
        read_fcs(path, dataset=case.dataset)
    with pytest.raises(FcsError) as meta:
        read_fcs_metadata(path, dataset=case.dataset)
    assert meta.value.code == full.value.code == case.code
    assert str(meta.value) == str(full.value)


def test_metadata_of_missing_folder_and_empty_files(tmp_path: Path) -> None:
    from immunoprofile.fcs import read_fcs_metadata

    with pytest.raises(InputFileError) as info:
        read_fcs_metadata(tmp_path / "nope.fcs")
    assert info.value.code == "FILE_MISSING"
    with pytest.raises(InputFileError) as info:
        read_fcs_metadata(tmp_path)
    assert info.value.code == "FILE_IS_FOLDER"
    (tmp_path / "empty.fcs").write_bytes(b"")
    with pytest.raises(FcsError) as info:
        read_fcs_metadata(tmp_path / "empty.fcs")
    assert info.value.code == "FCS_TRUNCATED"


def test_metadata_of_real_files_equals_the_full_read() -> None:
    from immunoprofile.fcs import read_fcs_metadata

    files = sorted(DATA.rglob("*.fcs")) if DATA.is_dir() else []
    if not files:
        pytest.skip(f"no real FCS files under {DATA}")
    compared = 0
    for f in files:
        try:
            full = read_fcs(f)
        except FcsError:
            continue
        meta = read_fcs_metadata(f)
        assert (meta.channels, meta.markers, dict(meta.text)) == (full.channels, full.markers, dict(full.text)), f
        compared += 1
    assert compared >= 50


def test_events_read_from_a_file_are_read_only_and_the_hash_is_of_the_file(tmp_path: Path) -> None:
    """float32 DATA is used in place from the reader's buffer, which nobody may modify."""
    ev = np.random.default_rng(3).normal(size=(5000, 3)).astype(np.float32)
    path = tmp_path / "f.fcs"
    write_fcs(path, ev, ["FSC-A", "SSC-A", "FL1-A"])
    s = read_fcs(path)
    assert s.events.dtype == np.float32 and not s.events.flags.writeable
    np.testing.assert_array_equal(s.events, ev)
    assert s.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_time_step_keeps_float32_values_and_scales_time_when_read() -> None:
    """FlowKit's raw Time is Time x $TIMESTEP in float64; the other channels stay float32 in ``matrix``."""
    import pickle

    v = fc.base_values(n=500, p=4) + 0.25
    blob = fc.build(v, names=["FSC-A", "SSC-A", "FL1-A", "Time"], keywords={"$TIMESTEP": "0.01"}).blob
    s = parse_fcs(blob, "t.fcs")
    assert s.matrix.dtype == np.float32 and s.time_scale == (3, 0.01)
    ref = _flowkit_raw(blob)
    assert s.events.dtype == np.float64
    np.testing.assert_array_equal(s.events, ref)
    for j in range(4):
        np.testing.assert_array_equal(s.column(j), ref[:, j])
        np.testing.assert_array_equal(s.column(j, np.array([3, 7, 400])), ref[[3, 7, 400], j])  # gathered by row
        half = np.arange(0, 500, 2)
        np.testing.assert_array_equal(s.column(j, half), ref[half, j])  # taken from the whole column
    twin = pickle.loads(pickle.dumps(s))
    assert "_events" not in twin.__dict__
    np.testing.assert_array_equal(twin.events, ref)
    # a gain on any channel needs float64 for all: no deferred scaling then
    g = parse_fcs(fc.build(v, names=["FSC-A", "SSC-A", "FL1-A", "Time"],
                           keywords={"$TIMESTEP": "0.01", "$P1G": "2"}).blob)
    assert g.matrix.dtype == np.float64 and g.time_scale is None
    np.testing.assert_array_equal(g.events, _flowkit_raw(fc.build(v, names=["FSC-A", "SSC-A", "FL1-A", "Time"],
                                                                  keywords={"$TIMESTEP": "0.01", "$P1G": "2"}).blob))


@pytest.mark.parametrize("delta", [-1000, 1000])
def test_reader_returns_the_bytes_read_when_the_size_changes_after_stat(tmp_path: Path, monkeypatch, delta) -> None:
    """A file that grows (or shrinks) between fstat and read: the buffer holds exactly what was read."""
    import types

    from immunoprofile import fcs as fcs_module

    blob = fc.build(fc.base_values(n=3000)).blob
    path = tmp_path / "moving.fcs"
    path.write_bytes(blob)
    real_fstat = os.fstat

    def fstat(fd: int):  # the size seen before reading is off by delta
        st = real_fstat(fd)
        return types.SimpleNamespace(st_size=st.st_size + delta)

    monkeypatch.setattr(fcs_module.os, "fstat", fstat)
    buf = fcs_module._read_file(path)
    assert bytes(buf.array) == blob and not buf.array.flags.writeable
    monkeypatch.undo()
    s = read_fcs(path)
    assert s.sha256 == hashlib.sha256(blob).hexdigest()
