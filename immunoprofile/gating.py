"""Fixed and data-driven gates -> per-population event membership.

:class:`EventData` holds one sample's events for one template: it finds the
channel of every marker, compensates and transforms columns on demand. 
:func:`gate_events` applies a template's populations in order and returns a
boolean mask per population plus the coordinates every gate actually used
(``gates.csv``), so data-driven gates can be audited and reproduced.

Boundary rules follow Gating-ML 2.0 and FlowKit: a range keeps ``min <= x < max``;
a threshold ``above`` keeps ``x >= t`` and ``below`` keeps ``x < t``; a quadrant's
divider belongs to its positive side; polygons use the winding rule and ellipses
keep ``d^2 <= D^2`` (both via :mod:`flowutils.gating`, as FlowKit does).
"""

from __future__ import annotations

import json
import logging
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
                self._compensate_all()
            else:
                self._raw[dim] = self.sample.events[:, col].astype(np.float64)
        return self._raw[dim]

    def _compensate_all(self) -> None:
        """Compensate, in one pass over the events, every needed dimension that the matrix covers."""
        dims = [d for d, c in self.channel_of.items() if c in self.spill_columns and d not in self._raw]
        if not dims:
            return
        ks = [self.spill_columns.index(self.channel_of[d]) for d in dims]
        out = compensate_columns(self.sample.events, self.spill_columns, self.spill_inverse[:, ks])
        for j, d in enumerate(dims):
            self._raw[d] = out[:, j]

    def values(self, dim: str) -> np.ndarray:
        """Compensated, transformed values of ``dim`` (the units gates are written in)."""
        if dim not in self._tf:
            t = self.transforms[dim]
            self._tf[dim] = self.raw(dim) if isinstance(t, Identity) else t.apply(self.raw(dim))
        return self._tf[dim]


def compensate_columns(events: np.ndarray, columns: tuple[int, ...], inverse_cols: np.ndarray,
                       block: int = 65536) -> np.ndarray:
    """``events[:, columns] @ inverse_cols`` in float64, block by block (no full-matrix copies).

    Returns a Fortran-ordered ``(n_events, k)`` array, so each column is contiguous.
    """
    n = events.shape[0]
    k = inverse_cols.shape[1]
    out = np.empty((n, k), dtype=np.float64, order="F")
    cols = np.asarray(columns)
    inv = np.ascontiguousarray(inverse_cols, dtype=np.float64)
    with _single_thread_blas():
        for i in range(0, n, block):
            out[i:i + block] = events[i:i + block][:, cols].astype(np.float64) @ inv
    return out


