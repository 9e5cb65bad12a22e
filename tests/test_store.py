"""The SQLite results database (issue 4): same content as the CSV tables, upserts on rerun,
one database shared by several runs, failures and deferrals, history of runs.

Truth: the CSV tables written by the same run (read back with pandas), and sqlite3 queries.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pandas as pd
import pytest

from immunoprofile import store
from immunoprofile.batch import RunSettings, run_gate
from immunoprofile.errors import AbortedError, ResultsError
from immunoprofile.samplesheet import read_sheet
from immunoprofile.simulate import simulate_cohort
from immunoprofile.stats import GATE_COLUMNS, INTENSITY_COLUMNS, POPULATION_COLUMNS
from immunoprofile.templates import load_template

NUMERIC = {"count", "parent_count", "pct_parent", "pct_of", "cells_per_ul", "n_fit_events", "median_raw", "rcv_raw",
           "median_transformed", "rcv_transformed"}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("store") / "cohort"
    simulate_cohort(out, patients=2, timepoints=("pre", "post_clofarabine"), events=2000, panels=("t_cell",), seed=21)
    return out


@pytest.fixture(scope="module")
def tcell():
    return load_template("t_cell_exhaustion")


@pytest.fixture(scope="module")
def gated(cohort, tcell, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gated") / "out"
    run_gate(read_sheet(cohort / "samplesheet.csv"), [tcell], out)
    return out


def csv_as_store_types(path: Path) -> pd.DataFrame:
    """A table as written to CSV, with the types the store's readers give: text as str, numbers as float."""
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    for c in df.columns:
        if c in NUMERIC:
            df[c] = pd.to_numeric(df[c].replace("", None), errors="coerce").astype("float64")
    return df


@pytest.mark.parametrize("loader, name", [(store.load_populations, "populations.csv"),
                                          (store.load_intensities, "intensities.csv"),
                                          (store.load_gates, "gates.csv"),
                                          (store.load_findings, "findings.csv")])
def test_database_holds_exactly_the_csv_tables(gated, loader, name):
    got = loader(gated / "immunoprofile.sqlite")
    want = csv_as_store_types(gated / name)
    assert list(got.columns) == list(want.columns)
    pd.testing.assert_frame_equal(got.reset_index(drop=True), want, check_exact=False, rtol=1e-15)


def test_populations_layout_and_extra_columns(gated):
    pops = store.load_populations(gated / "immunoprofile.sqlite")
    assert list(pops.columns) == POPULATION_COLUMNS + ["lymphocytes_per_ul"]
    assert pops["count"].dtype == "float64" and pops["sample_id"].map(type).eq(str).all()
    assert set(store.load_gates(gated / "immunoprofile.sqlite").columns) == set(GATE_COLUMNS)
    assert set(store.load_intensities(gated / "immunoprofile.sqlite").columns) == set(INTENSITY_COLUMNS)


def test_hashes_tie_samples_to_files_templates_and_runs(gated, cohort, tcell):
    db = gated / "immunoprofile.sqlite"
    samples = store.load_samples(db)
    runs = store.load_runs(db)
    assert len(runs) == 1 and runs.status.iloc[0] == "ok" and runs.n_ok.iloc[0] == 10
    assert (samples.run_id == runs.run_id.iloc[0]).all()
    assert (samples.template_sha256 == tcell.sha256).all()
    import hashlib

    for _, s in samples.iterrows():
        assert s.file_sha256 == hashlib.sha256((cohort / s.file).read_bytes()).hexdigest()
    with sqlite3.connect(db) as con:
        n = con.execute("SELECT COUNT(*) FROM run_samples WHERE run_id = ?", (runs.run_id.iloc[0],)).fetchone()[0]
    assert n == 10


def test_reruns_upsert_instead_of_duplicating(cohort, tcell, tmp_path):
    out = tmp_path / "out"
    sheet = read_sheet(cohort / "samplesheet.csv")
    run_gate(sheet, [tcell], out)
    first = store.load_populations(out / "immunoprofile.sqlite")
    run_gate(sheet, [tcell], out)
    run_gate(sheet, [tcell], out, settings=RunSettings(force=True))
    db = out / "immunoprofile.sqlite"
    pd.testing.assert_frame_equal(store.load_populations(db), first)
    runs = store.load_runs(db)
    assert len(runs) == 3 and runs.n_skipped.tolist() == [0, 10, 0]
    assert (store.load_samples(db).run_id == runs.run_id.iloc[-1]).all()


