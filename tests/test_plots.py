"""Figures: content checked against the tables they draw (populations.csv, gates.csv, compare).

Truth comes from outside the plotting code: the values of ``populations.csv`` pivoted by
pandas, medians and log2 ratios computed here with numpy, the coordinates written to
``gates.csv`` by the gating engine, and ``compare_timepoints`` called directly.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest

from immunoprofile import plots
from immunoprofile.batch import run_gate
from immunoprofile.compare import compare_timepoints
from immunoprofile.errors import InputFileError, ResultsError, UsageError
from immunoprofile.results import load_populations
from immunoprofile.samplesheet import read_sheet
from immunoprofile.simulate import simulate_cohort
from immunoprofile.templates import load_template

TIMEPOINTS = ("pre", "post_clofarabine", "post_lenalidomide")


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """A gated synthetic cohort: 4 patients x 3 timepoints, T-cell panel, FMO controls per batch."""
    base = tmp_path_factory.mktemp("plots")
    simulate_cohort(base / "cohort", patients=4, timepoints=TIMEPOINTS, events=3000, panels=("t_cell",), seed=11)
    sheet = base / "cohort" / "samplesheet.csv"
    summary = run_gate(read_sheet(sheet), [load_template("t_cell_exhaustion")], base / "results",
                       command_options={"samples": str(sheet)})
    assert summary.failed == 0
    return base


@pytest.fixture(scope="module")
def results(cohort) -> Path:
    return cohort / "results"


@pytest.fixture(scope="module")
def frame(results) -> pd.DataFrame:
    return load_populations(results)


@pytest.fixture(scope="module")
def gates_table(results) -> pd.DataFrame:
    return pd.read_csv(results / "gates.csv", dtype=str, keep_default_na=False)


def raw_populations(results: Path) -> pd.DataFrame:
    """populations.csv read straight with pandas (not through immunoprofile.results)."""
    t = pd.read_csv(results / "populations.csv", dtype={"sample_id": str, "patient_id": str, "control": str},
                    float_precision="round_trip")
    return t[t["control"].isna()]


def pretend_files_moved(results: Path, gone: Path) -> None:
    """Rewrite a copied results folder's manifest as if its sheet and FCS files had moved away."""
    manifest = json.loads((results / "manifest.json").read_text())
    manifest["options"]["samples"] = str(gone / "samplesheet.csv")
    for entry in manifest.get("inputs", []):
        if entry.get("path"):
            entry["path"] = str(gone / Path(entry["path"]).name)
    (results / "manifest.json").write_text(json.dumps(manifest))


def lines(ax, prefix: str) -> list:
    return [ln for ln in ax.get_lines() if (ln.get_gid() or "").startswith(prefix)]


def visible_axes(fig) -> list:
    return [ax for ax in fig.axes if ax.get_visible() and ax.get_gid() != "unused" and ax.get_label() != "<colorbar>"]


# --------------------------------------------------------------------------- longitudinal
def test_longitudinal_draws_one_line_per_patient_with_the_table_values(results, frame):
    truth = raw_populations(results)
    fig = plots.longitudinal_figure(frame, ["CD4 PD1+", "CD8 PD1+"])
    axs = visible_axes(fig)
    assert [ax.get_title() for ax in axs] == ["CD4 PD1+", "CD8 PD1+"]
    patients = sorted(truth["patient_id"].unique())
    group_of = truth.drop_duplicates("patient_id").set_index("patient_id")["group"]
    for ax in axs:
        pop = truth[truth["population"] == ax.get_title()]
        drawn = lines(ax, "patient:")
        assert sorted(ln.get_gid().split(":", 1)[1] for ln in drawn) == patients
        for ln in drawn:
            pid = ln.get_gid().split(":", 1)[1]
            want = pop[pop["patient_id"] == pid].sort_values("day")
            np.testing.assert_array_equal(ln.get_xdata(), want["day"].to_numpy(float))
            np.testing.assert_allclose(ln.get_ydata(), want["pct_parent"].to_numpy(float), rtol=0, atol=0)
            assert ln.get_color() == plots.GROUP_COLOURS[group_of[pid]]
        # group medians: groups with >= 2 patients, median over patients at each timepoint
        sizes = group_of.value_counts()
        medians = {ln.get_gid().split(":", 1)[1]: ln for ln in lines(ax, "median:")}
        assert set(medians) == set(sizes[sizes >= 2].index)
        for g, ln in medians.items():
            members = pop[pop["group"] == g]
            by_tp = [members[members["timepoint"] == t] for t in TIMEPOINTS]
            np.testing.assert_allclose(ln.get_ydata(), [np.median(m["pct_parent"]) for m in by_tp])
            np.testing.assert_allclose(ln.get_xdata(), [np.median(m["day"]) for m in by_tp])
        assert ax.get_xlabel() == "study day"
        assert ax.get_ylabel() == "% of parent"


