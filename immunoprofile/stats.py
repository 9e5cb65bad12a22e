"""Counts, frequencies and intensities of gated populations -> tidy rows.

Column meanings are documented in README.md ("Output"). Percentages of an empty
parent are NaN (never a division by zero); the gating step records a finding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .gating import EventData, GatingResult
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
    counts = {name: int(m.sum()) for name, m in result.masks.items()}
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
    the transform of the raw one.
    """
    template = data.template
    tcols = _template_cols(template)
    rows = []
    for pop in template.populations:
        mask = result.masks.get(pop.name)
        if mask is None:
            continue
        n = int(mask.sum())
        for mk in markers:
            t = data.transforms[mk]
            if n:
                qs = np.percentile(data.raw(mk)[mask], _QS, method="inverted_cdf")
                med_r, rcv_r = _median_rcv(qs)
                med_t, rcv_t = _median_rcv(t.apply(qs))
            else:
                med_r = rcv_r = med_t = rcv_t = math.nan
            rows.append({
                "sample_id": sample_id, "population": pop.name, "marker": mk, "channel": data.channel(mk),
                "count": n, "median_raw": med_r, "rcv_raw": rcv_r, "median_transformed": med_t,
                "rcv_transformed": rcv_t, "transform": t.kind, **tcols,
            })
    return rows


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
