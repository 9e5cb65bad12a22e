"""Tests of immunoprofile.compare (paired and longitudinal statistics), results and the CLI.

Truth comes from scipy on the same vectors (wilcoxon, ttest_rel, ttest_ind,
mannwhitneyu, friedmanchisquare, false_discovery_control, f), from brute-force
enumeration of null distributions, and from numpy hand computations.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats as st
from hypothesis import given, settings
from hypothesis import strategies as hs

from immunoprofile import compare_tests as ct
from immunoprofile.compare import (EXCLUSION_COLUMNS, LONGITUDINAL_COLUMNS, PAIRED_COLUMNS, compare_timepoints,
                                   paired_stats)
from immunoprofile.compare_model import within_patient_model
from immunoprofile.compare_pairs import MEASURES
from immunoprofile.errors import ResultsError, UsageError
from immunoprofile.results import load_populations

RTOL = 1e-10


# --------------------------------------------------------------------------- helpers

def walsh_median_loop(d: np.ndarray) -> float:
    return float(np.median([(d[i] + d[j]) / 2 for i in range(len(d)) for j in range(i, len(d))]))


POPS = (("lymphocytes", "root"), ("CD4 T", "lymphocytes"), ("CD4 PD1+", "CD4 T"), ("CD4 rare", "CD4 T"))


def make_frame(n_patients: int = 8, timepoints=("pre", "post"), seed: int = 0, shift: float = 0.0,
               panels=("t_cell",), days=None, groups=("R", "NR")) -> pd.DataFrame:
    """A small populations table with known counts (binomial draws from patient logits)."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        pid = f"P{p + 1:02d}"
        base = rng.normal(-1.0, 0.6)
        for j, tp in enumerate(timepoints):
            for panel in panels:
                root = 20000
                lym = int(rng.binomial(root, 0.6))
                cd4 = int(rng.binomial(lym, 0.5))
                logit = base + (shift if j > 0 else 0.0) + rng.normal(0, 0.3)
                pd1 = int(rng.binomial(cd4, 1 / (1 + math.exp(-logit))))
                rare = 0
                counts = {"root": root, "lymphocytes": lym, "CD4 T": cd4, "CD4 PD1+": pd1, "CD4 rare": rare}
                sid = f"{pid}_{tp}_{panel}"
                for name, parent in POPS:
                    c, pc = counts[name], counts[parent]
                    rows.append({
                        "sample_id": sid, "file": sid + ".fcs", "patient_id": pid, "timepoint": tp,
                        "day": (days[j] if days else j * 10), "group": groups[p % len(groups)], "panel": panel,
                        "batch": f"B{j + 1}", "control": "", "population": name, "parent": parent, "count": c,
                        "parent_count": pc, "pct_parent": 100.0 * c / pc if pc else math.nan,
                        "reference": "lymphocytes", "pct_of": 100.0 * c / lym if lym else math.nan,
                        "cells_per_ul": math.nan, "template": "t", "template_version": "1",
                        "template_sha256": "x", "file_sha256": "y",
                    })
    return pd.DataFrame(rows)


def pick(df: pd.DataFrame, **kw) -> pd.Series:
    sub = df
    for k, v in kw.items():
        sub = sub[sub[k] == v]
    assert len(sub) == 1, (kw, len(sub))
    return sub.iloc[0]


def pairs_from_frame(frame: pd.DataFrame, population: str, a: str, b: str, col: str = "pct_parent",
                     panel: str = "t_cell"):
    sub = frame[(frame["population"] == population) & (frame["panel"] == panel)]
    wide = sub.pivot(index="patient_id", columns="timepoint", values=col).dropna()
    return wide[a].to_numpy(), wide[b].to_numpy(), wide.index.to_list()


# --------------------------------------------------------------------------- null distributions

