"""Sample sheets and file lists: validation with line numbers, metadata from names."""

from __future__ import annotations

import pytest

from immunoprofile.errors import SampleSheetError, UsageError
from immunoprofile.samplesheet import STANDARD, from_files, read_sheet


def write(tmp_path, text, name="sheet.csv"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_minimal_sheet_fills_standard_columns_and_keeps_extras(tmp_path):
    p = write(tmp_path, "sample_id,file,lymphocytes_per_ul\nA,a.fcs,1200\nB,sub/b.fcs,\n")
    df = read_sheet(p)
    assert list(df.columns[:len(STANDARD)]) == STANDARD
    assert df["lymphocytes_per_ul"].tolist() == ["1200", ""]
    assert df["path"].tolist() == [str(tmp_path / "a.fcs"), str(tmp_path / "sub/b.fcs")]


@pytest.mark.parametrize("text,expect", [
    ("sample_id,patient_id\nA,P1\n", "missing required column(s) file"),
    ("sample_id,file\nA,a.fcs\nA,b.fcs\n", "sample_id(s) used more than once: A"),
    ("sample_id,file\nA,\n", "line 2: empty file for sample 'A'"),
    ("sample_id,file,control\nA,a.fcs,FMO-PD1\n", "line 2: control 'FMO-PD1' is not understood"),
    ("sample_id,file,day\nA,a.fcs,ten\n", "line 2: day 'ten' is not a number"),
    ("sample_id,file\n", "the sheet has no samples"),
])
def test_bad_sheets(tmp_path, text, expect):
    p = write(tmp_path, text)
    with pytest.raises(SampleSheetError) as e:
        read_sheet(p)
    assert expect in str(e.value)
    assert str(p) in str(e.value)


def test_missing_sheet(tmp_path):
    with pytest.raises(SampleSheetError, match="sample sheet not found"):
        read_sheet(tmp_path / "nope.csv")


def test_tsv_and_bom(tmp_path):
    p = tmp_path / "s.tsv"
    p.write_bytes("\ufeffsample_id\tfile\tpanel\nA\ta.fcs\tt_cell\n".encode("utf-8"))
    df = read_sheet(p)
    assert df.loc[0, "panel"] == "t_cell"


def test_from_files_name_pattern(tmp_path):
    for n in ("pt01_pre.fcs", "pt01_post.fcs", "pt02_pre.FCS"):
        (tmp_path / n).write_bytes(b"")
    df = from_files([str(tmp_path / "*")], r"(?P<patient_id>pt\d+)_(?P<timepoint>\w+)\.")
    assert sorted(zip(df["sample_id"], df["patient_id"], df["timepoint"])) == [
        ("pt01_post", "pt01", "post"), ("pt01_pre", "pt01", "pre"), ("pt02_pre", "pt02", "pre")]


def test_from_files_errors(tmp_path):
    with pytest.raises(UsageError, match="no files match"):
        from_files([str(tmp_path / "*.fcs")])
    (tmp_path / "a.fcs").write_bytes(b"")
    with pytest.raises(UsageError, match="not a valid regular expression"):
        from_files([str(tmp_path / "a.fcs")], "(?P<x")
    with pytest.raises(UsageError, match="no named groups"):
        from_files([str(tmp_path / "a.fcs")], "a")
