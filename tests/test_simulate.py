"""Tests of the cohort simulator (immunoprofile.simulate*, ``immunoprofile simulate``).

Truth comes from outside the code under test where it can: FlowKit and fcsparser
read the files, FlowKit compensates them, numpy recounts the labels, scipy-free
statistics over many seeds check the null, and the FMO oracle is plain numpy.
"""

from __future__ import annotations

import csv
import hashlib
import re
import shlex
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from immunoprofile.errors import MarkerError
from immunoprofile.fcs import read_fcs
from immunoprofile.panel import resolve_marker
from immunoprofile.simulate import (
    FMO_MARKERS, SHEET_COLUMNS, TRUTH_CSV_COLUMNS, cohort_truth, simulate_cohort, simulate_sample,
)
from immunoprofile.simulate_events import SPELLINGS
from immunoprofile.simulate_model import design_cohort, sample_frequencies

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO / "sample_data"

# The contract with the rest of the pipeline, written out independently of the module.
CONTRACT = {
    "t_cell": {"FITC-A": "CD3", "PerCP-Cy5.5-A": "CD8", "APC-H7-A": "CD4", "BV510-A": "Viability",
               "BV421-A": "PD1", "PE-A": "TIM3", "PE-Cy7-A": "LAG3", "APC-A": "CD45RA", "BV605-A": "CCR7"},
    "nk": {"FITC-A": "CD3", "BV510-A": "Viability", "PE-Cy7-A": "CD56", "APC-H7-A": "CD16", "PE-A": "LIR1",
           "BV421-A": "CD57", "APC-A": "NKG2A", "PerCP-Cy5.5-A": "CD19"},
}
CONTRACT_SPELLINGS = {
    "PD1": {"PD-1", "CD279", "PD1", "CD279 (PD-1)"}, "TIM3": {"TIM-3", "CD366", "TIM3"},
    "LAG3": {"LAG-3", "CD223", "LAG3"}, "LIR1": {"CD85j", "LIR-1", "ILT2"}, "NKG2A": {"NKG2A", "CD159a"},
    "CD57": {"CD57"}, "Viability": {"Live/Dead Aqua", "Viability", "Zombie Aqua"},
}
# dim marker -> (population, parent) pairs whose truth the FMO threshold should recover
DIM_POPULATIONS = {
    "t_cell": {"PD1": [("CD4 PD1+", "CD4 T"), ("CD8 PD1+", "CD8 T")],
               "LAG3": [("CD4 LAG3+", "CD4 T"), ("CD8 LAG3+", "CD8 T")],
               "TIM3": [("CD4 TIM3+", "CD4 T"), ("CD8 TIM3+", "CD8 T")]},
    "nk": {"CD57": [("NK CD57+", "NK cells")], "LIR1": [("NK LIR1+", "NK cells")],
           "NKG2A": [("NK NKG2A+", "NK cells")]},
}


