"""Gating-ML 2.0 / FlowJo interop, checked against FlowKit, the Gating-ML 2.0 reference results and FlowJo.

Truth comes from outside our engine: FlowKit gating the exported document on a
``flowkit.Sample`` it reads itself, the ISAC Gating-ML 2.0 compliance results
(``gate_ref/truth``), the event counts FlowJo stored in its workspaces, and
numpy/flowutils hand counts.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import warnings
from pathlib import Path

import flowutils
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from immunoprofile.cli import cli
from immunoprofile.errors import GatingError, MarkerError, TemplateError
from immunoprofile.fcs import fcs_bytes, parse_fcs, read_fcs
from immunoprofile.gating import gate_events, prepare
from immunoprofile.interop import (
    export_gatingml, flowkit_sample, gatingml_id, load_external_template, parse_external_template,
)
from immunoprofile.stats import gate_rows
from immunoprofile.templates import load_template, parse_template

fk = pytest.importorskip("flowkit")

FLOWKIT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "whitews-FlowKit"
GATE_REF = FLOWKIT_DATA / "gate_ref"
DIAMOND = FLOWKIT_DATA / "simple_diamond_example"
EIGHT_COLOR = FLOWKIT_DATA / "8_color_data_set"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent")
    return path


def fk_sample_from(source, **kw):
    """FlowKit reading a file (or bytes) itself: independent of immunoprofile's reader."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if isinstance(source, bytes):
            return fk.Sample(io.BytesIO(source), sample_id="s", **kw)
        return fk.Sample(str(source), sample_id="s", ignore_offset_error=True, **kw)


def flowkit_masks(xml: bytes, fks, names):
    """Memberships from FlowKit's own engine for our population names."""
    gs = fk.parse_gating_xml(io.BytesIO(xml))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = gs.gate_sample(fks)
    return {n: np.asarray(res.get_gate_membership(gatingml_id(n)), dtype=bool) for n in names}


# ====================================================================== (a) engine equivalence
SYN_CH = ["FSC-A", "FSC-H", "SSC-A", "FL1-A", "FL2-A", "FL3-A", "FL4-A"]
SYN_MK = ["", "", "", "CD3", "CD4", "CD8", "CD57"]
SPILL = np.array([[1.0, 0.12, 0.02], [0.05, 1.0, 0.15], [0.01, 0.08, 1.0]])

SYN_TEMPLATE = """name: equivalence
version: 1.0.0
transforms:
  scatter: identity
  fluorescence: {type: logicle, T: 262144, W: 0.5, M: 4.5, A: 0}
  CD57: {type: linear, T: 1000, A: 0}
populations:
  - name: cells
    gate: {type: range, dimensions: {FSC-A: [40000, 100000], SSC-A: [null, 30000]}}
  - name: CD57 zero+
    parent: cells
    gate: {type: threshold, marker: CD57, side: above, value: 0.0}
  - name: CD57 low
    parent: cells
    gate: {type: threshold, marker: CD57, side: below, value: -0.125}
  - name: CD57+ SSC low
    parent: cells
    gate: {type: quadrant, x: {marker: CD57, value: 0.25}, y: {marker: SSC-A, value: 20000}, quadrant: "+-"}
  - name: CD57- SSC high
    parent: cells
    gate: {type: quadrant, x: {marker: CD57, value: 0.0}, y: {marker: SSC-A, value: 20000}, quadrant: "-+"}
  - name: CD3+
    parent: cells
    gate: {type: threshold, marker: CD3, side: above, value: 0.5123}
  - name: CD4 T
    parent: CD3+
    gate: {type: quadrant, x: {marker: CD4, value: 0.4871}, y: {marker: CD8, value: 0.4633}, quadrant: "+-"}
  - name: CD8 T
    parent: CD3+
    gate: {type: quadrant, x: {marker: CD4, value: 0.4871}, y: {marker: CD8, value: 0.4633}, quadrant: "-+"}
  - name: poly
    parent: cells
    gate: {type: polygon, x: CD3, y: CD4, vertices: [[0.1, 0.1], [0.75, 0.15], [0.7, 0.8], [0.3, 0.6], [0.45, 0.35]]}
  - name: blob
    parent: cells
    gate: {type: ellipse, x: FSC-A, y: SSC-A, center: [70000, 20000], covariance: [[6.4e7, 1.0e7], [1.0e7, 1.6e7]], distance: 1.7}
  - name: poly not blob
    parent: cells
    gate: {type: boolean, and: [poly, {not: blob}]}
  - name: CD4 or blob
    parent: CD3+
    gate: {type: boolean, or: [CD4 T, blob]}
  - name: not poly
    parent: cells
    gate: {type: boolean, not: poly}
  - name: deep
    parent: poly not blob
    gate: {type: range, dimensions: {CD8: [0.3, null], FSC-A: [50000, 90000]}}
"""


