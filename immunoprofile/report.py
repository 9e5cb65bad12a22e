"""Writing results: tables, manifest, atomic publication of a results folder, verification.

A run writes every output into a staging folder and publishes it with one atomic
step, so ``DIR`` holds either the previous complete results or the new complete
results, never a mix or a truncated file, even after ``kill -9``:

* Linux: ``renameat2(RENAME_EXCHANGE)`` swaps the staging folder and ``DIR`` in one
  system call; ``DIR`` never disappears.
* elsewhere (or on file systems without it): ``DIR`` is renamed aside, the staging
  folder renamed in; a crash between the two renames leaves ``DIR`` absent and the
  previous results in the work area, and the next run puts them back
  (:func:`recover`) before it starts.

Everything a run needs besides ``DIR`` lives in one hidden work area beside it,
``.DIR.immunoprofile/`` (lock, cache, staging folders); see :func:`work_area`.
"""

from __future__ import annotations

import ctypes
import errno
import getpass
import hashlib
import json
import logging
import os
import platform
import shutil
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from . import __version__
from .errors import ResultsError

log = logging.getLogger(__name__)

DEPENDENCIES = ("flowkit", "flowio", "flowutils", "numpy", "pandas", "scipy", "scikit-learn", "click",
                "matplotlib", "seaborn", "pyyaml", "pyarrow")
MANIFEST = "manifest.json"
#: manifest keys that differ from run to run; everything else is a function of the inputs and the program
VOLATILE_KEYS = ("run_id", "command_line", "user", "host", "platform", "started_utc", "finished_utc", "run")


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
    """Write a table as Parquet (deterministic: no pandas index, fixed compression), flushed to disk."""
    with open(path, "wb") as fh:
        df.to_parquet(fh, index=False, compression="zstd")
        fh.flush()
        os.fsync(fh.fileno())


def write_json(obj: Any, path: Path) -> None:
    """Write JSON (2-space indent, key order kept), flushed to disk."""
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False, default=str)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())


def tables_equal_frame(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> pd.DataFrame:
    """Rows -> frame with exactly ``columns`` (then any extra keys), in that order."""
    df = pd.DataFrame(list(rows))
    for c in columns:
        if c not in df.columns:
            df[c] = pd.Series(dtype=object)
    extra = [c for c in df.columns if c not in columns]
    return df[list(columns) + extra]


# ------------------------------------------------------------------------------------ the work area
def work_area(out_dir: Path) -> Path:
    """``.NAME.immunoprofile/`` beside the results folder ``NAME``: lock, cache, staging folders.

    It is on the same file system as the results folder, so publishing is a rename.
    It may be deleted whenever no run is active (the cache is then rebuilt).
    """
    return out_dir.parent / f".{out_dir.name}.immunoprofile"


def staging_dir(out_dir: Path, run_id: str | None = None) -> Path:
    """A fresh, empty staging folder in the work area of ``out_dir``."""
    stage = work_area(out_dir) / f"staging-{run_id or os.getpid()}"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    return stage


def recover(out_dir: Path) -> list[str]:
    """Repair what an interrupted run left behind; call with the run lock held.

    If a crash hit the non-atomic fallback of :func:`publish` between its two renames,
    ``out_dir`` is missing and the previous results wait in the work area: they are put
    back. Leftover staging and previous-results folders are then removed.

    Returns
    -------
    list of str
        What was done, for the log.

    Raises
    ------
    OSError
        The previous results cannot be moved back.
    """
    done: list[str] = []
    area = work_area(out_dir)
    if not area.is_dir():
        return done
    previous = sorted(area.glob("previous-*"), key=lambda p: p.stat().st_mtime)
    if not out_dir.exists() and previous:
        os.replace(previous[-1], out_dir)
        fsync_dir(out_dir.parent)
        done.append(f"restored the previous results of {out_dir} from an interrupted publication")
        previous = previous[:-1]
    for p in [*previous, *area.glob("staging-*")]:
        shutil.rmtree(p, ignore_errors=True)
        done.append(f"removed {p.name} left by an interrupted run")
    return done


def publish(stage: Path, out_dir: Path, keep: Sequence[str] = ()) -> None:
    """Replace ``out_dir`` by the complete folder ``stage`` in one atomic step.

    Parameters
    ----------
    keep
        Names of entries of the old ``out_dir`` to carry into the new one (hard links,
        so nothing is copied) when ``stage`` has no entry of that name: files that
        were not written by immunoprofile.

    Raises
    ------
    OSError
        A rename failed; ``out_dir`` then still holds the previous results (or, after a
        failure between the two renames of the fallback, :func:`recover` restores them).
    """
    fsync_dir(stage)
    if not out_dir.exists():
        os.replace(stage, out_dir)
        fsync_dir(out_dir.parent)
        return
    for name in keep:
        src, dst = out_dir / name, stage / name
        if (src.exists() or src.is_symlink()) and not (dst.exists() or dst.is_symlink()):
            _link_tree(src, dst)
    if _exchange(stage, out_dir):
        fsync_dir(out_dir.parent)
        shutil.rmtree(stage, ignore_errors=True)  # now holds the previous results
        return
    old = stage.with_name(stage.name.replace("staging-", "previous-", 1))
    os.replace(out_dir, old)   # from here until the next rename, out_dir is absent (see recover())
    os.replace(stage, out_dir)
    fsync_dir(out_dir.parent)
    shutil.rmtree(old, ignore_errors=True)


def _link_tree(src: Path, dst: Path) -> None:
    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        shutil.copytree(src, dst, symlinks=True, copy_function=link)
    else:
        link(str(src), str(dst))


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2``); False where that is not supported."""
    if not sys.platform.startswith("linux") or os.environ.get("IMMUNOPROFILE_NO_EXCHANGE"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (renames, new files) to disk; best effort."""
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


