"""Writing results: tables, manifest, atomic publication of a run folder.

Every output is first written into a staging folder beside the destination and
published only when complete, so a reader never sees a half-written file.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import platform
import shutil
import socket
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from . import __version__

DEPENDENCIES = ("flowkit", "flowio", "flowutils", "numpy", "pandas", "scipy", "scikit-learn", "click",
                "matplotlib", "seaborn", "pyyaml", "pyarrow")


def utc_now() -> str:
    """Current UTC time, ISO 8601, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def versions() -> dict[str, str]:
    """Program, Python and dependency versions."""
    out = {"immunoprofile": __version__, "python": platform.python_version()}
    for d in DEPENDENCIES:
        try:
            out[d] = metadata.version(d)
        except metadata.PackageNotFoundError:
            out[d] = "not installed"
    return out


def run_context() -> dict[str, Any]:
    """Who ran what, where: for ``manifest.json``."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid()) if hasattr(os, "getuid") else "unknown"
    return {"command_line": sys.argv[:], "user": user, "host": socket.gethostname(),
            "platform": platform.platform(), "versions": versions()}


def write_csv(df: pd.DataFrame, path: Path) -> None:
    """Write a table as CSV, flushed to disk (``NaN`` written as empty)."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        df.to_csv(fh, index=False, lineterminator="\n")
        fh.flush()
        os.fsync(fh.fileno())


def write_parquet(df: pd.DataFrame, path: Path) -> None:
    """Write a table as Parquet (deterministic: no pandas index, fixed compression)."""
    df.to_parquet(path, index=False, compression="zstd")


def write_json(obj: Any, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False, default=str)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())


def staging_dir(out_dir: Path) -> Path:
    """A fresh staging folder beside ``out_dir`` (same file system, so renames are atomic)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = out_dir.parent / f".{out_dir.name}.staging-{os.getpid()}"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir()
    return stage


def publish(stage: Path, out_dir: Path, keep: Sequence[str] = ()) -> None:
    """Replace ``out_dir`` by ``stage``; files named in ``keep`` are carried over from the old folder.

    The old folder is moved aside and removed only after the new one is in place; a
    crash in between leaves ``.NAME.old-PID`` beside it, which the next run removes.
    """
    if out_dir.exists():
        for name in keep:
            src = out_dir / name
            if src.exists() and not (stage / name).exists():
                if src.is_dir():
                    shutil.copytree(src, stage / name)
                else:
                    shutil.copy2(src, stage / name)
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        os.replace(out_dir, old)
        os.replace(stage, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(stage, out_dir)
    _fsync_dir(out_dir.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def manifest_outputs(folder: Path, exclude: Sequence[str] = ("manifest.json",)) -> list[dict[str, Any]]:
    """Every file under ``folder`` with its size and sha256 (sorted by path)."""
    out = []
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name not in exclude:
            out.append({"path": p.relative_to(folder).as_posix(), "bytes": p.stat().st_size, "sha256": sha256_file(p)})
    return out


def tables_equal_frame(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> pd.DataFrame:
    """Rows -> frame with exactly ``columns`` (then any extra keys), in that order."""
    df = pd.DataFrame(list(rows))
    for c in columns:
        if c not in df.columns:
            df[c] = pd.Series(dtype=object)
    extra = [c for c in df.columns if c not in columns]
    return df[list(columns) + extra]
