"""Skip finished work: a per-sample cache of results keyed by everything they depend on.

A key is the sha256 of a canonical JSON description of one unit of work: the
FCS file's sha256, the template's sha256, the options that change results, the
sample's sheet metadata, for a stained sample the FMO thresholds it used, and
the *program fingerprint* (immunoprofile's version, the sha256 of its source
code and the versions of the libraries that compute results). Change any of
them and the key changes, so stale results are never reused; nothing is ever
invalidated by date.

An entry is one file ``<cache>/<k[:2]>/<k>.pkl`` holding the key and the pickled
results, written to a temporary name and renamed, so a crash (``kill -9``
included) leaves either a whole entry or none. An unreadable entry is a miss.
Entries hold only what immunoprofile wrote; do not point the cache at files
from people you do not trust (pickle).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import time
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: libraries whose version can change a result (the others only move data around)
RESULT_DEPENDENCIES = ("flowkit", "flowutils", "flowio", "numpy", "scipy", "scikit-learn", "pandas")
_MAGIC = b"IPCACHE1"
_fingerprint: str | None = None


def program_fingerprint() -> str:
    """sha256 of immunoprofile's version, the source of the code that computes results, and library versions.

    The code is :mod:`immunoprofile.work` and every immunoprofile module it imports,
    directly or not (found by reading the ``import`` statements, including those inside
    functions), so an edit to the reader, the gating or the statistics gives a new
    fingerprint while an edit to, say, the plots does not. Computed once per process.
    """
    global _fingerprint
    if _fingerprint is None:
        from importlib import metadata

        from . import __version__

        h = hashlib.sha256(f"immunoprofile {__version__}\n".encode())
        root = Path(__file__).resolve().parent
        for name in result_modules():
            p = root.joinpath(*name.split(".")).with_suffix(".py")
            if not p.is_file():
                p = root.joinpath(*name.split("."), "__init__.py")
            h.update(name.encode() + b"\0")
            h.update(hashlib.sha256(p.read_bytes()).digest())
        for d in RESULT_DEPENDENCIES:
            try:
                v = metadata.version(d)
            except metadata.PackageNotFoundError:
                v = "-"
            h.update(f"{d}=={v}\n".encode())
        _fingerprint = h.hexdigest()
    return _fingerprint


def result_modules(start: str = "work") -> list[str]:
    """immunoprofile modules (names relative to the package) that ``start`` imports, transitively, itself included."""
    import ast

    root = Path(__file__).resolve().parent
    seen: set[str] = set()
    todo = [start]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = root.joinpath(*name.split(".")).with_suffix(".py")
        if not path.is_file():
            path = root.joinpath(*name.split("."), "__init__.py")
            if not path.is_file():
                continue
        seen.add(name)
        package = name.rsplit(".", 1)[0] if "." in name and path.name != "__init__.py" else (
            name if path.name == "__init__.py" else "")
        for node in ast.walk(ast.parse(path.read_bytes(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".") if package else []
                    parts = parts[: len(parts) - (node.level - 1)] if node.level > 1 else parts
                    base = ".".join(parts + ([node.module] if node.module else []))
                elif node.module and node.module.startswith("immunoprofile"):
                    base = node.module[len("immunoprofile"):].lstrip(".")
                else:
                    continue
                todo.append(base or "__init__")
                todo.extend(f"{base}.{a.name}" if base else a.name for a in node.names)
            elif isinstance(node, ast.Import):
                todo.extend(a.name[len("immunoprofile."):] for a in node.names if a.name.startswith("immunoprofile."))
    return sorted(seen)


def make_key(kind: str, parts: dict[str, Any]) -> str:
    """The cache key of one unit of work: sha256 of its canonical JSON description.

    Parameters
    ----------
    kind
        ``'sample'``, ``'control'`` or ``'hints'``.
    parts
        JSON-serialisable description (floats are written exactly, with ``repr``).

    Raises
    ------
    TypeError
        A part cannot be written as JSON (a bug in the caller).
    """
    doc = {"kind": kind, "program": program_fingerprint(), **parts}
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=True, default=_jsonable)
    return hashlib.sha256(text.encode()).hexdigest()


def _jsonable(x: Any) -> Any:
    if isinstance(x, (set, frozenset)):
        return sorted(x)
    if hasattr(x, "item"):  # numpy scalar
        return x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"cannot put {type(x).__name__} in a cache key")


class SampleCache:
    """Results of finished units of work, in a folder.

    Parameters
    ----------
    folder
        Where entries live (created on first write).
    enabled
        False (``--force``): every lookup misses; new results are still stored.
    """

    def __init__(self, folder: str | os.PathLike, enabled: bool = True) -> None:
        self.folder = Path(folder)
        self.enabled = enabled
        self.used: set[str] = set()
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.pkl"

    def get(self, key: str) -> Any | None:
        """The stored value for ``key``, or None (disabled, absent or unreadable)."""
        if not self.enabled:
            self.misses += 1
            return None
        p = self._path(key)
        try:
            blob = p.read_bytes()
        except OSError:
            self.misses += 1
            return None
        try:
            if not blob.startswith(_MAGIC):
                raise ValueError("not a cache entry")
            stored_key, value = pickle.loads(zlib.decompress(blob[len(_MAGIC):]))
            if stored_key != key:
                raise ValueError("key mismatch")
        except Exception as e:  # noqa: BLE001 - a damaged entry is only a miss
            log.warning("ignoring a damaged cache entry %s (%s)", p, e)
            self.misses += 1
            return None
        self.used.add(key)
        self.hits += 1
        return value

    def put(self, key: str, value: Any) -> None:
        """Store ``value`` under ``key`` (atomically: temporary file, fsync, rename).

        Raises
        ------
        OSError
            The entry cannot be written (e.g. the disk is full).
        """
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f"{p.name}.tmp-{os.getpid()}")
        blob = _MAGIC + zlib.compress(pickle.dumps((key, value), protocol=pickle.HIGHEST_PROTOCOL), 3)
        with open(tmp, "wb") as fh:
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
        self.used.add(key)

    def clean_temporary(self) -> int:
        """Remove half-written entries left by a killed run; returns how many."""
        n = 0
        if self.folder.is_dir():
            for p in self.folder.glob("*/*.tmp-*"):
                p.unlink(missing_ok=True)
                n += 1
        return n

    def prune(self, keep: Iterable[str], max_age_days: float = 7.0) -> int:
        """Remove entries not in ``keep`` that were written more than ``max_age_days`` ago; returns how many.

        Called after a successful run with the keys it used, so the cache holds what the
        latest results need plus a week of alternatives (another template, other options).
        """
        keep = set(keep)
        limit = time.time() - max_age_days * 86400.0
        n = 0
        if self.folder.is_dir():
            for p in self.folder.glob("*/*.pkl"):
                try:
                    old = p.stat().st_mtime < limit
                except OSError:
                    continue
                if p.stem not in keep and old:
                    p.unlink(missing_ok=True)
                    n += 1
            for d in self.folder.iterdir():
                if d.is_dir() and not any(d.iterdir()):
                    d.rmdir()
        return n
