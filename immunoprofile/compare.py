"""Paired and longitudinal statistics of subset frequencies within patients.

The scientific question is how a population changes within each patient: pre vs
post clofarabine, over lenalidomide cycles, overall and by response group. With
4 to 20 patients the tests must be exact where they can be and say plainly what
a small sample cannot show. :func:`compare_timepoints` takes a populations table
(``populations.csv`` of ``immunoprofile gate``, or the simulator's
``cohort_truth``) and returns tidy tables:

* ``paired``: one row per measure x comparison x analysis/group x panel x
  population (columns in :data:`PAIRED_COLUMNS`, documented in ``docs/compare.md``);
* ``longitudinal`` (three or more timepoints): one row per measure x group x
  panel x population x timepoint (:data:`LONGITUDINAL_COLUMNS`);
* ``exclusions``: every patient left out of an analysis, with the reason.

Decisions (see ``docs/compare.md``): the default test is the Wilcoxon
signed-rank test (scipy's ``method="auto"`` rules; zero differences dropped,
Wilcoxon's method); p-values are adjusted by Benjamini-Hochberg over the family
of populations (x comparisons) tested within one measure, analysis and group;
the longitudinal model is a within-patient (fixed patient intercept) linear model
because a random-intercept mixed model needs statsmodels.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from . import compare_tests as ct
from .compare_longitudinal import longitudinal_rows
from .compare_pairs import (EVERY, MEASURES, PanelArrays, available_measures, panel_arrays,
                            patient_groups, prepare, timepoint_days)
from .compare_paired import between_row, within_row
from .errors import UsageError

log = logging.getLogger(__name__)

__all__ = ["PAIRED_COLUMNS", "LONGITUDINAL_COLUMNS", "EXCLUSION_COLUMNS", "ALL_PATIENTS", "CompareResult",
           "compare_timepoints", "paired_stats", "default_measures", "MEASURES"]

#: the ``group`` of rows over all patients
ALL_PATIENTS = "all"
ANALYSIS_WITHIN = "within"
ANALYSIS_BETWEEN = "between_groups"

PAIRED_COLUMNS: tuple[str, ...] = (
    "measure", "comparison", "analysis", "group", "panel", "population", "pre", "post",
    "n_pairs", "n_nonzero", "n_excluded", "excluded",
    "median_pre", "median_post", "median_difference",
    "estimate", "ci_low", "ci_high", "ci_level",
    "test", "method", "statistic", "p_value", "p_min_attainable", "q_value", "bh_family", "bh_m",
    "ttest_scale", "ttest_mean_difference", "ttest_statistic", "ttest_df", "ttest_p",
    "n_a", "n_b", "median_change_a", "median_change_b",
    "note",
)
LONGITUDINAL_COLUMNS: tuple[str, ...] = (
    "measure", "group", "panel", "population", "timepoint", "timepoint_index", "day_median",
    "n_samples", "median",
    "n_patients", "n_complete", "friedman_statistic", "friedman_df", "friedman_p_chi2", "friedman_p_exact",
    "friedman_method", "friedman_p", "friedman_q",
    "model", "model_scale", "model_n_obs", "model_n_patients", "model_f", "model_df_num", "model_df_den",
    "model_p", "model_q", "model_estimate", "model_ci_low", "model_ci_high", "model_p_vs_baseline",
    "mixed_model", "mixed_n_obs", "mixed_n_patients", "mixed_chi2", "mixed_df", "mixed_p", "mixed_q",
    "mixed_patient_sd", "mixed_residual_sd", "mixed_converged", "mixed_estimate", "mixed_ci_low", "mixed_ci_high",
    "mixed_p_vs_baseline",
    "bh_family", "note",
)
EXCLUSION_COLUMNS: tuple[str, ...] = ("measure", "comparison", "panel", "patient_id", "population", "scope",
                                      "reason")
SCOPE_ALL = "all analyses"
SCOPE_GROUP = "by-group analyses"
SCOPE_FRIEDMAN = "friedman"
SCOPE_MODEL = "friedman and model"
LONGITUDINAL = "longitudinal"


@dataclass(frozen=True)
class CompareResult:
    """Everything :func:`compare_timepoints` computed.

    Attributes
    ----------
    paired
        ``paired_stats.csv`` rows (:data:`PAIRED_COLUMNS`).
    longitudinal
        ``longitudinal_stats.csv`` rows (:data:`LONGITUDINAL_COLUMNS`); empty with
        two timepoints.
    exclusions
        Patients left out, with reasons (:data:`EXCLUSION_COLUMNS`).
    timepoints
        Timepoints in analysis order (baseline first).
    measures
        Measures analysed.
    by
        Grouping column, or None.
    notes
        Run-level notes (controls dropped, derived columns, timepoint order).
    """

    paired: pd.DataFrame
    longitudinal: pd.DataFrame
    exclusions: pd.DataFrame
    timepoints: tuple[str, ...]
    measures: tuple[str, ...]
    by: str | None
    notes: tuple[str, ...]


def default_measures(frame: pd.DataFrame) -> list[str]:
    """``pct_parent``, plus ``cells_per_ul`` when the table has absolute numbers.

    Parameters
    ----------
    frame
        A prepared populations table (:func:`immunoprofile.compare_pairs.prepare`).

    Returns
    -------
    list of str

    Raises
    ------
    None
    """
    have = available_measures(frame)
    return [m for m in ("pct_parent", "cells_per_ul") if m in have]


def paired_stats(frame: pd.DataFrame, pre: str, post: str, **kwargs: Any) -> CompareResult:
    """Pre vs post comparison; shorthand for ``compare_timepoints(frame, [pre, post], ...)``.

    Parameters
    ----------
    frame
        A populations table.
    pre, post
        The two timepoints.
    **kwargs
        Passed to :func:`compare_timepoints`.

    Returns
    -------
    CompareResult

    Raises
    ------
    UsageError, ResultsError
        As :func:`compare_timepoints`.
    """
    return compare_timepoints(frame, [pre, post], **kwargs)


def compare_timepoints(
    frame: pd.DataFrame,
    timepoints: Sequence[str],
    *,
    measures: Sequence[str] | None = None,
    by: str | None = None,
    populations: Sequence[str] | None = None,
    level: float = 0.95,
) -> CompareResult:
    """Paired (and, with three or more timepoints, longitudinal) statistics.

    Parameters
    ----------
    frame
        A populations table (``populations.csv`` layout). FMO controls are dropped.
    timepoints
        Two timepoints (pre, post) or more (baseline first). With three or more,
        they are ordered by their median ``day`` when every sample has one, and
        each later timepoint is compared with the first.
    measures
        Measures to analyse (default :func:`default_measures`).
    by
        Column with response groups (e.g. ``group``): adds within-group rows and
        between-group comparisons of the paired changes.
    populations
        Populations to analyse (default: all); they form the multiplicity family.
    level
        Target confidence level of the intervals.

    Returns
    -------
    CompareResult

    Raises
    ------
    UsageError
        Unknown or repeated timepoint, unknown population or measure, a measure
        with no values, an unknown ``by`` column, a group called ``all``, or no
        patient with both timepoints of a comparison.
    ResultsError
        If the table lacks required columns or metadata.
    """
    prepared, notes = prepare(frame)
    tps = _check_timepoints(prepared, timepoints)
    days = timepoint_days(prepared, tps)
    if len(tps) >= 3:
        tps, note = _order_by_day(tps, days)
        if note:
            notes.append(note)
    elif all(math.isfinite(days[t]) for t in tps) and days[tps[0]] > days[tps[1]]:
        notes.append(f"--pre {tps[0]} is later (day {days[tps[0]]:g}) than --post {tps[1]} "
                     f"(day {days[tps[1]]:g}); differences are still post - pre")
    pops = _check_populations(prepared, populations)
    measures = _check_measures(prepared, measures)
    labels = patient_groups(prepared, by)
    groups = sorted({g for g in labels[0].values() if g})
    if by is not None and ALL_PATIENTS in groups:
        raise UsageError(f"--by {by}: a group is called {ALL_PATIENTS!r}, which names the rows over all patients; "
                         f"rename it in the sample sheet")
    if by is not None and not groups:
        raise UsageError(f"--by {by}: no patient has a value in this column")
    comparisons = [(tps[0], t) for t in tps[1:]]

    paired_rows: list[dict[str, Any]] = []
    long_rows: list[dict[str, Any]] = []
    exclusions: list[dict[str, Any]] = []
    for measure in measures:
        for arr in panel_arrays(prepared, measure, tps, labels, pops):
            for a, b in comparisons:
                ja, jb = tps.index(a), tps.index(b)
                paired_rows += _comparison_rows(arr, ja, jb, by, groups, level, exclusions)
            if len(tps) >= 3:
                long_rows += _longitudinal(arr, by, groups, days, level, exclusions)

    paired = _finish_paired(paired_rows, measures, comparisons, groups)
    _check_some_pairs(paired, comparisons, prepared)
    longitudinal = _finish_longitudinal(long_rows, measures, tps, groups)
    excl = pd.DataFrame(exclusions, columns=list(EXCLUSION_COLUMNS)).drop_duplicates()
    excl = _sort_exclusions(excl, measures, comparisons)
    log.info("compared %s: %d paired rows, %d longitudinal rows, %d exclusions", " -> ".join(tps), len(paired),
             len(longitudinal), len(excl))
    return CompareResult(paired, longitudinal, excl, tuple(tps), tuple(measures), by, tuple(notes))


# --------------------------------------------------------------------------- validation

def _check_timepoints(frame: pd.DataFrame, timepoints: Sequence[str]) -> list[str]:
    tps = [str(t).strip() for t in timepoints]
    have = sorted(frame["timepoint"].unique())
    if len(tps) < 2:
        raise UsageError(f"need at least two timepoints, got {len(tps)}; the results have: {', '.join(have)}")
    dup = sorted({t for t in tps if tps.count(t) > 1})
    if dup:
        raise UsageError(f"timepoint(s) given twice: {', '.join(dup)}")
    unknown = [t for t in tps if t not in have]
    if unknown:
        raise UsageError(f"unknown timepoint(s) {', '.join(unknown)}; the results have: {', '.join(have)}")
    return tps


def _order_by_day(tps: list[str], days: dict[str, float]) -> tuple[list[str], str | None]:
    if not all(math.isfinite(days[t]) for t in tps):
        return tps, None
    ordered = sorted(tps, key=lambda t: (days[t], tps.index(t)))
    if ordered == tps:
        return tps, None
    return ordered, ("timepoints ordered by day (median day " + ", ".join(f"{t} {days[t]:g}" for t in ordered)
                     + f"); baseline is {ordered[0]}")


def _check_populations(frame: pd.DataFrame, populations: Sequence[str] | None) -> list[str] | None:
    if not populations:
        return None
    pops = [str(p).strip() for p in populations]
    have = list(dict.fromkeys(frame["population"]))
    unknown = [p for p in pops if p not in set(have)]
    if unknown:
        raise UsageError(f"unknown population(s) {', '.join(repr(p) for p in unknown)}; "
                         f"the results have: {', '.join(have)}")
    return list(dict.fromkeys(pops))


def _check_measures(frame: pd.DataFrame, measures: Sequence[str] | None) -> list[str]:
    if not measures:
        chosen = default_measures(frame)
        if not chosen:
            raise UsageError("no measure has values (pct_parent and cells_per_ul are empty)")
        return chosen
    chosen = list(dict.fromkeys(measures))
    unknown = [m for m in chosen if m not in MEASURES]
    if unknown:
        raise UsageError(f"unknown measure(s) {', '.join(unknown)}; choose from {', '.join(MEASURES)}")
    have = available_measures(frame)
    empty = [m for m in chosen if m not in have]
    if empty:
        hint = ""
        if "cells_per_ul" in empty:
            hint = ("; cells_per_ul needs a lymphocytes_per_ul column in the sample sheet or a counting-bead "
                    "population with beads_per_test in the template")
        raise UsageError(f"measure(s) {', '.join(empty)} have no values in these results{hint}")
    return chosen


def _check_some_pairs(paired: pd.DataFrame, comparisons: list[tuple[str, str]], frame: pd.DataFrame) -> None:
    overall = paired[(paired["analysis"] == ANALYSIS_WITHIN) & (paired["group"] == ALL_PATIENTS)]
    for a, b in comparisons:
        sub = overall[(overall["pre"] == a) & (overall["post"] == b)]
        if sub.empty or int(sub["n_pairs"].max()) == 0:
            per_tp = frame.drop_duplicates(["panel", "patient_id", "timepoint"])
            counts = per_tp.groupby("timepoint")["patient_id"].nunique()
            have = ", ".join(f"{t}: {int(n)} patient(s)" for t, n in counts.items())
            raise UsageError(f"no patient has both a {a} and a {b} sample in the same panel, so nothing can be "
                             f"paired; the results have {have}")


# --------------------------------------------------------------------------- paired rows

def _patient_reason(arr: PanelArrays, i: int, cols: Sequence[int]) -> tuple[str, bool]:
    reasons = [arr.sample_reason[i, j] for j in cols if arr.sample_reason[i, j]]
    scope_all = all(arr.sample_scope_all[i, j] for j in cols if arr.sample_reason[i, j])
    return "; ".join(reasons), scope_all


def _comparison_rows(arr: PanelArrays, ja: int, jb: int, by: str | None, groups: list[str], level: float,
                     exclusions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    a, b = arr.timepoints[ja], arr.timepoints[jb]
    comparison = f"{b} vs {a}"
    n_pat = len(arr.patients)
    patient_reason = [_patient_reason(arr, i, (ja, jb)) for i in range(n_pat)]
    for i, (reason, scope_all) in enumerate(patient_reason):
        if reason:
            exclusions.append({"measure": EVERY if scope_all else arr.measure, "comparison": comparison,
                               "panel": arr.panel, "patient_id": arr.patients[i], "population": EVERY,
                               "scope": SCOPE_ALL, "reason": reason})
    group_of = np.array(arr.groups, dtype=object)
    if by is not None:
        for i in range(n_pat):
            if arr.group_problem[i] and not patient_reason[i][0]:
                exclusions.append({"measure": EVERY, "comparison": comparison, "panel": arr.panel,
                                   "patient_id": arr.patients[i], "population": EVERY, "scope": SCOPE_GROUP,
                                   "reason": arr.group_problem[i]})
    rows = []
    base = {"measure": arr.measure, "comparison": comparison, "panel": arr.panel, "pre": a, "post": b}
    for k, population in enumerate(arr.populations):
        scale = arr.scales[k]
        va, vb = arr.value[k, :, ja], arr.value[k, :, jb]
        ta, tb = arr.transformed[k, :, ja], arr.transformed[k, :, jb]
        ok = np.isfinite(va) & np.isfinite(vb)
        usable = np.array([not r for r, _ in patient_reason], dtype=bool)
        # a measure this population never has (e.g. pct_of without a reference) is one note, not n exclusions
        undefined = bool(usable.any()) and not bool(np.any(np.isfinite(va[usable]) | np.isfinite(vb[usable])))
        why: dict[int, str] = {}
        for i in range(n_pat):
            if patient_reason[i][0]:
                why[i] = patient_reason[i][0]
            elif undefined:
                continue
            elif not ok[i]:
                r = "; ".join(x for x in (arr.value_reason[k, i, ja], arr.value_reason[k, i, jb]) if x)
                why[i] = r or "value missing"
                exclusions.append({"measure": arr.measure, "comparison": comparison, "panel": arr.panel,
                                   "patient_id": arr.patients[i], "population": population, "scope": SCOPE_ALL,
                                   "reason": why[i]})
        subsets: list[tuple[str, np.ndarray]] = [(ALL_PATIENTS, np.ones(n_pat, dtype=bool))]
        if by is not None:
            subsets += [(g, group_of == g) for g in groups]
        for label, members in subsets:
            sel = ok & members
            row = within_row(va[sel], vb[sel], ta[sel], tb[sel], scale, level)
            if undefined:
                row["note"] = [f"{arr.measure} is not defined for this population in any sample"]
            row.update(base, analysis=ANALYSIS_WITHIN, group=label, population=population, ttest_scale=scale,
                       **_excluded(arr, why, members))
            rows.append(row)
        if by is not None:
            for ga, gb in itertools.combinations(groups, 2):
                sa, sb = ok & (group_of == ga), ok & (group_of == gb)
                row = between_row(vb[sa] - va[sa], vb[sb] - va[sb], tb[sa] - ta[sa], tb[sb] - ta[sb],
                                  (ga, gb), scale, level)
                members = (group_of == ga) | (group_of == gb)
                extra = {i: arr.group_problem[i] for i in range(n_pat)
                         if arr.group_problem[i] and i not in why and ok[i]}
                row.update(base, analysis=ANALYSIS_BETWEEN, group=f"{ga} vs {gb}", population=population,
                           ttest_scale=scale,
                           **_excluded(arr, {**why, **extra}, members | np.isin(np.arange(n_pat), list(extra))))
                rows.append(row)
    return rows


def _excluded(arr: PanelArrays, why: dict[int, str], members: np.ndarray) -> dict[str, Any]:
    items = [(arr.patients[i], r) for i, r in sorted(why.items()) if members[i]]
    return {"n_excluded": len(items), "excluded": "; ".join(f"{p} ({r})" for p, r in items)}


# --------------------------------------------------------------------------- longitudinal rows

def _longitudinal(arr: PanelArrays, by: str | None, groups: list[str], days: dict[str, float], level: float,
                  exclusions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    n_pat, n_t = len(arr.patients), len(arr.timepoints)
    all_cols = tuple(range(n_t))
    for i in range(n_pat):
        reason, scope_all = _patient_reason(arr, i, all_cols)
        if reason:
            usable = sum(1 for j in all_cols if not arr.sample_reason[i, j])
            scope = SCOPE_FRIEDMAN if usable >= 2 else SCOPE_MODEL
            exclusions.append({"measure": EVERY if scope_all else arr.measure, "comparison": LONGITUDINAL,
                               "panel": arr.panel, "patient_id": arr.patients[i], "population": EVERY,
                               "scope": scope, "reason": reason})
    group_of = np.array(arr.groups, dtype=object)
    subsets: list[tuple[str, np.ndarray]] = [(ALL_PATIENTS, np.ones(n_pat, dtype=bool))]
    if by is not None:
        subsets += [(g, group_of == g) for g in groups]
    rows = []
    for k, population in enumerate(arr.populations):
        for label, members in subsets:
            for row in longitudinal_rows(arr.value[k][members], arr.transformed[k][members], arr.timepoints,
                                         days, arr.scales[k], level):
                row.update(measure=arr.measure, group=label, panel=arr.panel, population=population)
                rows.append(row)
    return rows


# --------------------------------------------------------------------------- finishing

NOTE_SEPARATOR = " | "


def _join_notes(notes: Any) -> str:
    if isinstance(notes, list):
        return NOTE_SEPARATOR.join(notes)
    return "" if notes is None else str(notes)


def _group_rank(groups: list[str]) -> dict[str, int]:
    ranks = {ALL_PATIENTS: 0}
    for i, g in enumerate(groups):
        ranks[g] = i + 1
    for i, (ga, gb) in enumerate(itertools.combinations(groups, 2)):
        ranks[f"{ga} vs {gb}"] = len(groups) + 1 + i
    return ranks


def _finish_paired(rows: list[dict[str, Any]], measures: list[str], comparisons: list[tuple[str, str]],
                   groups: list[str]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=list(PAIRED_COLUMNS))
    df["note"] = df["note"].map(_join_notes)
    m_rank = {m: i for i, m in enumerate(measures)}
    c_rank = {f"{b} vs {a}": i for i, (a, b) in enumerate(comparisons)}
    g_rank = _group_rank(groups)
    df["_pop_rank"] = np.arange(len(df))  # rows come per panel in population order
    df["_m"] = df["measure"].map(m_rank)
    df["_c"] = df["comparison"].map(c_rank)
    df["_a"] = (df["analysis"] == ANALYSIS_BETWEEN).astype(int)
    df["_g"] = df["group"].map(g_rank)
    # Benjamini-Hochberg within (measure, analysis, group), over populations x comparisons
    codes, families = pd.factorize(df["measure"] + "\x1f" + df["analysis"] + "\x1f" + df["group"])
    p = df["p_value"].to_numpy(np.float64)
    q = np.full(len(df), np.nan)
    label = np.empty(len(df), dtype=object)
    bh_m = np.zeros(len(df), dtype=int)
    panel_pop = (df["panel"] + "\x1f" + df["population"]).to_numpy()
    n_comp = len(comparisons)
    for c, family in enumerate(families):
        idx = np.flatnonzero(codes == c)
        q[idx] = ct.benjamini_hochberg(p[idx])
        m = int(np.count_nonzero(np.isfinite(p[idx])))
        measure, analysis, group = family.split("\x1f")
        n_pops = len(set(panel_pop[idx]))
        bh_m[idx] = m
        label[idx] = (f"{measure} / {analysis} / {group}: {m} tests "
                      f"({n_pops} panel populations x {n_comp} comparison{'s' if n_comp > 1 else ''})")
    df["q_value"], df["bh_family"], df["bh_m"] = q, label, bh_m
    df = df.sort_values(["_m", "_c", "_a", "_g", "panel", "_pop_rank"], kind="stable")
    for c in ("n_pairs", "n_nonzero", "n_excluded", "bh_m"):
        df[c] = df[c].astype(int)
    return df[list(PAIRED_COLUMNS)].reset_index(drop=True)


def _finish_longitudinal(rows: list[dict[str, Any]], measures: list[str], tps: list[str],
                         groups: list[str]) -> pd.DataFrame:
    if not rows:
        return pd.DataFrame(columns=list(LONGITUDINAL_COLUMNS))
    df = pd.DataFrame(rows)
    df["note"] = df["note"].map(_join_notes)
    df["_order"] = np.arange(len(df))
    df["_m"] = df["measure"].map({m: i for i, m in enumerate(measures)})
    df["_g"] = df["group"].map(_group_rank(groups))
    df["friedman_q"] = np.nan
    df["model_q"] = np.nan
    df["mixed_q"] = np.nan
    df["bh_family"] = ""
    for (measure, group), idx in df.groupby(["measure", "group"], sort=False).groups.items():
        sub = df.loc[idx]
        first = sub[sub["timepoint_index"] == 0]   # one row per population carries the overall tests
        for col, qcol in (("friedman_p", "friedman_q"), ("model_p", "model_q"), ("mixed_p", "mixed_q")):
            q = ct.benjamini_hochberg(first[col].to_numpy(np.float64))
            key = first["panel"] + "\x1f" + first["population"]
            qmap = dict(zip(key, q))
            df.loc[idx, qcol] = (sub["panel"] + "\x1f" + sub["population"]).map(qmap).to_numpy()
        n_pops = len(first)
        df.loc[idx, "bh_family"] = f"{measure} / longitudinal / {group}: {n_pops} panel populations"
    df = df.sort_values(["_m", "_g", "panel", "_order"], kind="stable")
    for c in ("timepoint_index", "n_samples", "n_patients", "n_complete", "friedman_df", "model_n_obs",
              "model_n_patients", "model_df_num", "model_df_den", "mixed_n_obs", "mixed_n_patients", "mixed_df"):
        df[c] = df[c].astype(int)
    return df[list(LONGITUDINAL_COLUMNS)].reset_index(drop=True)


def _sort_exclusions(excl: pd.DataFrame, measures: list[str], comparisons: list[tuple[str, str]]) -> pd.DataFrame:
    if excl.empty:
        return excl.reset_index(drop=True)
    m_rank = {EVERY: -1, **{m: i for i, m in enumerate(measures)}}
    c_rank = {f"{b} vs {a}": i for i, (a, b) in enumerate(comparisons)}
    c_rank[LONGITUDINAL] = len(comparisons)
    excl = excl.assign(_o=np.arange(len(excl)), _m=excl["measure"].map(m_rank), _c=excl["comparison"].map(c_rank),
                       _p=(excl["population"] != EVERY).astype(int))
    excl = excl.sort_values(["_c", "_m", "panel", "patient_id", "_p", "_o"], kind="stable")
    return excl[list(EXCLUSION_COLUMNS)].reset_index(drop=True)
