"""``make bench``: end-to-end speed of one 1,000,000-event sample, stage by stage, against
FlowKit gating the same strategy and against a raw numpy read of the DATA segment.

The strategy is the bundled ``t_cell_exhaustion`` template on a simulated 18-channel file. Its
data-driven gates are resolved by our run (the coordinates in ``gates.csv``), exported to
Gating-ML 2.0 and gated by FlowKit on the same file, so both gate the same strategy; counts are
compared population by population.

    python benchmarks/bench.py --out bench_output          # table on stdout, bench.json in the folder
    python benchmarks/bench.py --events 200000 --quick     # smaller, skips the sub-benchmarks
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import platform
import resource
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
    """Peak bytes allocated (numpy buffers included) while ``fn`` runs."""
    gc.collect()
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def make_file(folder: Path, events: int) -> Path:
    from immunoprofile.fcs import write_fcs
    from immunoprofile.simulate import simulate_sample

    s = simulate_sample("t_cell", events, extra_channels=5, seed=1)
    path = folder / f"t_cell_{events}.fcs"
    write_fcs(path, s.events, s.channels, s.markers, spillover=s.spillover)
    return path


def bench_sample(path: Path, repeats: int) -> dict[str, Any]:
    from immunoprofile.fcs import read_fcs
    from immunoprofile.gating import gate_events, prepare
    from immunoprofile.pipeline import Options, gate_sample, process_sample
    from immunoprofile.stats import intensity_rows, population_rows
    from immunoprofile.templates import load_template

    tpl = load_template("t_cell_exhaustion")
    opts = Options()
    warm = process_sample("bench", str(path), {}, tpl, opts)  # imports, caches
    sample = read_fcs(path)
    n, p = sample.events.shape
    d0, d1 = sample.data_offsets
    matrix_bytes = n * p * 4

    def raw_read() -> np.ndarray:
        return np.fromfile(path, dtype="<f4", count=n * p, offset=d0).reshape(n, p)

    def stage_prepare() -> Any:
        data = prepare(sample, tpl)
        for d in tpl.markers:
            data.raw(d)
        return data

    def stage_transform() -> Any:
        data = stage_prepare()
        for d in tpl.markers:
            data.values(d)
        return data

    ready = stage_transform()

    def stage_gate() -> Any:
        # gating on already transformed columns: a fresh EventData sharing the caches
        data = prepare(sample, tpl)
        data._raw, data._tf = dict(ready._raw), dict(ready._tf)
        return gate_events(data)

    result = stage_gate()
    markers = [m for m in tpl.markers if not m.upper().startswith(("FSC", "SSC"))]

    def stage_stats() -> Any:
        return (population_rows(result, tpl, {"sample_id": "bench"}, sample.sha256),
                intensity_rows(result, ready, markers, "bench"))

    stages: dict[str, float] = {}
    stages["raw numpy read (DATA segment)"], _ = best_of(raw_read, repeats)
    stages["read + checks + sha256"], _ = best_of(lambda: read_fcs(path), repeats)
    t_prep, _ = best_of(stage_prepare, repeats)
    stages["compensate (needed channels)"] = t_prep
    t_tf, _ = best_of(stage_transform, repeats)
    stages["transform (needed channels)"] = max(t_tf - t_prep, 0.0)
    stages["gate (18 populations)"], _ = best_of(stage_gate, repeats)
    stages["statistics (counts, intensities)"], _ = best_of(stage_stats, repeats)
    stages["end to end (file -> rows)"], out = best_of(
        lambda: process_sample("bench", str(path), {}, tpl, opts), repeats)
    peak = peak_traced(lambda: process_sample("bench", str(path), {}, tpl, opts))
    return {"events": n, "channels": p, "matrix_bytes": matrix_bytes, "stages": stages,
            "peak_traced_bytes": peak, "output": out, "template": tpl, "sample": sample,
            "warm_rows": len(warm.populations)}


def bench_flowkit(path: Path, tpl: Any, sample: Any, ours: Any, repeats: int) -> dict[str, Any]:
    """FlowKit 1.3.2 gating the same (resolved) strategy on the same file, end to end."""
    import flowkit as fk

    from immunoprofile.interop import export_gatingml, gatingml_id

    xml = export_gatingml(tpl, sample, resolved=ours.gates, sample_id="bench")
    strategy = fk.parse_gating_xml(io.BytesIO(xml))

    def run() -> Any:
        s = fk.Sample(str(path), sample_id="bench")
        return strategy.gate_sample(s)

    seconds, res = best_of(run, max(1, repeats // 2))
    report = res.report
    ours_counts = {r["population"]: r["count"] for r in ours.populations}
    mismatches = {}
    for pop, count in ours_counts.items():
        gid = gatingml_id(pop)
        rows = report[report["gate_name"] == gid]
        if rows.empty:
            mismatches[pop] = "not in FlowKit report"
            continue
        fk_count = int(rows["count"].iloc[0])
        if fk_count != count:
            mismatches[pop] = {"ours": count, "flowkit": fk_count}
    return {"seconds": seconds, "mismatches": mismatches, "populations_compared": len(ours_counts)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_output")
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="skip the reader, transform and batch sub-benchmarks")
    ap.add_argument("--no-flowkit", action="store_true")
    args = ap.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"machine": {"python": platform.python_version(), "platform": platform.platform(),
                                          "cpus": __import__("os").cpu_count()}}
    with tempfile.TemporaryDirectory() as tmp:
        path = make_file(Path(tmp), args.events)
        res = bench_sample(path, args.repeats)
        n = res["events"]
        fk_res = None
        if not args.no_flowkit:
            fk_res = bench_flowkit(path, res["template"], res["sample"], res["output"], args.repeats)
        stages = res["stages"]
        raw = stages["raw numpy read (DATA segment)"]
        rows = []
        for name, sec in stages.items():
            rows.append({
                "stage": name, "seconds": sec, "events_per_s": n / sec if sec > 0 else float("inf"),
                "ratio_to_raw_read": sec / raw if raw > 0 else float("nan"),
                "speedup_vs_flowkit": (fk_res["seconds"] / sec if fk_res and name.startswith("end to end") else None),
            })
        if fk_res:
            rows.append({"stage": "FlowKit 1.3.2, same strategy (read+comp+transform+gate)",
                         "seconds": fk_res["seconds"], "events_per_s": n / fk_res["seconds"],
                         "ratio_to_raw_read": fk_res["seconds"] / raw, "speedup_vs_flowkit": 1.0})
        report["sample"] = {"events": n, "channels": res["channels"], "event_matrix_bytes": res["matrix_bytes"],
                            "peak_traced_bytes": res["peak_traced_bytes"],
                            "peak_over_matrix": res["peak_traced_bytes"] / res["matrix_bytes"],
                            "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                            "stages": rows,
                            "flowkit_count_mismatches": fk_res["mismatches"] if fk_res else None,
                            "flowkit_populations_compared": fk_res["populations_compared"] if fk_res else 0}
        if not args.quick:
            import bench_read
            import bench_transform

            report["read"] = bench_read.run(Path(tmp))
            report["transform"] = bench_transform.run(repeats=3)
            try:
                import bench_batch  # noqa: F401  (added with the batch issue)
            except ImportError:
                pass
            else:
                report["batch"] = bench_batch.run(Path(tmp))

    print(f"\n{n:,} events x {res['channels']} channels, template t_cell_exhaustion "
          f"(event matrix {res['matrix_bytes'] / 1e6:.0f} MB)\n")
    print(f"{'stage':58s} {'seconds':>8s} {'M events/s':>11s} {'x raw read':>11s} {'vs FlowKit':>11s}")
    for r in report["sample"]["stages"]:
        vs = f"{r['speedup_vs_flowkit']:.1f}x" if r["speedup_vs_flowkit"] else ""
        print(f"{r['stage']:58s} {r['seconds']:8.3f} {r['events_per_s'] / 1e6:11.2f} "
              f"{r['ratio_to_raw_read']:11.1f} {vs:>11s}")
    s = report["sample"]
    print(f"\npeak memory during one end-to-end run: {s['peak_traced_bytes'] / 1e6:.0f} MB "
          f"= {s['peak_over_matrix']:.2f}x the event matrix; max RSS {s['max_rss_bytes'] / 1e6:.0f} MB")
    if fk_res is not None:
        mm = fk_res["mismatches"]
        print(f"counts vs FlowKit: {fk_res['populations_compared'] - len(mm)} of {fk_res['populations_compared']} "
              f"populations identical" + (f"; differences: {mm}" if mm else ""))
    for key in ("read", "transform", "batch"):
        if key in report:
            print(f"\n{key}: " + json.dumps(report[key], default=str))
    (out_dir / "bench.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nwritten {out_dir / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
