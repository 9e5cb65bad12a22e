"""``make bench``: one 1,000,000-event sample, stage by stage, against FlowKit gating the same
strategy in the same run and against a raw numpy read of the DATA segment (issue 8).

The strategy is the bundled ``t_cell_exhaustion`` template on a simulated 18-channel file. Its
data-driven gates are resolved by our run (the coordinates in ``gates.csv``), exported to
Gating-ML 2.0 and gated by FlowKit on the same file, so both gate the same strategy; counts are
compared population by population.

Every figure is the best of ``--repeats`` runs (the machine may be shared); peak memory is the
largest amount traced by ``tracemalloc`` (numpy buffers included) during one run of the stage,
as a multiple of the file's event matrix (events x channels x 4 bytes). The table goes to
stdout and, with every figure, to ``OUT/bench.json`` (compare two of them for regressions).

    python benchmarks/bench.py --out bench_output          # the full run (make bench)
    python benchmarks/bench.py --quick --repeats 3         # the sample table only
    python benchmarks/bench.py --events 200000 --quick     # smaller
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

TEMPLATE = "t_cell_exhaustion"


def best_of(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Smallest wall time of ``repeats`` calls, and the last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def peak_traced(fn: Callable[[], Any]) -> int:
    """Peak bytes allocated (numpy buffers included) while ``fn`` runs, over what existed before."""
    gc.collect()
    tracemalloc.start()
    try:
        out = fn()
        peak = tracemalloc.get_traced_memory()[1]
        del out
        return peak
    finally:
        tracemalloc.stop()


def make_file(folder: Path, events: int) -> Path:
    from immunoprofile.fcs import write_fcs
    from immunoprofile.simulate import simulate_sample

    s = simulate_sample("t_cell", events, extra_channels=5, seed=1)
    path = folder / f"t_cell_{events}.fcs"
    write_fcs(path, s.events, s.channels, s.markers, spillover=s.spillover)
    return path


class Stage:
    """One timed step: a name, a function, and what its time is compared with."""

    def __init__(self, name: str, fn: Callable[[], Any], flowkit: str | None = None, note: str = "") -> None:
        self.name, self.fn, self.flowkit, self.note = name, fn, flowkit, note


def our_stages(path: Path) -> tuple[list[Stage], dict[str, Any]]:
    """Our pipeline cut into stages; each stage starts from the previous stage's output."""
    from immunoprofile import gating
    from immunoprofile.fcs import read_fcs
    from immunoprofile.gating import gate_events, prepare
    from immunoprofile.pipeline import Options, process_sample
    from immunoprofile.stats import gate_rows, intensity_rows, population_rows
    from immunoprofile.templates import ROOT as ROOT_POP
    from immunoprofile.templates import load_template

    tpl = load_template(TEMPLATE)
    opts = Options()
    warm = process_sample("bench", str(path), {}, tpl, opts)  # imports, caches
    sample = read_fcs(path)
    n, p = sample.events.shape
    d0 = sample.data_offsets[0]

    def raw_read() -> np.ndarray:
        return np.fromfile(path, dtype="<f4", count=n * p, offset=d0).reshape(n, p)

    def compensate() -> Any:
        data = prepare(sample, tpl)
        for d in tpl.markers:
            data.raw(d)
        return data

    ready = compensate()

    def fresh() -> Any:
        data = prepare(sample, tpl)
        data._raw = dict(ready._raw)
        return data

    # the (dimension, population) pairs the gates transform, recorded once
    used: list[tuple[str, str]] = []
    original = gating._Populations.values

    def recording(self: Any, dim: str, name: str) -> np.ndarray:
        if (dim, name) not in used:
            used.append((dim, name))
        return original(self, dim, name)

    gating._Populations.values = recording
    try:
        result = gate_events(fresh())
    finally:
        gating._Populations.values = original

    def transform() -> Any:
        data = fresh()
        return [data.values_at(d, None if pop == ROOT_POP else gating.population_index(result, pop))
                for d, pop in used]

    markers = [m for m in tpl.markers if not gating.is_scatter(m, ready.channel(m))]

    def counts() -> Any:
        return (population_rows(result, tpl, {"sample_id": "bench"}, sample.sha256),
                gate_rows(result, tpl, "bench"))

    def without_intensities() -> Any:
        s = read_fcs(path)
        data = prepare(s, tpl)
        res = gate_events(data)
        return (population_rows(res, tpl, {"sample_id": "bench"}, s.sha256), gate_rows(res, tpl, "bench"))

    # values through a transform other than identity (scatter is read as it is)
    scaled = [(d, pop) for d, pop in used if not isinstance(ready.transforms[d], gating.Identity)]
    n_transformed = sum(pop == ROOT_POP for _, pop in scaled)
    values_transformed = sum(n if pop == ROOT_POP else int(gating.population_index(result, pop).size)
                             for _, pop in scaled)
    n_channels = len({d for d, _ in scaled})
    stages = [
        Stage("raw numpy read (DATA segment)", raw_read, note="the limit: np.fromfile of the DATA bytes"),
        Stage("read + checks + sha256", lambda: read_fcs(path).sha256, flowkit="read"),
        Stage("compensate (needed channels)", compensate),
        Stage("transform (gates' parent events; inside gate)", transform,
              note=f"{values_transformed / n:.2f} logicle values per event for {n_channels} channels "
                   f"({len(scaled)} channel x parent pairs, {n_transformed} of every event); FlowKit: "
                   f"{n_channels} or more"),
        Stage(f"gate ({len(tpl.populations)} populations, transforms included)", lambda: gate_events(fresh())),
        Stage("statistics: counts, percentages, gates", counts),
        Stage(f"statistics: intensities ({len(markers)} markers x {len(tpl.populations)} populations)",
              lambda: intensity_rows(result, ready, markers, "bench")),
        Stage("end to end without intensities", without_intensities, flowkit="total",
              note="read, compensate, transform, gate, counts: what FlowKit does"),
        Stage("end to end (file -> rows)", lambda: process_sample("bench", str(path), {}, tpl, opts),
              flowkit="total", note="plus intensities (FlowKit computes none)"),
    ]
    info = {"events": n, "channels": p, "matrix_bytes": n * p * 4, "template": tpl, "sample": sample,
            "output": warm, "values_transformed_per_event": values_transformed / n}
    return stages, info