def test_longitudinal_without_days_uses_timepoint_order(frame):
    no_days = frame.assign(day=np.nan)
    fig = plots.longitudinal_figure(no_days, ["CD4 PD1+"])
    ax = visible_axes(fig)[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == list(TIMEPOINTS)   # 'pre' first, then as they appear
    for ln in lines(ax, "patient:"):
        np.testing.assert_array_equal(ln.get_xdata(), [0, 1, 2])
    fig = plots.longitudinal_figure(no_days, ["CD4 PD1+"], timepoints=["post_lenalidomide", "pre"])
    ax = visible_axes(fig)[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["post_lenalidomide", "pre"]
    assert all(len(ln.get_xdata()) == 2 for ln in lines(ax, "patient:"))


def test_facet_patient_gives_one_panel_per_patient(results, frame):
    truth = raw_populations(results)
    fig = plots.longitudinal_figure(frame, ["CD4 PD1+", "CD8 PD1+", "CD4 LAG3+"], facet="patient")
    axs = visible_axes(fig)
    patients = sorted(truth["patient_id"].unique())
    assert [ax.get_title().split(" ")[0] for ax in axs] == patients
    for ax, pid in zip(axs, patients):
        drawn = lines(ax, "population:")
        assert [ln.get_gid() for ln in drawn] == ["population:CD4 PD1+", "population:CD8 PD1+",
                                                  "population:CD4 LAG3+"]
        for ln in drawn:
            want = truth[(truth["patient_id"] == pid) & (truth["population"] == ln.get_gid().split(":", 1)[1])]
            np.testing.assert_allclose(ln.get_ydata(), want.sort_values("day")["pct_parent"])


def test_single_patient_is_drawn_and_says_so(frame, caplog):
    fig = plots.longitudinal_figure(frame, ["CD4 PD1+"], patients=["P02"])
    ax = visible_axes(fig)[0]
    assert [ln.get_gid() for ln in lines(ax, "patient:")] == ["patient:P02"]
    assert lines(ax, "median:") == []
    assert "1 patient" in fig._suptitle.get_text()
    assert "only one patient" in caplog.text


@pytest.mark.parametrize("kwargs, message", [
    ({"populations": ["CD4 PD-L1+"]}, r"unknown population 'CD4 PD-L1\+'; the results have: .*CD4 PD1\+"),
    ({"populations": ["CD4 PD1+"], "patients": ["P99"]}, r"unknown patient\(s\) P99; the results have: P01"),
    ({"populations": ["CD4 PD1+"], "timepoints": ["week12"]}, r"unknown timepoint\(s\) week12"),
    ({"populations": ["CD4 PD1+"], "measure": "pct_total"}, r"unknown measure 'pct_total'"),
    ({"populations": ["CD4 PD1+"], "facet": "group"}, r"unknown facet 'group'"),
])
def test_longitudinal_bad_arguments_are_clear(frame, kwargs, message):
    with pytest.raises(UsageError, match=message):
        plots.longitudinal_figure(frame, **kwargs)


def test_empty_inputs_give_a_message_not_a_blank_figure(frame):
    with pytest.raises(UsageError, match="no values of cells_per_ul"):
        plots.longitudinal_figure(frame.assign(cells_per_ul=np.nan), ["CD4 PD1+"], measure="cells_per_ul")
    with pytest.raises(UsageError, match="no stained"):
        plots.longitudinal_figure(frame.assign(control="FMO:PD1"), ["CD4 PD1+"])
    one_tp = frame[frame["timepoint"] == "pre"]
    with pytest.raises(UsageError, match=r"unknown timepoint\(s\) post_clofarabine; the results have: pre"):
        plots.heatmap_figure(one_tp, "pre", "post_clofarabine")
    crossed = frame[((frame["patient_id"] == "P01") & (frame["timepoint"] == "pre"))
                    | ((frame["patient_id"] == "P02") & (frame["timepoint"] == "post_clofarabine"))]
    with pytest.raises(UsageError, match="no patient has pct_parent values at both pre and post_clofarabine"):
        plots.heatmap_figure(crossed, "pre", "post_clofarabine")
    with pytest.raises(UsageError, match="no patient has pct_parent values at both pre and post_clofarabine"):
        plots.paired_figure(crossed, "pre", "post_clofarabine", plots.paired_statistics(frame, "pre",
                                                                                         "post_clofarabine"))


# --------------------------------------------------------------------------- paired
def test_paired_slopes_and_annotation_match_compare(frame):
    stats = compare_timepoints(frame, ["pre", "post_clofarabine"], measures=["pct_parent"]).paired
    fig = plots.paired_figure(frame, "pre", "post_clofarabine", stats,
                              populations=["CD4 PD1+", "CD8 PD1+", "T cells"])
    axs = visible_axes(fig)
    assert [ax.get_title() for ax in axs] == ["CD4 PD1+", "CD8 PD1+", "T cells"]
    for ax in axs:
        row = stats[(stats["population"] == ax.get_title()) & (stats["analysis"] == "within")
                    & (stats["group"] == "all")].iloc[0]
        drawn = lines(ax, "patient:")
        assert len(drawn) == row["n_pairs"] == 4
        # the drawn pairs reproduce compare's median change
        change = np.median([ln.get_ydata()[1] - ln.get_ydata()[0] for ln in drawn])
        assert change == pytest.approx(row["median_difference"], rel=1e-12)
        text = [t.get_text() for t in ax.texts if t.get_gid() == "annotation"][0]
        assert f"n = {int(row['n_pairs'])}" in text
        assert f"median change = {row['median_difference']:+.3g}" in text
        q = row["q_value"]
        assert (f"q = {q:.3g}" if q >= 0.001 else "q = <0.001") in text
        assert [t.get_text() for t in ax.get_xticklabels()] == ["pre", "post_clofarabine"]


def test_paired_statistics_in_process_equal_compare(frame):
    ours = plots.paired_statistics(frame, "pre", "post_lenalidomide")
    theirs = compare_timepoints(frame, ["pre", "post_lenalidomide"], measures=["pct_parent"]).paired
    pd.testing.assert_frame_equal(ours, theirs)


def test_paired_with_too_few_pairs_says_not_tested(frame):
    two = frame[frame["patient_id"].isin(["P01", "P02"])]
    stats = plots.paired_statistics(two, "pre", "post_clofarabine")
    fig = plots.paired_figure(two, "pre", "post_clofarabine", stats, populations=["CD4 PD1+"])
    text = [t.get_text() for t in visible_axes(fig)[0].texts if t.get_gid() == "annotation"][0]
    assert "n = 2" in text and "q = n/a (not tested: fewer than 3 pairs)" in text


def test_paired_refuses_stats_of_another_comparison(frame):
    stats = plots.paired_statistics(frame, "pre", "post_lenalidomide")
    with pytest.raises(UsageError, match="no pct_parent comparison of pre -> post_clofarabine; they have: "
                                         "pre -> post_lenalidomide"):
        plots.paired_figure(frame, "pre", "post_clofarabine", stats)


# --------------------------------------------------------------------------- heatmap
def test_heatmap_cells_are_log2_fold_changes(results, frame):
    truth = raw_populations(results)
    pops = ["CD4 T", "CD8 T", "CD4 PD1+", "CD8 PD1+"]
    fig = plots.heatmap_figure(frame, "pre", "post_clofarabine", populations=pops)
    ax = fig.axes[0]
    image = [im for im in ax.get_images() if im.get_gid() == "fold_change"][0]
    rows = [t.get_text().split(" ")[0] for t in ax.get_yticklabels()]
    cols = [t.get_text() for t in ax.get_xticklabels()]
    assert cols == pops
    wide = truth.pivot_table(index=["patient_id", "population"], columns="timepoint", values="pct_parent")
    expected = np.array([[math.log2(wide.loc[(p, c), "post_clofarabine"] / wide.loc[(p, c), "pre"]) for c in cols]
                         for p in rows])
    np.testing.assert_allclose(np.asarray(image.get_array()), expected, rtol=1e-12)
    assert image.get_cmap().name.startswith("RdBu_r")
    assert image.norm.vmin == -image.norm.vmax == -np.max(np.abs(expected))   # centred at 0
    groups = truth.drop_duplicates("patient_id").set_index("patient_id")["group"]
    order = [plots._group_rank(g) for g in groups[rows]]
    assert order == sorted(order)                                            # rows grouped by response


def test_fold_change_of_a_zero_uses_half_the_smallest_positive_value():
    base = {"file": "", "day": np.nan, "group": "responder", "panel": "t", "batch": "", "control": "",
            "parent": "T", "count": 1.0}
    rows = []
    for pid, pre, post in (("P1", 4.0, 0.0), ("P2", 2.0, 8.0), ("P3", 0.0, 0.0)):
        for tp, v in (("pre", pre), ("post", post)):
            rows.append({**base, "sample_id": f"{pid}_{tp}", "patient_id": pid, "timepoint": tp,
                         "population": "X", "pct_parent": v})
    table = plots.fold_changes(pd.DataFrame(rows), "pre", "post")
    floor = 2.0 / 2   # half the smallest positive value of the population
    assert table.loc["P1", "X"] == pytest.approx(math.log2(floor / 4.0))
    assert table.loc["P2", "X"] == pytest.approx(2.0)
    assert table.loc["P3", "X"] == 0.0


# --------------------------------------------------------------------------- gates
def test_replayed_gates_reproduce_every_count_of_populations_csv(results):
    truth = raw_populations(results)
    records = plots.GatingRecords(results)
    stained = sorted(truth["sample_id"].unique())
    assert records.sample_ids[:len(stained)] == [s for s in records.sample_ids if s in set(stained)]
    for sid in stained:
        view = records.sample(sid)
        assert view.mismatches == []
        want = truth[truth["sample_id"] == sid].set_index("population")
        assert [g.population for g in view.gates] == list(want.index)
        for g in view.gates:
            assert (g.count, g.parent_count) == (want.loc[g.population, "count"], want.loc[g.population,
                                                                                          "parent_count"])
            assert int(view.masks[g.population].sum()) == g.count


def test_gate_plot_draws_the_recorded_gates(results, gates_table):
    truth = raw_populations(results)
    sid = "P01_pre_t_cell"
    view = plots.GatingRecords(results).sample(sid)
    fig = plots.gates_figure(view)
    rec = gates_table[gates_table["sample_id"] == sid].set_index("population")
    artists = {a.get_gid(): a for ax in fig.axes for a in [*ax.patches, *ax.lines, *ax.texts] if a.get_gid()}

    # scatter ellipse: points of the drawn outline lie at exactly the recorded Mahalanobis distance
    c = json.loads(rec.loc["lymphocytes", "coordinates"])
    patch = artists["gate:lymphocytes"]
    theta = np.linspace(0, 2 * np.pi, 50)
    outline = patch.get_patch_transform().transform(np.column_stack([np.cos(theta), np.sin(theta)]))
    d = outline - np.asarray(c["center"])
    d2 = np.einsum("ij,jk,ik->i", d, np.linalg.inv(np.asarray(c["covariance"])), d)
    np.testing.assert_allclose(d2, c["distance"] ** 2, rtol=1e-9)
    # singlets polygon: the recorded vertices
    c = json.loads(rec.loc["singlets", "coordinates"])
    np.testing.assert_array_equal(artists["gate:singlets"].get_xy()[:-1], np.asarray(c["vertices"]))
    # thresholds and quadrant dividers at the recorded values; FMO thresholds dashed and vermillion
    methods = set()
    for pop, r in rec.iterrows():
        c = json.loads(r["coordinates"])
        if r["gate_type"] == "range":
            (marker, (lo, hi)), = c.items()
            for bound, v in (("min", lo), ("max", hi)):
                if v is not None:
                    line = artists[f"gate:{pop}:{marker}:{bound}"]
                    assert line.get_xdata()[0] == v
                    fmo = r["method"] == "fmo"
                    assert (line.get_linestyle() == "--") is fmo
                    assert (line.get_color() == plots.FMO_COLOUR) is fmo
                    methods.add(r["method"])
        elif r["gate_type"] == "quadrant":
            xs = [a.get_xdata()[0] for g, a in artists.items() if g.endswith(":x") and g.startswith("gate:")]
            ys = [a.get_ydata()[0] for g, a in artists.items() if g.endswith(":y") and g.startswith("gate:")]
            assert c["x_divider"] in xs and c["y_divider"] in ys
    assert {"fmo", "density"} <= methods
    # percentages drawn = populations.csv, for every gate (booleans included)
    want = truth[truth["sample_id"] == sid].set_index("population")["pct_parent"]
    for pop, pct in want.items():
        text = artists[f"pct:{pop}"].get_text()
        assert re.search(rf"(^|\n|: ){pct:.1f}%", text), (pop, text, pct)
    # axes: transformed units, labelled with the recorded marker and channel names
    for ax in visible_axes(fig):
        if not ax.get_xlabel():
            continue
        gated = [g for g in artists if g.startswith("pct:") and artists[g].axes is ax]
        pops = [g.split(":", 1)[1] for g in gated]
        r = rec.loc[pops[0]]
        marker = r["x_marker"] if r["gate_type"] != "range" else next(iter(json.loads(r["coordinates"])))
        channel = r["x_channel"]
        assert ax.get_xlabel() == f"{marker} ({channel})" if marker != channel else marker
        if r["y_marker"]:
            assert ax.get_ylabel().split(" (")[0] == r["y_marker"]
        else:
            assert ax.get_ylabel() == "SSC-A"                     # one-dimensional gates: against side scatter


def test_fmo_control_plot_marks_its_percentile_threshold(results, gates_table):
    records = plots.GatingRecords(results)
    controls = [s for s in records.sample_ids if "FMO" in s]
    assert controls and records.sample_ids[-len(controls):] == controls      # controls come last
    sid = controls[0]
    view = records.sample(sid)
    rec = gates_table[(gates_table["sample_id"] == sid) & gates_table["population"].str.startswith("FMO ")]
    assert len(rec) == 2 and rec["population"].nunique() == 1      # one threshold per parent (CD4 T, CD8 T)
    fig = plots.gates_figure(view)
    for _, r in rec.iterrows():
        (marker, (lo, _hi)), = json.loads(r["coordinates"]).items()
        name = f"{r['population']} ({r['parent']})"
        line = [ln for ax in fig.axes for ln in ax.lines if ln.get_gid() == f"gate:{name}:{marker}:min"][0]
        assert line.get_xdata()[0] == lo and line.get_linestyle() == "--"
        assert line.axes.get_title().startswith(r["parent"])
        g = [g for g in view.gates if g.population == name][0]
        # the threshold is the FMO's 99.5th percentile: about 0.5% of its parent lies above it
        assert g.pct == pytest.approx(100 - 99.5, abs=0.5)


def test_gate_thumbnail_is_one_row_of_panels(results):
    view = plots.GatingRecords(results).sample("P02_post_clofarabine_t_cell")
    fig = plots.gates_figure(view, thumbnail=True)
    axs = visible_axes(fig)
    non_boolean = [g for g in view.gates if g.gate_type != "boolean"]
    assert 0 < len(axs) <= len(non_boolean)
    assert len({round(ax.get_position().y0, 3) for ax in axs}) == 1
    assert all(ax.get_xlabel() for ax in axs)


SYNTHETIC_TEMPLATE = """
name: synthetic
version: 1.0.0
compensation: none
transforms: {scatter: identity, fluorescence: {type: logicle, T: 262144, W: 0.5, M: 4.5, A: 0}}
populations:
  - name: cells
    parent: root
    gate: {type: range, dimensions: {FSC-A: [40000, 150000], CD3: [0.3, null]}}
  - name: triangle
    parent: cells
    gate: {type: polygon, x: CD3, y: CD8, vertices: [[0.3, 0.1], [0.95, 0.1], [0.6, 0.9]]}
  - name: CD8 high
    parent: cells
    gate: {type: threshold, marker: CD8, side: above, value: 0.55}
  - name: triangle not high
    parent: cells
    gate: {type: boolean, and: [triangle, {not: CD8 high}]}
"""


def test_replay_and_drawing_of_rectangles_polygons_and_histograms():
    """Gate types the bundled templates do not use, on a file without side scatter."""
    from matplotlib.path import Path as MplPath

    from immunoprofile.fcs import fcs_bytes, parse_fcs
    from immunoprofile.gating import gate_events, prepare
    from immunoprofile.stats import gate_rows
    from immunoprofile.templates import parse_template
    from immunoprofile.transform import Logicle

    rng = np.random.default_rng(3)
    n = 5000
    events = np.column_stack([rng.uniform(0, 200_000, n), rng.uniform(-200, 60_000, n),
                              rng.uniform(-200, 60_000, n)]).astype(np.float32)
    sample = parse_fcs(fcs_bytes(events, ["FSC-A", "FITC-A", "APC-A"], ["", "CD3", "CD8"]), "synthetic.fcs")
    template = parse_template(SYNTHETIC_TEMPLATE, "synthetic.yaml")
    data = prepare(sample, template)
    engine = gate_events(data)
    rows = pd.DataFrame(gate_rows(engine, template, "S1"))
    masks, gates = plots.replay_gates(data, rows)
    for name, mask in engine.masks.items():                        # the gating engine's own masks
        np.testing.assert_array_equal(masks[name], mask)
    # numpy hand counts on the same events
    fsc = events[:, 0].astype(float)
    cd3 = Logicle().apply(events[:, 1].astype(float))
    cd8 = Logicle().apply(events[:, 2].astype(float))
    cells = (fsc >= 40000) & (fsc < 150000) & (cd3 >= 0.3)
    tri = MplPath([[0.3, 0.1], [0.95, 0.1], [0.6, 0.9]]).contains_points(np.column_stack([cd3, cd8])) & cells
    high = (cd8 >= 0.55) & cells
    counts = {g.population: g.count for g in gates}
    assert counts["cells"] == cells.sum()
    assert abs(counts["triangle"] - tri.sum()) <= 2                 # edge points: winding rule vs matplotlib
    assert counts["CD8 high"] == high.sum()
    assert counts["triangle not high"] == (masks["triangle"] & ~high).sum()

    dims = ["FSC-A", "CD3", "CD8"]
    view = plots.SampleGating("S1", "S1", {d: data.values(d) for d in dims}, {d: d for d in dims},
                              {d: data.transforms[d] for d in dims}, masks, gates, side_scatter=None)
    fig = plots.gates_figure(view)
    artists = {a.get_gid(): a for ax in fig.axes for a in [*ax.patches, *ax.lines, *ax.texts] if a.get_gid()}
    rect = artists["gate:cells"]
    assert (rect.get_x(), rect.get_x() + rect.get_width(), rect.get_y()) == (40000, 150000, 0.3)
    assert rect.axes.get_xlabel() == "FSC-A" and rect.axes.get_ylabel() == "CD3"
    np.testing.assert_array_equal(artists["gate:triangle"].get_xy()[:-1], [[0.3, 0.1], [0.95, 0.1], [0.6, 0.9]])
    threshold = artists["gate:CD8 high:CD8:min"]
    assert threshold.get_xdata()[0] == 0.55
    assert threshold.axes.get_ylabel() == "events"                   # no side scatter: a histogram
    assert artists["pct:CD8 high"].get_text().endswith(f"{100 * high.sum() / cells.sum():.1f}%")
    assert "triangle not high" in artists["pct:triangle not high"].get_text()


def test_moved_or_changed_fcs_files_are_reported(cohort, tmp_path):
    moved = tmp_path / "results"
    shutil.copytree(cohort / "results", moved)
    pretend_files_moved(moved, tmp_path / "gone")
    with pytest.raises(InputFileError, match="cannot find the FCS file of sample 'P01_pre_t_cell'.*--fcs-dir"):
        plots.GatingRecords(moved).sample("P01_pre_t_cell")
    assert plots.GatingRecords(moved, fcs_dir=cohort / "cohort").sample("P01_pre_t_cell").mismatches == []
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(cohort / "cohort" / "P02_pre_t_cell.fcs", other / "P01_pre_t_cell.fcs")
    with pytest.raises(ResultsError, match="is not the file that was gated") as e:
        plots.GatingRecords(moved, fcs_dir=other).sample("P01_pre_t_cell")
    assert e.value.code == "RESULTS_STALE"
    with pytest.raises(UsageError, match="sample 'nope' has no gates"):
        plots.GatingRecords(moved).sample("nope")


# --------------------------------------------------------------------------- output
def test_same_inputs_give_the_same_bytes(frame):
    for fmt in plots.FORMATS:
        a = plots.figure_bytes(plots.longitudinal_figure(frame, ["CD4 PD1+", "CD8 PD1+"]), fmt)
        b = plots.figure_bytes(plots.longitudinal_figure(frame, ["CD4 PD1+", "CD8 PD1+"]), fmt)
        assert a == b, fmt
    png = plots.figure_bytes(plots.longitudinal_figure(frame, ["CD4 PD1+"]), "png")
    svg = plots.figure_bytes(plots.longitudinal_figure(frame, ["CD4 PD1+"]), "svg")
    pdf = plots.figure_bytes(plots.longitudinal_figure(frame, ["CD4 PD1+"]), "pdf")
    assert png.startswith(b"\x89PNG") and b"Software" not in png and b"matplotlib" not in png.lower()
    assert svg.lstrip().startswith(b"<?xml") and b"<dc:date>" not in svg
    assert pdf.startswith(b"%PDF") and b"/CreationDate" not in pdf
    assert svg.count(b'id="patient:') == 4
    with pytest.raises(UsageError, match=r"\.png, \.svg or \.pdf"):
        plots.figure_bytes(plots.longitudinal_figure(frame, ["CD4 PD1+"]), "jpg")


def test_gate_figures_are_reproducible_and_leave_global_style_alone(results):
    before = dict(matplotlib.rcParams)
    records = plots.GatingRecords(results)
    a = plots.figure_bytes(plots.gates_figure(records.sample("P03_pre_t_cell")), "png")
    b = plots.figure_bytes(plots.gates_figure(plots.GatingRecords(results).sample("P03_pre_t_cell")), "png")
    assert a == b
    assert dict(matplotlib.rcParams) == before


def test_group_palette_is_okabe_ito_with_distinct_markers():
    styles = plots.group_style(["progressive", "responder", "stable", "partial", ""])
    assert list(styles) == ["responder", "stable", "progressive", "partial", ""]
    colours = [c for c, _ in styles.values()]
    assert len(set(colours)) == 5
    assert all(c in plots.OKABE_ITO for c in colours[:4])
    assert len({m for _, m in styles.values()}) >= 4


# --------------------------------------------------------------------------- CLI
def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from immunoprofile.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    return int(e.value.code or 0), out, err


def test_cli_longitudinal_writes_each_format(results, tmp_path, capsys):
    for suffix, magic in ((".png", b"\x89PNG"), (".svg", b"<?xml"), (".pdf", b"%PDF")):
        out = tmp_path / f"long{suffix}"
        code, _, err = run_cli(["plot", "longitudinal", str(results), "--population", "CD4 PD1+", "--population",
                                "CD8 PD1+", "--out", str(out)], capsys)
        assert code == 0, err
        assert out.read_bytes().startswith(magic)
    assert out.with_suffix(".svg").read_bytes().count(b'id="patient:') == 8   # 4 patients x 2 panels


@pytest.mark.parametrize("args, message", [
    (["--population", "CD4 PD1+", "--out", "x.jpg"], "must end in .png, .svg or .pdf"),
    (["--population", "CD4 TIGIT+", "--out", "x.png"], "unknown population 'CD4 TIGIT+'"),
    (["--population", "CD4 PD1+", "--patient", "P01,P77", "--out", "x.png"], "unknown patient(s) P77"),
])
def test_cli_longitudinal_usage_errors_exit_2(results, tmp_path, capsys, args, message):
    args = [a if a not in ("x.png", "x.jpg") else str(tmp_path / a) for a in args]
    code, _, err = run_cli(["plot", "longitudinal", str(results), *args], capsys)
    assert code == 2
    assert message in err
    assert not list(tmp_path.iterdir())


def test_cli_paired_uses_compare_output(results, tmp_path, capsys):
    stats_dir = tmp_path / "stats"
    code, _, err = run_cli(["compare", str(results), "--pre", "pre", "--post", "post_clofarabine", "--out",
                            str(stats_dir)], capsys)
    assert code == 0, err
    out = tmp_path / "paired.svg"
    code, _, err = run_cli(["plot", "paired", str(results), "--pre", "pre", "--post", "post_clofarabine",
                            "--stats", str(stats_dir), "-p", "CD4 PD1+", "--out", str(out)], capsys)
    assert code == 0, err
    table = pd.read_csv(stats_dir / "paired_stats.csv")
    row = table[(table["population"] == "CD4 PD1+") & (table["measure"] == "pct_parent")].iloc[0]
    # the annotation is drawn as text paths in the SVG: check it through the figure instead
    fig = plots.paired_figure(load_populations(results), "pre", "post_clofarabine",
                              plots.load_paired_stats(stats_dir), populations=["CD4 PD1+"])
    text = [t.get_text() for t in visible_axes(fig)[0].texts if t.get_gid() == "annotation"][0]
    assert f"median change = {row['median_difference']:+.3g}" in text
    assert out.read_bytes().count(b'id="patient:') == 4
    code, _, err = run_cli(["plot", "paired", str(results), "--pre", "pre", "--post", "post_lenalidomide",
                            "--stats", str(stats_dir), "--out", str(tmp_path / "x.png")], capsys)
    assert code == 2 and "the statistics have no pct_parent comparison of pre -> post_lenalidomide" in err


def test_cli_heatmap_defaults_to_the_first_two_timepoints(results, tmp_path, capsys):
    out = tmp_path / "heat.png"
    code, _, err = run_cli(["plot", "heatmap", str(results), "--out", str(out)], capsys)
    assert code == 0, err
    assert out.read_bytes().startswith(b"\x89PNG")
    a = out.read_bytes()
    code, _, _ = run_cli(["plot", "heatmap", str(results), "--pre", "pre", "--post", "post_clofarabine", "--out",
                          str(out)], capsys)
    assert code == 0 and out.read_bytes() == a


def test_cli_gates_one_file_or_a_folder(results, cohort, tmp_path, capsys):
    out = tmp_path / "one.png"
    code, _, err = run_cli(["plot", "gates", str(results), "--sample", "P01_pre_t_cell", "--out", str(out)], capsys)
    assert code == 0, err
    assert out.read_bytes().startswith(b"\x89PNG")
    qc = tmp_path / "qc"
    code, _, err = run_cli(["plot", "gates", str(results), "-s", "P01_pre_t_cell", "-s", "B1_t_cell_FMO_PD1",
                            "--format", "svg", "--out", str(qc)], capsys)
    assert code == 0, err
    assert sorted(p.name for p in qc.iterdir()) == ["B1_t_cell_FMO_PD1.svg", "P01_pre_t_cell.svg"]
    code, _, err = run_cli(["plot", "gates", str(results), "--out", str(tmp_path / "x.png")], capsys)
    assert code == 2 and "give one --sample, or a folder" in err
    # files moved: exit 2 naming --fcs-dir; with it, the plot is drawn
    moved = tmp_path / "moved"
    shutil.copytree(results, moved)
    pretend_files_moved(moved, tmp_path / "elsewhere")
    code, _, err = run_cli(["plot", "gates", str(moved), "-s", "P01_pre_t_cell", "--out", str(out)], capsys)
    assert code == 2 and "--fcs-dir" in err
    code, _, err = run_cli(["plot", "gates", str(moved), "-s", "P01_pre_t_cell", "--fcs-dir", str(cohort / "cohort"),
                            "--out", str(out)], capsys)
    assert code == 0, err
    # in folder mode a missing file fails that sample only: exit 1
    code, _, err = run_cli(["plot", "gates", str(moved), "-s", "P01_pre_t_cell", "--out", str(tmp_path / "qc2")],
                           capsys)
    assert code == 1 and "1 sample(s) failed: P01_pre_t_cell" in err
