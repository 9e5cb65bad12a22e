"""Atomic output under real signals (issue 4), with real ``immunoprofile gate`` processes.

* ``kill -9`` at 20 random moments of runs that alternate between two templates (so the
  two possible complete results differ in every table): after each kill the output folder
  is absent (before the first publication) or exactly one complete result, checked file
  by file against its manifest and against an uninterrupted run; a final rerun completes
  with the same bytes as an uninterrupted run and leaves no debris.
* SIGINT and SIGTERM: exit 130, previous results untouched, nothing left behind.
* a lock held by a live process stops a second run (exit 3); the lock of a process that
  was killed is recovered.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from immunoprofile import report
from immunoprofile.batch import TABLES, run_gate
from immunoprofile.samplesheet import read_sheet
from immunoprofile.simulate import simulate_cohort
from immunoprofile.templates import load_template

KILLS = 20


def tables(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in TABLES}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("kill")
    simulate_cohort(base / "cohort", patients=1, timepoints=("pre", "post_clofarabine"), events=2000,
                    panels=("t_cell",), seed=17)
    text = Path(load_template("t_cell_exhaustion").source).read_text()
    templates = {}
    for v in ("a", "b"):
        templates[v] = base / f"template_{v}.yaml"
        templates[v].write_text(text.replace("version: 1.0.0", f"version: 1.0.0-{v}"))
    sheet = read_sheet(base / "cohort" / "samplesheet.csv")
    refs = {}
    for v, path in templates.items():
        out = base / f"ref_{v}"
        run_gate(sheet, [load_template(path)], out)
        refs[f"1.0.0-{v}"] = tables(out)
    assert refs["1.0.0-a"]["populations.csv"] != refs["1.0.0-b"]["populations.csv"]
    return base, templates, refs


def gate_command(base: Path, template: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "immunoprofile", "gate", "-t", str(template),
            "-s", str(base / "cohort" / "samplesheet.csv"), "-o", str(out), *extra]


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def reap(proc: subprocess.Popen) -> tuple[int, str]:
    """Wait for the run and its output pipes; a worker outliving its killed run keeps them open."""
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError("worker processes outlived their run by a minute") from None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the session we started
        except (ProcessLookupError, PermissionError):
            pass
    return proc.returncode, err.decode(errors="replace")


def assert_complete(out: Path, refs: dict[str, dict[str, bytes]]) -> str:
    """``out`` is one complete result: every file matches the manifest and an uninterrupted run."""
    rep = report.verify_folder(out, check_inputs=False)
    assert rep.ok, rep.problems
    assert rep.untracked == [], rep.untracked
    version = json.loads((out / "manifest.json").read_text())["templates"][0]["version"]
    assert tables(out) == refs[version]
    return version


def test_kill_9_at_random_moments_never_leaves_a_partial_or_mixed_folder(setup):
    base, templates, refs = setup
    out = base / "out"
    t0 = time.monotonic()
    rc, err = reap(start(gate_command(base, templates["a"], base / "timing", "--jobs", "1")))
    duration = time.monotonic() - t0
    assert rc == 0, err
    rng = random.Random(2026)
    states: list[str] = []
    published = False
    for i in range(KILLS):
        version = "a" if i % 2 == 0 else "b"
        extra = ["--jobs", "2" if i % 3 == 0 else "1"] + ([] if i % 4 == 3 else ["--force"])
        proc = start(gate_command(base, templates[version], out, *extra))
        time.sleep(rng.uniform(0.05, duration * 1.4))
        proc.send_signal(signal.SIGKILL)
        rc, err = reap(proc)
        if not out.exists():
            assert not published, "the results folder disappeared after a kill"
            states.append("absent")
            continue
        published = True
        states.append(f"{assert_complete(out, refs)}{' (finished)' if rc == 0 else ''}")
    final = subprocess.run(gate_command(base, templates["a"], out, "--jobs", "2"), capture_output=True, text=True,
                           timeout=120)
    assert final.returncode == 0, final.stderr
    assert assert_complete(out, refs) == "1.0.0-a"
    area = report.work_area(out)
    assert not list(area.glob("staging-*")) and not list(area.glob("previous-*"))
    assert (area / "lock").read_text() == ""
    print(f"\nrun takes {duration:.2f} s; state after each kill: {states}")


def run_and_signal(cmd: list[str], out: Path, signum: int) -> tuple[int, str]:
    """Start a run and send ``signum`` once it is gating."""
    proc = start(cmd)
    area = report.work_area(out)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        logs = list(area.glob("staging-*/run.log"))
        if logs and "gating" in logs[0].read_text(errors="replace"):
            break
        time.sleep(0.01)
    proc.send_signal(signum)
    return reap(proc)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_exits_130_and_keeps_the_previous_results(setup, signum):
    base, templates, refs = setup
    out = base / f"interrupted_{signum}"
    first = subprocess.run(gate_command(base, templates["a"], out, "--jobs", "1"), capture_output=True, timeout=120)
    assert first.returncode == 0
    rc, err = run_and_signal(gate_command(base, templates["b"], out, "--jobs", "2", "--force"), out, signum)
    assert rc == 130, err
    assert "interrupted" in err
    assert assert_complete(out, refs) == "1.0.0-a"
    area = report.work_area(out)
    assert not list(area.glob("staging-*"))
    assert "interrupted" in (area / "last-aborted-run.log").read_text()


HOLDER = """
import sys, time
from immunoprofile.lock import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_live_lock_stops_a_second_run_and_a_dead_ones_lock_is_recovered(setup, tmp_path):
    base, templates, refs = setup
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(report.work_area(out) / "lock")],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = subprocess.run(gate_command(base, templates["a"], out, "--jobs", "1"), capture_output=True,
                                text=True, timeout=120)
        assert second.returncode == 3
        assert f"another run is using this output folder (pid {holder.pid}" in second.stderr
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    third = subprocess.run(gate_command(base, templates["a"], out, "--jobs", "1"), capture_output=True, text=True,
                           timeout=120)
    assert third.returncode == 0, third.stderr
    assert f"recovered a stale lock on {out} (pid {holder.pid}" in third.stderr
    assert assert_complete(out, refs) == "1.0.0-a"
