"""Loading a results folder written by ``immunoprofile gate``.

:func:`load_populations` accepts a results folder that holds ``populations.csv``
(or ``populations.parquet``), or the path of such a file, and returns the table
with its documented columns and types (``docs/compare.md``; the layout is fixed
by ``immunoprofile.stats.POPULATION_COLUMNS``). Identifiers stay text (``"01"``
is not the number 1); empty numbers are NaN.

An SQLite results database (``.sqlite``/``.db``, written by ``gate``; see
:mod:`immunoprofile.store`) is read the same way and gives the same table.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from .errors import ResultsError

log = logging.getLogger(__name__)

#: columns every populations table must have for comparisons
REQUIRED_COLUMNS: tuple[str, ...] = ("sample_id", "patient_id", "timepoint", "panel", "population", "count")
#: text columns of the contract (read as text, empty -> "")
TEXT_COLUMNS: tuple[str, ...] = ("sample_id", "file", "patient_id", "timepoint", "group", "panel", "batch",
                                 "control", "population", "parent", "reference", "template",
                                 "template_version", "template_sha256", "file_sha256")
#: numeric columns of the contract (empty -> NaN)
NUMERIC_COLUMNS: tuple[str, ...] = ("day", "count", "parent_count", "pct_parent", "pct_of", "cells_per_ul",
                                    "lymphocytes_per_ul")
_NA_STRINGS = ["", "nan", "NaN", "NA", "N/A", "null", "None"]
DATABASE_SUFFIXES = (".sqlite", ".db")
FILE_NAMES = ("populations.csv", "populations.parquet")

_FIX_METADATA = ("give every sample a patient_id and a timepoint: rerun `immunoprofile gate` with a sample "
                 "sheet (--samples) that has patient_id and timepoint columns, or with --name-pattern so they "
                 "are read from the file names")


def load_populations(path: str | Path, *, require_metadata: bool = True) -> pd.DataFrame:
    """Read the populations table of a results folder.

    Parameters
    ----------
    path
        A results folder holding ``populations.csv`` (preferred) or
        ``populations.parquet``, or the path of a ``.csv``/``.parquet`` file.
    require_metadata
        Check that every stained (non-control) sample has a ``patient_id`` and a
        ``timepoint``, which paired comparisons need.

    Returns
    -------
    pandas.DataFrame
        One row per sample x population, columns as written by ``gate``; text
        columns are ``str`` (empty string when missing), numeric columns float
        (``count`` and ``parent_count`` too, so missing values can be NaN).

    Raises
    ------
    ResultsError
        If the path does not exist, is not a results database, holds no
        populations table, cannot be parsed, lacks required columns, is empty, or
        (with ``require_metadata``) samples lack a patient or timepoint.
    """
    source = _resolve(Path(path))
    try:
        if source.suffix.lower() in DATABASE_SUFFIXES:
            frame = _load_database(source)
        elif source.suffix.lower() == ".parquet":
            frame = pd.read_parquet(source)
        else:
            frame = _read_csv(source)
    except ResultsError:
        raise
    except (OSError, ValueError, ImportError, pd.errors.ParserError) as e:
        raise ResultsError(f"cannot read the populations table ({type(e).__name__}: {e})", path=str(source),
                           hint="check that it is a populations file written by `immunoprofile gate`") from e
    frame = _normalise(frame, source)
    if require_metadata:
        check_metadata(frame, source=str(source))
    log.info("%s: %d rows, %d samples", source, len(frame), frame["sample_id"].nunique())
    return frame


def _resolve(path: Path) -> Path:
    if path.suffix.lower() in DATABASE_SUFFIXES:
        return path
    if not path.exists():
        raise ResultsError("no such file or folder", path=str(path),
                           hint="give the output folder of `immunoprofile gate` or its populations.csv")
    if path.is_dir():
        for name in FILE_NAMES:
            if (path / name).is_file():
                return path / name
        found = sorted(p.name for p in path.iterdir())[:10]
        raise ResultsError(f"this folder holds no {' or '.join(FILE_NAMES)} (it has: {', '.join(found) or 'nothing'})",
                           path=str(path), hint="give the output folder of `immunoprofile gate`")
    if path.suffix.lower() not in (".csv", ".parquet"):
        raise ResultsError("not a populations table (expected a .csv or .parquet file, or a results folder)",
                           path=str(path), hint="give the output folder of `immunoprofile gate` or its populations.csv")
    return path


def _load_database(path: Path) -> pd.DataFrame:
    """The populations of an SQLite results database written by ``gate`` (``--db``)."""
    from .store import load_populations as load_from_db

    return load_from_db(path)


def _read_csv(path: Path) -> pd.DataFrame:
    with open(path, encoding="utf-8", newline="") as fh:
        header = fh.readline().rstrip("\r\n").split(",")
    header = [h.strip().strip('"') for h in header]
    dtypes = {c: str for c in header if c not in NUMERIC_COLUMNS}
    na = {c: _NA_STRINGS for c in header if c in NUMERIC_COLUMNS}
    return pd.read_csv(path, dtype=dtypes, keep_default_na=False, na_values=na, float_precision="round_trip")


def _normalise(frame: pd.DataFrame, source: Path) -> pd.DataFrame:
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise ResultsError(f"missing column(s) {', '.join(missing)} (has: {', '.join(map(str, frame.columns))})",
                           path=str(source),
                           hint="this does not look like populations.csv written by `immunoprofile gate`")
    if frame.empty:
        raise ResultsError("the populations table has no rows", path=str(source),
                           hint="check that `immunoprofile gate` processed at least one sample")
    frame = frame.copy()
    for c in frame.columns:
        if c == "lymphocytes_per_ul":
            # a sample-sheet column, not written by gate: unreadable entries become NaN
            values = pd.to_numeric(frame[c], errors="coerce").astype("float64")
            bad = values.isna() & frame[c].notna()
            if bad.any():
                log.warning("%s: %d lymphocytes_per_ul value(s) are not numbers and are ignored", source,
                            int(bad.sum()))
            frame[c] = values
        elif c in NUMERIC_COLUMNS:
            try:
                frame[c] = pd.to_numeric(frame[c], errors="raise").astype("float64")
            except (ValueError, TypeError) as e:
                raise ResultsError(f"column {c!r} holds values that are not numbers ({e})", path=str(source),
                                   hint="fix or regenerate the file with `immunoprofile gate`") from e
        elif c in TEXT_COLUMNS or frame[c].dtype == object:
            frame[c] = text_series(frame[c])
    return frame.reset_index(drop=True)


def text_series(series: pd.Series) -> pd.Series:
    """:func:`_text` applied to every value of a column (missing -> "", spaces stripped).

    Parameters
    ----------
    series
        Any column.

    Returns
    -------
    pandas.Series
        Strings, same index.

    Raises
    ------
    None
    """
    return pd.Series([v.strip() if isinstance(v, str) else _text(v) for v in series.to_numpy(dtype=object)],
                     index=series.index, dtype=object)


def _text(v: object) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return ""
    return str(v).strip()


def check_metadata(frame: pd.DataFrame, *, source: str = "populations table") -> None:
    """Check that every stained sample has a ``patient_id`` and a ``timepoint``.

    Rows with a non-empty ``control`` (FMO controls) are not checked.

    Parameters
    ----------
    frame
        A populations table.
    source
        Name of the file for the message.

    Raises
    ------
    ResultsError
        Naming the samples (up to five) that lack each field and how to add them.
    """
    stained = frame
    if "control" in frame.columns:
        stained = frame[text_series(frame["control"]) == ""]
    problems = []
    for col in ("patient_id", "timepoint"):
        if col not in stained.columns:
            problems.append(f"there is no {col} column")
            continue
        empty = stained.loc[text_series(stained[col]) == "", "sample_id"].drop_duplicates()
        if len(empty):
            names = ", ".join(map(str, empty.iloc[:5])) + (" ..." if len(empty) > 5 else "")
            problems.append(f"{len(empty)} sample(s) have no {col} ({names})")
    if problems:
        raise ResultsError("; ".join(problems) + "; compare pairs samples by patient and timepoint",
                           path=source, code="RESULTS_METADATA_MISSING", hint=_FIX_METADATA)