def test_one_database_shared_by_runs_on_different_samples(cohort, tcell, tmp_path):
    db = tmp_path / "project.sqlite"
    sheet = read_sheet(cohort / "samplesheet.csv")
    pre = sheet[sheet.batch == "B1"].reset_index(drop=True)
    post = sheet[sheet.batch == "B2"].reset_index(drop=True)
    run_gate(pre, [tcell], tmp_path / "pre", settings=RunSettings(db=str(db)))
    run_gate(post, [tcell], tmp_path / "post", settings=RunSettings(db=str(db)))
    assert not (tmp_path / "pre" / "immunoprofile.sqlite").exists()
    pops = store.load_populations(db)
    both = pd.concat([pd.read_csv(tmp_path / d / "populations.csv") for d in ("pre", "post")])
    assert sorted(pops.sample_id.unique()) == sorted(both.sample_id.unique())
    assert len(pops) == len(both) == 4 * 18
    assert len(store.load_runs(db)) == 2


def test_a_fixed_file_replaces_its_failure_and_a_deferred_one_keeps_its_rows(cohort, tcell, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for p in cohort.iterdir():
        (data / p.name).write_bytes(p.read_bytes())
    good = (data / "P02_pre_t_cell.fcs").read_bytes()
    (data / "P02_pre_t_cell.fcs").write_bytes(b"broken")
    out = tmp_path / "out"
    sheet = read_sheet(data / "samplesheet.csv")
    run_gate(sheet, [tcell], out)
    db = out / "immunoprofile.sqlite"
    assert store.load_failures(db).sample_id.tolist() == ["P02_pre_t_cell"]
    assert "P02_pre_t_cell" not in set(store.load_populations(db).sample_id)
    (data / "P02_pre_t_cell.fcs").write_bytes(good)
    run_gate(sheet, [tcell], out)
    assert store.load_failures(db).empty
    kept = store.load_populations(db).query("sample_id == 'P02_pre_t_cell'")
    assert len(kept) == 18
    import os
    import time

    for p in data.glob("*.fcs"):
        os.utime(p, (time.time() - 7200,) * 2)
    os.utime(data / "P02_pre_t_cell.fcs")  # now "still being written"
    summary = run_gate(sheet, [tcell], out, settings=RunSettings(min_age=3600))
    assert [d["sample_id"] for d in summary.deferrals] == ["P02_pre_t_cell"]
    pd.testing.assert_frame_equal(store.load_populations(db).query("sample_id == 'P02_pre_t_cell'"), kept)
    with sqlite3.connect(db) as con:
        status = con.execute("SELECT status FROM run_samples WHERE sample_id = 'P02_pre_t_cell' "
                             "ORDER BY rowid DESC LIMIT 1").fetchone()[0]
    assert status == "deferred"


def test_an_aborted_run_is_recorded_in_a_shared_database(cohort, tcell, tmp_path):
    db = tmp_path / "project.sqlite"
    sheet = read_sheet(cohort / "samplesheet.csv")
    with pytest.raises(AbortedError):
        run_gate(sheet, [load_template("nk_inhibitory")], tmp_path / "out",
                 settings=RunSettings(db=str(db), fail_fast=True))
    runs = store.load_runs(db)
    assert runs.status.tolist() == ["aborted"] and runs.exit_code.tolist() == [3]
    assert "--fail-fast" in runs.message.iloc[0]
    assert store.load_populations(db).empty


def test_readers_reject_missing_and_foreign_files(tmp_path):
    with pytest.raises(ResultsError, match="no such results database"):
        store.load_populations(tmp_path / "none.sqlite")
    (tmp_path / "x.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(ResultsError, match="not a readable results database"):
        store.load_populations(tmp_path / "x.sqlite")
    sqlite3.connect(tmp_path / "other.sqlite").close()
    with pytest.raises(ResultsError, match="not a readable results database|schema"):
        store.load_populations(tmp_path / "other.sqlite")


def test_schema_has_the_documented_tables(gated):
    with sqlite3.connect(gated / "immunoprofile.sqlite") as con:
        names = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert names == {"meta", "runs", "samples", "run_samples", "populations", "intensities", "gates", "findings",
                     "failures"}
    doc = (Path(__file__).resolve().parents[1] / "docs" / "batch.md").read_text()
    for name in names:
        assert f"`{name}`" in doc