def synthetic(seed: int, n: int = 6000):
    """Random events plus events exactly on the range, threshold and quadrant boundaries."""
    rng = np.random.default_rng(seed)
    fsc = rng.normal(70000, 15000, n)
    fsch = fsc / rng.normal(1.15, 0.05, n)
    ssc = rng.normal(20000, 6000, n)
    fl = np.column_stack([np.where(rng.random(n) < p, rng.lognormal(np.log(m), 0.5, n), rng.normal(0, 200, n))
                          for p, m in ((0.6, 20000), (0.4, 8000), (0.3, 9000))]) @ SPILL
    cd57 = rng.normal(100, 300, n)
    ev = np.column_stack([fsc, fsch, ssc, fl, cd57])
    # boundary events (float32-exact values): FSC-A min/max, SSC-A max and divider, CD57 at -0.125, 0, 0.25
    k = np.arange(60)
    ev[k, 0] = np.where(k % 2 == 0, 40000.0, 100000.0)
    ev[k, 2] = np.where(k % 3 == 0, 20000.0, 10000.0)
    ev[60:90, 2] = 30000.0
    ev[60:90, 0] = 70000.0
    ev[k, 6] = np.choose(k % 3, [-125.0, 0.0, 250.0])
    ev = ev.astype(np.float32)
    blob = fcs_bytes(ev, SYN_CH, SYN_MK, spillover=(("FL1-A", "FL2-A", "FL3-A"), SPILL))
    return parse_fcs(blob, f"synthetic_{seed}.fcs"), blob


@pytest.mark.parametrize("seed", [1, 2])
def test_export_equals_flowkit_event_for_event_on_synthetic_data(seed):
    sample, blob = synthetic(seed)
    t = parse_template(SYN_TEMPLATE, "equivalence.yaml")
    ours = gate_events(prepare(sample, t)).masks
    xml = export_gatingml(t, sample)
    # $SPILLOVER leaves FL4-A out, which FlowKit's 'FCS' does not allow: the file's matrix is embedded
    assert b"spectrumMatrix" in xml and b'compensation-ref="FCS"' not in xml
    assert b"compensation=\"file (embedded: the file's spillover matrix does not cover FL4-A" in xml
    theirs = flowkit_masks(xml, fk_sample_from(blob), [p.name for p in t.populations])
    for p in t.populations:
        assert 0 < ours[p.name].sum() < sample.n_events, p.name
        np.testing.assert_array_equal(ours[p.name], theirs[p.name], err_msg=p.name)
    ev = sample.events
    # the boundary events pin min <= x < max on ranges, thresholds and quadrant dividers
    on_min, on_max = ev[:, 0] == 40000, ev[:, 0] == 100000
    assert on_min.sum() >= 30 and on_max.sum() >= 30
    assert not ours["cells"][on_max].any() and not ours["cells"][ev[:, 2] == 30000].any()
    assert ours["cells"][on_min & (ev[:, 2] < 30000)].all()
    cells = ours["cells"]
    assert ours["CD57 zero+"][cells & (ev[:, 6] == 0)].all()  # divider at 0: x >= 0 is above
    assert not ours["CD57 low"][cells & (ev[:, 6] == -125)].any()  # below -0.125 excludes -0.125
    assert ours["CD57+ SSC low"][cells & (ev[:, 6] == 250) & (ev[:, 2] < 20000)].all()
    assert not ours["CD57+ SSC low"][ev[:, 2] == 20000].any()  # divider belongs to the positive side
    assert ours["CD57- SSC high"][cells & (ev[:, 6] == -125) & (ev[:, 2] == 20000)].all()
    assert not ours["CD57- SSC high"][ev[:, 6] == 0].any()


def test_numpy_hand_count_of_range_and_compensated_logicle_threshold():
    sample, _ = synthetic(3)
    t = parse_template(SYN_TEMPLATE, "equivalence.yaml")
    masks = gate_events(prepare(sample, t)).masks
    ev = sample.events.astype(np.float64)
    cells = (ev[:, 0] >= 40000) & (ev[:, 0] < 100000) & (ev[:, 2] < 30000)
    assert masks["cells"].sum() == cells.sum()
    np.testing.assert_array_equal(masks["cells"], cells)
    comp = np.linalg.solve(SPILL.T, ev[:, 3:6].T).T
    cd3 = flowutils.transforms.logicle(comp[:, [0]], [0], t=262144, w=0.5, m=4.5, a=0)[:, 0]
    assert masks["CD3+"].sum() == (cells & (cd3 >= 0.5123)).sum()
    cd57 = ev[:, 6] / 1000.0
    assert masks["CD57 low"].sum() == (cells & (cd57 < -0.125)).sum()


