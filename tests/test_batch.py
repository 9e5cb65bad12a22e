"""Batch runs (issue 4): parallel = serial byte for byte, Dask, skip-finished cache, deferral,
failure isolation, aborts that keep the previous results, atomic publication and its recovery.

Truth: a serial (``jobs=1``) run of the same inputs, the simulator's ``truth.csv``, the
bytes of files on disk, and process ids of the workers.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pandas as pd
import pytest

from immunoprofile import report
from immunoprofile.batch import TABLES, RunSettings, run_gate
from immunoprofile.errors import AbortedError, UsageError
from immunoprofile.executor import ProcessExecutor
from immunoprofile.pipeline import Options
from immunoprofile.progress import Progress
from immunoprofile.samplesheet import read_sheet
from immunoprofile.simulate import simulate_cohort, simulate_sample
from immunoprofile.templates import load_template
from immunoprofile.work import Task

EVENTS = 2000


def tables(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in TABLES}


def stable_manifest(folder: Path) -> dict:
    return report.stable_manifest(json.loads((folder / "manifest.json").read_text()))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """One panel, 2 patients x 2 timepoints: 4 stained samples and 6 FMO controls (2 batches)."""
    out = tmp_path_factory.mktemp("batch") / "cohort"
    simulate_cohort(out, patients=2, timepoints=("pre", "post_clofarabine"), events=EVENTS, panels=("t_cell",),
                    seed=5)
    return out


@pytest.fixture(scope="module")
def tcell():
    return load_template("t_cell_exhaustion")


@pytest.fixture(scope="module")
def reference(cohort, tcell, tmp_path_factory) -> Path:
    """An uninterrupted serial run: the truth the other runs must reproduce byte for byte."""
    out = tmp_path_factory.mktemp("ref") / "out"
    summary = run_gate(read_sheet(cohort / "samplesheet.csv"), [tcell], out)
    assert (summary.ok, summary.failed, summary.controls) == (10, 0, 6)
    return out


def copy_cohort(cohort: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for p in cohort.iterdir():
        (dest / p.name).write_bytes(p.read_bytes())
    return dest


# ----------------------------------------------------------------------------------- results are right
def test_reference_run_matches_simulator_truth(reference, cohort):
    pops = pd.read_csv(reference / "populations.csv")
    truth = pd.read_csv(cohort / "truth.csv")
    m = pops.merge(truth, on=["sample_id", "population"], suffixes=("", "_true"), validate="one_to_one")
    assert len(m) == len(pops) == 4 * 18
    major = m[m.population.isin(["T cells", "CD4 T", "CD8 T"])]
    assert ((major.pct_parent - 100 * major.fraction).abs() <= 3.0).all()
    assert set(pops.sample_id) == {f"P0{p}_{tp}_t_cell" for p in (1, 2) for tp in ("pre", "post_clofarabine")}
    gates = pd.read_csv(reference / "gates.csv")
    fmo = gates[gates.population.str.startswith("FMO ")]
    assert len(fmo) == 12 and set(fmo.parent) == {"CD4 T", "CD8 T"}  # per control: one threshold per parent


# ----------------------------------------------------------------------------------- parallel = serial
def test_two_worker_processes_give_byte_identical_results(cohort, tcell, reference, tmp_path):
    out = tmp_path / "out"
    summary = run_gate(read_sheet(cohort / "samplesheet.csv"), [tcell], out, settings=RunSettings(jobs=2))
    assert summary.ok == 10 and summary.failed == 0
    pids = {int(w.split(":")[-1]) for w in summary.workers}
    assert len(pids) == 2 and os.getpid() not in pids
    assert tables(out) == tables(reference)
    assert stable_manifest(out) == stable_manifest(reference)


def test_dask_local_cluster_gives_byte_identical_results(cohort, tcell, reference, tmp_path):
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  worker_dashboard_address=None) as cluster:
        summary = run_gate(read_sheet(cohort / "samplesheet.csv"), [tcell], tmp_path / "out",
                           settings=RunSettings(executor="dask", scheduler=cluster.scheduler_address))
    assert summary.ok == 10 and summary.failed == 0
    pids = {int(w.split(":")[-1]) for w in summary.workers}
    assert pids and os.getpid() not in pids
    assert tables(tmp_path / "out") == tables(reference)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["run"]["execution"]["executor"] == "dask"


def test_dask_needs_a_reachable_scheduler(cohort, tcell, tmp_path):
    pytest.importorskip("distributed")
    sheet = read_sheet(cohort / "samplesheet.csv")
    with pytest.raises(UsageError, match="needs --scheduler"):
        run_gate(sheet, [tcell], tmp_path / "out", settings=RunSettings(executor="dask"))
    with pytest.raises(UsageError, match="cannot reach the Dask scheduler") as e:
        run_gate(sheet, [tcell], tmp_path / "out",
                 settings=RunSettings(executor="dask", scheduler="tcp://127.0.0.1:9", scheduler_timeout=0.5))
    assert e.value.code == "SCHEDULER_UNREACHABLE"
    assert not (tmp_path / "out").exists()


class _KillsItsWorker:
    """Unpickling this in a worker process ends that process at once (a stand-in for the OOM killer)."""

    def __reduce__(self):
        return (os._exit, (1,))


def _stained_tasks(cohort, tcell) -> list[Task]:
    """One task per stained sample of the cohort's sheet, numbered from 0."""
    sheet = read_sheet(cohort / "samplesheet.csv")
    stained = sheet[sheet.control == ""].reset_index(drop=True)
    return [Task(i, "sample", r.sample_id, os.path.abspath(r.path), r.file, tcell, Options(),
                 meta={k: r[k] for k in sheet.columns if k != "path"})
            for i, r in stained.iterrows()]


