"""Counts and intensities: the bucketed order statistics equal numpy's quantiles exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest

from immunoprofile import stats
from immunoprofile.gating import GatingResult, gate_events, prepare
from immunoprofile.stats import (
    PopulationQuantiles, _buckets, intensity_rows, inverted_cdf_ranks, population_rows,
)
from immunoprofile.templates import parse_template

from test_gating import make_sample

QS = (15.865525393145708, 50.0, 84.13447460685429)


def reference(column: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return np.percentile(column[idx], QS, method="inverted_cdf")


def nested_populations(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """A hierarchy like a gating template's: nested, overlapping, some tiny, one empty."""
    top = rng.random(n) < 0.6
    a = top & (rng.random(n) < 0.9)
    b = a & (rng.random(n) < 0.5)
    c = a & ~b & (rng.random(n) < 0.7)
    d = b & (rng.random(n) < 0.3)
    e = b & (rng.random(n) < 0.4)
    masks = {"top": top, "a": a, "b": b, "c": c, "d": d, "e": e, "d and e": d & e, "b not d": b & ~d,
             "tiny": a & (rng.random(n) < 0.0005), "one": np.eye(1, n, int(np.flatnonzero(a)[0]), dtype=bool)[0],
             "empty": np.zeros(n, dtype=bool)}
    return {k: np.flatnonzero(m) for k, m in masks.items()}


