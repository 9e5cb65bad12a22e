"""Shaping a populations table for comparisons: measures, samples per visit, exclusions.

A comparison needs, per panel, one value per population x patient x timepoint.
:func:`panel_arrays` builds them as numpy arrays together with the reason why a
value is missing, so every patient left out of a test can be listed with that
reason (never silently dropped):

* patient level: no sample at a timepoint, several samples at a timepoint (the
  sheet must say which one counts), or the measure is not available for the
  sample at all (e.g. ``cells_per_ul`` without a blood count);
* population level: the population has no row in the sample, or its value is
  undefined there (e.g. ``pct_parent`` with an empty parent).

Each measure also gets a transformed value for the parametric sensitivity
analysis and the longitudinal model. It is a fixed increasing function of the
value within a panel and population, so equal values stay equal (a pair at 100%
before and after has no change on either scale) and the direction of a change is
kept. With ``p`` the fraction and ``N`` the population's median denominator
(parent count for ``pct_parent``, reference count for ``pct_of``), over all
samples of the table:

* ``logit``: ``log((p N + 0.5) / ((1 - p) N + 0.5))``, the empirical logit at a
  typical denominator (finite at 0% and 100%);
* ``log_ratio`` (``pct_of`` of a population whose values exceed 100%, i.e. the
  reference is not an ancestor): ``log((p N + 0.5) / (N + 0.5))``;
* ``log``: ``log(count + 0.5)`` for counts, ``log(cells_per_ul + 0.5 c)`` for
  ``cells_per_ul`` with ``c`` the population's median cells per µl of one event.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .errors import ResultsError, UsageError

log = logging.getLogger(__name__)

MEASURES: tuple[str, ...] = ("pct_parent", "pct_of", "count", "cells_per_ul")
#: label of rows/exclusions that concern every population (or every measure)
EVERY = "(all)"
LYMPHOCYTES = "lymphocytes"


def _text(series: pd.Series) -> pd.Series:
    """Text with missing values as "" and surrounding spaces removed."""
    from .results import text_series

    return text_series(series)


def prepare(frame: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Stained samples of a populations table, ready for comparisons.

    Drops FMO controls (non-empty ``control``), normalises the text columns,
    checks that each sample lists a population once, and derives ``cells_per_ul``
    when the table has none but a ``lymphocytes_per_ul`` column (see
    :func:`derive_cells_per_ul`).

    Parameters
    ----------
    frame
        A populations table (``populations.csv`` layout, or :func:`immunoprofile.simulate.cohort_truth`).

    Returns
    -------
    tuple of (pandas.DataFrame, list of str)
        The prepared table and run-level notes for the summary.

    Raises
    ------
    ResultsError
        If required columns are missing, samples lack a patient or timepoint, a
        sample lists a population twice, or no stained sample is left.
    """
    from .results import check_metadata

    required = ("sample_id", "patient_id", "timepoint", "panel", "population")
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ResultsError(f"the populations table lacks column(s) {', '.join(missing)}",
                           hint="give the populations.csv written by `immunoprofile gate`")
    check_metadata(frame)
    out = frame.copy()
    notes: list[str] = []
    if "control" in out.columns:
        control = _text(out["control"])
        n_controls = int(out.loc[control != "", "sample_id"].nunique())
        out = out[control == ""]
        if n_controls:
            notes.append(f"{n_controls} FMO control sample(s) are not compared")
    if out.empty:
        raise ResultsError("the populations table holds no stained (non-control) samples",
                           hint="check the sample sheet's control column")
    for c in ("sample_id", "patient_id", "timepoint", "panel", "population"):
        out[c] = _text(out[c])
    out["group"] = _text(out["group"]) if "group" in out.columns else ""
    dup = out.duplicated(["panel", "sample_id", "population"])
    if dup.any():
        first = out[dup].iloc[0]
        raise ResultsError(f"sample {first['sample_id']} lists population {first['population']!r} "
                           f"{int(dup.sum()) + 1} times or more",
                           hint="each sample must have one row per population; regenerate populations.csv")
    for c in ("count", "parent_count", "pct_parent", "pct_of", "cells_per_ul", "day"):
        if c in out.columns:
            out[c] = pd.to_numeric(out[c], errors="coerce").astype("float64")
    out, note = derive_cells_per_ul(out)
    if note:
        notes.append(note)
    return out.reset_index(drop=True), notes


