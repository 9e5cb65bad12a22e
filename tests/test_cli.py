"""Exit codes and messages of ``immunoprofile gate`` and ``immunoprofile verify``, in process.

Exit codes (README): 0 all ok; 1 finished with failed samples (``verify``: something changed
or missing); 2 usage, template or sheet error, nothing processed; 3 aborted (lock held,
disk full, too many failures); 130 interrupted.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pandas as pd
import pytest

from immunoprofile import report
from immunoprofile.batch import TABLES
from immunoprofile.cli import main
from immunoprofile.lock import RunLock
from immunoprofile.progress import Progress, ProgressBar, format_eta
from immunoprofile.simulate import simulate_cohort


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    captured = capsys.readouterr()
    return int(exc.value.code or 0), captured.out, captured.err


def tables(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in TABLES}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """2 patients x 2 timepoints, T-cell panel: 4 stained samples and 6 FMO controls."""
    out = tmp_path_factory.mktemp("cli") / "cohort"
    simulate_cohort(out, patients=2, timepoints=("pre", "post_clofarabine"), events=2000, panels=("t_cell",), seed=9)
    return out


@pytest.fixture
def data(cohort, tmp_path) -> Path:
    """A private copy of the cohort (tests may damage it)."""
    dest = tmp_path / "data"
    dest.mkdir()
    for p in cohort.iterdir():
        (dest / p.name).write_bytes(p.read_bytes())
    return dest


def gate_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["gate", "-t", "t_cell_exhaustion", "-s", str(data / "samplesheet.csv"), "-o", str(out), "--jobs", "1",
            *extra]


# ------------------------------------------------------------------------------------------- gate: 0 and 1
def test_gate_exit_0_prints_one_summary_line_and_no_progress_bar_off_a_terminal(capsys, data, tmp_path):
    code, out, err = run_cli(capsys, *gate_args(data, tmp_path / "out"))
    assert code == 0, err
    assert "10 samples: 10 ok, 0 skipped (unchanged), 0 failed, 0 deferred (6 FMO controls)" in err
    assert "events/s" in err and f"results in {tmp_path / 'out'}" in err
    assert "\r" not in err and out == ""
    code, _, err = run_cli(capsys, *gate_args(data, tmp_path / "out"))
    assert code == 0 and "10 samples: 0 ok, 10 skipped (unchanged)" in err


def test_gate_exit_1_when_a_sample_fails(capsys, data, tmp_path):
    bad = data / "P01_pre_t_cell.fcs"
    bad.write_bytes(bad.read_bytes()[:5000])
    code, _, err = run_cli(capsys, *gate_args(data, tmp_path / "out"))
    assert code == 1
    assert f"1 sample(s) failed: see {tmp_path / 'out'}/failures.csv" in err
    assert "P01_pre_t_cell.fcs" in err and "[FCS_" in err
    fails = pd.read_csv(tmp_path / "out" / "failures.csv")
    assert fails.sample_id.tolist() == ["P01_pre_t_cell"] and fails.code.str.startswith("FCS_").all()
    assert pd.read_csv(tmp_path / "out" / "populations.csv").sample_id.unique().tolist() == [
        "P01_post_clofarabine_t_cell", "P02_post_clofarabine_t_cell", "P02_pre_t_cell"]


# ------------------------------------------------------------------------------------------- gate: 2
@pytest.mark.parametrize("change, message", [
    (lambda a, d: a.__setitem__(2, "no_such_template"), "unknown template 'no_such_template'"),
    (lambda a, d: a.__setitem__(4, str(d / "missing.csv")), "sample sheet not found"),
    (lambda a, d: a.extend(["--max-failed", "1.5"]), "--max-failed must be a fraction between 0 and 1"),
    (lambda a, d: a.extend(["--jobs", "0"]), "--jobs must be at least 1"),
    (lambda a, d: a.extend(["--executor", "dask"]), "--executor dask needs --scheduler"),
    (lambda a, d: a.extend(["--scheduler", "tcp://x:1"]), "--scheduler is only used with --executor dask"),
    (lambda a, d: a.append(str(d / "P01_pre_t_cell.fcs")), "give either --samples or FILES, not both"),
])
def test_gate_exit_2_for_usage_template_and_sheet_errors(capsys, data, tmp_path, change, message):
    args = gate_args(data, tmp_path / "out")
    change(args, data)
    code, _, err = run_cli(capsys, *args)
    assert code == 2, err
    assert message in err
    assert not (tmp_path / "out").exists() and not report.work_area(tmp_path / "out").exists()


def test_gate_exit_2_for_an_output_folder_of_other_files(capsys, data, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.docx").write_bytes(b"precious")
    code, _, err = run_cli(capsys, *gate_args(data, out))
    assert code == 2 and "not a results folder" in err
    assert (out / "thesis.docx").read_bytes() == b"precious"


# ------------------------------------------------------------------------------------------- gate: 3
def test_gate_exit_3_while_another_run_holds_the_lock(capsys, data, tmp_path):
    out = tmp_path / "out"
    with RunLock(report.work_area(out) / "lock"):
        code, _, err = run_cli(capsys, *gate_args(data, out))
    assert code == 3
    assert f"another run is using this output folder (pid {os.getpid()}" in err
    assert not out.exists()


def test_gate_exit_3_when_too_many_samples_fail(capsys, data, tmp_path):
    out = tmp_path / "out"
    assert run_cli(capsys, *gate_args(data, out))[0] == 0
    before = tables(out)
    for name in ("P01_pre_t_cell.fcs", "P01_post_clofarabine_t_cell.fcs"):
        (data / name).write_bytes(b"not an FCS file")
    code, _, err = run_cli(capsys, *gate_args(data, out, "--max-failed", "0.1"))
    assert code == 3
    assert "2 of 10 samples failed" in err and "more than --max-failed 0.1" in err
    assert "the previous results in" in err and "last-aborted-run.log" in err
    assert tables(out) == before
    code, _, err = run_cli(capsys, *gate_args(data, out, "--fail-fast"))
    assert code == 3 and "stopped at the first failed sample (--fail-fast)" in err
    assert tables(out) == before


def test_gate_exit_3_when_the_disk_is_full(capsys, data, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert run_cli(capsys, *gate_args(data, out))[0] == 0
    before = tables(out)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("immunoprofile.batch.write_parquet", full)
    code, _, err = run_cli(capsys, *gate_args(data, out, "--force"))
    assert code == 3 and "the disk is full" in err
    assert tables(out) == before and report.verify_folder(out).ok
    assert not list(report.work_area(out).glob("staging-*"))


# ------------------------------------------------------------------------------------------- gate: 130
def test_gate_exit_130_when_interrupted_keeps_the_previous_results(capsys, data, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert run_cli(capsys, *gate_args(data, out))[0] == 0
    before = tables(out)
    import immunoprofile.executor as executor

    real, calls = executor.run_task, []

    def ctrl_c_on_third(task, capture_logs=True):
        calls.append(task.sample_id)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(task, capture_logs)

    monkeypatch.setattr(executor, "run_task", ctrl_c_on_third)
    code, _, err = run_cli(capsys, *gate_args(data, out, "--force"))
    assert code == 130 and "interrupted" in err
    assert len(calls) == 3
    assert tables(out) == before
    assert not list(report.work_area(out).glob("staging-*"))


# ------------------------------------------------------------------------------------------- messages
def test_quiet_prints_nothing_on_success(capsys, data, tmp_path):
    code, out, err = run_cli(capsys, "-q", *gate_args(data, tmp_path / "out"))
    assert code == 0 and out == "" and err == ""


def test_json_log_format_gives_one_json_object_per_line(capsys, data, tmp_path):
    bad = data / "P01_pre_t_cell.fcs"
    bad.write_bytes(b"garbage")
    code, _, err = run_cli(capsys, "--log-format", "json", *gate_args(data, tmp_path / "out"))
    assert code == 1
    lines = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert {"time", "level", "logger", "message"} <= set(lines[0])
    summary = [x for x in lines if "summary" in x][-1]["summary"]
    assert (summary["ok"], summary["failed"], summary["samples"]) == (9, 1, 10)
    log_lines = [json.loads(x) for x in (tmp_path / "out" / "run.log").read_text().splitlines()]
    assert any("P01_pre_t_cell" in x["message"] for x in log_lines)


def test_progress_bar_draws_eta_only_on_a_terminal():
    class Tty(list):
        def isatty(self):
            return True

        def write(self, s):
            self.append(s)

        def flush(self):
            pass

    class Pipe(Tty):
        def isatty(self):
            return False

    tty, pipe = Tty(), Pipe()
    for stream in (tty, pipe):
        bar = ProgressBar(stream, width=10, min_interval=0)
        bar.update(Progress(0, 4))
        bar.update(Progress(4, 4, ok=3, failed=1))
        bar.close()
    assert pipe == []
    drawn = "".join(tty)
    assert "[##########] 4/4  ok 3  skipped 0  failed 1  deferred 0  ETA 0:00" in drawn
    assert drawn.endswith("\r\x1b[K")
    assert ProgressBar(Tty(), width=4).render(Progress(1, 4), elapsed=30.0).endswith("ETA 1:30")
    assert format_eta(3725) == "1:02:05"


# ------------------------------------------------------------------------------------------- verify
@pytest.fixture
def results(capsys, data, tmp_path) -> Path:
    out = tmp_path / "out"
    assert run_cli(capsys, *gate_args(data, out))[0] == 0
    return out


def test_verify_exit_0_when_everything_matches(capsys, results):
    code, out, _ = run_cli(capsys, "verify", str(results))
    assert code == 0
    assert out.startswith("OK: 8 output(s) and 12 input(s) match manifest.json (run ")


def test_verify_exit_1_for_a_changed_or_missing_output(capsys, results):
    pops = results / "populations.csv"
    pops.write_text(pops.read_text().replace(",1", ",2", 1))
    (results / "gates.csv").unlink()
    code, out, err = run_cli(capsys, "verify", str(results))
    assert code == 1
    assert "CHANGED: populations.csv" in out and "MISSING: gates.csv: not found" in out
    assert "FAILED: 2 of 8 output(s) and 12 input(s) changed or missing" in err


def test_verify_exit_1_for_a_changed_input_unless_inputs_are_skipped(capsys, results, data):
    fcs = data / "P01_pre_t_cell.fcs"
    fcs.write_bytes(fcs.read_bytes()[:-10] + b"0123456789")
    code, out, _ = run_cli(capsys, "verify", str(results))
    assert code == 1 and f"CHANGED: input {fcs}: sha256 differs from the manifest" in out
    code, out, _ = run_cli(capsys, "verify", "--no-inputs", "--json", str(results))
    doc = json.loads(out)
    assert code == 0 and doc["ok"] and doc["checked_outputs"] == 8 and doc["checked_inputs"] == 0


def test_verify_exit_2_for_a_folder_without_manifest(capsys, tmp_path):
    (tmp_path / "x").mkdir()
    code, _, err = run_cli(capsys, "verify", str(tmp_path / "x"))
    assert code == 2 and "no manifest.json" in err