def columns(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Compensated-like values, and the awkward cases: ties, signed zeros, huge values, infinities."""
    base = np.where(rng.random(n) < 0.4, rng.lognormal(8, 1, n), rng.normal(0, 150, n))
    ties = np.round(rng.normal(0, 3, n))
    zeros = np.where(rng.random(n) < 0.5, 0.0, -0.0) * (rng.random(n) < 0.8) + rng.normal(0, 1e-3, n) * (
        rng.random(n) < 0.2)
    wide = rng.normal(0, 1, n) * 10.0 ** rng.integers(-30, 30, n)
    wide[:: 997] = np.inf
    wide[1:: 991] = -np.inf
    return {"lognormal": base, "ties": ties, "zeros": zeros, "wide": wide,
            "float32 grid": base.astype(np.float32).astype(np.float64)}


@pytest.mark.parametrize("n", [list(range(1, 40)), [97, 1000, 1001, 4096, 65537, 999_999, 1_000_000]])
def test_inverted_cdf_ranks_are_numpys(n):
    for size in n:
        ranks = inverted_cdf_ranks(size, QS)
        # np.percentile of 0..size-1 returns the rank itself
        assert ranks.tolist() == np.percentile(np.arange(size), QS, method="inverted_cdf").astype(int).tolist()


@pytest.mark.parametrize("seed,universe", [(0, False), (1, False), (2, True), (3, True)])
def test_population_quantiles_equal_numpy_percentile(seed, universe):
    rng = np.random.default_rng(seed)
    n = 60_000
    index = nested_populations(rng, n)
    pq = PopulationQuantiles(index, n, index["top"] if universe else None)  # "top" holds all the others
    for name, col in columns(rng, n).items():
        got = pq.quantiles(col, QS)
        for i, pop in enumerate(index):
            if index[pop].size == 0:
                assert np.isnan(got[i]).all()
                continue
            want = reference(col, index[pop])
            assert np.array_equal(got[i], want), (name, pop, got[i], want)
            assert not np.signbit(got[i][got[i] == 0]).any()  # zero is written +0.0


@pytest.mark.parametrize("universe", [False, True])
def test_population_quantiles_of_many_populations_equal_numpy_percentile(universe):
    # more populations than one group of atom bits (stats._ATOM_BITS): later groups refine the
    # atoms of the first; one population is every event, one the whole universe
    rng = np.random.default_rng(21)
    n = 30_000
    top = np.flatnonzero(rng.random(n) < 0.7)
    index = {"top": top}
    if not universe:
        index["all"] = np.arange(n)
    for k in range(2 * stats._ATOM_BITS + 5):
        parent = index[rng.choice(list(index))] if k % 3 else top
        index[f"p{k}"] = parent[rng.random(parent.size) < rng.uniform(0.2, 0.95)]
    index["top again"] = top.copy()
    pq = PopulationQuantiles(index, n, top if universe else None)
    assert pq.n_atoms > 2 ** 5
    col = columns(rng, n)["ties"]
    got = pq.quantiles(col, QS)
    for i, pop in enumerate(index):
        assert np.array_equal(got[i], reference(col, index[pop])), pop


def test_population_quantiles_nan_column_follows_numpy():
    rng = np.random.default_rng(5)
    n = 20_000
    index = nested_populations(rng, n)
    col = rng.normal(0, 1, n)
    col[index["d"][0]] = np.nan  # in d, b, a, top and maybe others: those are NaN, the rest are not
    got = PopulationQuantiles(index, n).quantiles(col, QS)
    for i, pop in enumerate(index):
        if index[pop].size:
            want = reference(col, index[pop])
            assert np.array_equal(got[i], want, equal_nan=True), pop


def test_buckets_never_decrease_with_the_value():
    rng = np.random.default_rng(3)
    v = np.sort(np.concatenate([columns(rng, 50_000)["wide"], [-0.0, 0.0, 1.0, -1.0, 2.0 ** 24, -(2.0 ** 24)],
                                np.nextafter(1.0, 0) * np.array([1, -1]), rng.normal(0, 1e4, 50_000)]))
    b = _buckets(v)
    assert np.all(np.diff(b.astype(np.int64)) >= 0)
    assert _buckets(np.array([-0.0]))[0] == _buckets(np.array([0.0]))[0]


def test_intensity_rows_equal_quantiles_of_masked_copies():
    spill = np.array([[1.0, 0.15, 0.0], [0.02, 1.0, 0.3], [0.0, 0.05, 1.0]])
    s, _ = make_sample(n=30_000, seed=11, spill=spill)
    t = parse_template("""name: t
version: 1.0.0
populations:
  - name: big
    gate: {type: range, dimensions: {FSC-A: [55000, 90000]}}
  - name: CD3+
    parent: big
    gate: {type: threshold, marker: CD3, method: density}
  - name: CD3+ PD1+
    parent: CD3+
    gate: {type: threshold, marker: PD1, method: density}
  - name: CD8hi
    parent: big
    gate: {type: threshold, marker: CD8, value: 0.55}
  - name: CD3- CD8+
    parent: big
    gate: {type: boolean, and: [{not: CD3+}, CD8hi]}
""", "t.yaml")
    data = prepare(s, t)
    res = gate_events(data)
    rows = intensity_rows(res, data, ["CD3", "PD1", "CD8"], "x")
    assert len(rows) == 5 * 3
    for r in rows:
        mask = res.masks[r["population"]]
        raw = data.raw(r["marker"])[mask]
        lo, med, hi = np.percentile(raw, QS, method="inverted_cdf")
        assert r["count"] == int(mask.sum())
        assert r["median_raw"] == med
        assert r["rcv_raw"] == 100.0 * 0.5 * (hi - lo) / abs(med)
        t_lo, t_med, t_hi = data.transforms[r["marker"]].apply(np.array([lo, med, hi]))
        assert r["median_transformed"] == t_med


def test_population_rows_count_equals_mask_sum():
    s, _ = make_sample(n=10_000, seed=2)
    t = parse_template("name: t\nversion: 1.0.0\npopulations:\n  - name: big\n"
                       "    gate: {type: range, dimensions: {FSC-A: [65000, null]}}\n", "t.yaml")
    res = gate_events(prepare(s, t))
    row = population_rows(res, t, {"sample_id": "x"}, "abc")[0]
    assert row["count"] == int((s.events[:, 0].astype(np.float64) >= 65000).sum())
    assert row["pct_parent"] == pytest.approx(100 * row["count"] / 10_000)


def test_intensity_rows_of_an_empty_population_are_nan():
    s, _ = make_sample(n=5_000, seed=4)
    t = parse_template("name: t\nversion: 1.0.0\npopulations:\n  - name: none\n"
                       "    gate: {type: range, dimensions: {FSC-A: [1e9, null]}}\n", "t.yaml")
    data = prepare(s, t, extra_markers=("CD3",))
    res = gate_events(data)
    (row,) = intensity_rows(res, data, ["CD3"], "x")
    assert row["count"] == 0 and math.isnan(row["median_raw"]) and math.isnan(row["rcv_transformed"])


def test_intensity_rows_accept_a_result_without_index():
    # results built elsewhere (plots, interop) carry masks only
    s, _ = make_sample(n=8_000, seed=6)
    t = parse_template("name: t\nversion: 1.0.0\npopulations:\n  - name: big\n"
                       "    gate: {type: range, dimensions: {FSC-A: [60000, null]}}\n", "t.yaml")
    data = prepare(s, t, extra_markers=("CD3",))
    res = gate_events(data)
    bare = GatingResult(dict(res.masks), res.gates, res.findings)
    assert intensity_rows(bare, data, ["CD3"], "x") == intensity_rows(res, data, ["CD3"], "x")
