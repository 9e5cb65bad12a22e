"""FCS files: bytes -> checked :class:`FcsSample`, and writing FCS 3.1.

The reader reads a file's bytes once, hashes exactly those bytes, checks them
against the FCS standard (FCS 2.0, 3.0, 3.1, 3.2) and parses the event matrix
from memory. A violation that makes the numbers doubtful raises
:class:`~immunoprofile.errors.FcsError` with a stable code; a deviation that is
still read correctly is recorded as a :class:`~immunoprofile.errors.Finding`.

Event values are returned as stored, with ``$PnE`` log amplification decoded
for integer data (FCS 3.1, section 3.2.20); gain (``$PnG``) is not applied.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import FcsError, Finding, InputFileError

__all__ = ["FcsSample", "read_fcs", "parse_fcs", "write_fcs", "parse_spillover", "format_spillover"]

_HEADER_LEN = 58
_VERSIONS = ("FCS2.0", "FCS3.0", "FCS3.1", "FCS3.2")


@dataclass(frozen=True)
class FcsSample:
    """One data set of an FCS file, checked and decoded.

    Attributes
    ----------
    path
        The file's path as given (used in messages).
    sha256
        Hex digest of the file's bytes, exactly as read.
    version
        ``'FCS3.1'`` etc.
    text
        The TEXT segment's keywords, names upper-cased (FCS keywords are case-insensitive).
    channels
        ``$PnN`` of each parameter.
    markers
        ``$PnS`` of each parameter, ``''`` where absent.
    events
        Event matrix, shape ``(n_events, n_parameters)``; float32 where that is lossless, else float64.
    spillover
        ``(channel names, matrix)`` from ``$SPILLOVER``/``$SPILL``/``SPILL``, or ``None``.
    findings
        Non-fatal deviations from the standard.
    data_offsets
        ``(begin, end)`` byte offsets of the DATA segment (inclusive end, as in the standard).
    dataset
        Index of this data set in the file (0 for the first).
    """

    path: str
    sha256: str
    version: str
    text: Mapping[str, str]
    channels: tuple[str, ...]
    markers: tuple[str, ...]
    events: np.ndarray
    spillover: tuple[tuple[str, ...], np.ndarray] | None
    findings: tuple[Finding, ...] = ()
    data_offsets: tuple[int, int] = (0, 0)
    dataset: int = 0
    n_datasets: int = field(default=1)

    @property
    def n_events(self) -> int:
        return int(self.events.shape[0])

    @property
    def labels(self) -> list[str]:
        """``'channel (marker)'`` for each parameter, for messages."""
        return [f"{c} ({m})" if m else c for c, m in zip(self.channels, self.markers)]


def read_fcs(path: str | os.PathLike, dataset: int = 0) -> FcsSample:
    """Read, check and decode one data set of an FCS file.

    Raises
    ------
    InputFileError
        If the file does not exist or cannot be read.
    FcsError
        If the file violates the standard in a way that makes its numbers doubtful.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise InputFileError("file not found", path=str(path), hint="check the path or the sample sheet's 'file' column") from None
    except IsADirectoryError:
        raise InputFileError("is a folder, not an FCS file", path=str(path)) from None
    except OSError as e:
        raise InputFileError(f"cannot be read ({e.strerror})", path=str(path), code="FILE_UNREADABLE") from e
    return parse_fcs(data, str(path), dataset=dataset)


def _err(path: str, code: str, message: str, hint: str | None = None) -> FcsError:
    return FcsError(message, path=path, code=code, hint=hint)


def _header_int(raw: bytes, path: str, what: str) -> int:
    s = raw.decode("ascii", errors="replace").strip()
    if s == "":
        return 0
    if not s.isdigit():
        raise _err(path, "FCS_HEADER_INVALID", f"HEADER {what} offset {s!r} is not a number",
                   "the file is not a valid FCS file or is damaged")
    return int(s)


