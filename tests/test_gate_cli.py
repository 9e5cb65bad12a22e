"""`immunoprofile gate` from the command line: outputs, bad input, exit codes, start-up cost."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from immunoprofile.cli import main
from immunoprofile.simulate import simulate_cohort
from immunoprofile.stats import GATE_COLUMNS, INTENSITY_COLUMNS, POPULATION_COLUMNS

T_POPS = ["lymphocytes", "singlets", "live", "T cells", "CD4 T", "CD8 T"] + [
    f"{x} {m}" for x in ("CD4", "CD8") for m in ("PD1+", "LAG3+", "TIM3+", "PD1+LAG3+", "PD1+TIM3+", "PD1+LAG3+TIM3+")]
NK_POPS = ["lymphocytes", "singlets", "live", "NK cells", "CD56bright NK", "CD56dim NK", "NK CD57+", "NK LIR1+",
           "NK CD57+LIR1+", "NK NKG2A+"]


def run(args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cli") / "cohort"
    simulate_cohort(d, patients=2, timepoints=("pre", "post_clofarabine"), events=3000, seed=4)
    return d


@pytest.fixture(scope="module")
def gated(cohort, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli_out") / "res"
    code = run(["gate", "-t", "t_cell_exhaustion", "-t", "nk_inhibitory", "--samples", str(cohort / "samplesheet.csv"),
                "--out", str(out)])
    assert code == 0
    return out


def test_outputs_have_documented_columns_and_population_names(gated, cohort):
    pops = pd.read_csv(gated / "populations.csv", keep_default_na=False)
    sheet = pd.read_csv(cohort / "samplesheet.csv", keep_default_na=False)
    assert list(pops.columns[:len(POPULATION_COLUMNS)]) == POPULATION_COLUMNS
    assert "lymphocytes_per_ul" in pops.columns  # extra sheet column carried through
    stained = sheet[sheet.control == ""]
    assert sorted(pops.sample_id.unique()) == sorted(stained.sample_id)
    for sid, grp in pops.groupby("sample_id"):
        panel = grp.panel.iloc[0]
        assert grp.population.tolist() == (T_POPS if panel == "t_cell" else NK_POPS)
    assert set(pops.template) == {"t_cell_exhaustion", "nk_inhibitory"}
    assert pops.template_sha256.str.len().eq(64).all() and pops.file_sha256.str.len().eq(64).all()
    # pct_parent and pct_of are consistent with the counts
    p = pd.read_csv(gated / "populations.csv")
    assert np.allclose(p.pct_parent, 100 * p["count"] / p.parent_count)
    parquet = pd.read_parquet(gated / "populations.parquet")
    assert parquet["count"].tolist() == p["count"].tolist()
    assert list(pd.read_csv(gated / "intensities.csv").columns) == INTENSITY_COLUMNS
    gates = pd.read_csv(gated / "gates.csv", keep_default_na=False)
    assert list(gates.columns) == GATE_COLUMNS
    # every FMO-derived threshold names the FMO control it came from, of the same batch
    fmo_rows = gates[gates.method == "fmo"]
    assert len(fmo_rows) > 0
    batch_of = dict(zip(sheet.sample_id, sheet.batch))
    assert all(batch_of[r.sample_id] == batch_of[r.fmo_sample_id] for r in fmo_rows.itertuples())
    man = json.loads((gated / "manifest.json").read_text())
    assert {i["sample_id"] for i in man["inputs"]} == set(sheet.sample_id)
    assert {t["name"] for t in man["templates"]} == {"t_cell_exhaustion", "nk_inhibitory"}


def test_fmo_threshold_is_the_percentile_of_the_fmo_in_the_parent(gated, cohort):
    """The threshold recorded for a stained sample equals a hand computation on its FMO control."""
    from immunoprofile.fcs import read_fcs
    from immunoprofile.gating import gate_events, prepare
    from immunoprofile.templates import load_template

    gates = pd.read_csv(gated / "gates.csv", keep_default_na=False)
    row = gates[(gates.population == "CD4 PD1+") & (gates.method == "fmo")].iloc[0]
    fmo_id = row.fmo_sample_id
    tpl = load_template("t_cell_exhaustion")
    stained = read_fcs(cohort / f"{row.sample_id}.fcs")
    fmo = read_fcs(cohort / f"{fmo_id}.fcs")
    pd1_channel = stained.channels[prepare(stained, tpl).channel_of["PD1"]]
    data = prepare(fmo, tpl, channel_hints={"PD1": pd1_channel})
    masks = gate_events(data, only={"CD4 T"}).masks
    expected = np.percentile(data.values("PD1")[masks["CD4 T"]], 99.5)
    assert json.loads(row.coordinates)["PD1"][0] == pytest.approx(expected, abs=1e-12)


def test_files_and_name_pattern_without_sheet(cohort, tmp_path):
    out = tmp_path / "r"
    code = run(["gate", "-t", "t_cell_exhaustion", str(cohort / "P0*_t_cell.fcs"), "--out", str(out),
                "--name-pattern", r"(?P<patient_id>P\d+)_(?P<timepoint>pre|post_clofarabine)_"])
    assert code == 0
    pops = pd.read_csv(out / "populations.csv", keep_default_na=False)
    assert set(pops.patient_id) == {"P01", "P02"}
    assert set(pops.timepoint) == {"pre", "post_clofarabine"}
    findings = pd.read_csv(out / "findings.csv")
    assert "FMO_NOT_GIVEN" in set(findings.code)  # no sheet, no FMO: density fallback, said so


def test_one_bad_file_never_sinks_the_batch(cohort, tmp_path, capsys):
    work = tmp_path / "c"
    shutil.copytree(cohort, work)
    victim = work / "P01_pre_t_cell.fcs"
    victim.write_bytes(victim.read_bytes()[:5000])  # truncated
    (work / "P02_pre_nk.fcs").unlink()  # missing
    sheet = pd.read_csv(work / "samplesheet.csv", keep_default_na=False)
    sheet.loc[sheet.sample_id == "P02_post_clofarabine_nk", "panel"] = "b_cell"  # wrong panel
    sheet.to_csv(work / "samplesheet.csv", index=False)
    out = tmp_path / "r"
    code = run(["gate", "-t", "t_cell_exhaustion", "-t", "nk_inhibitory", "--samples", str(work / "samplesheet.csv"),
                "--out", str(out)])
    assert code == 1
    fails = pd.read_csv(out / "failures.csv").set_index("sample_id")
    assert set(fails.index) == {"P01_pre_t_cell", "P02_pre_nk", "P02_post_clofarabine_nk"}
    assert fails.loc["P01_pre_t_cell", "code"] == "FCS_TOT_MISMATCH" or fails.loc["P01_pre_t_cell", "code"].startswith("FCS_")
    assert fails.loc["P02_pre_nk", "code"] == "FILE_MISSING"
    assert fails.loc["P02_post_clofarabine_nk", "code"] == "PANEL_UNKNOWN"
    assert "P01_pre_t_cell.fcs" in fails.loc["P01_pre_t_cell", "message"]
    pops = pd.read_csv(out / "populations.csv")
    n_stained = (sheet.control.fillna("") == "").sum()
    assert pops.sample_id.nunique() == n_stained - 3
    err = capsys.readouterr().err
    assert "3 sample(s) failed" in err and "Traceback" not in err


@pytest.mark.parametrize("args,expect", [
    (["-t", "no_such_template", "--samples", "SHEET"], "unknown template 'no_such_template'"),
    (["-t", "t_cell_exhaustion", "--samples", "/nonexistent/sheet.csv"], "sample sheet not found"),
    (["-t", "t_cell_exhaustion"], "no input"),
])
def test_usage_errors_exit_2_with_clear_message(args, expect, tmp_path, capsys, cohort):
    args = [str(cohort / "samplesheet.csv") if a == "SHEET" else a for a in args]
    code = run(["gate", *args, "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert expect in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # nothing written


def test_malformed_template_names_file_line_field(tmp_path, capsys, cohort):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nversion: 1.0.0\npopulations:\n  - name: a\n    gate: {type: threshold, marker: CD3, side: up}\n")
    code = run(["gate", "-t", str(bad), "--samples", str(cohort / "samplesheet.csv"), "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{bad}: line 5 (populations[0].gate.side): expected one of 'above', 'below', got 'up'" in err


def test_require_fmo_fails_samples_of_a_batch_without_fmo(cohort, tmp_path):
    work = tmp_path / "c"
    shutil.copytree(cohort, work)
    sheet = pd.read_csv(work / "samplesheet.csv", keep_default_na=False)
    drop = (sheet.control == "FMO:PD1") & (sheet.batch == "B1") & (sheet.panel == "t_cell")
    assert drop.sum() == 1
    sheet[~drop].to_csv(work / "samplesheet.csv", index=False)
    out = tmp_path / "r"
    assert run(["gate", "-t", "t_cell_exhaustion", "-t", "nk_inhibitory", "--samples", str(work / "samplesheet.csv"),
                "--out", str(out)]) == 0
    f = pd.read_csv(out / "findings.csv")
    assert (f.code == "FMO_MISSING").any()
    out2 = tmp_path / "r2"
    assert run(["gate", "-t", "t_cell_exhaustion", "-t", "nk_inhibitory", "--samples", str(work / "samplesheet.csv"),
                "--out", str(out2), "--require-fmo"]) == 1
    fails = pd.read_csv(out2 / "failures.csv")
    b1_t = set(sheet[(sheet.batch == "B1") & (sheet.panel == "t_cell") & (sheet.control == "")].sample_id)
    assert set(fails.sample_id) == b1_t and set(fails.code) == {"FMO_MISSING"}


def test_cli_help_imports_nothing_heavy():
    code = ("import sys, immunoprofile.cli as c\n"
            "from click.testing import CliRunner\n"
            "r = CliRunner().invoke(c.cli, ['--help'])\n"
            "assert r.exit_code == 0, r.output\n"
            "heavy = [m for m in ('flowkit', 'pandas', 'numpy', 'scipy', 'sklearn', 'matplotlib') if m in sys.modules]\n"
            "print(','.join(heavy))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