def test_a_dying_worker_fails_only_its_own_sample(cohort, tcell):
    tasks = _stained_tasks(cohort, tcell)
    tasks[1] = Task(1, "sample", "doomed", "/nowhere.fcs", "doomed.fcs", _KillsItsWorker(), None)
    ex = ProcessExecutor(2)
    try:
        results = {r.index: r for r in ex.run(tasks)}
    finally:
        ex.close()
    assert sorted(results) == [0, 1, 2, 3]
    assert results[1].error["code"] == "WORKER_DIED" and "nowhere.fcs" in results[1].error["message"]
    for i in (0, 2, 3):
        assert results[i].error is None and results[i].output.n_events == EVENTS


# ----------------------------------------------------------------------------------- skip finished work
def test_rerun_does_no_gating_and_outputs_are_byte_identical(cohort, tcell, tmp_path, monkeypatch):
    out = tmp_path / "out"
    sheet = read_sheet(cohort / "samplesheet.csv")
    first = run_gate(sheet, [tcell], out)
    before, manifest_before = tables(out), stable_manifest(out)
    import immunoprofile.pipeline as pipeline

    def no_gating(*a, **k):
        raise AssertionError("gated although nothing changed")

    monkeypatch.setattr(pipeline, "process_sample", no_gating)
    monkeypatch.setattr(pipeline, "process_control", no_gating)
    monkeypatch.setattr("immunoprofile.fcs.read_fcs", no_gating)
    again = run_gate(sheet, [tcell], out)
    assert (first.ok, first.skipped) == (10, 0)
    assert (again.ok, again.skipped, again.failed, again.gated, again.events) == (0, 10, 0, 0, 0)
    assert tables(out) == before
    assert stable_manifest(out) == manifest_before
    m = json.loads((out / "manifest.json").read_text())
    assert m["run"]["skipped"] == 10 and m["summary"]["succeeded"] == 10
    assert set(m["volatile"]) == set(report.VOLATILE_KEYS)


def test_adding_one_file_gates_only_that_file(cohort, tcell, reference, tmp_path):
    full = read_sheet(cohort / "samplesheet.csv")
    last = full[full.control == ""].index[-1]
    out = tmp_path / "out"
    first = run_gate(full.drop(index=last).reset_index(drop=True), [tcell], out)
    assert first.ok == 9
    second = run_gate(full, [tcell], out)
    assert (second.ok, second.skipped, second.gated) == (1, 9, 1)
    assert tables(out) == tables(reference)


def test_changing_the_template_regates_everything(cohort, tcell, tmp_path):
    out = tmp_path / "out"
    sheet = read_sheet(cohort / "samplesheet.csv")
    run_gate(sheet, [tcell], out)
    text = Path(tcell.source).read_text().replace("version: 1.0.0", "version: 1.0.1")
    (tmp_path / "t.yaml").write_text(text)
    changed = load_template(tmp_path / "t.yaml")
    summary = run_gate(sheet, [changed], out)
    assert (summary.ok, summary.skipped) == (10, 0)
    assert set(pd.read_csv(out / "populations.csv").template_version) == {"1.0.1"}


def test_force_regates_and_gives_the_same_bytes(cohort, tcell, reference, tmp_path):
    out = tmp_path / "out"
    sheet = read_sheet(cohort / "samplesheet.csv")
    run_gate(sheet, [tcell], out)
    summary = run_gate(sheet, [tcell], out, settings=RunSettings(force=True))
    assert (summary.ok, summary.skipped) == (10, 0)
    assert tables(out) == tables(reference)