def _parse_text(segment: bytes, path: str) -> dict[str, str]:
    """Parse a TEXT segment (first byte is the delimiter; a doubled delimiter is a literal one)."""
    if len(segment) < 2:
        raise _err(path, "FCS_TEXT_INVALID", "the TEXT segment is empty")
    delim = segment[0:1]
    if delim in (b"\x00",) or (delim.isalnum()):
        raise _err(path, "FCS_TEXT_INVALID", f"TEXT delimiter {delim!r} is not a legal delimiter")
    body = segment[1:]
    if body.endswith(delim) and not body.endswith(delim * 2):
        body = body[:-1]
    elif body.endswith(delim * 2):
        # ends with an escaped delimiter or with a final delimiter after an empty value;
        # count trailing delimiters: odd number -> last one terminates
        n = len(body) - len(body.rstrip(delim))
        if n % 2 == 1:
            body = body[:-1]
    placeholder = b"\x00\x01ESC\x01\x00"
    fields = body.replace(delim * 2, placeholder).split(delim)
    fields = [f.replace(placeholder, delim) for f in fields]
    if len(fields) % 2 == 1:
        if fields[-1].strip(b" \r\n\x00") == b"":
            fields = fields[:-1]
        else:
            raise _err(path, "FCS_TEXT_INVALID", "the TEXT segment has a keyword without a value",
                       "the file is damaged; re-export it from the acquisition software")
    text: dict[str, str] = {}
    for k, v in zip(fields[0::2], fields[1::2]):
        key = k.decode("utf-8", errors="replace").strip().upper()
        if not key:
            raise _err(path, "FCS_TEXT_INVALID", "the TEXT segment has an empty keyword")
        text[key] = v.decode("utf-8", errors="replace")
    return text


def _int_kw(text: Mapping[str, str], key: str, path: str, required: bool = True) -> int | None:
    v = text.get(key)
    if v is None or v.strip() == "":
        if required:
            raise _err(path, "FCS_KEYWORD_MISSING", f"required keyword {key} is missing",
                       "the file is not a complete FCS file")
        return None
    try:
        return int(v.strip())
    except ValueError:
        try:
            f = float(v.strip())
        except ValueError:
            raise _err(path, "FCS_KEYWORD_INVALID", f"keyword {key} = {v!r} is not a number") from None
        if f != int(f):
            raise _err(path, "FCS_KEYWORD_INVALID", f"keyword {key} = {v!r} is not a whole number")
        return int(f)


def parse_spillover(value: str) -> tuple[tuple[str, ...], np.ndarray]:
    """Parse a ``$SPILLOVER`` value: ``n, name1..namen, m11, m12, ..., mnn``.

    Raises
    ------
    ValueError
        If the value is not a well-formed square matrix.
    """
    parts = [p.strip() for p in value.split(",")]
    n = int(float(parts[0]))
    if n <= 0 or len(parts) != 1 + n + n * n:
        raise ValueError(f"spillover has {len(parts)} fields, expected {1 + n + n * n} for {n} channels")
    names = tuple(parts[1:1 + n])
    matrix = np.array([float(x) for x in parts[1 + n:]], dtype=np.float64).reshape(n, n)
    return names, matrix


def format_spillover(names: Sequence[str], matrix: np.ndarray) -> str:
    """Format a spillover matrix as an FCS ``$SPILLOVER`` value."""
    vals = ",".join(repr(float(x)) for x in np.asarray(matrix, dtype=np.float64).ravel())
    return f"{len(names)},{','.join(names)},{vals}"


