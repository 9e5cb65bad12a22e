"""FCS files: bytes -> checked :class:`FcsSample`, and writing FCS 3.1.

The reader reads a file's bytes once (no handle stays open), hashes exactly those
bytes, checks them against the FCS 2.0, 3.0, 3.1 and 3.2 standards and decodes
the event matrix from memory. A violation that makes the numbers doubtful raises
:class:`~immunoprofile.errors.FcsError` with a stable ``code``; a deviation that
is still read correctly is recorded as a :class:`~immunoprofile.errors.Finding`.
Every code is listed in ``docs/fcs.md``.

Event values
------------
``FcsSample.events`` holds the values FlowKit 1.3.2 gates on before compensation
(``flowkit.Sample(path).get_events(source='raw')``, i.e. FlowIO's
``as_array(preprocess=True)``), in the same order of operations:

1. integers are masked to the bits below ``$PnR`` (next power of two), as
   FCS 3.1 section 3.2.20 requires;
2. the channel named ``Time`` (case-insensitive) is multiplied by ``$TIMESTEP``;
3. integer channels with ``$PnE = f1,f2`` and ``f1 > 0`` are decoded from log
   amplification: ``f2 * 10 ** (f1 * x / $PnR)`` (``f2 = 0`` is read as 1);
4. every channel but ``Time`` is divided by ``$PnG`` when it is not 1.

One deliberate difference: for floating-point data the standard requires
``$PnE = 0,0``; FlowKit still applies a non-zero ``$PnE`` (turning linear CyTOF
counts into numbers below 1). We ignore it and record ``FCS_PNE_FLOAT``.

The matrix is float32 when that is lossless (float data, or integers of at most
24 bits, with none of steps 2-4 applying), otherwise float64.

Data layouts read: ``$DATATYPE`` I (any width 1-64 bits, byte-aligned or
bit-packed), F and D, FCS 3.2 ``$PnDATATYPE`` mixes, either byte order, and files
with several data sets (``$NEXTDATA``). Bit-packed fields (``$PnB`` not a
multiple of 8, deprecated since FCS 3.2) are read as one least-significant-bit
first stream, which is what the instruments that wrote them did.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import write_bytes_atomic
from .errors import FcsError, Finding, InputFileError

__all__ = [
    "FcsSample", "FcsMetadata", "read_fcs", "read_fcs_metadata", "parse_fcs", "fcs_bytes", "write_fcs", "parse_spillover", "format_spillover",
    "count_datasets", "ERROR_CODES", "FINDING_CODES",
]

log = logging.getLogger(__name__)

_HEADER_LEN = 58
_VERSIONS = ("FCS2.0", "FCS3.0", "FCS3.1", "FCS3.2")
_BIG_OFFSET = 99_999_999  # FCS 3.x: HEADER offsets above this are written as 0 (and then live in TEXT only)
_MAX_DATASETS = 10_000
_CORRUPTION_MARK = b"\xef\xbf\xbd"  # UTF-8 of U+FFFD, what a text-mode transfer leaves for undecodable bytes

_INT_RE = re.compile(r"[+]?[0-9]+")
_FLOAT_RE = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_PARAM_KEY_RE = re.compile(r"\$P([1-9][0-9]*)([A-Z]+)")

#: Error codes raised by this module (``FcsError.code``), with what they mean.
ERROR_CODES: dict[str, str] = {
    "FCS_NOT_FCS": "the file does not start with an FCS version string",
    "FCS_VERSION_UNSUPPORTED": "an FCS version other than 2.0, 3.0, 3.1, 3.2",
    "FCS_TRUNCATED": "the file ends before a segment its HEADER/TEXT announce",
    "FCS_HEADER_INVALID": "the 58-byte HEADER is malformed",
    "FCS_TEXT_OFFSETS": "the TEXT (or supplemental TEXT) offsets are impossible",
    "FCS_DELIMITER_INVALID": "the TEXT delimiter is not a legal character",
    "FCS_TEXT_INVALID": "the TEXT segment cannot be split into keyword/value pairs",
    "FCS_KEYWORD_DUPLICATE": "a standard keyword appears twice with different values",
    "FCS_KEYWORD_MISSING": "a required keyword is missing",
    "FCS_KEYWORD_INVALID": "a required keyword has a value that is not valid",
    "FCS_DATA_OFFSETS": "the DATA offsets are impossible or HEADER and TEXT disagree with no way to tell which is right",
    "FCS_TOT_MISMATCH": "$TOT x event width differs from the DATA segment's length",
    "FCS_PAR_MISMATCH": "$PAR differs from the parameters ($PnN/$PnB) present",
    "FCS_PNN_MISSING": "a parameter has no $PnN name",
    "FCS_PNN_DUPLICATE": "two parameters share a $PnN name",
    "FCS_DATATYPE_UNSUPPORTED": "$DATATYPE (or $PnDATATYPE) is ASCII or unknown",
    "FCS_PNB_INVALID": "$PnB is missing, not a number, or inconsistent with $DATATYPE",
    "FCS_PNR_INVALID": "$PnR of an integer parameter is missing or not a positive number",
    "FCS_PNE_INVALID": "$PnE is not 'decades,offset' with non-negative numbers",
    "FCS_PNG_INVALID": "$PnG is not a positive number",
    "FCS_TIMESTEP_INVALID": "$TIMESTEP is not a positive number while the file has a Time channel",
    "FCS_BYTEORD_UNSUPPORTED": "$BYTEORD is neither little- nor big-endian",
    "FCS_MODE_UNSUPPORTED": "$MODE is a histogram mode (C or U), not list mode",
    "FCS_CRC_MISMATCH": "the CRC after the last segment does not match the file's bytes",
    "FCS_DATA_CORRUPTED": "the DATA segment was damaged by a text-mode (UTF-8) transfer",
    "FCS_NEXTDATA_INVALID": "$NEXTDATA does not point to a valid next data set",
    "FCS_DATASET_NOT_FOUND": "the requested data set does not exist in the file",
}

#: Finding codes recorded by this module (``Finding.code``), with what they mean.
FINDING_CODES: dict[str, str] = {
    "FCS_ENDDATA_OFF_BY_ONE": "the DATA end offset is one byte past $TOT x event width (known writer bug)",
    "FCS_DATA_OFFSETS_DISAGREE": "HEADER and TEXT DATA offsets differ; the one that fits $TOT and the file was used",
    "FCS_HEADER_DATA_OFFSETS_MISSING": "the HEADER gives no DATA offsets for a small file; TEXT offsets used",
    "FCS_TEXT_OFFSETS_IGNORED": "non-standard, unreadable $BEGINDATA/$ENDDATA in an FCS 2.0 file; HEADER used",
    "FCS_MULTIPLE_DATASETS": "the file holds several data sets; one was read",
    "FCS_PNE_FLOAT": "a non-zero $PnE on floating-point data was ignored (the standard requires 0,0)",
    "FCS_PNE_ZERO_OFFSET": "$PnE = f1,0 with f1 > 0 was read as f1,1 (the standard's rule)",
    "FCS_PNE_MISSING": "$PnE is missing in an FCS 3.x file; linear assumed",
    "FCS_PNR_MISSING": "$PnR is missing on floating-point data (not needed to decode it)",
    "FCS_VALUES_MASKED": "integer values had bits set above $PnR; masked as the standard requires",
    "FCS_BITPACKED": "integer fields are not whole bytes (deprecated bit-packed layout)",
    "FCS_TOT_MISSING": "$TOT is missing (FCS 2.0); the event count was derived from the DATA length",
    "FCS_MODE_MISSING": "$MODE is missing; list mode assumed",
    "FCS_NO_EVENTS": "the data set holds no events",
    "FCS_TEXT_UNTERMINATED": "the TEXT segment does not end with its delimiter",
    "FCS_TEXT_END_PADDED": "the TEXT segment ends with padding after its last delimiter",
    "FCS_TEXT_DELIMITER_AMBIGUOUS": "doubled delimiters were read by the other version's rule (escape vs empty value)",
    "FCS_KEYWORD_REPEATED": "a keyword appears more than once (same value, or a non-standard keyword)",
    "FCS_TIMESTEP_MISSING": "an FCS 3.x file has a Time channel but no $TIMESTEP; Time left in ticks",
    "FCS_STEXT_INVALID": "$BEGINSTEXT/$ENDSTEXT point to bytes that are not keywords; ignored",
    "FCS_SPILLOVER_INVALID": "the spillover keyword cannot be parsed; the file provides no compensation",
    "FCS_SPILLOVER_CHANNELS": "the spillover matrix names channels the file does not have",
}

_INFO_FINDINGS = {"FCS_MULTIPLE_DATASETS", "FCS_PNE_ZERO_OFFSET", "FCS_PNE_MISSING", "FCS_PNR_MISSING",
                  "FCS_VALUES_MASKED", "FCS_TOT_MISSING", "FCS_TEXT_UNTERMINATED", "FCS_TEXT_END_PADDED",
                  "FCS_KEYWORD_REPEATED", "FCS_TIMESTEP_MISSING", "FCS_MODE_MISSING", "FCS_TEXT_OFFSETS_IGNORED"}


@dataclass(frozen=True)
class FcsSample:
    """One data set of an FCS file, checked and decoded.

    Attributes
    ----------
    path
        The file's path as given (used in messages).
    sha256
        Hex digest of the file's bytes, exactly as read (all data sets).
    version
        ``'FCS3.1'`` etc.
    text
        The TEXT (and supplemental TEXT) keywords, names upper-cased (FCS keywords are case-insensitive).
    channels
        ``$PnN`` of each parameter.
    markers
        ``$PnS`` of each parameter, ``''`` where absent.
    events
        Event matrix, shape ``(n_events, n_parameters)``; float32 where that is lossless, else float64.
        When only the Time channel needs scaling by ``$TIMESTEP`` (the usual case), the file's
        values are kept in float32 in :attr:`matrix` and this float64 matrix is made on first use;
        :meth:`column` reads one column of it without making it.
    matrix
        The decoded values: :attr:`events` itself, or before Time x ``$TIMESTEP`` when
        :attr:`time_scale` is set.
    time_scale
        ``(Time column, $TIMESTEP)`` still to apply to :attr:`matrix`, or ``None``.
    spillover
        ``(channel names, matrix)`` from ``$SPILLOVER``/``$SPILL``/``SPILL``, or ``None``.
    findings
        Non-fatal deviations from the standard.
    data_offsets
        ``(begin, end)`` absolute byte offsets of the DATA segment read (inclusive end, as in the standard).
    dataset
        Index of this data set in the file (0 for the first).
    n_datasets
        How many data sets the file holds.
    bits
        ``$PnB`` of each parameter.
    ranges
        ``$PnR`` of each parameter (``nan`` where absent).
    datatypes
        ``'I'``, ``'F'`` or ``'D'`` for each parameter.
    """

    path: str
    # the hex digest, or the hasher still running on the file's bytes (see the ``sha256`` property):
    # hashing overlaps with whatever the caller does next, and is joined when the digest is read
    _sha256: Any = field(compare=False, repr=False)
    version: str
    text: Mapping[str, str]
    channels: tuple[str, ...]
    markers: tuple[str, ...]
    matrix: np.ndarray
    spillover: tuple[tuple[str, ...], np.ndarray] | None
    findings: tuple[Finding, ...] = ()
    data_offsets: tuple[int, int] = (0, 0)
    dataset: int = 0
    n_datasets: int = field(default=1)
    bits: tuple[int, ...] = ()
    ranges: tuple[float, ...] = ()
    datatypes: tuple[str, ...] = ()
    time_scale: tuple[int, float] | None = None

    @property
    def events(self) -> np.ndarray:
        """The event values (see the class's attributes); made once when :attr:`time_scale` is set."""
        if self.time_scale is None:
            return self.matrix
        made = self.__dict__.get("_events")
        if made is None:
            j, step = self.time_scale
            made = self.matrix.astype(np.float64)
            made[:, j] *= step
            object.__setattr__(self, "_events", made)
        return made

    def column(self, j: int, index: np.ndarray | None = None) -> np.ndarray:
        """``events[:, j]`` (or ``events[index, j]``) as a new float64 array, without making :attr:`events`.

        A few events (under a quarter) are gathered row by row; more, from the whole column
        (``np.take`` copies a strided column first: 1.7 ms for 1,000,000 events however few are wanted).
        """
        if index is None:
            values = self.matrix[:, j]
        elif index.size * 4 < self.matrix.shape[0]:
            values = self.matrix[index, j]
        else:
            values = np.take(self.matrix[:, j], index)
        out = values.astype(np.float64)
        if self.time_scale is not None and j == self.time_scale[0]:
            out *= self.time_scale[1]
        return out

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of the file's bytes, exactly as read (waits for the hashing thread if needed)."""
        h = self._sha256
        return h if isinstance(h, str) else h.hexdigest()

    def __getstate__(self) -> dict[str, Any]:
        """Pickle with the finished digest (a running hasher holds a thread)."""
        state = dict(self.__dict__)
        state["_sha256"] = self.sha256
        state.pop("_events", None)  # made again from the matrix when needed
        return state

    @property
    def n_events(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def labels(self) -> list[str]:
        """``'channel (marker)'`` for each parameter, for messages."""
        return [f"{c} ({m})" if m else c for c, m in zip(self.channels, self.markers)]

    @property
    def finding_codes(self) -> tuple[str, ...]:
        """Sorted, distinct codes of :attr:`findings`."""
        return tuple(sorted({f.code for f in self.findings}))


# --------------------------------------------------------------------------------------------- reading


def read_fcs(path: str | os.PathLike, dataset: int = 0) -> FcsSample:
    """Read, check and decode one data set of an FCS file.

    The file is read in one call (no handle stays open), hashed, and parsed from memory.

    Parameters
    ----------
    path
        The FCS file.
    dataset
        Which data set to read (0 = the first); files with several record ``FCS_MULTIPLE_DATASETS``.

    Raises
    ------
    InputFileError
        If the file does not exist or cannot be read.
    FcsError
        If the file violates the standard in a way that makes its numbers doubtful
        (``code`` says how; see ``docs/fcs.md``).
    """
    try:
        data = _read_file(path)
    except FileNotFoundError:
        raise InputFileError("file not found", path=str(path),
                             hint="check the path or the sample sheet's 'file' column") from None
    except IsADirectoryError:
        raise InputFileError("is a folder, not an FCS file", path=str(path), code="FILE_IS_FOLDER") from None
    except OSError as e:
        raise InputFileError(f"cannot be read ({e.strerror})", path=str(path), code="FILE_UNREADABLE") from e
    sample = _parse_buffer(data, str(path), dataset)
    log.debug("%s: %d events x %d parameters, %d finding(s)", path, sample.n_events, len(sample.channels),
              len(sample.findings))
    return sample


@dataclass(frozen=True)
class FcsMetadata:
    """What a file says about itself, without its events (see :func:`read_fcs_metadata`)."""

    path: str
    version: str
    text: Mapping[str, str]
    channels: tuple[str, ...]
    markers: tuple[str, ...]
    dataset: int = 0
    n_datasets: int = 1
    findings: tuple[Finding, ...] = ()


def read_fcs_metadata(path: str | os.PathLike, dataset: int = 0) -> FcsMetadata:
    """Read only the HEADER and TEXT of one data set: channel names, markers and keywords.

    A few kilobytes are read whatever the file's size, so this suits questions about many
    files (which channel holds a marker?) where :func:`read_fcs` would read every event. The
    HEADER, TEXT and parameter keywords get the same checks, and raise the same errors, as in
    :func:`read_fcs`; the DATA segment is not looked at (a truncated DATA is not noticed).

    Raises
    ------
    InputFileError
        If the file does not exist or cannot be read.
    FcsError
        If the HEADER, TEXT or parameter keywords are unusable.
    """
    p = str(path)
    try:
        fd = os.open(p, os.O_RDONLY)
    except FileNotFoundError:
        raise InputFileError("file not found", path=p,
                             hint="check the path or the sample sheet's 'file' column") from None
    except IsADirectoryError:
        raise InputFileError("is a folder, not an FCS file", path=p, code="FILE_IS_FOLDER") from None
    except OSError as e:
        raise InputFileError(f"cannot be read ({e.strerror})", path=p, code="FILE_UNREADABLE") from e
    try:
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                raise _err(p, "FCS_TRUNCATED", "the file is empty", "copy it again from the instrument")
            sets = _walk_datasets(_FileSlices(fd, size), p)
        except IsADirectoryError:
            raise InputFileError("is a folder, not an FCS file", path=p, code="FILE_IS_FOLDER") from None
        except OSError as e:
            raise InputFileError(f"cannot be read ({e.strerror})", path=p, code="FILE_UNREADABLE") from e
    finally:
        os.close(fd)
    if not 0 <= dataset < len(sets):
        raise _err(p, "FCS_DATASET_NOT_FOUND",
                   f"data set {dataset} was asked for but the file holds {len(sets)} (numbered from 0)",
                   f"choose --dataset between 0 and {len(sets) - 1}")
    ds = sets[dataset]
    findings: list[Finding] = list(ds.text.findings)
    params = _parameters(ds.text.keywords, ds.version, p, findings)
    return FcsMetadata(path=p, version=ds.version, text=dict(ds.text.keywords),
                       channels=tuple(q.name for q in params), markers=tuple(q.marker for q in params),
                       dataset=dataset, n_datasets=len(sets), findings=tuple(findings))


def _err(path: str, code: str, message: str, hint: str | None = None) -> FcsError:
    return FcsError(message, path=path, code=code, hint=hint)


_DAMAGED = "the file is damaged; re-export it from the acquisition software"
_TRUNCATED = "the file is truncated; copy it again from the instrument or re-export it"


@dataclass
class _Text:
    """A parsed TEXT segment and the findings made while splitting it."""

    keywords: dict[str, str]
    findings: list[Finding]


@dataclass
class _Dataset:
    """Where one data set lies in the file (absolute offsets) and its keywords."""

    base: int
    version: str
    text_span: tuple[int, int]
    header_data: tuple[int, int]
    header_analysis: tuple[int, int]
    text: _Text
    nextdata: int


def _finding(code: str, message: str) -> Finding:
    return Finding(code, message, "info" if code in _INFO_FINDINGS else "warning")


def _parse_uint(value: str | None) -> int | None:
    """A non-negative decimal integer written in ASCII digits (spaces allowed around), else ``None``."""
    if value is None:
        return None
    s = value.strip()
    if not s or len(s) > 30 or not _INT_RE.fullmatch(s):
        return None
    return int(s)


def _parse_float(value: str | None) -> float | None:
    """A finite decimal number, else ``None`` (no 'nan', 'inf' or '1_0')."""
    if value is None:
        return None
    s = value.strip()
    if not s or len(s) > 60 or not _FLOAT_RE.fullmatch(s):
        return None
    f = float(s)
    return f if math.isfinite(f) else None


def _header_field(raw: bytes, path: str, what: str) -> int:
    s = raw.decode("latin-1").strip()
    if s == "":
        return 0
    if not s.isdigit() or not s.isascii():
        raise _err(path, "FCS_HEADER_INVALID", f"HEADER {what} offset {raw.decode('latin-1')!r} is not a number",
                   _DAMAGED)
    return int(s)


def _split_escaped(body: bytes, delim: bytes) -> list[bytes]:
    """Split on single delimiters; a run of 2k (+1) delimiters is k literal ones (+ a separator)."""
    out: list[bytes] = []
    cur = bytearray()
    i, n = 0, len(body)
    while i <= n:
        j = body.find(delim, i)
        if j < 0:
            cur += body[i:]
            out.append(bytes(cur))
            break
        cur += body[i:j]
        k = j
        while k < n and body[k:k + 1] == delim:
            k += 1
        run = k - j
        cur += delim * (run // 2)
        if run % 2:
            out.append(bytes(cur))
            cur = bytearray()
        i = k
        if i == n:
            out.append(bytes(cur))
            break
    return out


def _pairs(tokens: list[bytes], delim: bytes) -> list[tuple[bytes, bytes]] | None:
    """Keyword/value pairs, or ``None`` when the tokens cannot be pairs."""
    if len(tokens) % 2:
        return None
    pairs = list(zip(tokens[0::2], tokens[1::2]))
    for k, _ in pairs:
        if not k.strip(b" \t\r\n\x00") or delim in k:
            return None
    return pairs


def _decode_value(v: bytes) -> str:
    try:
        return v.decode("utf-8")
    except UnicodeDecodeError:
        return v.decode("latin-1")


def _parse_text(segment: bytes, path: str, version: str, what: str = "TEXT") -> _Text:
    """Split a TEXT segment into keywords (FCS 3.1 section 3.2.9: first byte is the delimiter).

    FCS 3.x escapes a delimiter inside a value by doubling it; FCS 2.0 has no escape
    and a doubled delimiter is an empty value. The version's rule is tried first and
    the other one only if the first cannot give keyword/value pairs.
    """
    findings: list[Finding] = []
    if len(segment) < 2:
        raise _err(path, "FCS_TEXT_INVALID", f"the {what} segment is empty", _DAMAGED)
    delim = segment[0:1]
    if not 1 <= delim[0] <= 126:
        raise _err(path, "FCS_DELIMITER_INVALID",
                   f"{what} delimiter {delim!r} is not an ASCII character from 1 to 126 (FCS 3.1 section 3.2.9)",
                   _DAMAGED)
    body = segment[1:]
    stripped = body if delim in b" \t\r\n\x00" else body.rstrip(b" \t\r\n\x00")
    if len(stripped) != len(body) and stripped.endswith(delim):
        findings.append(_finding("FCS_TEXT_END_PADDED", f"the {what} segment has {len(body) - len(stripped)} "
                                                         "padding byte(s) after its last delimiter"))
        body = stripped
    if body.endswith(delim):
        body = body[:-1]
    else:
        findings.append(_finding("FCS_TEXT_UNTERMINATED",
                                 f"the {what} segment does not end with its delimiter; its last value was read "
                                 "up to the segment's end"))
    if not body:
        raise _err(path, "FCS_TEXT_INVALID", f"the {what} segment holds no keywords", _DAMAGED)
    escaped = _pairs(_split_escaped(body, delim), delim)
    plain = _pairs(body.split(delim), delim) if delim * 2 in body else escaped
    first, second = (plain, escaped) if version == "FCS2.0" else (escaped, plain)
    pairs = first
    if pairs is None:
        pairs = second
        if pairs is not None:
            rule = "as escaped delimiters" if version == "FCS2.0" else "as empty values"
            findings.append(_finding("FCS_TEXT_DELIMITER_AMBIGUOUS",
                                     f"doubled delimiters in {what} were read {rule}, against {version}'s rule"))
    if pairs is None:
        raise _err(path, "FCS_TEXT_INVALID",
                   f"the {what} segment cannot be split into keyword/value pairs (a keyword without a value, "
                   "an empty keyword, or an unescaped delimiter)", _DAMAGED)
    keywords: dict[str, str] = {}
    repeated: set[str] = set()
    for k, v in pairs:
        key = k.decode("latin-1").strip(" \t\r\n\x00").upper()
        value = _decode_value(v)
        if key in keywords:
            if keywords[key] != value and key.startswith("$"):
                raise _err(path, "FCS_KEYWORD_DUPLICATE",
                           f"keyword {key} appears twice with different values ({keywords[key]!r}, {value!r})",
                           "the file is ambiguous; re-export it from the acquisition software")
            repeated.add(key)
        keywords[key] = value
    if repeated:
        findings.append(_finding("FCS_KEYWORD_REPEATED",
                                 f"keyword(s) {', '.join(sorted(repeated))} appear more than once; the last value kept"))
    return _Text(keywords, findings)


def _read_dataset_header(data: bytes, base: int, path: str) -> _Dataset:
    """Parse the HEADER and TEXT of the data set starting at ``base``."""
    size = len(data)
    if size - base < _HEADER_LEN:
        where = "the file" if base == 0 else f"the data set at byte {base}"
        if base == 0 and size >= 3 and not data.startswith(b"FCS"):
            raise _err(path, "FCS_NOT_FCS", f"does not start with an FCS version (found {data[:6]!r})",
                       "this is not an FCS file")
        raise _err(path, "FCS_TRUNCATED",
                   f"{where} is only {size - base} bytes long, too short for an FCS HEADER (58 bytes)", _TRUNCATED)
    head = data[base:base + _HEADER_LEN]
    version = head[0:6].decode("latin-1")
    if not head.startswith(b"FCS"):
        if base == 0:
            raise _err(path, "FCS_NOT_FCS", f"does not start with an FCS version (found {head[:6]!r})",
                       "this is not an FCS file")
        raise _err(path, "FCS_NEXTDATA_INVALID", f"$NEXTDATA points to byte {base}, which is not an FCS HEADER",
                   _DAMAGED)
    if version not in _VERSIONS:
        raise _err(path, "FCS_VERSION_UNSUPPORTED", f"FCS version {version!r} is not supported (2.0, 3.0, 3.1, 3.2)",
                   "re-export the file as FCS 3.1 from the acquisition software")
    if head[6:10] != b"    ":
        raise _err(path, "FCS_HEADER_INVALID", f"HEADER bytes 6-9 should be spaces, found {head[6:10]!r}", _DAMAGED)
    names = ("TEXT begin", "TEXT end", "DATA begin", "DATA end", "ANALYSIS begin", "ANALYSIS end")
    off = [_header_field(head[10 + 8 * i:18 + 8 * i], path, n) for i, n in enumerate(names)]
    t0, t1 = off[0], off[1]
    if t0 < _HEADER_LEN or t1 <= t0:
        raise _err(path, "FCS_TEXT_OFFSETS", f"HEADER says TEXT is at bytes {t0}-{t1}, which is impossible",
                   _DAMAGED)
    if base + t1 >= size:
        raise _err(path, "FCS_TRUNCATED",
                   f"HEADER says TEXT ends at byte {base + t1} but the file has only {size} bytes", _TRUNCATED)
    text = _parse_text(data[base + t0:base + t1 + 1], path, version)
    kw = text.keywords
    # Supplemental TEXT (FCS 3.0+): keywords that did not fit in the primary TEXT.
    s0, s1 = _parse_uint(kw.get("$BEGINSTEXT")), _parse_uint(kw.get("$ENDSTEXT"))
    if version != "FCS2.0" and s0 and s1 and (s0, s1) != (t0, t1):
        if s1 < s0 or s0 < _HEADER_LEN or base + s1 >= size or not (s1 < t0 or s0 > t1):
            raise _err(path, "FCS_TEXT_OFFSETS", f"$BEGINSTEXT/$ENDSTEXT ({s0}-{s1}) are impossible for a file of "
                                                 f"{size} bytes", _DAMAGED)
        try:
            stext = _parse_text(data[base + s0:base + s1 + 1], path, version, "supplemental TEXT")
        except FcsError as e:
            # Some writers point $BEGINSTEXT at a vendor blob (e.g. a ZIP archive); everything needed to
            # decode DATA is then in the primary TEXT, and a missing keyword would still raise below.
            text.findings.append(_finding("FCS_STEXT_INVALID",
                                          f"$BEGINSTEXT/$ENDSTEXT ({s0}-{s1}) point to bytes that are not keywords "
                                          f"({e.message}); the supplemental TEXT was ignored"))
            stext = _Text({}, [])
        for k, v in stext.keywords.items():
            if k in kw and kw[k] != v and k.startswith("$"):
                raise _err(path, "FCS_KEYWORD_DUPLICATE",
                           f"keyword {k} differs between TEXT ({kw[k]!r}) and supplemental TEXT ({v!r})",
                           "the file is ambiguous; re-export it from the acquisition software")
            kw.setdefault(k, v)
        text.findings.extend(stext.findings)
    nxt_raw = kw.get("$NEXTDATA")
    nxt = 0 if nxt_raw is None else _parse_uint(nxt_raw)
    if nxt is None:
        raise _err(path, "FCS_NEXTDATA_INVALID", f"$NEXTDATA = {nxt_raw!r} is not a byte offset", _DAMAGED)
    return _Dataset(base, version, (base + t0, base + t1), (off[2], off[3]), (off[4], off[5]), text, nxt)


def _walk_datasets(data: bytes, path: str) -> list[_Dataset]:
    """All data sets of the file, following ``$NEXTDATA`` (relative to each data set's start)."""
    sets = [_read_dataset_header(data, 0, path)]
    while sets[-1].nextdata:
        cur = sets[-1]
        nxt = cur.base + cur.nextdata
        if cur.nextdata < _HEADER_LEN or nxt <= cur.text_span[1] or nxt + _HEADER_LEN > len(data):
            raise _err(path, "FCS_NEXTDATA_INVALID",
                       f"$NEXTDATA of data set {len(sets)} points to byte {nxt}, outside the file or inside the "
                       f"data set itself (file of {len(data)} bytes)", _DAMAGED)
        if len(sets) >= _MAX_DATASETS:
            raise _err(path, "FCS_NEXTDATA_INVALID", f"more than {_MAX_DATASETS} data sets", _DAMAGED)
        sets.append(_read_dataset_header(data, nxt, path))
    return sets


def count_datasets(data: bytes, path: str = "<bytes>") -> int:
    """How many data sets the FCS file in ``data`` holds (following ``$NEXTDATA``).

    Raises
    ------
    FcsError
        If a HEADER, TEXT or ``$NEXTDATA`` is invalid.
    """
    return len(_walk_datasets(data, path))


def _required_uint(kw: Mapping[str, str], key: str, path: str, required: bool = True) -> int | None:
    raw = kw.get(key)
    if raw is None or raw.strip() == "":
        if required:
            raise _err(path, "FCS_KEYWORD_MISSING", f"required keyword {key} is missing",
                       "the file is not a complete FCS file; re-export it from the acquisition software")
        return None
    v = _parse_uint(raw)
    if v is None:
        raise _err(path, "FCS_KEYWORD_INVALID", f"keyword {key} = {raw!r} is not a whole number", _DAMAGED)
    return v


@dataclass
class _Param:
    name: str
    marker: str
    kind: str  # I, F, D
    bits: int
    range: float  # nan when absent
    decades: float = 0.0
    log_zero: float = 0.0
    gain: float = 1.0


def _byte_order(raw: str | None, path: str) -> str:
    if raw is None or not raw.strip():
        raise _err(path, "FCS_KEYWORD_MISSING", "required keyword $BYTEORD is missing",
                   "the byte order of the data is unknown; re-export the file")
    parts = [p.strip() for p in raw.split(",")]
    nums = [_parse_uint(p) for p in parts]
    if any(n is None for n in nums) or not 1 <= len(nums) <= 8:
        raise _err(path, "FCS_BYTEORD_UNSUPPORTED", f"$BYTEORD {raw!r} is not a list of byte numbers", _DAMAGED)
    k = len(nums)
    if nums == list(range(1, k + 1)):
        return "<"
    if nums == list(range(k, 0, -1)):
        return ">"
    raise _err(path, "FCS_BYTEORD_UNSUPPORTED",
               f"$BYTEORD {raw!r} is a mixed byte order; only little-endian (1,2,3,4) and big-endian (4,3,2,1) "
               "are supported", "re-export the file as FCS 3.1 from the acquisition software")


def _parameters(kw: Mapping[str, str], version: str, path: str, findings: list[Finding]) -> list[_Param]:
    n_par = _required_uint(kw, "$PAR", path)
    assert n_par is not None
    present: dict[str, set[int]] = {}
    for key in kw:
        m = _PARAM_KEY_RE.fullmatch(key)
        if m and len(m.group(1)) < 7:
            present.setdefault(m.group(2), set()).add(int(m.group(1)))
    names_at = present.get("N", set())
    bits_at = present.get("B", set())
    beyond = sorted(i for i in names_at | bits_at if i > n_par or i == 0)
    if beyond:
        raise _err(path, "FCS_PAR_MISMATCH",
                   f"$PAR says {n_par} parameters but $P{beyond[0]}N/$P{beyond[0]}B is present",
                   "the parameter count is inconsistent; re-export the file")
    if n_par == 0:
        raise _err(path, "FCS_KEYWORD_INVALID", "$PAR is 0: the file has no parameters", _DAMAGED)
    if len(names_at) < n_par:
        k = len(names_at)
        contiguous = names_at == set(range(1, k + 1))
        i = k + 1 if contiguous else min(set(range(1, k + 2)) - names_at)
        if contiguous and i not in bits_at:
            raise _err(path, "FCS_PAR_MISMATCH",
                       f"$PAR says {n_par} parameters but only {k} have a $PnN name (none from $P{i}N on)",
                       "the parameter count is inconsistent; re-export the file")
        raise _err(path, "FCS_PNN_MISSING", f"parameter {i} has no $P{i}N name",
                   "parameters cannot be identified; re-export the file")

    datatype = kw.get("$DATATYPE", "").strip().upper()
    if not datatype:
        raise _err(path, "FCS_KEYWORD_MISSING", "required keyword $DATATYPE is missing", _DAMAGED)
    params: list[_Param] = []
    names_seen: dict[str, int] = {}
    for i in range(1, n_par + 1):
        name = kw[f"$P{i}N"].strip()
        if not name:
            raise _err(path, "FCS_PNN_MISSING", f"parameter {i} has an empty $P{i}N name",
                       "parameters cannot be identified; re-export the file")
        if name in names_seen:
            raise _err(path, "FCS_PNN_DUPLICATE",
                       f"channel name {name!r} is used by parameters {names_seen[name]} and {i}",
                       "parameters cannot be told apart; fix the channel names in the acquisition software")
        names_seen[name] = i
        kind = datatype
        if version == "FCS3.2" and kw.get(f"$P{i}DATATYPE", "").strip():
            kind = kw[f"$P{i}DATATYPE"].strip().upper()
        if kind == "A":
            raise _err(path, "FCS_DATATYPE_UNSUPPORTED",
                       "$DATATYPE is A (ASCII data, deprecated since FCS 3.1) and is not supported",
                       "re-export the file with binary (integer or float) data")
        if kind not in ("I", "F", "D"):
            raise _err(path, "FCS_DATATYPE_UNSUPPORTED",
                       f"$DATATYPE {kind!r} is not a data type of the standard (I, F, D)", _DAMAGED)
        raw_b = kw.get(f"$P{i}B")
        b = _parse_uint(raw_b)
        if b is None:
            raise _err(path, "FCS_PNB_INVALID",
                       f"$P{i}B = {raw_b!r} is not a bit width" if raw_b is not None else f"$P{i}B is missing",
                       _DAMAGED)
        if kind == "F" and b != 32 or kind == "D" and b != 64:
            raise _err(path, "FCS_PNB_INVALID",
                       f"$P{i}B = {b} but $DATATYPE {kind} stores {32 if kind == 'F' else 64}-bit numbers", _DAMAGED)
        if kind == "I" and not 1 <= b <= 64:
            raise _err(path, "FCS_PNB_INVALID", f"$P{i}B = {b} is not an integer width from 1 to 64 bits", _DAMAGED)
        raw_r = kw.get(f"$P{i}R")
        r = _parse_float(raw_r)
        if r is None or r <= 0:
            if kind == "I":
                raise _err(path, "FCS_PNR_INVALID",
                           f"$P{i}R = {raw_r!r} is not a positive number" if raw_r is not None
                           else f"$P{i}R is missing", "integer data cannot be decoded without its range; "
                                                       "re-export the file")
            findings.append(_finding("FCS_PNR_MISSING", f"$P{i}R is missing or invalid ({raw_r!r}); not needed "
                                                        "for floating-point data"))
            r = math.nan
        p = _Param(name, kw.get(f"$P{i}S", "").strip(), kind, b, r)
        raw_e = kw.get(f"$P{i}E")
        if raw_e is None or not raw_e.strip():
            if version != "FCS2.0":
                findings.append(_finding("FCS_PNE_MISSING", f"$P{i}E is missing; parameter {i} read as linear"))
        else:
            parts = raw_e.split(",")
            vals = [_parse_float(x) for x in parts] if len(parts) == 2 else [None]
            if any(v is None or v < 0 for v in vals):
                raise _err(path, "FCS_PNE_INVALID", f"$P{i}E = {raw_e!r} is not 'decades,offset' (e.g. 0,0 or 4,1)",
                           _DAMAGED)
            p.decades, p.log_zero = vals[0], vals[1]  # type: ignore[assignment]
            if p.decades > 0:
                if kind != "I":
                    findings.append(_finding("FCS_PNE_FLOAT", f"$P{i}E = {raw_e} ignored for floating-point "
                                                              f"parameter {name} (the standard requires 0,0)"))
                    p.decades = 0.0
                elif p.decades > 100 or 2 * p.decades + math.log10(max(p.log_zero, 1e-300)) > 300:
                    raise _err(path, "FCS_PNE_INVALID", f"$P{i}E = {raw_e!r} decodes to numbers beyond floating "
                                                        "point (more than 100 decades)", _DAMAGED)
                elif p.log_zero == 0:
                    p.log_zero = 1.0
                    findings.append(_finding("FCS_PNE_ZERO_OFFSET", f"$P{i}E = {raw_e}: offset 0 read as 1"))
        raw_g = kw.get(f"$P{i}G")
        if raw_g is not None and raw_g.strip():
            g = _parse_float(raw_g)
            if g is None or not 1e-30 <= g <= 1e30:
                raise _err(path, "FCS_PNG_INVALID", f"$P{i}G = {raw_g!r} is not a positive gain", _DAMAGED)
            p.gain = g
        params.append(p)
    return params


def _resolve_data_offsets(ds: _Dataset, kw: Mapping[str, str], expected: int, path: str, size: int,
                          findings: list[Finding]) -> tuple[int, int]:
    """Absolute (begin, end) of DATA, checking HEADER against ``$BEGINDATA``/``$ENDDATA``."""
    base = ds.base
    h0, h1 = ds.header_data
    header = None if (h0 == 0 and h1 == 0) else (h0, h1)
    raw0, raw1 = kw.get("$BEGINDATA"), kw.get("$ENDDATA")
    k0, k1 = _parse_uint(raw0), _parse_uint(raw1)
    text: tuple[int, int] | None = None
    if raw0 is None and raw1 is None:
        if ds.version != "FCS2.0" and header is None:
            raise _err(path, "FCS_KEYWORD_MISSING", "neither the HEADER nor $BEGINDATA/$ENDDATA give the DATA "
                                                    "segment's offsets", _DAMAGED)
    elif k0 is None or k1 is None:
        if ds.version == "FCS2.0" and header is not None:
            findings.append(_finding("FCS_TEXT_OFFSETS_IGNORED",
                                     f"$BEGINDATA/$ENDDATA ({raw0!r}, {raw1!r}) are not offsets; FCS 2.0 does not "
                                     "define them, the HEADER offsets were used"))
        else:
            raise _err(path, "FCS_KEYWORD_INVALID",
                       f"$BEGINDATA/$ENDDATA ({raw0!r}, {raw1!r}) are not byte offsets", _DAMAGED)
    else:
        text = (k0, k1)

    def fits(c: tuple[int, int]) -> bool:
        b, e = c
        return (b >= _HEADER_LEN and e - b + 1 in (expected, expected + 1) and base + b + expected <= size
                and not (b <= ds.text_span[1] - base and e >= ds.text_span[0] - base))

    if header is None and text is None:
        if expected == 0:
            return (base, base - 1)
        raise _err(path, "FCS_DATA_OFFSETS", "the HEADER gives no DATA offsets and TEXT has none either", _DAMAGED)
    if header is None:
        assert text is not None
        if text[1] <= _BIG_OFFSET and ds.version != "FCS2.0" and expected > 0:
            findings.append(_finding("FCS_HEADER_DATA_OFFSETS_MISSING",
                                     f"the HEADER gives no DATA offsets although DATA ends at byte {text[1]} "
                                     f"(below {_BIG_OFFSET:,}); $BEGINDATA/$ENDDATA used"))
        chosen = text
    elif text is None or text == header:
        chosen = header
    else:
        ok_h, ok_t = fits(header), fits(text)
        exact_h = ok_h and header[1] - header[0] + 1 == expected
        exact_t = ok_t and text[1] - text[0] + 1 == expected
        if ok_h and ok_t and header[0] != text[0] or (exact_h and exact_t):
            raise _err(path, "FCS_DATA_OFFSETS",
                       f"HEADER says DATA is at bytes {header[0]}-{header[1]} but $BEGINDATA/$ENDDATA say "
                       f"{text[0]}-{text[1]}, and both fit $TOT", _DAMAGED)
        if ok_h and (not ok_t or exact_h):
            chosen, used = header, "HEADER"
        elif ok_t:
            chosen, used = text, "TEXT"
        else:
            ends = [base + c[1] for c in (header, text)]
            if all(e >= size for e in ends) and all(base + c[0] < size for c in (header, text)):
                raise _err(path, "FCS_TRUNCATED", f"DATA should end at byte {min(ends)} but the file has only "
                                                  f"{size} bytes", _TRUNCATED)
            raise _err(path, "FCS_DATA_OFFSETS",
                       f"HEADER says DATA is at bytes {header[0]}-{header[1]} but $BEGINDATA/$ENDDATA say "
                       f"{text[0]}-{text[1]}, and neither fits $TOT x event width = {expected} bytes", _DAMAGED)
        findings.append(_finding("FCS_DATA_OFFSETS_DISAGREE",
                                 f"HEADER says DATA is at bytes {header[0]}-{header[1]}, $BEGINDATA/$ENDDATA say "
                                 f"{text[0]}-{text[1]}; the {used} offsets fit $TOT and the file and were used"))
    b, e = chosen
    if expected == 0 and (e < b or (b, e) == (0, 0)):
        return (base + b, base + b - 1)
    if b < _HEADER_LEN or e < b:
        raise _err(path, "FCS_DATA_OFFSETS", f"DATA offsets {b}-{e} are impossible", _DAMAGED)
    if b <= ds.text_span[1] - base and e >= ds.text_span[0] - base:
        raise _err(path, "FCS_DATA_OFFSETS", f"DATA (bytes {b}-{e}) overlaps TEXT (bytes "
                                             f"{ds.text_span[0] - base}-{ds.text_span[1] - base})", _DAMAGED)
    return base + b, base + e


def _crc16(buf: bytes | memoryview, init: int) -> int:
    """CRC-16/CCITT (polynomial 0x1021, MSB first) of ``buf``."""
    import binascii

    return binascii.crc_hqx(buf, init)


def _check_crc(data: bytes, last: int, path: str) -> None:
    """FCS 3.x: 8 ASCII characters after the last segment hold a CRC-16; '00000000' means none.

    The standard names CRC-CCITT over the bytes from the first byte of HEADER to the
    last byte of the last segment but not its initial value or notation, so the value
    is accepted in decimal or hexadecimal, with initial value 0 or 0xFFFF.
    """
    tail = data[last + 1:last + 9]
    if len(tail) != 8 or not tail.isdigit() and not all(c in b"0123456789abcdefABCDEF" for c in tail):
        return
    if tail.strip(b"0") == b"":
        return
    stated = tail.decode("ascii")
    body = memoryview(_view(data))[:last + 1]
    values = {_crc16(body, 0), _crc16(body, 0xFFFF)}
    candidates = {f"{v:08d}" for v in values} | {f"{v:08X}" for v in values}
    if stated.upper() not in candidates:
        raise _err(path, "FCS_CRC_MISMATCH",
                   f"the CRC after the last segment ({stated}) does not match the file's bytes",
                   "the file was altered after it was written; copy it again from the instrument")


def parse_fcs(data: bytes, path: str = "<bytes>", dataset: int = 0) -> FcsSample:
    """Check and decode one data set of the FCS file held in ``data``.

    Raises
    ------
    FcsError
        See :func:`read_fcs`.
    """
    return _parse_buffer(data, path, dataset)


def _parse_buffer(data: bytes | _FileBuffer, path: str, dataset: int) -> FcsSample:
    hasher = _Sha256(_view(data))
    sample = _parse(data, path, dataset)
    return dataclasses.replace(sample, _sha256=hasher)


def _read_file(path: str | os.PathLike) -> _FileBuffer:
    """The whole file in one read-only numpy buffer.

    A large numpy allocation is backed by transparent huge pages where the kernel allows, so
    faulting it in costs about a quarter of a ``bytes`` object's (7 ms instead of 31 ms for
    72 MB); the DATA segment is then decoded from it in place. Reads to the end even if the
    file grew since it was opened, as ``Path.read_bytes`` does.
    """
    with open(path, "rb", buffering=0) as fh:
        size = os.fstat(fh.fileno()).st_size
        buf = np.empty(size, dtype=np.uint8)
        got = 0
        while got < size:
            n = fh.readinto(memoryview(buf)[got:])
            if not n:
                break
            got += n
        more = fh.read() if got == size else b""
    if got < size:
        buf = buf[:got].copy()
    elif more:
        buf = np.concatenate([buf, np.frombuffer(more, dtype=np.uint8)])
    buf.flags.writeable = False
    return _FileBuffer(buf)


class _FileBuffer:
    """A file's bytes held in a numpy array, with the few ``bytes`` operations the parser uses.

    Slices (HEADER, TEXT, a CRC) are copied out as ``bytes``; the DATA segment and the hash
    read the array itself (see :func:`_view`).
    """

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __len__(self) -> int:
        return int(self.array.size)

    def __getitem__(self, key: slice) -> bytes:
        return self.array[key].tobytes()

    def startswith(self, prefix: bytes) -> bool:
        return self.array[:len(prefix)].tobytes() == prefix

    def count(self, sub: bytes, start: int, end: int) -> int:
        return self.array[start:end].tobytes().count(sub)


class _FileSlices:
    """The parts of an open file that the HEADER and TEXT parsers ask for, read on demand."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.size = fd, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: slice) -> bytes:
        start, stop, _ = key.indices(self.size)
        return os.pread(self.fd, stop - start, start) if stop > start else b""

    def startswith(self, prefix: bytes) -> bool:
        return self[0:len(prefix)] == prefix


def _view(data: Any) -> Any:
    """What numpy and hashlib read: the array behind a :class:`_FileBuffer`, else ``data`` itself."""
    return data.array if isinstance(data, _FileBuffer) else data


class _Sha256:
    """SHA-256 of ``data``, for large inputs computed as side work (:mod:`.background`; hashlib
    releases the GIL), so that it overlaps whatever the caller does next."""

    _THREAD_ABOVE = 4 * 1024 * 1024

    def __init__(self, data: Any) -> None:
        self._digest: str | None = None
        self._job: Any = None
        if memoryview(data).nbytes > self._THREAD_ABOVE:
            from .background import submit

            self._job = submit(self._run, data)
        else:
            self._run(data)

    def _run(self, data: Any) -> None:
        self._digest = hashlib.sha256(data).hexdigest()

    def hexdigest(self) -> str:
        if self._job is not None:
            self._job.result()
        assert self._digest is not None
        return self._digest


def _parse(data: bytes, path: str, dataset: int) -> FcsSample:
    digest = ""
    if len(data) == 0:
        raise _err(path, "FCS_TRUNCATED", "the file is empty", "copy it again from the instrument")
    sets = _walk_datasets(data, path)
    if not 0 <= dataset < len(sets):
        raise _err(path, "FCS_DATASET_NOT_FOUND",
                   f"data set {dataset} was asked for but the file holds {len(sets)} (numbered from 0)",
                   f"choose --dataset between 0 and {len(sets) - 1}")
    ds = sets[dataset]
    kw = ds.text.keywords
    findings: list[Finding] = list(ds.text.findings)
    if len(sets) > 1:
        findings.append(_finding("FCS_MULTIPLE_DATASETS",
                                 f"the file holds {len(sets)} data sets; data set {dataset} was read "
                                 "(choose another with --dataset N, numbered from 0)"))
    version = ds.version

    mode = kw.get("$MODE", "").strip().upper()
    if not mode:
        if version != "FCS3.2":
            findings.append(_finding("FCS_MODE_MISSING", "$MODE is missing; list mode (L) assumed"))
    elif mode != "L":
        what = {"C": "a correlated histogram", "U": "uncorrelated histograms"}.get(mode, f"mode {mode!r}")
        raise _err(path, "FCS_MODE_UNSUPPORTED",
                   f"$MODE is {mode!r}: the file holds {what}, not list-mode events (histogram modes are "
                   "deprecated since FCS 3.1)", "export list-mode (event) data from the acquisition software")
    params = _parameters(kw, version, path, findings)
    endian = _byte_order(kw.get("$BYTEORD"), path)

    n_tot = _required_uint(kw, "$TOT", path, required=version != "FCS2.0")
    bits = [p.bits for p in params]
    event_bits = sum(bits)
    packed = any(b % 8 for b in bits)
    if packed:
        findings.append(_finding("FCS_BITPACKED",
                                 f"integer fields of {sorted(set(bits))} bits are not whole bytes (bit-packed, "
                                 "deprecated); read as a least-significant-bit-first stream"))
    if n_tot is None:
        # FCS 2.0 without $TOT: derive it from the DATA length (HEADER offsets).
        h0, h1 = ds.header_data
        seg = h1 - h0 + 1 if h1 >= h0 > 0 else 0
        n_tot = seg * 8 // event_bits
        findings.append(_finding("FCS_TOT_MISSING", f"$TOT is missing; {n_tot} events derived from the DATA length"))
    expected = (n_tot * event_bits + 7) // 8
    d0, d1 = _resolve_data_offsets(ds, kw, expected, path, len(data), findings)
    seg_len = d1 - d0 + 1
    if seg_len == expected + 1:
        findings.append(_finding("FCS_ENDDATA_OFF_BY_ONE",
                                 f"the DATA end offset ({d1}) is one byte past $TOT x event width; the last "
                                 "byte was ignored (a known writer bug)"))
        d1 -= 1
    elif seg_len != expected:
        if d1 >= len(data):
            raise _err(path, "FCS_TRUNCATED",
                       f"DATA should end at byte {d1} but the file has only {len(data)} bytes", _TRUNCATED)
        else:
            n_fit = seg_len * 8 // event_bits if event_bits else 0
            raise _err(path, "FCS_TOT_MISMATCH",
                       f"$TOT says {n_tot} events ({expected} bytes) but the DATA segment holds {seg_len} bytes "
                       f"({n_fit} events)", "the file is probably truncated or damaged; re-export it from the "
                                            "acquisition software")
    if d1 >= len(data):
        raise _err(path, "FCS_TRUNCATED", f"DATA should end at byte {d1} but the file has only {len(data)} bytes",
                   _TRUNCATED)
    if n_tot == 0:
        findings.append(_finding("FCS_NO_EVENTS", "the data set holds no events"))
    marks, looked = _corruption_marks(data, d0, expected)
    if marks >= 3 and marks * 1000 > looked:
        raise _err(path, "FCS_DATA_CORRUPTED",
                   f"the DATA segment holds U+FFFD replacement sequences (EF BF BD) at {marks} of {looked} places "
                   "looked at: the file was damaged by a text-mode (UTF-8) conversion, e.g. a transfer as text by "
                   "e-mail, FTP or version control", "get the original file from the instrument and copy it as binary")
    if version != "FCS2.0" and dataset == len(sets) - 1:
        last = max(ds.text_span[1], d1 + (1 if any(f.code == "FCS_ENDDATA_OFF_BY_ONE" for f in findings) else 0))
        a0, a1 = (_parse_uint(kw.get("$BEGINANALYSIS")) or ds.header_analysis[0],
                  _parse_uint(kw.get("$ENDANALYSIS")) or ds.header_analysis[1])
        if a1 > a0 > 0 and ds.base + a1 < len(data):
            last = max(last, ds.base + a1)
        _check_crc(data, last, path)

    time_index, time_step = _time_channel(params, kw, version, path, findings)
    # Float DATA may hold NaN (even signalling NaN) and huge values: decode them as they are, without warnings.
    with np.errstate(invalid="ignore", over="ignore"):
        events, time_scale = _decode(data, d0, n_tot, params, endian, path, findings, packed, time_index, time_step)

    spill = _spillover(kw, [p.name for p in params], findings)
    return FcsSample(
        path=path, _sha256=digest, version=version, text=dict(kw), channels=tuple(p.name for p in params),
        markers=tuple(p.marker for p in params), matrix=events, spillover=spill, findings=tuple(findings),
        data_offsets=(d0, d1), dataset=dataset, n_datasets=len(sets), bits=tuple(bits),
        ranges=tuple(p.range for p in params), datatypes=tuple(p.kind for p in params), time_scale=time_scale,
    )


def _corruption_marks(data: bytes, start: int, length: int) -> tuple[int, int]:
    """Count EF BF BD sequences in DATA: all of it when small, else 64 evenly spread 16 KiB windows.

    A UTF-8 text conversion replaces every byte that is not valid UTF-8, so its marks are
    dense everywhere (one per few bytes of binary data); a 1 MiB sample finds them at ~1/50
    of the cost of scanning a large file, while real data shows at most a handful by chance.
    """
    if length <= 0:
        return 0, 0
    if length <= 2 * 1024 * 1024:
        return data.count(_CORRUPTION_MARK, start, start + length), length
    window, n_windows = 16 * 1024, 64
    step = (length - window) // (n_windows - 1)
    marks = sum(data.count(_CORRUPTION_MARK, start + k * step, start + k * step + window) for k in range(n_windows))
    return marks, window * n_windows


def _time_channel(params: list[_Param], kw: Mapping[str, str], version: str, path: str,
                  findings: list[Finding]) -> tuple[int | None, float]:
    """Index of the channel named 'Time' (as FlowIO finds it) and the ``$TIMESTEP`` to scale it by."""
    time_index = None
    for i, p in enumerate(params):
        if p.name.lower() == "time":
            time_index = i
    if time_index is None:
        return None, 1.0
    raw = kw.get("$TIMESTEP", kw.get("TIMESTEP"))
    if raw is None:
        if version != "FCS2.0":
            findings.append(_finding("FCS_TIMESTEP_MISSING",
                                     "the file has a Time channel but no $TIMESTEP; Time is left in clock ticks"))
        return time_index, 1.0
    if not raw.strip():
        return time_index, 1.0
    step = _parse_float(raw)
    if step is None or not 1e-30 <= step <= 1e30:
        raise _err(path, "FCS_TIMESTEP_INVALID", f"$TIMESTEP = {raw!r} is not a positive number of seconds",
                   "Time values cannot be converted to seconds; fix $TIMESTEP or re-export the file")
    return time_index, step


def _next_pow2(r: float) -> int:
    n = max(1, math.ceil(r))
    return 1 << (n - 1).bit_length()


def _decode(data: bytes, start: int, n: int, params: list[_Param], endian: str, path: str,
            findings: list[Finding], packed: bool, time_index: int | None,
            time_step: float) -> tuple[np.ndarray, tuple[int, float] | None]:
    """Decode the DATA segment into an ``(n, p)`` float matrix (at most one copy of the events).

    Returns the matrix and, when Time x ``$TIMESTEP`` is the only step that needs float64,
    ``(Time column, $TIMESTEP)`` left to apply (the matrix stays float32, see
    :attr:`FcsSample.time_scale`); else ``None``.
    """
    p = len(params)
    kinds = {q.kind for q in params}
    masks: list[int | None] = []
    for q in params:
        if q.kind == "I" and _next_pow2(q.range) < (1 << q.bits):
            masks.append(_next_pow2(q.range) - 1)
        else:
            masks.append(None)
    scale_time = time_index is not None and time_step != 1.0
    log_cols = [j for j, q in enumerate(params) if q.kind == "I" and q.decades > 0]
    gain_cols = [j for j, q in enumerate(params) if q.gain != 1.0 and j != time_index]
    lossless32 = all(q.kind == "F" or (q.kind == "I" and q.bits <= 24) for q in params)
    dtype = np.float32 if lossless32 and not (log_cols or gain_cols) else np.float64
    deferred = (int(time_index), float(time_step)) if scale_time and dtype == np.float32 else None
    width = sum(q.bits for q in params) // 8
    masked_counts: dict[int, int] = {}

    def put_int_column(out: np.ndarray, j: int, col: np.ndarray) -> None:
        m = masks[j]
        if m is not None:
            masked = col & np.asarray(m, dtype=col.dtype)
            changed = int(np.count_nonzero(masked != col))
            if changed:
                masked_counts[j] = changed
            col = masked
        out[:, j] = col

    if n == 0:
        out = np.empty((0, p), dtype=dtype)
    elif packed:
        out = _decode_packed(data, start, n, params, dtype, put_int_column)
    elif len(kinds) == 1 and len({q.bits for q in params}) == 1 and params[0].bits in (8, 16, 32, 64):
        q0 = params[0]
        code = {"F": "f", "D": "f", "I": "u"}[q0.kind]
        raw = np.frombuffer(_view(data), dtype=f"{endian}{code}{q0.bits // 8}", count=n * p, offset=start).reshape(n, p)
        # native-order data already in the target type is used in place (read-only, no copy)
        out = raw.astype(dtype, copy=any(m is not None for m in masks))
        for j, m in enumerate(masks):
            if m is not None:
                put_int_column(out, j, raw[:, j])
    elif kinds == {"I"} and len({q.bits for q in params}) == 1:
        # One odd byte width for all (e.g. 24-bit): widen every value at once.
        nb = params[0].bits // 8
        size = 4 if nb <= 4 else 8
        u8 = np.frombuffer(_view(data), dtype=np.uint8, count=n * width, offset=start).reshape(n, p, nb)
        pad = np.zeros((n, p, size), dtype=np.uint8)
        if endian == "<":
            pad[:, :, :nb] = u8
        else:
            pad[:, :, size - nb:] = u8
        raw = pad.view(f"{endian}u{size}").reshape(n, p)
        out = raw.astype(dtype)
        del pad
        for j, m in enumerate(masks):
            if m is not None:
                put_int_column(out, j, raw[:, j])
    else:
        # Mixed widths/types: one structured view; 3/5/6/7-byte integers from a byte matrix.
        fields = []
        pos = 0
        for j, q in enumerate(params):
            nb = q.bits // 8
            if not (q.kind == "I" and nb not in (1, 2, 4, 8)):
                fields.append((f"c{j}", f"{endian}{'u' if q.kind == 'I' else 'f'}{nb}", pos))
            pos += nb
        rec = np.frombuffer(_view(data), dtype=np.dtype({"names": [f[0] for f in fields], "formats": [f[1] for f in fields],
                                                  "offsets": [f[2] for f in fields], "itemsize": width}),
                            count=n, offset=start)
        u8 = np.frombuffer(_view(data), dtype=np.uint8, count=n * width, offset=start).reshape(n, width)
        out = np.empty((n, p), dtype=dtype)
        pos = 0
        for j, q in enumerate(params):
            nb = q.bits // 8
            if q.kind != "I":
                out[:, j] = rec[f"c{j}"]
            elif nb in (1, 2, 4, 8):
                put_int_column(out, j, rec[f"c{j}"])
            else:
                put_int_column(out, j, _odd_width_ints(u8[:, pos:pos + nb], endian))
            pos += nb
    for j, c in sorted(masked_counts.items()):
        findings.append(_finding("FCS_VALUES_MASKED",
                                 f"{c} value(s) of {params[j].name} had bits set above $P{j + 1}R = "
                                 f"{params[j].range:g}; masked to {masks[j]} as the standard requires"))
    # FlowKit/FlowIO preprocessing order: Time x $TIMESTEP, then $PnE decoding, then / $PnG.
    # (float64 data near its limit may overflow to inf, as in FlowKit; no warning for it.)
    with np.errstate(over="ignore", invalid="ignore"):
        if scale_time and deferred is None:
            assert time_index is not None
            out[:, time_index] *= time_step
        for j in log_cols:
            q = params[j]
            out[:, j] = 10 ** (q.decades * out[:, j] / q.range) * q.log_zero
        for j in gain_cols:
            out[:, j] /= params[j].gain
    return out, deferred


def _odd_width_ints(raw: np.ndarray, endian: str) -> np.ndarray:
    """Unsigned integers of 3, 5, 6 or 7 bytes (e.g. 24-bit Cytek xP5 data), given as an (n, nb) byte matrix."""
    n, nb = raw.shape
    size = 4 if nb <= 4 else 8
    pad = np.zeros((n, size), dtype=np.uint8)
    if endian == "<":
        pad[:, :nb] = raw
    else:
        pad[:, size - nb:] = raw
    return pad.view(f"{endian}u{size}").reshape(n)


def _decode_packed(data: bytes, start: int, n: int, params: list[_Param], dtype: type,
                   put_int_column) -> np.ndarray:  # noqa: ANN001
    """Bit-packed integers: one LSB-first bit stream, fields of ``$PnB`` bits back to back."""
    event_bits = sum(q.bits for q in params)
    n_bytes = (n * event_bits + 7) // 8
    buf = np.zeros(n_bytes + 9, dtype=np.uint8)
    buf[:n_bytes] = np.frombuffer(_view(data), dtype=np.uint8, count=n_bytes, offset=start)
    out = np.empty((n, len(params)), dtype=dtype)
    chunk = 1 << 16
    offset = 0
    for j, q in enumerate(params):
        col = np.empty(n, dtype=np.uint64)
        span = (q.bits + 7 + 7) // 8
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            pos = np.arange(lo, hi, dtype=np.int64) * event_bits + offset
            byte = pos >> 3
            shift = (pos & 7).astype(np.uint64)
            acc = np.zeros(hi - lo, dtype=np.uint64)
            for k in range(min(span, 8)):
                acc |= buf[byte + k].astype(np.uint64) << np.uint64(8 * k)
            val = acc >> shift
            if span > 8:  # a 58..64-bit field that straddles a ninth byte
                extra = buf[byte + 8].astype(np.uint64)
                val |= np.where(shift > 0, extra << (np.uint64(64) - np.maximum(shift, np.uint64(1))), np.uint64(0))
            if q.bits < 64:
                val &= np.uint64((1 << q.bits) - 1)
            col[lo:hi] = val
        put_int_column(out, j, col)
        offset += q.bits
    return out


def _spillover(kw: Mapping[str, str], channels: Sequence[str],
               findings: list[Finding]) -> tuple[tuple[str, ...], np.ndarray] | None:
    for key in ("$SPILLOVER", "SPILL", "$SPILL", "SPILLOVER", "$COMP"):
        if key not in kw:
            continue
        try:
            names, matrix = parse_spillover(kw[key])
        except ValueError as e:
            findings.append(_finding("FCS_SPILLOVER_INVALID", f"{key} cannot be parsed ({e}); the file provides no "
                                                              "compensation"))
            return None
        unknown = [nm for nm in names if nm not in channels]
        if unknown:
            findings.append(_finding("FCS_SPILLOVER_CHANNELS", f"{key} names channel(s) the file does not have: "
                                                               f"{', '.join(unknown)}"))
        return names, matrix
    return None


def parse_spillover(value: str) -> tuple[tuple[str, ...], np.ndarray]:
    """Parse a ``$SPILLOVER`` value: ``n, name1..namen, m11, m12, ..., mnn``.

    Raises
    ------
    ValueError
        If the value is not a well-formed square matrix of finite numbers.
    """
    parts = [p.strip() for p in value.split(",")]
    n = _parse_uint(parts[0])
    if n is None or n <= 0:
        raise ValueError(f"spillover size {parts[0]!r} is not a positive whole number")
    if len(parts) != 1 + n + n * n:
        raise ValueError(f"spillover has {len(parts)} fields, expected {1 + n + n * n} for {n} channels")
    names = tuple(parts[1:1 + n])
    if len(set(names)) != n or not all(names):
        raise ValueError("spillover channel names are empty or repeated")
    vals = [_parse_float(x) for x in parts[1 + n:]]
    if any(v is None for v in vals):
        raise ValueError("spillover values are not all finite numbers")
    matrix = np.array(vals, dtype=np.float64).reshape(n, n)
    return names, matrix


def format_spillover(names: Sequence[str], matrix: np.ndarray) -> str:
    """Format a spillover matrix as an FCS ``$SPILLOVER`` value."""
    vals = ",".join(repr(float(x)) for x in np.asarray(matrix, dtype=np.float64).ravel())
    return f"{len(names)},{','.join(names)},{vals}"


# --------------------------------------------------------------------------------------------- writing


def _escape(value: str, delim: str) -> str:
    return value.replace(delim, delim * 2)


def write_fcs(
    path: str | os.PathLike,
    events: np.ndarray,
    channels: Sequence[str],
    markers: Sequence[str] | None = None,
    *,
    spillover: tuple[Sequence[str], np.ndarray] | None = None,
    keywords: Mapping[str, str] | None = None,
    ranges: Sequence[float] | None = None,
) -> bytes:
    """Write ``events`` as an FCS 3.1 list-mode file of 32-bit little-endian floats.

    Deterministic: the same arguments give the same bytes (no dates unless given
    in ``keywords``). Writes to ``path`` atomically (temporary file, fsync, rename)
    and returns the bytes.

    Raises
    ------
    ValueError
        If ``channels`` does not match the number of columns.
    OSError
        If the file cannot be written.
    """
    blob = fcs_bytes(events, channels, markers, spillover=spillover, keywords=keywords, ranges=ranges)
    write_bytes_atomic(path, blob)
    return blob


def fcs_bytes(
    events: np.ndarray,
    channels: Sequence[str],
    markers: Sequence[str] | None = None,
    *,
    spillover: tuple[Sequence[str], np.ndarray] | None = None,
    keywords: Mapping[str, str] | None = None,
    ranges: Sequence[float] | None = None,
) -> bytes:
    """The bytes of an FCS 3.1 file holding ``events`` (see :func:`write_fcs`).

    Raises
    ------
    ValueError
        If ``channels`` does not match the number of columns.
    """
    ev = np.ascontiguousarray(events, dtype="<f4")
    if ev.ndim != 2:
        raise ValueError(f"events must be a 2-D matrix, got shape {ev.shape}")
    n, p = ev.shape
    if len(channels) != p:
        raise ValueError(f"{len(channels)} channel names for {p} columns")
    kw: dict[str, str] = {
        "$BYTEORD": "1,2,3,4", "$DATATYPE": "F", "$MODE": "L", "$NEXTDATA": "0",
        "$PAR": str(p), "$TOT": str(n),
    }
    for i, name in enumerate(channels, start=1):
        kw[f"$P{i}N"] = name
        kw[f"$P{i}B"] = "32"
        kw[f"$P{i}E"] = "0,0"
        kw[f"$P{i}R"] = str(int(ranges[i - 1]) if ranges is not None else 262144)
        if markers is not None and markers[i - 1]:
            kw[f"$P{i}S"] = markers[i - 1]
    if spillover is not None:
        kw["$SPILLOVER"] = format_spillover(spillover[0], spillover[1])
    for k, v in (keywords or {}).items():
        kw[k] = str(v)
    delim = "/"
    body = "".join(f"{delim}{_escape(k, delim)}{delim}{_escape(v, delim)}" for k, v in kw.items() if v != "")
    text_begin = _HEADER_LEN
    data_len = ev.nbytes
    # $BEGINDATA etc. change the TEXT length: iterate to a fixed point.
    extra = ""
    for _ in range(5):
        text_len = len((body + extra + delim).encode("utf-8"))
        text_end = text_begin + text_len - 1
        data_begin = text_end + 1
        data_end = data_begin + data_len - 1 if data_len else 0
        if not data_len:
            data_begin = 0
        new_extra = (f"{delim}$BEGINANALYSIS{delim}0{delim}$ENDANALYSIS{delim}0"
                     f"{delim}$BEGINSTEXT{delim}0{delim}$ENDSTEXT{delim}0"
                     f"{delim}$BEGINDATA{delim}{data_begin}{delim}$ENDDATA{delim}{data_end}")
        if new_extra == extra:
            break
        extra = new_extra
    text = (body + extra + delim).encode("utf-8")

    def off(x: int) -> str:
        return f"{x:>8d}" if data_end <= _BIG_OFFSET else f"{0:>8d}"

    header = (f"FCS3.1    {text_begin:>8d}{text_end:>8d}{off(data_begin)}{off(data_end)}"
              f"{0:>8d}{0:>8d}")
    assert len(header) == _HEADER_LEN
    return header.encode("ascii") + text + ev.tobytes() + b"00000000"
