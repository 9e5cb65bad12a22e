"""Build FCS files byte by byte for tests: valid variants and malformed cases (no binary blobs in git).

:func:`build` writes HEADER, TEXT, optional supplemental TEXT, DATA and a CRC field
from plain Python/numpy, independently of :mod:`immunoprofile.fcs`'s writer, with
switches to break each rule of the standard. :data:`CASES` lists malformed files with
the exact error code or finding the reader must report; :data:`VALID` lists legal
layouts that must read back to the values they were built from.
"""

from __future__ import annotations

import binascii
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

RNG_SEED = 20240611
_DROP = object()

# A small event matrix every case starts from: integers that fit 8 bits, so that any
# datatype/bit width can hold them exactly.
N_EVENTS, N_PAR = 37, 4


def base_values(n: int = N_EVENTS, p: int = N_PAR, high: int = 200, seed: int = RNG_SEED) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, high, size=(n, p)).astype(np.float64)


def _encode_data(values: np.ndarray, kinds: Sequence[str], bits: Sequence[int], endian: str, packed: bool) -> bytes:
    n, p = values.shape
    if packed:
        acc, pos = 0, 0
        for i in range(n):
            for j in range(p):
                acc |= int(values[i, j]) << pos
                pos += bits[j]
        return acc.to_bytes((pos + 7) // 8, "little")
    order = "little" if endian == "<" else "big"
    out = bytearray()
    for i in range(n):
        for j in range(p):
            k, b = kinds[j], bits[j]
            if k == "F":
                out += np.array(values[i, j], dtype=f"{endian}f4").tobytes()
            elif k == "D":
                out += np.array(values[i, j], dtype=f"{endian}f8").tobytes()
            else:
                out += int(values[i, j]).to_bytes(b // 8, order)
    return bytes(out)


def _num(x: int) -> str:
    return f"{x:010d}"  # fixed width, so that offsets written into TEXT do not change TEXT's length


@dataclass
class Built:
    """The bytes of a built file and where its segments are (absolute, inclusive ends)."""

    blob: bytes
    text: tuple[int, int]
    data: tuple[int, int]
    values: np.ndarray = field(repr=False)


def build(
    values: np.ndarray | None = None,
    *,
    version: str = "FCS3.1",
    datatype: str = "F",
    bits: Sequence[int] | None = None,
    kinds: Sequence[str] | None = None,
    byteord: str = "1,2,3,4",
    names: Sequence[str] | None = None,
    keywords: Mapping[str, object] | None = None,
    delim: bytes = b"/",
    escape: bool = True,
    header_data: object = "auto",
    text_data: object = "auto",
    terminate: bool = True,
    text_pad: bytes = b"",
    packed: bool = False,
    crc: object = b"00000000",
    trailing: bytes = b"",
    data: bytes | None = None,
    stext: Mapping[str, str] | None = None,
    raw_pairs: Sequence[tuple[bytes, bytes]] = (),
    nextdata: int = 0,
) -> Built:
    """One FCS data set as bytes.

    ``keywords`` override or add keywords (a value of ``DROP`` removes one);
    ``header_data``: ``'auto'``, ``'blank'`` or a ``(begin, end)`` pair for the HEADER;
    ``text_data``: ``'auto'``, ``None`` (omit) or a pair of strings for $BEGINDATA/$ENDDATA;
    ``crc``: bytes written after the last segment, or ``'xmodem'``/``'ccitt-false'`` for a real CRC.
    """
    v = base_values() if values is None else np.asarray(values, dtype=np.float64)
    n, p = v.shape
    kinds = list(kinds) if kinds is not None else [datatype] * p
    if bits is None:
        bits = [32 if k == "F" else 64 if k == "D" else 16 for k in kinds]
    names = list(names) if names is not None else [f"CH{j + 1}" for j in range(p)]
    endian = "<" if byteord.replace(" ", "").startswith("1") else ">"
    payload = data if data is not None else _encode_data(v, kinds, bits, endian, packed)
    kw: dict[str, object] = {
        "$BYTEORD": byteord, "$DATATYPE": datatype, "$MODE": "L", "$NEXTDATA": _num(nextdata),
        "$PAR": str(p), "$TOT": str(n),
    }
    for j in range(p):
        kw[f"$P{j + 1}N"] = names[j]
        kw[f"$P{j + 1}B"] = str(bits[j])
        kw[f"$P{j + 1}E"] = "0,0"
        kw[f"$P{j + 1}R"] = str(2 ** bits[j] if kinds[j] == "I" and bits[j] < 63 else 262144)
        kw[f"$P{j + 1}S"] = f"marker {j + 1}"
        if version == "FCS3.2" and kinds[j] != datatype:
            kw[f"$P{j + 1}DATATYPE"] = kinds[j]
    kw["$BEGINANALYSIS"], kw["$ENDANALYSIS"] = "0", "0"
    kw["$BEGINSTEXT"], kw["$ENDSTEXT"] = _num(0), _num(0)
    kw["$BEGINDATA"], kw["$ENDDATA"] = _num(0), _num(0)
    for k, val in (keywords or {}).items():
        if val is _DROP:
            kw.pop(k, None)
        else:
            kw[k] = val
    if text_data is None:
        kw.pop("$BEGINDATA", None)
        kw.pop("$ENDDATA", None)
    d = delim.decode("latin-1")

    def esc(s: str) -> bytes:
        return (s.replace(d, d + d) if escape else s).encode("utf-8")

    def text_bytes(words: Mapping[str, object]) -> bytes:
        body = b"".join(delim + esc(k) + delim + esc(str(val)) for k, val in words.items())
        body += b"".join(delim + a + delim + b for a, b in raw_pairs)
        return body + (delim if terminate else b"") + text_pad

    t0 = 58
    t_len = len(text_bytes(kw))
    s_blob = text_bytes(stext) if stext else b""
    s0 = t0 + t_len
    d0 = s0 + len(s_blob)
    d1 = d0 + len(payload) - 1
    if stext:
        kw["$BEGINSTEXT"], kw["$ENDSTEXT"] = _num(s0), _num(s0 + len(s_blob) - 1)
    if text_data == "auto":
        kw["$BEGINDATA"], kw["$ENDDATA"] = _num(d0), _num(d1)
    elif text_data is not None:
        kw["$BEGINDATA"], kw["$ENDDATA"] = text_data  # type: ignore[misc]
    text = text_bytes(kw)
    assert len(text) == t_len, "offset keywords must keep their width"
    if header_data == "auto":
        hd: tuple[object, object] = (d0, d1)
    elif header_data == "blank":
        hd = ("", "")
    else:
        hd = header_data  # type: ignore[assignment]
    header = f"{version:<6s}    {t0:>8d}{t0 + t_len - 1:>8d}{hd[0]!s:>8s}{hd[1]!s:>8s}{0:>8d}{0:>8d}"
    assert len(header) == 58
    blob = header.encode("latin-1") + text + s_blob + payload
    if crc == "xmodem":
        crc = f"{binascii.crc_hqx(blob, 0):08d}".encode()
    elif crc == "ccitt-false":
        crc = f"{binascii.crc_hqx(blob, 0xFFFF):08X}".encode()
    blob += crc + trailing  # type: ignore[operator]
    return Built(blob, (t0, t0 + t_len - 1), (d0, d1), v)


DROP = _DROP


def multi(*sets: Callable[[int], Built]) -> bytes:
    """Several data sets back to back, each ``$NEXTDATA`` relative to its own start (FCS 2.0 section 3.3)."""
    blobs = [make(0).blob for make in sets]
    out = b""
    for i, make in enumerate(sets):
        nxt = len(blobs[i]) if i < len(sets) - 1 else 0
        out += make(nxt).blob
    return out


def _with(blob: bytes, at: int, new: bytes) -> bytes:
    return blob[:at] + new + blob[at + len(new):]


def _replace(blob: bytes, old: bytes, new: bytes) -> bytes:
    assert blob.count(old) >= 1, old
    return blob.replace(old, new, 1)


@dataclass(frozen=True)
class Case:
    """A malformed file and what the reader must say about it."""

    name: str
    make: Callable[[], bytes]
    kind: str  # "error" or "finding"
    code: str
    dataset: int = 0
    expect: Callable[[], np.ndarray] | None = None  # events a finding case must still read to


def _v() -> np.ndarray:
    return base_values()


def _masked() -> np.ndarray:
    v = base_values()
    v[:, 1] = v[:, 1] + 1024  # bit 10 set; $P2R = 1024 masks it away
    return v


def _time_values() -> np.ndarray:
    return base_values()


def _log_decoded() -> np.ndarray:
    v = base_values()
    v[:, 2] = 1.0 * 10 ** (4 * v[:, 2] / 1024)
    return v


def _second_set() -> np.ndarray:
    return base_values(seed=RNG_SEED + 1, n=11)


CASES: list[Case] = [
    # --- not an FCS file / HEADER
    Case("empty_file", lambda: b"", "error", "FCS_TRUNCATED"),
    Case("not_fcs", lambda: b"PK\x03\x04" + bytes(200), "error", "FCS_NOT_FCS"),
    Case("garbage_10_bytes", lambda: b"oi21j0\x00\x01zz", "error", "FCS_NOT_FCS"),
    Case("version_4", lambda: build(version="FCS4.0").blob, "error", "FCS_VERSION_UNSUPPORTED"),
    Case("version_1", lambda: build(version="FCS1.0").blob, "error", "FCS_VERSION_UNSUPPORTED"),
    Case("header_only_40_bytes", lambda: build().blob[:40], "error", "FCS_TRUNCATED"),
    Case("header_bytes_6_9_not_blank", lambda: _with(build().blob, 6, b"XXXX"), "error", "FCS_HEADER_INVALID"),
    Case("header_text_offset_not_a_number", lambda: _with(build().blob, 10, b"   5x8  "), "error",
         "FCS_HEADER_INVALID"),
    Case("text_begins_inside_header", lambda: _with(build().blob, 10, b"      20"), "error", "FCS_TEXT_OFFSETS"),
    Case("text_end_before_begin", lambda: _with(build().blob, 18, b"      57"), "error", "FCS_TEXT_OFFSETS"),
    Case("text_end_past_eof", lambda: _with(build().blob, 18, b" 9999999"), "error", "FCS_TRUNCATED"),
    # --- TEXT syntax
    Case("delimiter_nul", lambda: build(delim=b"\x00").blob, "error", "FCS_DELIMITER_INVALID"),
    Case("delimiter_non_ascii", lambda: build(delim=b"\xff").blob, "error", "FCS_DELIMITER_INVALID"),
    Case("keyword_without_value", lambda: build(raw_pairs=[(b"$FIL", b"a.fcs/X")]).blob, "error",
         "FCS_TEXT_INVALID"),
    Case("empty_keyword", lambda: build(raw_pairs=[(b" ", b"value")]).blob, "error", "FCS_TEXT_INVALID"),
    Case("unescaped_delimiter_in_value", lambda: build(keywords={"$FIL": "a/b"}, escape=False).blob, "error",
         "FCS_TEXT_INVALID"),
    Case("duplicate_standard_keyword", lambda: build(raw_pairs=[(b"$TOT", b"36")]).blob, "error",
         "FCS_KEYWORD_DUPLICATE"),
    Case("duplicate_keyword_case_insensitive", lambda: build(raw_pairs=[(b"$p1n", b"OTHER")]).blob, "error",
         "FCS_KEYWORD_DUPLICATE"),
    # --- required keywords
    Case("par_missing", lambda: build(keywords={"$PAR": DROP}).blob, "error", "FCS_KEYWORD_MISSING"),
    Case("par_not_a_number", lambda: build(keywords={"$PAR": "four"}).blob, "error", "FCS_KEYWORD_INVALID"),
    Case("par_zero", lambda: build(keywords={"$PAR": "0"}).blob, "error", "FCS_PAR_MISMATCH"),
    Case("tot_missing_fcs31", lambda: build(keywords={"$TOT": DROP}).blob, "error", "FCS_KEYWORD_MISSING"),
    Case("tot_negative", lambda: build(keywords={"$TOT": "-37"}).blob, "error", "FCS_KEYWORD_INVALID"),
    Case("tot_float_text", lambda: build(keywords={"$TOT": "3.7e1"}).blob, "error", "FCS_KEYWORD_INVALID"),
    Case("tot_too_large", lambda: build(keywords={"$TOT": "38"}).blob, "error", "FCS_TOT_MISMATCH"),
    Case("tot_too_small", lambda: build(keywords={"$TOT": "36"}).blob, "error", "FCS_TOT_MISMATCH"),
    Case("tot_far_too_large", lambda: build(keywords={"$TOT": "99999999999"}).blob, "error", "FCS_TOT_MISMATCH"),
    Case("datatype_missing", lambda: build(keywords={"$DATATYPE": DROP}).blob, "error", "FCS_KEYWORD_MISSING"),
    Case("byteord_missing", lambda: build(keywords={"$BYTEORD": DROP}).blob, "error", "FCS_KEYWORD_MISSING"),
    Case("begindata_missing_and_header_blank", lambda: build(text_data=None, header_data="blank").blob, "error",
         "FCS_KEYWORD_MISSING"),
    Case("begindata_not_a_number", lambda: build(text_data=("0000000x12", "0000000300")).blob, "error",
         "FCS_KEYWORD_INVALID"),
    # --- parameters
    Case("par_larger_than_pnn", lambda: build(keywords={"$PAR": "5"}).blob, "error", "FCS_PAR_MISMATCH"),
    Case("par_smaller_than_pnn", lambda: build(keywords={"$PAR": "3"}).blob, "error", "FCS_PAR_MISMATCH"),
    Case("pnn_missing_in_middle", lambda: build(keywords={"$P2N": DROP}).blob, "error", "FCS_PNN_MISSING"),
    Case("pnn_missing_last_with_pnb", lambda: build(keywords={"$P4N": DROP}).blob, "error", "FCS_PNN_MISSING"),
    Case("pnn_index_with_leading_zero", lambda: build(keywords={"$P3N": DROP, "$P03N": "CH3"}).blob, "error",
         "FCS_PNN_MISSING"),
    Case("pnn_blank", lambda: build(keywords={"$P3N": " "}).blob, "error", "FCS_PNN_MISSING"),
    Case("pnn_duplicate", lambda: build(names=["FSC-A", "SSC-A", "FSC-A", "CD3"]).blob, "error",
         "FCS_PNN_DUPLICATE"),
    Case("datatype_ascii", lambda: build(keywords={"$DATATYPE": "A"}).blob, "error", "FCS_DATATYPE_UNSUPPORTED"),
    Case("datatype_unknown", lambda: build(keywords={"$DATATYPE": "Q"}).blob, "error", "FCS_DATATYPE_UNSUPPORTED"),
    Case("pndatatype_ascii_fcs32", lambda: build(version="FCS3.2", keywords={"$P2DATATYPE": "A"}).blob, "error",
         "FCS_DATATYPE_UNSUPPORTED"),
    Case("float_with_16_bits", lambda: build(keywords={"$P2B": "16"}).blob, "error", "FCS_PNB_INVALID"),
    Case("double_with_32_bits", lambda: build(datatype="D", keywords={"$P1B": "32"}).blob, "error",
         "FCS_PNB_INVALID"),
    Case("int_zero_bits", lambda: build(datatype="I", keywords={"$P1B": "0"}).blob, "error", "FCS_PNB_INVALID"),
    Case("int_65_bits", lambda: build(datatype="I", keywords={"$P1B": "65"}).blob, "error", "FCS_PNB_INVALID"),
    Case("pnb_ascii_star", lambda: build(datatype="I", keywords={"$P1B": "*"}).blob, "error", "FCS_PNB_INVALID"),
    Case("pnb_missing", lambda: build(keywords={"$P3B": DROP}).blob, "error", "FCS_PNB_INVALID"),
    Case("int_range_missing", lambda: build(datatype="I", keywords={"$P2R": DROP}).blob, "error",
         "FCS_PNR_INVALID"),
    Case("int_range_zero", lambda: build(datatype="I", keywords={"$P2R": "0"}).blob, "error", "FCS_PNR_INVALID"),
    Case("pne_one_number", lambda: build(datatype="I", keywords={"$P1E": "4"}).blob, "error", "FCS_PNE_INVALID"),
    Case("pne_negative", lambda: build(datatype="I", keywords={"$P1E": "-4,1"}).blob, "error", "FCS_PNE_INVALID"),
    Case("pne_nan", lambda: build(datatype="I", keywords={"$P1E": "nan,1"}).blob, "error", "FCS_PNE_INVALID"),
    Case("png_negative", lambda: build(keywords={"$P1G": "-2"}).blob, "error", "FCS_PNG_INVALID"),
    Case("png_not_a_number", lambda: build(keywords={"$P1G": "high"}).blob, "error", "FCS_PNG_INVALID"),
    Case("timestep_not_a_number", lambda: build(names=["Time", "FSC-A", "SSC-A", "CD3"],
                                                keywords={"$TIMESTEP": "xxxxxxxxx"}).blob, "error",
         "FCS_TIMESTEP_INVALID"),
    # --- byte order and mode
    Case("byteord_mixed", lambda: build(datatype="I", byteord="3,4,1,2").blob, "error", "FCS_BYTEORD_UNSUPPORTED"),
    Case("byteord_word", lambda: build(byteord="big").blob, "error", "FCS_BYTEORD_UNSUPPORTED"),
    Case("mode_correlated_histogram", lambda: build(keywords={"$MODE": "C"}).blob, "error", "FCS_MODE_UNSUPPORTED"),
    Case("mode_uncorrelated_histogram", lambda: build(keywords={"$MODE": "U"}).blob, "error",
         "FCS_MODE_UNSUPPORTED"),
    # --- DATA offsets and length
    Case("data_truncated", lambda: build().blob[:-30], "error", "FCS_TRUNCATED"),
    Case("data_offsets_disagree_both_fit", lambda: _shifted_text_offsets(4), "error", "FCS_DATA_OFFSETS"),
    Case("data_offsets_disagree_neither_fits", lambda: _shifted_text_offsets(4, end_shift=40, header_shift=50),
         "error", "FCS_DATA_OFFSETS"),
    Case("data_overlaps_text", lambda: _overlapping_data(), "error", "FCS_DATA_OFFSETS"),
    Case("data_begin_inside_header", lambda: build(header_data=(10, 601), text_data=(_num(10), _num(601))).blob,
         "error", "FCS_DATA_OFFSETS"),
    Case("utf8_damaged_data", lambda: _utf8_damaged(), "error", "FCS_DATA_CORRUPTED"),
    Case("crc_mismatch", lambda: build(crc=b"00012345").blob, "error", "FCS_CRC_MISMATCH"),
    # --- data sets
    Case("nextdata_not_a_number", lambda: build(keywords={"$NEXTDATA": "next"}).blob, "error",
         "FCS_NEXTDATA_INVALID"),
    Case("nextdata_past_eof", lambda: build(nextdata=99_999).blob, "error", "FCS_NEXTDATA_INVALID"),
    Case("nextdata_backwards", lambda: build(nextdata=3).blob, "error", "FCS_NEXTDATA_INVALID"),
    Case("nextdata_not_a_header", lambda: build(nextdata=70, trailing=bytes(800)).blob, "error",
         "FCS_NEXTDATA_INVALID"),
    Case("dataset_not_found", lambda: build().blob, "error", "FCS_DATASET_NOT_FOUND", dataset=3),
    Case("stext_offsets_outside_file", lambda: _with_stext_offsets(9_000_000, 9_000_100), "error",
         "FCS_TEXT_OFFSETS"),
    Case("stext_contradicts_text", lambda: build(stext={"$TOT": "12"}).blob, "error", "FCS_KEYWORD_DUPLICATE"),
    # --- files still read correctly, with a finding
    Case("enddata_off_by_one", lambda: _off_by_one(), "finding", "FCS_ENDDATA_OFF_BY_ONE", expect=_v),
    Case("text_enddata_past_eof_header_right", lambda: build(text_data=(_num(build().data[0]), _num(10739863)))
         .blob, "finding", "FCS_DATA_OFFSETS_DISAGREE", expect=_v),
    Case("header_data_blank_small_file", lambda: build(header_data="blank").blob, "finding",
         "FCS_HEADER_DATA_OFFSETS_MISSING", expect=_v),
    Case("fcs20_text_offsets_garbage", lambda: build(version="FCS2.0", text_data=("      768I", "0000000601"))
         .blob, "finding", "FCS_TEXT_OFFSETS_IGNORED", expect=_v),
    Case("two_datasets_first", lambda: multi(lambda nx: build(nextdata=nx), lambda nx: build(_second_set(),
                                                                                           nextdata=nx)),
         "finding", "FCS_MULTIPLE_DATASETS", expect=_v),
    Case("two_datasets_second", lambda: multi(lambda nx: build(nextdata=nx), lambda nx: build(_second_set(),
                                                                                            nextdata=nx)),
         "finding", "FCS_MULTIPLE_DATASETS", dataset=1, expect=_second_set),
    Case("pne_on_float_data", lambda: build(keywords={"$P3E": "4,1"}).blob, "finding", "FCS_PNE_FLOAT", expect=_v),
    Case("pne_zero_offset", lambda: build(datatype="I", keywords={"$P3E": "4,0", "$P3R": "1024"}).blob, "finding",
         "FCS_PNE_ZERO_OFFSET", expect=_log_decoded),
    Case("pne_missing_fcs31", lambda: build(keywords={"$P2E": DROP}).blob, "finding", "FCS_PNE_MISSING",
         expect=_v),
    Case("pnr_missing_float", lambda: build(keywords={"$P2R": DROP}).blob, "finding", "FCS_PNR_MISSING", expect=_v),
    Case("values_above_range", lambda: build(_masked(), datatype="I", keywords={"$P2R": "1024"}).blob, "finding",
         "FCS_VALUES_MASKED", expect=_v),
    Case("bitpacked_10_bit", lambda: build(datatype="I", bits=[10] * N_PAR, packed=True, version="FCS2.0").blob,
         "finding", "FCS_BITPACKED", expect=_v),
    Case("tot_missing_fcs20", lambda: build(version="FCS2.0", keywords={"$TOT": DROP}).blob, "finding",
         "FCS_TOT_MISSING", expect=_v),
    Case("mode_missing_fcs31", lambda: build(keywords={"$MODE": DROP}).blob, "finding", "FCS_MODE_MISSING",
         expect=_v),
    Case("no_events", lambda: build(np.zeros((0, N_PAR))).blob, "finding", "FCS_NO_EVENTS",
         expect=lambda: np.zeros((0, N_PAR))),
    Case("text_unterminated", lambda: build(terminate=False).blob, "finding", "FCS_TEXT_UNTERMINATED", expect=_v),
    Case("text_end_padded", lambda: build(text_pad=b"  \x00").blob, "finding", "FCS_TEXT_END_PADDED", expect=_v),
    Case("fcs20_escaped_delimiter", lambda: build(version="FCS2.0", keywords={"$P1F": "488/10"}).blob, "finding",
         "FCS_TEXT_DELIMITER_AMBIGUOUS", expect=_v),
    Case("fcs31_empty_value", lambda: build(raw_pairs=[(b"NOTE", b""), (b"OPERATOR", b"x")]).blob, "finding",
         "FCS_TEXT_DELIMITER_AMBIGUOUS", expect=_v),
    Case("repeated_custom_keyword", lambda: build(raw_pairs=[(b"OPERATOR", b"a"), (b"OPERATOR", b"b")]).blob,
         "finding", "FCS_KEYWORD_REPEATED", expect=_v),
    Case("time_without_timestep", lambda: build(names=["Time", "FSC-A", "SSC-A", "CD3"]).blob, "finding",
         "FCS_TIMESTEP_MISSING", expect=_v),
    Case("spillover_malformed", lambda: build(keywords={"$SPILLOVER": "2,CH1,CH2,1,0,0"}).blob, "finding",
         "FCS_SPILLOVER_INVALID", expect=_v),
    Case("spillover_unknown_channel", lambda: build(keywords={"$SPILLOVER": "2,CH1,FITC-A,1,0.1,0,1"}).blob,
         "finding", "FCS_SPILLOVER_CHANNELS", expect=_v),
    Case("stext_points_to_zip", lambda: _stext_zip(), "finding", "FCS_STEXT_INVALID", expect=_v),
]


def _shifted_text_offsets(shift: int, end_shift: int | None = None, header_shift: int = 0) -> bytes:
    b = build(trailing=bytes(64))
    d0, d1 = b.data
    e = end_shift if end_shift is not None else shift
    return build(trailing=bytes(64), header_data=(d0, d1 + header_shift),
                 text_data=(_num(d0 + shift), _num(d1 + e))).blob


def _overlapping_data() -> bytes:
    b = build()
    d0, d1 = b.data
    return build(header_data=(d0 - 10, d1 - 10), text_data=(_num(d0 - 10), _num(d1 - 10))).blob


def _utf8_damaged() -> bytes:
    v = base_values(high=250) + 0.5
    b = build(v, datatype="F")
    d0, d1 = b.data
    body = b.blob[d0:d1 + 1].decode("utf-8", errors="replace").encode("utf-8")
    # the damage makes DATA longer; the writer's offsets (and everything after them) stay as they were
    return b.blob[:d0] + body[: d1 - d0 + 1] + b.blob[d1 + 1:]


def _with_stext_offsets(s0: int, s1: int) -> bytes:
    return build(keywords={"$BEGINSTEXT": _num(s0), "$ENDSTEXT": _num(s1)}).blob


def _off_by_one() -> bytes:
    b = build(crc=b"", trailing=b"\x00")
    d0, d1 = b.data
    return build(crc=b"", trailing=b"\x00", header_data=(d0, d1 + 1), text_data=(_num(d0), _num(d1 + 1))).blob


def _stext_zip() -> bytes:
    b = build(trailing=b"PK\x03\x04" + bytes(40))
    start = len(b.blob) - 44
    return build(trailing=b"PK\x03\x04" + bytes(40), keywords={"$BEGINSTEXT": _num(start),
                                                                 "$ENDSTEXT": _num(start + 43)}).blob


@dataclass(frozen=True)
class Valid:
    """A legal layout and the events it must read back to (no finding expected)."""

    name: str
    make: Callable[[], Built]
    expect: Callable[[], np.ndarray] = _v


VALID: list[Valid] = [
    Valid("float_little", lambda: build()),
    Valid("float_big", lambda: build(byteord="4,3,2,1")),
    Valid("double_little", lambda: build(datatype="D")),
    Valid("double_big", lambda: build(datatype="D", byteord="4,3,2,1")),
    Valid("int8", lambda: build(datatype="I", bits=[8] * N_PAR)),
    Valid("int16_big", lambda: build(datatype="I", bits=[16] * N_PAR, byteord="4,3,2,1")),
    Valid("int16_fcs20_byteord_2_1", lambda: build(version="FCS2.0", datatype="I", bits=[16] * N_PAR,
                                                   byteord="2,1")),
    Valid("int32_little", lambda: build(datatype="I", bits=[32] * N_PAR)),
    Valid("int64_big", lambda: build(datatype="I", bits=[64] * N_PAR, byteord="4,3,2,1")),
    Valid("int24_big", lambda: build(datatype="I", bits=[24] * N_PAR, byteord="4,3,2,1")),
    Valid("int24_little", lambda: build(datatype="I", bits=[24] * N_PAR)),
    Valid("int40_56_mixed", lambda: build(datatype="I", bits=[40, 56, 8, 48])),
    Valid("int_mixed_widths", lambda: build(datatype="I", bits=[8, 16, 32, 16], byteord="4,3,2,1")),
    Valid("fcs32_mixed_types", lambda: build(version="FCS3.2", datatype="F", kinds=["F", "I", "D", "I"],
                                             bits=[32, 16, 64, 24], keywords={"$MODE": DROP})),
    Valid("fcs30", lambda: build(version="FCS3.0")),
    Valid("fcs20_without_text_offsets", lambda: build(version="FCS2.0", text_data=None)),
    Valid("delimiter_backslash", lambda: build(delim=b"\\")),
    Valid("delimiter_pipe", lambda: build(delim=b"|")),
    Valid("delimiter_star", lambda: build(delim=b"*")),
    Valid("delimiter_form_feed", lambda: build(delim=b"\x0c")),
    Valid("delimiter_tab", lambda: build(delim=b"\t")),
    Valid("escaped_delimiter_in_value", lambda: build(keywords={"$P1F": "488/10", "$FIL": "a//b"})),
    Valid("supplemental_text", lambda: build(stext={"$CYT": "Symphony", "$P1S": "marker 1"})),
    Valid("crc_xmodem", lambda: build(crc="xmodem")),
    Valid("crc_ccitt_false_hex", lambda: build(crc="ccitt-false")),
    Valid("no_crc", lambda: build(crc=b"")),
    Valid("zero_padded_header", lambda: build(header_data=tuple(f"{x:08d}" for x in build().data))),
    Valid("utf8_marker", lambda: build(keywords={"$P2S": "Alexa Fluor™ 405 – CD3"})),
]


# --- an independent decoder, for checking what the reader returns ------------------------------------


def reference_raw(blob: bytes, text: Mapping[str, str], begin: int, n_events: int | None = None) -> np.ndarray:
    """Decode DATA the slow, obvious way (Python integers and ``struct``-free numpy scalars).

    Follows the keywords in ``text`` ($PAR, $TOT, $DATATYPE / $PnDATATYPE, $PnB, $BYTEORD):
    one value at a time, byte-aligned or as an LSB-first bit stream.
    """
    import math

    p = int(text["$PAR"])
    n = int(text["$TOT"]) if n_events is None else n_events
    datatype = text["$DATATYPE"].strip().upper()
    kinds = [(text.get(f"$P{j}DATATYPE") or datatype).strip().upper() for j in range(1, p + 1)]
    bits = [int(text[f"$P{j}B"]) for j in range(1, p + 1)]
    little = text["$BYTEORD"].replace(" ", "").startswith("1")
    out = np.zeros((n, p), dtype=np.float64)
    if any(b % 8 for b in bits):
        total = sum(bits)
        stream = int.from_bytes(blob[begin:begin + math.ceil(n * total / 8)], "little")
        pos = 0
        for i in range(n):
            for j in range(p):
                out[i, j] = (stream >> pos) & ((1 << bits[j]) - 1)
                pos += bits[j]
        return out
    pos = begin
    for i in range(n):
        for j in range(p):
            nb = bits[j] // 8
            chunk = blob[pos:pos + nb]
            if kinds[j] == "I":
                out[i, j] = int.from_bytes(chunk, "little" if little else "big")
            else:
                code = ("<" if little else ">") + ("f4" if kinds[j] == "F" else "f8")
                with np.errstate(invalid="ignore"):  # signalling NaN
                    out[i, j] = np.frombuffer(chunk, dtype=code)[0]
            pos += nb
    return out


def flowio_preprocess(raw: np.ndarray, text: Mapping[str, str], ignore_float_pne: bool = True) -> np.ndarray:
    """FlowIO 1.4.0's ``as_array(preprocess=True)`` rules, written out: mask, Time x $TIMESTEP, $PnE, / $PnG."""
    import math

    t = {str(k).upper(): str(v) for k, v in text.items()}
    with np.errstate(invalid="ignore"):
        out = np.array(raw, dtype=np.float64, copy=True)
    p = out.shape[1]
    datatype = t["$DATATYPE"].strip().upper()
    kinds = [(t.get(f"$P{j}DATATYPE") or datatype).strip().upper() for j in range(1, p + 1)]
    for j in range(p):
        if kinds[j] == "I":
            r = max(1, math.ceil(float(t[f"$P{j + 1}R"])))
            mask = (1 << (r - 1).bit_length()) - 1
            if mask < (1 << int(t[f"$P{j + 1}B"])) - 1:  # a range beyond the field's bits masks nothing
                out[:, j] = (out[:, j].astype(np.uint64) & np.uint64(mask)).astype(np.float64)
    names = [t[f"$P{j}N"].strip() for j in range(1, p + 1)]
    time = [j for j, nm in enumerate(names) if nm.lower() == "time"]
    step = t.get("$TIMESTEP", t.get("TIMESTEP"))
    if time and step is not None and step.strip():
        out[:, time[-1]] = out[:, time[-1]] * float(step)
    for j in range(p):
        e = t.get(f"$P{j + 1}E")
        if e and e.strip() and not (kinds[j] != "I" and ignore_float_pne):
            f1, f2 = (float(x) for x in e.split(","))
            if f1 > 0:
                out[:, j] = (10 ** (f1 * out[:, j] / float(t[f"$P{j + 1}R"]))) * (f2 or 1.0)
        g = t.get(f"$P{j + 1}G")
        if g is not None and g.strip() and j not in time[-1:]:
            gain = float(g)
            if gain not in (0.0, 1.0):
                out[:, j] = out[:, j] / gain
    return out