def parse_fcs(data: bytes, path: str = "<bytes>", dataset: int = 0) -> FcsSample:
    """Check and decode the FCS file held in ``data``.

    Raises
    ------
    FcsError
        See :func:`read_fcs`.
    """
    digest = hashlib.sha256(data).hexdigest()
    findings: list[Finding] = []
    if len(data) < _HEADER_LEN:
        raise _err(path, "FCS_TRUNCATED", f"the file is only {len(data)} bytes long, too short for an FCS HEADER",
                   "the file is empty or truncated; copy it again from the instrument")
    version = data[0:6].decode("ascii", errors="replace")
    if version not in _VERSIONS:
        raise _err(path, "FCS_NOT_FCS", f"does not start with an FCS version (found {data[0:6]!r})",
                   "this is not an FCS file")
    offsets = [_header_int(data[10 + 8 * i:18 + 8 * i], path, name) for i, name in
               enumerate(("TEXT begin", "TEXT end", "DATA begin", "DATA end", "ANALYSIS begin", "ANALYSIS end"))]
    t0, t1, d0, d1 = offsets[:4]
    if t0 < _HEADER_LEN or t1 <= t0 or t1 >= len(data):
        raise _err(path, "FCS_TEXT_OFFSETS", f"HEADER says TEXT is at bytes {t0}-{t1} but the file has {len(data)} bytes",
                   "the file is truncated or damaged")
    text = _parse_text(data[t0:t1 + 1], path)

    kd0 = _int_kw(text, "$BEGINDATA", path, required=version != "FCS2.0")
    kd1 = _int_kw(text, "$ENDDATA", path, required=version != "FCS2.0")
    if d0 == 0 and d1 == 0:
        if kd0 is None or kd1 is None:
            raise _err(path, "FCS_DATA_OFFSETS", "neither the HEADER nor TEXT give the DATA segment's offsets")
        d0, d1 = kd0, kd1
    elif kd0 is not None and kd1 is not None and (kd0, kd1) != (d0, d1):
        raise _err(path, "FCS_DATA_OFFSETS",
                   f"HEADER says DATA is at bytes {d0}-{d1} but $BEGINDATA/$ENDDATA say {kd0}-{kd1}",
                   "the file is damaged; re-export it from the acquisition software")

    mode = text.get("$MODE", "L").strip().upper()
    if mode != "L":
        raise _err(path, "FCS_MODE_UNSUPPORTED", f"$MODE is {mode!r}: only list-mode (L) data holds events",
                   "export list-mode data from the acquisition software")
    n_par = _int_kw(text, "$PAR", path)
    n_tot = _int_kw(text, "$TOT", path, required=version != "FCS2.0")
    datatype = text.get("$DATATYPE", "").strip().upper()
    if datatype not in ("I", "F", "D"):
        raise _err(path, "FCS_DATATYPE_UNSUPPORTED", f"$DATATYPE {datatype!r} is not supported (I, F or D)")
    byteord = text.get("$BYTEORD", "").replace(" ", "")
    if byteord in ("1,2,3,4", "1,2", "1"):
        endian = "<"
    elif byteord in ("4,3,2,1", "2,1"):
        endian = ">"
    else:
        raise _err(path, "FCS_BYTEORD_UNSUPPORTED", f"$BYTEORD {byteord!r} is not a supported byte order")

    channels, markers, bits, ranges = [], [], [], []
    for i in range(1, n_par + 1):
        name = text.get(f"$P{i}N")
        if name is None or not name.strip():
            raise _err(path, "FCS_PNN_MISSING", f"parameter {i} has no $P{i}N name",
                       "the file is damaged; parameters cannot be identified")
        channels.append(name.strip())
        markers.append(text.get(f"$P{i}S", "").strip())
        b = text.get(f"$P{i}B", "").strip()
        if datatype == "I":
            if not b.isdigit():
                raise _err(path, "FCS_PNB_INVALID", f"$P{i}B = {b!r} is not a bit width")
            bits.append(int(b))
        else:
            bits.append(32 if datatype == "F" else 64)
        r = _int_kw(text, f"$P{i}R", path, required=False)
        ranges.append(r)
    dupes = sorted({c for c in channels if channels.count(c) > 1})
    if dupes:
        raise _err(path, "FCS_PNN_DUPLICATE", f"channel name(s) {', '.join(dupes)} appear more than once",
                   "parameters cannot be told apart; fix the instrument's channel names")

    width_bits = sum(bits)
    if width_bits % 8:
        raise _err(path, "FCS_PNB_INVALID", f"event width of {width_bits} bits is not a whole number of bytes")
    width = width_bits // 8
    seg_len = d1 - d0 + 1 if d1 >= d0 else 0
    if d0 + seg_len > len(data):
        raise _err(path, "FCS_TRUNCATED", f"DATA should end at byte {d1} but the file has only {len(data)} bytes",
                   "the file is truncated; copy it again from the instrument")
    if n_tot is None:
        n_tot = seg_len // width
    expected = n_tot * width
    if seg_len != expected:
        if seg_len == expected + 1:
            findings.append(Finding("FCS_ENDDATA_OFF_BY_ONE",
                                    "DATA segment end offset is one byte past $TOT x event width (a known instrument quirk)"))
        else:
            raise _err(path, "FCS_TOT_MISMATCH",
                       f"$TOT says {n_tot} events ({expected} bytes) but the DATA segment holds {seg_len} bytes",
                       "the file is probably truncated; re-export it from the acquisition software")
    raw = memoryview(data)[d0:d0 + expected]
    events = _decode(raw, n_tot, n_par, datatype, endian, bits, ranges, path)

    for i in range(n_par):
        pne = text.get(f"$P{i + 1}E", "0,0")
        try:
            f1, f2 = (float(x) for x in pne.split(","))
        except ValueError:
            raise _err(path, "FCS_PNE_INVALID", f"$P{i + 1}E = {pne!r} is not 'decades,offset'") from None
        if f1 > 0:
            if datatype != "I":
                findings.append(Finding("FCS_PNE_FLOAT", f"$P{i + 1}E = {pne} ignored for floating-point data"))
                continue
            if f2 == 0:
                f2 = 1.0
                findings.append(Finding("FCS_PNE_ZERO_OFFSET", f"$P{i + 1}E = {pne}: offset 0 read as 1"))
            rng = ranges[i] or 2 ** bits[i]
            if events.dtype != np.float64:
                events = events.astype(np.float64)
            events[:, i] = f2 * 10 ** (f1 * events[:, i] / rng)

    spill = None
    for key in ("$SPILLOVER", "SPILL", "$SPILL", "SPILLOVER", "$COMP"):
        if key in text:
            try:
                spill = parse_spillover(text[key])
            except (ValueError, IndexError) as e:
                findings.append(Finding("FCS_SPILLOVER_INVALID", f"{key} cannot be parsed ({e}); no compensation from the file"))
                spill = None
            break
    return FcsSample(
        path=path, sha256=digest, version=version, text=text, channels=tuple(channels),
        markers=tuple(markers), events=events, spillover=spill, findings=tuple(findings),
        data_offsets=(d0, d1), dataset=dataset,
    )


