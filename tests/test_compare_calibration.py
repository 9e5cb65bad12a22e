"""Calibration and power of ``immunoprofile compare`` on simulated cohorts with known truth.

Truth: the simulator (:func:`immunoprofile.simulate.cohort_truth`, its fast
statistics-only path). With ``effect_size=0`` every population's pre/post
difference is exchangeable within patients (the simulator draws each timepoint's
deviation independently with the same SD), so every null hypothesis holds.
With ``effect_size=1`` responders' CD4 PD1+ share falls by 1.0 on the logit scale
after clofarabine (``docs/simulator.md``).

Sizes: 12 patients per null cohort. The exact two-sided signed-rank test at
n = 12 rejects at p < 0.05 with probability 0.0425 (its attainable level just
below 0.05), and its smallest p (0.00049) is small enough for Benjamini-Hochberg
to reject over 28 populations, so the FDR check is not vacuous.
"""

from __future__ import annotations

import numpy as np
import pytest

from immunoprofile.compare import compare_timepoints
from immunoprofile.compare_tests import signed_rank_pmf

try:  # the simulator is written in parallel; skip (never fail) only when it is absent
    from immunoprofile.simulate import cohort_truth
except ImportError as e:  # pragma: no cover - depends on the tree
    pytest.skip(f"immunoprofile.simulate.cohort_truth is not available ({e})", allow_module_level=True)

N_COHORTS = 500
N_PATIENTS = 12
TIMEPOINTS = ("pre", "post_clofarabine")
ALPHA = 0.05


def exact_size(n: int, alpha: float = ALPHA) -> float:
    """P(two-sided exact signed-rank p < alpha) under the null, from the exact distribution."""
    pmf = signed_rank_pmf(n)
    cdf = np.cumsum(pmf)
    sf = cdf[-1] - np.r_[0.0, cdf[:-1]]
    p = np.minimum(1.0, 2 * np.minimum(cdf, sf))
    return float(pmf[p < alpha].sum())


@pytest.fixture(scope="module")
def null_runs() -> dict[str, np.ndarray]:
    p, q, methods = [], [], []
    for seed in range(N_COHORTS):
        frame = cohort_truth(n_patients=N_PATIENTS, timepoints=TIMEPOINTS, effect_size=0.0, seed=seed)
        res = compare_timepoints(frame, list(TIMEPOINTS), measures=["pct_parent"]).paired
        p.append(res["p_value"].to_numpy(np.float64))
        q.append(res["q_value"].to_numpy(np.float64))
        methods += list(res["method"])
    return {"p": np.array(p), "q": np.array(q), "methods": np.array(methods)}


def test_null_cohorts_reject_at_the_nominal_rate(null_runs):
    p = null_runs["p"]
    assert p.shape == (N_COHORTS, 28)                   # both panels: 18 + 10 populations
    assert np.isfinite(p).all()
    rate = float(np.mean(p < ALPHA))
    assert 0.03 <= rate <= 0.07, rate
    # and it is the rate the exact test promises when no pair is tied (nearly all here)
    if np.mean(null_runs["methods"] == "exact") > 0.95:
        assert abs(rate - exact_size(N_PATIENTS)) < 0.01, (rate, exact_size(N_PATIENTS))


def test_benjamini_hochberg_keeps_the_false_discovery_rate_on_null_cohorts(null_runs):
    p, q = null_runs["p"], null_runs["q"]
    m = p.shape[1]
    # rejections are attainable (otherwise the check would be vacuous) ...
    assert 2.0 ** (1 - N_PATIENTS) < ALPHA / m
    # ... and every discovery is false: FDR = P(at least one q < 0.05)
    fdr = float(np.mean((q < ALPHA).any(axis=1)))
    assert fdr <= ALPHA, fdr
    # without adjustment most null cohorts would report something
    assert float(np.mean((p < ALPHA).any(axis=1))) > 0.3


def _responder_cd4_pd1(n_patients: int, n_cohorts: int, seed0: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    p, est, notes = [], [], []
    for s in range(n_cohorts):
        frame = cohort_truth(n_patients=n_patients, timepoints=TIMEPOINTS, effect_size=1.0, seed=seed0 + s,
                             panels=("t_cell",))
        res = compare_timepoints(frame, list(TIMEPOINTS), measures=["pct_parent"], by="group",
                                 populations=["CD4 PD1+"]).paired
        row = res[(res["analysis"] == "within") & (res["group"] == "responder")].iloc[0]
        p.append(row["p_value"])
        est.append(row["estimate"])
        notes.append(row["note"])
    return np.array(p), np.array(est), notes


def test_power_responders_cd4_pd1_fall_after_clofarabine():
    """18 patients (6 responders, round-robin groups): the planted fall is found in most cohorts."""
    p, est, _ = _responder_cd4_pd1(18, 100, seed0=50_000)
    assert np.mean(p < ALPHA) >= 0.8, np.mean(p < ALPHA)
    assert np.mean(est < 0) >= 0.95


def test_five_responders_cannot_reach_significance_and_say_so():
    """15 patients give 5 responders: the smallest attainable p is 0.0625, whatever the effect."""
    p, est, notes = _responder_cd4_pd1(15, 20, seed0=60_000)
    assert np.all(p >= 0.0625)
    assert all("n=5: smallest attainable p is 0.0625; no result can reach 0.05" in n for n in notes)
    assert np.mean(est < 0) >= 0.9
