"""Fixed and data-driven gates -> per-population event membership.

:class:`EventData` holds one sample's events for one template: it finds the
channel of every marker, compensates and transforms columns on demand. 
:func:`gate_events` applies a template's populations in order and returns a
boolean mask per population plus the coordinates every gate actually used
(``gates.csv``), so data-driven gates can be audited and reproduced.

Boundary rules follow Gating-ML 2.0 and FlowKit: a range keeps ``min <= x < max``;
a threshold ``above`` keeps ``x >= t`` and ``below`` keeps ``x < t``; a quadrant's
divider belongs to its positive side; polygons use the winding rule and ellipses
keep ``d^2 <= D^2`` (the same arithmetic as :mod:`flowutils.gating`, which FlowKit uses).

Speed (docs/performance.md): a gate below the root is evaluated only on its parent's
events (sorted event numbers), and a dimension is transformed only for those events;
compensation is one blocked pass over the event matrix for every needed channel;
data-driven thresholds come from one sort of the parent's values. Each shortcut is
exact: results equal, event for event and bit for bit, gating every event on
full-length transformed columns with ``np.percentile``/``np.histogram``
(``tests/test_perf_equivalence.py``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import panel
from .errors import CompensationError, ControlMissingError, Finding, GatingError, MarkerError
from .fcs import FcsSample
from .templates import (
    ROOT, BooleanGate, EllipseGate, Gate, PolygonGate, QuadrantGate, RangeGate, ScatterGate, SingletGate,
    Template, Threshold, ThresholdGate,
)
from .transform import Identity, Logicle, Transform

log = logging.getLogger(__name__)

SCATTER = {"FSC-A", "FSC-H", "FSC-W", "SSC-A", "SSC-H", "SSC-W", "Time"}
MIN_EVENTS_FOR_THRESHOLD = 20


def is_scatter(dim: str, channel: str) -> bool:
    """True for scatter and time channels (linear by default)."""
    if panel.canonical(dim) in SCATTER:
        return True
    up = channel.upper()
    return up.startswith(("FSC", "SSC", "FS ", "SS ", "FS-", "SS-", "TIME"))


# ---------------------------------------------------------------- event data
@dataclass
class EventData:
    """One sample's events seen through one template (lazy compensation and transforms)."""

    sample: FcsSample
    template: Template
    channel_of: dict[str, int]
    transforms: dict[str, Transform]
    spill_columns: tuple[int, ...] = ()
    spill_inverse: np.ndarray | None = None
    compensation_source: str = "none"
    findings: list[Finding] = field(default_factory=list)
    _raw: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    _tf: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    _pending: Any = field(default=None, repr=False)

    @property
    def n_events(self) -> int:
        return self.sample.n_events

    def channel(self, dim: str) -> str:
        return self.sample.channels[self.channel_of[dim]]

    def raw(self, dim: str) -> np.ndarray:
        """Compensated values of ``dim`` in raw (instrument) units, float64."""
        if dim not in self._raw:
            col = self.channel_of[dim]
            if self.spill_inverse is not None and col in self.spill_columns:
                self._wait()
                if dim not in self._raw:
                    self._compensate_all()
            else:
                self._raw[dim] = self.sample.column(col)
        return self._raw[dim]

    def compensate_in_background(self) -> None:
        """Start compensating every needed channel in a second thread, if :func:`worker_threads` allows.

        The first :meth:`raw` of a compensated channel waits for it (and re-raises its error);
        meanwhile the gates on scatter channels run. numpy releases the GIL in the copies and
        the matrix product, so the two overlap on two cores. The values are the same either way.
        The caller holds :class:`_single_thread_blas` until it has waited (the thread sets no
        thread limits of its own: OpenMP's belong to the calling thread).
        """
        if self._pending is not None or self.spill_inverse is None or worker_threads() < 2:
            return
        if all(d in self._raw for d, c in self.channel_of.items() if c in self.spill_columns):
            return
        self._pending = _Background(lambda: self._compensate_all(limit_threads=False), "immunoprofile-compensate")

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.wait()

    def _compensate_all(self, limit_threads: bool = True) -> None:
        """Compensate, in one pass over the events, every needed dimension that the matrix covers."""
        dims = [d for d, c in self.channel_of.items() if c in self.spill_columns and d not in self._raw]
        if not dims:
            return
        ks = [self.spill_columns.index(self.channel_of[d]) for d in dims]
        args = (self._spill_source(), self.spill_columns, self.spill_inverse[:, ks], _COMP_BLOCK)
        out = compensate_columns(*args) if limit_threads else _compensate(*args)
        for j, d in enumerate(dims):
            self._raw[d] = out[:, j]

    def values(self, dim: str) -> np.ndarray:
        """Compensated, transformed values of ``dim`` (the units gates are written in)."""
        if dim not in self._tf:
            t = self.transforms[dim]
            self._tf[dim] = self.raw(dim) if isinstance(t, Identity) else t.apply(self.raw(dim))
        return self._tf[dim]

    def values_at(self, dim: str, index: np.ndarray | None) -> np.ndarray:
        """``values(dim)[index]`` without transforming the other events.

        ``index`` holds sorted event numbers (``None``: every event). Transforms act on
        each value alone, so the result equals the full column's entries exactly.
        """
        if index is None:
            return self.values(dim)
        if dim in self._tf:
            return self._tf[dim][index]
        if dim in self._raw or self._compensated(dim):
            raw = self.raw(dim)[index]
        else:  # straight from the event matrix: no full-length copy of the column
            raw = self.sample.column(self.channel_of[dim], index)
        t = self.transforms[dim]
        return raw if isinstance(t, Identity) else t.apply(raw)

    def _spill_source(self) -> np.ndarray:
        """The matrix compensation reads: the file's float32 values unless Time is compensated (never, in practice)."""
        ts = self.sample.time_scale
        return self.sample.events if ts is not None and ts[0] in self.spill_columns else self.sample.matrix

    def _compensated(self, dim: str) -> bool:
        return self.spill_inverse is not None and self.channel_of[dim] in self.spill_columns

    def _column(self, dim: str) -> np.ndarray:
        """``values(dim)``, not kept (an uncompensated column is read again from the event matrix)."""
        if dim in self._tf or dim in self._raw or self._compensated(dim):
            return self.values(dim)
        raw = self.sample.column(self.channel_of[dim])
        t = self.transforms[dim]
        return raw if isinstance(t, Identity) else t.apply(raw)


