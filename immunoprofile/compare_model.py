"""Longitudinal model: timepoint effects within patients, tolerant of missing visits.

The issue asks for a mixed model with a per-patient random intercept. A correct
(RE)ML fit needs ``statsmodels`` (``MixedLM``), which is not a dependency yet;
rather than a hand-rolled REML, this module fits the model that needs no
variance-component estimate and is exact in small samples: ordinary least
squares with a fixed intercept per patient (the "within-patient" or fixed-effects
estimator)::

    y[patient, t] = a[patient] + b[t] + error,    b[baseline] = 0

on logit frequencies (or log counts). It uses every observation of a patient with
two or more visits, so a missed visit removes one value, not the patient; a
patient seen once carries no information on change and is left out (counted in
``n_patients`` only if it contributes). With complete data the timepoint
estimates, their t-tests and the overall F test equal the repeated-measures
ANOVA, and with two timepoints the paired t-test (checked in the tests). It
differs from a random-intercept model only in ignoring the between-patient
information of incomplete patients, which makes it, if anything, conservative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import special

MODEL_NAME = "within-patient OLS (fixed patient intercepts)"


@dataclass(frozen=True)
class WithinModelResult:
    """Fit of :func:`within_patient_model`.

    Attributes
    ----------
    n_obs, n_patients
        Observations and patients that contribute (patients with >= 2 visits).
    f, df_num, df_den, pvalue
        Overall F test that all timepoint effects are zero.
    estimate, se, ci_low, ci_high, p_each
        Per timepoint (index 0 = baseline, always NaN): effect vs baseline on the
        model scale, its standard error, 95% confidence interval and t-test p.
    """

    n_obs: int
    n_patients: int
    f: float
    df_num: int
    df_den: int
    pvalue: float
    estimate: np.ndarray
    se: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    p_each: np.ndarray


def _check_table(y: np.ndarray) -> np.ndarray:
    y = np.asarray(y, dtype=np.float64)
    if y.ndim != 2 or y.shape[1] < 2:
        raise ValueError("need a patients x timepoints table with >= 2 timepoints")
    if np.any(np.isinf(y)):
        raise ValueError("values must be finite or NaN")
    return y


def within_patient_model(y: np.ndarray, level: float = 0.95) -> WithinModelResult:
    """Fit timepoint effects with a fixed intercept per patient.

    Parameters
    ----------
    y
        ``patients x timepoints`` table on the model scale; NaN marks a missed
        visit. Column 0 is the baseline.
    level
        Confidence level of the per-timepoint intervals.

    Returns
    -------
    WithinModelResult
        NaN wherever a quantity is not estimable (too few observations, no
        residual degrees of freedom, a timepoint never observed together with
        another visit of the same patient, or a perfect fit).

    Raises
    ------
    ValueError
        If ``y`` is not 2-d with at least 2 columns, or holds infinities.
    """
    y = _check_table(y)
    n_t = y.shape[1]
    nan_t = np.full(n_t, np.nan)
    observed = np.isfinite(y)
    keep = observed.sum(axis=1) >= 2
    y, observed = y[keep], observed[keep]
    n_pat = int(y.shape[0])
    n_obs = int(observed.sum())

    def empty(n_obs_: int = n_obs, n_pat_: int = n_pat) -> WithinModelResult:
        return WithinModelResult(n_obs_, n_pat_, math.nan, 0, 0, math.nan, nan_t.copy(), nan_t.copy(),
                                 nan_t.copy(), nan_t.copy(), nan_t.copy())

    if n_pat == 0:
        return empty()
    rows, cols = np.nonzero(observed)
    values = y[rows, cols]
    # timepoints (other than baseline) with at least one observation in a contributing patient
    t_cols = [t for t in range(1, n_t) if np.any(cols == t)]
    x = np.zeros((n_obs, n_pat + len(t_cols)))
    x[np.arange(n_obs), rows] = 1.0
    for j, t in enumerate(t_cols):
        x[cols == t, n_pat + j] = 1.0
    rank = int(np.linalg.matrix_rank(x))
    if rank < x.shape[1]:
        # disconnected design (e.g. some patients seen only at t0, t1, others only at t2, t3):
        # the timepoint effects cannot all be separated from the patient intercepts
        return empty()
    df_den = n_obs - rank
    df_num = len(t_cols)
    if df_den <= 0 or df_num == 0:
        return empty()
    xtx_inv = np.linalg.inv(x.T @ x)
    beta = xtx_inv @ (x.T @ values)
    resid = values - x @ beta
    rss = float(resid @ resid)
    # reduced model: patient means only
    means = np.bincount(rows, weights=values, minlength=n_pat) / np.bincount(rows, minlength=n_pat)
    rss0 = float(np.sum((values - means[rows]) ** 2))
    est, se, lo, hi, pe = (nan_t.copy() for _ in range(5))
    tiny = 1e-24 * max(1.0, float(np.sum(values ** 2)))
    if rss0 <= tiny:  # no variation within any patient: nothing to test
        return empty()
    sigma2 = rss / df_den
    if rss <= tiny:  # perfect fit: effects are estimable but untestable
        for j, t in enumerate(t_cols):
            est[t] = beta[n_pat + j]
        return WithinModelResult(n_obs, n_pat, math.nan, df_num, df_den, math.nan, est, se, lo, hi, pe)
    f = ((rss0 - rss) / df_num) / sigma2
    p = float(special.fdtrc(df_num, df_den, max(f, 0.0)))
    crit = float(special.stdtrit(df_den, 0.5 + level / 2.0))
    for j, t in enumerate(t_cols):
        b = float(beta[n_pat + j])
        s = math.sqrt(sigma2 * xtx_inv[n_pat + j, n_pat + j])
        est[t], se[t] = b, s
        lo[t], hi[t] = b - crit * s, b + crit * s
        pe[t] = min(1.0, 2.0 * float(special.stdtr(df_den, -abs(b / s))))
    return WithinModelResult(n_obs, n_pat, float(f), df_num, df_den, p, est, se, lo, hi, pe)


MIXED_MODEL_NAME = "linear mixed model, random patient intercept (statsmodels MixedLM, REML)"


@dataclass(frozen=True)
class MixedModelResult:
    """Fit of :func:`random_intercept_model` (Wald tests, normal reference as in statsmodels).

    Attributes
    ----------
    n_obs, n_patients
        Observations and patients used (every patient with at least one visit).
    chi2, df, pvalue
        Wald test that all timepoint effects are zero.
    estimate, se, ci_low, ci_high, p_each
        Per timepoint (index 0 = baseline, NaN): effect vs baseline, as in :class:`WithinModelResult`.
    patient_sd, residual_sd
        Estimated SD of the patient intercepts and of the residuals.
    converged
        Whether the optimiser converged (results are NaN when it did not).
    """

    n_obs: int
    n_patients: int
    chi2: float
    df: int
    pvalue: float
    estimate: np.ndarray
    se: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    p_each: np.ndarray
    patient_sd: float
    residual_sd: float
    converged: bool


def random_intercept_model(y: np.ndarray, level: float = 0.95) -> MixedModelResult:
    """Timepoint effects with a random intercept per patient, fitted by REML.

    ``y`` is a ``patients x timepoints`` table on the model scale (logit frequencies or log
    counts), NaN for a missed visit; column 0 is the baseline. Unlike
    :func:`within_patient_model`, patients seen once also contribute (through the
    between-patient information), which is what a random intercept buys.

    Raises
    ------
    ValueError
        If ``y`` is not 2-d with at least 2 columns, or holds infinities.
    """
    import warnings

    from scipy import stats as sstats

    y = _check_table(y)
    n_t = y.shape[1]
    nan_t = np.full(n_t, np.nan)
    rows, cols = np.nonzero(np.isfinite(y))
    values = y[rows, cols]
    n_obs, n_pat = int(values.size), int(np.unique(rows).size)

    def empty(converged: bool = False) -> MixedModelResult:
        return MixedModelResult(n_obs, n_pat, math.nan, 0, math.nan, nan_t.copy(), nan_t.copy(), nan_t.copy(),
                                nan_t.copy(), nan_t.copy(), math.nan, math.nan, converged)

    t_cols = [t for t in range(1, n_t) if np.any(cols == t)]
    if n_pat < 3 or not t_cols or n_obs <= n_pat + len(t_cols) or np.ptp(values) == 0:
        return empty()
    x = np.zeros((n_obs, 1 + len(t_cols)))
    x[:, 0] = 1.0
    for j, t in enumerate(t_cols):
        x[cols == t, 1 + j] = 1.0
    if np.linalg.matrix_rank(x) < x.shape[1]:
        return empty()
    from statsmodels.regression.mixed_linear_model import MixedLM

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fit = MixedLM(values, x, groups=rows).fit(reml=True, method=["lbfgs", "powell"])
        except (np.linalg.LinAlgError, ValueError):
            return empty()
    converged = bool(getattr(fit, "converged", True)) and not any(
        "converge" in str(w.message).lower() for w in caught)
    k = len(t_cols)
    beta = np.asarray(fit.fe_params)[1:]
    cov = np.asarray(fit.cov_params())[1:1 + k, 1:1 + k]
    if not np.all(np.isfinite(cov)) or not converged:
        return empty(converged)
    se_k = np.sqrt(np.diag(cov))
    z = sstats.norm.ppf(0.5 + level / 2.0)
    est, se, lo, hi, pe = (nan_t.copy() for _ in range(5))
    for j, t in enumerate(t_cols):
        est[t], se[t] = beta[j], se_k[j]
        lo[t], hi[t] = beta[j] - z * se_k[j], beta[j] + z * se_k[j]
        pe[t] = float(2 * sstats.norm.sf(abs(beta[j] / se_k[j]))) if se_k[j] > 0 else math.nan
    try:
        chi2 = float(beta @ np.linalg.solve(cov, beta))
    except np.linalg.LinAlgError:
        chi2 = math.nan
    p = float(sstats.chi2.sf(chi2, k)) if math.isfinite(chi2) else math.nan
    patient_var = float(np.asarray(fit.cov_re).ravel()[0]) if np.size(fit.cov_re) else math.nan
    return MixedModelResult(n_obs, n_pat, chi2, k, p, est, se, lo, hi, pe,
                            math.sqrt(max(patient_var, 0.0)), math.sqrt(float(fit.scale)), converged)