# ----------------------------------------------------------------------------------------- manifest
def file_entry(path: Path, name: str) -> dict[str, Any]:
    """``{"path", "bytes", "sha256"}`` of one file."""
    return {"path": name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def manifest_outputs(folder: Path, exclude: Sequence[str] = (MANIFEST,)) -> list[dict[str, Any]]:
    """Every file under ``folder`` with its size and sha256 (sorted by path)."""
    out = []
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name not in exclude:
            out.append(file_entry(p, p.relative_to(folder).as_posix()))
    return out


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The ``manifest.json`` of a results folder.

    Raises
    ------
    ResultsError
        The folder or its manifest is missing or unreadable.
    """
    p = Path(folder)
    if not p.is_dir():
        raise ResultsError("no such results folder", path=str(p), hint="give the --out folder of `immunoprofile gate`")
    m = p / MANIFEST
    try:
        doc = json.loads(m.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ResultsError("this folder has no manifest.json, so it is not (or not yet) a results folder",
                           path=str(p), code="MANIFEST_MISSING",
                           hint="give the --out folder of a finished `immunoprofile gate` run") from None
    except (OSError, ValueError) as e:
        raise ResultsError(f"manifest.json cannot be read ({e})", path=str(p), code="MANIFEST_INVALID") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("outputs"), list):
        raise ResultsError("manifest.json has no list of outputs", path=str(p), code="MANIFEST_INVALID")
    return doc


def stable_manifest(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest without its :data:`VOLATILE_KEYS`: identical for identical inputs and program."""
    return {k: v for k, v in doc.items() if k not in VOLATILE_KEYS}


@dataclass
class VerifyReport:
    """What :func:`verify_folder` found: ``problems`` are ``(kind, what, detail)``."""

    folder: str
    run_id: str
    checked_outputs: int = 0
    checked_inputs: int = 0
    problems: list[tuple[str, str, str]] = field(default_factory=list)
    untracked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_folder(folder: str | os.PathLike, check_inputs: bool = True) -> VerifyReport:
    """Recheck every file ``manifest.json`` lists against its recorded size and sha256.

    Outputs are looked up in ``folder``; inputs at the absolute path recorded at run time.
    Files in the folder that the manifest does not list are reported as untracked (not
    a problem: e.g. notes added by hand).

    Raises
    ------
    ResultsError
        The folder has no readable manifest.
    """
    root = Path(folder)
    doc = read_manifest(root)
    rep = VerifyReport(str(root), str(doc.get("run_id", "")))
    run = doc.get("run") if isinstance(doc.get("run"), dict) else {}
    outputs = list(doc["outputs"]) + [e for e in (run.get("log"), run.get("database")) if isinstance(e, dict)
                                      and e.get("sha256")]
    listed = {MANIFEST}
    for e in outputs:
        name = str(e.get("path", ""))
        listed.add(name)
        rep.checked_outputs += 1
        _check(root / name, e, name, rep)
    if check_inputs:
        for e in [*doc.get("inputs", []), *doc.get("other_inputs", [])]:
            if not isinstance(e, dict) or not e.get("sha256") or not (e.get("path") or e.get("file")):
                continue
            rep.checked_inputs += 1
            _check(Path(e.get("path") or e["file"]), e, f"input {e.get('path') or e['file']}", rep)
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in listed and not rel.endswith(("-journal", "-wal", "-shm")):
            rep.untracked.append(rel)
    return rep


def _check(path: Path, entry: Mapping[str, Any], what: str, rep: VerifyReport) -> None:
    if not path.is_file():
        rep.problems.append(("missing", what, "not found"))
        return
    size = path.stat().st_size
    if "bytes" in entry and entry["bytes"] is not None and size != entry["bytes"]:
        rep.problems.append(("changed", what, f"{size} bytes, manifest says {entry['bytes']}"))
        return
    if sha256_file(path) != entry["sha256"]:
        rep.problems.append(("changed", what, "sha256 differs from the manifest"))
