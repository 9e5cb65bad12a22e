"""Every real FCS file under ../shared/data: read with values equal to an independent reader, or refused.

``tests/fcs_real_files.csv`` lists every file (path relative to shared/data) with its
expected outcome (``ok``, ``ok_with_findings:<codes>``, ``error:<code>``) and the
independent reference its values are compared with:

- ``flowkit``: ``flowkit.Sample(path).get_events(source='raw')`` (options after a colon,
  e.g. ``flowkit:ignore_offset_error``), except channels whose non-zero ``$PnE`` on float
  data we ignore on purpose (``FCS_PNE_FLOAT``), compared with FlowIO's unprocessed column;
- ``flowkit:multi``: every data set via ``flowio.read_multiple_data_sets`` -> ``flowkit.Sample``;
- ``flowkit:patched_header``: FlowKit on the same bytes with the blank HEADER DATA offsets
  filled in from ``$BEGINDATA``/``$ENDDATA`` (FlowIO cannot read blank HEADER offsets);
- ``fcsparser_records``: fcsparser 0.2.4's record decoder (which handles 24-bit integers),
  then FlowIO's preprocessing formulas written out in this test;
- ``unpackbits``: ``numpy.unpackbits`` of the bit-packed DATA (LSB first), same formulas;
- ``none``: the file is refused, nothing to compare.

Metadata ($PAR, $TOT, $PnN) of every file read is compared with fcsparser 0.2.4
(``meta_data_only=True``). Files missing from the table fail, so it stays complete.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from immunoprofile.errors import FcsError, ImmunoprofileError
from immunoprofile.fcs import FcsSample, read_fcs

DATA = Path(__file__).parents[1].parent / "shared" / "data"
TABLE = Path(__file__).with_name("fcs_real_files.csv")
FCS_SUFFIXES = {".fcs", ".lmd"}

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not available")


def find_fcs_files(root: Path = DATA) -> list[str]:
    """FCS files under ``root`` (by extension, any case, or by an 'FCS' magic in an FCS folder), sorted."""
    out = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            suffix = p.suffix.lower()
            if suffix in FCS_SUFFIXES:
                out.append(p)
            elif suffix == "":  # files without extension inside FCS folders
                with open(p, "rb") as fh:
                    if fh.read(3) == b"FCS":
                        out.append(p)
    return sorted(str(p.relative_to(root)) for p in out)


def load_table() -> dict[str, dict[str, str]]:
    with open(TABLE, newline="", encoding="utf-8") as fh:
        return {row["path"]: row for row in csv.DictReader(fh)}


def outcome_of(path: Path, dataset: int = 0) -> tuple[str, FcsSample | None]:
    try:
        s = read_fcs(path, dataset=dataset)
    except FcsError as e:
        return f"error:{e.code}", None
    codes = s.finding_codes
    return ("ok_with_findings:" + ",".join(codes) if codes else "ok"), s


# --- the independent references ---------------------------------------------------------------------


def _lower_text(text: dict) -> dict[str, str]:
    return {str(k).lower().lstrip("$"): str(v) for k, v in text.items()}


def flowio_formulas(raw: np.ndarray, text: dict, ignore_float_pne: bool = True) -> np.ndarray:
    """FlowIO 1.4.0 ``as_array(preprocess=True)`` on an unprocessed matrix, written out independently.

    Time x timestep; ``f2 * 10 ** (f1 * x / PnR)`` for ``PnE = f1,f2`` (f2 = 0 -> 1); ``/ PnG``
    except for Time. With ``ignore_float_pne`` the ``$PnE`` step is skipped for float data.
    """
    t = _lower_text(text)
    out = raw.astype(np.float64, copy=True)
    names = [t[f"p{i}n"] for i in range(1, out.shape[1] + 1)]
    time = [i for i, n in enumerate(names) if n.lower() == "time"]
    if time and "timestep" in t and t["timestep"].strip():
        out[:, time[-1]] = out[:, time[-1]] * float(t["timestep"])
    floating = t["datatype"].strip().upper() in ("F", "D")
    for j in range(out.shape[1]):
        e = t.get(f"p{j + 1}e")
        if e and not (floating and ignore_float_pne):
            f1, f2 = (float(x) for x in e.split(","))
            if f1 > 0:
                f2 = f2 or 1.0
                out[:, j] = (10 ** (f1 * out[:, j] / float(t[f"p{j + 1}r"]))) * f2
        g = t.get(f"p{j + 1}g")
        if g is not None and j not in time[-1:]:
            g = float(g)
            if g not in (0.0, 1.0):
                out[:, j] = out[:, j] / g
    return out


def _int_masks(text: dict, n_par: int) -> list[int]:
    t = _lower_text(text)
    masks = []
    for i in range(1, n_par + 1):
        r = int(float(t[f"p{i}r"]))
        masks.append(2 ** (r - 1).bit_length() - 1 if r > 1 else 0)
    return masks


def _flowkit_sample(source, **options):  # noqa: ANN001, ANN202
    import flowkit

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return flowkit.Sample(source, **options)


def _pne_float_columns(sample: FcsSample) -> list[int]:
    return [j for j, f in enumerate(sample.datatypes) if f != "I"
            and sum(float(x) for x in sample.text.get(f"$P{j + 1}E", "0,0").split(",")[:1]) > 0]


def _with_float_pne_raw(ref: np.ndarray, raw: np.ndarray, text: dict, sample: FcsSample) -> np.ndarray:
    cols = _pne_float_columns(sample)
    if cols:
        fixed = flowio_formulas(raw, text, ignore_float_pne=True)
        ref = ref.copy()
        ref[:, cols] = fixed[:, cols]
    return ref


def reference_events(path: Path, reference: str, dataset: int, sample: FcsSample) -> np.ndarray:
    """The independent reader's event matrix for ``dataset`` of ``path``."""
    kind, _, option = reference.partition(":")
    if kind == "flowkit" and option in ("", "ignore_offset_error", "use_header_offsets"):
        opts = {option: True} if option else {}
        s = _flowkit_sample(str(path), **opts)
        ref = s.get_events(source="raw")
        raw = s.get_events(source="raw") if not _pne_float_columns(sample) else _flowio_raw(path, opts)
        return _with_float_pne_raw(ref, raw, s.metadata, sample)
    if kind == "flowkit" and option.startswith("multi"):
        import flowio

        opts = {"ignore_offset_error": True} if option.endswith("ignore_offset_error") else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fd = flowio.read_multiple_data_sets(str(path), **opts)[dataset]
        ref = _flowkit_sample(fd).get_events(source="raw")
        return _with_float_pne_raw(ref, fd.as_array(preprocess=False), fd.text, sample)
    if reference == "flowkit:patched_header":
        blob = bytearray(path.read_bytes())
        t = sample.text
        b, e = int(t["$BEGINDATA"]), int(t["$ENDDATA"])
        blob[26:42] = f"{b:>8d}{e:>8d}".encode()
        return _flowkit_sample(io.BytesIO(bytes(blob))).get_events(source="raw")
    if reference == "fcsparser_records":
        from fcsparser.api import fromfile

        t = sample.text
        d0 = int(t["$BEGINDATA"])
        n, p = int(t["$TOT"]), int(t["$PAR"])
        endian = "<" if t["$BYTEORD"].startswith("1") else ">"
        widths = {int(t[f"$P{i}B"]) // 8 for i in range(1, p + 1)}
        assert len(widths) == 1, "fcsparser pads only uniform odd widths correctly"
        with open(path, "rb") as fh:
            fh.seek(d0)
            raw = fromfile(io.BytesIO(fh.read()), f"{endian}u{widths.pop()}", n * p).reshape(n, p)
        raw = raw.astype(np.uint64)
        raw = raw & np.array(_int_masks(t, p), dtype=np.uint64)
        return flowio_formulas(raw, t)
    if reference == "unpackbits":
        t = sample.text
        n, p = int(t["$TOT"]), int(t["$PAR"])
        widths = [int(t[f"$P{i}B"]) for i in range(1, p + 1)]
        blob = path.read_bytes()
        d0 = int(blob[26:34])
        nbytes = (n * sum(widths) + 7) // 8
        bits = np.unpackbits(np.frombuffer(blob[d0:d0 + nbytes], dtype=np.uint8), bitorder="little")
        bits = bits[: n * sum(widths)].reshape(n, sum(widths)).astype(np.uint64)
        cols, pos = [], 0
        for w in widths:
            cols.append((bits[:, pos:pos + w] << np.arange(w, dtype=np.uint64)).sum(axis=1))
            pos += w
        raw = np.column_stack(cols) & np.array(_int_masks(t, p), dtype=np.uint64)
        return flowio_formulas(raw, t)
    raise ValueError(f"unknown reference {reference!r}")


def _flowio_raw(path: Path, opts: dict) -> np.ndarray:
    import flowio

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return flowio.FlowData(str(path), **opts).as_array(preprocess=False)


def fcsparser_meta(path: Path, dataset: int) -> dict[str, str]:
    import fcsparser

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        meta = fcsparser.parse(str(path), meta_data_only=True, data_set=dataset)
    return {str(k).upper(): v for k, v in meta.items()}


def flowio_meta(path: Path, dataset: int) -> dict[str, str]:
    import flowio

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fd = flowio.read_multiple_data_sets(str(path), only_text=True, ignore_offset_error=True)[dataset]
    return {f"${k.upper()}": v for k, v in fd.text.items()}


# --- the tests --------------------------------------------------------------------------------------


def test_table_lists_exactly_the_files_present() -> None:
    present = set(find_fcs_files())
    listed = set(load_table())
    assert present - listed == set(), f"files missing from {TABLE.name}: {sorted(present - listed)}"
    assert listed - present == set(), f"files listed in {TABLE.name} but absent: {sorted(listed - present)}"
    assert len(present) >= 100


def _rows() -> list[dict[str, str]]:
    if not TABLE.exists():
        return []
    return sorted(load_table().values(), key=lambda r: r["path"])


@pytest.mark.parametrize("row", _rows(), ids=lambda r: r["path"])
def test_real_file(row: dict[str, str]) -> None:
    path = DATA / row["path"]
    if not path.exists():
        pytest.skip("file not present")
    outcome, sample = outcome_of(path)
    assert outcome == row["outcome"]
    if sample is None:
        assert row["reference"] == "none"
        return
    datasets = range(sample.n_datasets) if row["reference"].startswith("flowkit:multi") else [0]
    for k in datasets:
        s = sample if k == 0 else read_fcs(path, dataset=k)
        assert s.dataset == k
        # fcsparser reads $NEXTDATA as an absolute offset (the standard: relative to the data set),
        # so its metadata is used for the first data set and FlowIO's for the others.
        meta = fcsparser_meta(path, 0) if k == 0 else flowio_meta(path, k)
        assert int(meta["$PAR"]) == len(s.channels) == s.events.shape[1]
        assert int(meta["$TOT"]) == s.n_events
        assert [str(meta[f"$P{i}N"]).strip() for i in range(1, len(s.channels) + 1)] == list(s.channels)
        ref = reference_events(path, row["reference"], k, s)
        assert ref.shape == s.events.shape
        ours = s.events.astype(np.float64)
        # equal to the last bit where both compute the same float64 expression
        np.testing.assert_array_equal(ours, ref)


def test_refused_files_say_what_to_do() -> None:
    """Each refusal names the file, what is wrong and what to do (``<file>: <what>; <what to do>``)."""
    refused = [r for r in _rows() if r["outcome"].startswith("error:")]
    assert refused
    for row in refused:
        path = DATA / row["path"]
        with pytest.raises(ImmunoprofileError) as info:
            read_fcs(path)
        text = str(info.value)
        assert text.startswith(f"{path}: ")
        assert "; " in text and info.value.hint


def test_files_flowkit_reads_silently_wrong_are_refused() -> None:
    """version3_1_spillover.fcs went through a UTF-8 text conversion: FlowKit loads garbage without a word."""
    path = DATA / "LabKey-testAutomation/FCS/version3_1_spillover.fcs"
    if not path.exists():
        pytest.skip("file not present")
    s = _flowkit_sample(str(path))  # FlowKit returns events...
    assert s.get_events(source="raw").shape == (43750, 14)
    blob = path.read_bytes()
    d0, d1 = int(blob[26:34]), int(blob[34:42])
    assert blob.count(b"\xef\xbf\xbd", d0, d1 + 1) > 100_000  # ...decoded from U+FFFD bytes
    with pytest.raises(FcsError) as info:
        read_fcs(path)
    assert info.value.code == "FCS_DATA_CORRUPTED"


def write_table() -> None:  # pragma: no cover - maintenance helper
    """Regenerate the outcome column from the current reader (review the diff before committing!)."""
    old = load_table() if TABLE.exists() else {}
    rows = []
    for rel in find_fcs_files():
        outcome, _ = outcome_of(DATA / rel)
        prev = old.get(rel, {})
        rows.append({"path": rel, "outcome": outcome, "reference": prev.get("reference", "none"),
                     "note": prev.get("note", "")})
    with open(TABLE, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "outcome", "reference", "note"], lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":  # pragma: no cover
    if sys.argv[1:] == ["--write-table"]:
        write_table()
    else:
        print("usage: python tests/test_fcs_real.py --write-table", file=sys.stderr)
