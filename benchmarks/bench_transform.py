"""Benchmark: our logicle and compensation against flowutils/FlowKit (issue 8).

Run ``python benchmarks/bench_transform.py`` (prints JSON) or call :func:`run` from
the main benchmark. Times are the best of ``repeats`` runs (the machine is shared),
single-threaded; the data are synthetic but shaped like compensated cytometry
(a negative-centred spread plus a log-normal tail, ~3 % beyond ``T``).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Callable

import numpy as np

from immunoprofile.transform import Logicle, compensate


def _best(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def _events(n_events: int, n_channels: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(0.0, 2000.0, (n_events, n_channels)) + rng.lognormal(6.0, 2.5, (n_events, n_channels))


def run(n_events: int = 1_000_000, n_channels: int = 12, repeats: int = 3, seed: int = 0,
        with_flowkit: bool = True) -> dict[str, Any]:
    """Time the logicle (ours vs flowutils/FlowKit) and compensation on ``n_events x n_channels``.

    Returns
    -------
    dict
        ``values`` (events x channels), ``*_seconds``, ``*_values_per_s``,
        ``speedup_vs_flowutils``, ``max_abs_error_vs_flowutils`` (0..1 scale) and
        the compensation figures; all plain floats/ints (JSON-ready).
    """
    import flowutils

    events = _events(n_events, n_channels, seed)
    values = events.size
    tr = Logicle()  # T=262144, W=0.5, M=4.5, A=0
    tr.apply(events[:10, 0])  # build the table outside the timing (~2 ms, once per parameter set)

    # interleaved, best of each: a busy machine slows both alike
    ours_s = fu_s = float("inf")
    for _ in range(repeats):
        seconds, ours = _best(lambda: tr.apply(events), 1)
        ours_s = min(ours_s, seconds)
        seconds, truth = _best(lambda: flowutils.transforms.logicle(events, None, t=262144, m=4.5, w=0.5, a=0), 1)
        fu_s = min(fu_s, seconds)
    error = float(np.max(np.abs(ours - truth)))

    # the gating pattern: one float32 channel (a strided column of the event matrix) at a time
    events32 = events.astype(np.float32)
    col_s, _ = _best(lambda: [tr.apply(events32[:, j]) for j in range(n_channels)], repeats)
    exact_s, exact = _best(lambda: tr.apply_exact(events[: n_events // 10]), 1)

    out: dict[str, Any] = {
        "n_events": n_events,
        "n_channels": n_channels,
        "values": values,
        "logicle_seconds": ours_s,
        "logicle_values_per_s": values / ours_s,
        "logicle_float32_columns_seconds": col_s,
        "logicle_float32_columns_values_per_s": values / col_s,
        "flowutils_logicle_seconds": fu_s,
        "flowutils_logicle_values_per_s": values / fu_s,
        "speedup_vs_flowutils": fu_s / ours_s,
        "max_abs_error_vs_flowutils": error,
        "max_abs_error_exact_vs_flowutils": float(np.max(np.abs(exact - truth[: n_events // 10]))),
        "logicle_exact_values_per_s": exact.size / exact_s,
    }
    if with_flowkit:
        from flowkit import transforms as fk_transforms

        fk = fk_transforms.LogicleTransform(param_t=262144, param_w=0.5, param_m=4.5, param_a=0)
        fk_s, _ = _best(lambda: fk.apply(events), 1)
        out["flowkit_logicle_seconds"] = fk_s
        out["flowkit_logicle_values_per_s"] = values / fk_s
        out["speedup_vs_flowkit"] = fk_s / ours_s

    # compensation: 18 float32 detectors of a 20-parameter file
    rng = np.random.default_rng(seed + 1)
    k = 18
    spill = np.eye(k) + rng.uniform(0.0, 0.15, (k, k)) * (rng.random((k, k)) < 0.3)
    np.fill_diagonal(spill, 1.0)
    raw = rng.normal(1000.0, 800.0, (n_events, k + 2)).astype(np.float32)
    cols = list(range(1, k + 1))
    comp_s, comp = _best(lambda: compensate(raw, cols, spill), repeats)
    fu_comp_s, fu_comp = _best(lambda: flowutils.compensate.compensate(raw.astype(np.float64), spill, cols), 1)
    out.update(
        compensate_seconds=comp_s,
        compensate_events_per_s=n_events / comp_s,
        flowutils_compensate_seconds=fu_comp_s,
        compensate_max_abs_difference=float(np.max(np.abs(comp - fu_comp[:, cols]))),
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--channels", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-flowkit", action="store_true", help="skip the FlowKit timing (slow import)")
    args = parser.parse_args()
    result = run(args.events, args.channels, args.repeats, with_flowkit=not args.no_flowkit)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