class _single_thread_blas:
    """Small products run faster on one BLAS thread, and do not fight the batch's worker processes."""

    def __enter__(self) -> None:
        try:
            from threadpoolctl import threadpool_limits

            self._ctx = threadpool_limits(1, user_api="blas")
        except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
            self._ctx = None

    def __exit__(self, *exc: object) -> None:
        if self._ctx is not None:
            self._ctx.unregister()


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
    (FMO controls often leave the omitted marker's ``$PnS`` empty).

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
    """Masks per population, the gates as applied, and findings."""

    masks: dict[str, np.ndarray]
    gates: list[dict[str, Any]]
    findings: list[Finding]


@dataclass(frozen=True)
class FmoValue:
    """A threshold derived from an FMO control."""

    value: float
    sample_id: str
    n_events: int


FmoKey = tuple[str, str]  # (marker, parent population)


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
    n = data.n_events
    masks: dict[str, np.ndarray] = {ROOT: np.ones(n, dtype=bool)}
    gates: list[dict[str, Any]] = []
    findings: list[Finding] = list(data.findings)
    cache: dict[tuple, float] = {}
    needed = _closure(template, only) if only is not None else None
    for pop in template.populations:
        if needed is not None and pop.name not in needed:
            continue
        parent = masks[pop.parent]
        mask, rows = _apply(pop.gate, pop.name, pop.parent, parent, masks, data, fmo or {}, cache, findings,
                            fmo_available)
        masks[pop.name] = mask & parent
        for r in rows:
            r.setdefault("population", pop.name)
            r.setdefault("parent", pop.parent)
        gates.extend(rows)
        if not parent.any():
            findings.append(Finding("EMPTY_PARENT", f"population {pop.name!r}: parent {pop.parent!r} has no events; "
                                    "count 0 and percentages NaN"))
    return GatingResult(masks, gates, findings)


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


def _apply(gate: Gate, name: str, parent_name: str, parent: np.ndarray, masks: dict[str, np.ndarray],
           data: EventData, fmo: Mapping[FmoKey, FmoValue], cache: dict, findings: list[Finding],
           fmo_available: bool) -> tuple[np.ndarray, list[dict[str, Any]]]:
    if isinstance(gate, RangeGate):
        m = np.ones(data.n_events, dtype=bool)
        coords = {}
        for d, lo, hi in zip(gate.dims, gate.mins, gate.maxs):
            v = data.values(d)
            if lo is not None:
                m &= v >= lo
            if hi is not None:
                m &= v < hi
            coords[d] = [lo, hi]
        return m, [_row("range", "fixed", gate.dims, data, coords)]
    if isinstance(gate, ThresholdGate):
        t, how, extra = _threshold(gate.threshold, parent_name, parent, data, fmo, cache, findings, name, fmo_available)
        v = data.values(gate.threshold.marker)
        m = v >= t if gate.side == "above" else v < t
        lo, hi = (t, None) if gate.side == "above" else (None, t)
        return m, [_row("range", how, gate.dims, data, {gate.threshold.marker: [lo, hi]}, **extra)]
    if isinstance(gate, QuadrantGate):
        tx, how_x, ex = _threshold(gate.x, parent_name, parent, data, fmo, cache, findings, name, fmo_available)
        ty, how_y, ey = _threshold(gate.y, parent_name, parent, data, fmo, cache, findings, name, fmo_available)
        vx, vy = data.values(gate.x.marker), data.values(gate.y.marker)
        mx = vx >= tx if gate.quadrant[0] == "+" else vx < tx
        my = vy >= ty if gate.quadrant[1] == "+" else vy < ty
        coords = {"x_divider": tx, "y_divider": ty, "quadrant": gate.quadrant}
        method = how_x if how_x == how_y else f"{how_x}/{how_y}"
        extra = {k: v for k, v in {**ex, **ey}.items() if v != ""}
        return mx & my, [_row("quadrant", method, gate.dims, data, coords, **extra)]
    if isinstance(gate, PolygonGate):
        from flowutils.gating import points_in_polygon

        pts = np.column_stack([data.values(gate.x), data.values(gate.y)])
        m = points_in_polygon(np.asarray(gate.vertices, dtype=np.float64), pts)
        return m, [_row("polygon", "fixed", gate.dims, data, {"vertices": [list(v) for v in gate.vertices]})]
    if isinstance(gate, EllipseGate):
        return _ellipse_mask(data, gate.x, gate.y, np.asarray(gate.center), np.asarray(gate.covariance),
                             gate.distance), [
            _row("ellipse", "fixed", gate.dims, data, {"center": list(gate.center),
                                                       "covariance": [list(r) for r in gate.covariance],
                                                       "distance": gate.distance})]
    if isinstance(gate, ScatterGate):
        return _scatter_gmm(gate, parent, data, findings, name)
    if isinstance(gate, SingletGate):
        return _singlets(gate, parent, data, findings, name)
    if isinstance(gate, BooleanGate):
        ops = [(~masks[n] if neg else masks[n]) for n, neg in gate.operands]
        if gate.op == "and":
            m = np.logical_and.reduce(ops)
        elif gate.op == "or":
            m = np.logical_or.reduce(ops)
        else:
            m = ~masks[gate.operands[0][0]]
        expr = {gate.op: [("not " if neg else "") + n for n, neg in gate.operands]}
        return m, [_row("boolean", "fixed", (), data, expr)]
    raise GatingError(f"unsupported gate type {type(gate).__name__}")  # pragma: no cover


def _ellipse_mask(data: EventData, x: str, y: str, center: np.ndarray, cov: np.ndarray, distance: float) -> np.ndarray:
    from flowutils.gating import points_in_ellipsoid

    pts = np.column_stack([data.values(x), data.values(y)])
    return points_in_ellipsoid(cov, center, distance ** 2, pts)


# ---------------------------------------------------------------- thresholds
def _threshold(th: Threshold, parent_name: str, parent: np.ndarray, data: EventData,
               fmo: Mapping[FmoKey, FmoValue], cache: dict, findings: list[Finding], pop: str,
               fmo_available: bool) -> tuple[float, str, dict[str, Any]]:
    key = (th, parent_name)
    if key in cache:
        return cache[key]
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
        v = data.values(th.marker)[parent]
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
    """
    from scipy.ndimage import gaussian_filter1d
    from scipy.signal import find_peaks

    v = values[np.isfinite(values)]
    if v.size == 0:
        return float("nan")
    lo, hi = np.percentile(v, [0.5, 99.5])
    if hi <= lo:
        return float(hi)
    counts, edges = np.histogram(v, bins=bins, range=(lo, hi))
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
    below = v[v <= mode]
    if below.size < 5:
        sd = float(np.std(v))
    else:
        sd = float(np.sqrt(np.mean((below - mode) ** 2)))
    return float(mode + offset * sd)


# ---------------------------------------------------------------- adaptive scatter gates
def _subsample(idx: np.ndarray, k: int) -> np.ndarray:
    if idx.size <= k:
        return idx
    rng = np.random.default_rng(0)
    return np.sort(rng.choice(idx, size=k, replace=False))


def _scatter_gmm(gate: ScatterGate, parent: np.ndarray, data: EventData, findings: list[Finding],
                 name: str) -> tuple[np.ndarray, list[dict[str, Any]]]:
    from scipy.stats import chi2
    from sklearn.mixture import GaussianMixture

    idx = np.flatnonzero(parent)
    if idx.size < gate.components * 10:
        raise GatingError(f"population {name!r}: only {idx.size} events to fit the scatter gate",
                          path=data.sample.path, hint="check that the file holds cells")
    sub = _subsample(idx, gate.max_events)
    x, y = data.values(gate.x), data.values(gate.y)
    pts = np.column_stack([x[sub], y[sub]])
    scale = np.maximum(np.percentile(np.abs(pts), 99, axis=0), 1e-9)
    with _single_thread_blas():
        gmm = GaussianMixture(n_components=gate.components, covariance_type="full", random_state=0, n_init=1,
                              reg_covar=1e-4).fit(pts / scale)
    means = gmm.means_ * scale
    covs = gmm.covariances_ * np.outer(scale, scale)
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
        coverage = _auto_coverage(gmm, pts / scale, members, mu, sigma)
    dist = float(np.sqrt(chi2.ppf(coverage, 2)))
    center, cov = mu * scale, sigma * np.outer(scale, scale)
    m = _ellipse_mask(data, gate.x, gate.y, center, cov, dist)
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


def _singlets(gate: SingletGate, parent: np.ndarray, data: EventData, findings: list[Finding],
              name: str) -> tuple[np.ndarray, list[dict[str, Any]]]:
    from flowutils.gating import points_in_polygon

    h, a = data.values(gate.height), data.values(gate.area)
    sel = parent & (h > 0)
    if sel.sum() < MIN_EVENTS_FOR_THRESHOLD:
        raise GatingError(f"population {name!r}: too few events with positive {gate.height} to find singlets",
                          path=data.sample.path)
    r = a[sel] / h[sel]
    med = float(np.median(r))
    mad = float(1.4826 * np.median(np.abs(r - med)))
    lo, hi = max(med - gate.mads * mad, 0.0), med + gate.mads * mad
    hmax = float(2 * np.max(h[sel]))
    vertices = [[0.0, 0.0], [hmax, lo * hmax], [hmax, hi * hmax]]
    m = points_in_polygon(np.asarray(vertices), np.column_stack([h, a]))
    coords = {"vertices": vertices, "ratio_median": med, "ratio_low": lo, "ratio_high": hi}
    return m, [_row("polygon", "ratio", gate.dims, data, coords, n_fit_events=int(sel.sum()))]