def _decode(raw: memoryview, n: int, p: int, datatype: str, endian: str, bits: list[int],
            ranges: list[int | None], path: str) -> np.ndarray:
    if datatype == "F":
        return np.frombuffer(raw, dtype=f"{endian}f4").reshape(n, p).astype(np.float32, copy=True)
    if datatype == "D":
        return np.frombuffer(raw, dtype=f"{endian}f8").reshape(n, p).astype(np.float64, copy=True)
    if len(set(bits)) == 1 and bits[0] in (8, 16, 32, 64):
        arr = np.frombuffer(raw, dtype=f"{endian}u{bits[0] // 8}").reshape(n, p)
        out = arr.astype(np.float32 if bits[0] <= 16 else np.float64)
    else:
        if any(b % 8 for b in bits):
            raise _err(path, "FCS_BITPACKED_UNSUPPORTED", f"bit widths {sorted(set(bits))} are not whole bytes")
        # mixed or unusual byte widths (e.g. 24-bit): assemble each column from its bytes
        u8 = np.frombuffer(raw, dtype=np.uint8).reshape(n, -1)
        out = np.empty((n, p), dtype=np.float64)
        pos = 0
        for j, b in enumerate(bits):
            nb = b // 8
            cols = u8[:, pos:pos + nb].astype(np.uint64)
            order = range(nb) if endian == "<" else range(nb - 1, -1, -1)
            val = np.zeros(n, dtype=np.uint64)
            for shift, k in enumerate(order):
                val |= cols[:, k] << np.uint64(8 * shift)
            out[:, j] = val
            pos += nb
    # FCS 3.1 3.2.15: bits above the range are not part of the value
    for j, r in enumerate(ranges):
        if r and r > 0:
            mask_bits = int(np.ceil(np.log2(r))) if r > 1 else 1
            if mask_bits < bits[j]:
                col = out[:, j].astype(np.uint64) & np.uint64((1 << mask_bits) - 1)
                out[:, j] = col
    return out


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
    in ``keywords``). Writes to ``path`` atomically (temporary file, then rename)
    and returns the bytes.
    """
    blob = fcs_bytes(events, channels, markers, spillover=spillover, keywords=keywords, ranges=ranges)
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(blob)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, p)
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
    """The bytes of an FCS 3.1 file holding ``events`` (see :func:`write_fcs`)."""
    ev = np.ascontiguousarray(events, dtype="<f4")
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
        data_end = data_begin + data_len - 1 if data_len else data_begin
        new_extra = (f"{delim}$BEGINANALYSIS{delim}0{delim}$ENDANALYSIS{delim}0"
                     f"{delim}$BEGINSTEXT{delim}0{delim}$ENDSTEXT{delim}0"
                     f"{delim}$BEGINDATA{delim}{data_begin}{delim}$ENDDATA{delim}{data_end}")
        if new_extra == extra:
            break
        extra = new_extra
    text = (body + extra + delim).encode("utf-8")

    def off(x: int) -> str:
        return f"{x:>8d}" if x <= 99_999_999 else f"{0:>8d}"

    header = f"FCS3.1    {off(text_begin)}{off(text_end)}{off(data_begin)}{off(data_end)}{off(0)}{off(0)}"
    assert len(header) == _HEADER_LEN
    return header.encode("ascii") + text + ev.tobytes()


_TEXT_SAFE = re.compile(r"^[\x20-\x7e]*$")
