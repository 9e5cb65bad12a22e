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

Beside the entries, :class:`PathIndex` (``<cache>/paths.json``) remembers the sha256 of
each input file together with the file's state (device, inode, size, modification and
change times in nanoseconds), so that an unchanged file need not be read again to find
its sha256, as git's index and make do.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
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
#: the path index's file name, in the cache folder
INDEX_NAME = "paths.json"
#: a file changed less than this long before its state was recorded may change again within the
#: same timestamp tick (coarse file-system clocks, 2 s on FAT) without its state showing it: such a
#: "racily clean" entry (git's term) is checked by hashing the file the next time
RACY_SECONDS = 3.0
#: ``(st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns)``
FileState = tuple[int, int, int, int, int]


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


_FROM_IMPORT = re.compile(r"^[ \t]*from[ \t]+(\.*)([\w.]*)[ \t]+import[ \t]+(\([^)]*\)|(?:[^\n#]*\\\n)*[^\n#]*)", re.M)
_PLAIN_IMPORT = re.compile(r"^[ \t]*import[ \t]+([^\n#]+)", re.M)


def result_modules(start: str = "work") -> list[str]:
    """immunoprofile modules (names relative to the package) that ``start`` imports, transitively, itself included.

    Import statements are found by a line scanner (every ``from ... import`` and ``import``
    at the start of a line, inside functions too), which reads the sources about ten times
    faster than parsing them (:func:`_imports_by_ast` is the reference, in the tests). A match
    inside a string can only add a module, which changes the fingerprint more often, never less.
    """
    root = Path(__file__).resolve().parent
    seen: set[str] = set()
    todo = [start]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _module_path(root, name)
        if path is None:
            continue
        seen.add(name)
        todo.extend(_imports(path.read_text(encoding="utf-8"), _package_of(name, path)))
    return sorted(seen)


def _module_path(root: Path, name: str) -> Path | None:
    path = root.joinpath(*name.split(".")).with_suffix(".py")
    if path.is_file():
        return path
    path = root.joinpath(*name.split("."), "__init__.py")
    return path if path.is_file() else None


def _package_of(name: str, path: Path) -> str:
    if path.name == "__init__.py":
        return name
    return name.rsplit(".", 1)[0] if "." in name else ""


def _relative(package: str, level: int, module: str) -> str:
    parts = package.split(".") if package else []
    parts = parts[: len(parts) - (level - 1)] if level > 1 else parts
    return ".".join(parts + ([module] if module else []))


def _imports(source: str, package: str) -> list[str]:
    """Candidate module names (relative to the package) imported by ``source``."""
    out: list[str] = []
    for dots, module, names in _FROM_IMPORT.findall(source):
        if dots:
            base = _relative(package, len(dots), module)
        elif module.startswith("immunoprofile"):
            base = module[len("immunoprofile"):].lstrip(".")
        else:
            continue
        out.append(base or "__init__")
        for item in names.replace("\\\n", " ").strip("() \n").split(","):
            word = item.split(" as ")[0].strip()
            if word and word != "*":
                out.append(f"{base}.{word}" if base else word)
    for names in _PLAIN_IMPORT.findall(source):
        for item in names.split(","):
            word = item.split(" as ")[0].strip()
            if word.startswith("immunoprofile."):
                out.append(word[len("immunoprofile."):])
    return out


def _imports_by_ast(source: str, package: str) -> list[str]:
    """:func:`_imports` by parsing the source: the reference the scanner is tested against."""
    import ast

    out: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = _relative(package, node.level, node.module or "")
            elif node.module and node.module.startswith("immunoprofile"):
                base = node.module[len("immunoprofile"):].lstrip(".")
            else:
                continue
            out.append(base or "__init__")
            out.extend(f"{base}.{a.name}" if base else a.name for a in node.names)
        elif isinstance(node, ast.Import):
            out.extend(a.name[len("immunoprofile."):] for a in node.names if a.name.startswith("immunoprofile."))
    return out


