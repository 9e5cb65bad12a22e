"""Batch throughput of ``immunoprofile gate``: ``--jobs 1`` against ``--jobs 2`` (issue 4).

Simulates a T-cell cohort of 20 files of 1,000,000 events x 18 channels (7 patients x 2
timepoints = 14 stained samples, and 6 FMO controls), then gates it with the real command in a
fresh process, ``--jobs 1`` and ``--jobs 2`` alternately (``--force``, so both gate everything;
best of ``--repeats``, as the machine may be shared), and once more without ``--force``
(nothing new: every sample reused), and ``--jobs 1`` pinned to one CPU (the one-core baseline).
Reports wall time, files per minute, the speed-up (whole
command; the gating alone, from the first task queued to the last result, FMO controls and
stained samples in one stream; and the stained samples after the last control), the seconds per
file inside a worker (``--jobs 1`` gates each file with two threads, each of two ``--jobs 2``
workers with one), the timeline from run.log (first task, the tasks' span, what follows the last,
files/s once every worker's first file is done), what is not gating, each worker's peak
resident memory (from ``manifest.json``), and checks that both wrote the same bytes.

For scale, the same machine's parallel speed-up on a trivially parallel numpy workload (two
processes sorting arrays) is measured too: on a shared virtual machine it is often well below 2.

    python benchmarks/bench_batch.py [--events 1000000] [--out bench_output]
    run(tmpdir) -> dict                        # the figures, for ``make bench``
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EVENTS, PATIENTS, EXTRA_CHANNELS = 1_000_000, 7, 5
TASK_LINE = re.compile(r"task ran on (\S+) from ([0-9.]+) to ([0-9.]+) \(epoch seconds\)")
TABLES = ("populations.csv", "populations.parquet", "intensities.csv", "gates.csv", "findings.csv", "failures.csv")


def make_cohort(folder: Path, events: int = EVENTS, patients: int = PATIENTS) -> Path:
    """``2 patients + 6`` files (20 by default): patients x 2 timepoints (T-cell panel, 18 channels)
    and 6 FMO controls."""
    from immunoprofile.simulate import simulate_cohort

    simulate_cohort(folder, patients=patients, timepoints=("pre", "post_clofarabine"), events=events,
                    panels=("t_cell",), extra_channels=EXTRA_CHANNELS, seed=4)
    return folder


def gate(cohort: Path, out: Path, jobs: int, force: bool = True, cpus: set[int] | None = None) -> dict[str, Any]:
    """One ``immunoprofile gate`` in a new process; its figures from the manifest, run.log and the clock.

    ``cpus`` pins the command to those CPUs (``sched_setaffinity``: the command then sees only them).
    The timeline comes from run.log's task lines (each task's start and end on its worker):
    ``to_first_task_seconds`` from the command's start to the first task's start (interpreter,
    imports, preparation; with ``--jobs 2`` the workers' fork server importing the gating stack),
    ``span_seconds`` from the first task's start to the last one's end (the gating itself), and
    ``after_last_task_seconds`` to the command's end (results published, processes ended).
    """
    cmd = [sys.executable, "-m", "immunoprofile", "-q", "gate", "-t", "t_cell_exhaustion",
           "-s", str(cohort / "samplesheet.csv"), "-o", str(out), "--jobs", str(jobs)] + (["--force"] if force else [])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    started = time.time()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, preexec_fn=pin)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"gate --jobs {jobs} exited {proc.returncode}: {proc.stderr[-2000:]}")
    m = json.loads((out / "manifest.json").read_text())
    run = m["run"]
    files = m["summary"]["samples"]
    phases = run.get("phase_seconds", {})
    gating = phases.get("controls", 0.0) + phases.get("samples", 0.0)
    tasks = sum(w["tasks"] for w in run["workers"])
    timeline = _timeline(TASK_LINE.findall((out / "run.log").read_text()), started, wall)
    return {
        "jobs": jobs, "force": force, "cpus": sorted(cpus) if cpus else None,
        "files": files, "gated": run["ok"], "skipped": run["skipped"],
        "wall_seconds": wall, "run_seconds": run["wall_seconds"],
        "files_per_minute": 60.0 * files / wall, "events_per_second": run["events_per_second"],
        "phase_seconds": phases,
        "gating_seconds": gating,
        "not_gating_seconds": wall - gating,
        **timeline,
        "seconds_per_file_in_worker": sum(w["seconds"] for w in run["workers"]) / tasks if tasks else 0.0,
        "workers": [{"worker": w["worker"], "tasks": w["tasks"], "seconds": w["seconds"],
                     "peak_rss_mib": w["peak_rss_bytes"] / 2**20} for w in run["workers"]],
        "peak_rss_mib_per_worker": max((w["peak_rss_bytes"] for w in run["workers"]), default=0) / 2**20,
        "peak_rss_mib_coordinator": run.get("peak_rss_bytes", 0) / 2**20,
    }


def _timeline(tasks: list[tuple[str, str, str]], started: float, wall: float) -> dict[str, float]:
    """When the tasks ran (run.log's lines: worker, start, end in epoch seconds) against the command's clock.

    ``steady_files_per_second``: files gated per second once every worker has finished its
    first file (which, with ``--jobs 1``, also imports the gating stack), counting each task by
    the share of its time inside that window.
    """
    spans = [(w, float(a), float(b)) for w, a, b in tasks]
    if not spans:
        return {}
    first, last = min(a for _, a, _ in spans), max(b for _, _, b in spans)
    firsts: dict[str, float] = {}
    for w, a, b in sorted(spans, key=lambda t: t[1]):
        firsts.setdefault(w, b)
    window = max(firsts.values())
    done = sum(max(0.0, min(b, last) - max(a, window)) / (b - a) for _, a, b in spans if b > a)
    return {"to_first_task_seconds": first - started, "span_seconds": last - first,
            "after_last_task_seconds": started + wall - last,
            "steady_files_per_second": done / (last - window) if last > window else 0.0}


def _sort_work(_: int) -> float:
    import numpy as np

    a = np.random.default_rng(0).random(3_000_000)
    t = time.perf_counter()
    for _ in range(20):
        np.sort(a)
    return time.perf_counter() - t


def machine_parallel_speedup(repeats: int = 3) -> float:
    """Two processes sorting arrays vs one process doing both: what this machine gives at best."""
    from concurrent.futures import ProcessPoolExecutor

    best = 0.0
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(_sort_work, range(2)))  # start-up
        for _ in range(repeats):
            t = time.perf_counter()
            _sort_work(0)
            _sort_work(0)
            serial = time.perf_counter() - t
            t = time.perf_counter()
            list(pool.map(_sort_work, range(2)))
            best = max(best, serial / (time.perf_counter() - t))
    return best


def one_cpu() -> set[int] | None:
    """One CPU this process may run on, to pin a one-core baseline to; None where that is not possible."""
    try:
        mine = sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return None
    return {mine[0]} if len(mine) >= 2 else None


def run(tmpdir: str | Path, events: int = EVENTS, repeats: int = 3, patients: int = PATIENTS) -> dict[str, Any]:
    """Simulate the cohort in ``tmpdir`` and time ``--jobs 1`` and ``--jobs 2``; returns the figures.

    Also times ``--jobs 1`` pinned to one CPU: the baseline against which ``--jobs 2`` shows how
    the work scales from one core to two (by default ``--jobs 1`` already hashes and compensates
    on the second core, so it is not a one-core figure).
    """
    tmp = Path(tmpdir) / "bench_batch"
    tmp.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cohort = make_cohort(tmp / "cohort", events, patients)
    simulated = time.perf_counter() - t0
    runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    pinned: list[dict[str, Any]] = []
    cpu = one_cpu()
    for _ in range(repeats):
        for jobs in (1, 2):
            runs[jobs].append(gate(cohort, tmp / f"jobs{jobs}", jobs))
        if cpu:
            pinned.append(gate(cohort, tmp / "jobs1_one_core", 1, cpus=cpu))
    one = min(runs[1], key=lambda r: r["wall_seconds"])
    two = min(runs[2], key=lambda r: r["wall_seconds"])
    again = gate(cohort, tmp / "jobs2", 2, force=False)
    same = all((tmp / "jobs1" / t).read_bytes() == (tmp / "jobs2" / t).read_bytes() for t in TABLES)
    out = {
        "files": one["files"], "events_per_file": events, "channels": 13 + EXTRA_CHANNELS,
        "cpus": os.cpu_count(), "simulate_seconds": simulated, "repeats": repeats,
        "jobs1": one, "jobs2": two, "rerun_nothing_new": again,
        "all_wall_seconds": {str(j): [round(r["wall_seconds"], 2) for r in rs] for j, rs in runs.items()},
        "speedup_jobs2": one["wall_seconds"] / two["wall_seconds"],
        "speedup_jobs2_gating": one["gating_seconds"] / two["gating_seconds"],
        "speedup_jobs2_span": one["span_seconds"] / two["span_seconds"],
        "speedup_jobs2_steady": two["steady_files_per_second"] / one["steady_files_per_second"],
        "speedup_jobs2_samples_phase": one["phase_seconds"]["samples"] / two["phase_seconds"]["samples"],
        "machine_parallel_speedup": machine_parallel_speedup(),
        "identical_outputs": same,
    }
    if pinned:
        base = min(pinned, key=lambda r: r["wall_seconds"])
        out.update({"jobs1_one_core": base,
                    "all_wall_seconds_one_core": [round(r["wall_seconds"], 2) for r in pinned],
                    "speedup_jobs2_vs_one_core": base["wall_seconds"] / two["wall_seconds"],
                    "speedup_jobs2_span_vs_one_core": base["span_seconds"] / two["span_seconds"],
                    "speedup_jobs2_steady_vs_one_core": (two["steady_files_per_second"]
                                                         / base["steady_files_per_second"])})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=EVENTS)
    ap.add_argument("--out", default="bench_output")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--patients", type=int, default=PATIENTS, help="files = 2 x patients + 6 FMO controls")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        r = run(tmp, args.events, args.repeats, args.patients)
    print(f"{r['files']} files x {r['events_per_file']:,} events x {r['channels']} channels, {r['cpus']} CPUs "
          f"(simulated in {r['simulate_seconds']:.0f} s)")
    for key in ("jobs1", "jobs1_one_core", "jobs2", "rerun_nothing_new"):
        if key not in r:
            continue
        x = r[key]
        phases = ", ".join(f"{k} {v:.2f} s" for k, v in x["phase_seconds"].items())
        label = (" (rerun, nothing new)" if not x["force"] else f" (pinned to CPU {x['cpus'][0]})" if x["cpus"] else "")
        timeline = (f"; timeline: first task at {x['to_first_task_seconds']:.2f} s, tasks over "
                    f"{x['span_seconds']:.2f} s, done {x['after_last_task_seconds']:.2f} s after the last; "
                    f"{x['steady_files_per_second']:.2f} files/s once every worker's first file is done"
                    if "span_seconds" in x else "")
        print(f"  --jobs {x['jobs']}{label}: {x['wall_seconds']:.2f} s wall, {x['files_per_minute']:.0f} files/min "
              f"({phases}{timeline}), gated {x['gated']}, skipped {x['skipped']}, "
              f"{x['seconds_per_file_in_worker']:.3f} s per file in a worker, peak RSS per worker "
              f"{x['peak_rss_mib_per_worker']:.0f} MiB (coordinating process {x['peak_rss_mib_coordinator']:.0f} MiB)")
    print(f"  speed-up --jobs 2 vs 1 (best of {r['repeats']}): {r['speedup_jobs2']:.2f}x whole command, "
          f"{r['speedup_jobs2_span']:.2f}x over the tasks' span, {r['speedup_jobs2_steady']:.2f}x steady, "
          f"{r['speedup_jobs2_gating']:.2f}x gating phases (from the first task queued), "
          f"{r['speedup_jobs2_samples_phase']:.2f}x samples after the last control; "
          f"all runs (s): {r['all_wall_seconds']}")
    if "jobs1_one_core" in r:
        print(f"  speed-up --jobs 2 vs --jobs 1 on one core: {r['speedup_jobs2_vs_one_core']:.2f}x whole command, "
              f"{r['speedup_jobs2_span_vs_one_core']:.2f}x over the tasks' span, "
              f"{r['speedup_jobs2_steady_vs_one_core']:.2f}x steady; "
              f"one-core runs (s): {r['all_wall_seconds_one_core']}")
    print(f"  this machine's best 2-process speed-up on a trivially parallel numpy workload: "
          f"{r['machine_parallel_speedup']:.2f}x; outputs identical: {r['identical_outputs']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_batch.json").write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