_COMP_BLOCK = 16384  # events per block: the float64 copy of a block stays in the L2 cache


def compensate_columns(events: np.ndarray, columns: tuple[int, ...], inverse_cols: np.ndarray,
                       block: int = 65536) -> np.ndarray:
    """``events[:, columns] @ inverse_cols`` in float64, block by block (no full-matrix copies).

    Returns a Fortran-ordered ``(n_events, k)`` array, so each column is contiguous. The
    values are those of one product over all events on one thread for any even ``block``
    (BLAS rounds a block's lone odd last row its own way; here only the very last event can
    be one, as in the single product).
    """
    with _single_thread_blas():
        return _compensate(events, columns, inverse_cols, block)


def _compensate(events: np.ndarray, columns: tuple[int, ...], inverse_cols: np.ndarray, block: int) -> np.ndarray:
    """:func:`compensate_columns` without touching thread limits (for a background thread)."""
    n = events.shape[0]
    k = inverse_cols.shape[1]
    out = np.empty((n, k), dtype=np.float64, order="F")
    cols = np.asarray(columns, dtype=np.intp)
    inv = np.ascontiguousarray(inverse_cols, dtype=np.float64)
    # adjacent columns are read as a slice (no fancy-index copy); the float64 block is reused
    step = cols[1] - cols[0] if cols.size > 1 else 1
    span = (slice(int(cols[0]), int(cols[-1]) + 1, int(step))
            if cols.size and step > 0 and np.array_equal(cols, np.arange(cols[0], cols[-1] + 1, step)) else cols)
    block = max(2, min(block, n))
    buf = np.empty((block + 1, cols.size), dtype=np.float64)
    prod = np.empty((block + 1, k), dtype=np.float64)
    i = 0
    while i < n:
        m = min(block, n - i)
        if n - i - m == 1:
            m += 1  # never a lone last row: BLAS takes another path for it (gemv), which may round differently
        np.copyto(buf[:m], events[i:i + m, span], casting="unsafe")
        np.matmul(buf[:m], inv, out=prod[:m])
        out[i:i + m] = prod[:m]
        i += m
    return out