def flowkit_stages(path: Path, tpl: Any, sample: Any, ours: Any) -> tuple[list[Stage], Callable[[Any], dict]]:
    """FlowKit 1.3.2 gating the same (resolved) strategy on the same file."""
    import flowkit as fk

    from immunoprofile.interop import export_gatingml, gatingml_id

    xml = export_gatingml(tpl, sample, resolved=ours.gates, sample_id="bench")
    strategy = fk.parse_gating_xml(io.BytesIO(xml))
    loaded = fk.Sample(str(path), sample_id="bench")

    def total() -> Any:
        return strategy.gate_sample(fk.Sample(str(path), sample_id="bench"))

    def compare(res: Any) -> dict[str, Any]:
        report = res.report
        mismatches: dict[str, Any] = {}
        for row in ours.populations:
            pop, count = row["population"], row["count"]
            rows = report[report["gate_name"] == gatingml_id(pop)]
            if rows.empty:
                mismatches[pop] = "not in FlowKit report"
            elif int(rows["count"].iloc[0]) != count:
                mismatches[pop] = {"ours": count, "flowkit": int(rows["count"].iloc[0])}
        return {"mismatches": mismatches, "populations_compared": len(ours.populations)}

    stages = [
        Stage("FlowKit 1.3.2: Sample(path) (read)", lambda: fk.Sample(str(path), sample_id="bench"), flowkit="read"),
        Stage("FlowKit 1.3.2: gate_sample (compensate, transform, gate)", lambda: strategy.gate_sample(loaded)),
        Stage("FlowKit 1.3.2 end to end (read, compensate, transform, gate)", total, flowkit="total"),
    ]
    return stages, compare


def steady_state(path: Path, repeats: int) -> dict[str, Any]:
    """Ours and FlowKit end to end in a new process that keeps freed memory for reuse, as the gate
    command's processes do (:mod:`immunoprofile.allocator`): the steady state of a process that gates
    file after file. The main table's runs get fresh memory each time, as a single file would."""
    code = ("import json, sys; sys.path.insert(0, %r); sys.path.insert(0, %r)\n"
            "from immunoprofile.allocator import reuse_freed_memory\n"
            "import bench\n"
            "print(json.dumps(bench._steady_state_here(%r, %d, reuse_freed_memory())))\n"
            % (str(ROOT), str(Path(__file__).parent), str(path), repeats))
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.CalledProcessError, ValueError, OSError) as e:
        return {"error": repr(e)}


