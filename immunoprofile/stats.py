"""Counts, frequencies and intensities of gated populations -> tidy rows.

Column meanings are documented in README.md ("Output"). Percentages of an empty
parent are NaN (never a division by zero); the gating step records a finding.

Intensities need three quantiles of every marker in every population. Instead of one
partition per population and marker, :class:`PopulationQuantiles` splits the events of
all populations once into *atoms* (events with the same memberships), counts each
marker's values per atom in a few thousand value buckets (one ``np.bincount``), finds
for every population and quantile the bucket holding the wanted order statistic, and
selects it among that bucket's few events. The values are exactly those of
``np.percentile(..., method='inverted_cdf')`` (``tests/test_stats.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .gating import EventData, GatingResult, _single_thread_blas, population_index, worker_threads
from .templates import ROOT, Template

POPULATION_COLUMNS = [
    "sample_id", "file", "patient_id", "timepoint", "day", "group", "panel", "batch", "control",
    "population", "parent", "count", "parent_count", "pct_parent", "reference", "pct_of", "cells_per_ul",
    "template", "template_version", "template_sha256", "file_sha256",
]
INTENSITY_COLUMNS = [
    "sample_id", "population", "marker", "channel", "count",
    "median_raw", "rcv_raw", "median_transformed", "rcv_transformed", "transform",
    "template", "template_version", "template_sha256",
]
GATE_COLUMNS = [
    "sample_id", "population", "parent", "gate_type", "method", "x_marker", "x_channel", "x_transform",
    "y_marker", "y_channel", "y_transform", "coordinates", "fmo_sample_id", "n_fit_events",
    "template", "template_version", "template_sha256",
]

# FlowJo's robust CV: half the spread between the 15.87th and 84.13th percentiles, over the median
_RCV_Q = (15.865525393145708, 84.13447460685429)
# Quantiles are observations (inverted CDF), so the transformed median is exactly the
# transform of the raw median (transforms are monotone) and is computed once.
_QS = (_RCV_Q[0], 50.0, _RCV_Q[1])


def _pct(num: int, den: int) -> float:
    return 100.0 * num / den if den > 0 else math.nan


def _template_cols(t: Template) -> dict[str, str]:
    return {"template": t.name, "template_version": t.version, "template_sha256": t.sha256}


def population_rows(
    result: GatingResult,
    template: Template,
    meta: Mapping[str, Any],
    file_sha256: str,
    extra: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """One row per population of ``template`` for one sample.

    ``cells_per_ul`` comes from the template's counting beads when present, else from a
    ``lymphocytes_per_ul`` sheet column (scaled by the ``lymphocytes`` population), else NaN.
    """
    counts = {name: int(np.count_nonzero(m)) for name, m in result.masks.items()}
    counts.setdefault(ROOT, 0)
    scale = _absolute_scale(template, counts, meta)
    base = {k: meta.get(k, "") for k in POPULATION_COLUMNS[:9]}
    tcols = _template_cols(template)
    rows = []
    for pop in template.populations:
        if pop.name not in counts:
            continue
        c, pc, rc = counts[pop.name], counts[pop.parent], counts[pop.reference]
        row = dict(base)
        row.update({
            "population": pop.name, "parent": pop.parent, "count": c, "parent_count": pc,
            "pct_parent": _pct(c, pc), "reference": pop.reference, "pct_of": _pct(c, rc),
            "cells_per_ul": c * scale if scale is not None else math.nan,
            **tcols, "file_sha256": file_sha256,
        })
        for e in extra:
            row[e] = meta.get(e, "")
        rows.append(row)
    return rows


def _absolute_scale(template: Template, counts: Mapping[str, int], meta: Mapping[str, Any]) -> float | None:
    beads = template.beads
    if beads:
        nb = counts.get(beads["population"], 0)
        if nb > 0:
            return beads["beads_per_test"] / nb / beads["volume_ul"]
        return None
    lym = str(meta.get("lymphocytes_per_ul", "") or "").strip()
    if lym and counts.get("lymphocytes", 0) > 0:
        try:
            return float(lym) / counts["lymphocytes"]
        except ValueError:
            return None
    return None


def intensity_rows(
    result: GatingResult,
    data: EventData,
    markers: Sequence[str],
    sample_id: str,
) -> list[dict[str, Any]]:
    """Median and robust CV of each marker per population, compensated, raw and transformed.

    Quantiles are taken as observations (numpy ``method='inverted_cdf'``): for an even
    count the median is the lower middle event, and the transformed median is exactly
    the transform of the raw one. A quantile equal to zero is written as ``0.0``.

    Raises
    ------
    KeyError
        A marker is not one of ``data``'s dimensions.
    """
    template = data.template
    tcols = _template_cols(template)
    names = [pop.name for pop in template.populations if pop.name in result.masks]
    index = {name: population_index(result, name) for name in names}
    columns = {mk: data.raw(mk) for mk in markers}
    # below a single population under the root lies every other one
    tops = [pop.name for pop in template.populations if pop.parent == ROOT]
    universe = index[tops[0]] if len(tops) == 1 and tops[0] in index else None
    quantiles = PopulationQuantiles(index, data.n_events, universe)
    per_marker = {}
    with _single_thread_blas():
        threads = min(worker_threads(), len(markers))
        if threads > 1:  # markers are independent; numpy releases the GIL in the passes over events
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(threads, thread_name_prefix="immunoprofile-quantiles") as pool:
                raws = list(pool.map(lambda mk: quantiles.quantiles(columns[mk], _QS), markers))
        else:
            raws = [quantiles.quantiles(columns[mk], _QS) for mk in markers]
        for mk, raw in zip(markers, raws):
            transformed = data.transforms[mk].apply(raw.reshape(-1)).reshape(raw.shape)
            per_marker[mk] = (raw, transformed)
    rows = []
    for i, name in enumerate(names):
        n = int(index[name].size)
        for mk in markers:
            t = data.transforms[mk]
            if n:
                raw, transformed = per_marker[mk]
                med_r, rcv_r = _median_rcv(raw[i])
                med_t, rcv_t = _median_rcv(transformed[i])
            else:
                med_r = rcv_r = med_t = rcv_t = math.nan
            rows.append({
                "sample_id": sample_id, "population": name, "marker": mk, "channel": data.channel(mk),
                "count": n, "median_raw": med_r, "rcv_raw": rcv_r, "median_transformed": med_t,
                "rcv_transformed": rcv_t, "transform": t.kind, **tcols,
            })
    return rows


def inverted_cdf_ranks(n: int, q: Sequence[float]) -> np.ndarray:
    """0-based ranks of the observations ``np.percentile(a, q, method='inverted_cdf')`` returns for ``a.size == n``.

    numpy's own arithmetic: virtual index ``n q / 100 - 1``, rounded up unless whole, at least 0.
    """
    quantiles = np.true_divide(np.asarray(q, dtype=np.float64), 100)
    virtual = n * quantiles - 1
    prev = np.floor(virtual)
    ranks = np.where(virtual - prev == 0, prev, prev + 1).astype(np.intp)
    ranks[ranks < 0] = 0
    return ranks


# value buckets: the float32 exponent and top 7 mantissa bits of |x| (1/128 of an octave),
# |x| < 1 in one bucket, |x| >= 2**24 in the last; negative values mirrored below
_BUCKET_SHIFT = 16
_BUCKET_ONE = 0x3F80  # float32 bits of 1.0 >> 16
_BUCKET_TOP = 0x4B80 - _BUCKET_ONE  # 2**24
_N_BUCKETS = 2 * _BUCKET_TOP + 1
_SMALL = 2048  # populations up to this size: one partition of their own values


def _buckets(values: np.ndarray) -> np.ndarray:
    """Bucket number (int16) of each value, non-decreasing in the value, so ranks fall in order.

    ``-0.0`` and ``+0.0`` share a bucket; NaN must be handled before.
    """
    mag = np.abs(values, out=np.empty(values.shape, dtype=np.float32), casting="unsafe").view(np.int32)
    np.right_shift(mag, _BUCKET_SHIFT, out=mag)
    mag -= _BUCKET_ONE
    np.clip(mag, 0, _BUCKET_TOP, out=mag)
    out = mag.astype(np.int16)
    flip = -(values < 0).view(np.int8).astype(np.int16)  # -1 for negative values, else 0
    out ^= flip
    out -= flip  # two's complement: negated where flip is -1 (np.where is slower here)
    out += _BUCKET_TOP
    return out


class PopulationQuantiles:
    """Exact order statistics of one column within many (nested, overlapping) populations.

    Parameters
    ----------
    index
        Population name -> sorted event numbers.
    n_events
        Events in the sample.
    universe
        Sorted event numbers holding every population's events (e.g. the one population
        below the root), if known: then only those events are looked at.
    """

    def __init__(self, index: Mapping[str, np.ndarray], n_events: int,
                 universe: np.ndarray | None = None) -> None:
        self.names = list(index)
        self.index = index
        self.sizes = [int(index[k].size) for k in self.names]
        self.events, self.atom, self.members = _atoms([index[k] for k in self.names], n_events, universe)
        self.weights = np.ascontiguousarray(self.members.T, dtype=np.float64)  # (populations, atoms)
        self.joint_base = self.atom * _N_BUCKETS
        self.n_atoms = self.members.shape[0]

    def quantiles(self, column: np.ndarray, q: Sequence[float]) -> np.ndarray:
        """``np.percentile(column[idx], q, method='inverted_cdf')`` for every population, stacked.

        Rows follow the populations' order; an empty population's row is NaN. Zero is +0.0.
        """
        out = np.full((len(self.names), len(q)), np.nan)
        values = column[self.events]
        if np.isnan(values).any():  # numpy's NaN rule: any NaN makes every quantile NaN
            for i, name in enumerate(self.names):
                if self.sizes[i]:
                    out[i] = np.percentile(column[self.index[name]], q, method="inverted_cdf")
            return out + 0.0
        targets: list[tuple[int, int, int]] = []  # (population, quantile, rank)
        for i, name in enumerate(self.names):
            n = self.sizes[i]
            if n == 0:
                continue
            ranks = inverted_cdf_ranks(n, q)
            if n <= _SMALL:
                own = column[self.index[name]]
                own.partition(ranks)
                out[i] = own[ranks]
            else:
                targets.extend((i, j, int(r)) for j, r in enumerate(ranks))
        if targets:
            self._select(values, np.array(targets, dtype=np.intp), out)
        return out + 0.0

    def _select(self, values: np.ndarray, targets: np.ndarray, out: np.ndarray) -> None:
        """Fill ``out[pop, j]`` with the ``rank``-th smallest value of the population, for each target row."""
        bucket = _buckets(values)
        first, last = int(bucket.min()), int(bucket.max())
        hist = np.bincount(self.joint_base + bucket, minlength=self.n_atoms * _N_BUCKETS)
        hist = hist.reshape(self.n_atoms, _N_BUCKETS)[:, first:last + 1]
        pops, rows = np.unique(targets[:, 0], return_inverse=True)
        cumulative = np.cumsum(self.weights[pops] @ hist.astype(np.float64), axis=1)[rows]
        ranks = targets[:, 2]
        # the bucket holding each wanted rank, and the rank within it
        where = np.count_nonzero(cumulative <= ranks[:, None], axis=1)
        before = np.where(where > 0, cumulative[np.arange(len(targets)), np.maximum(where - 1, 0)], 0)
        within = ranks - before.astype(np.intp)
        wanted = np.zeros(_N_BUCKETS, dtype=bool)
        wanted[where + first] = True
        cand = np.flatnonzero(np.take(wanted, bucket))
        cand_bucket = bucket[cand]
        order = np.argsort(cand_bucket, kind="stable")
        cand = cand[order]
        cand_bucket = cand_bucket[order]
        cand_atom = self.atom[cand]
        cand_values = values[cand]
        bounds = np.searchsorted(cand_bucket, np.stack([where + first, where + first + 1]))
        for (i, j, _), lo, hi, r in zip(targets.tolist(), bounds[0].tolist(), bounds[1].tolist(), within.tolist()):
            pool = cand_values[lo:hi][self.members[cand_atom[lo:hi], i]]
            pool.partition(r)
            out[i, j] = pool[r]


def _atoms(index: Sequence[np.ndarray], n_events: int,
           universe: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label events by their set of populations.

    Returns the events in any population (sorted event numbers), each one's atom number,
    and the (atoms, populations) membership table. Populations are taken
    :data:`_ATOM_BITS` at a time: each sets its bit in an event's key, and the keys
    present are renumbered. The first ones set their bits by event number, so that only
    the key, not every population, is moved into the universe's positions.
    """
    n = n_events if universe is None else universe.size
    where = None  # event number -> position in the universe, for later groups
    atom = None
    members = np.zeros((1, 0), dtype=bool)
    for start in range(0, len(index), _ATOM_BITS):
        chunk = index[start:start + _ATOM_BITS]
        width = len(chunk)
        whole = sum(1 << bit for bit, idx in enumerate(chunk) if idx.size == n)  # every event (in the universe)
        if atom is None:
            key = np.zeros(n_events, dtype=np.intp)
            for bit, idx in enumerate(chunk):
                if idx.size != n:
                    np.add.at(key, idx, 1 << bit)
            if universe is not None:
                key = key[universe]
        else:
            if universe is not None and where is None:
                where = np.empty(n_events, dtype=np.intp)
                where[universe] = np.arange(n)
            key = atom << width
            for bit, idx in enumerate(chunk):
                if idx.size != n:
                    np.add.at(key, idx if where is None else where[idx], 1 << bit)
        if whole:
            key += whole
        span = members.shape[0] << width
        if span <= 1 << 22:
            present = np.flatnonzero(np.bincount(key, minlength=span))
            lut = np.zeros(span, dtype=np.intp)
            lut[present] = np.arange(present.size)
            atom = lut[key]
        else:
            present, atom = np.unique(key, return_inverse=True)
            atom = atom.astype(np.intp, copy=False)
        del key
        bits = (present[:, None] >> np.arange(width)) & 1
        members = np.concatenate([members[present >> width], bits.astype(bool)], axis=1)
    if atom is None:  # no populations
        atom = np.zeros(n, dtype=np.intp)
    inside = members.any(axis=1)
    if universe is not None and inside.all():
        return universe, atom, members
    events = np.flatnonzero(inside[atom])
    if universe is not None:
        return universe[events], atom[events], members
    return events, atom[events], members


_ATOM_BITS = 18  # populations per group: the first group's key table has 2**18 entries


def _median_rcv(q: np.ndarray) -> tuple[float, float]:
    """Median and robust CV from the (P15.87, P50, P84.13) quantiles."""
    lo, med, hi = (float(x) for x in q)
    rcv = 100.0 * 0.5 * (hi - lo) / abs(med) if med != 0 else math.nan
    return med, rcv


def gate_rows(result: GatingResult, template: Template, sample_id: str) -> list[dict[str, Any]]:
    """The gates as applied to one sample, in ``GATE_COLUMNS`` order."""
    tcols = _template_cols(template)
    out = []
    for g in result.gates:
        row = {"sample_id": sample_id, **g, **tcols}
        out.append({k: row.get(k, "") for k in GATE_COLUMNS})
    return out