def test_a_changed_fmo_control_regates_its_batch_only(cohort, tcell, tmp_path):
    data = copy_cohort(cohort, tmp_path / "data")
    out = tmp_path / "out"
    sheet = read_sheet(data / "samplesheet.csv")
    run_gate(sheet, [tcell], out)
    thresholds = pd.read_csv(out / "gates.csv").query("population == 'FMO PD1 threshold'")
    other = simulate_sample("t_cell", EVENTS, timepoint="pre", control="PD1", seed=99)
    (data / "B1_t_cell_FMO_PD1.fcs").write_bytes(other.fcs_bytes())
    summary = run_gate(sheet, [tcell], out)
    # the control and the two stained samples of batch B1 (pre); batch B2 and the other controls unchanged
    assert (summary.ok, summary.skipped) == (3, 7)
    after = pd.read_csv(out / "gates.csv").query("population == 'FMO PD1 threshold'")
    changed = after.sample_id == "B1_t_cell_FMO_PD1"
    before_b1 = thresholds.sample_id == "B1_t_cell_FMO_PD1"
    assert set(after[changed].coordinates).isdisjoint(thresholds[before_b1].coordinates)
    assert after[~changed].coordinates.tolist() == thresholds[~before_b1].coordinates.tolist()


# ----------------------------------------------------------------------------------- deferral
def test_a_file_written_during_the_run_is_deferred_not_failed(cohort, tcell, tmp_path):
    data = copy_cohort(cohort, tmp_path / "data")
    target = data / "P02_post_clofarabine_t_cell.fcs"
    calls = []

    def grow(p: Progress) -> None:  # the acquisition software is still appending to the last file
        calls.append(p)
        if p.current == "P01_pre_t_cell":  # the first stained sample: every file has been hashed
            with open(target, "ab") as fh:
                fh.write(b"\0" * 4096)

    summary = run_gate(read_sheet(data / "samplesheet.csv"), [tcell], tmp_path / "out", on_progress=grow)
    assert (summary.ok, summary.failed, summary.deferred) == (9, 0, 1)
    assert summary.exit_code == 0
    assert summary.deferrals[0]["sample_id"] == "P02_post_clofarabine_t_cell"
    pops = pd.read_csv(tmp_path / "out" / "populations.csv")
    assert "P02_post_clofarabine_t_cell" not in set(pops.sample_id) and pops.sample_id.nunique() == 3
    assert pd.read_csv(tmp_path / "out" / "failures.csv").empty
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [d["sample_id"] for d in m["deferred"]] == ["P02_post_clofarabine_t_cell"]
    assert calls[-1].done == calls[-1].total == 10


def test_young_files_are_deferred_with_min_age_and_so_is_their_batch(cohort, tcell, tmp_path):
    data = copy_cohort(cohort, tmp_path / "data")
    old = time.time() - 7200
    for p in data.glob("*.fcs"):
        os.utime(p, (old, old))
    os.utime(data / "B2_t_cell_FMO_TIM3.fcs")  # just written
    summary = run_gate(read_sheet(data / "samplesheet.csv"), [tcell], tmp_path / "out",
                       settings=RunSettings(min_age=600))
    deferred = sorted(d["sample_id"] for d in summary.deferrals)
    # the young control, and the stained samples of its batch (their thresholds would be incomplete)
    assert deferred == ["B2_t_cell_FMO_TIM3", "P01_post_clofarabine_t_cell", "P02_post_clofarabine_t_cell"]
    assert summary.ok == 7 and summary.failed == 0