def _midpoint_between_events(values: np.ndarray, q: float) -> float:
    """A threshold near the q-th percentile, halfway between two distinct event values (never on one)."""
    v = np.unique(values[np.isfinite(values)])
    i = int(np.clip(np.searchsorted(v, np.percentile(v, q)), 1, v.size - 1))
    return float((v[i - 1] + v[i]) / 2)


def _real_template(sample) -> str:
    probe = parse_template("name: p\nversion: 1.0.0\npopulations:\n  - name: a\n    gate: {type: range, "
                           "dimensions: {FSC-A: [0, 1], SSC-A: [0, 1], CD3: [0, 1], CD4: [0, 1]}}\n", "p.yaml")
    d = prepare(sample, probe)
    f, s, c3, c4 = (d.values(m) for m in ("FSC-A", "SSC-A", "CD3", "CD4"))
    # FSC-A (no transform, no compensation) limits are event values themselves: min <= x < max on real data
    f_sorted = np.unique(f)
    f_lo, f_hi = float(f_sorted[f_sorted.size // 10]), float(f_sorted[f_sorted.size * 95 // 100])
    q = {name: [_midpoint_between_events(v, p) for p in (10, 25, 50, 75, 90)]
         for name, v in (("SSC-A", s), ("CD3", c3), ("CD4", c4))}
    s_, a, b = q["SSC-A"], q["CD3"], q["CD4"]
    sf = float(np.std(f)), float(np.std(s))
    return f"""name: real
version: 1.0.0
populations:
  - name: cells
    gate: {{type: range, dimensions: {{FSC-A: [{f_lo!r}, {f_hi!r}], SSC-A: [{s_[0]!r}, null]}}}}
  - name: CD3+
    parent: cells
    gate: {{type: threshold, marker: CD3, side: above, value: {a[2]!r}}}
  - name: CD3-
    parent: cells
    gate: {{type: threshold, marker: CD3, side: below, value: {a[2]!r}}}
  - name: CD4+ T
    parent: CD3+
    gate: {{type: quadrant, x: {{marker: CD4, value: {b[2]!r}}}, y: {{marker: CD3, value: {a[3]!r}}}, quadrant: "+-"}}
  - name: poly
    parent: cells
    gate: {{type: polygon, x: CD3, y: CD4, vertices: [[{a[0]!r}, {b[0]!r}], [{a[4]!r}, {b[1]!r}], [{a[3]!r}, {b[4]!r}], [{a[1]!r}, {b[3]!r}]]}}
  - name: blob
    parent: cells
    gate: {{type: ellipse, x: FSC-A, y: SSC-A, center: [{float(np.median(f))!r}, {float(np.median(s))!r}], covariance: [[{sf[0] ** 2!r}, {0.3 * sf[0] * sf[1]!r}], [{0.3 * sf[0] * sf[1]!r}, {sf[1] ** 2!r}]], distance: 1.5}}
  - name: poly not blob
    parent: cells
    gate: {{type: boolean, and: [poly, {{not: blob}}]}}
  - name: CD4 or blob
    parent: CD3+
    gate: {{type: boolean, or: [CD4+ T, blob]}}
  - name: not poly
    parent: cells
    gate: {{type: boolean, not: poly}}
  - name: deep
    parent: poly not blob
    gate: {{type: range, dimensions: {{CD4: [{b[2]!r}, null]}}}}
"""


@pytest.mark.parametrize("name", ["test_comp_example.fcs", "100715.fcs"])
def test_export_equals_flowkit_event_for_event_on_real_files_with_spill(name):
    path = need(FLOWKIT_DATA / name)
    sample = read_fcs(path)
    assert sample.spillover is not None
    t = parse_template(_real_template(sample), "real.yaml")
    ours = gate_events(prepare(sample, t)).masks
    xml = export_gatingml(t, sample)
    assert b'compensation-ref="FCS"' in xml  # the file's own $SPILL, as our engine uses it
    theirs = flowkit_masks(xml, fk_sample_from(path), [p.name for p in t.populations])
    for p in t.populations:
        assert 0 < ours[p.name].sum() < sample.n_events, p.name
        np.testing.assert_array_equal(ours[p.name], theirs[p.name], err_msg=p.name)
    # FSC-A limits are event values: the events on the minimum are in, those on the maximum out
    lo, hi = t.population("cells").gate.mins[0], t.population("cells").gate.maxs[0]
    f = sample.events[:, sample.channels.index("FSC-A")].astype(np.float64)
    assert (f == lo).any() and (f == hi).any()
    assert not ours["cells"][f == hi].any()
    assert ours["cells"][(f == lo) & theirs["cells"]].any()


def test_export_with_spill_from_csv_embeds_a_spectrum_matrix():
    sample, blob = synthetic(4)
    t = parse_template(SYN_TEMPLATE, "equivalence.yaml")
    other = SPILL.copy()
    other[0, 1] = 0.2
    comp = (("FL1-A", "FL2-A", "FL3-A"), other)
    ours = gate_events(prepare(sample, t, compensation=comp)).masks
    xml = export_gatingml(t, sample, compensation=comp)
    assert b'transforms:value="0.2"' in xml and b'compensation="command line"' in xml
    theirs = flowkit_masks(xml, fk_sample_from(blob), [p.name for p in t.populations])
    for p in t.populations:
        np.testing.assert_array_equal(ours[p.name], theirs[p.name], err_msg=p.name)
    default = gate_events(prepare(sample, t)).masks
    assert (default["CD4 T"] != ours["CD4 T"]).any()  # the matrix mattered


def test_export_is_deterministic_and_keeps_population_names():
    sample, _ = synthetic(5)
    t = parse_template(SYN_TEMPLATE, "equivalence.yaml")
    xml = export_gatingml(t, sample)
    assert xml == export_gatingml(t, sample)
    assert b'gating:id="CD57pos_SSC_low"' in xml and b'population="CD57+ SSC low"' in xml
    back = parse_external_template(xml, "equivalence.xml")
    assert [p.name for p in back.populations] == [p.name for p in t.populations]
    assert [p.parent for p in back.populations] == [p.parent for p in t.populations]
    masks, rows, _ = back.gate(sample)  # our FlowKit path on the round-tripped document
    ours = gate_events(prepare(sample, t)).masks
    for p in t.populations:
        np.testing.assert_array_equal(masks[p.name], ours[p.name], err_msg=p.name)
    assert {r["population"] for r in rows} == {p.name for p in t.populations}


def test_gatingml_ids_are_ncnames_and_unique():
    assert gatingml_id("CD4 PD1+LAG3+") == "CD4_PD1posLAG3pos"
    assert gatingml_id("CD56bright NK") == "CD56bright_NK"
    assert gatingml_id("4-1BB+") == "_4-1BBpos"
    t = parse_template("name: t\nversion: 1.0.0\npopulations:\n"
                       "  - name: a b\n    gate: {type: range, dimensions: {FSC-A: [0, 1e9]}}\n"
                       "  - name: a_b\n    gate: {type: range, dimensions: {FSC-A: [0, 1e9]}}\n", "ids.yaml")
    xml = export_gatingml(t, synthetic(6)[0])
    assert b'gating:id="a_b"' in xml and b'gating:id="a_b_2"' in xml
    assert [p.name for p in parse_external_template(xml, "ids.xml").populations] == ["a b", "a_b"]


# ---------------------------------------------------------------------- resolved (data-driven) export
ADAPTIVE = """name: adaptive
version: 2.1.0
transforms:
  scatter: identity
  fluorescence: {type: logicle, T: 262144, W: 0.5, M: 4.5, A: 0}
populations:
  - name: lymphocytes
    gate: {type: scatter, x: FSC-A, y: SSC-A, components: 3, select: largest}
  - name: singlets
    parent: lymphocytes
    gate: {type: singlets, area: FSC-A, height: FSC-H}
  - name: CD3+
    parent: singlets
    gate: {type: threshold, marker: CD3, side: above, method: density}
  - name: CD4 T
    parent: CD3+
    gate: {type: quadrant, x: {marker: CD4, method: density}, y: {marker: CD8, method: density}, quadrant: "+-"}
  - name: CD4 CD57 fixed
    parent: CD4 T
    gate: {type: threshold, marker: CD57, side: above, value: 0.3}
"""


def test_data_driven_template_is_refused_without_resolved_gates():
    sample, _ = synthetic(7)
    t = parse_template(ADAPTIVE, "adaptive.yaml")
    with pytest.raises(TemplateError) as e:
        export_gatingml(t, sample)
    msg = str(e.value)
    assert msg.startswith("adaptive.yaml: 4 gate(s) are computed from the data")
    for part in ("lymphocytes (scatter gate on FSC-A/SSC-A)", "singlets (singlet gate on FSC-A/FSC-H)",
                 "CD3+ (threshold on CD3 (density))", "CD4 T (quadrant on CD4 (density) x CD8 (density))",
                 "--resolved RESULTS_DIR --sample-id ID"):
        assert part in msg
    assert "CD4 CD57 fixed" not in msg


def test_resolved_export_reproduces_each_data_driven_gate_in_flowkit():
    sample, blob = synthetic(8, n=8000)
    t = parse_template(ADAPTIVE, "adaptive.yaml")
    result = gate_events(prepare(sample, t))
    rows = gate_rows(result, t, "s8")
    csv_rows = pd.DataFrame(rows).astype(str).to_dict("records")  # as read back from gates.csv
    xml = export_gatingml(t, sample, resolved=csv_rows, sample_id="s8")
    assert b'resolved_sample_id="s8"' in xml and b"EllipsoidGate" in xml and b"PolygonGate" in xml
    theirs = flowkit_masks(xml, fk_sample_from(blob), [p.name for p in t.populations])
    for p in t.populations:
        assert result.masks[p.name].sum() > 0, p.name
        np.testing.assert_array_equal(result.masks[p.name], theirs[p.name], err_msg=p.name)


def test_resolved_rows_of_another_template_version_or_channel_are_refused():
    sample, _ = synthetic(9, n=2500)
    t = parse_template(ADAPTIVE, "adaptive.yaml")
    rows = gate_rows(gate_events(prepare(sample, t)), t, "s9")
    stale = [{**r, "template_sha256": "0" * 64} for r in rows]
    with pytest.raises(TemplateError, match="made with another version of template 'adaptive'"):
        export_gatingml(t, sample, resolved=stale)
    moved = [{**r, "x_channel": "FL9-A"} if r["population"] == "CD3+" else r for r in rows]
    with pytest.raises(TemplateError, match=r"population 'CD3\+': the resolved gate used channel 'FL9-A' for CD3"):
        export_gatingml(t, sample, resolved=moved)
    with pytest.raises(TemplateError, match=r"no row for population\(s\) singlets"):
        export_gatingml(t, sample, resolved=[r for r in rows if r["population"] != "singlets"])
    nan = [{**r, "coordinates": json.dumps({"CD3": [float("nan"), None]})} if r["population"] == "CD3+" else r
           for r in rows]
    with pytest.raises(TemplateError, match="could not be computed"):
        export_gatingml(t, sample, resolved=nan)


# ====================================================================== (b) Gating-ML 2.0 reference
GML_TRUTH = {
    "range": {"Range1": "Range1"}, "time_range": {"Range2": "Range2"},
    "rect1": {"Rectangle1": "Rectangle1"}, "rect2": {"Rectangle2": "Rectangle2"},
    "poly1": {"Polygon1": "Polygon1"}, "poly2": {"Polygon2": "Polygon2"}, "poly3ns": {"Polygon3NS": "Polygon3NS"},
    "ellipse1": {"Ellipse1": "Ellipse1"}, "ellipsoid3d": {"Ellipsoid3D": "Ellipsoid3D"},
    "quadrant1": {q: q for q in ("FL2N-FL4N", "FL2N-FL4P", "FL2P-FL4N", "FL2P-FL4P")},
    "quadrant2": {q: q for q in ("FSCN-SSCN", "FSCD-SSCN-FL1N", "FSCP-SSCN-FL1N", "FSCD-FL1P", "FSCN-SSCP-FL1P")},
    "ratio_range1": {"RatRange1": "RatRange1"}, "ratio_range2": {"RatRange2": "RatRange2"},
    "log_ratio_range1": {"RatRange1a": "RatRange1a"},
    "boolean_and1": {"And1": "And1"}, "boolean_and2": {"And2": "And2"},
    "boolean_and3_complement": {"And3": "And3"}, "boolean_and4_not": {"And4": "And4"},
    "boolean_not1": {"Not1": "Not1"}, "boolean_or1": {"Or1": "Or1"}, "boolean_or2": {"Or2": "Or2"},
    "matrix_poly4": {"Polygon4": "Polygon4"}, "matrix_rect3": {"Rectangle3": "Rectangle3"},
    "matrix_rect4": {"Rectangle4": "Rectangle4"}, "matrix_rect5": {"Rectangle5": "Rectangle5"},
    "transform_asinh_range1": {"ScaleRange1": "ScaleRange1"}, "transform_hyperlog_range2": {"ScaleRange2": "ScaleRange2"},
    "transform_linear_range3": {"ScaleRange3": "ScaleRange3"}, "transform_logicle_range4": {"ScaleRange4": "ScaleRange4"},
    "transform_logicle_range5": {"ScaleRange5": "ScaleRange5"}, "transform_log_range6": {"ScaleRange6": "ScaleRange6"},
    "matrix_transform_asinh_range1c": {"ScaleRange1c": "ScaleRange1c"},
    "matrix_transform_asinh_range6c": {"ScaleRange6c": "ScaleRange6c"},
    "matrix_transform_hyperlog_range2c": {"ScaleRange2c": "ScaleRange2c"},
    "matrix_transform_hyperlog_range7c": {"ScaleRange7c": "ScaleRange7c"},
    "matrix_transform_linear_range3c": {"ScaleRange3c": "ScaleRange3c"},
    "matrix_transform_logicle_range4c": {"ScaleRange4c": "ScaleRange4c"},
    "matrix_transform_logicle_range5c": {"ScaleRange5c": "ScaleRange5c"},
    "matrix_transform_logicle_range8c": {"ScaleRange8c": "ScaleRange8c"},
    "matrix_transform_logicle_rect1": {"ScaleRect1": "ScaleRect1"},
    "parent_poly1_boolean_and2": {"ParAnd2": "ParAnd2"}, "parent_range1_boolean_and3": {"ParAnd3": "ParAnd3"},
    "parent_quadrant_rect": {"ParRectangle1": "ParQuadRect"}, "parent_rect1_rect_par1": {"ScalePar1": "ScalePar1"},
}


@pytest.fixture(scope="module")
def data1():
    return read_fcs(need(GATE_REF / "data1.fcs"))


def truth(name: str) -> np.ndarray:
    return np.loadtxt(GATE_REF / "truth" / f"Results_{name}.txt", dtype=np.int8).astype(bool)


@pytest.mark.parametrize("gml", sorted(GML_TRUTH))
def test_gatingml_reference_memberships_event_for_event(gml, data1):
    t = load_external_template(need(GATE_REF / "gml" / f"gml_{gml}_gate.xml"))
    assert t.external and t.version == "gatingml-2.0" and t.fmo_markers() == () and t.markers == ()
    masks, rows, _ = t.gate(data1)
    assert masks["root"].all() and len(rows) == len(t.populations)
    for population, result in GML_TRUTH[gml].items():
        want = truth(result)
        assert want.size == data1.n_events
        np.testing.assert_array_equal(masks[population], want, err_msg=f"{gml}: {population}")


def test_gatingml_all_gates_in_one_document(data1):
    t = load_external_template(need(GATE_REF / "gml" / "gml_all_gates.xml"))
    masks, _, _ = t.gate(data1)
    expected = {p: r for d in GML_TRUTH.values() for p, r in d.items()}
    checked = 0
    for population, result in expected.items():
        if population in masks:
            np.testing.assert_array_equal(masks[population], truth(result), err_msg=population)
            checked += 1
    assert checked == len(t.populations) == 49  # all but the 3-D ellipsoid and the quadrant's child
    par = t.population("ParAnd3")
    assert (par.parent, par.reference, par.gate_type) == ("Range1", "Range1", "boolean")
    assert t.population("FL2P-FL4P").parent == "root"  # a quadrant's parent is its quadrant gate's parent


def test_gatingml_template_through_the_gate_command(tmp_path, data1):
    runner = CliRunner()
    for gml, pops in (("boolean_and2", ["Range1", "Polygon1", "Ellipse1", "And2"]),
                      ("parent_quadrant_rect", ["FL2P-FL4P", "ParRectangle1"])):
        out = tmp_path / gml
        res = runner.invoke(cli, ["gate", "-t", str(GATE_REF / "gml" / f"gml_{gml}_gate.xml"),
                                  str(GATE_REF / "data1.fcs"), "--out", str(out)])
        assert res.exit_code == 0, res.output
        table = pd.read_csv(out / "populations.csv").set_index("population")
        for p in pops:
            assert table.loc[p, "count"] == truth(GML_TRUTH[gml].get(p, p)).sum(), p
        assert (table["template_version"] == "gatingml-2.0").all()
        sha = hashlib.sha256((GATE_REF / "gml" / f"gml_{gml}_gate.xml").read_bytes()).hexdigest()
        assert (table["template_sha256"] == sha).all()
        gates = pd.read_csv(out / "gates.csv")
        assert set(gates["method"]) == {"gatingml"}
    child = table.loc["ParRectangle1"]
    assert (child["parent"], child["parent_count"]) == ("FL2P-FL4P", truth("FL2P-FL4P").sum())


# ====================================================================== (c) FlowJo workspaces
def flowjo_counts(wsp: Path) -> dict[str, int]:
    """Population counts FlowJo stored under the workspace's SampleNode (read with lxml, not FlowKit)."""
    from lxml import etree

    root = etree.parse(str(wsp)).getroot()
    node = root.find(".//SampleNode")
    return {p.get("name"): int(p.get("count")) for p in node.iter("Population")}


@pytest.mark.parametrize("wsp", ["simple_diamond_example_quad_gate.wsp", "test_data_diamond_asinh_rect.wsp",
                                 "test_data_diamond_asinh_rect2.wsp", "test_data_diamond_biex_rect.wsp"])
def test_flowjo_counts_equal_the_workspace(wsp):
    path = need(DIAMOND / wsp)
    sample = read_fcs(DIAMOND / "test_data_diamond_01.fcs")
    t = load_external_template(path)
    assert t.version == "flowjo-wsp" and t.name == path.stem
    masks, rows, findings = t.gate(sample)
    want = flowjo_counts(path)
    assert want and {p.name for p in t.populations} == set(want)
    for name, count in want.items():
        assert int(masks[name].sum()) == count, name
    assert {r["method"] for r in rows} == {"flowjo"} and not findings


def test_flowjo_workspace_through_the_gate_command(tmp_path):
    wsp = need(DIAMOND / "simple_diamond_example_quad_gate.wsp")
    res = CliRunner().invoke(cli, ["gate", "-t", str(wsp), str(DIAMOND / "test_data_diamond_01.fcs"),
                                   "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    table = pd.read_csv(tmp_path / "out" / "populations.csv")
    assert dict(zip(table["population"], table["count"])) == flowjo_counts(wsp)
    assert set(table["template_version"]) == {"flowjo-wsp"} and set(table["parent_count"]) == {200000}
    assert table["pct_parent"].sum() == pytest.approx(100.0)  # the four quadrants partition the events


def test_flowjo_file_not_in_workspace_falls_back_with_a_finding(tmp_path):
    wsp = need(DIAMOND / "test_data_diamond_asinh_rect.wsp")
    renamed = tmp_path / "other_name.fcs"
    shutil.copyfile(DIAMOND / "test_data_diamond_01.fcs", renamed)
    masks, _, findings = load_external_template(wsp).gate(read_fcs(renamed))
    assert masks["upper_right"].sum() == flowjo_counts(wsp)["upper_right"]
    assert [f.code for f in findings] == ["FLOWJO_SAMPLE_NOT_IN_WORKSPACE"]
    assert "other_name.fcs is not in test_data_diamond_asinh_rect.wsp" in findings[0].message


def test_flowjo_repeated_gate_names_are_made_unique_by_their_path():
    t = load_external_template(need(EIGHT_COLOR / "8_color_ICS.wsp"))
    names = [p.name for p in t.populations]
    assert len(names) == len(set(names)) == 14
    assert {"CD4+/CD107a+", "CD8+/CD107a+", "CD4+/IFNg+", "CD8+/TNFa+"} <= set(names)
    assert "CD107a+" not in names and "CD3+" in names  # unique names stay as they are
    assert t.population("CD8+/CD107a+").parent == "CD8+"
    assert t.population("CD8+/CD107a+").gate_path == ("root", "Time", "Singlets", "aAmine-", "CD3+", "CD8+")


def test_flowjo_repeated_gate_names_gate_like_flowkit_workspace(tmp_path):
    """Gates found by path (CD4+/IFNg+ vs CD8+/IFNg+) equal FlowKit's Workspace API on a synthetic file."""
    from immunoprofile.fcs import parse_spillover

    wsp = need(EIGHT_COLOR / "8_color_ICS.wsp")
    name = "101_DEN084Y5_15_E01_008_clean.fcs"
    kw = fk.parse_wsp(str(wsp))["samples"][name]["keywords"]
    channels = [kw[f"$P{i}N"] for i in range(1, int(kw["$PAR"]) + 1)]
    rng = np.random.default_rng(0)
    n = 40000
    ev = np.column_stack([rng.uniform(0, 262143, (n, 6)), rng.lognormal(7, 2, (n, 8)) - 300,
                          rng.uniform(0, 2000, n)]).astype(np.float32)
    ev[:, 2] = rng.uniform(72000, 92000, n)  # FSC-W and Time mostly inside the first two gates
    ev[:, 14] = rng.uniform(5, 150, n)
    path = tmp_path / name
    path.write_bytes(fcs_bytes(ev, channels, spillover=parse_spillover(kw["$SPILLOVER"])))
    t = load_external_template(wsp)
    masks, _, findings = t.gate(read_fcs(path))
    assert not findings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ws = fk.Workspace(str(wsp), fcs_samples=[str(path)])
        ws.analyze_samples(sample_id=name, use_mp=False)
    for p in t.populations:
        want = ws.get_gate_membership(name, p.gate_name, gate_path=p.gate_path)
        np.testing.assert_array_equal(masks[p.name], want, err_msg=p.name)
    assert masks["CD4+/IFNg+"].sum() > 0 and masks["CD8+/IFNg+"].sum() > 0
    assert not (masks["CD4+/IFNg+"] & ~masks["CD4+"]).any() and not (masks["CD8+/IFNg+"] & ~masks["CD8+"]).any()


def test_flowjo_workspace_on_a_file_without_its_channels_is_a_marker_error():
    t = load_external_template(need(EIGHT_COLOR / "8_color_ICS_simple.wsp"))
    sample = read_fcs(need(DIAMOND / "test_data_diamond_01.fcs"))
    with pytest.raises(MarkerError) as e:
        t.gate(sample)
    msg = str(e.value)
    assert "test_data_diamond_01.fcs: 8_color_ICS_simple.wsp gates on channel(s) this file does not have" in msg
    assert "FSC-A (gate " in msg and "the file has: channel_A; channel_B" in msg


# ====================================================================== errors and FlowKit samples
def test_external_template_errors_name_the_file_and_what_to_do(tmp_path):
    bad = tmp_path / "broken.xml"
    bad.write_text("<?xml version='1.0'?>\n<gating:Gating-ML>\n  <unclosed>\n")
    with pytest.raises(TemplateError, match=r"broken.xml: line \d+: not well-formed XML"):
        load_template(str(bad))
    with pytest.raises(TemplateError) as e:
        load_template(str(need(GATE_REF / "gml" / "gml_range_gate_attr_testing.xml")))
    assert "gml_range_gate_attr_testing.xml: not a valid Gating-ML 2.0 document (line 7: Element 'sample': This " \
        "element is not expected. Expected is one of ( gating:RectangleGate, gating:PolygonGate" in str(e.value)
    external = load_template(str(need(GATE_REF / "gml" / "gml_rect1_gate.xml")))
    with pytest.raises(TemplateError, match="already a Gating-ML/FlowJo document; export works on native YAML"):
        export_gatingml(external, read_fcs(GATE_REF / "data1.fcs"))
    with pytest.raises(TemplateError) as e:
        load_template(str(need(EIGHT_COLOR / "8_color_ICS_dot_gate_name.wsp")))
    assert "FlowKit cannot read this FlowJo workspace" in str(e.value) and "rename gates named '.'" in str(e.value)
    with pytest.raises(TemplateError) as e:
        load_template(str(tmp_path / "missing.wsp"))
    assert e.value.code == "TEMPLATE_NOT_FOUND"
    empty = tmp_path / "empty.xml"
    empty.write_text('<?xml version="1.0"?>\n<gating:Gating-ML xmlns:gating='
                     '"http://www.isac-net.org/std/Gating-ML/v2.0/gating"></gating:Gating-ML>\n')
    with pytest.raises(TemplateError, match="empty.xml: .*"):
        load_template(str(empty))


def test_flowkit_sample_holds_exactly_our_events(tmp_path, data1):
    # float64 events (log-decoded FCS 2.0): FlowKit re-reads the checked bytes
    assert data1.events.dtype == np.float64
    fks = flowkit_sample(data1)
    np.testing.assert_array_equal(fks.get_events(source="raw"), data1.events)
    # float32 events: an in-memory FCS written from the matrix; the file is not needed
    sample, _ = synthetic(10, n=500)
    fks = flowkit_sample(sample)
    np.testing.assert_array_equal(fks.get_events(source="raw"), sample.events.astype(np.float64))
    assert fks.get_metadata()["spillover"].startswith("3,FL1-A,FL2-A,FL3-A")
    # one data set of a multi-data-set file
    lmd = FLOWKIT_DATA / "multi_dataset_fcs" / "coulter.lmd"
    if lmd.exists():
        second = read_fcs(lmd, dataset=1)
        np.testing.assert_array_equal(flowkit_sample(second).get_events(source="raw"), second.events)
    # a file changed after it was read is refused
    copy = tmp_path / "data1.fcs"
    shutil.copyfile(GATE_REF / "data1.fcs", copy)
    s = read_fcs(copy)
    raw = bytearray(copy.read_bytes())
    raw[-1] ^= 0xFF
    copy.write_bytes(bytes(raw))
    with pytest.raises(GatingError, match="the file changed while it was being gated"):
        flowkit_sample(s)


def test_fcs_compensation_with_fluorescence_outside_the_spillover():
    """Gating-ML 'FCS' on a file whose $SPILLOVER leaves FL4-A out: FL4-A is used uncompensated, as in our engine."""
    sample, blob = synthetic(11)
    t = parse_template(SYN_TEMPLATE, "equivalence.yaml")
    xml = export_gatingml(t, sample).replace(b'compensation-ref="spillover"', b'compensation-ref="FCS"')
    with pytest.raises(ValueError, match="Matrix labels do not match"):  # FlowKit on its own refuses
        flowkit_masks(xml, fk_sample_from(blob), ["CD3+"])
    masks, _, findings = parse_external_template(xml, "fcs_comp.xml").gate(sample)
    ours = gate_events(prepare(sample, t)).masks
    for p in t.populations:
        np.testing.assert_array_equal(masks[p.name], ours[p.name], err_msg=p.name)
    assert not findings
