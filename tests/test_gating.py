"""The gating engine on synthetic data with known truth, checked by numpy hand counts."""

from __future__ import annotations

import math

import flowutils
import numpy as np
import pytest

from immunoprofile.errors import ControlMissingError, MarkerError
from immunoprofile.fcs import fcs_bytes, parse_fcs
from immunoprofile.gating import FmoValue, density_threshold, gate_events, prepare
from immunoprofile.stats import population_rows
from immunoprofile.templates import parse_template

CH = ["FSC-A", "FSC-H", "SSC-A", "FITC-A", "PE-A", "APC-A"]
MK = ["", "", "", "CD3", "PD-1", "CD8"]


def logicle(x):
    return flowutils.transforms.logicle(np.asarray(x, float).reshape(-1, 1), [0], t=262144, m=4.5, w=0.5, a=0)[:, 0]


def make_sample(n=20000, seed=0, spill=None):
    rng = np.random.default_rng(seed)
    fsc = rng.normal(70000, 8000, n)
    ssc = rng.normal(20000, 4000, n)
    doublet = rng.random(n) < 0.05
    fsch = np.where(doublet, fsc / 1.9, fsc / 1.1)
    cd3pos = rng.random(n) < 0.6
    cd3 = np.where(cd3pos, rng.lognormal(np.log(20000), 0.3, n), rng.normal(0, 150, n))
    pd1pos = rng.random(n) < 0.3
    pd1 = np.where(pd1pos, rng.lognormal(np.log(5000), 0.3, n), rng.normal(0, 100, n))
    cd8 = np.where(rng.random(n) < 0.4, rng.lognormal(np.log(8000), 0.3, n), rng.normal(0, 100, n))
    ev = np.column_stack([fsc, fsch, ssc, cd3, pd1, cd8]).astype(np.float32)
    truth = {"doublet": doublet, "cd3": cd3pos, "pd1": pd1pos}
    names = ("FITC-A", "PE-A", "APC-A")
    if spill is not None:
        ev[:, 3:6] = (ev[:, 3:6].astype(np.float64) @ spill).astype(np.float32)
    blob = fcs_bytes(ev, CH, MK, spillover=(names, spill if spill is not None else np.eye(3)))
    return parse_fcs(blob, "synthetic.fcs"), truth


def tpl(populations_yaml: str, extra: str = ""):
    return parse_template(f"name: test\nversion: 1.0.0\n{extra}populations:\n{populations_yaml}", "test.yaml")


def test_fixed_range_and_threshold_equal_numpy_hand_count():
    s, _ = make_sample()
    t = tpl("""
  - name: big
    gate: {type: range, dimensions: {FSC-A: [60000, 80000], SSC-A: [null, 25000]}}
  - name: CD3+
    parent: big
    gate: {type: threshold, marker: CD3, side: above, value: 0.55}
  - name: PD1hi
    parent: big
    gate: {type: threshold, marker: PD1, method: fixed, value: 0.5}
  - name: CD3- PD1+
    parent: big
    gate: {type: boolean, and: [{not: CD3+}, PD1hi]}
""")
    res = gate_events(prepare(s, t))
    ev = s.events.astype(np.float64)
    big = (ev[:, 0] >= 60000) & (ev[:, 0] < 80000) & (ev[:, 2] < 25000)
    cd3 = big & (logicle(ev[:, 3]) >= 0.55)
    pd1 = big & (logicle(ev[:, 4]) >= 0.5)
    assert res.masks["big"].sum() == big.sum()
    assert np.array_equal(res.masks["CD3+"], cd3)
    assert np.array_equal(res.masks["PD1hi"], pd1)
    assert np.array_equal(res.masks["CD3- PD1+"], big & ~cd3 & pd1)


def test_boundary_rule_min_inclusive_max_exclusive():
    ev = np.array([[10.0, 0, 0, 0, 0, 0], [20.0, 0, 0, 0, 0, 0], [15.0, 0, 0, 0, 0, 0]], dtype=np.float32)
    s = parse_fcs(fcs_bytes(ev, CH, MK), "b.fcs")
    t = tpl("  - name: r\n    gate: {type: range, dimensions: {FSC-A: [10, 20]}}\n")
    assert gate_events(prepare(s, t)).masks["r"].tolist() == [True, False, True]


def test_density_threshold_separates_bimodal_marker():
    s, truth = make_sample(seed=3)
    t = tpl("  - name: CD3+\n    gate: {type: threshold, marker: CD3, method: density}\n")
    res = gate_events(prepare(s, t))
    agree = (res.masks["CD3+"] == truth["cd3"]).mean()
    assert agree > 0.995
    row = res.gates[0]
    assert row["method"] == "density" and row["x_channel"] == "FITC-A"


def test_density_threshold_unimodal_uses_offset_above_negative_mode():
    rng = np.random.default_rng(1)
    v = rng.normal(0.2, 0.02, 50000)
    t = density_threshold(v, offset=3.0)
    assert 0.2 + 2.5 * 0.02 < t < 0.2 + 3.5 * 0.02


def test_singlet_gate_removes_doublets():
    s, truth = make_sample(seed=5)
    t = tpl("  - name: singlets\n    gate: {type: singlets, area: FSC-A, height: FSC-H}\n")
    m = gate_events(prepare(s, t)).masks["singlets"]
    assert (m & truth["doublet"]).sum() / truth["doublet"].sum() < 0.01
    assert (m & ~truth["doublet"]).sum() / (~truth["doublet"]).sum() > 0.98


