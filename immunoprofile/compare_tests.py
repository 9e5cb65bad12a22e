"""Rank tests, estimators and p-value adjustment for small paired samples.

Pure functions over 1-d numpy arrays, written to give exactly what scipy gives
on the same vectors (``scipy.stats.wilcoxon``, ``ttest_rel``, ``ttest_ind``,
``mannwhitneyu``, ``friedmanchisquare``, ``false_discovery_control``; checked in
``tests/test_compare.py``), and to add what scipy does not: which method was
used, the smallest p-value attainable at the sample size, and Hodges-Lehmann
estimates with distribution-free confidence intervals. They are our own code
(not calls into scipy) so a cohort of 30 populations is analysed in
milliseconds, which the calibration tests need.

Conventions
-----------
* All tests are two-sided.
* Wilcoxon signed-rank follows ``scipy.stats.wilcoxon(x, y)`` with its defaults
  (``zero_method="wilcox"``, ``correction=False``, ``method="auto"``): zero
  differences are dropped; with no zeros and no ties and at most 50 pairs the
  exact null distribution is used; with zeros or ties and at most 13 pairs all
  ``2**n`` sign flips are enumerated (an exact permutation test, conditional on
  the ties); otherwise the normal approximation with tie correction.
* Mann-Whitney U follows ``scipy.stats.mannwhitneyu`` (``method="auto"``,
  continuity correction): exact when one group has at most 8 values and there
  are no ties, else the normal approximation.
* Friedman follows ``scipy.stats.friedmanchisquare`` (chi-square approximation
  with tie correction).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import numpy as np
from scipy import special

# Largest n for which the signed-rank null distribution is built exactly for
# confidence intervals (the p-value follows scipy's own limits, see above).
EXACT_CI_MAX_N = 200
# Largest n1 * n2 for which the Mann-Whitney null distribution is built exactly
# for confidence intervals.
EXACT_MWU_CI_MAX = 10_000

METHOD_EXACT = "exact"
METHOD_PERMUTATION = "exact_permutation"
METHOD_NORMAL = "normal_approximation"


# ---------------------------------------------------------------- ranks

def rank_average(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ranks (1-based, ties get their average rank) and the size of each tie group.

    Equal to ``scipy.stats.rankdata(x, method="average")`` for finite 1-d input,
    without its per-call overhead.

    Parameters
    ----------
    x
        Finite 1-d values.

    Returns
    -------
    tuple of numpy.ndarray
        ``(ranks, tie_sizes)``; ``tie_sizes`` has one entry per distinct value.

    Raises
    ------
    None
    """
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    sizes = np.diff(np.r_[starts, xs.size])
    avg = starts + (sizes + 1) / 2.0          # 1-based average rank of each tie group
    ranks = np.empty(x.size)
    ranks[order] = np.repeat(avg, sizes)
    return ranks, sizes


# ---------------------------------------------------------------- distributions