# ----------------------------------------------------------------------------------- failures and aborts
def corrupt_three(data: Path) -> list[str]:
    """A truncated file, a file of garbage, and an NK-panel file under a T-cell name."""
    names = ["P03_pre_t_cell", "P11_post_clofarabine_t_cell", "P20_pre_t_cell"]
    a = data / f"{names[0]}.fcs"
    a.write_bytes(a.read_bytes()[: a.stat().st_size // 2])
    (data / f"{names[1]}.fcs").write_bytes(os.urandom(30_000))
    (data / f"{names[2]}.fcs").write_bytes(simulate_sample("nk", EVENTS, seed=1).fcs_bytes())
    return names


@pytest.fixture(scope="module")
def fifty(tmp_path_factory) -> Path:
    """50 stained T-cell files (25 patients x 2 timepoints), no FMO controls; 3 of them corrupt."""
    data = tmp_path_factory.mktemp("fifty") / "data"
    simulate_cohort(data, patients=25, timepoints=("pre", "post_clofarabine"), events=EVENTS, panels=("t_cell",),
                    seed=3)
    sheet = pd.read_csv(data / "samplesheet.csv", dtype=str, keep_default_na=False)
    sheet[sheet.control == ""].to_csv(data / "stained.csv", index=False)
    corrupt_three(data)
    return data


def test_fifty_files_three_corrupt_47_results_3_failures(fifty, tcell, tmp_path, capsys):
    from immunoprofile.cli import main

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_status:
        main(["gate", "-t", "t_cell_exhaustion", "-s", str(fifty / "stained.csv"), "-o", str(out), "--jobs", "2"])
    assert exit_status.value.code == 1
    assert "50 samples: 47 ok, 0 skipped (unchanged), 3 failed, 0 deferred" in capsys.readouterr().err
    pops = pd.read_csv(out / "populations.csv")
    fails = pd.read_csv(out / "failures.csv")
    assert pops.sample_id.nunique() == 47 and len(fails) == 3
    assert fails.sample_id.tolist() == ["P03_pre_t_cell", "P11_post_clofarabine_t_cell", "P20_pre_t_cell"]
    assert fails.code.tolist() == ["FCS_TRUNCATED", "FCS_NOT_FCS", "MARKER_NOT_FOUND"]
    assert fails.message.str.contains(".fcs").all()
    truth = pd.read_csv(fifty / "truth.csv")
    m = pops.merge(truth, on=["sample_id", "population"], suffixes=("", "_true"))
    t = m[m.population == "T cells"]
    assert len(t) == 47 and ((t.pct_parent - 100 * t.fraction).abs() <= 3.0).all()
    # failures are deterministic: the rerun reuses them too, and gates nothing
    again = run_gate(read_sheet(fifty / "stained.csv"), [tcell], out)
    assert (again.gated, again.skipped, again.failed) == (0, 47, 3)
    assert (out / "failures.csv").read_bytes() == fails.to_csv(index=False, lineterminator="\n").encode()


def test_too_many_failures_abort_and_keep_the_previous_results(fifty, tcell, tmp_path):
    out = tmp_path / "out"
    sheet = read_sheet(fifty / "stained.csv").iloc[:10].reset_index(drop=True)
    run_gate(sheet.iloc[:2].reset_index(drop=True), [tcell], out)
    before = tables(out)
    with pytest.raises(AbortedError, match="more than --max-failed 0.05") as e:
        run_gate(sheet, [tcell], out, settings=RunSettings(max_failed=0.05))
    assert e.value.code == "TOO_MANY_FAILURES" and e.value.exit_code == 3
    assert tables(out) == before and report.verify_folder(out).ok
    saved = report.work_area(out) / "last-aborted-run.log"
    assert saved.is_file() and "P03_pre_t_cell" in saved.read_text()
    assert str(saved) in str(e.value)
    assert not list(report.work_area(out).glob("staging-*"))


def test_a_wrong_template_fails_everything_and_aborts(fifty, tmp_path):
    sheet = read_sheet(fifty / "stained.csv").iloc[:6].reset_index(drop=True)
    with pytest.raises(AbortedError) as e:
        run_gate(sheet, [load_template("nk_inhibitory")], tmp_path / "out", settings=RunSettings(max_failed=0.5))
    assert "4 of 6 samples failed so far" in str(e.value) or "samples failed" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_fail_fast_stops_at_the_first_failure_and_publishes_nothing(fifty, tcell, tmp_path):
    sheet = read_sheet(fifty / "stained.csv").iloc[:8].reset_index(drop=True)
    with pytest.raises(AbortedError, match="P03_pre_t_cell") as e:
        run_gate(sheet, [tcell], tmp_path / "out", fail_fast=True)
    assert e.value.code == "FAIL_FAST"
    assert not (tmp_path / "out").exists()


def test_max_failed_must_be_a_fraction(cohort, tcell, tmp_path):
    with pytest.raises(UsageError, match="between 0 and 1"):
        run_gate(read_sheet(cohort / "samplesheet.csv"), [tcell], tmp_path / "o", settings=RunSettings(max_failed=2))


# ----------------------------------------------------------------------------------- the output folder
def test_a_folder_of_other_files_is_never_replaced(cohort, tcell, tmp_path):
    mine = tmp_path / "my_data"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    with pytest.raises(UsageError, match="not a results folder"):
        run_gate(read_sheet(cohort / "samplesheet.csv"), [tcell], mine)
    assert (mine / "notes.txt").read_text() == "precious" and len(list(mine.iterdir())) == 1


def test_files_added_by_hand_survive_a_rerun(cohort, tcell, tmp_path):
    out = tmp_path / "out"
    sheet = read_sheet(cohort / "samplesheet.csv")
    run_gate(sheet, [tcell], out)
    (out / "notes.txt").write_text("reviewed by AB")
    run_gate(sheet, [tcell], out, settings=RunSettings(force=True))
    assert (out / "notes.txt").read_text() == "reviewed by AB"
    rep = report.verify_folder(out)
    assert rep.ok and rep.untracked == ["notes.txt"]


def test_crash_between_the_two_renames_of_the_fallback_is_repaired(cohort, tcell, reference, tmp_path,
                                                                  monkeypatch):
    """Without renameat2 the swap is two renames; a crash between them leaves DIR absent for a moment."""
    out = tmp_path / "out"
    sheet = read_sheet(cohort / "samplesheet.csv")
    run_gate(sheet, [tcell], out)
    monkeypatch.setattr(report, "_exchange", lambda a, b: False)
    real_replace = os.replace

    def crash_on_second(src, dst):
        if Path(src).name.startswith("staging-") and Path(dst) == out:
            raise KeyboardInterrupt("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(report.os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        run_gate(sheet, [tcell], out, settings=RunSettings(force=True))
    assert not out.exists()  # the window: previous results are in the work area
    assert len(list(report.work_area(out).glob("previous-*"))) == 1
    monkeypatch.setattr(report.os, "replace", real_replace)
    assert report.recover(out)[0].startswith("restored the previous results")
    assert tables(out) == tables(reference) and report.verify_folder(out).ok
    run_gate(sheet, [tcell], out)
    assert tables(out) == tables(reference)
    assert not list(report.work_area(out).glob("previous-*")) and not list(report.work_area(out).glob("staging-*"))


def test_exchange_swaps_two_folders_in_one_step(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    if not report._exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


def test_run_log_and_database_are_in_the_folder(reference, cohort):
    log_text = (reference / "run.log").read_text()
    for sid in ("B1_t_cell_FMO_PD1", "P01_pre_t_cell", "P02_post_clofarabine_t_cell"):
        assert sid in log_text
    assert "summary: 10 samples: 10 ok" in log_text
    m = json.loads((reference / "manifest.json").read_text())
    assert m["run"]["log"]["sha256"] == report.sha256_file(reference / "run.log")
    assert m["run"]["database"]["path"] == "immunoprofile.sqlite"
    assert [o["path"] for o in m["outputs"]] == list(TABLES)
    fcs = m["inputs"]
    assert len(fcs) == 10 and all(i["sha256"] == report.sha256_file(i["path"]) for i in fcs)
    assert {i["sample_id"] for i in fcs} == set(pd.read_csv(cohort / "samplesheet.csv").sample_id)
    assert [i["role"] for i in m["other_inputs"]] == ["template"]
    assert m["run"]["workers"][0]["peak_rss_bytes"] > 10 * 2**20


# ----------------------------------------------------------------------------------- the cache itself
def test_cache_entries_round_trip_and_damage_is_a_miss(tmp_path):
    from immunoprofile.cache import SampleCache, make_key

    cache = SampleCache(tmp_path / "c")
    k1, k2 = make_key("sample", {"file_sha256": "a" * 64, "x": 0.1}), make_key("sample", {"file_sha256": "a" * 64,
                                                                                        "x": 0.1000000001})
    assert k1 != k2 and len(k1) == 64
    cache.put(k1, {"rows": [1, 2.5, float("nan")]})
    got = cache.get(k1)
    assert got["rows"][:2] == [1, 2.5] and got["rows"][2] != got["rows"][2]
    assert cache.get(k2) is None
    entry = next((tmp_path / "c").glob("*/*.pkl"))
    entry.write_bytes(entry.read_bytes()[:20])  # damaged: a miss, never an error
    assert cache.get(k1) is None
    (entry.parent / f"{entry.name}.tmp-999").write_bytes(b"half")
    assert cache.clean_temporary() == 1
    assert SampleCache(tmp_path / "c", enabled=False).get(k2) is None


def test_cache_prune_keeps_what_was_used_and_what_is_recent(tmp_path):
    from immunoprofile.cache import SampleCache

    cache = SampleCache(tmp_path / "c")
    keys = [f"{i:02d}" + "0" * 62 for i in range(3)]
    for k in keys:
        cache.put(k, k)
    old = time.time() - 30 * 86400
    for k in keys[:2]:
        os.utime(tmp_path / "c" / k[:2] / f"{k}.pkl", (old, old))
    assert cache.prune(keep={keys[0]}) == 1  # keys[1]: unused and a month old
    assert [cache.get(k) for k in keys] == [keys[0], None, keys[2]]


def test_program_fingerprint_covers_the_code_that_computes_results():
    from immunoprofile.cache import result_modules

    mods = set(result_modules())
    assert {"fcs", "gating", "pipeline", "stats", "templates", "transform", "panel", "interop", "work"} <= mods
    assert not mods & {"batch", "report", "store", "cli", "plots", "compare", "results"}


def test_import_scanner_finds_what_parsing_finds():
    """The fingerprint's fast line scanner finds every import that Python's parser finds, in every module."""
    from pathlib import Path as _Path

    from immunoprofile import cache

    root = _Path(cache.__file__).resolve().parent
    files = sorted(root.rglob("*.py"))
    assert len(files) > 20
    for py in files:
        name = ".".join(py.relative_to(root).with_suffix("").parts)
        name = name[: -len(".__init__")] if name.endswith(".__init__") else name
        src = py.read_text(encoding="utf-8")
        package = cache._package_of(name, py)
        assert set(cache._imports_by_ast(src, package)) <= set(cache._imports(src, package)), name
    # and a few forms written out
    src = ("from . import a, b as c\nfrom .d import (\n    e,\n    f as g,\n)\n"
           "def h():\n    from ..x import y  # noqa\n    import immunoprofile.z as zz\n"
           "from immunoprofile.w import v\nfrom os import path\n")
    assert set(cache._imports(src, "p.q")) == set(cache._imports_by_ast(src, "p.q")) == {
        "p.q", "p.q.a", "p.q.b", "p.q.d", "p.q.d.e", "p.q.d.f", "p.x", "p.x.y", "z", "w", "w.v"}
    # the closure from ``work`` is the one the parser gives
    seen, todo = set(), ["work"]
    while todo:
        n = todo.pop()
        path = cache._module_path(root, n)
        if n in seen or path is None:
            continue
        seen.add(n)
        todo.extend(cache._imports_by_ast(path.read_text(encoding="utf-8"), cache._package_of(n, path)))
    assert sorted(seen) == cache.result_modules()


# ----------------------------------------------------------------------------------- the path index
class _CountingHasher:
    """Stands in for the coordinator's ``sha256_file`` and records which files it read."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    def __call__(self, path, chunk: int = 1 << 20) -> str:
        self.paths.append(os.path.basename(path))
        return report.sha256_file(path)


@pytest.fixture
def hasher(monkeypatch) -> _CountingHasher:
    h = _CountingHasher()
    monkeypatch.setattr("immunoprofile.batch.sha256_file", h)
    return h


def _no_gating(monkeypatch) -> None:
    import immunoprofile.pipeline as pipeline

    def no_gating(*a, **k):
        raise AssertionError("gated although nothing changed")

    monkeypatch.setattr(pipeline, "process_sample", no_gating)
    monkeypatch.setattr(pipeline, "process_control", no_gating)


def test_path_index_same_state_means_no_hashing(cohort, tcell, tmp_path, hasher, monkeypatch):
    from immunoprofile import cache

    data = copy_cohort(cohort, tmp_path / "data")
    out = tmp_path / "out"
    sheet = read_sheet(data / "samplesheet.csv")
    first = run_gate(sheet, [tcell], out)
    assert first.ok == 10 and hasher.paths == []  # no index entry: no hit possible, the workers hash
    m = json.loads((out / "manifest.json").read_text())
    assert all(i["sha256"] == report.sha256_file(i["path"]) for i in m["inputs"])
    index = json.loads((report.work_area(out) / "cache" / "paths.json").read_text())["paths"]
    assert len(index) == 10
    for path, entry in index.items():
        st = os.stat(path)
        assert entry["state"] == [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
        assert entry["sha256"] == report.sha256_file(path)
    before = tables(out)

    monkeypatch.setattr(cache, "RACY_SECONDS", 0.0)  # the files were written just now (see test below)
    _no_gating(monkeypatch)
    again = run_gate(sheet, [tcell], out)
    assert (again.ok, again.skipped, again.gated) == (0, 10, 0)
    assert hasher.paths == []  # every state matched: not one file read
    assert tables(out) == before
    m = json.loads((out / "manifest.json").read_text())
    assert all(i["sha256"] == report.sha256_file(i["path"]) for i in m["inputs"])

    monkeypatch.setattr(cache, "RACY_SECONDS", 1e9)  # every entry "racily clean": hashed, and still reused
    racy = run_gate(sheet, [tcell], out)
    assert (racy.skipped, racy.gated) == (10, 0)
    assert sorted(hasher.paths) == sorted(p.name for p in data.glob("*.fcs"))


def test_path_index_touched_is_reused_and_changed_is_regated(cohort, tcell, tmp_path, hasher, monkeypatch):
    from immunoprofile import cache

    monkeypatch.setattr(cache, "RACY_SECONDS", 0.0)
    data = copy_cohort(cohort, tmp_path / "data")
    out = tmp_path / "out"
    sheet = read_sheet(data / "samplesheet.csv")
    run_gate(sheet, [tcell], out)
    pops = pd.read_csv(out / "populations.csv")

    touched = data / "P01_pre_t_cell.fcs"
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns - 10**10))  # `touch -d`
    summary = run_gate(sheet, [tcell], out)
    assert (summary.ok, summary.skipped) == (0, 10)  # touched but the same bytes: reused
    assert hasher.paths == ["P01_pre_t_cell.fcs"]  # hashed once: its state differs from the index's

    hasher.paths.clear()
    changed = data / "P02_pre_t_cell.fcs"
    mtime = changed.stat().st_mtime_ns
    changed.write_bytes(touched.read_bytes())  # other events, and another modification time
    os.utime(changed, ns=(mtime - 2 * 10**10, mtime - 2 * 10**10))
    summary = run_gate(sheet, [tcell], out)
    assert (summary.ok, summary.skipped) == (1, 9)
    assert hasher.paths == ["P02_pre_t_cell.fcs"]
    after = pd.read_csv(out / "populations.csv")
    got = after[after.sample_id == "P02_pre_t_cell"].set_index("population")["count"]
    want = pops[pops.sample_id == "P01_pre_t_cell"].set_index("population")["count"]  # now the same events
    assert got.to_dict() == want.to_dict()

    hasher.paths.clear()  # same size, mtime put back: only the change time shows the edit
    other = data / "P01_post_clofarabine_t_cell.fcs"
    st = other.stat()
    edited = bytearray(other.read_bytes())
    edited[len(edited) // 2] ^= 1  # one event of the DATA segment
    other.write_bytes(bytes(edited))
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (other.stat().st_size, other.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    summary = run_gate(sheet, [tcell], out)
    assert (summary.gated, summary.skipped) == (1, 9)
    assert hasher.paths == ["P01_post_clofarabine_t_cell.fcs"]


def test_without_a_path_index_an_existing_cache_is_still_used(cohort, tcell, tmp_path, hasher, monkeypatch):
    out = tmp_path / "out"
    sheet = read_sheet(cohort / "samplesheet.csv")
    run_gate(sheet, [tcell], out)
    (report.work_area(out) / "cache" / "paths.json").write_text("{not json")  # damaged: as good as absent
    _no_gating(monkeypatch)
    summary = run_gate(sheet, [tcell], out)
    assert (summary.skipped, summary.gated) == (10, 0)
    assert len(hasher.paths) == 10  # a cache from before the index: every file hashed, as it was


def test_force_hashes_nothing_in_the_coordinator(cohort, tcell, tmp_path, hasher):
    out = tmp_path / "out"
    sheet = read_sheet(cohort / "samplesheet.csv")
    run_gate(sheet, [tcell], out)
    summary = run_gate(sheet, [tcell], out, settings=RunSettings(force=True))
    assert summary.ok == 10 and hasher.paths == []
    m = json.loads((out / "manifest.json").read_text())
    assert [i["sha256"] for i in m["inputs"]] == [report.sha256_file(i["path"]) for i in m["inputs"]]


def test_path_index_round_trip_damage_and_racy_entries(tmp_path):
    from immunoprofile.cache import PathIndex

    f = tmp_path / "a.fcs"
    f.write_bytes(b"x" * 10)
    st = os.stat(f)
    state = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    idx = PathIndex(tmp_path / "c")
    assert idx.lookup(str(f), state) == ("unknown", None)
    idx.record(str(f), state, "a" * 64, checked_ns=max(state[3], state[4]) + 10 * 10**9)
    idx.save()
    back = PathIndex(tmp_path / "c").load()
    assert back.found and back.lookup(str(f), state) == ("same", "a" * 64)
    assert back.lookup(str(f), (*state[:4], state[4] + 1)) == ("changed", None)  # ctime moved
    idx.record(str(f), state, "a" * 64, checked_ns=max(state[3], state[4]) + 10**9)  # 1 s after the change
    assert idx.lookup(str(f), state) == ("changed", None)  # racy: checked by hashing
    (tmp_path / "c" / "paths.json").write_text('{"version": 1, "paths": {"x": {"state": [1]}}}')
    damaged = PathIndex(tmp_path / "c").load()
    assert not damaged.found and damaged.entries == {}


# ----------------------------------------------------------------------------------- one streaming schedule
def _ran(folder: Path) -> dict[str, tuple[str, float, float]]:
    """sample_id -> (kind, started, finished) from the run's log."""
    import re

    pat = re.compile(r"batch: (\S+): (control|sample) task ran on \S+ from ([\d.]+) to ([\d.]+)")
    return {m[1]: (m[2], float(m[3]), float(m[4])) for m in pat.finditer((folder / "run.log").read_text())}


def test_stained_samples_never_start_before_their_batch_controls_finish(cohort, tcell, reference, tmp_path):
    out = tmp_path / "out"
    sheet = read_sheet(cohort / "samplesheet.csv")
    summary = run_gate(sheet, [tcell], out, settings=RunSettings(jobs=2))
    assert summary.ok == 10 and tables(out) == tables(reference)
    ran = _ran(out)
    assert len(ran) == 10
    for batch in ("B1", "B2"):
        ids = set(sheet[sheet.batch == batch].sample_id)
        controls_done = max(ran[s][2] for s in ids if ran[s][0] == "control")
        first_sample = min(ran[s][1] for s in ids if ran[s][0] == "sample")
        assert first_sample >= controls_done, batch
    m = json.loads((out / "manifest.json").read_text())
    assert set(m["run"]["phase_seconds"]) == {"startup", "controls", "samples"}


def test_a_batch_is_queued_as_soon_as_its_controls_are_done(cohort, tcell, reference, tmp_path, monkeypatch):
    """No barrier between phases: batch B1's samples are queued before batch B2's controls have run."""
    import immunoprofile.batch as batch
    from immunoprofile.executor import SerialExecutor

    events: list[tuple[str, str]] = []
    names: dict[int, str] = {}

    class Recording(SerialExecutor):
        def submit(self, task):
            events.append(("queued", task.sample_id))
            names[task.index] = task.sample_id
            super().submit(task)

        def completed(self):
            for res in super().completed():
                events.append(("done", names[res.index]))
                yield res

    monkeypatch.setattr(batch, "make_executor", lambda *a, **k: Recording())
    sheet = read_sheet(cohort / "samplesheet.csv")
    run_gate(sheet, [tcell], tmp_path / "out")
    assert tables(tmp_path / "out") == tables(reference)
    at = {e: i for i, e in enumerate(events)}
    group = {r.sample_id: (r.batch, r.control != "") for r in sheet.itertuples()}
    for sid, (b, is_control) in group.items():
        if is_control:
            continue
        controls = [c for c, (cb, ic) in group.items() if ic and cb == b]
        assert at[("queued", sid)] > max(at[("done", c)] for c in controls)  # thresholds complete
    b1_samples = [s for s, (b, ic) in group.items() if b == "B1" and not ic]
    b2_controls = [s for s, (b, ic) in group.items() if b == "B2" and ic]
    assert max(at[("queued", s)] for s in b1_samples) < min(at[("done", c)] for c in b2_controls)


def test_executors_take_tasks_while_results_come_back_and_survive_a_dying_worker(cohort, tcell):
    tasks = _stained_tasks(cohort, tcell)
    doomed = Task(9, "sample", "doomed", "/nowhere.fcs", "doomed.fcs", _KillsItsWorker(), None)
    ex = ProcessExecutor(2)
    results = {}
    try:
        ex.submit(tasks[0])
        ex.submit(doomed)
        for res in ex.completed():
            results[res.index] = res
            if len(results) == 1:  # more work arrives while the pool breaks and recovers
                for t in tasks[1:]:
                    ex.submit(t)
    finally:
        ex.close()
    assert sorted(results) == [0, 1, 2, 3, 9]
    assert results[9].error["code"] == "WORKER_DIED"
    for i in range(4):
        assert results[i].error is None and results[i].output.n_events == EVENTS
        assert results[i].file_sha256 == report.sha256_file(tasks[i].path)


# ----------------------------------------------------------------------------------- the worker's stat check
def test_worker_reports_the_state_and_sha256_of_what_it_read(cohort, tcell, tmp_path):
    import hashlib

    from immunoprofile.work import run_task

    path = copy_cohort(cohort, tmp_path / "data") / "P01_pre_t_cell.fcs"
    res = run_task(Task(0, "sample", "P01_pre_t_cell", str(path), path.name, tcell, Options()), capture_logs=False)
    st = os.stat(path)
    assert res.error is None and not res.changed
    assert res.file_stat == res.file_stat_after == (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
                                                      st.st_ctime_ns)
    assert res.file_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    garbage = tmp_path / "garbage.fcs"
    garbage.write_bytes(b"not an FCS file" * 100)
    bad = run_task(Task(1, "sample", "g", str(garbage), garbage.name, tcell, Options()), capture_logs=False)
    assert bad.error["code"] == "FCS_NOT_FCS" and not bad.changed
    assert bad.file_sha256 == hashlib.sha256(garbage.read_bytes()).hexdigest()  # failures are cached by it


def test_a_file_that_grows_while_the_worker_reads_it_is_deferred(cohort, tcell, tmp_path, monkeypatch):
    import immunoprofile.pipeline as pipeline

    data = copy_cohort(cohort, tmp_path / "data")
    target = "P02_pre_t_cell"
    real = pipeline.process_sample

    def appending(sample_id, path, *a, **k):
        out = real(sample_id, path, *a, **k)
        if sample_id == target:  # the acquisition software appends while the file is being gated
            with open(path, "ab") as fh:
                fh.write(b"\0" * 4096)
        return out

    monkeypatch.setattr(pipeline, "process_sample", appending)
    summary = run_gate(read_sheet(data / "samplesheet.csv"), [tcell], tmp_path / "out")
    assert (summary.ok, summary.failed, summary.deferred) == (9, 0, 1)
    assert summary.deferrals == [{"sample_id": target, "file": f"{target}.fcs",
                                  "reason": "the file changed while it was read (still being written?)"}]
    pops = pd.read_csv(tmp_path / "out" / "populations.csv")
    assert target not in set(pops.sample_id)
    index = json.loads((report.work_area(tmp_path / "out") / "cache" / "paths.json").read_text())["paths"]
    assert str(data / f"{target}.fcs") not in index and len(index) == 9  # a changing file is not remembered


def test_the_fork_server_started_early_is_stopped_when_nothing_needs_it(cohort, reference, tmp_path, capsys):
    from multiprocessing import forkserver

    from immunoprofile.cli import main

    out = tmp_path / "out"
    args = ["-q", "gate", "-t", "t_cell_exhaustion", "-s", str(cohort / "samplesheet.csv"), "-o", str(out),
            "--jobs", "2"]
    for extra in ([], [], ["--force"]):  # gates everything; nothing new; everything again
        with pytest.raises(SystemExit) as exit_status:
            main(args + extra)
        assert exit_status.value.code == 0
        m = json.loads((out / "manifest.json").read_text())
        pids = {int(w["worker"].split(":")[-1]) for w in m["run"]["workers"]}
        if extra or not m["run"]["skipped"]:
            assert len(pids) == 2 and os.getpid() not in pids and m["run"]["ok"] == 10
        else:  # nothing to gate: no worker, and the fork server that was starting is gone
            assert pids == set() and m["run"]["skipped"] == 10
            assert getattr(forkserver._forkserver, "_forkserver_pid", None) is None
        assert tables(out) == tables(reference)
