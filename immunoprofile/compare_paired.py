"""One row of paired statistics: within a set of patients, or between two groups.

Within (``post - pre`` per patient): medians, Hodges-Lehmann estimate and
interval, Wilcoxon signed-rank (the default test), and a paired t-test on the
transformed scale as a sensitivity analysis. Between two groups: Mann-Whitney U
on the paired changes, a two-sample Hodges-Lehmann shift and interval, and a
Welch t-test on the transformed changes.

Small samples are stated, not hidden: fewer than :data:`MIN_PAIRS` pairs (per
group, for a between-group row), no change in any pair, or no events at all
give NaN statistics and a plain-language ``note``; the smallest attainable
p-value is reported with every test.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import compare_tests as ct

MIN_PAIRS = 3
ALPHA = 0.05
TEST_WITHIN = "wilcoxon_signed_rank"
TEST_BETWEEN = "mann_whitney_u"
#: a confidence level further than this from the target gets a note
LEVEL_NOTE_TOLERANCE = 0.025

WITHIN_NAN: dict[str, Any] = {
    "n_nonzero": 0, "median_pre": math.nan, "median_post": math.nan, "median_difference": math.nan,
    "estimate": math.nan, "ci_low": math.nan, "ci_high": math.nan, "ci_level": math.nan,
    "test": TEST_WITHIN, "method": "", "statistic": math.nan, "p_value": math.nan,
    "p_min_attainable": math.nan, "ttest_mean_difference": math.nan, "ttest_statistic": math.nan,
    "ttest_df": math.nan, "ttest_p": math.nan, "n_a": math.nan, "n_b": math.nan,
    "median_change_a": math.nan, "median_change_b": math.nan,
}


def _median(x: np.ndarray) -> float:
    """Median of a small finite array (NaN when empty); same value as ``numpy.median``."""
    n = x.size
    if n == 0:
        return math.nan
    s = np.sort(x)
    return float(s[n // 2]) if n % 2 else float((s[n // 2 - 1] + s[n // 2]) / 2.0)


def _fmt_p(p: float) -> str:
    return f"{p:.3g}"


def _level_note(level: float, target: float, what: str) -> str | None:
    if math.isfinite(level) and abs(level - target) > LEVEL_NOTE_TOLERANCE:
        return f"the interval covers {level:.1%} (the level closest to {target:.0%} attainable at {what})"
    return None


def within_row(pre: np.ndarray, post: np.ndarray, tpre: np.ndarray, tpost: np.ndarray,
               scale: str, level: float = 0.95) -> dict[str, Any]:
    """Paired statistics of one population in one set of patients.

    Parameters
    ----------
    pre, post
        Values of the measure per patient (finite, same length).
    tpre, tpost
        The same on the transformed scale (NaN where undefined).
    scale
        Name of the transformed scale (``logit``, ``log_ratio`` or ``log``), for notes.
    level
        Target confidence level of the Hodges-Lehmann interval.

    Returns
    -------
    dict
        The statistic columns of ``paired_stats.csv`` (see ``docs/compare.md``),
        with ``note`` as a list of strings.

    Raises
    ------
    None
    """
    pre = np.asarray(pre, dtype=np.float64)
    post = np.asarray(post, dtype=np.float64)
    n = int(pre.size)
    row: dict[str, Any] = dict(WITHIN_NAN)
    notes: list[str] = []
    row.update(n_pairs=n, median_pre=_median(pre), median_post=_median(post))
    row["note"] = notes
    if n == 0:
        notes.append("no pairs")
        return row
    d = post - pre
    n_nonzero = int(np.count_nonzero(d))
    row.update(median_difference=_median(d), n_nonzero=n_nonzero)
    if n < MIN_PAIRS:
        notes.append(f"only {n} pair(s): too few for a test (need at least {MIN_PAIRS})")
        return row
    if np.all(pre == 0) and np.all(post == 0):
        notes.append("no events (value 0) in every pair at both timepoints: nothing to test")
        return row
    if n_nonzero == 0:
        notes.append("identical values before and after in every pair: nothing to test")
        return row
    w = ct.wilcoxon_signed_rank(d)
    hl = ct.hodges_lehmann_paired(d, level)
    row.update(estimate=hl.estimate, ci_low=hl.ci_low, ci_high=hl.ci_high, ci_level=hl.level,
               method=w.method, statistic=w.statistic, p_value=w.pvalue, p_min_attainable=w.p_min)
    if w.n_zero:
        notes.append(f"{w.n_zero} of {n} pairs unchanged: left out of the signed-rank test (Wilcoxon's method), "
                     f"which uses {w.n_nonzero}")
    if w.p_min > ALPHA:
        notes.append(f"n={w.n_nonzero}: smallest attainable p is {_fmt_p(w.p_min)}; no result can reach {ALPHA:g}")
    if w.method == ct.METHOD_PERMUTATION:
        notes.append(f"tied or zero differences: exact p from all 2^{n} sign flips")
    elif w.method == ct.METHOD_NORMAL:
        notes.append("normal approximation (more than 50 pairs, or ties/zeros with more than 13)")
    ln = _level_note(hl.level, level, f"n={n}")
    if ln:
        notes.append(ln)
    _paired_t_into(row, notes, np.asarray(tpost, np.float64) - np.asarray(tpre, np.float64), scale)
    return row


def _paired_t_into(row: dict[str, Any], notes: list[str], td: np.ndarray, scale: str) -> None:
    finite = np.isfinite(td)
    td = td[finite]
    if td.size < MIN_PAIRS:
        notes.append(f"{scale} t-test not computed: {scale} undefined for too many pairs")
        return
    if finite.size > td.size:
        notes.append(f"{scale} t-test on {td.size} of {finite.size} pairs ({scale} undefined for the others)")
    try:
        t = ct.paired_t(td)
    except ValueError:
        notes.append(f"{scale} t-test not computed: every pair changed by the same amount")
        return
    row.update(ttest_mean_difference=t.mean_difference, ttest_statistic=t.statistic, ttest_df=t.df,
               ttest_p=t.pvalue)


def between_row(da: np.ndarray, db: np.ndarray, tda: np.ndarray, tdb: np.ndarray,
                names: tuple[str, str], scale: str, level: float = 0.95) -> dict[str, Any]:
    """Compare the paired changes of one population between two groups.

    Parameters
    ----------
    da, db
        Paired differences (``post - pre``) of groups ``a`` and ``b``.
    tda, tdb
        The same on the transformed scale (NaN where undefined).
    names
        Group labels ``(a, b)``, for notes.
    scale
        Name of the transformed scale.
    level
        Target confidence level of the Hodges-Lehmann interval.

    Returns
    -------
    dict
        The statistic columns of ``paired_stats.csv``; ``estimate`` is the shift
        of the changes, group ``a`` minus group ``b``.

    Raises
    ------
    None
    """
    da = np.asarray(da, dtype=np.float64)
    db = np.asarray(db, dtype=np.float64)
    row: dict[str, Any] = dict(WITHIN_NAN)
    notes: list[str] = []
    row["note"] = notes
    row.update(test=TEST_BETWEEN, n_pairs=int(da.size + db.size), n_nonzero=int(np.count_nonzero(da))
               + int(np.count_nonzero(db)), n_a=int(da.size), n_b=int(db.size),
               median_change_a=_median(da), median_change_b=_median(db))
    row["median_difference"] = row["median_change_a"] - row["median_change_b"]
    small = [f"{name} has only {x.size} pair(s)" for name, x in zip(names, (da, db)) if x.size < MIN_PAIRS]
    if small:
        notes.append("; ".join(small) + f": too few for a comparison (need at least {MIN_PAIRS} per group)")
        return row
    both = np.concatenate([da, db])
    if np.all(both == both[0]):
        notes.append("every pair in both groups changed by the same amount: nothing to test")
        return row
    u = ct.mann_whitney(da, db)
    hl = ct.hodges_lehmann_two_sample(da, db, level)
    row.update(estimate=hl.estimate, ci_low=hl.ci_low, ci_high=hl.ci_high, ci_level=hl.level,
               method=u.method, statistic=u.statistic, p_value=u.pvalue, p_min_attainable=u.p_min)
    if u.p_min > ALPHA:
        notes.append(f"n={da.size} vs {db.size}: smallest attainable p is {_fmt_p(u.p_min)}; "
                     f"no result can reach {ALPHA:g}")
    if u.method == ct.METHOD_NORMAL:
        notes.append("normal approximation (ties, or both groups larger than 8)")
    ln = _level_note(hl.level, level, f"n={da.size} vs {db.size}")
    if ln:
        notes.append(ln)
    ta = np.asarray(tda, np.float64)
    tb = np.asarray(tdb, np.float64)
    ta, tb = ta[np.isfinite(ta)], tb[np.isfinite(tb)]
    if ta.size < 2 or tb.size < 2:
        notes.append(f"{scale} Welch t-test not computed: {scale} undefined for too many pairs")
        return row
    try:
        t = ct.welch_t(ta, tb)
    except ValueError:
        notes.append(f"{scale} Welch t-test not computed: no variation within either group")
        return row
    row.update(ttest_mean_difference=t.mean_difference, ttest_statistic=t.statistic, ttest_df=t.df,
               ttest_p=t.pvalue)
    return row
