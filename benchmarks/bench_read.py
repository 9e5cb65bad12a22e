"""Reading speed of :func:`immunoprofile.fcs.read_fcs` against the raw limit.

Writes 1,000,000-event, 18-channel FCS files in a temporary folder (float32, and 16-bit and
24-bit integer variants) and times ``read_fcs`` (read the bytes, SHA-256, checks, decode to the
event matrix) against ``numpy.fromfile`` of the DATA segment alone. Prints MB/s of DATA for both.

    python benchmarks/bench_read.py            # prints a table
    run(tmpdir) -> dict                        # the figures, for ``make bench``
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from immunoprofile.fcs import parse_fcs, read_fcs, write_fcs  # noqa: E402

N_EVENTS, N_CHANNELS, REPEATS = 1_000_000, 18, 5


def _int_file(path: Path, values: np.ndarray, bits: int) -> tuple[int, int]:
    """A big-endian integer FCS 3.1 file of ``bits``-wide values; returns the DATA offsets."""
    n, p = values.shape
    nb = bits // 8
    u = values.astype(">u4").view(np.uint8).reshape(n, p, 4)[:, :, 4 - nb:]
    payload = np.ascontiguousarray(u).tobytes()
    kw = {"$BYTEORD": "4,3,2,1", "$DATATYPE": "I", "$MODE": "L", "$NEXTDATA": "0", "$PAR": str(p), "$TOT": str(n)}
    for j in range(1, p + 1):
        kw.update({f"$P{j}N": f"CH{j}", f"$P{j}B": str(bits), f"$P{j}E": "0,0", f"$P{j}R": str(2 ** bits)})
    kw["$BEGINDATA"] = kw["$ENDDATA"] = "0" * 10
    text = "".join(f"/{k}/{v}" for k, v in kw.items()) + "/"
    d0 = 58 + len(text)
    d1 = d0 + len(payload) - 1
    text = text.replace(f"$BEGINDATA/{'0' * 10}", f"$BEGINDATA/{d0:010d}").replace(
        f"$ENDDATA/{'0' * 10}", f"$ENDDATA/{d1:010d}")
    header = f"FCS3.1    {58:>8d}{57 + len(text):>8d}{d0:>8d}{d1:>8d}{0:>8d}{0:>8d}"
    path.write_bytes(header.encode() + text.encode() + payload + b"00000000")
    return d0, d1


def _best(fn, repeats: int = REPEATS) -> float:  # noqa: ANN001
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def run(tmpdir: str | Path, n_events: int = N_EVENTS, n_channels: int = N_CHANNELS) -> dict:
    """Time ``read_fcs`` against ``numpy.fromfile`` on DATA; returns {variant: figures}."""
    tmp = Path(tmpdir)
    rng = np.random.default_rng(0)
    out: dict[str, dict[str, float]] = {}
    ev = rng.normal(2000, 800, size=(n_events, n_channels)).astype(np.float32)
    variants = {"float32": None, "int16": 16, "int24": 24}
    for name, bits in variants.items():
        path = tmp / f"bench_{name}.fcs"
        if bits is None:
            write_fcs(path, ev, [f"CH{j}" for j in range(1, n_channels + 1)])
            s = read_fcs(path)
            d0, d1 = s.data_offsets
            dtype, count = "<f4", n_events * n_channels
        else:
            vals = rng.integers(0, 2 ** bits, size=(n_events, n_channels), dtype=np.uint32)
            d0, d1 = _int_file(path, vals, bits)
            dtype, count = (">u2", n_events * n_channels) if bits == 16 else ("u1", (d1 - d0 + 1))
        mb = (d1 - d0 + 1) / 1e6
        t_raw = _best(lambda: np.fromfile(path, dtype=dtype, count=count, offset=d0))
        t_read = _best(lambda: read_fcs(path))
        blob = path.read_bytes()
        t_parse = _best(lambda: parse_fcs(blob, str(path)))
        t_hash = _best(lambda: hashlib.sha256(blob).digest())
        out[name] = {
            "data_mb": round(mb, 1),
            "fromfile_mb_s": round(mb / t_raw, 1),
            "read_fcs_mb_s": round(mb / t_read, 1),
            "parse_from_memory_mb_s": round(mb / t_parse, 1),
            "sha256_mb_s": round(mb / t_hash, 1),
            "read_fcs_s": round(t_read, 4),
            "fromfile_s": round(t_raw, 4),
            "ratio_read_fcs_vs_fromfile": round(t_read / t_raw, 2),
        }
        path.unlink()
    return out


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        res = run(tmp)
    cols = ["data_mb", "fromfile_mb_s", "read_fcs_mb_s", "parse_from_memory_mb_s", "sha256_mb_s",
            "ratio_read_fcs_vs_fromfile"]
    print(f"{N_EVENTS:,} events x {N_CHANNELS} channels (best of {REPEATS})")
    print("variant   " + "  ".join(f"{c:>26s}" for c in cols))
    for name, r in res.items():
        print(f"{name:<9s} " + "  ".join(f"{r[c]:>26}" for c in cols))


if __name__ == "__main__":
    main()