@functools.lru_cache(maxsize=None)
def signed_rank_pmf(n: int) -> np.ndarray:
    """Null distribution of the signed-rank statistic ``T+`` for ``n`` untied, non-zero differences.

    Parameters
    ----------
    n
        Number of non-zero differences (``n >= 0``).

    Returns
    -------
    numpy.ndarray
        ``pmf[t] = P(T+ = t)`` for ``t = 0 .. n(n+1)/2`` (read-only). The values are
        exact in floating point for ``n <= 50`` (counts over ``2**n``).

    Raises
    ------
    ValueError
        If ``n`` is negative.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    top = n * (n + 1) // 2
    pmf = np.zeros(top + 1)
    pmf[0] = 1.0
    hi = 0
    for k in range(1, n + 1):
        # rank k is either negative (T+ unchanged) or positive (T+ + k), each with probability 1/2
        shifted = pmf[: hi + 1].copy()
        pmf[: hi + 1] *= 0.5
        pmf[k: hi + k + 1] += 0.5 * shifted
        hi += k
    pmf.setflags(write=False)
    return pmf


@functools.lru_cache(maxsize=None)
def _sign_matrix(n: int) -> np.ndarray:
    """All ``2**n`` sign patterns as a 0/1 matrix (1 = positive)."""
    codes = np.arange(2 ** n, dtype=np.int64)
    out = ((codes[:, None] >> np.arange(n)) & 1).astype(np.float64)
    out.setflags(write=False)
    return out


@functools.lru_cache(maxsize=None)
def mann_whitney_pmf(n1: int, n2: int) -> np.ndarray:
    """Null distribution of the Mann-Whitney ``U`` for untied samples of sizes ``n1`` and ``n2``.

    Parameters
    ----------
    n1, n2
        Group sizes (``>= 0``); the distribution is symmetric in them.

    Returns
    -------
    numpy.ndarray
        ``pmf[u] = P(U = u)`` for ``u = 0 .. n1*n2`` (read-only).

    Raises
    ------
    ValueError
        If a size is negative.
    """
    if n1 < 0 or n2 < 0:
        raise ValueError(f"group sizes must be >= 0, got {n1}, {n2}")
    m, n = min(n1, n2), max(n1, n2)
    # rows[j] = pmf for sizes (i, j), built up over i; the largest of the i + j values
    # is in the first group with probability i / (i + j) and then beats all j of the other.
    rows = [np.ones(1) for _ in range(n + 1)]
    for i in range(1, m + 1):
        new = [np.zeros(1)] * (n + 1)
        new[0] = np.ones(1)
        for j in range(1, n + 1):
            out = np.zeros(i * j + 1)
            a = rows[j]           # sizes (i - 1, j): largest in group 1 adds j
            b = new[j - 1]        # sizes (i, j - 1): largest in group 2 adds 0
            out[j: j + a.size] += (i / (i + j)) * a
            out[: b.size] += (j / (i + j)) * b
            new[j] = out
        rows = new
    pmf = rows[n]
    pmf.setflags(write=False)
    return pmf


def _norm_two_sided(z: float) -> float:
    """``2 * min(Phi(z), 1 - Phi(z))`` as scipy computes it."""
    return float(2.0 * min(special.ndtr(z), special.ndtr(-z)))


# ---------------------------------------------------------------- signed rank

@dataclass(frozen=True)
class SignedRankResult:
    """Outcome of a two-sided Wilcoxon signed-rank test.

    Attributes
    ----------
    statistic
        ``min(R+, R-)``, as ``scipy.stats.wilcoxon`` reports it.
    pvalue
        Two-sided p-value.
    method
        ``exact``, ``exact_permutation`` or ``normal_approximation``.
    n_nonzero
        Differences that entered the test (zeros are dropped).
    n_zero
        Zero differences (dropped, Wilcoxon's method).
    ties
        Whether non-zero absolute differences are tied.
    p_min
        Smallest two-sided p-value the sign-flip distribution can give at
        ``n_nonzero`` (``2 / 2**n_nonzero``, at most 1).
    """

    statistic: float
    pvalue: float
    method: str
    n_nonzero: int
    n_zero: int
    ties: bool
    p_min: float


def smallest_signed_rank_p(n_nonzero: int) -> float:
    """Smallest two-sided p-value of the exact signed-rank test with ``n_nonzero`` pairs.

    Parameters
    ----------
    n_nonzero
        Number of non-zero paired differences.

    Returns
    -------
    float
        ``min(1, 2 / 2**n_nonzero)``: 0.125 at n = 4, 0.0625 at n = 5, 0.03125 at n = 6.

    Raises
    ------
    ValueError
        If ``n_nonzero`` is negative.
    """
    if n_nonzero < 0:
        raise ValueError(f"n must be >= 0, got {n_nonzero}")
    return min(1.0, 2.0 ** (1 - n_nonzero))


def wilcoxon_signed_rank(d: np.ndarray) -> SignedRankResult:
    """Two-sided Wilcoxon signed-rank test on paired differences (``post - pre``).

    Same statistic and p-value as ``scipy.stats.wilcoxon(post, pre)`` with its
    defaults; the method choice is described in the module docstring.

    Parameters
    ----------
    d
        Finite paired differences; at least one must be non-zero.

    Returns
    -------
    SignedRankResult

    Raises
    ------
    ValueError
        If ``d`` is empty, holds NaN or infinity, or is all zero.
    """
    d = np.asarray(d, dtype=np.float64)
    if d.ndim != 1 or d.size == 0:
        raise ValueError("need a non-empty 1-d array of differences")
    if not np.all(np.isfinite(d)):
        raise ValueError("differences must be finite")
    nonzero = d[d != 0]
    n_total, n = d.size, nonzero.size
    n_zero = n_total - n
    if n == 0:
        raise ValueError("all differences are zero")
    ranks, tie_counts = rank_average(np.abs(nonzero))
    positive = nonzero > 0
    r_plus = float(ranks[positive].sum())
    r_minus = float(ranks[~positive].sum())
    ties = bool(np.any(tie_counts > 1))

    if n_total > 50:
        method = METHOD_NORMAL
    elif not ties and n_zero == 0:
        method = METHOD_EXACT
    elif n_total <= 13:
        method = METHOD_PERMUTATION
    else:
        method = METHOD_NORMAL

    if method == METHOD_EXACT:
        pmf = signed_rank_pmf(n)
        k = int(round(r_plus))
        cdf = float(pmf[: k + 1].sum())
        sf = float(pmf[k:].sum())
        p = min(1.0, 2.0 * min(sf, cdf))
    elif method == METHOD_PERMUTATION:
        # every sign pattern of the non-zero differences; zeros only multiply each
        # pattern by 2**n_zero, which cancels in the proportions
        null = _sign_matrix(n) @ ranks
        gamma = abs(np.finfo(np.float64).eps * 100 * r_plus)
        less = np.count_nonzero(null <= r_plus + gamma) / null.size
        greater = np.count_nonzero(null >= r_plus - gamma) / null.size
        p = min(1.0, 2.0 * min(less, greater))
    else:
        mean = n * (n + 1) / 4.0
        tie_term = float(np.sum(tie_counts.astype(np.float64) ** 3 - tie_counts))
        se = math.sqrt((n * (n + 1) * (2 * n + 1) - tie_term / 2.0) / 24.0)
        p = min(1.0, _norm_two_sided((r_plus - mean) / se))
    return SignedRankResult(
        statistic=min(r_plus, r_minus), pvalue=float(p), method=method, n_nonzero=n,
        n_zero=n_zero, ties=ties, p_min=smallest_signed_rank_p(n),
    )


# ---------------------------------------------------------------- Hodges-Lehmann

@dataclass(frozen=True)
class ShiftEstimate:
    """A Hodges-Lehmann estimate with its distribution-free confidence interval.

    Attributes
    ----------
    estimate
        Median of the Walsh averages (paired) or of the pairwise differences (two groups).
    ci_low, ci_high
        Interval bounds (NaN when no interval can be formed).
    level
        Confidence level the interval actually achieves under the null
        distribution (the attainable level closest to the one asked for).
    exact
        Whether the level comes from the exact null distribution (else from its
        normal approximation, for large samples).
    """

    estimate: float
    ci_low: float
    ci_high: float
    level: float
    exact: bool


def _closest_k(cdf: np.ndarray, n_values: int, level: float) -> tuple[int, float]:
    """Order-statistic index ``k`` (1-based) whose interval level is closest to ``level``.

    The interval ``[v_(k), v_(N+1-k)]`` covers with probability ``1 - 2 * cdf[k-1]``;
    on a tie in distance the higher level wins.
    """
    kmax = (n_values + 1) // 2
    ks = np.arange(1, kmax + 1)
    levels = 1.0 - 2.0 * cdf[ks - 1]
    ok = levels > 0
    if not np.any(ok):
        return 0, math.nan
    ks, levels = ks[ok], levels[ok]
    dist = np.round(np.abs(levels - level), 12)
    best = np.flatnonzero(dist == dist.min())
    i = best[np.argmax(levels[best])]
    return int(ks[i]), float(levels[i])


def hodges_lehmann_paired(d: np.ndarray, level: float = 0.95) -> ShiftEstimate:
    """Hodges-Lehmann estimate of the paired shift with a signed-rank confidence interval.

    The estimate is the median of the ``n(n+1)/2`` Walsh averages ``(d_i + d_j)/2``,
    ``i <= j``. The interval is ``[W_(k), W_(M+1-k)]`` over the sorted Walsh averages,
    with ``k`` chosen from the exact null distribution of the signed-rank statistic
    at ``n = len(d)`` so that the achieved level is the attainable one closest to
    ``level`` (Hollander & Wolfe, Nonparametric Statistical Methods, 3.2). Exact for
    continuous data; with ties or zeros the level is approximate.

    Parameters
    ----------
    d
        Finite paired differences (``post - pre``), zeros included.
    level
        Target confidence level.

    Returns
    -------
    ShiftEstimate

    Raises
    ------
    ValueError
        If ``d`` is empty or not finite, or ``level`` is not in (0, 1).
    """
    d = np.asarray(d, dtype=np.float64)
    if d.ndim != 1 or d.size == 0 or not np.all(np.isfinite(d)):
        raise ValueError("need a non-empty 1-d array of finite differences")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    n = d.size
    i, j = np.triu_indices(n)
    walsh = np.sort((d[i] + d[j]) / 2.0)
    estimate = float(np.median(walsh))
    m = walsh.size
    if n <= EXACT_CI_MAX_N:
        cdf = np.cumsum(signed_rank_pmf(n))
        exact = True
    else:
        mean, sd = n * (n + 1) / 4.0, math.sqrt(n * (n + 1) * (2 * n + 1) / 24.0)
        cdf = special.ndtr((np.arange(m + 1) + 0.5 - mean) / sd)
        exact = False
    k, achieved = _closest_k(cdf, m, level)
    if k == 0:
        return ShiftEstimate(estimate, math.nan, math.nan, math.nan, exact)
    return ShiftEstimate(estimate, float(walsh[k - 1]), float(walsh[m - k]), achieved, exact)


def hodges_lehmann_two_sample(x: np.ndarray, y: np.ndarray, level: float = 0.95) -> ShiftEstimate:
    """Hodges-Lehmann shift ``x - y`` between two independent samples, with a Mann-Whitney interval.

    The estimate is the median of all ``n1 * n2`` differences ``x_i - y_j``; the
    interval ``[D_(k), D_(N+1-k)]`` takes ``k`` from the exact Mann-Whitney null
    distribution (normal approximation when ``n1 * n2`` exceeds
    :data:`EXACT_MWU_CI_MAX`), at the attainable level closest to ``level``.

    Parameters
    ----------
    x, y
        Finite values of the two groups (each non-empty).
    level
        Target confidence level.

    Returns
    -------
    ShiftEstimate

    Raises
    ------
    ValueError
        If a group is empty or not finite, or ``level`` is not in (0, 1).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.size == 0 or y.size == 0 or not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("need two non-empty arrays of finite values")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    diffs = np.sort((x[:, None] - y[None, :]).ravel())
    estimate = float(np.median(diffs))
    m = diffs.size
    if m <= EXACT_MWU_CI_MAX:
        cdf = np.cumsum(mann_whitney_pmf(x.size, y.size))
        exact = True
    else:
        n1, n2 = x.size, y.size
        mean, sd = n1 * n2 / 2.0, math.sqrt(n1 * n2 * (n1 + n2 + 1) / 12.0)
        cdf = special.ndtr((np.arange(m + 1) + 0.5 - mean) / sd)
        exact = False
    k, achieved = _closest_k(cdf, m, level)
    if k == 0:
        return ShiftEstimate(estimate, math.nan, math.nan, math.nan, exact)
    return ShiftEstimate(estimate, float(diffs[k - 1]), float(diffs[m - k]), achieved, exact)


# ---------------------------------------------------------------- t tests

@dataclass(frozen=True)
class TTestResult:
    """Outcome of a two-sided t-test.

    Attributes
    ----------
    statistic, df, pvalue
        As ``scipy.stats.ttest_rel`` / ``ttest_ind(equal_var=False)`` report them.
    mean_difference
        Mean paired difference, or difference of group means.
    """

    statistic: float
    df: float
    pvalue: float
    mean_difference: float


def _t_two_sided(t: float, df: float) -> float:
    return float(min(1.0, 2.0 * special.stdtr(df, -abs(t))))


def paired_t(d: np.ndarray) -> TTestResult:
    """Two-sided paired t-test on differences; equal to ``scipy.stats.ttest_rel(post, pre)``.

    Parameters
    ----------
    d
        Finite paired differences (at least 2, not all equal).

    Returns
    -------
    TTestResult

    Raises
    ------
    ValueError
        If fewer than 2 differences are given, one is not finite, or all are equal
        (zero variance: the statistic is undefined).
    """
    d = np.asarray(d, dtype=np.float64)
    if d.size < 2 or not np.all(np.isfinite(d)):
        raise ValueError("need at least 2 finite differences")
    mean = float(np.mean(d))
    sd = float(np.std(d, ddof=1))
    if sd == 0.0:
        raise ValueError("all differences are equal: the t statistic is undefined")
    df = d.size - 1
    t = mean / (sd / math.sqrt(d.size))
    return TTestResult(statistic=float(t), df=float(df), pvalue=_t_two_sided(t, df), mean_difference=mean)


def welch_t(x: np.ndarray, y: np.ndarray) -> TTestResult:
    """Two-sided Welch t-test ``x`` vs ``y``; equal to ``scipy.stats.ttest_ind(x, y, equal_var=False)``.

    Parameters
    ----------
    x, y
        Finite values, at least 2 per group, not all equal within both groups.

    Returns
    -------
    TTestResult

    Raises
    ------
    ValueError
        If a group has fewer than 2 values or both have zero variance.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.size < 2 or y.size < 2 or not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("need at least 2 finite values per group")
    vx, vy = float(np.var(x, ddof=1)) / x.size, float(np.var(y, ddof=1)) / y.size
    if vx + vy == 0.0:
        raise ValueError("no variation in either group: the t statistic is undefined")
    diff = float(np.mean(x) - np.mean(y))
    t = diff / math.sqrt(vx + vy)
    df = (vx + vy) ** 2 / (vx ** 2 / (x.size - 1) + vy ** 2 / (y.size - 1))
    return TTestResult(statistic=float(t), df=float(df), pvalue=_t_two_sided(t, df), mean_difference=diff)


# ---------------------------------------------------------------- Mann-Whitney

@dataclass(frozen=True)
class MannWhitneyResult:
    """Outcome of a two-sided Mann-Whitney U test.

    Attributes
    ----------
    statistic
        ``U`` of the first sample, as ``scipy.stats.mannwhitneyu`` reports it.
    pvalue
        Two-sided p-value.
    method
        ``exact`` or ``normal_approximation``.
    ties
        Whether any values are tied.
    p_min
        Smallest two-sided p-value of the exact test at these sizes
        (``2 / C(n1 + n2, n1)``, at most 1).
    """

    statistic: float
    pvalue: float
    method: str
    ties: bool
    p_min: float


def mann_whitney(x: np.ndarray, y: np.ndarray) -> MannWhitneyResult:
    """Two-sided Mann-Whitney U test; equal to ``scipy.stats.mannwhitneyu(x, y)``.

    Parameters
    ----------
    x, y
        Finite values of the two groups (each non-empty).

    Returns
    -------
    MannWhitneyResult

    Raises
    ------
    ValueError
        If a group is empty or holds a non-finite value, or all values are equal.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.size == 0 or y.size == 0 or not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("need two non-empty arrays of finite values")
    n1, n2 = x.size, y.size
    both = np.concatenate([x, y])
    if np.all(both == both[0]):
        raise ValueError("all values are equal: the test is undefined")
    ranks, tie_counts = rank_average(both)
    u1 = float(ranks[:n1].sum() - n1 * (n1 + 1) / 2.0)
    u2 = n1 * n2 - u1
    u = max(u1, u2)
    ties = bool(np.any(tie_counts > 1))
    p_min = min(1.0, 2.0 / math.comb(n1 + n2, n1))
    if (n1 > 8 and n2 > 8) or ties:
        n = n1 + n2
        tie_term = float(np.sum(tie_counts.astype(np.float64) ** 3 - tie_counts))
        s = math.sqrt(n1 * n2 / 12.0 * ((n + 1) - tie_term / (n * (n - 1))))
        z = (u - n1 * n2 / 2.0 - 0.5) / s
        p = min(1.0, 2.0 * float(special.ndtr(-z)))
        return MannWhitneyResult(u1, p, METHOD_NORMAL, ties, p_min)
    pmf = mann_whitney_pmf(n1, n2)
    k = int(round(u))
    p = min(1.0, 2.0 * float(pmf[k:].sum()))
    return MannWhitneyResult(u1, p, METHOD_EXACT, ties, p_min)


# ---------------------------------------------------------------- Friedman

@dataclass(frozen=True)
class FriedmanResult:
    """Outcome of a Friedman test.

    Attributes
    ----------
    statistic, pvalue
        As ``scipy.stats.friedmanchisquare`` reports them (chi-square approximation).
    df
        Degrees of freedom (timepoints - 1).
    n_blocks
        Number of complete blocks (patients).
    """

    statistic: float
    pvalue: float
    df: int
    n_blocks: int


def friedman(values: np.ndarray) -> FriedmanResult:
    """Friedman test over a complete ``patients x timepoints`` table.

    Equal to ``scipy.stats.friedmanchisquare(*values.T)``.

    Parameters
    ----------
    values
        2-d array, one row per patient (block), one column per timepoint (>= 3),
        no missing values.

    Returns
    -------
    FriedmanResult

    Raises
    ------
    ValueError
        If fewer than 3 timepoints or 1 patient, a value is not finite, or every
        patient's values are all tied (the statistic is undefined).
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] < 3 or values.shape[0] < 1:
        raise ValueError("need a 2-d table with >= 1 patient and >= 3 timepoints")
    if not np.all(np.isfinite(values)):
        raise ValueError("values must be finite")
    n, k = values.shape
    ranks = np.empty_like(values)
    ties = 0.0
    for i, row in enumerate(values):
        ranks[i], t = rank_average(row)
        ties += float(np.sum(t * (t * t - 1.0)))
    c = 1.0 - ties / (k * (k * k - 1) * n)
    if c <= 0.0:
        raise ValueError("all values are tied within every patient: the statistic is undefined")
    ssbn = float(np.sum(ranks.sum(axis=0) ** 2))
    stat = (12.0 / (k * n * (k + 1)) * ssbn - 3.0 * n * (k + 1)) / c
    p = float(special.chdtrc(k - 1, stat))
    return FriedmanResult(statistic=float(stat), pvalue=p, df=k - 1, n_blocks=n)


# ---------------------------------------------------------------- multiplicity

def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values) over one family.

    NaN entries are not part of the family and stay NaN; over the finite ones the
    result equals ``scipy.stats.false_discovery_control(p, method="bh")``.

    Parameters
    ----------
    p
        p-values in [0, 1] or NaN.

    Returns
    -------
    numpy.ndarray
        Adjusted values, same shape.

    Raises
    ------
    ValueError
        If a finite value lies outside [0, 1].
    """
    p = np.asarray(p, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    vals = p[ok]
    if vals.size == 0:
        return out
    if np.any((vals < 0) | (vals > 1)):
        raise ValueError("p-values must lie in [0, 1]")
    m = vals.size
    order = np.argsort(vals, kind="stable")
    scaled = vals[order] * (m / np.arange(1, m + 1, dtype=np.float64))
    adjusted = np.minimum.accumulate(scaled[::-1])[::-1]
    q = np.empty(m)
    q[order] = np.clip(adjusted, 0.0, 1.0)
    out[ok] = q
    return out


# ---------------------------------------------------------------- exact Friedman

#: Largest number of intermediate states the exact Friedman distribution may use.
FRIEDMAN_EXACT_MAX_STATES = 60_000


def friedman_exact_p(values: np.ndarray) -> float:
    """Exact permutation p-value of the Friedman statistic (conditional on ties).

    Under the null hypothesis every ordering of a patient's values over the
    timepoints is equally likely; this enumerates the ``(k!)**n`` orderings
    through the distribution of the sorted column rank sums, which the statistic
    depends on alone (a dynamic programme over patients; the sorting uses the
    symmetry of the statistic in the timepoints).

    Parameters
    ----------
    values
        Complete ``patients x timepoints`` table (>= 3 timepoints).

    Returns
    -------
    float
        ``P(S >= S_observed)`` under the permutation distribution, or NaN when the
        distribution would need more than :data:`FRIEDMAN_EXACT_MAX_STATES` states.

    Raises
    ------
    ValueError
        As :func:`friedman`.
    """
    values = np.asarray(values, dtype=np.float64)
    friedman(values)  # validates (and raises) like the chi-square version
    n, k = values.shape
    ranks2 = np.rint(2.0 * np.array([rank_average(row)[0] for row in values])).astype(np.int64)  # integers
    perms = np.array(list(itertools.permutations(range(k))), dtype=np.int64)
    states = np.zeros((1, k), dtype=np.int64)
    weights = np.ones(1)
    for row in ranks2:
        if states.shape[0] * perms.shape[0] > FRIEDMAN_EXACT_MAX_STATES:
            return math.nan
        options = row[perms]                                    # k! orderings of this patient's ranks
        new = (states[:, None, :] + options[None, :, :]).reshape(-1, k)
        new.sort(axis=1)
        w = np.repeat(weights / perms.shape[0], perms.shape[0])
        states, inverse = np.unique(new, axis=0, return_inverse=True)
        weights = np.bincount(inverse.ravel(), weights=w, minlength=states.shape[0])
    # the statistic is increasing in the sum of squared rank sums (same n, k, ties)
    ss = np.sum(states.astype(np.float64) ** 2, axis=1)
    obs_ss = float(np.sum(ranks2.sum(axis=0).astype(np.float64) ** 2))
    p = float(weights[ss >= obs_ss - 1e-9 * max(1.0, obs_ss)].sum())
    return min(1.0, p)