def derive_cells_per_ul(frame: pd.DataFrame) -> tuple[pd.DataFrame, str | None]:
    """Fill ``cells_per_ul`` from ``lymphocytes_per_ul`` when gate left it empty.

    ``cells_per_ul = lymphocytes_per_ul * count / count(lymphocytes)`` within each
    sample and panel, the same rule ``immunoprofile gate`` uses. Only applied when
    the table has no finite ``cells_per_ul`` at all (gate's own values win).

    Parameters
    ----------
    frame
        A prepared populations table.

    Returns
    -------
    tuple of (pandas.DataFrame, str or None)
        The table (a ``cells_per_ul`` column is always present afterwards) and a
        note saying what was derived, or None.

    Raises
    ------
    None
    """
    out = frame
    if "cells_per_ul" not in out.columns:
        out = out.assign(cells_per_ul=np.nan)
    if np.isfinite(out["cells_per_ul"].to_numpy(dtype=np.float64)).any():
        return out, None
    if "lymphocytes_per_ul" not in out.columns or "count" not in out.columns:
        return out, None
    blood = pd.to_numeric(out["lymphocytes_per_ul"], errors="coerce")
    if not np.isfinite(blood.to_numpy(dtype=np.float64)).any():
        return out, None
    out = out.copy()
    lym = out.loc[out["population"] == LYMPHOCYTES, ["panel", "sample_id", "count"]]
    lym = lym.rename(columns={"count": "_lym"})
    merged = out[["panel", "sample_id"]].merge(lym, on=["panel", "sample_id"], how="left")
    lym_count = merged["_lym"].to_numpy(dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        cells = np.where(lym_count > 0, blood.to_numpy(dtype=np.float64) * out["count"].to_numpy(np.float64)
                         / lym_count, np.nan)
    out["cells_per_ul"] = cells
    n = int(out.loc[np.isfinite(cells), "sample_id"].nunique())
    log.info("cells_per_ul derived from lymphocytes_per_ul for %d sample(s)", n)
    return out, (f"cells_per_ul derived for {n} sample(s) as lymphocytes_per_ul x count / count of "
                 f"'{LYMPHOCYTES}' (populations.csv had none)")


def available_measures(frame: pd.DataFrame) -> list[str]:
    """Measures with at least one finite value in a prepared table.

    Parameters
    ----------
    frame
        A prepared populations table.

    Returns
    -------
    list of str
        In the order of :data:`MEASURES`.

    Raises
    ------
    None
    """
    return [m for m in MEASURES if m in frame.columns
            and np.isfinite(pd.to_numeric(frame[m], errors="coerce").to_numpy(np.float64)).any()]


def measure_columns(frame: pd.DataFrame, measure: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Values of ``measure``, their transformed values and the name of the scale, row by row.

    The transform is a fixed, increasing function of the value within each panel
    and population (see the module docstring), so equal values stay equal and
    the direction of a change is kept.

    Parameters
    ----------
    frame
        A prepared populations table.
    measure
        One of :data:`MEASURES`.

    Returns
    -------
    tuple of numpy.ndarray
        ``(value, transformed, scale)``; NaN where undefined; ``scale`` holds
        ``logit``, ``log_ratio`` or ``log`` per row.

    Raises
    ------
    UsageError
        If ``measure`` is unknown or its column is missing.
    """
    if measure not in MEASURES:
        raise UsageError(f"unknown measure {measure!r}; choose from {', '.join(MEASURES)}")
    if measure not in frame.columns:
        raise UsageError(f"the populations table has no {measure} column")
    value = frame[measure].to_numpy(dtype=np.float64)
    n = len(frame)
    count = frame["count"].to_numpy(np.float64) if "count" in frame.columns else np.full(n, np.nan)
    key = (frame["panel"].astype(str) + "\x1f" + frame["population"].astype(str)).to_numpy()
    scale = np.full(n, "log", dtype=object)
    with np.errstate(divide="ignore", invalid="ignore"):
        if measure in ("pct_parent", "pct_of"):
            if measure == "pct_of":
                denom = _reference_counts(frame)
            elif "parent_count" in frame.columns:
                denom = frame["parent_count"].to_numpy(np.float64)
            else:
                denom = np.where(value > 0, 100.0 * count / value, np.nan)
            typical = _group_median(key, np.where(denom > 0, denom, np.nan))
            p = value / 100.0
            beyond = _group_any(key, p > 1.0)          # a reference that is not an ancestor
            scale[:] = np.where(beyond, "log_ratio", "logit")
            logit = np.log((p * typical + 0.5) / ((1.0 - p) * typical + 0.5))
            ratio = np.log((p * typical + 0.5) / (typical + 0.5))
            t = np.where(beyond, ratio, logit)
        elif measure == "count":
            t = np.log(value + 0.5)
        else:
            per_event = _group_median(key, np.where(count > 0, value / count, np.nan))
            t = np.log(value + 0.5 * per_event)
    t = np.where(np.isfinite(value) & np.isfinite(t), t, np.nan)
    return value, t, scale


def _group_median(key: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Per row, the median of the finite ``x`` of its group (NaN if none)."""
    return pd.Series(x).groupby(key).transform("median").to_numpy(np.float64)


def _group_any(key: np.ndarray, flag: np.ndarray) -> np.ndarray:
    return pd.Series(flag.astype(bool)).groupby(key).transform("any").to_numpy(bool)


def _reference_counts(frame: pd.DataFrame) -> np.ndarray:
    if "reference" not in frame.columns:
        return np.full(len(frame), np.nan)
    ref = frame[["panel", "sample_id", "reference"]].copy()
    ref["reference"] = _text(ref["reference"])
    counts = frame[["panel", "sample_id", "population", "count"]].rename(
        columns={"population": "reference", "count": "_ref_count"})
    merged = ref.merge(counts, on=["panel", "sample_id", "reference"], how="left")
    return merged["_ref_count"].to_numpy(np.float64)


# --------------------------------------------------------------------------- arrays

@dataclass(frozen=True)
class PanelArrays:
    """One panel's values for one measure over the selected timepoints.

    Attributes
    ----------
    panel, measure
        What the arrays hold.
    populations
        Population names, in the order of first appearance in the table.
    patients
        Patient ids (sorted), every patient of the panel in the table.
    groups
        Per patient, the ``by`` label ("" when none or conflicting).
    group_problem
        Per patient, why the label is missing ("" when there is one).
    timepoints
        The selected timepoints, in analysis order.
    value, transformed
        ``populations x patients x timepoints`` arrays (NaN when missing).
    scales
        Per population, the scale of ``transformed`` (``logit``, ``log_ratio``, ``log``).
    sample_reason
        ``patients x timepoints``: why the patient has no usable sample there
        ("" when it has one).
    sample_scope_all
        ``patients x timepoints``: True when that reason is independent of the
        measure (no sample, duplicates), False when only this measure is missing.
    value_reason
        ``populations x patients x timepoints``: why a value is missing for an
        otherwise usable sample ("" when present).
    sample_ids
        ``patients x timepoints`` sample ids ("" when none or ambiguous).
    """

    panel: str
    measure: str
    populations: tuple[str, ...]
    patients: tuple[str, ...]
    groups: tuple[str, ...]
    group_problem: tuple[str, ...]
    timepoints: tuple[str, ...]
    value: np.ndarray
    transformed: np.ndarray
    scales: tuple[str, ...]
    sample_reason: np.ndarray
    sample_scope_all: np.ndarray
    value_reason: np.ndarray
    sample_ids: np.ndarray


def patient_groups(frame: pd.DataFrame, by: str | None) -> tuple[dict[str, str], dict[str, str]]:
    """Each patient's ``by`` label, and why it is missing for the others.

    Parameters
    ----------
    frame
        A prepared populations table.
    by
        Column naming the groups, or None.

    Returns
    -------
    tuple of dict
        ``label[patient]`` ("" when none) and ``problem[patient]`` ("" when fine).

    Raises
    ------
    UsageError
        If ``by`` is not a column of the table.
    """
    patients = sorted(frame["patient_id"].unique())
    if by is None:
        return {p: "" for p in patients}, {p: "" for p in patients}
    if by not in frame.columns:
        raise UsageError(f"--by {by}: no such column; the table has {', '.join(map(str, frame.columns))}")
    labels = pd.DataFrame({"patient_id": frame["patient_id"], "label": _text(frame[by])}).drop_duplicates()
    label: dict[str, str] = {}
    problem: dict[str, str] = {}
    for patient, sub in labels.groupby("patient_id", sort=True):
        values = sorted(v for v in sub["label"] if v != "")
        if len(values) == 1:
            label[patient], problem[patient] = values[0], ""
        elif not values:
            label[patient], problem[patient] = "", f"no {by}"
        else:
            label[patient], problem[patient] = "", f"{by} differs between samples ({', '.join(values)})"
    return label, problem


def panel_arrays(frame: pd.DataFrame, measure: str, timepoints: Sequence[str],
                 labels: tuple[dict[str, str], dict[str, str]],
                 populations: Sequence[str] | None = None) -> list[PanelArrays]:
    """Build :class:`PanelArrays` for every panel of a prepared table.

    Parameters
    ----------
    frame
        A prepared populations table.
    measure
        One of :data:`MEASURES`.
    timepoints
        Timepoints in analysis order (baseline first).
    labels
        Output of :func:`patient_groups`.
    populations
        Populations to keep (None: all).

    Returns
    -------
    list of PanelArrays
        One per panel (sorted), skipping panels without a kept population.

    Raises
    ------
    UsageError
        If ``measure`` is unknown.
    """
    frame = frame.reset_index(drop=True)
    # the transform's typical denominators come from the selected timepoints only, so a
    # comparison does not depend on other visits in the same table
    in_tps = frame["timepoint"].isin(list(timepoints)).to_numpy()
    value_all = np.full(len(frame), np.nan)
    trans_all = np.full(len(frame), np.nan)
    scale_all = np.full(len(frame), "log", dtype=object)
    if in_tps.any():
        v, t, sc = measure_columns(frame.loc[in_tps].reset_index(drop=True), measure)
        value_all[in_tps], trans_all[in_tps], scale_all[in_tps] = v, t, sc
    else:
        measure_columns(frame.iloc[:0], measure)  # validates the measure
    label, problem = labels
    tps = list(timepoints)
    out = []
    for panel in sorted(frame["panel"].unique()):
        mask = (frame["panel"] == panel).to_numpy()
        sub = frame.loc[mask]
        pops = list(dict.fromkeys(sub["population"]))
        if populations is not None:
            keep = set(populations)
            pops = [p for p in pops if p in keep]
        if not pops:
            continue
        patients = sorted(sub["patient_id"].unique())
        p_index = {p: i for i, p in enumerate(patients)}
        pop_index = {p: i for i, p in enumerate(pops)}
        selected = sub.loc[in_tps[sub.index.to_numpy()]].drop_duplicates("population")
        scale_of = dict(zip(selected["population"], scale_all[selected.index.to_numpy()]))
        n_pop, n_pat, n_t = len(pops), len(patients), len(tps)
        sample_reason = np.full((n_pat, n_t), "", dtype=object)
        scope_all = np.zeros((n_pat, n_t), dtype=bool)
        sample_ids = np.full((n_pat, n_t), "", dtype=object)
        samples = sub[["patient_id", "timepoint", "sample_id"]].drop_duplicates().sort_values("sample_id")
        listed: dict[tuple[str, str], list[str]] = {}
        for pid, tp, sid in zip(samples["patient_id"], samples["timepoint"], samples["sample_id"]):
            listed.setdefault((pid, tp), []).append(sid)
        for patient in patients:
            i = p_index[patient]
            for j, tp in enumerate(tps):
                ids = listed.get((patient, tp), [])
                if not ids:
                    sample_reason[i, j], scope_all[i, j] = f"no {tp} sample", True
                elif len(ids) > 1:
                    sample_reason[i, j] = (f"{len(ids)} {tp} samples ({', '.join(ids)}); keep one per patient, "
                                           f"panel and timepoint")
                    scope_all[i, j] = True
                else:
                    sample_ids[i, j] = ids[0]
        value = np.full((n_pop, n_pat, n_t), np.nan)
        trans = np.full((n_pop, n_pat, n_t), np.nan)
        present = np.zeros((n_pop, n_pat, n_t), dtype=bool)
        rows = sub[sub["timepoint"].isin(tps) & sub["population"].isin(pop_index)]
        if len(rows):
            ii = pd.Index(patients).get_indexer(rows["patient_id"])
            jj = pd.Index(tps).get_indexer(rows["timepoint"])
            kk = pd.Index(pops).get_indexer(rows["population"])
            usable = sample_ids[ii, jj] == rows["sample_id"].to_numpy(dtype=object)
            pos = rows.index.to_numpy()
            ii, jj, kk, pos = ii[usable], jj[usable], kk[usable], pos[usable]
            value[kk, ii, jj] = value_all[pos]
            trans[kk, ii, jj] = trans_all[pos]
            present[kk, ii, jj] = True
        # the measure missing for every population of a usable sample: a sample-level reason
        usable_sample = sample_ids != ""
        no_measure = usable_sample & ~np.any(np.isfinite(value), axis=0)
        for i, j in zip(*np.nonzero(no_measure)):
            hint = " (no blood count or counting beads)" if measure == "cells_per_ul" else ""
            sample_reason[i, j] = f"{measure} not available for sample {sample_ids[i, j]}{hint}"
        value_reason = np.full((n_pop, n_pat, n_t), "", dtype=object)
        ok_sample = usable_sample & ~no_measure
        absent = ~present & ok_sample[None, :, :]
        undefined = present & ~np.isfinite(value) & ok_sample[None, :, :]
        for k, i, j in zip(*np.nonzero(absent)):
            value_reason[k, i, j] = f"no row for this population in sample {sample_ids[i, j]} ({tps[j]})"
        for k, i, j in zip(*np.nonzero(undefined)):
            value_reason[k, i, j] = (f"{measure} undefined in sample {sample_ids[i, j]} ({tps[j]}), "
                                     f"e.g. an empty parent or reference population")
        out.append(PanelArrays(
            panel=str(panel), measure=measure, populations=tuple(pops), patients=tuple(patients),
            groups=tuple(label.get(p, "") for p in patients),
            group_problem=tuple(problem.get(p, "") for p in patients), timepoints=tuple(tps),
            value=value, transformed=trans, scales=tuple(str(scale_of.get(p, "log")) for p in pops),
            sample_reason=sample_reason, sample_scope_all=scope_all,
            value_reason=value_reason, sample_ids=sample_ids,
        ))
    return out


def timepoint_days(frame: pd.DataFrame, timepoints: Sequence[str]) -> dict[str, float]:
    """Median ``day`` of each timepoint (NaN when the table has no usable day).

    Parameters
    ----------
    frame
        A prepared populations table.
    timepoints
        Timepoints to look up.

    Returns
    -------
    dict
        ``{timepoint: median day}``.

    Raises
    ------
    None
    """
    out = {tp: math.nan for tp in timepoints}
    if "day" not in frame.columns:
        return out
    days = frame[["timepoint", "day"]]
    for tp in timepoints:
        d = days.loc[days["timepoint"] == tp, "day"].to_numpy(np.float64)
        d = d[np.isfinite(d)]
        if d.size:
            out[tp] = float(np.median(d))
    return out
