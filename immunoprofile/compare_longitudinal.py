"""Longitudinal statistics of one population over three or more timepoints.

Per population and set of patients:

* Friedman test on the patients seen at every timepoint (scipy's chi-square
  p-value, plus the exact permutation p-value when the design is small enough to
  enumerate; ``friedman_p`` is the exact one when available);
* the within-patient model of :mod:`immunoprofile.compare_model` on the
  transformed scale, which keeps patients with a missed visit: an overall F test
  and each timepoint against the baseline.

Each timepoint against the baseline with the paired tests is in
``paired_stats.csv`` (see :mod:`immunoprofile.compare`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import compare_tests as ct
from .compare_model import MIXED_MODEL_NAME, MODEL_NAME, random_intercept_model, within_patient_model
from .compare_paired import MIN_PAIRS


def longitudinal_rows(value: np.ndarray, transformed: np.ndarray, timepoints: Sequence[str],
                      days: dict[str, float], scale: str, level: float = 0.95) -> list[dict[str, Any]]:
    """Rows of ``longitudinal_stats.csv`` for one population (one row per timepoint).

    Parameters
    ----------
    value, transformed
        ``patients x timepoints`` tables of the measure and of its transformed
        value (NaN for a missed or excluded visit).
    timepoints
        Names, baseline first.
    days
        Median day of each timepoint (NaN when unknown).
    scale
        Transformed scale name (``logit``, ``log_ratio`` or ``log``).
    level
        Confidence level of the model's intervals.

    Returns
    -------
    list of dict
        The statistic columns; the overall tests repeat on every row; ``note`` is
        a list of strings (on every row).

    Raises
    ------
    None
    """
    value = np.asarray(value, dtype=np.float64)
    transformed = np.asarray(transformed, dtype=np.float64)
    k = len(timepoints)
    seen = np.isfinite(value)
    n_patients = int(np.count_nonzero(seen.any(axis=1)))
    complete = seen.all(axis=1)
    n_complete = int(np.count_nonzero(complete))
    notes: list[str] = []
    overall: dict[str, Any] = {
        "n_patients": n_patients, "n_complete": n_complete, "friedman_statistic": math.nan,
        "friedman_df": k - 1, "friedman_p_chi2": math.nan, "friedman_p_exact": math.nan, "friedman_method": "",
        "friedman_p": math.nan,
    }
    table = value[complete]
    if n_complete < MIN_PAIRS:
        notes.append(f"Friedman: only {n_complete} patient(s) seen at every timepoint (need at least {MIN_PAIRS})")
    elif np.all(table == table[:, :1]):
        notes.append("Friedman: every patient has the same value at every timepoint: nothing to test")
    else:
        try:
            fr = ct.friedman(table)
        except ValueError:
            notes.append("Friedman: values tied within every patient: nothing to test")
        else:
            exact = ct.friedman_exact_p(table)
            overall.update(friedman_statistic=fr.statistic, friedman_p_chi2=fr.pvalue, friedman_p_exact=exact)
            if math.isfinite(exact):
                overall.update(friedman_method="exact", friedman_p=exact)
            else:
                overall.update(friedman_method="chi-square", friedman_p=fr.pvalue)
                notes.append("Friedman: chi-square approximation (too many patients to enumerate)")
            if n_complete < n_patients:
                notes.append(f"Friedman uses the {n_complete} of {n_patients} patients seen at every timepoint")
    model = within_patient_model(transformed, level)
    overall.update(model=MODEL_NAME, model_scale=scale, model_n_obs=model.n_obs, model_n_patients=model.n_patients,
                   model_f=model.f, model_df_num=model.df_num, model_df_den=model.df_den, model_p=model.pvalue)
    if not math.isfinite(model.pvalue):
        if np.any(np.isfinite(value)) and not np.any(np.isfinite(transformed)):
            notes.append(f"model: the {scale} scale is undefined for this population")
        else:
            notes.append("model: not estimable (too few patients with two or more visits, or no variation "
                         "within patients)")
    mixed = random_intercept_model(transformed, level)
    overall.update(mixed_model=MIXED_MODEL_NAME, mixed_n_obs=mixed.n_obs, mixed_n_patients=mixed.n_patients,
                   mixed_chi2=mixed.chi2, mixed_df=mixed.df, mixed_p=mixed.pvalue, mixed_patient_sd=mixed.patient_sd,
                   mixed_residual_sd=mixed.residual_sd, mixed_converged=mixed.converged)
    if not math.isfinite(mixed.pvalue):
        notes.append("mixed model: not estimable (fewer than 3 patients, no variation, or no convergence)")
    rows = []
    for j, tp in enumerate(timepoints):
        col = value[:, j]
        col = col[np.isfinite(col)]
        row = dict(overall)
        row.update(timepoint=tp, timepoint_index=j, day_median=days.get(tp, math.nan), n_samples=int(col.size),
                   median=float(np.median(col)) if col.size else math.nan,
                   model_estimate=float(model.estimate[j]), model_ci_low=float(model.ci_low[j]),
                   model_ci_high=float(model.ci_high[j]), model_p_vs_baseline=float(model.p_each[j]),
                   mixed_estimate=float(mixed.estimate[j]), mixed_ci_low=float(mixed.ci_low[j]),
                   mixed_ci_high=float(mixed.ci_high[j]), mixed_p_vs_baseline=float(mixed.p_each[j]),
                   note=list(notes))
        rows.append(row)
    return rows
