"""Sample sheets -> a validated table of samples (one row per FCS file).

A sheet is a CSV (or TSV) file with at least ``sample_id`` and ``file``; the
columns ``patient_id, timepoint, day, group, panel, batch, control`` are
recognised, and any other column (e.g. ``lymphocytes_per_ul``) is carried into
the results. ``file`` is relative to the sheet. Without a sheet, files are given
directly and ``--name-pattern`` fills the metadata from their names.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from .errors import SampleSheetError, UsageError

STANDARD = ["sample_id", "file", "patient_id", "timepoint", "day", "group", "panel", "batch", "control"]
REQUIRED = ["sample_id", "file"]
FCS_SUFFIXES = (".fcs", ".lmd")


def read_sheet(path: str | os.PathLike) -> pd.DataFrame:
    """Read and validate a sample sheet.

    Returns a frame with the standard columns first (missing ones empty), then any
    extra columns, all as text; ``path`` holds each file's resolved location.

    Raises
    ------
    SampleSheetError
        Missing file, missing required columns, duplicate sample ids, bad ``control`` or ``day`` values.
    """
    p = Path(path)
    if not p.is_file():
        raise SampleSheetError("sample sheet not found", path=str(p), code="SHEET_NOT_FOUND",
                               hint="check the path given to --samples")
    sep = "\t" if p.suffix.lower() in (".tsv", ".txt") else ","
    try:
        df = pd.read_csv(p, sep=sep, dtype=str, keep_default_na=False, encoding="utf-8-sig", skipinitialspace=True)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
        raise SampleSheetError(f"cannot be read as a {'TSV' if sep == chr(9) else 'CSV'} table ({e})", path=str(p),
                               hint="save it as comma-separated text with a header row") from None
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise SampleSheetError(f"missing required column(s) {', '.join(missing)}; it has: {', '.join(df.columns)}",
                               path=str(p), hint="the sheet needs at least 'sample_id' and 'file'")
    df = df.apply(lambda s: s.str.strip())
    df = df[~(df == "").all(axis=1)].reset_index(drop=True)
    if df.empty:
        raise SampleSheetError("the sheet has no samples", path=str(p))
    for i, row in df.iterrows():
        line = int(i) + 2
        if not row["sample_id"]:
            raise SampleSheetError(f"line {line}: empty sample_id", path=str(p))
        if not row["file"]:
            raise SampleSheetError(f"line {line}: empty file for sample {row['sample_id']!r}", path=str(p))
    dup = df["sample_id"][df["sample_id"].duplicated()].unique().tolist()
    if dup:
        raise SampleSheetError(f"sample_id(s) used more than once: {', '.join(dup[:10])}", path=str(p),
                               hint="each row needs its own sample_id")
    df = _standardise(df)
    _check_values(df, str(p))
    base = p.parent
    df["path"] = [str(Path(f) if Path(f).is_absolute() else base / f) for f in df["file"]]
    return df


def from_files(patterns: Sequence[str], name_pattern: str | None = None) -> pd.DataFrame:
    """A sample table from files or glob patterns, metadata from ``name_pattern``'s named groups.

    Raises
    ------
    UsageError
        A pattern matches nothing, the regex is invalid, or two files share a name.
    """
    files: list[str] = []
    for pat in patterns:
        hits = sorted(glob.glob(pat)) if any(ch in pat for ch in "*?[") else [pat]
        if not hits:
            raise UsageError(f"no files match {pat!r}", hint="check the pattern and the current folder")
        for h in hits:
            if os.path.isdir(h):
                inside = sorted(str(f) for f in Path(h).iterdir() if f.suffix.lower() in FCS_SUFFIXES)
                if not inside:
                    raise UsageError(f"folder {h!r} holds no .fcs files")
                files.extend(inside)
            else:
                files.append(h)
    rx = None
    if name_pattern:
        try:
            rx = re.compile(name_pattern)
        except re.error as e:
            raise UsageError(f"--name-pattern is not a valid regular expression ({e})") from None
        if not rx.groupindex:
            raise UsageError("--name-pattern has no named groups; use e.g. (?P<patient_id>pt\\d+)_(?P<timepoint>\\w+)")
    rows = []
    for f in files:
        stem = Path(f).stem
        row = {"sample_id": stem, "file": f, "path": f}
        if rx is not None:
            m = rx.search(Path(f).name)
            if m:
                row.update({k: v for k, v in m.groupdict().items() if v is not None})
        rows.append(row)
    df = pd.DataFrame(rows)
    dup = df["sample_id"][df["sample_id"].duplicated()].unique().tolist()
    if dup:
        raise UsageError(f"several files share the name(s) {', '.join(dup[:10])}; sample ids must be unique",
                         hint="use a sample sheet to name them")
    path = df.pop("path")
    df = _standardise(df.astype(str))
    df["path"] = path.values
    _check_values(df, "<files>")
    return df


def _standardise(df: pd.DataFrame) -> pd.DataFrame:
    for c in STANDARD:
        if c not in df.columns:
            df[c] = ""
    extras = [c for c in df.columns if c not in STANDARD and c != "path"]
    return df[STANDARD + extras].copy()


def _check_values(df: pd.DataFrame, source: str) -> None:
    for i, row in df.iterrows():
        line = int(i) + 2
        ctl = row["control"]
        if ctl and not re.fullmatch(r"FMO:\s*\S.*", ctl):
            raise SampleSheetError(f"line {line}: control {ctl!r} is not understood", path=source,
                                   hint="leave 'control' empty for stained samples, or write FMO:<marker> (e.g. FMO:PD1)")
        if row["day"]:
            try:
                float(row["day"])
            except ValueError:
                raise SampleSheetError(f"line {line}: day {row['day']!r} is not a number", path=source,
                                       hint="give days since the start of treatment, e.g. 0, 10, 56") from None


def extra_columns(df: pd.DataFrame) -> list[str]:
    """Sheet columns beyond the standard ones (carried into the results)."""
    return [c for c in df.columns if c not in STANDARD and c != "path"]