def make_key(kind: str, parts: dict[str, Any]) -> str:
    """The cache key of one unit of work: sha256 of its canonical JSON description.

    Parameters
    ----------
    kind
        ``'sample'`` or ``'control'``.
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
            for p in [*self.folder.glob("*/*.tmp-*"), *self.folder.glob(f".{INDEX_NAME}.tmp*")]:
                p.unlink(missing_ok=True)
                n += 1
        return n

    def has_entries(self) -> bool:
        """Whether the folder holds at least one entry."""
        return self.folder.is_dir() and next(self.folder.glob("*/*.pkl"), None) is not None

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


class PathIndex:
    """The sha256 of input files by path and file state, to skip hashing files that did not change.

    An entry maps an absolute path to the file's :data:`FileState` when it was hashed
    (``st_dev``, ``st_ino``, ``st_size``, ``st_mtime_ns``, ``st_ctime_ns``), its sha256, and
    when that state was taken. A file whose state is exactly the recorded one has the recorded
    sha256: writing a file changes its size or its modification time, and every change
    (``touch``, ``cp -p``, ``rsync -t``, replacing the file) changes its change time or its
    inode, which no user can set. As in git, an entry taken less than :data:`RACY_SECONDS`
    after the file last changed is *racy* (a write in the same clock tick would not show) and
    counts as changed. The index is a hint: a wrong or lost entry only costs a hash or a
    reuse, never a wrong result, since the worker's own sha256 is compared with the one used.

    Parameters
    ----------
    folder
        The cache folder; the index is ``folder/paths.json``, written atomically.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / INDEX_NAME
        self.entries: dict[str, dict[str, Any]] = {}
        self.found = False
        self._dirty = False

    def load(self) -> PathIndex:
        """Read the index (absent or damaged: empty, with a warning for damage); returns self."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except OSError:
            return self
        try:
            doc = json.loads(text)
            entries = doc["paths"]
            if doc.get("version") != 1 or not isinstance(entries, dict):
                raise ValueError("unknown layout")
            for e in entries.values():
                if len(e["state"]) != 5 or len(e["sha256"]) != 64:
                    raise ValueError("bad entry")
        except (ValueError, KeyError, TypeError) as e:
            log.warning("ignoring a damaged path index %s (%s); files will be hashed again", self.path, e)
            return self
        self.entries, self.found = entries, True
        return self

    def lookup(self, path: str, state: FileState | None) -> tuple[str, str | None]:
        """What the index knows of ``path`` in ``state``.

        Returns
        -------
        tuple
            ``('same', sha256)``: the recorded state, exactly (and not racy);
            ``('changed', None)``: an entry, but another (or a racy) state: hash the file;
            ``('unknown', None)``: no entry for this path.
        """
        e = self.entries.get(path)
        if e is None or state is None:
            return ("unknown", None) if e is None else ("changed", None)
        e["seen"] = int(time.time())
        self._dirty = True
        if tuple(e["state"]) != tuple(state) or _racy(state, e["checked_ns"]):
            return ("changed", None)
        return ("same", e["sha256"])

    def record(self, path: str, state: FileState, sha256: str, checked_ns: int) -> None:
        """Remember that ``path`` in ``state`` (stat-ed at ``checked_ns``, ``time.time_ns()``) has ``sha256``."""
        if not sha256:
            return
        self.entries[path] = {"state": list(state), "sha256": sha256, "checked_ns": int(checked_ns),
                              "seen": int(time.time())}
        self._dirty = True

    def save(self, max_age_days: float = 7.0) -> None:
        """Write the index atomically if it changed, without entries unused for ``max_age_days``.

        Raises
        ------
        OSError
            The index cannot be written (e.g. the disk is full).
        """
        if not self._dirty:
            return
        from .atomic import write_bytes_atomic

        limit = time.time() - max_age_days * 86400.0
        keep = {p: e for p, e in sorted(self.entries.items()) if e.get("seen", 0) >= limit}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"version": 1, "paths": keep}, sort_keys=True, separators=(",", ":"))
        write_bytes_atomic(self.path, text.encode())
        self.entries, self._dirty = keep, False


def _racy(state: FileState, checked_ns: int) -> bool:
    """The file changed too shortly before its state was recorded to trust the state alone."""
    return max(state[3], state[4]) >= checked_ns - int(RACY_SECONDS * 1e9)