def _steady_state_here(path: str, repeats: int, kept: bool) -> dict[str, Any]:
    from immunoprofile.fcs import read_fcs
    from immunoprofile.pipeline import Options, process_sample
    from immunoprofile.templates import load_template

    tpl = load_template(TEMPLATE)
    ours = process_sample("bench", path, {}, tpl, Options())
    ours_s, _ = best_of(lambda: process_sample("bench", path, {}, tpl, Options()), repeats)
    stages, _ = flowkit_stages(Path(path), tpl, read_fcs(path), ours)
    fk_s, _ = best_of(stages[-1].fn, max(1, repeats // 2))
    return {"malloc_keeps_freed_memory": kept, "ours_seconds": ours_s, "flowkit_seconds": fk_s,
            "speedup_vs_flowkit": fk_s / ours_s}


def run_stages(stages: list[Stage], repeats: int) -> dict[str, dict[str, Any]]:
    out = {}
    for st in stages:
        seconds, result = best_of(st.fn, repeats)
        del result
        out[st.name] = {"seconds": seconds, "peak_traced_bytes": peak_traced(st.fn)}
    return out


def pool_throughput(path: Path, files: int, jobs: int) -> dict[str, Any]:
    """``files`` samples through ``process_sample`` in ``jobs`` worker processes (not the batch command)."""
    ctx = multiprocessing.get_context("spawn")
    t0 = time.perf_counter()
    with ctx.Pool(jobs) as pool:
        pool.map(_pool_one, [str(path)] * (files + jobs))  # one warm-up file per worker
    warm_and_all = time.perf_counter() - t0
    t0 = time.perf_counter()
    with ctx.Pool(jobs) as pool:
        pool.map(_pool_one, [str(path)] * jobs)  # start-up and imports alone
    startup = time.perf_counter() - t0
    seconds = max(warm_and_all - startup, 1e-9)
    return {"files": files, "jobs": jobs, "seconds": seconds, "files_per_minute": 60 * files / seconds}


def _pool_one(path: str) -> int:
    from immunoprofile.allocator import reuse_freed_memory
    from immunoprofile.pipeline import Options, process_sample
    from immunoprofile.templates import load_template

    reuse_freed_memory()  # as the gate command's workers do

    return len(process_sample("bench", path, {}, load_template(TEMPLATE), Options()).populations)


def fresh_process_rss(path: Path, small: Path) -> dict[str, int]:
    """Peak RSS (VmHWM, bytes) of a new interpreter: after its imports and a small warm-up sample
    (code and tables loaded), then after one end-to-end run of ``path``."""
    code = ("import sys; sys.path.insert(0, %r)\n"
            "def hwm():\n"
            "    for line in open('/proc/self/status'):\n"
            "        if line.startswith('VmHWM:'):\n"
            "            return int(line.split()[1]) * 1024\n"
            "from immunoprofile.allocator import reuse_freed_memory\n"
            "reuse_freed_memory()\n"
            "from immunoprofile.pipeline import Options, process_sample\n"
            "from immunoprofile.templates import load_template\n"
            "process_sample('w', %r, {}, load_template(%r), Options())\n"
            "before = hwm()\n"
            "process_sample('b', %r, {}, load_template(%r), Options())\n"
            "print(before, hwm())\n" % (str(ROOT), str(small), TEMPLATE, str(path), TEMPLATE))
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        before, after = (int(x) for x in out.stdout.split())
    except (subprocess.CalledProcessError, ValueError, OSError):  # no /proc (not Linux)
        return {}
    return {"after_warm_up": before, "after_one_sample": after}


def table(rows: list[dict[str, Any]], n: int, matrix: int) -> str:
    lines = [f"{'stage':66s} {'seconds':>8s} {'M ev/s':>7s} {'vs FlowKit':>10s} {'x raw read':>10s} "
             f"{'peak MB':>8s} {'x matrix':>8s}"]
    for r in rows:
        vs = f"{r['speedup_vs_flowkit']:.1f}x" if r.get("speedup_vs_flowkit") else ""
        lines.append(f"{r['stage']:66s} {r['seconds']:8.3f} {r['events_per_s'] / 1e6:7.2f} {vs:>10s} "
                     f"{r['ratio_to_raw_read']:10.1f} {r['peak_traced_bytes'] / 1e6:8.0f} "
                     f"{r['peak_traced_bytes'] / matrix:8.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_output")
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="the sample table only (no reader, transform, pool, batch)")
    ap.add_argument("--no-flowkit", action="store_true")
    args = ap.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    import flowkit
    import sklearn

    report: dict[str, Any] = {
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
                    "numpy": np.__version__, "scikit-learn": sklearn.__version__, "flowkit": flowkit.__version__},
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = make_file(Path(tmp), args.events)
        stages, info = our_stages(path)
        n, matrix = info["events"], info["matrix_bytes"]
        measured = run_stages(stages, args.repeats)
        fk_measured: dict[str, dict[str, Any]] = {}
        check = None
        fk_stages: list[Stage] = []
        if not args.no_flowkit:
            fk_stages, compare = flowkit_stages(path, info["template"], info["sample"], info["output"])
            fk_measured = run_stages(fk_stages, max(1, args.repeats // 2))
            check = compare(fk_stages[-1].fn())
        fk_time = {st.flowkit: fk_measured[st.name]["seconds"] for st in fk_stages if st.flowkit}
        raw = measured["raw numpy read (DATA segment)"]["seconds"]
        rows = []
        for st in stages + fk_stages:
            m = measured.get(st.name) or fk_measured[st.name]
            sec = m["seconds"]
            ours = st in stages
            rows.append({
                "stage": st.name, "seconds": sec, "events_per_s": n / sec if sec > 0 else float("inf"),
                "speedup_vs_flowkit": (fk_time[st.flowkit] / sec if ours and st.flowkit in fk_time else
                                       (1.0 if not ours and st.flowkit == "total" else None)),
                "ratio_to_raw_read": sec / raw if raw > 0 else float("nan"),
                "peak_traced_bytes": m["peak_traced_bytes"], "peak_over_matrix": m["peak_traced_bytes"] / matrix,
                "note": st.note,
            })
        report["sample"] = {"events": n, "channels": info["channels"], "event_matrix_bytes": matrix,
                            "template": TEMPLATE, "repeats": args.repeats, "stages": rows,
                            "values_transformed_per_event": info["values_transformed_per_event"],
                            "flowkit_count_mismatches": check["mismatches"] if check else None,
                            "flowkit_populations_compared": check["populations_compared"] if check else 0,
                            "fresh_process_rss_bytes": fresh_process_rss(path, make_file(Path(tmp), 20_000)),
                            "steady_state": steady_state(path, args.repeats) if not args.no_flowkit else {}}
        if not args.quick:
            import bench_read
            import bench_transform

            report["pool"] = {str(j): pool_throughput(path, 20, j) for j in (1, 2)}
            report["read"] = bench_read.run(Path(tmp))
            report["transform"] = bench_transform.run(repeats=3)
            try:
                import bench_batch  # added with the batch issue
            except ImportError:
                pass
            else:
                report["batch"] = bench_batch.run(Path(tmp))

    s = report["sample"]
    print(f"\n{n:,} events x {s['channels']} channels, template {TEMPLATE} (event matrix {matrix / 1e6:.0f} MB); "
          f"best of {args.repeats}, FlowKit best of {max(1, args.repeats // 2)}\n")
    print(table(s["stages"], n, matrix))
    for r in s["stages"]:
        if r["note"]:
            print(f"  {r['stage']}: {r['note']}")
    print("\nvs FlowKit: the same stage's FlowKit time / ours; x raw read: our time / np.fromfile of DATA;"
          "\npeak: tracemalloc peak during one run of the stage, over what existed before it (end to end: all)")
    rss = s["fresh_process_rss_bytes"]
    if rss:
        print(f"a fresh process: peak RSS {rss['after_warm_up'] / 1e6:.0f} MB after imports and a 20,000-event "
              f"sample, {rss['after_one_sample'] / 1e6:.0f} MB after this one "
              f"(+{(rss['after_one_sample'] - rss['after_warm_up']) / matrix:.2f}x the event matrix)")
    ss = s.get("steady_state") or {}
    if "ours_seconds" in ss:
        print(f"a process gating file after file (freed memory kept for reuse, as the gate command's processes; "
              f"FlowKit in the same process): ours {ss['ours_seconds']:.3f} s, FlowKit {ss['flowkit_seconds']:.3f} s, "
              f"{ss['speedup_vs_flowkit']:.1f}x")
    if check is not None:
        mm = check["mismatches"]
        print(f"counts vs FlowKit: {check['populations_compared'] - len(mm)} of {check['populations_compared']} "
              f"populations identical" + (f"; differences: {mm}" if mm else ""))
    if "pool" in report:
        for j, r in report["pool"].items():
            print(f"{r['files']} files through process_sample in {j} process(es): {r['seconds']:.2f} s, "
                  f"{r['files_per_minute']:.0f} files/min")
    for key in ("read", "transform", "batch"):
        if key in report:
            print(f"\n{key}: " + json.dumps(report[key], default=str))
    (out_dir / "bench.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nwritten {out_dir / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