def test_compensation_applied_from_file_spillover():
    spill = np.array([[1.0, 0.15, 0.0], [0.02, 1.0, 0.3], [0.0, 0.05, 1.0]])
    s, truth = make_sample(seed=7, spill=spill)
    t = tpl("  - name: all\n    gate: {type: range, dimensions: {FSC-A: [null, 1e9]}}\n")
    data = prepare(s, t, extra_markers=("PD1",))
    expected = np.linalg.solve(spill.T, s.events[:, 3:6].astype(np.float64).T).T[:, 1]
    assert np.allclose(data.raw("PD1"), expected, rtol=1e-9, atol=1e-6)
    # uncompensated, CD3+ PD1- cells would look PD1-positive through spillover
    unc = s.events[:, 4]
    assert np.median(unc[truth["cd3"] & ~truth["pd1"]]) > 1000
    assert abs(np.median(data.raw("PD1")[truth["cd3"] & ~truth["pd1"]])) < 200


def test_fmo_threshold_used_and_missing_fmo_without_fallback_fails():
    s, _ = make_sample()
    t = tpl("  - name: PD1+\n    gate: {type: threshold, marker: PD1, method: fmo}\n")
    res = gate_events(prepare(s, t), fmo={("PD1", "root"): FmoValue(0.6, "fmo1", 1000)})
    v = logicle(s.events[:, 4].astype(np.float64))
    assert res.masks["PD1+"].sum() == (v >= 0.6).sum()
    assert res.gates[0]["fmo_sample_id"] == "fmo1"
    with pytest.raises(ControlMissingError, match="needs an FMO control for PD1"):
        gate_events(prepare(s, t))


def test_empty_parent_gives_zero_counts_and_nan_percentages():
    s, _ = make_sample()
    t = tpl("""  - name: none
    gate: {type: range, dimensions: {FSC-A: [1e8, 2e8]}}
  - name: child
    parent: none
    gate: {type: threshold, marker: CD3, method: density}
""")
    res = gate_events(prepare(s, t))
    rows = {r["population"]: r for r in population_rows(res, t, {"sample_id": "x"}, "abc")}
    assert rows["child"]["count"] == 0 and rows["child"]["parent_count"] == 0
    assert math.isnan(rows["child"]["pct_parent"])
    assert any(f.code == "EMPTY_PARENT" for f in res.findings)


def test_missing_marker_is_a_sample_error():
    s, _ = make_sample()
    t = tpl("  - name: x\n    gate: {type: threshold, marker: LAG3, value: 0.5}\n")
    with pytest.raises(MarkerError, match="marker 'LAG3' not found"):
        prepare(s, t)


def test_intensities_equal_numpy_quantiles_of_compensated_values():
    from immunoprofile.stats import intensity_rows

    spill = np.array([[1.0, 0.15, 0.0], [0.02, 1.0, 0.3], [0.0, 0.05, 1.0]])
    s, _ = make_sample(seed=9, spill=spill)
    t = tpl("  - name: CD3+\n    gate: {type: threshold, marker: CD3, value: 0.55}\n")
    data = prepare(s, t, extra_markers=("PD1",))
    res = gate_events(data)
    rows = {(r["population"], r["marker"]): r for r in intensity_rows(res, data, ["CD3", "PD1"], "x")}
    comp = np.linalg.solve(spill.T, s.events[:, 3:6].astype(np.float64).T).T
    m = logicle(comp[:, 0]) >= 0.55
    pd1 = comp[m, 1]
    lo, med, hi = np.percentile(pd1, [15.865525393145708, 50, 84.13447460685429], method="inverted_cdf")
    r = rows[("CD3+", "PD1")]
    assert r["count"] == m.sum()
    assert r["median_raw"] == pytest.approx(med, rel=1e-9)
    assert r["rcv_raw"] == pytest.approx(100 * (hi - lo) / 2 / abs(med), rel=1e-9)
    assert r["median_transformed"] == pytest.approx(logicle([med])[0], abs=1e-9)


def test_extra_markers_are_the_files_own_labels():
    # --intensities all: every $PnS label, including ones the alias table does not know
    ev = np.random.default_rng(0).normal(1000, 100, (200, 6)).astype(np.float32)
    s = parse_fcs(fcs_bytes(ev, CH, ["", "", "", "CD3", "Live/Dead Aqua", "Zombie NIR 2"]), "labels.fcs")
    t = tpl("  - name: all\n    gate: {type: range, dimensions: {FSC-A: [null, 1e9]}}\n")
    data = prepare(s, t, extra_markers=("CD3", "Live/Dead Aqua", "Zombie NIR 2"))
    assert [data.channel(m) for m in ("CD3", "Live/Dead Aqua", "Zombie NIR 2")] == ["FITC-A", "PE-A", "APC-A"]
    assert np.array_equal(data.raw("Zombie NIR 2"), ev[:, 5].astype(np.float64))


def test_gating_keeps_each_populations_event_numbers():
    from immunoprofile.gating import population_index

    s, _ = make_sample(n=5000, seed=9)
    t = tpl("""  - name: big
    gate: {type: range, dimensions: {FSC-A: [60000, null]}}
  - name: CD3+
    parent: big
    gate: {type: threshold, marker: CD3, value: 0.55}
  - name: not CD3
    parent: big
    gate: {type: boolean, not: CD3+}
""")
    res = gate_events(prepare(s, t))
    for name in ("big", "CD3+", "not CD3"):
        assert np.array_equal(population_index(res, name), np.flatnonzero(res.masks[name]))
    assert res.masks["not CD3"].sum() + res.masks["CD3+"].sum() == res.masks["big"].sum()