def worker_threads() -> int:
    """Threads one sample may use: ``IMMUNOPROFILE_THREADS`` if set; else 1 in a worker process
    (a batch's workers already fill the CPUs), 2 when 2 CPUs are available. Results do not
    depend on it."""
    env = os.environ.get("IMMUNOPROFILE_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    import multiprocessing

    if multiprocessing.parent_process() is not None:
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        cpus = os.cpu_count() or 1
    return 2 if cpus >= 2 else 1


class _Background:
    """``fn()`` as side work (:mod:`.background`); :meth:`wait` waits for it and re-raises its exception."""

    def __init__(self, fn: Any, name: str) -> None:
        from .background import submit

        self.name = name
        self._job = submit(fn)

    def wait(self) -> None:
        self._job.result()


_THREADPOOLS: dict[str, Any] = {}
_BLAS_LOCK = threading.Lock()
_BLAS_LIMIT: dict[str, Any] = {"depth": 0, "ctx": None}
_OPENMP = threading.local()  # OpenMP's thread count is per calling thread


def _controller(user_api: str) -> Any:
    """The thread pools of ``user_api`` ('blas' or 'openmp') loaded in this process.

    One scan of the loaded libraries serves both (again once scikit-learn has loaded its
    OpenMP runtime); the workers' fork server makes it before forking (:mod:`.preload`).
    """
    from threadpoolctl import ThreadpoolController

    state = "sklearn" in sys.modules
    ctl = _THREADPOOLS.get(f"{user_api}:{state}")
    if ctl is None:
        every = ThreadpoolController()
        for api in ("blas", "openmp"):
            _THREADPOOLS[f"{api}:{state}"] = every.select(user_api=api)
        ctl = _THREADPOOLS[f"{user_api}:{state}"]
    return ctl


class _single_thread_blas:
    """One thread for BLAS and OpenMP inside the block.

    Small products and the scatter mixture run faster on one thread, do not fight the
    batch's worker processes or our own second thread, and give the same numbers on every
    machine (an OpenMP reduction's order depends on the thread count). BLAS's limit is
    process-wide, so nested and concurrent blocks share one (set by the first to enter,
    lifted by the last to leave); OpenMP's applies to the calling thread, so each thread
    sets its own. The thread-pool controllers are made once per process (finding the
    libraries costs milliseconds).
    """

    def __enter__(self) -> None:
        self._openmp = None
        try:
            import threadpoolctl  # noqa: F401
        except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
            self._skip = True
            return
        self._skip = False
        with _BLAS_LOCK:
            if _BLAS_LIMIT["depth"] == 0:
                _BLAS_LIMIT["ctx"] = _controller("blas").limit(limits=1)
            _BLAS_LIMIT["depth"] += 1
        depth = getattr(_OPENMP, "depth", 0)
        if depth == 0 or (not getattr(_OPENMP, "sklearn", False) and "sklearn" in sys.modules):
            self._openmp = _controller("openmp").limit(limits=1)
            _OPENMP.sklearn = "sklearn" in sys.modules
        _OPENMP.depth = depth + 1

    def __exit__(self, *exc: object) -> None:
        if self._skip:
            return
        _OPENMP.depth -= 1
        if self._openmp is not None:
            self._openmp.unregister()
            if _OPENMP.depth == 0:
                _OPENMP.sklearn = False
        with _BLAS_LOCK:
            _BLAS_LIMIT["depth"] -= 1
            if _BLAS_LIMIT["depth"] == 0:
                _BLAS_LIMIT["ctx"].unregister()
                _BLAS_LIMIT["ctx"] = None


def prepare(
    sample: FcsSample,
    template: Template,
    *,
    compensation: tuple[tuple[str, ...], np.ndarray] | None = None,
    channel_hints: Mapping[str, str] | None = None,
    extra_markers: tuple[str, ...] = (),
) -> EventData:
    """Resolve the template's markers to channels and set up compensation and transforms.

    ``compensation`` (names, spillover matrix) overrides the template and the file.
    ``channel_hints`` maps a marker to a ``$PnN`` to use when the file does not label it
    (FMO controls often leave the omitted marker's ``$PnS`` empty). ``extra_markers`` are
    the file's own ``$PnS`` labels (``--intensities all``): one that labels exactly one
    channel is that channel, even when the alias table does not know it.

    Raises
    ------
    MarkerError
        A marker is missing or ambiguous.
    CompensationError
        Compensation is required but unavailable, or does not fit the file.
    """
    aliases = template.aliases
    channel_of: dict[str, int] = {}
    for dim in (*template.markers, *extra_markers):
        if dim in channel_of:
            continue
        labelled = [i for i, m in enumerate(sample.markers) if m == dim]
        if dim not in template.markers and len(labelled) == 1:
            channel_of[dim] = labelled[0]  # an extra marker is the file's own $PnS label
            continue
        channel_of[dim] = _find_channel(dim, sample, template, aliases, channel_hints)
    transforms: dict[str, Transform] = {}
    tf = template.transforms
    for dim, col in channel_of.items():
        chan = sample.channels[col]
        override = tf.get(dim) or tf.get(panel.canonical(dim)) or tf.get(chan)
        if override is not None:
            transforms[dim] = override
        elif is_scatter(dim, chan):
            transforms[dim] = tf.get("scatter", Identity())
        else:
            transforms[dim] = tf.get("fluorescence", Logicle())
    data = EventData(sample, template, channel_of, transforms)
    _setup_compensation(data, compensation)
    return data


def _find_channel(dim: str, sample: FcsSample, template: Template, aliases: Mapping[str, tuple[str, ...]],
                  hints: Mapping[str, str] | None) -> int:
    explicit = template.channels.get(dim)
    if explicit is not None:
        if explicit in sample.channels:
            return sample.channels.index(explicit)
        raise MarkerError(f"the template maps {dim!r} to channel {explicit!r}, which the file does not have; "
                          f"the file has: {'; '.join(sample.labels)}", path=sample.path)
    try:
        return panel.resolve_marker(dim, sample.channels, sample.markers, path=sample.path)
    except MarkerError as first:
        for spelling in aliases.get(dim, ()):
            try:
                return panel.resolve_marker(spelling, sample.channels, sample.markers, path=sample.path)
            except MarkerError:
                continue
        if hints and dim in hints and hints[dim] in sample.channels:
            return sample.channels.index(hints[dim])
        raise first


def _setup_compensation(data: EventData, override: tuple[tuple[str, ...], np.ndarray] | None) -> None:
    sample, mode = data.sample, data.template.compensation
    if override is not None:
        names, matrix, source = override[0], override[1], "command line"
    elif mode == "none":
        data.compensation_source = "none"
        return
    elif mode in ("auto", "file"):
        if sample.spillover is None:
            if mode == "file":
                raise CompensationError("the template asks for the file's spillover matrix but the file has no "
                                        "$SPILLOVER/$SPILL keyword", path=sample.path,
                                        hint="give a matrix with --compensation, or set 'compensation: none'")
            fluor = [d for d, c in data.channel_of.items() if not is_scatter(d, sample.channels[c])]
            if fluor:
                data.findings.append(Finding("COMPENSATION_ABSENT",
                                             "the file has no spillover matrix; fluorescence used uncompensated"))
            data.compensation_source = "none"
            return
        names, matrix = sample.spillover
        source = "file"
    else:
        from .transform import compensation_matrix_from_csv

        names, matrix = compensation_matrix_from_csv(mode)
        source = mode
    missing = [n for n in names if n not in sample.channels]
    if missing:
        raise CompensationError(f"the spillover matrix ({source}) names channels the file does not have: "
                                f"{', '.join(missing)}", path=sample.path,
                                hint="use a matrix made for this instrument and panel")
    cols = tuple(sample.channels.index(n) for n in names)
    matrix = np.asarray(matrix, dtype=np.float64)
    try:
        inv = np.linalg.inv(matrix)
    except np.linalg.LinAlgError:
        raise CompensationError(f"the spillover matrix ({source}) is singular and cannot be inverted",
                                path=sample.path, hint="check the matrix values") from None
    if not np.all(np.isfinite(inv)):
        raise CompensationError(f"the spillover matrix ({source}) cannot be inverted", path=sample.path)
    data.spill_columns, data.spill_inverse, data.compensation_source = cols, inv, source


# ---------------------------------------------------------------- results
@dataclass
class GatingResult:
    """Masks per population, the gates as applied, and findings.

    ``index`` maps a population to its sorted event numbers (``np.flatnonzero`` of its
    mask) where gating already had them; :func:`population_index` gives any population's.
    """

    masks: Mapping[str, np.ndarray]
    gates: list[dict[str, Any]]
    findings: list[Finding]
    index: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def release_masks(self) -> None:
        """Keep each population's event numbers and free the masks (one byte per event and population).

        Afterwards ``masks`` still has every population, and a mask is rebuilt from its event
        numbers when asked for, so nothing reading the result sees a difference.
        """
        if isinstance(self.masks, _MasksFromIndex):
            return
        n = next(iter(self.masks.values())).size if self.masks else 0
        for name in self.masks:
            if name != ROOT:
                population_index(self, name)
        self.masks = _MasksFromIndex(self.index, list(self.masks), n)


class _MasksFromIndex(Mapping):
    """Masks made on demand from sorted event numbers (see :meth:`GatingResult.release_masks`)."""

    def __init__(self, index: Mapping[str, np.ndarray], names: list[str], n_events: int) -> None:
        self._index, self._names, self._n = index, names, n_events

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._names:
            raise KeyError(name)
        if name == ROOT:
            return np.ones(self._n, dtype=bool)
        mask = np.zeros(self._n, dtype=bool)
        mask[self._index[name]] = True
        return mask

    def __iter__(self) -> Any:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def population_index(result: GatingResult, name: str) -> np.ndarray:
    """Sorted event numbers of population ``name`` (kept in ``result.index``).

    Raises
    ------
    KeyError
        ``name`` was not gated.
    """
    idx = result.index.get(name)
    if idx is None:
        idx = result.index[name] = np.flatnonzero(result.masks[name])
    return idx


@dataclass(frozen=True)
class FmoValue:
    """A threshold derived from an FMO control."""

    value: float
    sample_id: str
    n_events: int


FmoKey = tuple[str, str]  # (marker, parent population)


class _Populations:
    """Masks, event numbers and per-population transformed values while one sample is gated.

    A gate below the root sees only its parent's events: ``values(dim, parent)`` is
    ``data.values(dim)[masks[parent]]``, computed for those events alone and kept until
    gating ends. The masks are rows of one block (one allocation, faulted in large pages).
    """

    def __init__(self, data: EventData, n_populations: int) -> None:
        self.data = data
        self._block = np.zeros((n_populations + 1, data.n_events), dtype=bool)
        self._rows = iter(self._block)
        root = next(self._rows)
        root.fill(True)
        self.masks: dict[str, np.ndarray] = {ROOT: root}
        self.index: dict[str, np.ndarray | None] = {ROOT: None}  # None: every event
        self._values: dict[tuple[str, str], np.ndarray] = {}
        # the values a gate reads are its parent's: dropped once the parent's last child is gated
        self._last_child = {p.parent: p.name for p in data.template.populations}

    def done(self, name: str) -> None:
        """``name`` is gated: forget the values read for gates below a parent with no children left."""
        for parent, last in self._last_child.items():
            if last == name:
                for key in [k for k in self._values if k[1] == parent]:
                    del self._values[key]

    def events(self, name: str) -> np.ndarray | None:
        """Sorted event numbers of ``name``; None for the root (every event)."""
        if name not in self.index:
            self.index[name] = np.flatnonzero(self.masks[name])
        return self.index[name]

    def size(self, name: str) -> int:
        idx = self.events(name)
        return self.data.n_events if idx is None else int(idx.size)

    def values(self, dim: str, name: str) -> np.ndarray:
        """Transformed ``dim`` of the events of ``name``, in event order."""
        key = (dim, name)
        v = self._values.get(key)
        if v is None:
            idx = self.events(name)
            v = self._values[key] = self.data._column(dim) if idx is None else self.data.values_at(dim, idx)
        return v

    def coordinates(self, dim: str, name: str) -> np.ndarray:
        """:meth:`values`, except that for the root and an untransformed, uncompensated channel it is
        the event matrix's column itself (a strided view, converted to float64 by the reader)."""
        data = self.data
        if (self.events(name) is None and (dim, name) not in self._values and isinstance(data.transforms[dim], Identity)
                and not data._compensated(dim) and dim not in data._raw):
            col = data.channel_of[dim]
            ts = data.sample.time_scale
            return data.sample.column(col) if ts is not None and ts[0] == col else data.sample.matrix[:, col]
        return self.values(dim, name)

    def add(self, name: str, parent: str, selected: np.ndarray, within_parent: bool) -> None:
        """Record ``name``: ``selected`` flags the parent's events (``within_parent``) or every event."""
        pidx = self.events(parent)
        mask = next(self._rows)
        if within_parent and pidx is not None:
            if 3 * pidx.size > mask.size:  # (faster than pidx[selected], whose branches mispredict)
                mask[pidx] = selected
                self.index[name] = np.flatnonzero(mask)
            else:
                idx = self.index[name] = pidx[np.flatnonzero(selected)]
                mask[idx] = True
        else:
            np.logical_and(selected, self.masks[parent], out=mask)
        self.masks[name] = mask


def gate_events(
    data: EventData,
    *,
    fmo: Mapping[FmoKey, FmoValue] | None = None,
    only: set[str] | None = None,
    fmo_available: bool = False,
) -> GatingResult:
    """Apply the template's populations to ``data`` in order.

    Parameters
    ----------
    fmo
        FMO thresholds for this sample's batch and panel, keyed by (marker, parent).
    only
        Compute only these populations (and what they need); used to gate FMO controls.
    fmo_available
        Whether the run has FMO controls at all (changes a missing FMO from a note to a warning).

    Raises
    ------
    ControlMissingError
        A gate needs an FMO that is missing and has no fallback.
    GatingError
        A gate cannot be computed.
    """
    template = data.template
    pops = _Populations(data, len(template.populations))
    gates: list[dict[str, Any]] = []
    findings: list[Finding] = list(data.findings)
    cache: dict[tuple, Any] = {}
    needed = _closure(template, only) if only is not None else None
    with _single_thread_blas():
        data.compensate_in_background()
        for pop in template.populations:
            if needed is not None and pop.name not in needed:
                continue
            selected, within, rows = _apply(pop.gate, pop.name, pop.parent, pops, fmo or {}, cache, findings,
                                            fmo_available)
            pops.add(pop.name, pop.parent, selected, within)
            for r in rows:
                r.setdefault("population", pop.name)
                r.setdefault("parent", pop.parent)
            gates.extend(rows)
            pops.done(pop.name)
            if pops.size(pop.parent) == 0:
                findings.append(Finding("EMPTY_PARENT", f"population {pop.name!r}: parent {pop.parent!r} has no "
                                        "events; count 0 and percentages NaN"))
        data._wait()
    index = {k: v for k, v in pops.index.items() if v is not None}
    return GatingResult(pops.masks, gates, findings, index)


def _closure(template: Template, only: set[str]) -> set[str]:
    need = set(only)
    for pop in reversed(template.populations):
        if pop.name in need:
            need.add(pop.parent)
            if isinstance(pop.gate, BooleanGate):
                need.update(n for n, _ in pop.gate.operands)
    return need


def _row(kind: str, method: str, dims: tuple[str, ...], data: EventData, coords: dict[str, Any],
         **extra: Any) -> dict[str, Any]:
    row = {
        "gate_type": kind,
        "method": method,
        "x_marker": dims[0] if dims else "",
        "x_channel": data.channel(dims[0]) if dims else "",
        "x_transform": _tdesc(data, dims[0]) if dims else "",
        "y_marker": dims[1] if len(dims) > 1 else "",
        "y_channel": data.channel(dims[1]) if len(dims) > 1 else "",
        "y_transform": _tdesc(data, dims[1]) if len(dims) > 1 else "",
        "coordinates": json.dumps(coords, sort_keys=True, default=_num),
        "fmo_sample_id": "",
        "n_fit_events": "",
    }
    row.update(extra)
    return row


def _num(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(type(x))


def _tdesc(data: EventData, dim: str) -> str:
    t = data.transforms[dim]
    params = t.params()
    inner = ",".join(f"{k}={v:g}" for k, v in params.items())
    return f"{t.kind}({inner})" if inner else t.kind


def _apply(gate: Gate, name: str, parent_name: str, pops: _Populations, fmo: Mapping[FmoKey, FmoValue],
           cache: dict, findings: list[Finding], fmo_available: bool) -> tuple[np.ndarray, bool, list[dict[str, Any]]]:
    """One gate: (selected, within_parent, gate rows); ``selected`` flags the parent's events
    when ``within_parent``, else every event."""
    data = pops.data
    if isinstance(gate, RangeGate):
        m = np.ones(pops.size(parent_name), dtype=bool)
        coords = {}
        for d, lo, hi in zip(gate.dims, gate.mins, gate.maxs):
            v = pops.values(d, parent_name)
            if lo is not None:
                m &= v >= lo
            if hi is not None:
                m &= v < hi
            coords[d] = [lo, hi]
        return m, True, [_row("range", "fixed", gate.dims, data, coords)]
    if isinstance(gate, ThresholdGate):
        t, how, extra = _threshold(gate.threshold, parent_name, pops, fmo, cache, findings, name, fmo_available)
        v = pops.values(gate.threshold.marker, parent_name)
        m = v >= t if gate.side == "above" else v < t
        lo, hi = (t, None) if gate.side == "above" else (None, t)
        return m, True, [_row("range", how, gate.dims, data, {gate.threshold.marker: [lo, hi]}, **extra)]
    if isinstance(gate, QuadrantGate):
        tx, how_x, ex = _threshold(gate.x, parent_name, pops, fmo, cache, findings, name, fmo_available)
        ty, how_y, ey = _threshold(gate.y, parent_name, pops, fmo, cache, findings, name, fmo_available)
        vx, vy = pops.values(gate.x.marker, parent_name), pops.values(gate.y.marker, parent_name)
        mx = vx >= tx if gate.quadrant[0] == "+" else vx < tx
        my = vy >= ty if gate.quadrant[1] == "+" else vy < ty
        coords = {"x_divider": tx, "y_divider": ty, "quadrant": gate.quadrant}
        method = how_x if how_x == how_y else f"{how_x}/{how_y}"
        extra = {k: v for k, v in {**ex, **ey}.items() if v != ""}
        return mx & my, True, [_row("quadrant", method, gate.dims, data, coords, **extra)]
    if isinstance(gate, PolygonGate):
        m = _points_in_polygon(gate.vertices, pops.values(gate.x, parent_name), pops.values(gate.y, parent_name))
        return m, True, [_row("polygon", "fixed", gate.dims, data, {"vertices": [list(v) for v in gate.vertices]})]
    if isinstance(gate, EllipseGate):
        m = _points_in_ellipse(pops.coordinates(gate.x, parent_name), pops.coordinates(gate.y, parent_name),
                               np.asarray(gate.center), np.asarray(gate.covariance), gate.distance ** 2)
        return m, True, [_row("ellipse", "fixed", gate.dims, data, {"center": list(gate.center),
                                                                    "covariance": [list(r) for r in gate.covariance],
                                                                    "distance": gate.distance})]
    if isinstance(gate, ScatterGate):
        m, rows = _scatter_gmm(gate, parent_name, pops, findings, name)
        return m, True, rows
    if isinstance(gate, SingletGate):
        m, rows = _singlets(gate, parent_name, pops, findings, name)
        return m, True, rows
    if isinstance(gate, BooleanGate):
        masks = pops.masks
        ops = [(~masks[n] if neg else masks[n]) for n, neg in gate.operands]
        if gate.op == "and":
            m = np.logical_and.reduce(ops)
        elif gate.op == "or":
            m = np.logical_or.reduce(ops)
        else:
            m = ~masks[gate.operands[0][0]]
        expr = {gate.op: [("not " if neg else "") + n for n, neg in gate.operands]}
        return m, False, [_row("boolean", "fixed", (), data, expr)]
    raise GatingError(f"unsupported gate type {type(gate).__name__}")  # pragma: no cover


def _points_in_polygon(vertices: Any, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Winding-rule membership (:func:`flowutils.gating.points_in_polygon`, as FlowKit), point by point."""
    from flowutils.gating import points_in_polygon

    if x.size == 0:
        return np.zeros(0, dtype=bool)
    return points_in_polygon(np.asarray(vertices, dtype=np.float64), np.column_stack([x, y]))


_ELLIPSE_BLOCK = 32768  # rows per block: the temporaries stay in the cache, not 48 MB per 1 M events


def _points_in_ellipse(x: np.ndarray, y: np.ndarray, center: np.ndarray, cov: np.ndarray,
                       distance_square: float) -> np.ndarray:
    """``d^2 <= D^2`` with the arithmetic of :func:`flowutils.gating.points_in_ellipsoid` (FlowKit's).

    The same operations in the same order on the same values (centre subtracted, one
    ``np.dot`` with the inverse covariance, the two products summed), so every event lands
    as there, boundary included; block by block, without the 2-D sum along a short axis.
    ``x`` and ``y`` may be float32 (an event-matrix column): each block is made float64 first.
    """
    n = x.size
    inv = np.linalg.inv(cov)
    out = np.empty(n, dtype=bool)
    size = max(2, min(n, _ELLIPSE_BLOCK))
    pts = np.empty((size + 1, 2), dtype=np.float64)
    rot = np.empty((size + 1, 2), dtype=np.float64)
    d2 = np.empty(size + 1, dtype=np.float64)
    tmp = np.empty(size + 1, dtype=np.float64)
    with _single_thread_blas():  # no waiting for threads on a busy machine
        i = 0
        while i < n:
            m = min(size, n - i)
            if n - i - m == 1:
                m += 1  # never a lone last row (see compensate_columns)
            p, r, d, t = pts[:m], rot[:m], d2[:m], tmp[:m]
            np.copyto(p[:, 0], x[i:i + m])
            np.copyto(p[:, 1], y[i:i + m])
            p -= center
            np.dot(p, inv, out=r)
            np.multiply(r[:, 0], p[:, 0], out=d)
            np.multiply(r[:, 1], p[:, 1], out=t)
            d += t
            np.less_equal(d, distance_square, out=out[i:i + m])
            i += m
    return out


# ---------------------------------------------------------------- thresholds
def _threshold(th: Threshold, parent_name: str, pops: _Populations, fmo: Mapping[FmoKey, FmoValue], cache: dict,
               findings: list[Finding], pop: str, fmo_available: bool) -> tuple[float, str, dict[str, Any]]:
    key = (th, parent_name)
    if key in cache:
        return cache[key]
    data = pops.data
    method = th.method
    extra: dict[str, Any] = {}
    if method == "fmo":
        hit = fmo.get((th.marker, parent_name))
        if hit is not None:
            out = (_clip(th, hit.value), "fmo", {"fmo_sample_id": hit.sample_id, "n_fit_events": hit.n_events})
            cache[key] = out
            return out
        if th.fallback is None:
            raise ControlMissingError(f"population {pop!r} needs an FMO control for {th.marker} "
                                      f"(parent {parent_name!r}) but none is available for this batch and panel",
                                      path=data.sample.path,
                                      hint=f"add an 'FMO:{th.marker}' row to the sample sheet for this batch, "
                                           "or give the gate a 'fallback'")
        method = th.fallback
        findings.append(Finding("FMO_MISSING" if fmo_available else "FMO_NOT_GIVEN",
                                f"population {pop!r}: no FMO control for {th.marker}; threshold set by {method}",
                                "warning" if fmo_available else "info"))
    if method == "fixed":
        out = (float(th.value), "fixed", extra)
    else:
        v = pops.values(th.marker, parent_name)
        extra["n_fit_events"] = int(v.size)
        if v.size < MIN_EVENTS_FOR_THRESHOLD:
            findings.append(Finding("TOO_FEW_EVENTS", f"population {pop!r}: only {v.size} events in "
                                    f"{parent_name!r} to set the {th.marker} threshold; threshold from all events"))
            v = data.values(th.marker)
        t = density_threshold(v, offset=th.offset)
        out = (_clip(th, t), "density", extra)
    cache[key] = out
    return out


def _clip(th: Threshold, t: float) -> float:
    if th.min_value is not None:
        t = max(t, th.min_value)
    if th.max_value is not None:
        t = min(t, th.max_value)
    return float(t)


def fmo_threshold(values: np.ndarray, percentile: float) -> float:
    """The ``percentile`` of an FMO control's (transformed) values in the parent population."""
    if values.size == 0:
        return float("nan")
    return float(np.percentile(values, percentile))


def density_threshold(values: np.ndarray, *, offset: float = 3.0, bins: int = 256) -> float:
    """A principled threshold between negative and positive events on one marker.

    The smoothed histogram's two highest modes, if there are two, give the
    threshold at the lowest density between them (the valley). With one mode,
    it is taken as the negative population: the threshold is ``offset`` robust
    standard deviations above it (the SD estimated from events below the mode).

    The range is the 0.5th to 99.5th percentile (``np.percentile``) and the histogram
    ``np.histogram`` over it; both are read off one sorted copy of the values, with
    numpy's arithmetic, so the threshold is the same to the last bit.
    """
    from scipy.ndimage import gaussian_filter1d
    from scipy.signal import find_peaks

    values = np.asarray(values)
    finite = np.isfinite(values)
    v = values.ravel() if finite.all() else values[finite]
    if v.size == 0:
        return float("nan")
    ordered = np.sort(v) if v.dtype in (np.float64, np.float32) else None
    if ordered is not None:
        lo, hi = percentile_of_sorted(ordered, (0.5, 99.5))
    else:
        lo, hi = np.percentile(v, [0.5, 99.5])
    if hi <= lo:
        return float(hi)
    hist = histogram_of_sorted(ordered, bins, lo, hi) if ordered is not None else None
    counts, edges = hist if hist is not None else np.histogram(v, bins=bins, range=(lo, hi))
    del ordered
    dens = gaussian_filter1d(counts.astype(np.float64), sigma=bins / 100)
    centers = (edges[:-1] + edges[1:]) / 2
    peaks, _ = find_peaks(np.concatenate([[0.0], dens, [0.0]]), prominence=0.05 * dens.max(),
                          height=0.02 * dens.max())
    peaks = peaks - 1
    if len(peaks) >= 2:
        # the valleys between consecutive modes; the lowest-lying one that is nearly as deep as
        # the deepest wins. A mode split into shoulders has a shallow valley and is ignored; of
        # negative | dim | bright, the cut falls between negative and dim.
        peaks = np.sort(peaks)
        valleys = [a + int(np.argmin(dens[a:b + 1])) for a, b in zip(peaks[:-1], peaks[1:])]
        depth = np.array([dens[v] for v in valleys])
        deep_enough = depth <= max(2.0 * depth.min(), depth.min() + 0.02 * dens.max())
        return float(centers[valleys[int(np.flatnonzero(deep_enough)[0])]])
    mode = centers[peaks[0]] if len(peaks) else centers[int(np.argmax(dens))]
    # in event order: a sum's rounding depends on the order of its terms
    below = v[v <= mode]
    if below.size < 5:
        sd = float(np.std(v))
    else:
        sd = float(np.sqrt(np.mean((below - mode) ** 2)))
    return float(mode + offset * sd)


def percentile_of_sorted(ordered: np.ndarray, q: Any) -> np.ndarray:
    """``np.percentile(a, q)`` (method ``'linear'``) from ``ordered = np.sort(a)``, float64 or float32 without NaN.

    numpy's own steps (virtual index ``(n - 1) q``, clipping, ``_lerp``), so the result is
    identical; a sort is faster than the partitions ``np.percentile`` makes.
    """
    quantiles = np.true_divide(np.asarray(q, dtype=np.float64), 100)
    n = ordered.size
    virtual = (n - 1) * quantiles
    prev = np.floor(virtual)
    nxt = prev + 1
    above = virtual >= n - 1
    prev[above] = -1
    nxt[above] = -1
    below = virtual < 0
    prev[below] = 0
    nxt[below] = 0
    prev_i, next_i = prev.astype(np.intp), nxt.astype(np.intp)
    gamma = np.asarray(virtual - prev_i, dtype=virtual.dtype)
    a, b = ordered[prev_i], ordered[next_i]
    diff = b - a
    out = a + diff * gamma
    np.subtract(b, diff * (1 - gamma), out=out, where=gamma >= 0.5)
    return out


def histogram_of_sorted(ordered: np.ndarray, bins: int, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray] | None:
    """``np.histogram(a, bins, range=(lo, hi))`` from ``ordered = np.sort(a)`` (float64 or float32, finite).

    numpy corrects each event's computed bin so that ``edges[i] <= x < edges[i + 1]`` (the
    last bin closed); counting those by binary search on the sorted values gives the same
    counts. None when the bins are so narrow (a few ulp) that the correction might not hold.
    """
    try:
        edges = np.histogram_bin_edges(ordered[:0], bins=bins, range=(lo, hi))
    except ValueError:  # bins narrower than the values' spacing: np.histogram says so itself
        return None
    widths = np.diff(edges)
    if not np.all(widths > 64 * np.spacing(max(abs(float(lo)), abs(float(hi))))):
        return None
    left = np.searchsorted(ordered, edges, side="left")
    counts = np.diff(left)
    counts[-1] = np.searchsorted(ordered, edges[-1], side="right") - left[-2]
    return counts, edges


def median(values: np.ndarray) -> Any:
    """``np.median`` of a 1-D array, from one sort (``np.median`` partitions more slowly); same value."""
    if values.dtype != np.float64 or values.ndim != 1 or values.size == 0:
        return np.median(values)
    return _median_of_sorted(np.sort(values))


def _median_of_sorted(ordered: np.ndarray) -> Any:
    if np.isnan(ordered[-1]):
        return np.float64(np.nan)
    half = ordered.size // 2
    if ordered.size % 2:
        return ordered[half]
    return np.add(ordered[half - 1], ordered[half]) / 2


def median_and_mad(values: np.ndarray) -> tuple[float, float]:
    """``m = float(np.median(v))`` and ``float(np.median(np.abs(v - m)))``, from one sort.

    Over sorted values the deviations fall, then rise (subtraction is monotone), so their
    median is an order statistic of two sorted runs, found by binary search.
    """
    if values.dtype != np.float64 or values.ndim != 1 or values.size == 0:
        med = float(np.median(values))
        return med, float(np.median(np.abs(values - med)))
    ordered = np.sort(values)
    med = float(_median_of_sorted(ordered))
    if np.isnan(med):
        return med, float("nan")
    dev = np.abs(ordered - med)
    split = int(np.searchsorted(ordered, med))
    falling, rising = dev[:split][::-1], dev[split:]
    n = dev.size
    half = n // 2
    if n % 2:
        return med, float(_kth_of_two(falling, rising, half))
    return med, float(np.add(_kth_of_two(falling, rising, half - 1), _kth_of_two(falling, rising, half)) / 2)


def _kth_of_two(a: np.ndarray, b: np.ndarray, k: int) -> Any:
    """The ``k``-th smallest (0-based) of the union of sorted ``a`` and ``b``."""
    lo, hi = max(0, k + 1 - b.size), min(k + 1, a.size)  # i values taken from a
    while lo < hi:
        i = (lo + hi) // 2
        j = k + 1 - i  # values taken from b
        if j > 0 and i < a.size and b[j - 1] > a[i]:
            lo = i + 1  # b's part is too large: take more from a
        else:
            hi = i
    i = lo
    j = k + 1 - i
    if i == 0:
        return b[j - 1]
    if j == 0:
        return a[i - 1]
    return max(a[i - 1], b[j - 1])


# ---------------------------------------------------------------- adaptive scatter gates
def _subsample(idx: np.ndarray, k: int) -> np.ndarray:
    if idx.size <= k:
        return idx
    rng = np.random.default_rng(0)
    return np.sort(rng.choice(idx, size=k, replace=False))


def _subsample_events(pidx: np.ndarray | None, n: int, k: int) -> np.ndarray:
    """:func:`_subsample` of the parent's events; for the root, of ``np.arange(n)`` without building it."""
    if pidx is not None:
        return _subsample(pidx, k)
    if n <= k:
        return np.arange(n)
    rng = np.random.default_rng(0)
    # Generator.choice draws positions from the population size alone, so the draw is that of arange(n)
    return np.sort(rng.choice(n, size=k, replace=False))


def _sklearn_checks_off() -> Any:
    """scikit-learn without re-validating our own (constant) parameters: same numbers, a little faster."""
    import sklearn

    return sklearn.config_context(skip_parameter_validation=True)


def _scatter_gmm(gate: ScatterGate, parent_name: str, pops: _Populations, findings: list[Finding],
                 name: str) -> tuple[np.ndarray, list[dict[str, Any]]]:
    from scipy.stats import chi2
    from sklearn.mixture import GaussianMixture

    data = pops.data
    size = pops.size(parent_name)
    if size < gate.components * 10:
        raise GatingError(f"population {name!r}: only {size} events to fit the scatter gate",
                          path=data.sample.path, hint="check that the file holds cells")
    sub = _subsample_events(pops.events(parent_name), data.n_events, gate.max_events)
    pts = np.column_stack([data.values_at(gate.x, sub), data.values_at(gate.y, sub)])
    scale = np.maximum(np.percentile(np.abs(pts), 99, axis=0), 1e-9)
    with _single_thread_blas(), _sklearn_checks_off():
        gmm = GaussianMixture(n_components=gate.components, covariance_type="full", random_state=0, n_init=1,
                              reg_covar=1e-4).fit(pts / scale)
    means = gmm.means_ * scale
    w = gmm.weights_
    if gate.select == "largest":
        k = int(np.argmax(w))
    else:
        # lymphocytes: low side scatter for their size. Among components holding >= 5% of
        # events, the lowest SSC/FSC ratio; of those within 15% of that ratio, the smallest
        # (lymphocyte doublets share the ratio at twice the size).
        ok = np.flatnonzero(w >= 0.05)
        ok = ok[means[ok, 0] > 0]
        if ok.size == 0:
            ok = np.arange(len(w))
        ratio = means[ok, 1] / np.maximum(means[ok, 0], 1e-9)
        close = ok[ratio <= ratio.min() * 1.15]
        k = int(close[np.argmin(means[close, 0])])
    # a population the mixture split in two (e.g. T and NK cells, slightly different in size)
    # is merged back: every component whose centre lies inside the chosen one's 95% ellipse
    # joins it, and the gate is the moment-matched ellipse of the union
    members = _merge_close(gmm, k)
    mw = gmm.weights_[members] / gmm.weights_[members].sum()
    mu = (mw[:, None] * gmm.means_[members]).sum(axis=0)
    diffs = gmm.means_[members] - mu
    sigma = sum(wi * (gmm.covariances_[j] + np.outer(d, d)) for wi, j, d in zip(mw, members, diffs))
    coverage = gate.quantile
    if coverage is None:
        with _single_thread_blas(), _sklearn_checks_off():
            coverage = _auto_coverage(gmm, pts / scale, members, mu, sigma)
    dist = float(np.sqrt(chi2.ppf(coverage, 2)))
    center, cov = mu * scale, sigma * np.outer(scale, scale)
    m = _points_in_ellipse(pops.coordinates(gate.x, parent_name), pops.coordinates(gate.y, parent_name), center, cov,
                           dist ** 2)
    coords = {"center": [float(c) for c in center], "covariance": [[float(a) for a in r] for r in cov],
              "distance": dist, "coverage": float(coverage), "component_weight": float(w[members].sum()),
              "merged_components": int(len(members)),
              "components": int(gate.components)}
    return m, [_row("ellipse", "gmm", gate.dims, data, coords, n_fit_events=int(sub.size))]


COVERAGES = (0.999, 0.995, 0.99, 0.98, 0.97, 0.95, 0.9, 0.85, 0.8)
MAX_CONTAMINATION = 0.01


def _merge_close(gmm: Any, k: int) -> list[int]:
    """Component ``k`` and every other whose centre lies inside k's 95% ellipse."""
    from scipy.stats import chi2

    lim = chi2.ppf(0.95, 2)
    out = [k]
    for j in range(len(gmm.weights_)):
        if j != k and _mahalanobis2(gmm.means_[j][None, :], gmm.means_[k], gmm.covariances_[k])[0] <= lim:
            out.append(j)
    return sorted(out)


def _auto_coverage(gmm: Any, pts: np.ndarray, members: list[int], mu: np.ndarray, sigma: np.ndarray) -> float:
    """The widest ellipse whose fitted events are at most 1% from other mixture components.

    Inside each candidate ellipse, an event counts as contamination when the mixture assigns
    it to a component outside ``members``; the widest coverage meeting the limit wins (else
    the narrowest).
    """
    from scipy.stats import chi2

    foreign = ~np.isin(gmm.predict(pts), members)
    d2 = _mahalanobis2(pts, mu, sigma)
    for q in COVERAGES:
        inside = d2 <= chi2.ppf(q, 2)
        if inside.any() and foreign[inside].mean() <= MAX_CONTAMINATION:
            return q
    return COVERAGES[-1]


def _mahalanobis2(pts: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    diff = pts - mean
    return np.einsum("ij,jk,ik->i", diff, np.linalg.inv(cov), diff)


def _singlets(gate: SingletGate, parent_name: str, pops: _Populations, findings: list[Finding],
              name: str) -> tuple[np.ndarray, list[dict[str, Any]]]:
    h, a = pops.values(gate.height, parent_name), pops.values(gate.area, parent_name)
    positive = h > 0
    n_fit = int(np.count_nonzero(positive))
    if n_fit < MIN_EVENTS_FOR_THRESHOLD:
        raise GatingError(f"population {name!r}: too few events with positive {gate.height} to find singlets",
                          path=pops.data.sample.path)
    hp, ap = (h, a) if n_fit == h.size else (h[positive], a[positive])
    med, mad = median_and_mad(ap / hp)
    mad = float(1.4826 * mad)
    lo, hi = max(med - gate.mads * mad, 0.0), med + gate.mads * mad
    hmax = float(2 * np.max(hp))
    vertices = [[0.0, 0.0], [hmax, lo * hmax], [hmax, hi * hmax]]
    m = _points_in_polygon(vertices, h, a)
    coords = {"vertices": vertices, "ratio_median": med, "ratio_low": lo, "ratio_high": hi}
    return m, [_row("polygon", "ratio", gate.dims, pops.data, coords, n_fit_events=n_fit)]