def _files(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _compensate(events: np.ndarray, channels, spillover) -> np.ndarray:
    """Plain numpy compensation: detector values @ inverse(spillover)."""
    names, matrix = spillover
    idx = [list(channels).index(c) for c in names]
    out = events.astype(np.float64).copy()
    out[:, idx] = out[:, idx] @ np.linalg.inv(matrix)
    return out


def _logicle(x: np.ndarray) -> np.ndarray:
    from flowutils import transforms

    return transforms.logicle(np.asarray(x, dtype=np.float64), None, t=262144, m=4.5, w=0.5, a=0)


def _run_cli(args: list[str], capsys) -> tuple[int, str]:
    from immunoprofile.cli import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    return int(exc.value.code or 0), capsys.readouterr().err


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cohort") / "c"
    simulate_cohort(out, patients=3, events=1500, seed=7)
    return out


# --------------------------------------------------------------------------- determinism
def test_same_seed_same_bytes_different_seed_differs(tmp_path, small_cohort):
    again = tmp_path / "again"
    simulate_cohort(again, patients=3, events=1500, seed=7)
    assert _files(again) == _files(small_cohort)

    other = tmp_path / "other"
    simulate_cohort(other, patients=3, events=1500, seed=8)
    a, b = _files(small_cohort), _files(other)
    assert a.keys() == b.keys()
    fcs = [n for n in a if n.endswith(".fcs")]
    assert all(a[n] != b[n] for n in fcs)
    assert a["truth.csv"] != b["truth.csv"]


def _makefile_args() -> list[str]:
    text = (REPO / "Makefile").read_text()
    m = re.search(r"^sample-data:.*\n\t(.+)$", text, flags=re.M)
    assert m, "Makefile has no sample-data recipe"
    argv = shlex.split(m.group(1))
    assert argv[0].endswith("immunoprofile") and argv[1] == "simulate"
    return argv[1:]


def test_sample_data_is_regenerated_byte_for_byte(tmp_path, capsys):
    if not (SAMPLE_DATA / "samplesheet.csv").exists():
        pytest.skip("sample_data/ has not been generated")
    args = _makefile_args()
    i = args.index("--out")
    args[i + 1] = str(tmp_path / "sample_data")
    code, err = _run_cli(args, capsys)
    assert code == 0, err
    assert _files(tmp_path / "sample_data") == _files(SAMPLE_DATA)
    total = sum(p.stat().st_size for p in SAMPLE_DATA.iterdir())
    assert total <= 15_000_000


# --------------------------------------------------------------------------- reading
def test_every_sample_data_file_reads_with_flowkit_and_fcsparser():
    flowkit = pytest.importorskip("flowkit")
    fcsparser = pytest.importorskip("fcsparser")
    if not (SAMPLE_DATA / "samplesheet.csv").exists():
        pytest.skip("sample_data/ has not been generated")
    sheet = pd.read_csv(SAMPLE_DATA / "samplesheet.csv", dtype=str, keep_default_na=False)
    fcs_on_disk = sorted(p.name for p in SAMPLE_DATA.glob("*.fcs"))
    assert sorted(sheet["file"]) == fcs_on_disk
    for name in fcs_on_disk:
        path = SAMPLE_DATA / name
        sample = flowkit.Sample(str(path))
        meta = fcsparser.parse(str(path), meta_data_only=True, reformat_meta=True)
        ours = read_fcs(path)
        assert int(meta["$TOT"]) == sample.event_count == ours.n_events
        assert tuple(meta["_channel_names_"]) == tuple(sample.pnn_labels) == ours.channels
        assert meta["$FIL"] == name
        raw = sample.get_events(source="raw")
        keep = [j for j, c in enumerate(ours.channels) if c != "Time"]
        np.testing.assert_array_equal(raw[:, keep], ours.events[:, keep])
        assert ours.spillover is not None and ours.findings == ()


def test_sheet_layout(small_cohort):
    with open(small_cohort / "samplesheet.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0].keys()) == SHEET_COLUMNS
    stained = [r for r in rows if not r["control"]]
    fmo = [r for r in rows if r["control"]]
    assert len(stained) == 3 * 3 * 2 and len(fmo) == 3 * 6
    assert {r["patient_id"]: r["group"] for r in stained} == {"P01": "responder", "P02": "stable",
                                                              "P03": "progressive"}
    days = {r["timepoint"]: (r["day"], r["batch"]) for r in rows}
    assert days == {"pre": ("0", "B1"), "post_clofarabine": ("10", "B2"), "post_lenalidomide": ("56", "B3")}
    assert all(r["sample_id"] == f"{r['patient_id']}_{r['timepoint']}_{r['panel']}" for r in stained)
    assert all(r["file"] == r["sample_id"] + ".fcs" and (small_cohort / r["file"]).is_file() for r in rows)
    assert all(int(r["lymphocytes_per_ul"]) > 0 for r in stained)
    assert all(r["patient_id"] == r["group"] == r["lymphocytes_per_ul"] == "" for r in fmo)
    assert sorted(r["control"] for r in fmo if r["batch"] == "B2") == sorted(
        f"FMO:{m}" for m in ("PD1", "LAG3", "TIM3", "LIR1", "CD57", "NKG2A"))


# --------------------------------------------------------------------------- truth
def test_truth_csv_equals_membership_counts_and_file_events(small_cohort):
    truth = pd.read_csv(small_cohort / "truth.csv", dtype={"sample_id": str, "population": str, "parent": str})
    assert tuple(truth.columns) == TRUTH_CSV_COLUMNS
    assert truth[["sample_id", "population"]].apply(tuple, axis=1).is_monotonic_increasing
    sheet = pd.read_csv(small_cohort / "samplesheet.csv", dtype=str, keep_default_na=False)
    for row in sheet.itertuples():
        control = row.control.removeprefix("FMO:") or None
        patient = 0 if control else int(row.patient_id[1:]) - 1
        s = simulate_sample(row.panel, 1500, patient=patient, timepoint=row.timepoint, seed=7, control=control,
                            n_patients=3)
        assert s.sample_id == row.sample_id
        # the file holds exactly these events, in this order
        f = read_fcs(small_cohort / row.file)
        keep = [j for j, c in enumerate(f.channels) if c != "Time"]
        np.testing.assert_array_equal(f.events[:, keep], s.events[:, keep])
        assert f.markers == s.markers
        np.testing.assert_array_equal(f.spillover[1], s.spillover[1])
        # truth.csv == counts of the per-event membership arrays
        mine = truth[truth.sample_id == row.sample_id]
        n = s.events.shape[0]
        for t in mine.itertuples():
            count = int(s.membership[t.population].sum())
            parent = n if t.parent == "root" else int(s.membership[t.parent].sum())
            assert (t.count, t.parent_count) == (count, parent), (row.sample_id, t.population)
            assert t.fraction == pytest.approx(count / parent) if parent else np.isnan(t.fraction)


def test_membership_follows_the_label_definitions():
    s = simulate_sample("t_cell", 20_000, seed=3, patient=1, timepoint="post_clofarabine")
    L = s.labels
    lymph = np.isin(L["cell_type"], (2, 3, 4))   # T, B, NK
    live_single = lymph & ~L["doublet"] & ~L["dead"]
    np.testing.assert_array_equal(s.membership["lymphocytes"], lymph)
    np.testing.assert_array_equal(s.membership["live"], live_single)
    cd4 = live_single & (L["cell_type"] == 2) & (L["t_subset"] == 0)
    np.testing.assert_array_equal(s.membership["CD4 T"], cd4)
    np.testing.assert_array_equal(s.membership["CD4 PD1+LAG3+"], cd4 & (L["t_pattern"] & 3 == 3))
    for name, parent in (("CD4 PD1+TIM3+", "CD4 PD1+"), ("CD8 PD1+LAG3+TIM3+", "CD8 PD1+LAG3+"),
                         ("CD8 PD1+", "CD8 T"), ("T cells", "live"), ("live", "singlets")):
        assert not np.any(s.membership[name] & ~s.membership[parent])
    # realistic proportions: debris, doublets and dead cells are all there
    assert 0.02 < np.mean(L["cell_type"] == 0) < 0.4
    assert np.any(L["doublet"] & lymph) and np.any(L["dead"] & lymph)

    nk = simulate_sample("nk", 20_000, seed=3, patient=1, timepoint="post_clofarabine")
    m = nk.membership
    assert m["CD56bright NK"].sum() + m["CD56dim NK"].sum() == m["NK cells"].sum()
    assert not np.any(m["CD56bright NK"] & m["CD56dim NK"])

    fmo = simulate_sample("nk", 5000, seed=3, timepoint="pre", control="CD57")
    assert fmo.membership["NK CD57+"].sum() == fmo.membership["NK CD57+LIR1+"].sum() == 0
    assert fmo.membership["NK LIR1+"].sum() > 0


def test_cohort_truth_reproduces_truth_csv(small_cohort):
    fast = cohort_truth(n_patients=3, seed=7, events=1500)
    truth = pd.read_csv(small_cohort / "truth.csv")
    stained = truth[~truth.sample_id.str.contains("_FMO_")].reset_index(drop=True)
    assert list(fast.columns) == ["sample_id", "patient_id", "timepoint", "day", "group", "panel", "batch",
                                  "population", "parent", "count", "parent_count", "pct_parent"]
    assert fast[["sample_id", "population", "parent"]].values.tolist() == \
        stained[["sample_id", "population", "parent"]].values.tolist()
    np.testing.assert_array_equal(fast["count"].to_numpy(), stained["count"].to_numpy())
    np.testing.assert_array_equal(fast["parent_count"].to_numpy(), stained["parent_count"].to_numpy())
    np.testing.assert_allclose(fast["pct_parent"].to_numpy(), 100 * stained["fraction"].to_numpy())


# --------------------------------------------------------------------------- biology
def _paired_differences(effect: float, seeds: range, patients: int = 12) -> pd.DataFrame:
    frames = []
    for seed in seeds:
        t = cohort_truth(n_patients=patients, effect_size=effect, seed=seed, events=20_000)
        wide = t.pivot_table(index=["patient_id", "group", "panel", "population"], columns="timepoint",
                             values="pct_parent")
        wide = wide.assign(d_clo=wide["post_clofarabine"] - wide["pre"],
                           d_len=wide["post_lenalidomide"] - wide["pre"], seed=seed)
        frames.append(wide.reset_index())
    return pd.concat(frames, ignore_index=True)


def test_null_cohort_has_no_systematic_pre_post_difference():
    d = _paired_differences(0.0, range(150))
    per_seed = d.groupby(["population", "seed"])[["d_clo", "d_len"]].mean()
    stats = per_seed.groupby("population").agg(["mean", "std", "count"])
    for col in ("d_clo", "d_len"):
        z = stats[(col, "mean")] / (stats[(col, "std")] / np.sqrt(stats[(col, "count")]))
        assert np.all(np.abs(z) < 4.0), z[np.abs(z) >= 4.0]
        # and the null is tight: no population moves by more than 0.5 percentage points on average
        assert np.all(np.abs(stats[(col, "mean")]) < 0.5)


def test_planted_effect_has_the_documented_direction():
    d = _paired_differences(1.0, range(40))
    mean = d.groupby(["group", "population"])["d_clo"].mean()
    for pop in ("CD4 PD1+", "CD8 PD1+", "NK CD57+", "NK CD57+LIR1+", "CD4 PD1+TIM3+"):
        assert mean["responder", pop] < mean["stable", pop] < 0
        assert abs(mean["progressive", pop]) < abs(mean["responder", pop]) / 4
    assert mean["responder", "CD4 PD1+"] < -8        # about -14 points for a median responder
    # lenalidomide: exhaustion moves variably (spread across patients larger than in progressors)
    spread = d[d.population == "CD4 PD1+"].groupby("group")["d_len"].std()
    assert spread["responder"] > spread["progressive"]
    # clofarabine depletes lymphocytes (blood count) at effect 1, not at effect 0
    for effect, low, high in ((1.0, 0.0, 0.45), (0.0, 0.85, 1.2)):
        design = design_cohort(30, effect_size=effect, seed=1)
        pre, post = design.timepoints[0], design.timepoints[1]
        ratios = [sample_frequencies(design, i, post).lymphocytes_per_ul
                  / sample_frequencies(design, i, pre).lymphocytes_per_ul for i in range(30)]
        assert low < np.median(ratios) < high


def test_patients_vary_a_lot_and_timepoints_correlate_within_patient():
    t = cohort_truth(n_patients=90, effect_size=0.0, seed=11, events=50_000, panels=("t_cell",))
    wide = t[t.population == "CD4 PD1+"].pivot(index="patient_id", columns="timepoint", values="pct_parent")
    assert wide["pre"].std() > 5.0
    assert np.corrcoef(wide["pre"], wide["post_clofarabine"])[0, 1] > 0.6


# --------------------------------------------------------------------------- what the data look like
def test_spillover_makes_uncompensated_data_wrong():
    flowkit = pytest.importorskip("flowkit")
    s = simulate_sample("nk", 20_000, seed=5, patient=0)
    sample = flowkit.Sample(s.events, sample_id="x", channel_labels=list(s.channels))
    matrix = flowkit.Matrix(s.spillover[1], list(s.spillover[0]), list(s.spillover[0]))
    sample.apply_compensation(matrix)
    raw = sample.get_events(source="raw")
    comp = sample.get_events(source="comp")
    np.testing.assert_allclose(comp, _compensate(s.events, s.channels, s.spillover), rtol=1e-4, atol=0.05)
    cd16 = list(s.channels).index("APC-H7-A")
    bright = s.membership["CD56bright NK"]        # CD3- and truly CD16-
    assert np.mean(raw[bright, cd16] > 1000) > 0.5   # look CD16+ before compensation
    assert np.mean(comp[bright, cd16] > 1000) < 0.02
    assert np.mean(comp[s.membership["CD56dim NK"], cd16] > 1000) > 0.95

    t = simulate_sample("t_cell", 20_000, seed=5, patient=0)
    tim3 = list(t.channels).index("PE-A")
    tneg = t.membership["T cells"] & ~t.membership["CD4 TIM3+"] & ~t.membership["CD8 TIM3+"] & \
        ((t.labels["t_pattern"] & 4) == 0)
    tc = _compensate(t.events, t.channels, t.spillover)
    assert np.median(t.events[tneg, tim3]) > 1000    # FITC (CD3) spills into PE: T cells look TIM3+
    assert np.median(tc[tneg, tim3]) < 300


def test_scales_populations_separate():
    from sklearn.mixture import GaussianMixture

    s = simulate_sample("t_cell", 30_000, seed=2, patient=0)
    x = _compensate(s.events, s.channels, s.spillover)
    ch = {c: i for i, c in enumerate(s.channels)}
    m, L = s.membership, s.labels
    # logicle: negatives near 0 with spread (some negative values), positives 1-3 decades up
    cd3 = x[:, ch["FITC-A"]]
    t_cells, non_t = m["T cells"], m["live"] & ~m["T cells"]
    assert 0.0 < np.mean(x[non_t, ch["APC-H7-A"]] < 0) < 0.5
    assert -100 < np.median(cd3[non_t]) < 400
    assert 1e3 < np.median(cd3[t_cells]) < 1e5
    assert np.mean(cd3[t_cells] > 1000) > 0.99 and np.mean(cd3[non_t] < 1000) > 0.99
    lg = _logicle(cd3)
    assert np.median(lg[non_t]) < 0.3 < 0.5 < np.median(lg[t_cells])
    # doublets off the FSC-A/FSC-H diagonal
    ratio = s.events[:, ch["FSC-H"]] / np.maximum(s.events[:, ch["FSC-A"]], 1)
    lymph = m["lymphocytes"]
    assert np.mean(ratio[m["singlets"]] > 0.7) > 0.99 and np.mean(ratio[lymph & L["doublet"]] < 0.7) > 0.99
    # dead cells clearly viability-dye bright
    via = x[:, ch["BV510-A"]]
    dead = m["singlets"] & L["dead"]
    assert np.mean(via[dead] > 2000) > 0.99 and np.mean(via[m["live"]] < 2000) > 0.99
    # CD4 vs CD8 well separated within T cells
    cd4, cd8 = x[:, ch["APC-H7-A"]], x[:, ch["PerCP-Cy5.5-A"]]
    assert np.mean((cd4[m["CD4 T"]] > 1500) & (cd8[m["CD4 T"]] < 1500)) > 0.99
    assert np.mean((cd8[m["CD8 T"]] > 1500) & (cd4[m["CD8 T"]] < 1500)) > 0.99
    # scatter: a Gaussian mixture on log FSC-A/SSC-A finds the singlet lymphocytes
    feats = np.log10(np.clip(s.events[:, [ch["FSC-A"], ch["SSC-A"]]], 100, None))
    gm = GaussianMixture(4, random_state=0).fit(feats)
    comp = gm.predict(feats)
    target = lymph & ~L["doublet"] & ~L["dead"]
    best = np.bincount(comp[target], minlength=4).argmax()
    assert np.mean(comp[target] == best) > 0.95
    assert np.mean(target[comp == best] | (lymph[comp == best])) > 0.95


def test_fmo_threshold_recovers_true_positive_fraction():
    """Numpy oracle: threshold = 99.5th percentile of the FMO's true parent (compensated,
    logicle); the stained sample's fraction above it is within ~1.5 points of the truth."""
    errors: dict[str, list[float]] = {}
    for seed in (0, 1, 2):
        for panel in ("t_cell", "nk"):
            for tp in ("pre", "post_clofarabine"):
                fmos = {mk: simulate_sample(panel, 20_000, seed=seed, timepoint=tp, control=mk)
                        for mk in FMO_MARKERS[panel]}
                for patient in range(3):
                    s = simulate_sample(panel, 20_000, seed=seed, timepoint=tp, patient=patient)
                    xs = _compensate(s.events, s.channels, s.spillover)
                    for marker, pops in DIM_POPULATIONS[panel].items():
                        f = fmos[marker]
                        channel = next(c for c, mk in CONTRACT[panel].items() if mk == marker)
                        j = list(s.channels).index(channel)
                        assert f.markers[j] == ""          # FMO: $PnS left empty
                        xf = _compensate(f.events, f.channels, f.spillover)
                        for pop, parent in pops:
                            threshold = np.percentile(_logicle(xf[f.membership[parent], j]), 99.5)
                            inside = s.membership[parent]
                            estimate = np.mean(_logicle(xs[inside, j]) > threshold)
                            true = s.membership[pop].sum() / inside.sum()
                            errors.setdefault(pop, []).append(100 * (estimate - true))
    for pop, e in errors.items():
        e = np.asarray(e)
        assert np.mean(np.abs(e)) < 1.5, (pop, e)
        assert np.max(np.abs(e)) < 4.0, (pop, e)


def test_markers_resolve_in_every_batch():
    timepoints = ("pre", "post_clofarabine", "post_lenalidomide", "follow_up")
    seen: dict[str, set[str]] = {}
    for panel, channels in CONTRACT.items():
        for tp in timepoints:
            s = simulate_sample(panel, 200, timepoint=tp, timepoints=timepoints)
            assert s.channels[:3] == ("FSC-A", "FSC-H", "SSC-A") and s.channels[-1] == "Time"
            assert set(s.channels[3:-1]) == set(channels)
            for channel, marker in channels.items():
                assert s.channels[resolve_marker(marker, s.channels, s.markers)] == channel
                seen.setdefault(marker, set()).add(s.markers[s.channels.index(channel)])
            for marker in FMO_MARKERS[panel]:
                f = simulate_sample(panel, 200, timepoint=tp, timepoints=timepoints, control=marker)
                with pytest.raises(MarkerError):
                    resolve_marker(marker, f.channels, f.markers)
                for channel, other in channels.items():
                    if other != marker:
                        assert f.channels[resolve_marker(other, f.channels, f.markers)] == channel
    for marker, spellings in CONTRACT_SPELLINGS.items():
        assert seen[marker] == spellings == set(SPELLINGS[marker])


def test_extra_channels_and_batch_days(tmp_path):
    s = simulate_sample("t_cell", 500, extra_channels=5)
    assert len(s.channels) == 18
    for c, mk in zip(s.channels[12:17], s.markers[12:17]):
        assert s.channels[resolve_marker(mk, s.channels, s.markers)] == c
    assert s.spillover[0] == s.channels[3:17]
    design = design_cohort(2, ("pre", "post_clofarabine", "c3", "c4"))
    assert [(t.day, t.batch) for t in design.timepoints] == [(0, "B1"), (10, "B2"), (38, "B3"), (66, "B4")]


# --------------------------------------------------------------------------- command line
@pytest.mark.parametrize("args, message", [
    (["--patients", "0"], "--patients"),
    (["--panels", "t_cell,bcell"], "unknown panel"),
    (["--events", "10"], "--events"),
    (["--timepoints", "pre,pre"], "more than once"),
    (["--timepoints", "post_lenalidomide,pre"], "order"),
    (["--extra-channels", "11"], "--extra-channels"),
    (["--effect-size", "nan"], "--effect-size"),
])
def test_cli_rejects_bad_options(tmp_path, capsys, args, message):
    code, err = _run_cli(["simulate", "--out", str(tmp_path / "x"), *args], capsys)
    assert code == 2
    assert message in err
    assert not (tmp_path / "x").exists()


def test_cli_refuses_non_empty_folder_unless_forced(tmp_path, capsys):
    out = tmp_path / "c"
    code, err = _run_cli(["simulate", "--out", str(out), "--patients", "2", "--events", "300",
                          "--timepoints", "pre,post_clofarabine"], capsys)
    assert code == 0 and "simulated 8 samples and 12 FMO controls" in err
    before = _files(out)
    (out / "notes.txt").write_text("keep me")
    code, err = _run_cli(["simulate", "--out", str(out), "--patients", "1", "--events", "300"], capsys)
    assert code == 2 and "--force" in err
    assert {k: v for k, v in _files(out).items() if k != "notes.txt"} == before
    code, err = _run_cli(["simulate", "--out", str(out), "--patients", "1", "--events", "300",
                          "--panels", "nk", "--force"], capsys)
    assert code == 0, err
    names = set(_files(out))
    sheet = pd.read_csv(out / "samplesheet.csv")
    assert names == set(sheet["file"]) | {"samplesheet.csv", "truth.csv", "simulation.json", "notes.txt"}
    assert "P02_pre_t_cell.fcs" not in names      # the previous cohort's files are gone


def test_interrupted_run_leaves_no_partial_output(tmp_path, monkeypatch):
    import immunoprofile.simulate as sim

    calls = {"n": 0}
    real = sim.write_fcs

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sim, "write_fcs", flaky)
    with pytest.raises(KeyboardInterrupt):
        simulate_cohort(tmp_path / "new", patients=2, events=300)
    assert sorted(p.name for p in tmp_path.iterdir()) == []

    existing = tmp_path / "old"
    monkeypatch.setattr(sim, "write_fcs", real)
    simulate_cohort(existing, patients=1, events=300, panels=("nk",))
    before = _files(existing)
    calls["n"] = 0
    monkeypatch.setattr(sim, "write_fcs", flaky)
    with pytest.raises(KeyboardInterrupt):
        simulate_cohort(existing, patients=2, events=300, seed=1, force=True)
    assert _files(existing) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