@pytest.mark.parametrize("n", range(0, 11))
def test_signed_rank_pmf_equals_enumeration(n):
    sums = [sum(r for r, s in zip(range(1, n + 1), signs) if s) for signs in itertools.product((0, 1), repeat=n)]
    counts = np.bincount(np.array(sums, dtype=int), minlength=n * (n + 1) // 2 + 1)
    assert np.array_equal(ct.signed_rank_pmf(n), counts / 2 ** n)


@pytest.mark.parametrize("n1,n2", [(1, 1), (1, 4), (2, 3), (3, 3), (4, 2), (3, 5), (5, 5)])
def test_mann_whitney_pmf_equals_enumeration(n1, n2):
    us = []
    for combo in itertools.combinations(range(n1 + n2), n1):
        x = np.array(combo)
        y = np.setdiff1d(np.arange(n1 + n2), x)
        us.append(int(np.sum(x[:, None] > y[None, :])))
    counts = np.bincount(us, minlength=n1 * n2 + 1)
    assert np.allclose(ct.mann_whitney_pmf(n1, n2), counts / math.comb(n1 + n2, n1), rtol=1e-12, atol=0)


# --------------------------------------------------------------------------- Wilcoxon vs scipy

def _wilcoxon_cases():
    rng = np.random.default_rng(11)
    cases = []
    for n in (1, 2, 3, 4, 5, 8, 13, 20, 50, 51, 80):
        cases.append(("continuous", rng.normal(size=n)))
    for n in (3, 6, 10, 13, 14, 30, 60):
        cases.append(("ties", np.round(rng.normal(size=n), 1)))
    for n in (4, 9, 13, 14, 40, 70):
        d = rng.normal(size=n)
        d[: max(1, n // 4)] = 0.0
        cases.append(("zeros", d))
    cases.append(("integers", rng.integers(-3, 4, size=12).astype(float)))
    return [c for c in cases if np.any(c[1] != 0)]


@pytest.mark.parametrize("kind,d", _wilcoxon_cases(), ids=lambda v: v if isinstance(v, str) else str(len(v)))
def test_wilcoxon_equals_scipy(kind, d):
    pre = np.linspace(10, 20, d.size)
    post = pre + d
    mine = ct.wilcoxon_signed_rank(post - pre)
    ref = st.wilcoxon(post, pre)
    assert mine.statistic == pytest.approx(float(ref.statistic), rel=1e-12)
    assert mine.pvalue == pytest.approx(float(ref.pvalue), rel=RTOL)
    # the method label follows scipy's rule for method="auto"
    dd = post - pre
    has_zero, nz = bool(np.any(dd == 0)), dd[dd != 0]
    ties = len(np.unique(np.abs(nz))) < nz.size
    expected = ("normal_approximation" if dd.size > 50 else "exact" if not (ties or has_zero)
                else "exact_permutation" if dd.size <= 13 else "normal_approximation")
    assert mine.method == expected
    if expected == "exact":
        assert mine.pvalue == pytest.approx(float(st.wilcoxon(post, pre, method="exact").pvalue), rel=RTOL)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(hs.lists(hs.integers(-6, 6), min_size=1, max_size=25), hs.integers(1, 4))
def test_wilcoxon_equals_scipy_property(values, scale):
    d = np.array(values, dtype=float) / scale
    if not np.any(d != 0):
        return
    mine = ct.wilcoxon_signed_rank(d)
    ref = st.wilcoxon(d)
    assert mine.statistic == pytest.approx(float(ref.statistic), rel=1e-12)
    assert mine.pvalue == pytest.approx(float(ref.pvalue), rel=RTOL)


def test_smallest_attainable_p_is_reached_by_scipy():
    for n in range(1, 12):
        d = np.arange(1.0, n + 1)
        assert ct.smallest_signed_rank_p(n) == pytest.approx(float(st.wilcoxon(d).pvalue), rel=1e-12)
    assert ct.smallest_signed_rank_p(4) == 0.125


def test_wilcoxon_rejects_all_zero():
    with pytest.raises(ValueError):
        ct.wilcoxon_signed_rank(np.zeros(5))


# --------------------------------------------------------------------------- other tests vs scipy

def test_paired_and_welch_t_equal_scipy():
    rng = np.random.default_rng(2)
    for n in (2, 3, 5, 12, 40):
        a, b = rng.normal(size=n), rng.normal(0.3, 2, size=n)
        mine, ref = ct.paired_t(b - a), st.ttest_rel(b, a)
        assert (mine.statistic, mine.pvalue, mine.df) == pytest.approx((ref.statistic, ref.pvalue, ref.df), rel=RTOL)
        y = rng.normal(1, 3, size=n + 2)
        mine, ref = ct.welch_t(a, y), st.ttest_ind(a, y, equal_var=False)
        assert (mine.statistic, mine.pvalue, mine.df) == pytest.approx((ref.statistic, ref.pvalue, ref.df), rel=RTOL)
    with pytest.raises(ValueError):
        ct.paired_t(np.ones(4))


@pytest.mark.parametrize("n1,n2,tied", [(3, 3, False), (4, 5, False), (2, 9, False), (8, 8, False), (9, 9, False),
                                        (12, 20, False), (4, 4, True), (10, 12, True), (1, 1, False)])
def test_mann_whitney_equals_scipy(n1, n2, tied):
    rng = np.random.default_rng(n1 * 100 + n2)
    if tied:
        x, y = rng.integers(0, 4, n1).astype(float), rng.integers(0, 4, n2).astype(float)
    else:
        x, y = rng.normal(size=n1), rng.normal(0.5, 1, size=n2)
    mine, ref = ct.mann_whitney(x, y), st.mannwhitneyu(x, y)
    assert mine.statistic == pytest.approx(float(ref.statistic), rel=1e-12)
    assert mine.pvalue == pytest.approx(float(ref.pvalue), rel=RTOL)
    assert mine.p_min == pytest.approx(min(1.0, 2 / math.comb(n1 + n2, n1)))


def test_friedman_equals_scipy_and_exact_equals_enumeration():
    rng = np.random.default_rng(4)
    for n, k, tied in ((3, 3, False), (5, 3, True), (4, 4, False), (10, 3, False), (2, 5, True)):
        v = rng.integers(0, 3, (n, k)).astype(float) if tied else rng.normal(size=(n, k))
        try:
            mine = ct.friedman(v)
        except ValueError:
            continue
        ref = st.friedmanchisquare(*v.T)
        assert (mine.statistic, mine.pvalue) == pytest.approx((ref.statistic, ref.pvalue), rel=RTOL)
        if math.factorial(k) ** n <= 10_000:
            # brute force: every within-patient ordering equally likely
            ranks = st.rankdata(v, axis=1)
            obs = np.sum(ranks.sum(axis=0) ** 2)
            perms = list(itertools.permutations(range(k)))
            hits = [np.sum(sum(ranks[i][list(p)] for i, p in enumerate(c)) ** 2) >= obs - 1e-9
                    for c in itertools.product(perms, repeat=n)]
            assert ct.friedman_exact_p(v) == pytest.approx(np.mean(hits), rel=1e-12)


def test_benjamini_hochberg_equals_scipy_and_skips_nan():
    rng = np.random.default_rng(5)
    for m in (2, 5, 28, 100):
        p = rng.uniform(size=m) ** 3
        assert np.allclose(ct.benjamini_hochberg(p), st.false_discovery_control(p), rtol=0, atol=1e-15)
    p = np.array([0.01, np.nan, 0.04, 0.03, np.nan])
    q = ct.benjamini_hochberg(p)
    assert np.isnan(q[[1, 4]]).all()
    assert np.allclose(q[[0, 2, 3]], st.false_discovery_control(p[[0, 2, 3]]))


# --------------------------------------------------------------------------- Hodges-Lehmann

def test_hodges_lehmann_paired_estimate_and_interval_duality():
    """0 lies outside the interval exactly when scipy's exact test rejects at 1 - achieved level."""
    rng = np.random.default_rng(6)
    for trial in range(300):
        n = int(rng.integers(3, 16))
        d = rng.normal(rng.uniform(-1.5, 1.5), 1, size=n)
        hl = ct.hodges_lehmann_paired(d)
        assert hl.estimate == pytest.approx(walsh_median_loop(d), rel=1e-12)
        p = float(st.wilcoxon(d, method="exact").pvalue)
        outside = hl.ci_low > 0 or hl.ci_high < 0
        assert outside == (p <= 1 - hl.level + 1e-12), (d, hl, p)
    # achieved level = 1 - 2 P(T+ <= k-1) from the enumerated distribution, the closest to 95%
    assert ct.hodges_lehmann_paired(rng.normal(size=4)).level == 0.875
    assert ct.hodges_lehmann_paired(rng.normal(size=5)).level == 0.9375
    for n in (6, 8, 10):
        sums = np.array([sum(r for r, s in zip(range(1, n + 1), signs) if s)
                         for signs in itertools.product((0, 1), repeat=n)])
        levels = [1 - 2 * np.mean(sums <= k - 1) for k in range(1, n * (n + 1) // 4 + 1)]
        best = min(levels, key=lambda lv: (round(abs(lv - 0.95), 12), -lv))
        assert ct.hodges_lehmann_paired(rng.normal(size=n)).level == pytest.approx(best, rel=1e-12)


def test_hodges_lehmann_two_sample_interval_duality():
    rng = np.random.default_rng(7)
    for trial in range(200):
        n1, n2 = int(rng.integers(3, 8)), int(rng.integers(3, 8))
        x, y = rng.normal(rng.uniform(-2, 2), 1, n1), rng.normal(size=n2)
        hl = ct.hodges_lehmann_two_sample(x, y)
        assert hl.estimate == pytest.approx(float(np.median(np.subtract.outer(x, y))), rel=1e-12)
        p = float(st.mannwhitneyu(x, y, method="exact").pvalue)
        assert (hl.ci_low > 0 or hl.ci_high < 0) == (p <= 1 - hl.level + 1e-12)


# --------------------------------------------------------------------------- within-patient model

def test_model_two_timepoints_equals_paired_t():
    rng = np.random.default_rng(8)
    y = rng.normal(size=(9, 1)) + np.c_[np.zeros(9), rng.normal(0.4, 0.5, 9)]
    m = within_patient_model(y)
    ref = st.ttest_rel(y[:, 1], y[:, 0])
    assert m.estimate[1] == pytest.approx(np.mean(y[:, 1] - y[:, 0]), rel=1e-12)
    assert m.p_each[1] == pytest.approx(ref.pvalue, rel=1e-9)
    assert m.pvalue == pytest.approx(ref.pvalue, rel=1e-9)
    assert m.f == pytest.approx(ref.statistic ** 2, rel=1e-9)


def test_model_complete_equals_repeated_measures_anova_and_ignores_single_visits():
    rng = np.random.default_rng(9)
    n, k = 7, 3
    y = rng.normal(size=(n, 1)) * 2 + rng.normal(size=(n, k)) + np.array([0, 0.5, -0.2])
    grand = y.mean()
    ss_time = n * np.sum((y.mean(axis=0) - grand) ** 2)
    ss_subj = k * np.sum((y.mean(axis=1) - grand) ** 2)
    ss_err = np.sum((y - grand) ** 2) - ss_time - ss_subj
    df1, df2 = k - 1, (n - 1) * (k - 1)
    f = (ss_time / df1) / (ss_err / df2)
    m = within_patient_model(y)
    assert m.f == pytest.approx(f, rel=1e-9)
    assert m.pvalue == pytest.approx(st.f.sf(f, df1, df2), rel=1e-9)
    assert m.estimate[1:] == pytest.approx(y.mean(axis=0)[1:] - y.mean(axis=0)[0], rel=1e-9)
    # a patient seen once carries no information on change
    extra = np.vstack([y, [np.nan, 5.0, np.nan]])
    m2 = within_patient_model(extra)
    assert (m2.f, m2.n_obs, m2.n_patients) == (pytest.approx(m.f, rel=1e-12), n * k, n)
    # missed visits keep the rest of the patient: one value fewer, same patients
    holes = y.copy()
    holes[0, 2] = np.nan
    m3 = within_patient_model(holes)
    assert (m3.n_obs, m3.n_patients, m3.df_den) == (n * k - 1, n, df2 - 1)
    # disconnected design: effects not separable from patient intercepts
    disc = np.array([[1.0, 2.0, np.nan, np.nan], [2.0, 3.5, np.nan, np.nan],
                     [np.nan, np.nan, 1.0, 0.5], [np.nan, np.nan, 2.0, 1.0]])
    assert math.isnan(within_patient_model(disc).pvalue)


# --------------------------------------------------------------------------- compare_timepoints

def test_paired_row_equals_scipy_on_the_same_vectors():
    frame = make_frame(n_patients=9, seed=1, shift=-0.5)
    res = paired_stats(frame, "pre", "post", by="group")
    assert list(res.paired.columns) == list(PAIRED_COLUMNS)
    row = pick(res.paired, analysis="within", group="all", population="CD4 PD1+")
    pre, post, _ = pairs_from_frame(frame, "CD4 PD1+", "pre", "post")
    ref = st.wilcoxon(post, pre)
    assert row["n_pairs"] == 9
    assert row["p_value"] == pytest.approx(ref.pvalue, rel=RTOL)
    assert row["statistic"] == pytest.approx(ref.statistic)
    assert row["median_difference"] == pytest.approx(np.median(post - pre))
    assert row["estimate"] == pytest.approx(walsh_median_loop(post - pre))
    assert row["p_min_attainable"] == pytest.approx(2 / 2 ** 9)
    # sensitivity: paired t on the empirical logit at the population's median parent count
    sub = frame[frame["population"] == "CD4 PD1+"]
    big_n, p = np.median(sub["parent_count"]), sub["count"] / sub["parent_count"]
    logit = np.log((p * big_n + 0.5) / ((1 - p) * big_n + 0.5))
    wide = sub.assign(l=logit).pivot(index="patient_id", columns="timepoint", values="l")
    tref = st.ttest_rel(wide["post"], wide["pre"])
    assert row["ttest_scale"] == "logit"
    assert (row["ttest_statistic"], row["ttest_p"]) == pytest.approx((tref.statistic, tref.pvalue), rel=RTOL)
    # BH over the family (all populations of this measure/analysis/group)
    fam = res.paired[(res.paired["analysis"] == "within") & (res.paired["group"] == "all")]
    tested = fam["p_value"].notna()
    assert np.allclose(fam.loc[tested, "q_value"], st.false_discovery_control(fam.loc[tested, "p_value"]))
    assert (fam["bh_m"] == int(tested.sum())).all()
    # between groups: Mann-Whitney on the paired changes
    groups = frame.drop_duplicates("patient_id").set_index("patient_id")["group"]
    _, _, ids = pairs_from_frame(frame, "CD4 PD1+", "pre", "post")
    d = pd.Series(post - pre, index=ids)
    between = pick(res.paired, analysis="between_groups", population="CD4 PD1+")
    assert between["group"] == "NR vs R"
    ref = st.mannwhitneyu(d[groups[ids] == "NR"], d[groups[ids] == "R"])
    assert between["p_value"] == pytest.approx(ref.pvalue, rel=RTOL)
    assert between["statistic"] == pytest.approx(ref.statistic)
    within_r = pick(res.paired, analysis="within", group="R", population="CD4 PD1+")
    assert within_r["n_pairs"] == int((groups[ids] == "R").sum())
    assert within_r["p_value"] == pytest.approx(st.wilcoxon(d[groups[ids] == "R"]).pvalue, rel=RTOL)


def test_missing_and_duplicate_samples_are_listed_never_dropped_silently():
    frame = make_frame(n_patients=6, seed=2)
    frame = frame[~((frame["patient_id"] == "P02") & (frame["timepoint"] == "post"))]
    dup = frame[(frame["patient_id"] == "P03") & (frame["timepoint"] == "pre")].assign(sample_id="P03_pre_repeat")
    frame = pd.concat([frame, dup])
    # an empty parent in one sample makes pct_parent undefined for one population
    mask = (frame["patient_id"] == "P04") & (frame["timepoint"] == "pre") & (frame["population"] == "CD4 PD1+")
    frame.loc[mask, ["parent_count", "pct_parent"]] = [0, np.nan]
    res = paired_stats(frame, "pre", "post", measures=["pct_parent"])
    ex = res.exclusions
    assert list(ex.columns) == list(EXCLUSION_COLUMNS)
    r2 = pick(ex, patient_id="P02")
    assert r2["reason"] == "no post sample" and r2["population"] == "(all)"
    r3 = pick(ex, patient_id="P03")
    assert "2 pre samples" in r3["reason"] and "P03_pre_repeat" in r3["reason"]
    r4 = pick(ex, patient_id="P04")
    assert r4["population"] == "CD4 PD1+" and "undefined" in r4["reason"]
    row = pick(res.paired, population="CD4 PD1+")
    assert (row["n_pairs"], row["n_excluded"]) == (3, 3)
    for pid in ("P02", "P03", "P04"):
        assert pid in row["excluded"]
    row_lym = pick(res.paired, population="lymphocytes")
    assert (row_lym["n_pairs"], row_lym["n_excluded"]) == (4, 2)


def test_small_samples_give_nan_and_plain_notes_not_misleading_p():
    frame = make_frame(n_patients=4, seed=3)
    res = paired_stats(frame, "pre", "post", measures=["pct_parent"])
    pd1 = pick(res.paired, population="CD4 PD1+")
    assert pd1["n_pairs"] == 4 and pd1["p_min_attainable"] == 0.125
    assert "n=4: smallest attainable p is 0.125; no result can reach 0.05" in pd1["note"]
    assert pd1["p_value"] == pytest.approx(st.wilcoxon(*pairs_from_frame(frame, "CD4 PD1+", "post", "pre")[:2]).pvalue)
    rare = pick(res.paired, population="CD4 rare")  # zero events everywhere
    assert math.isnan(rare["p_value"]) and math.isnan(rare["ttest_p"]) and math.isnan(rare["q_value"])
    assert "no events" in rare["note"]
    two = paired_stats(make_frame(n_patients=2, seed=3), "pre", "post", measures=["pct_parent"])
    row = pick(two.paired, population="CD4 PD1+")
    assert row["n_pairs"] == 2 and math.isnan(row["p_value"]) and "too few for a test" in row["note"]
    assert np.isfinite(row["median_pre"])            # descriptive medians are still given
    same = make_frame(n_patients=5, seed=4)
    same.loc[same["timepoint"] == "post", ["count", "pct_parent"]] = (
        same.loc[same["timepoint"] == "pre", ["count", "pct_parent"]].to_numpy())
    row = pick(paired_stats(same, "pre", "post", measures=["pct_parent"]).paired, population="CD4 PD1+")
    assert math.isnan(row["p_value"]) and "identical values" in row["note"]


def test_controls_are_not_compared_and_panels_are_kept_apart():
    frame = make_frame(n_patients=5, seed=5, panels=("t_cell", "nk"))
    fmo = frame[frame["sample_id"] == "P01_pre_t_cell"].assign(sample_id="FMO_PD1", patient_id="", control="PD1")
    res = paired_stats(pd.concat([frame, fmo]), "pre", "post", measures=["pct_parent"])
    lym = res.paired[res.paired["population"] == "lymphocytes"]
    assert sorted(lym["panel"]) == ["nk", "t_cell"]
    assert (lym["n_pairs"] == 5).all()
    assert "1 FMO control sample(s) are not compared" in res.notes
    for panel in ("nk", "t_cell"):
        pre, post, _ = pairs_from_frame(frame, "lymphocytes", "pre", "post", panel=panel)
        assert pick(lym, panel=panel)["p_value"] == pytest.approx(st.wilcoxon(post, pre).pvalue, rel=RTOL)


def test_longitudinal_friedman_model_and_missing_visits():
    frame = make_frame(n_patients=8, timepoints=("pre", "c1", "c2"), seed=6, shift=-0.4)
    frame = frame[~((frame["patient_id"] == "P05") & (frame["timepoint"] == "c2"))]
    res = compare_timepoints(frame, ["pre", "c1", "c2"], measures=["pct_parent"])
    assert list(res.longitudinal.columns) == list(LONGITUDINAL_COLUMNS)
    rows = res.longitudinal[(res.longitudinal["population"] == "CD4 PD1+") & (res.longitudinal["group"] == "all")]
    assert list(rows["timepoint"]) == ["pre", "c1", "c2"]
    first = rows.iloc[0]
    sub = frame[frame["population"] == "CD4 PD1+"].pivot(index="patient_id", columns="timepoint", values="pct_parent")
    complete = sub.dropna()
    ref = st.friedmanchisquare(complete["pre"], complete["c1"], complete["c2"])
    assert (first["n_complete"], first["n_patients"]) == (7, 8)
    assert first["friedman_statistic"] == pytest.approx(ref.statistic, rel=RTOL)
    assert first["friedman_p_chi2"] == pytest.approx(ref.pvalue, rel=RTOL)
    assert first["friedman_method"] == "exact" and first["friedman_p"] == first["friedman_p_exact"]
    assert first["model_n_obs"] == 23 and first["model_n_patients"] == 8
    assert "7 of 8 patients" in first["note"]
    ex = pick(res.exclusions, comparison="longitudinal")
    assert ex["patient_id"] == "P05" and ex["scope"] == "friedman"
    # each timepoint vs baseline is in paired_stats, one BH family over populations x comparisons
    paired = res.paired[res.paired["group"] == "all"]
    assert sorted(paired["comparison"].unique()) == ["c1 vs pre", "c2 vs pre"]
    c2 = pick(paired, comparison="c2 vs pre", population="CD4 PD1+")
    assert c2["n_pairs"] == 7 and "P05 (no c2 sample)" in c2["excluded"]
    tested = paired["p_value"].notna()
    assert np.allclose(paired.loc[tested, "q_value"], st.false_discovery_control(paired.loc[tested, "p_value"]))


def test_timepoints_are_ordered_by_day():
    frame = make_frame(n_patients=5, timepoints=("pre", "c1", "c2"), seed=7, days=(0, 28, 10))
    res = compare_timepoints(frame, ["pre", "c1", "c2"], measures=["pct_parent"])
    assert res.timepoints == ("pre", "c2", "c1")
    assert any("ordered by day" in n for n in res.notes)


def test_cells_per_ul_derived_from_blood_count_and_can_fall_while_share_rises():
    frame = make_frame(n_patients=6, seed=8, shift=0.8)
    blood = {"pre": 1500.0, "post": 300.0}   # clofarabine depletes lymphocytes
    frame["lymphocytes_per_ul"] = frame["timepoint"].map(blood)
    res = paired_stats(frame, "pre", "post")
    assert res.measures == ("pct_parent", "cells_per_ul")
    assert any("cells_per_ul derived" in n for n in res.notes)
    share = pick(res.paired, measure="pct_parent", population="CD4 PD1+")
    cells = pick(res.paired, measure="cells_per_ul", population="CD4 PD1+")
    assert share["median_difference"] > 0 > cells["median_difference"]
    # hand computation: lymphocytes_per_ul x count / count(lymphocytes)
    f = frame.set_index(["sample_id", "population"])
    expected = {}
    for sid in frame["sample_id"].unique():
        expected[sid] = (f.loc[(sid, "CD4 PD1+"), "lymphocytes_per_ul"] * f.loc[(sid, "CD4 PD1+"), "count"]
                         / f.loc[(sid, "lymphocytes"), "count"])
    pre = np.array([expected[f"P{i:02d}_pre_t_cell"] for i in range(1, 7)])
    post = np.array([expected[f"P{i:02d}_post_t_cell"] for i in range(1, 7)])
    assert cells["median_pre"] == pytest.approx(np.median(pre))
    assert cells["p_value"] == pytest.approx(st.wilcoxon(post, pre).pvalue, rel=RTOL)


def test_usage_errors_name_what_exists():
    frame = make_frame(n_patients=4, seed=9)
    with pytest.raises(UsageError, match=r"unknown timepoint\(s\) week4; the results have: post, pre"):
        paired_stats(frame, "pre", "week4")
    with pytest.raises(UsageError, match=r"unknown population\(s\) 'CD8 PD1\+'.*CD4 PD1\+"):
        paired_stats(frame, "pre", "post", populations=["CD8 PD1+"])
    with pytest.raises(UsageError, match="cells_per_ul needs a lymphocytes_per_ul column"):
        paired_stats(frame, "pre", "post", measures=["cells_per_ul"])
    with pytest.raises(UsageError, match="--by response: no such column"):
        paired_stats(frame, "pre", "post", by="response")
    split = frame[~((frame["timepoint"] == "post") & frame["patient_id"].isin(["P01", "P02"]))]
    split = split[~((split["timepoint"] == "pre") & split["patient_id"].isin(["P03", "P04"]))]
    with pytest.raises(UsageError, match="no patient has both a pre and a post sample"):
        paired_stats(split, "pre", "post")
    nometa = frame.copy()
    nometa.loc[nometa["sample_id"] == "P01_pre_t_cell", "patient_id"] = ""
    with pytest.raises(ResultsError, match=r"1 sample\(s\) have no patient_id \(P01_pre_t_cell\).*--name-pattern"):
        paired_stats(nometa, "pre", "post")


def test_measure_choices_of_the_command_match_the_library():
    from immunoprofile.commands.compare import MEASURE_CHOICES

    assert tuple(MEASURE_CHOICES) == tuple(MEASURES)


# --------------------------------------------------------------------------- results

def test_load_populations_folder_file_parquet_and_text_ids(tmp_path):
    frame = make_frame(n_patients=3, seed=10)
    frame["patient_id"] = frame["patient_id"].str.replace("P", "0")   # "001" must stay text
    folder = tmp_path / "results"
    folder.mkdir()
    frame.to_csv(folder / "populations.csv", index=False)
    a = load_populations(folder)
    b = load_populations(folder / "populations.csv")
    frame.to_parquet(tmp_path / "p.parquet", index=False)
    c = load_populations(tmp_path / "p.parquet")
    assert a.equals(b)
    assert list(a["patient_id"].unique()) == ["001", "002", "003"]
    assert np.array_equal(a["count"].to_numpy(), frame["count"].to_numpy(dtype=float))
    assert np.array_equal(c["pct_parent"].to_numpy(), a["pct_parent"].to_numpy())
    assert (a["control"] == "").all() and a["cells_per_ul"].isna().all()


@pytest.mark.parametrize("name,setup,message", [
    ("nothing", None, "no such file or folder"),
    ("empty", "dir", "holds no populations.csv"),
    ("bad.csv", "nocol", r"missing column\(s\) patient_id"),
    ("nometa.csv", "nometa", "have no timepoint"),
])
def test_load_populations_errors(tmp_path, name, setup, message):
    path = tmp_path / name
    if setup == "dir":
        path.mkdir()
    elif setup == "nocol":
        make_frame(n_patients=2).drop(columns=["patient_id"]).to_csv(path, index=False)
    elif setup == "nometa":
        make_frame(n_patients=2).assign(timepoint="").to_csv(path, index=False)
    with pytest.raises(ResultsError, match=message):
        load_populations(path)


# --------------------------------------------------------------------------- CLI

def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from immunoprofile.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    return int(e.value.code or 0), out, err


@pytest.fixture()
def results_dir(tmp_path) -> Path:
    folder = tmp_path / "results"
    folder.mkdir()
    frame = make_frame(n_patients=6, timepoints=("pre", "post_clofarabine", "post_lenalidomide"), seed=12,
                       shift=-0.6)
    frame = frame[~((frame["patient_id"] == "P06") & (frame["timepoint"] == "post_clofarabine"))]
    frame.to_csv(folder / "populations.csv", index=False)
    return folder


def test_cli_paired_writes_tables_summary_and_is_deterministic(results_dir, tmp_path, capsys):
    out = tmp_path / "stats"
    args = ["compare", str(results_dir), "--pre", "pre", "--post", "post_clofarabine", "--by", "group",
            "--out", str(out)]
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    table = pd.read_csv(out / "paired_stats.csv", keep_default_na=False)
    assert list(table.columns) == list(PAIRED_COLUMNS)
    assert not (out / "longitudinal_stats.csv").exists()
    assert "P06" in (out / "exclusions.csv").read_text()
    assert "CD4 PD1+" in stdout
    assert "n=5: smallest attainable p is 0.0625; no result can reach 0.05" in stdout   # 6 patients, 1 excluded
    assert "no post_clofarabine sample" in stdout
    assert "n=3: smallest attainable p is 0.25; no result can reach 0.05" in stdout   # group R: 3 patients
    assert "only 2 pair(s): too few for a test" in stdout                             # group NR: 2 left
    assert stdout == (out / "summary.txt").read_text()
    first = {n: (out / n).read_bytes() for n in ("paired_stats.csv", "exclusions.csv", "summary.txt")}
    code, _, _ = run_cli(args, capsys)
    assert code == 0
    assert {n: (out / n).read_bytes() for n in first} == first


def test_cli_longitudinal(results_dir, tmp_path, capsys):
    out = tmp_path / "long"
    code, stdout, err = run_cli(["compare", str(results_dir / "populations.csv"), "--timepoints",
                                 "pre,post_clofarabine,post_lenalidomide", "--measure", "pct_parent",
                                 "--populations", "CD4 PD1+,lymphocytes", "--by", "group", "--out", str(out)],
                                capsys)
    assert code == 0, err
    long = pd.read_csv(out / "longitudinal_stats.csv")
    assert list(long.columns) == list(LONGITUDINAL_COLUMNS)
    assert sorted(long["population"].unique()) == ["CD4 PD1+", "lymphocytes"]
    assert sorted(long["group"].unique()) == ["NR", "R", "all"]
    assert len(long) == 2 * 3 * 3          # populations x groups x timepoints (one panel)
    paired = pd.read_csv(out / "paired_stats.csv")
    assert sorted(paired["comparison"].unique()) == ["post_clofarabine vs pre", "post_lenalidomide vs pre"]
    assert "Friedman" in stdout and "P06" in stdout


@pytest.mark.parametrize("extra,message", [
    (["--pre", "pre", "--post", "week4"], "unknown timepoint(s) week4; the results have: post_clofarabine, "
                                          "post_lenalidomide, pre"),
    (["--pre", "pre", "--post", "post_clofarabine", "--populations", "CD8 X"], "unknown population(s) 'CD8 X'"),
    (["--pre", "pre"], "say what to compare"),
    (["--pre", "pre", "--post", "post_clofarabine", "--timepoints", "pre,post_clofarabine"], "not both"),
])
def test_cli_usage_errors_exit_2(results_dir, tmp_path, capsys, extra, message):
    code, _, err = run_cli(["compare", str(results_dir), *extra, "--out", str(tmp_path / "o")], capsys)
    assert code == 2
    assert message in err
    assert not (tmp_path / "o").exists()


def test_cli_refuses_to_overwrite_inputs_or_other_files(results_dir, tmp_path, capsys):
    code, _, err = run_cli(["compare", str(results_dir), "--pre", "pre", "--post", "post_clofarabine",
                            "--out", str(results_dir)], capsys)
    assert code == 2 and "would replace the results" in err
    assert (results_dir / "populations.csv").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    code, _, err = run_cli(["compare", str(results_dir), "--pre", "pre", "--post", "post_clofarabine",
                            "--out", str(other)], capsys)
    assert code == 2 and "already holds other files (notes.txt)" in err
    assert (other / "notes.txt").read_text() == "keep me"


def test_cli_help_lists_the_options(capsys):
    code, out, _ = run_cli(["compare", "--help"], capsys)
    assert code == 0
    for option in ("--pre", "--post", "--timepoints", "--measure", "--by", "--populations", "--out"):
        assert option in out


def test_results_database_reads_like_the_folder(tmp_path, capsys):
    """`compare` reads the SQLite results database `gate` writes as well as the folder."""
    from immunoprofile.simulate import simulate_cohort

    simulate_cohort(tmp_path / "c", patients=3, timepoints=("pre", "post_clofarabine"), events=2000, seed=2,
                    panels=("t_cell",))
    from immunoprofile.cli import main

    with pytest.raises(SystemExit) as e:
        main(["gate", "-t", "t_cell_exhaustion", "--samples", str(tmp_path / "c" / "samplesheet.csv"),
              "--out", str(tmp_path / "r"), "--jobs", "1"])
    assert e.value.code == 0
    folder = load_populations(tmp_path / "r")
    db = load_populations(tmp_path / "r" / "immunoprofile.sqlite")
    cols = ["sample_id", "patient_id", "timepoint", "panel", "population", "count", "parent_count", "pct_parent"]
    a = folder[cols].sort_values(["sample_id", "population"]).reset_index(drop=True)
    b = db[cols].sort_values(["sample_id", "population"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b, check_dtype=False)
    code, out_a, _ = run_cli(["compare", str(tmp_path / "r"), "--pre", "pre", "--post", "post_clofarabine",
                              "--out", str(tmp_path / "s1")], capsys)
    code_b, out_b, _ = run_cli(["compare", str(tmp_path / "r" / "immunoprofile.sqlite"), "--pre", "pre",
                                "--post", "post_clofarabine", "--out", str(tmp_path / "s2")], capsys)
    assert code == code_b == 0
    assert (tmp_path / "s1" / "paired_stats.csv").read_bytes() == (tmp_path / "s2" / "paired_stats.csv").read_bytes()


def test_pct_of_uses_the_reference_count_and_says_when_undefined():
    frame = make_frame(n_patients=7, seed=13, shift=0.5)
    frame.loc[frame["population"] == "CD4 rare", ["reference", "pct_of"]] = ["", np.nan]
    res = paired_stats(frame, "pre", "post", measures=["pct_of"])
    row = pick(res.paired, population="CD4 PD1+")
    pre, post, _ = pairs_from_frame(frame, "CD4 PD1+", "pre", "post", col="pct_of")
    assert row["p_value"] == pytest.approx(st.wilcoxon(post, pre).pvalue, rel=RTOL)
    lym = frame[frame["population"] == "lymphocytes"].set_index("sample_id")["count"]
    sub = frame[frame["population"] == "CD4 PD1+"].copy()
    big_n, p = np.median(sub["sample_id"].map(lym)), sub["pct_of"] / 100
    sub["l"] = np.log((p * big_n + 0.5) / ((1 - p) * big_n + 0.5))
    wide = sub.pivot(index="patient_id", columns="timepoint", values="l")
    assert row["ttest_p"] == pytest.approx(st.ttest_rel(wide["post"], wide["pre"]).pvalue, rel=RTOL)
    # a reference that is not an ancestor (values above 100%): log ratio instead of logit
    above = frame.copy()
    sel = above["population"] == "lymphocytes"
    above.loc[sel, "reference"] = "CD4 T"
    cd4 = above[above["population"] == "CD4 T"].set_index("sample_id")["count"]
    above.loc[sel, "pct_of"] = 100.0 * above.loc[sel, "count"] / above.loc[sel, "sample_id"].map(cd4)
    lymrow = pick(paired_stats(above, "pre", "post", measures=["pct_of"]).paired, population="lymphocytes")
    sub = above[sel].copy()
    big_n, r = np.median(sub["sample_id"].map(cd4)), sub["pct_of"] / 100
    sub["l"] = np.log((r * big_n + 0.5) / (big_n + 0.5))
    wide = sub.pivot(index="patient_id", columns="timepoint", values="l")
    assert lymrow["ttest_scale"] == "log_ratio"
    assert lymrow["ttest_p"] == pytest.approx(st.ttest_rel(wide["post"], wide["pre"]).pvalue, rel=RTOL)
    rare = pick(res.paired, population="CD4 rare")
    assert "pct_of is not defined for this population in any sample" in rare["note"]
    assert not (res.exclusions["population"] == "CD4 rare").any()


def test_model_without_variation_within_patients_is_not_tested():
    y = np.repeat(np.array([[1.0], [2.0], [3.0], [4.0]]), 3, axis=1)   # constant within each patient
    m = within_patient_model(y)
    assert math.isnan(m.pvalue) and math.isnan(m.f)


def test_transform_uses_only_the_compared_timepoints():
    frame = make_frame(n_patients=6, timepoints=("pre", "post", "late"), seed=14, shift=0.4)
    res = paired_stats(frame, "post", "late", measures=["pct_parent"])
    row = pick(res.paired, population="CD4 PD1+")
    assert row["ttest_scale"] == "logit"
    sub = frame[(frame["population"] == "CD4 PD1+") & frame["timepoint"].isin(["post", "late"])]
    big_n, p = np.median(sub["parent_count"]), sub["count"] / sub["parent_count"]
    wide = sub.assign(l=np.log((p * big_n + 0.5) / ((1 - p) * big_n + 0.5))).pivot(
        index="patient_id", columns="timepoint", values="l")
    assert row["ttest_p"] == pytest.approx(st.ttest_rel(wide["late"], wide["post"]).pvalue, rel=RTOL)
    assert "P01" not in res.exclusions["patient_id"].to_list()


def test_random_intercept_model_matches_within_patient_model_on_balanced_data():
    """Balanced, complete data: the mixed model's timepoint effects and SEs equal the within-patient model's."""
    from immunoprofile.compare_model import random_intercept_model

    rng = np.random.default_rng(3)
    n, k = 12, 3
    y = rng.normal(0, 1.0, (n, 1)) + np.array([0.0, -0.5, 0.2]) + rng.normal(0, 0.3, (n, k))
    mixed, within = random_intercept_model(y), within_patient_model(y)
    assert mixed.converged and mixed.n_obs == n * k and mixed.n_patients == n
    assert np.allclose(mixed.estimate[1:], within.estimate[1:], rtol=1e-6)
    assert np.allclose(mixed.se[1:], within.se[1:], rtol=1e-3)
    assert mixed.patient_sd > 0.5


def test_random_intercept_model_uses_patients_with_missed_visits():
    from immunoprofile.compare_model import random_intercept_model

    rng = np.random.default_rng(5)
    y = rng.normal(0, 1.0, (10, 1)) + np.array([0.0, -1.0, -0.5]) + rng.normal(0, 0.2, (10, 3))
    y[[0, 1], 1] = np.nan  # missed visits
    y[2, 1:] = np.nan  # seen once: still contributes to the mixed model, not to the within model
    mixed, within = random_intercept_model(y), within_patient_model(y)
    assert mixed.n_obs == 30 - 4 and mixed.n_patients == 10
    assert within.n_patients == 9
    assert mixed.p_each[1] < 0.001 and mixed.estimate[1] == pytest.approx(-1.0, abs=0.25)
